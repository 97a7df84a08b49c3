"""Policy losses (CISPO, PPO-clip), KL to the reference, entropy, and the engine ``loss_fn``.

Per token ``t`` of a response, with ``r = π_θ / π_old = exp(logp - old_logp)`` and advantage ``A``:

- CISPO: ``ℓ = -sg(clip(r, 1 - ε_low, 1 + ε_high)) · A · logp``. The clipped ratio is a detached
  weight, so every token keeps the gradient ``-w · A · ∇logp`` — clipping bounds its size instead of
  zeroing it (MiniMax-M1; the Memento paper's default).
- PPO-clip ("ppo_clip"; "grpo" is its old name): ``ℓ = -min(r · A, clip(r, 1 - ε_low, 1 + ε_high) · A)``.
  Where the clipped branch is the minimum (``A > 0, r > 1 + ε_high`` or ``A < 0, r < 1 - ε_low``) the token
  has no gradient.
- KL penalty ``β · k(logp, ref_logp)``, with ``ρ = π_ref / π_θ``: ``k1 = -log ρ``,
  ``k2 = ½ (log ρ)²``, ``k3 = ρ - 1 - log ρ`` (≥ 0, clamped to ≤ 10 as verl does: a log-ratio of 20
  would otherwise give ~5e8), and ``k3+``: the value of k3, the gradient of k2 (straight-through;
  k3's expected value is the KL but its expected gradient is not, k2's is).
- entropy bonus ``- c_H · H``.

The total ``ℓ_t = w_tis · ℓ_pg + β · k + (-c_H · H)`` is aggregated as
``loss = Σ_t mask_t · a_t · ℓ_t / Z`` — the engines' contract: each micro-batch returns its token sum
over a normaliser ``Z`` of the *whole mini-batch* (all ranks, all micro-batches), so gradients add up
over micro-batches and ranks. :func:`aggregation_weights` gives the per-sequence ``a_i`` (sent as the
``loss_weights`` extra) and ``Z`` for each ``algorithm.loss_agg``:

- ``token_mean``: ``a = 1``, ``Z`` = loss tokens of the mini-batch;
- ``seq_total`` (Dr.GRPO): ``a = 1``, ``Z`` = sequences × ``rollout.max_new_tokens`` (a constant);
- ``seq_mean`` (GRPO, verl's ``seq-mean-token-mean``): ``a_i = 1 / |o_i|``, ``Z`` = sequences;
- ``group_total`` (MiniMax-M1 CISPO, the Memento paper): ``a_i = 1 / Σ_{j ∈ group(i)} |o_j|``,
  ``Z`` = groups: each group's token sum over its own total response tokens, averaged over groups.

``|o_i|`` counts the tokens that remain in the loss (see ``loss_mask``), and sequences / groups with
none left do not count in ``Z``.

Metrics use one convention so the loop can sum them over micro-batches and ranks
(:func:`reduce_metrics`): ``name/sum`` is a sum over loss tokens (reported as ``name``, a per-token
mean), ``name/max`` / ``name/min`` are extrema (reported under the same key), ``name/total`` is summed
as is (reported as ``name``), ``tokens`` counts loss tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from memento_train.rl.algorithm import LOSS_AGGS, AlgorithmConfig
from memento_train.rl.logprobs import IGNORE_INDEX, token_logprobs_and_entropy
from memento_train.rl.mismatch import importance_weights, logprob_mismatch

# log-ratios are clamped before exp: a stale or garbage old log-prob must not produce inf (and 0·inf
# = NaN gradients in PPO's unselected branch). exp(20) ≈ 5e8 is far outside any clip range.
MAX_LOG_RATIO = 20.0


def _masked(values: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return torch.where(mask, values, torch.full_like(values, fill))


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``clamp(logp - old_logp, ±20)`` on masked tokens, 0 elsewhere (so ``r = 1`` there)."""
    return _masked(logp - old_logp.to(logp), mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def cispo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CISPO ``ℓ = -sg(clip(r, 1-ε_low, 1+ε_high)) · A · logp`` per token.

    Returns ``(loss [T], ratio [T] detached, clipped [T] bool)``; ``clipped`` marks masked tokens whose
    ratio lies outside the clip range (their weight was truncated; they still have a gradient).
    """
    ratio = torch.exp(log_ratio(logp, old_logp, mask)).detach()
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -weight * advantages.to(logp) * logp
    clipped = mask & ((ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high))
    return _masked(loss, mask), ratio, clipped


def ppo_clip_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip ``ℓ = -min(r · A, clip(r, 1-ε_low, 1+ε_high) · A)`` per token.

    Returns ``(loss [T], ratio [T] detached, clipped [T] bool)``; ``clipped`` marks masked tokens where
    the clipped branch is strictly smaller, i.e. tokens without gradient.
    """
    ratio = torch.exp(log_ratio(logp, old_logp, mask))
    adv = advantages.to(logp)
    unclipped = -ratio * adv
    clipped_loss = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = mask & (clipped_loss > unclipped)
    return _masked(loss, mask), ratio.detach(), clipped


POLICY_LOSSES = {"cispo": cispo_token_loss, "ppo_clip": ppo_clip_token_loss, "grpo": ppo_clip_token_loss}


# verl's bound on the k3 value: beyond it the penalty's gradient is cut (clamp), so one token whose
# reference log-prob is far off cannot dominate the step.
MAX_K3 = 10.0


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ, ``log ρ = ref_logp - logp``.

    ``k1 = -log ρ``; ``k2 = ½ (log ρ)²``; ``k3 = min(ρ - 1 - log ρ, 10)`` (≥ 0, Schulman's
    low-variance one, clamped); ``k3+``: k3's value with k2's gradient (straight-through).
    """
    log_rho = (ref_logp.to(logp) - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho * log_rho
    if estimator in ("k3", "k3+"):
        k3 = (torch.expm1(log_rho) - log_rho).clamp(max=MAX_K3)
        if estimator == "k3":
            return k3
        k2 = 0.5 * log_rho * log_rho
        return k2 + (k3 - k2).detach()
    raise ValueError(f"kl_estimator must be one of ('k1', 'k2', 'k3', 'k3+'), got {estimator!r}")


def aggregation_weights(
    loss_agg: str, loss_tokens: Sequence[int], group_ids: Sequence[int] | None = None, *, max_response_len: int = 1
) -> tuple[list[float], float]:
    """``(a_i per sequence, Z)`` of one mini-batch for ``loss_agg`` (module docstring).

    ``loss_tokens[i]``: response tokens of sequence ``i`` that remain in the loss; ``group_ids[i]``: its
    group (``group_total`` only); ``max_response_len``: the generation budget (``seq_total`` only, not
    the longest response of the batch).
    """
    n = [int(t) for t in loss_tokens]
    if loss_agg == "token_mean":
        weights, z = [1.0] * len(n), sum(n)
    elif loss_agg == "seq_total":
        weights, z = [1.0] * len(n), len(n) * max_response_len
    elif loss_agg == "seq_mean":
        weights = [1.0 / t if t else 0.0 for t in n]
        z = sum(1 for t in n if t)
    elif loss_agg == "group_total":
        if group_ids is None or len(group_ids) != len(n):
            raise ValueError("loss_agg=group_total needs one group id per sequence")
        totals: dict[int, int] = {}
        for g, t in zip(group_ids, n):
            totals[g] = totals.get(g, 0) + t
        weights = [1.0 / totals[g] if totals[g] else 0.0 for g in group_ids]
        z = sum(1 for t in totals.values() if t)
    else:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    return weights, float(max(1, z))  # nothing left to train: loss 0, not 0/0


def _extra(mb: Any, key: str, why: str) -> torch.Tensor:
    try:
        return mb.extras[key]
    except KeyError:
        raise KeyError(f"micro-batch extras lack {key!r}, needed {why}") from None


def _loss_mask(mb: Any, labels: torch.Tensor) -> torch.Tensor:
    mask = labels != IGNORE_INDEX
    if "loss_mask" in mb.extras:
        mask = mask & mb.extras["loss_mask"].to(labels.device).bool()
    return mask


def _masked_extrema(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not bool(mask.any()):
        return torch.zeros((), device=values.device), torch.zeros((), device=values.device)
    v = values.detach()[mask]
    return v.max(), v.min()


def make_loss_fn(cfg: AlgorithmConfig, normaliser: float, *, temperature: float = 1.0, on_policy: bool = False):
    """The engine ``loss_fn(logits [T, V], mb) -> (loss, metrics)`` for one optimizer step.

    ``normaliser``: ``Z`` from :func:`aggregation_weights` for this mini-batch. ``temperature``: the
    rollout sampling temperature. ``on_policy=True`` takes ``π_old = sg(π_θ)`` instead of reading old
    log-probs — exact only for the first update on freshly generated rollouts, where it saves the
    recompute forward pass.

    ``mb.extras`` (all ``[T]``, packed like ``input_ids``):

    - ``labels`` (int64, shifted per document, -100 = no loss) and ``advantages`` (float) — always;
    - ``old_logprobs`` — when ``cfg.old_logprobs_source == "trainer"`` (unless ``on_policy``);
    - ``rollout_logprobs`` — the rollout engine's log-probs: π_old when the source is ``rollout``, and
      else (optional) the mismatch metrics and, with ``cfg.tis_cap > 0``, the TIS weights;
    - ``ref_logprobs`` — when ``cfg.kl_coef > 0``;
    - ``loss_weights`` — the per-token ``a_i`` of :func:`aggregation_weights`; required for
      ``seq_mean`` and ``group_total`` (whose weights depend on whole sequences and groups, which
      micro-batches and ranks split), optional otherwise;
    - ``loss_mask`` — optional bool / 0-1, ANDed with ``labels != -100`` (forced block ends, truncated
      responses, all-equal groups: see :func:`memento_train.rl.trainer_worker.rollout_document`).
    """
    cfg.validate()
    if not normaliser > 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser}")
    policy_loss = POLICY_LOSSES[cfg.loss]

    def loss_fn(logits: torch.Tensor, mb: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = _extra(mb, "labels", "for every RL loss").to(logits.device)
        mask = _loss_mask(mb, labels)
        logp, entropy = token_logprobs_and_entropy(
            logits, labels, temperature=temperature, chunk_size=cfg.logprob_chunk_size
        )
        # Values outside the mask may be anything (NaN, -inf padding); 0 · NaN in backward would still
        # poison the gradient, so they are replaced before any arithmetic.
        advantages = _masked(_extra(mb, "advantages", "for every RL loss").to(logp), mask)
        rollout = mb.extras.get("rollout_logprobs")
        if on_policy:
            old = logp.detach()
        elif cfg.old_logprobs_source == "rollout":
            old = _extra(mb, "rollout_logprobs", "as π_old (algorithm.old_logprobs_source=rollout)")
        else:
            old = _extra(mb, "old_logprobs", "as π_old (algorithm.old_logprobs_source=trainer)")
        old = old.to(logp.device)

        pg, ratio, clipped = policy_loss(logp, old, advantages, mask, cfg.eps_low, cfg.eps_high)
        metrics: dict[str, torch.Tensor] = {"tokens": mask.sum().float()}
        if cfg.tis_cap > 0:
            rollout = _extra(
                mb, "rollout_logprobs", f"for truncated importance sampling (algorithm.tis_cap={cfg.tis_cap})"
            )
            w, capped = importance_weights(old, rollout, mask, cfg.tis_cap, cfg.tis_mode)
            pg = pg * w
            metrics["tis/weight/sum"] = _masked(w, mask).sum()
            metrics["tis/capped_frac/sum"] = capped.sum().float()
        token_loss = pg
        if cfg.kl_coef > 0:
            ref = _extra(mb, "ref_logprobs", f"for the KL penalty (algorithm.kl_coef={cfg.kl_coef})")
            kl = _masked(kl_penalty(logp, _masked(ref.to(logp), mask), cfg.kl_estimator), mask)
            token_loss = token_loss + cfg.kl_coef * kl
            metrics["kl/sum"] = kl.detach().sum()
        if cfg.entropy_coef > 0:
            token_loss = token_loss - cfg.entropy_coef * entropy
        weights = mb.extras.get("loss_weights")
        if weights is None and cfg.loss_agg in ("seq_mean", "group_total"):
            weights = _extra(mb, "loss_weights", f"for algorithm.loss_agg={cfg.loss_agg}")
        if weights is not None:
            token_loss = token_loss * _masked(weights.to(logp), mask)
        loss = _masked(token_loss, mask).sum() / normaliser

        ratio_max, ratio_min = _masked_extrema(ratio, mask)
        metrics.update(
            {
                "loss/total": loss.detach(),
                "pg_loss/sum": pg.detach().sum(),
                "entropy/sum": _masked(entropy.detach(), mask).sum(),
                "ratio/sum": _masked(ratio, mask).sum(),
                "ratio/max": ratio_max,
                "ratio/min": ratio_min,
                "clip_frac/sum": clipped.sum().float(),
                # drift of π_θ from π_old (k3), the usual "approx_kl" of PPO implementations
                "approx_kl/sum": _masked(kl_penalty(logp.detach(), old, "k3"), mask).sum(),
            }
        )
        if rollout is not None:
            trainer_lp = old if cfg.old_logprobs_source == "trainer" and not on_policy else logp
            metrics.update(logprob_mismatch(trainer_lp, rollout.to(logp.device), mask))
        return loss, metrics

    return loss_fn


def reduce_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Combine per-micro-batch metrics (the module docstring's convention) into plain floats.

    ``x/sum`` → ``x`` = Σ sums / Σ ``tokens``; ``x/total`` → ``x`` = Σ; ``x/max`` and ``x/min`` keep
    their names and take the max / min; ``tokens`` → Σ. Across ranks, all-reduce sums with SUM and
    extrema with MAX / MIN first.
    """
    sums: dict[str, float] = {}
    extrema: dict[str, float] = {}
    for m in metrics:
        for key, value in m.items():
            v = float(value)
            name, _, kind = key.rpartition("/")
            if key == "tokens" or kind in ("sum", "total"):
                sums[key] = sums.get(key, 0.0) + v
            elif kind == "max":
                extrema[key] = max(extrema.get(key, -math.inf), v)
            elif kind == "min":
                extrema[key] = min(extrema.get(key, math.inf), v)
            else:
                raise ValueError(f"metric {key!r} has no reduction suffix (/sum, /max, /min, /total)")
    tokens = sums.get("tokens", 0.0)
    out: dict[str, float] = {"tokens": tokens}
    for key, v in sums.items():
        name, _, kind = key.rpartition("/")
        if kind == "sum":
            out[name] = v / tokens if tokens > 0 else 0.0
        elif kind == "total":
            out[name] = v
    out.update(extrema)
    return out


__all__ = [
    "MAX_K3",
    "POLICY_LOSSES",
    "aggregation_weights",
    "cispo_token_loss",
    "kl_penalty",
    "log_ratio",
    "make_loss_fn",
    "ppo_clip_token_loss",
    "reduce_metrics",
]
