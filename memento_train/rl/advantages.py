"""Sequence-level advantages from rewards of grouped rollouts (several samples per prompt).

With ``R`` a rollout's reward, ``mean_g`` / ``std_g`` its group's mean and (Bessel-corrected) std:

- ``group`` (GRPO): ``A = (R - mean_g) / (std_g + eps)``
- ``drgrpo`` (Dr.GRPO): ``A = R - mean_g`` — no std, so easy/hard prompts are not up-weighted
- ``batch``: ``A = (R - mean_g) / (std_batch + eps)`` with ``std_batch`` the std of all the
  group-centred rewards of the batch (group baseline, batch-level scale; e.g. REINFORCE++-baseline)

A group whose rewards are all equal carries no learning signal; its advantages are exactly 0 (never
NaN, never float noise), whatever the mode. A group of one sample is such a group.

Groups are given by ``group_ids`` (any integers, one per rollout, equal within a group), so groups may
have different sizes (e.g. after filtering failed rollouts).
"""

from __future__ import annotations

from typing import get_args

import torch

from memento_train.rl.algorithm import AdvNorm

ADV_MODES = get_args(AdvNorm)  # the algorithm.adv_norm choices


def group_ids_for(num_groups: int, group_size: int) -> torch.Tensor:
    """``[0]*group_size + [1]*group_size + ...``: ids for rollouts laid out group after group."""
    return torch.arange(num_groups).repeat_interleave(group_size)


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if inverse.numel() else 0


def _centred(rewards: torch.Tensor, inverse: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R - mean_g, counts_g)``, with exact zeros in all-equal groups."""
    counts = torch.bincount(inverse, minlength=num_groups).to(rewards.dtype)
    means = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, inverse, rewards) / counts
    gmax = torch.full((num_groups,), -torch.inf, dtype=rewards.dtype).scatter_reduce_(0, inverse, rewards, "amax")
    gmin = torch.full((num_groups,), torch.inf, dtype=rewards.dtype).scatter_reduce_(0, inverse, rewards, "amin")
    # mean of n equal floats need not equal them bit-for-bit; pin degenerate groups to 0 exactly.
    constant = (gmax == gmin)[inverse]
    return torch.where(constant, torch.zeros_like(rewards), rewards - means[inverse]), counts


def _group_std(centred: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std per group, 0 for groups of one."""
    sq = torch.zeros_like(counts).index_add_(0, inverse, centred * centred)
    return torch.sqrt(sq / (counts - 1).clamp(min=1))


def compute_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, mode: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """Advantages ``[N]`` (float32) for rewards ``[N]`` of rollouts in groups ``group_ids`` ``[N]``.

    See the module docstring for the three modes. Computed in float64.
    """
    if mode not in ADV_MODES:
        raise ValueError(f"adv_norm must be one of {ADV_MODES}, got {mode!r}")
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"expected rewards [N] and group_ids [N], got {tuple(rewards.shape)}, {tuple(group_ids.shape)}"
        )
    if rewards.numel() == 0:
        return torch.zeros(0)
    r = rewards.detach().to(torch.float64).cpu()
    inverse, num_groups = _group_index(group_ids.cpu())
    centred, counts = _centred(r, inverse, num_groups)
    if mode == "drgrpo":
        adv = centred
    elif mode == "group":
        adv = centred / (_group_std(centred, inverse, counts)[inverse] + eps)
    else:
        batch_std = centred.std(correction=1) if centred.numel() > 1 else torch.zeros((), dtype=r.dtype)
        adv = centred / (batch_std + eps)
    return adv.to(torch.float32)


def group_reward_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> dict[str, float]:
    """Logging: mean / std of rewards and the fraction of groups with no signal (all rewards equal)."""
    r = rewards.detach().to(torch.float64).cpu()
    if r.numel() == 0:
        return {"reward/mean": 0.0, "reward/std": 0.0, "groups/all_equal_frac": 0.0}
    inverse, num_groups = _group_index(group_ids.cpu())
    centred, _ = _centred(r, inverse, num_groups)
    signal = torch.zeros(num_groups, dtype=r.dtype).index_add_(0, inverse, (centred != 0).to(r.dtype)) > 0
    return {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std(correction=0)),
        "groups/all_equal_frac": float((~signal).double().mean()),
    }


def broadcast_to_tokens(seq_values: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Per-token copy ``seq_values[seq_ids]`` ``[T]``; tokens with ``seq_id < 0`` (padding) get 0."""
    valid = seq_ids >= 0
    out = seq_values[seq_ids.clamp(min=0)]
    return torch.where(valid, out, torch.zeros_like(out))


__all__ = ["ADV_MODES", "broadcast_to_tokens", "compute_advantages", "group_ids_for", "group_reward_stats"]
