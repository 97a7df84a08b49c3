"""One rank's share of a resumable checkpoint: its engine shard and its RNG streams.

Used by every trainer worker (SFT and RL) so that their checkpoints have one layout:
``<checkpoint>/engine/`` (the engine's own sharded format) and ``<checkpoint>/rng/rank_NNNNN.pt``.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(engine: Any, path: str, rank: int) -> None:
    """Collective (the engine part): write this rank's engine shard and RNG under ``path``."""
    engine.save(os.path.join(path, "engine"))
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(path, "rng", f"rank_{rank:05d}.pt"))


def load_rank_state(engine: Any, path: str, rank: int) -> None:
    """Collective: restore engine state and, when saved for this rank, its RNG."""
    engine.load(os.path.join(path, "engine"))
    rng_file = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    if os.path.isfile(rng_file):  # absent when resuming with more ranks than were saved
        set_rng_state(torch.load(rng_file, weights_only=False))
