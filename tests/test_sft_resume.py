"""kill -9 mid-run, then resume=auto: the loss curve equals an uninterrupted run's; a checkpoint whose
write was interrupted is ignored and the previous one is used."""

from __future__ import annotations

import shutil

from sft_runs import SMALL, cli, start_and_kill_after

from memento_train.checkpoint import CheckpointManager
from memento_train.tracking import read_metrics

RUN = ["recipe=tiny_stage1", *SMALL, *["train.max_steps=6", "checkpoint.every=2", "checkpoint.export_hf=false"]]


def curve(output_dir):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(output_dir)]


def test_kill_9_then_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli(*RUN, output_dir=straight)
    start_and_kill_after(RUN, killed, metrics_lines=3)
    done = [s for s, _ in CheckpointManager(killed / "checkpoints").complete()]
    assert done and max(done) < 6, f"the kill should land mid-run, checkpoints: {done}"
    cli(*RUN, "resume=auto", output_dir=killed)
    assert len(curve(straight)) == 6
    assert curve(killed) == curve(straight)


def test_an_interrupted_checkpoint_write_falls_back_to_the_previous_checkpoint(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    cli(*RUN, output_dir=straight)
    cli(*RUN[:-3], "train.max_steps=4", "checkpoint.every=2", "checkpoint.export_hf=false", output_dir=crashed)
    ckpts = crashed / "checkpoints"
    # What a kill during the step-4 write leaves: the staging copy half written, step 4 never committed.
    shutil.copytree(ckpts / "step_00000004", ckpts / ".staging-step_00000006")
    (ckpts / ".staging-step_00000006" / "trainer_state.json").unlink()
    shutil.rmtree(ckpts / "step_00000004")
    for f in (ckpts / ".staging-step_00000006" / "engine").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    cli(*RUN, "resume=auto", output_dir=crashed)
    assert curve(crashed) == curve(straight)
    assert not (ckpts / ".staging-step_00000006").exists()
