"""What survives an interrupted SFT run: kill -9, a checkpoint write cut short, a damaged newest
checkpoint (truncated shard, deleted rank file, zero-filled file) and a preemption signal. Each time
``resume=auto`` continues from the newest *valid* checkpoint and the loss curve equals the
uninterrupted run's, step for step."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from sft_runs import SMALL, cli, signal_after, start_and_kill_after

from memento_train.checkpoint.manager import CheckpointManager, verify_checkpoint
from memento_train.faults.preemption import EXIT_PREEMPTED
from memento_train.sft.config import load_sft_config
from memento_train.sft.driver import run_stage
from memento_train.training.tracking import read_metrics

RUN = ["recipe=tiny_stage1", *SMALL, *["train.max_steps=6", "checkpoint.every=2", "checkpoint.export_hf=false"]]


def curve(output_dir):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(output_dir)]


def train(output_dir, *overrides: str):
    """The same run as ``RUN`` in this process (faster than the CLI; identical numbers)."""
    return run_stage(load_sft_config("tiny_stage1", [*RUN[1:], *overrides, f"output_dir={output_dir}"]), progress=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(out)
    assert len(curve(out)) == 6
    return curve(out)


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
    """The same run stopped after step 4 (checkpoints at steps 2 and 4; max_steps does not change the
    schedule), as a template that tests copy and damage."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(out, "train.max_steps=4")
    return out


def test_kill_9_then_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, straight):
    killed = tmp_path / "killed"
    start_and_kill_after(RUN, killed, metrics_lines=3)
    done = [s for s, _ in CheckpointManager(killed / "checkpoints").complete()]
    assert done and max(done) < 6, f"the kill should land mid-run, checkpoints: {done}"
    cli(*RUN, "resume=auto", output_dir=killed)
    assert curve(killed) == straight


def test_an_interrupted_checkpoint_write_falls_back_to_the_previous_checkpoint(tmp_path, straight, stopped_at_4):
    crashed = tmp_path / "crashed"
    shutil.copytree(stopped_at_4, crashed)
    ckpts = crashed / "checkpoints"
    # What a kill during the step-4 write leaves: the staging copy half written, step 4 never committed.
    shutil.copytree(ckpts / "step_00000004", ckpts / ".staging-step_00000006")
    (ckpts / ".staging-step_00000006" / "trainer_state.json").unlink()
    shutil.rmtree(ckpts / "step_00000004")
    for f in (ckpts / ".staging-step_00000006" / "engine").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    train(crashed)
    assert curve(crashed) == straight
    assert not (ckpts / ".staging-step_00000006").exists()


def _truncate_shard(ckpt):
    shard = next((ckpt / "engine").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])


def _delete_rank_state(ckpt):
    (ckpt / "rng" / "rank_00000.pt").unlink()


def _zero_fill(ckpt):
    shard = next((ckpt / "engine").glob("*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))


@pytest.mark.parametrize("damage", [_truncate_shard, _delete_rank_state, _zero_fill])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one_with_the_same_curve(
    tmp_path, straight, stopped_at_4, damage, capsys
):
    run = tmp_path / "run"
    shutil.copytree(stopped_at_4, run)
    damage(run / "checkpoints" / "step_00000004")
    train(run)
    assert "resuming from step_00000002 instead" in capsys.readouterr().out
    assert curve(run) == straight
    ckpts = CheckpointManager(run / "checkpoints")
    assert [s for s, _ in ckpts.complete()][-2:] == [4, 6] and (run / "checkpoints" / "step_00000004.invalid").is_dir()
    assert all(verify_checkpoint(p) == [] for _, p in ckpts.complete())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_preemption_signal_checkpoints_the_current_step_exits_75_and_the_rerun_continues_the_curve(
    tmp_path, straight, sig
):
    out = tmp_path / "preempted"
    # No periodic checkpoints: whatever is resumed from is the checkpoint the signal produced.
    args = [*RUN, "checkpoint.every=100"]
    cmd = [sys.executable, "-m", "memento_train.sft.cli", *args, f"output_dir={out}"]
    returncode, err = signal_after(cmd, out, metrics_lines=2, sig=sig)
    assert returncode == EXIT_PREEMPTED, err[-3000:]
    logged = len(read_metrics(out))
    assert 2 <= logged < 6 and f"preempted by {sig.name}: stopped after step {logged}" in err
    assert [s for s, _ in CheckpointManager(out / "checkpoints").complete()] == [logged]
    train(out, "checkpoint.every=100")  # the same command again (here in-process: same numbers, faster)
    assert curve(out) == straight


def _inject_enospc_at(monkeypatch, step: int) -> list[str]:
    """The step-``step`` checkpoint write runs out of space half way: a partial shard, then ENOSPC."""
    import errno

    from memento_train.training import worker as engine_worker

    real, hits = engine_worker.save_rank_state, []

    def save(engine, path, rank):
        if f"step_{step:08d}" in path:
            hits.append(path)
            os.makedirs(os.path.join(path, "engine"), exist_ok=True)
            with open(os.path.join(path, "engine", "partial.distcp"), "wb") as f:
                f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, "engine", "partial.distcp"))
        return real(engine, path, rank)

    monkeypatch.setattr(engine_worker, "save_rank_state", save)
    return hits


def test_a_full_disk_at_a_checkpoint_fails_naming_path_and_free_space_and_keeps_the_previous_one(
    tmp_path, straight, monkeypatch
):
    from memento_train.checkpoint.manager import CheckpointSaveError

    out = tmp_path / "full"
    hits = _inject_enospc_at(monkeypatch, 4)
    with pytest.raises(CheckpointSaveError) as err:
        train(out)
    msg = str(err.value)
    assert hits and f"{out}/checkpoints/step_00000004" in msg and "No space left on device" in msg
    assert " free of " in msg and "the previous checkpoint step_00000002 is intact" in msg
    ckpts = CheckpointManager(out / "checkpoints")
    assert [s for s, _ in ckpts.complete()] == [2] and verify_checkpoint(ckpts.latest()[1]) == []
    assert not list((out / "checkpoints").glob(".staging-*"))  # the partial write is gone
    monkeypatch.undo()
    train(out)  # space freed: resume=auto continues from step 2
    assert curve(out) == straight


def test_with_on_save_error_retry_a_full_disk_skips_that_checkpoint_and_training_goes_on(
    tmp_path, straight, monkeypatch
):
    out = tmp_path / "retry"
    _inject_enospc_at(monkeypatch, 4)
    train(out, "checkpoint.on_save_error=retry")
    records = read_metrics(out)
    assert [r["checkpoint_save_failures"] for r in records] == [0, 0, 0, 0, 1, 1]
    assert [s for s, _ in CheckpointManager(out / "checkpoints").complete()][-2:] == [2, 6]
    assert curve(out) == straight


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True)
    return (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_a_real_enospc_on_a_small_filesystem_stops_the_cli_with_the_path_and_free_space(tmp_path):
    fs = tmp_path / "small-fs"
    if not _mount_tmpfs(fs, "2m"):
        pytest.skip("needs root and permission to mount a 2 MiB tmpfs (the injected-ENOSPC tests cover the logic)")
    try:
        out = tmp_path / "run"
        out.mkdir()
        (out / "checkpoints").symlink_to(fs)  # one ~1.5 MiB checkpoint fits, the second does not
        cmd = [sys.executable, "-m", "memento_train.sft.cli", *RUN, f"output_dir={out}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        err = proc.stderr
        assert "memento-train: error: could not write checkpoint" in err, err[-3000:]
        # torch.save loses the errno of a full disk ("unexpected pos"): the free space tells instead.
        assert "No space left on device" in err or "the filesystem is full" in err, err[-3000:]
        assert "free of 2.0 MiB on its filesystem" in err and "previous checkpoint step_00000002 is intact" in err
        ckpts = CheckpointManager(out / "checkpoints")
        assert [s for s, _ in ckpts.complete()] == [2] and verify_checkpoint(ckpts.latest()[1]) == []
        assert not list(fs.glob(".staging-*"))
    finally:
        subprocess.run(["umount", str(fs)], capture_output=True)
