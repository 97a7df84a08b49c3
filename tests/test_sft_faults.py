"""A trainer rank that dies or hangs mid-run (two Ray workers on CPU): the driver tears the worker
group down, rebuilds it, resumes from the last valid checkpoint and finishes with the loss curve of
the uninterrupted run; a hang is named (which rank waits in which collective) with every worker's
stack dumped into the run directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sft_runs import SMALL

from memento_train.training.tracking import read_metrics

pytestmark = pytest.mark.slow  # each run starts Ray and two workers (~30-60 s on 2 cores)

RAY = [a for a in SMALL if not a.startswith("cluster.")] + [
    "recipe=tiny_stage1",
    "cluster.use_ray=true",
    "cluster.num_workers=2",
    "cluster.cpus_per_worker=1",
    "cluster.collective_timeout_s=300",
    "train.max_steps=8",
    "checkpoint.every=2",
    "checkpoint.export_hf=false",
]


def curve(output_dir):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(output_dir)]


def start(output_dir, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "memento_train.sft.cli", *RAY, *overrides, f"output_dir={output_dir}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 420) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the run hung:\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    finish(start(out))
    assert len(curve(out)) == 8
    return curve(out)


def _worker_pids(marker: str) -> list[int]:
    """Pids of the SFT worker actors whose environment carries ``marker`` (this test's run only)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if b"SFTWorker" in cmdline and f"MEMENTO_TEST_RUN={marker}".encode() in environ:
            pids.append(int(entry))
    return pids


def test_a_hung_rank_then_a_killed_worker_are_each_survived_and_the_run_ends_on_the_uninterrupted_curve(
    tmp_path, straight
):
    out = tmp_path / "faulty"
    # Step 4, first attempt: rank 1 sleeps before training, so rank 0 waits for it inside FSDP's
    # parameter all-gather; the watchdog (deadline 5 x median step, at least 8 s) catches it.
    proc = start(
        out,
        f"cluster.env.MEMENTO_TEST_RUN={out}",
        "faults.inject_hang_at_step=4",
        "faults.watchdog_factor=5",
        "faults.watchdog_min_s=8",
        "faults.watchdog_warmup_steps=2",
    )
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline:  # after the first restart, at step >= 5 ...
        records = read_metrics(out)
        if records and records[-1]["restarts"] == 1 and records[-1]["step"] >= 5:
            break
        time.sleep(0.1)
    pids = _worker_pids(str(out))
    assert len(pids) == 2, f"expected the two SFT workers of this run, found {pids}"
    os.kill(pids[-1], signal.SIGKILL)  # ... a worker process is killed, like the OOM killer does
    log = finish(proc)

    assert "step 4 did not finish within" in log and "restart 1 of 2" in log, log[-4000:]
    dump = out / "hangs" / "step_00000004-attempt0"
    summary = (dump / "summary.txt").read_text()
    assert "rank(s) [0] wait in a collective that rank(s) [1] never entered" in summary, summary
    assert "rank 0: waiting in collective all_gather" in summary and "torch/distributed" in summary
    assert "rank 1: not in a collective: train_step (memento_train/sft/worker.py" in summary
    assert "foreach_all_gather" in (dump / "rank_00000.txt").read_text()  # the full stacks are there

    assert "died during" in log and "restart 2 of 2" in log, log[-4000:]
    records = read_metrics(out)
    assert records[0]["restarts"] == 0 and records[-1]["restarts"] == 2
    assert curve(out) == straight
