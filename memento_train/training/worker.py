"""The part every trainer worker (SFT, RL) shares: a worker that owns a :class:`TrainEngine`.

It writes and restores this rank's share of a checkpoint and exports the Hugging Face model, so both
loops produce one checkpoint layout and one export format.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from memento_train.checkpoint.rank_state import load_rank_state, save_rank_state
from memento_train.cluster import DistributedWorker
from memento_train.export.writer import export_hf


@contextlib.contextmanager
def _as_exception(what: str, path: str):
    """torch.distributed.checkpoint raises ``CheckpointException``, a ``BaseException``: it would slip
    past every ``except Exception`` (and kill a Ray actor as if it had exited). Make it an error."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except Exception:
        raise
    except BaseException as exc:
        raise RuntimeError(f"checkpoint {what} at {path} failed: {type(exc).__name__}: {exc}") from exc


class EngineWorker(DistributedWorker):
    """Base of trainer workers. Subclasses set ``self.engine``, ``self.tokenizer``,
    ``self.model_config`` and ``self.cfg`` (with ``cfg.engine.precision``) in their setup."""

    def save(self, path: str) -> None:
        """Write this rank's share of a checkpoint into the staging directory ``path``."""
        with _as_exception("save", path):
            save_rank_state(self.engine, path, self.rank)

    def load(self, path: str) -> None:
        """Restore engine state and this rank's RNG from checkpoint ``path``."""
        with _as_exception("load", path):
            load_rank_state(self.engine, path, self.rank)

    def export_hf(self, out_dir: str, info: dict[str, Any]) -> str | None:
        """Collective: gather full weights; rank 0 writes the HF model directory."""
        state = self.engine.full_state_dict()
        if self.rank != 0:
            return None
        return export_hf(
            state,
            self.model_config,
            self.tokenizer,
            out_dir,
            info=info,
            dtype=torch.float32 if self.cfg.engine.precision == "fp32" else torch.bfloat16,
        )
