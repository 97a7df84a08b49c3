"""Train-vs-rollout log-prob mismatch, and importance weights that correct for it.

The rollout engine (vLLM, other kernels, other precision) and the trainer compute slightly different
log-probs for the same tokens under the same weights. With ``Δ[t] = logp_train[t] - logp_rollout[t]``
over the loss tokens we log

- ``mismatch/abs``: mean ``|Δ|``; ``mismatch/abs/max``: max ``|Δ|``;
- ``mismatch/k3``: mean ``ρ - 1 - log ρ`` with ``ρ = π_train / π_rollout`` (≈ KL(rollout ‖ train)).

Truncated importance sampling (TIS, Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training") weights each token's policy-gradient term by ``w = π_train / π_rollout``
(detached), truncated to ``min(w, cap)``; the masked variant (MIS) drops tokens with ``w > cap``.

Metrics follow the :func:`memento_train.rl.losses.reduce_metrics` convention (``/sum`` per loss
token, ``/max``, and ``tokens``) so they can be summed over micro-batches and ranks.
"""

from __future__ import annotations

import torch

# exp(20) ≈ 5e8: far beyond any cap, finite in fp32.
MAX_LOG_WEIGHT = 20.0


def _masked_delta(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    delta = trainer_logprobs.detach().float() - rollout_logprobs.detach().float().to(trainer_logprobs.device)
    # positions outside the mask may hold anything (e.g. 0 or -inf from padding): never let them in.
    return torch.where(mask, delta, torch.zeros_like(delta))


def logprob_mismatch(
    trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums / maxima of ``|Δ|`` and of the k3 estimate over the masked tokens (module docstring)."""
    mask = mask.bool()
    delta = _masked_delta(trainer_logprobs, rollout_logprobs, mask)
    abs_delta = delta.abs()
    k3 = torch.expm1(delta.clamp(-MAX_LOG_WEIGHT, MAX_LOG_WEIGHT)) - delta
    has_tokens = bool(mask.any())
    return {
        "tokens": mask.sum().float(),
        "mismatch/abs/sum": abs_delta.sum(),
        "mismatch/abs/max": abs_delta.max() if has_tokens else torch.zeros(()),
        "mismatch/k3/sum": torch.where(mask, k3, torch.zeros_like(k3)).sum(),
    }


def importance_weights(
    trainer_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    mode: str = "truncate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached per-token weights ``w = exp(logp_train - logp_rollout)`` corrected at ``cap``.

    ``truncate``: ``min(w, cap)`` (TIS); ``mask``: ``w`` if ``w <= cap`` else 0 (MIS). Returns
    ``(weights, capped)`` where ``capped`` marks masked tokens whose weight was cut; weights are 1
    outside ``mask``.
    """
    if mode not in ("truncate", "mask"):
        raise ValueError(f"tis_mode must be 'truncate' or 'mask', got {mode!r}")
    if not cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    mask = mask.bool()
    w = torch.exp(_masked_delta(trainer_logprobs, rollout_logprobs, mask).clamp(max=MAX_LOG_WEIGHT))
    capped = mask & (w > cap)
    if mode == "truncate":
        w = w.clamp(max=cap)
    else:
        w = torch.where(capped, torch.zeros_like(w), w)
    return w, capped


__all__ = ["importance_weights", "logprob_mismatch"]
