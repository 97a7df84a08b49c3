"""A training run's output directory, opened and closed the same way by the SFT and RL drivers.

``<output_dir>/config.yaml`` holds the resolved config with secrets redacted, ``checkpoints/`` the
resumable checkpoints (:mod:`memento_train.checkpoint.manager`; ``resume=auto`` picks the newest that
verifies), ``metrics.jsonl`` and wandb's files the metrics (:class:`~memento_train.training.tracking.RunLogger`)
and ``hf/`` the final Hugging Face export. The drivers' configs share the fields read here:
``output_dir``, ``resume``, ``logger``, ``wandb`` and ``checkpoint.keep_last``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from memento_train.checkpoint.manager import CheckpointManager, CheckpointSaveError, read_state
from memento_train.config.tree import to_dict
from memento_train.faults.secrets import redact_config, secret_values
from memento_train.training.tracking import RunLogger

CHECKPOINT_DIR = "checkpoints"
HF_DIR = "hf"


def write_run_config(cfg: Any) -> dict[str, Any]:
    """Create ``cfg.output_dir`` and write its ``config.yaml``; returns that public (redacted) config,
    the only form of it that files, logs and wandb may show."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = redact_config(to_dict(cfg))
    (out / "config.yaml").write_text(yaml.safe_dump(public, sort_keys=False))
    return public


def resume_point(cfg: Any, warn: Callable[[str], None] | None = None) -> tuple[CheckpointManager, Path | None, int]:
    """The run's checkpoints (leftovers of interrupted writes removed), the checkpoint ``cfg.resume``
    resumes from (``None``: a fresh start) and the step it starts at. ``warn`` reports checkpoints that
    ``resume=auto`` had to skip (:meth:`~memento_train.checkpoint.manager.CheckpointManager.resolve`)."""
    ckpts = CheckpointManager(Path(cfg.output_dir) / CHECKPOINT_DIR, keep_last=cfg.checkpoint.keep_last)
    ckpts.clean_staging()
    resume_from = ckpts.resolve(cfg.resume, warn=warn)
    return ckpts, resume_from, read_state(resume_from)["step"] if resume_from else 0


def open_logger(
    cfg: Any, public: dict[str, Any], *, total_steps: int, start_step: int, desc: str, progress: bool
) -> RunLogger:
    """The run's metrics logger (JSONL, wandb when ``cfg.logger=wandb``, progress bar), cut back to
    ``start_step`` on resume; every secret value of ``cfg`` is scrubbed from what it writes."""
    return RunLogger(
        cfg.output_dir,
        total_steps=total_steps,
        start_step=start_step,
        logger=cfg.logger,
        wandb_cfg=cfg.wandb,
        config=public,
        desc=desc,
        progress=progress,
        secrets=secret_values(to_dict(cfg)),
    )


def save_checkpoint(group: Any, ckpts: CheckpointManager, step: int, state: dict[str, Any]) -> Path:
    """Every rank of ``group`` writes its share (its ``save(dir)``) into a staging directory that is
    committed as the checkpoint of ``step`` with ``state``; a storage failure removes the partial
    checkpoint and raises :class:`~memento_train.checkpoint.manager.CheckpointSaveError`."""
    return ckpts.save(step, state, lambda staging: group.run("save", str(staging)))


def save_or_skip(
    group: Any,
    ckpts: CheckpointManager,
    step: int,
    state: dict[str, Any],
    *,
    on_save_error: str,
    final: bool,
    logger: RunLogger,
    prog: str,
    barrier_timeout_s: float = 60.0,
) -> bool:
    """:func:`save_checkpoint` under ``checkpoint.on_save_error``: with ``retry`` a storage failure of a
    periodic checkpoint is logged and skipped (returns False); a ``final`` one (the last, or one for a
    preemption signal) and every failure under ``fail`` raise."""
    try:
        save_checkpoint(group, ckpts, step, state)
    except CheckpointSaveError as exc:
        if final or on_save_error != "retry":
            raise
        logger.write(f"[{prog}] warning: {exc}; continuing (checkpoint.on_save_error=retry)")
        # Every rank must be out of the failed save before the next step's collectives.
        group.get(group.run_async("_mt_node_info"), timeout=barrier_timeout_s)
        return False
    return True


def export_hf(group: Any, out: str | Path, info: dict[str, Any], logger: RunLogger, prog: str) -> str:
    """Have ``group`` (its ``export_hf(dir, info)``) write the Hugging Face model to ``<out>/hf``, with
    ``info`` in its marker file; returns the directory."""
    hf_dir = str(Path(out) / HF_DIR)
    group.run("export_hf", hf_dir, info)
    logger.write(f"[{prog}] exported Hugging Face model to {hf_dir}")
    return hf_dir
