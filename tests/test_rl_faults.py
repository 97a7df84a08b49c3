"""Fault tolerance of the RL loop: dead rollout / reward workers are replaced and the step retried with
exactly the samples it would have had; ``resume=auto`` continues with the same data order."""

from __future__ import annotations

import os

import pytest
from test_rl_loop import run

from memento_train.checkpoint.manager import CheckpointManager

_MARKER = "MEMENTO_TEST_REWARD_CRASH_MARKER"


def crash_once_reward(response: str, record) -> float:
    """Kills its reward worker process the first time it runs (a marker file remembers), then scores
    like ``length_parity_reward``."""
    marker = os.environ[_MARKER]
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return float(len(response) % 2)


def _same_batch(a: dict, b: dict) -> None:
    for key in ("samples", "response_tokens", "reward_mean", "reward_std", "response_length"):
        assert a[key] == b[key], key


def test_rollout_worker_crash_is_retried_with_the_same_samples(tmp_path):
    _, clean = run(tmp_path / "clean", "train.total_steps=2")
    _, faulty = run(tmp_path / "faulty", "train.total_steps=2", "faults.inject_rollout_crash_at_step=2")
    assert [m["rollout_retries"] for m in faulty] == [0, 1]
    assert faulty[-1]["rollout_restarts"] == 1
    for a, b in zip(clean, faulty):  # the retried step has exactly the batch it would have had
        _same_batch(a, b)


@pytest.mark.slow
def test_killed_rollout_actor_on_ray_is_restarted_and_the_step_retried(tmp_path):
    over = [
        "cluster.use_ray=true",
        "rollout_cluster.use_ray=true",
        "cluster.cpus_per_worker=1",
        "rollout_cluster.cpus_per_worker=1",
        "train.total_steps=2",
    ]
    _, clean = run(tmp_path / "clean", *over, "cluster.use_ray=false", "rollout_cluster.use_ray=false")
    _, faulty = run(tmp_path / "faulty", *over, "faults.inject_rollout_crash_at_step=1")
    assert faulty[0]["rollout_retries"] == 1 and faulty[-1]["rollout_restarts"] == 1
    for a, b in zip(clean, faulty):
        _same_batch(a, b)


@pytest.mark.slow
def test_crashed_reward_worker_is_replaced_and_the_batch_rescored(tmp_path, monkeypatch):
    monkeypatch.setenv(_MARKER, str(tmp_path / "crashed"))
    _, clean = run(tmp_path / "clean", "train.total_steps=1")
    _, faulty = run(
        tmp_path / "faulty", "train.total_steps=1", "reward.num_workers=1", "reward.fn=test_rl_faults:crash_once_reward"
    )
    assert os.path.exists(tmp_path / "crashed")
    assert faulty[0]["reward_retries"] == 1 and faulty[0]["reward/crashes"] == 1  # logged with the step
    _same_batch(clean[0], faulty[0])


def test_resume_auto_continues_from_the_last_checkpoint_with_the_same_data(tmp_path):
    over = ["train.total_steps=3", "checkpoint.every=1"]
    _, straight = run(tmp_path / "straight", *over)
    run(tmp_path / "split", *over, "train.max_steps=2")
    assert CheckpointManager(tmp_path / "split" / "checkpoints").latest()[0] == 2
    _, resumed = run(tmp_path / "split", *over, "resume=auto")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        _same_batch(a, b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_sigterm_to_memento_rl_checkpoints_the_step_exits_75_and_the_rerun_continues_the_same_batches(tmp_path):
    import signal
    import sys
    from pathlib import Path

    from sft_runs import signal_after
    from test_rl_loop import FAST

    from memento_train.faults.preemption import EXIT_PREEMPTED
    from memento_train.training.tracking import read_metrics

    over = ["train.total_steps=4", "checkpoint.every=100"]  # no periodic checkpoint: only the signal's
    _, straight = run(tmp_path / "straight", *over)
    out = tmp_path / "preempted"
    tests_dir = str(Path(__file__).parent)  # the reward function lives in test_rl_loop
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "memento_train.rl.cli", *FAST, *over, f"output_dir={out}"]
    returncode, err = signal_after(cmd, out, metrics_lines=1, sig=signal.SIGTERM, env=env)
    assert returncode == EXIT_PREEMPTED, err[-3000:]
    logged = len(read_metrics(out))
    assert 1 <= logged < 4 and f"preempted by SIGTERM: stopped after step {logged}" in err
    assert CheckpointManager(out / "checkpoints").latest()[0] == logged
    _, resumed = run(out, *over)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        _same_batch(a, b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
