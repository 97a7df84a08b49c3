"""Small, fast SFT run settings shared by the trainer tests (tiny model, 48 synthetic records)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SMALL = [
    "logger=none",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=1",
    "data.path=synthetic:48",
    "train.global_batch_size=8",
    "train.micro_batch_tokens=2048",
    "cluster.use_ray=false",
    "cluster.num_workers=1",
    "optim.lr=1e-2",
]
STAGE2 = ["stage=2", "data.block_masking.keep_last_n_blocks=0", "model.require_stage1_init=false"]


def cli(*args: str, output_dir, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``memento-train`` in a subprocess (what users run), failing loudly with its output."""
    cmd = [sys.executable, "-m", "memento_train.sft.cli", *args, f"output_dir={output_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def start_and_kill_after(args: list[str], output_dir, *, metrics_lines: int, timeout: float = 300) -> None:
    """Start ``memento-train``, wait until ``metrics_lines`` steps are logged, then SIGKILL it."""
    cmd = [sys.executable, "-m", "memento_train.sft.cli", *args, f"output_dir={output_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = os.path.join(str(output_dir), "metrics.jsonl")
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"run ended before it could be killed:\n{proc.stderr.read()[-4000:]}")
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= metrics_lines:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("timed out waiting for the run to log steps")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def signal_after(
    cmd: list[str], output_dir, *, metrics_lines: int, sig: int, env: dict | None = None, timeout: float = 240
) -> tuple[int, str]:
    """Start ``cmd`` (a driver CLI writing to ``output_dir``), send ``sig`` once ``metrics_lines`` steps
    are logged, and return its exit status and stderr."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = os.path.join(str(output_dir), "metrics.jsonl")
    try:
        deadline = time.time() + timeout
        while proc.poll() is None and time.time() < deadline:
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= metrics_lines:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the signal:\n{proc.stderr.read()[-4000:]}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err
