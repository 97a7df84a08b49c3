"""Resumable checkpoint directories: atomic commits, integrity manifests, keep-last-K, ``resume=auto``.

Layout under ``root`` (normally ``<output_dir>/checkpoints``)::

    step_00000050/            a complete checkpoint
        engine/               model + optimizer, written by the engine (sharded)
        rng/rank_00000.pt     per-rank RNG states
        trainer_state.json    step, data position, ... -- its presence marks completeness
        manifest.json         every file's size and checksum -- written last
    step_00000040.invalid/    a checkpoint that failed verification, moved aside (kept for inspection)
    .staging-step_00000100/   a checkpoint being written (ignored, removed on the next start)

Workers write into the staging directory; the driver then writes ``trainer_state.json`` and the
manifest, fsyncs and renames the directory into place. A crash at any moment leaves either the new
complete checkpoint or only a staging directory, so the previous checkpoint stays loadable.

Files that are complete on disk can still be wrong later (a shard truncated by a full or flaky
filesystem, a rank's file deleted, blocks zeroed by a storage fault): ``resume=auto`` verifies the
newest checkpoint against its manifest and falls back to the newest one that verifies. Files up to
:data:`FULL_HASH_BYTES` are hashed whole; larger shards (gigabytes each on real models) by their size
plus windows at the start, middle and end, which catches truncation, missing files and zero-filled
or rewritten regions at those places without re-reading every byte at each save.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
INVALID_SUFFIX = ".invalid"
FULL_HASH_BYTES = 4 << 20  # files up to this size are hashed whole
_WINDOW_BYTES = 1 << 20  # larger files: sha256 of the size and three windows of this size
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_STAGING_PREFIX = ".staging-"
# ``resume`` values besides a checkpoint directory (see :meth:`CheckpointManager.resolve`).
RESUME_MODES = ("auto", "never")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (incomplete, corrupt, none valid); the message says what is wrong."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed on storage (disk full, quota, permission, read-only, I/O error).

    The partial checkpoint is removed and earlier checkpoints are untouched. ``path`` is the directory
    that could not be written, ``free_bytes`` the space left on its filesystem (None if unknown).
    """

    def __init__(
        self, step: int, path: Path, cause: str, free_bytes: int | None, total_bytes: int | None, previous: Path | None
    ) -> None:
        self.step, self.path, self.cause, self.free_bytes, self.previous = step, path, cause, free_bytes, previous
        space = (
            f"{_bytes(free_bytes)} free of {_bytes(total_bytes)} on its filesystem when it failed"
            if free_bytes is not None
            else "free space unknown"
        )
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        super().__init__(
            f"could not write checkpoint {path} ({space}): {cause}. The partial checkpoint was removed "
            f"and {kept}. Free space on that filesystem (or lower checkpoint.keep_last), or set "
            f"checkpoint.on_save_error=retry to keep training and try again at the next checkpoint"
        )


# What a storage failure looks like, also when it comes back as text from a worker process.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
_STORAGE_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|Permission denied|Read-only file system|"
    r"Input/output error|\[Errno (?:" + "|".join(str(e) for e in sorted(_STORAGE_ERRNOS)) + r")\]"
)


def storage_failure(exc: BaseException, free_bytes: int | None = None, needed_bytes: int = 1 << 20) -> str | None:
    """The storage error behind ``exc`` as one line, or ``None`` when ``exc`` is not a storage failure.

    Found from an ``OSError`` in its cause chain or a worker's traceback text naming one, else from
    the filesystem itself: some writers lose the errno (``torch.save`` reports a full disk as
    "unexpected pos ..."), so a write that failed while less than ``needed_bytes`` were free (the size
    of the last checkpoint) is taken for a full disk too."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return f"{type(e).__name__}: {e}"
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    m = _STORAGE_TEXT.search(str(exc))
    if m:
        line = next(ln for ln in str(exc).splitlines() if m.group(0) in ln)
        return line.strip()
    if free_bytes is not None and free_bytes < needed_bytes:
        last = next((ln.strip() for ln in reversed(str(exc).splitlines()) if ln.strip()), type(exc).__name__)
        return (
            f"the filesystem is full ({_bytes(free_bytes)} free while writing; the last checkpoint took "
            f"{_bytes(needed_bytes)}): {last}"
        )
    return None


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n}"


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _disk_usage(path: Path) -> tuple[int | None, int | None]:
    for p in (path, *path.parents):
        if p.exists():
            try:
                usage = shutil.disk_usage(p)
                return usage.free, usage.total
            except OSError:
                return None, None
    return None, None


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
        """Write ``state`` as the completeness marker and the manifest, move ``staging`` into place,
        prune old ones."""
        _write_json(staging / STATE_FILE, {**state, "step": step})
        _write_json(staging / MANIFEST_FILE, build_manifest(staging, step))
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

    def save(self, step: int, state: dict[str, Any], write: Callable[[Path], Any]) -> Path:
        """Stage, let ``write(staging_dir)`` fill it (e.g. every rank's share), commit; return the path.

        When storage fails (``write`` or the commit: disk full, quota, permission, read-only, I/O
        error), the staging directory is removed, earlier checkpoints are left as they were, and
        :class:`CheckpointSaveError` says which directory, how much space is left and why. Other
        errors (a worker that died) propagate unchanged, after the same clean-up.
        """
        staging = None
        try:
            staging = self.stage(step)
            write(staging)
            return self.commit(step, staging, state)
        except BaseException as exc:  # torch DCP's CheckpointException is a BaseException
            free, total = _disk_usage(self.root)  # at the failure, before the clean-up frees space again
            latest = self.latest()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if not isinstance(exc, Exception) and isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            needed = max(1 << 20, _tree_bytes(latest[1]) if latest else 0)
            cause = storage_failure(exc, free, needed)
            if cause is None:
                raise
            raise CheckpointSaveError(
                step, self.root / f"step_{step:08d}", cause, free, total, latest[1] if latest else None
            ) from exc

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints."""
        for _, path in self.complete()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def resolve(self, resume: str, warn: Callable[[str], None] | None = None) -> Path | None:
        """The checkpoint to resume from: ``never`` = none; a path = that checkpoint, verified;
        ``auto`` = the newest checkpoint that verifies (none when there is none at all).

        With ``auto``, each newer checkpoint that fails verification is reported through ``warn``
        (default: :func:`warnings.warn`) and moved aside to ``step_N.invalid``, so that neither pruning
        nor a later resume takes it for a good one. Raises :class:`CheckpointError` naming every
        checkpoint and its problems when none verifies (nothing is moved then), or when the explicit
        path does not verify.
        """
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / STATE_FILE).is_file():
                raise CheckpointError(
                    f"resume={resume!r} is not a complete checkpoint (no {STATE_FILE}); "
                    f"use resume=auto or one of {[str(p) for _, p in self.complete()]}"
                )
            problems = verify_checkpoint(path)
            if problems:
                raise CheckpointError(f"resume={resume!r} does not verify: {'; '.join(problems)}")
            return path
        warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
        rejected: list[tuple[Path, list[str]]] = []
        for _, path in reversed(self.complete()):
            problems = verify_checkpoint(path)
            if not problems:
                for bad, why in rejected:
                    aside = bad.with_name(bad.name + INVALID_SUFFIX)
                    shutil.rmtree(aside, ignore_errors=True)
                    os.rename(bad, aside)
                    warn(
                        f"checkpoint {bad} is incomplete or corrupt ({'; '.join(why)}); moved it to "
                        f"{aside.name} and resuming from {path.name} instead"
                    )
                return path
            rejected.append((path, problems))
        if rejected:
            detail = "\n".join(f"  {p.name}: {'; '.join(why)}" for p, why in rejected)
            raise CheckpointError(
                f"resume=auto: no checkpoint under {self.root} verifies:\n{detail}\n"
                f"Restore the files, remove the broken checkpoints to start over, or set "
                f"resume=never"
            )
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _digest(path: Path, size: int) -> str:
    """sha256 of the whole file when small, else of its size and three windows (start, middle, end)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            for offset in (0, (size - _WINDOW_BYTES) // 2, size - _WINDOW_BYTES):
                f.seek(offset)
                h.update(f.read(_WINDOW_BYTES))
    return h.hexdigest()


def build_manifest(path: str | os.PathLike, step: int) -> dict[str, Any]:
    """Size and checksum of every file under checkpoint directory ``path`` (the manifest excepted)."""
    root = Path(path)
    files = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel == MANIFEST_FILE:
            continue
        size = f.stat().st_size
        files[rel] = {"size": size, "sha256": _digest(f, size), "whole": size <= FULL_HASH_BYTES}
    return {"format": 1, "step": step, "files": files}


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with checkpoint ``path`` against its manifest (empty when it verifies).

    A checkpoint written before manifests existed has none: it verifies with a warning.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        warnings.warn(
            f"checkpoint {root} has no {MANIFEST_FILE} (written by an older version): its files cannot be verified",
            stacklevel=2,
        )
        return []
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST_FILE} is unreadable ({type(exc).__name__}: {exc})"]
    problems = []
    for rel, want in files.items():
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = f.stat().st_size
        if size != want["size"]:
            problems.append(f"{rel} is {size} bytes, expected {want['size']} (truncated or rewritten)")
        elif _digest(f, size) != want["sha256"]:
            problems.append(f"{rel} does not match its checksum (corrupted)")
    return problems


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of a complete checkpoint."""
    return json.loads((Path(path) / STATE_FILE).read_text())
