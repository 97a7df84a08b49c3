"""Optimizer options and the learning-rate schedule, shared by every engine and by SFT and RL.

The schedule is a pure function of the step (:func:`lr_at`): engines set the learning rate on their
param groups before each optimizer step, so resuming needs only the step counter, never a scheduler
state, and every engine follows the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from memento_train.config.errors import ConfigError
from memento_train.config.tree import check_types


@dataclass
class OptimConfig:
    """AdamW and its schedule. Defaults are the Memento paper's SFT settings.

    Attributes:
        lr: peak learning rate.
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay on matrices (never on biases, norms or embeddings).
        grad_clip: max global L2 norm of the gradient; 0 disables clipping.
        schedule: ``cosine`` / ``linear`` decay after warm-up, or ``constant``.
        warmup_ratio: fraction of the total steps spent warming up linearly from 0.
        warmup_steps: absolute warm-up steps; overrides ``warmup_ratio`` when > 0.
        min_lr_ratio: the decay ends at ``lr * min_lr_ratio``.
    """

    lr: float = 8e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.05
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def validate(self, prefix: str = "optim") -> OptimConfig:
        """Raise :class:`ConfigError` naming the first bad option; returns self."""
        check_types(self, prefix)
        if not (self.lr > 0):
            raise ConfigError(f"{prefix}.lr must be > 0, got {self.lr!r}")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"{prefix}.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        if not (self.eps > 0):
            raise ConfigError(f"{prefix}.eps must be > 0, got {self.eps!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip < 0:
            raise ConfigError(f"{prefix}.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise ConfigError(f"{prefix}.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise ConfigError(f"{prefix}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        return self

    def num_warmup_steps(self, total_steps: int) -> int:
        """Warm-up length for a run of ``total_steps`` optimizer steps."""
        if self.warmup_steps > 0:
            return min(self.warmup_steps, total_steps)
        return int(math.ceil(self.warmup_ratio * total_steps))


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up to ``cfg.lr`` over the first steps (step 0 gets ``lr / warmup``, not 0, so the first
    update is never wasted), then cosine/linear decay to ``lr * min_lr_ratio`` at the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = cfg.num_warmup_steps(total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW param groups: decay on weight matrices, none on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
