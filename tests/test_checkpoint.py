"""Checkpoint directories: atomic commit, interrupted writes ignored, keep-last-K, resume resolution,
manifests and the fallback from a corrupt newest checkpoint to the newest one that verifies."""

from __future__ import annotations

import pytest

from memento_train.checkpoint import manager as C
from memento_train.checkpoint.manager import (
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    read_state,
    verify_checkpoint,
)


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
    with pytest.raises(CheckpointError, match=f"not a complete checkpoint \\(no {STATE_FILE}\\)"):
        mgr.resolve(str(tmp_path))


def _three_checkpoints(tmp_path, keep_last=3):
    mgr = CheckpointManager(tmp_path, keep_last=keep_last)
    for step in (2, 4, 6):
        staging = mgr.stage(step)
        (staging / "engine").mkdir()
        (staging / "engine" / "shard_0.bin").write_bytes(bytes(range(256)) * (step + 1))
        (staging / "rng").mkdir()
        (staging / "rng" / "rank_00001.pt").write_bytes(b"rng" * step)
        mgr.commit(step, staging, {})
    return mgr


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _zero_fill(path):
    path.write_bytes(bytes(path.stat().st_size))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_truncate, "engine/shard_0.bin is 1782 bytes, expected 1792 (truncated"),
        (lambda p: p.unlink(), "engine/shard_0.bin is missing"),
        (_zero_fill, "engine/shard_0.bin does not match its checksum"),
    ],
)
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_moves_it_aside(tmp_path, damage, problem):
    mgr = _three_checkpoints(tmp_path)
    assert all(verify_checkpoint(p) == [] for _, p in mgr.complete())
    damage(tmp_path / "step_00000006" / "engine" / "shard_0.bin")
    warned = []
    assert mgr.resolve("auto", warn=warned.append) == tmp_path / "step_00000004"
    assert len(warned) == 1 and problem in warned[0] and "step_00000004" in warned[0]
    assert (tmp_path / "step_00000006.invalid").is_dir() and [s for s, _ in mgr.complete()] == [2, 4]
    with pytest.raises(CheckpointError, match="does not verify"):  # an explicit path is not replaced
        mgr.resolve(str(tmp_path / "step_00000006.invalid"))


def test_a_missing_rank_file_fails_verification(tmp_path):
    mgr = _three_checkpoints(tmp_path)
    (tmp_path / "step_00000006" / "rng" / "rank_00001.pt").unlink()
    assert verify_checkpoint(tmp_path / "step_00000006") == ["rng/rank_00001.pt is missing"]
    assert mgr.resolve("auto", warn=lambda m: None) == tmp_path / "step_00000004"


def test_when_no_checkpoint_verifies_resume_fails_naming_each_and_moves_nothing(tmp_path):
    mgr = _three_checkpoints(tmp_path)
    for step in (2, 4, 6):
        _truncate(tmp_path / f"step_{step:08d}" / "engine" / "shard_0.bin")
    (tmp_path / "step_00000004" / "manifest.json").write_text("{broken")
    with pytest.raises(CheckpointError) as err:
        mgr.resolve("auto")
    msg = str(err.value)
    assert "step_00000006: engine/shard_0.bin is" in msg and "step_00000002: engine/shard_0.bin is" in msg
    assert "step_00000004: manifest.json is unreadable" in msg and "resume=never" in msg
    assert [s for s, _ in mgr.complete()] == [2, 4, 6]


def test_large_files_are_checked_by_size_and_sampled_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(C, "_WINDOW_BYTES", 100)
    mgr = CheckpointManager(tmp_path)
    staging = mgr.stage(1)
    big = staging / "big.bin"
    big.write_bytes(bytes(range(256)) * 40)
    path = mgr.commit(1, staging, {})
    manifest = __import__("json").loads((path / "manifest.json").read_text())
    assert manifest["files"]["big.bin"]["whole"] is False and manifest["files"][STATE_FILE]["whole"] is True
    data = bytearray((path / "big.bin").read_bytes())
    data[:100] = bytes(100)  # the first window zeroed
    (path / "big.bin").write_bytes(bytes(data))
    assert verify_checkpoint(path) == ["big.bin does not match its checksum (corrupted)"]


def test_a_checkpoint_without_manifest_from_an_older_version_still_resumes(tmp_path):
    mgr = _three_checkpoints(tmp_path)
    (tmp_path / "step_00000006" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="cannot be verified"):
        assert mgr.resolve("auto") == tmp_path / "step_00000006"
