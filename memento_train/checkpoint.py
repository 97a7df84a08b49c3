"""Resumable checkpoint directories: atomic commits, keep-last-K, ``resume=auto``.

Layout under ``root`` (normally ``<output_dir>/checkpoints``)::

    step_00000050/            a complete checkpoint
        engine/               model + optimizer, written by the engine (sharded)
        rng/rank_00000.pt     per-rank RNG states
        trainer_state.json    step, data position, ... -- written last: its presence marks completeness
    .staging-step_00000100/   a checkpoint being written (ignored, removed on the next start)

Workers write into the staging directory; the driver then writes ``trainer_state.json``, fsyncs and
renames the directory into place. A crash at any moment leaves either the new complete checkpoint or
only a staging directory, so the previous checkpoint stays loadable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_STAGING_PREFIX = ".staging-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Finds, stages, commits and prunes checkpoints under ``root``."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> tuple[int, Path] | None:
        done = self.complete()
        return done[-1] if done else None

    def clean_staging(self) -> list[Path]:
        """Remove leftovers of interrupted writes; returns what was removed."""
        removed = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(_STAGING_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    def stage(self, step: int) -> Path:
        """A fresh, empty staging directory for the checkpoint of ``step``."""
        path = self.root / f"{_STAGING_PREFIX}step_{step:08d}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit(self, step: int, staging: Path, state: dict[str, Any]) -> Path:
        """Write ``state`` as the completeness marker, move ``staging`` into place, prune old ones."""
        state_path = staging / STATE_FILE
        with open(state_path, "w") as f:
            json.dump({**state, "step": step}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(staging)
        final = self.root / f"step_{step:08d}"
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace atomically enough
            trash = self.root / f"{_STAGING_PREFIX}old-{final.name}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(staging, final)
        _fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints."""
        for _, path in self.complete()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: ``auto`` = latest (or none), ``never`` = none, or a path."""
        if resume == "never":
            return None
        if resume == "auto":
            latest = self.latest()
            return latest[1] if latest else None
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"resume={resume!r} is not a complete checkpoint (no {STATE_FILE}); "
                             f"use resume=auto or one of {[str(p) for _, p in self.complete()]}")
        return path


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of a complete checkpoint."""
    return json.loads((Path(path) / STATE_FILE).read_text())
