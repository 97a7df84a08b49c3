"""Checkpoint directories: atomic commit, interrupted writes ignored, keep-last-K, resume resolution."""

from __future__ import annotations

import pytest

from memento_train.checkpoint import STATE_FILE, CheckpointManager, read_state


def write(mgr: CheckpointManager, step: int) -> None:
    staging = mgr.stage(step)
    (staging / "engine").mkdir()
    (staging / "engine" / "weights.bin").write_bytes(b"x" * step)
    mgr.commit(step, staging, {"epoch": 0})


def test_commit_makes_a_complete_checkpoint_and_prunes_to_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        write(mgr, step)
    assert [s for s, _ in mgr.complete()] == [4, 6]
    assert read_state(mgr.latest()[1]) == {"epoch": 0, "step": 6}


def test_interrupted_write_leaves_the_previous_checkpoint_as_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    write(mgr, 2)
    staging = mgr.stage(4)  # a crash here: engine files half written, no trainer_state.json
    (staging / "engine").mkdir()
    (staging / "engine" / "weights.bin").write_bytes(b"partial")
    assert mgr.latest()[0] == 2 and mgr.resolve("auto") == tmp_path / "step_00000002"
    assert mgr.clean_staging() == [staging] and not staging.exists()


def test_a_step_directory_without_its_state_file_is_not_complete(tmp_path):
    mgr = CheckpointManager(tmp_path)
    write(mgr, 2)
    (tmp_path / "step_00000004").mkdir()
    assert mgr.latest()[0] == 2


def test_resaving_a_step_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    write(mgr, 2)
    write(mgr, 2)
    assert [s for s, _ in mgr.complete()] == [2]


def test_resolve_modes(tmp_path):
    mgr = CheckpointManager(tmp_path)
    assert mgr.resolve("auto") is None and mgr.resolve("never") is None
    write(mgr, 3)
    assert mgr.resolve("never") is None
    assert mgr.resolve(str(tmp_path / "step_00000003")) == tmp_path / "step_00000003"
    with pytest.raises(ValueError, match=f"not a complete checkpoint \\(no {STATE_FILE}\\)"):
        mgr.resolve(str(tmp_path))
