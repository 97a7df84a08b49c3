"""``scripts/gpu_check.py --small``: the GPU self-check runs end to end on CPU (a smoke test of the script;
the real check needs a GPU). Every step runs (or is skipped with a reason where it needs CUDA), one JSON
report is written and one table printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_small_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert list(steps) == [
        "environment",
        "set_device",
        "triton_d128",
        "triton_d64_window",
        "sft_loss_memory",
        "flash_gather",
        "flex_compile",
        "sft_step",
        "attention_benchmark",
    ]
    assert {name: s["status"] for name, s in steps.items() if s["status"] not in ("ok", "skipped")} == {}
    if not steps["environment"].get("gpus_visible"):
        assert steps["set_device"]["status"] == "skipped" and "CUDA" in steps["set_device"]["summary"]
    for name in ("triton_d128", "triton_d64_window"):  # Triton's interpreter on CPU, against the fp32 reference
        assert steps[name]["status"] == "ok" and max(steps[name]["rel_errors"].values()) <= steps[name]["tolerance"]
    loss = steps["sft_loss_memory"]
    assert loss["fused_saved_gib"] < loss["plain_saved_gib"] and loss["loss_rel_diff"] < 1e-5
    assert steps["flash_gather"]["gathered_over_tokens"] > 1  # the miniature batch evicts
    assert "stage2_over_stage1_tokens_per_s" in steps["sft_step"]
    assert "step" in res.stdout and "report:" in res.stdout  # the table
