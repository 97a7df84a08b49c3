"""Options of the RL algorithm (policy loss, KL, entropy, normalisation); the reward's are
:class:`memento_train.rl.rewards.RewardConfig`.

Defaults follow the Memento paper's RL recipe (Appendix A.2.3): CISPO with ε = 0.2 on both sides, a
k3 KL penalty to the frozen reference with β = 0.001, batch-level advantage normalisation, the loss
of each group normalised by that group's total response tokens (MiniMax-M1's 1/Σ_{i∈group}|o_i|), old
log-probs recomputed by the trainer, and the math-verify reward on responses that finished thinking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from memento_train.config.errors import ConfigError
from memento_train.config.tree import check_types

AdvNorm = Literal["group", "drgrpo", "batch"]
LossAgg = Literal["token_mean", "seq_total", "seq_mean", "group_total"]
ADV_NORMS = get_args(AdvNorm)
LOSS_AGGS = get_args(LossAgg)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class AlgorithmConfig:
    """How the policy is updated from scored rollouts.

    Attributes:
        loss: ``cispo`` — ``-sg(clip(r, 1-eps_low, 1+eps_high)) * A * log π`` (every token keeps a
            gradient; the clipped ratio is only a detached weight); ``ppo_clip`` (``grpo`` is its old
            name, still accepted) — PPO-clip,
            ``-min(r * A, clip(r, 1-eps_low, 1+eps_high) * A)`` (clipped tokens get no gradient).
            ``r = π_θ / π_old`` per token.
        eps_low, eps_high: the clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio.
        kl_coef: β of the per-token KL penalty to the frozen reference policy; 0 disables it (and the
            reference forward pass).
        kl_estimator: ``k1`` = ``log π - log π_ref``; ``k2`` = ``½ (log π - log π_ref)²``;
            ``k3`` = ``ρ - 1 - log ρ`` with ``ρ = π_ref / π`` (unbiased and ≥ 0; GRPO's choice; its
            value is clamped to ≤ 10); ``k3+`` = k3's value with k2's gradient (straight-through:
            k2's gradient is the unbiased one).
        entropy_coef: weight of the entropy bonus (loss gets ``- entropy_coef * H``); 0 only logs H.
        adv_norm: ``group`` — ``(R - mean_g) / (std_g + adv_eps)`` (GRPO); ``drgrpo`` — ``R - mean_g``
            (Dr.GRPO, no std); ``batch`` — ``(R - mean_g) / (std_batch(R - mean_g) + adv_eps)``
            (group-centred, then normalised by one std over the whole batch).
        adv_eps: added to the std so all-equal groups get advantage 0, never NaN.
        loss_agg: how token losses are normalised across the mini-batch
            (:func:`memento_train.rl.losses.aggregation_weights`):
            ``group_total`` — each group's token sum over that group's total response tokens, then the
            mean over groups (MiniMax-M1 / the Memento paper; the default);
            ``token_mean`` — divide by the number of response tokens of the mini-batch;
            ``seq_total`` — divide by ``num_sequences * max_response_len``, a constant (Dr.GRPO);
            ``seq_mean`` — mean over each sequence's tokens, then over sequences (original GRPO).
        mask_truncated: leave responses that hit ``rollout.max_new_tokens`` out of the loss entirely
            (DAPO's overlong filtering, TRL's ``mask_truncated_completions``); the normaliser then
            counts only what remains.
        drop_zero_adv_groups: leave groups whose rewards are all equal (advantage 0, no policy signal)
            out of the loss, KL term included, so they do not dilute the normaliser.
        train_forced_tokens: also train the ``<|block_end|>`` tokens that the block-length cap
            inserted (``GenerationResult.forced``); by default they are left out of the loss, since
            the policy did not choose them (their log-prob can be around -11).
        old_logprobs_source: ``trainer`` — π_old is recomputed by the trainer before the update
            (the default; the rollout engine's log-probs only feed the mismatch metrics and TIS);
            ``rollout`` — the rollout engine's log-probs are used as π_old directly.
        tis_cap: when > 0 (and ``old_logprobs_source=trainer``), the policy term of each token is
            weighted by the train/rollout importance weight ``π_old_trainer / π_rollout`` capped at
            ``tis_cap`` (truncated importance sampling); 0 disables it.
        tis_mode: ``truncate`` — ``min(w, tis_cap)``; ``mask`` — ``w`` where ``w <= tis_cap``, else 0.
        logprob_chunk_size: rows of logits turned into fp32 log-probs at a time (bounds the extra
            memory to ``chunk * vocab * 4`` bytes).
    """

    loss: Literal["cispo", "ppo_clip", "grpo"] = "cispo"  # grpo: the old name of ppo_clip
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.001
    kl_estimator: Literal["k1", "k2", "k3", "k3+"] = "k3"
    entropy_coef: float = 0.0
    adv_norm: AdvNorm = "batch"
    adv_eps: float = 1e-6
    loss_agg: LossAgg = "group_total"
    mask_truncated: bool = False
    drop_zero_adv_groups: bool = False
    train_forced_tokens: bool = False
    old_logprobs_source: Literal["trainer", "rollout"] = "trainer"
    tis_cap: float = 0.0
    tis_mode: Literal["truncate", "mask"] = "truncate"
    logprob_chunk_size: int = 512

    def validate(self, prefix: str = "algorithm") -> AlgorithmConfig:
        """Raise :class:`ConfigError` naming the first bad option; returns self."""
        check_types(self, prefix)
        if self.loss == "grpo":  # the old name: GRPO is the advantage scheme, the loss is PPO-clip
            self.loss = "ppo_clip"
        if not (_finite(self.eps_low) and 0.0 <= self.eps_low <= 1.0):
            raise ConfigError(
                f"{prefix}.eps_low must be in [0, 1] (the ratio's lower clip is 1 - eps_low), got {self.eps_low!r}"
            )
        if not (_finite(self.eps_high) and self.eps_high >= 0.0):
            raise ConfigError(f"{prefix}.eps_high must be a finite number >= 0, got {self.eps_high!r}")
        for name in ("kl_coef", "entropy_coef"):
            v = getattr(self, name)
            if not (_finite(v) and v >= 0.0):
                raise ConfigError(f"{prefix}.{name} must be a finite number >= 0 (0 disables it), got {v!r}")
        if not (_finite(self.adv_eps) and self.adv_eps > 0.0):
            raise ConfigError(
                f"{prefix}.adv_eps must be > 0 (it keeps all-equal groups at advantage 0), got {self.adv_eps!r}"
            )
        if not (_finite(self.tis_cap) and self.tis_cap >= 0.0):
            raise ConfigError(
                f"{prefix}.tis_cap must be >= 0 (0 disables truncated importance sampling), got {self.tis_cap!r}"
            )
        if self.tis_cap > 0 and self.old_logprobs_source == "rollout":
            raise ConfigError(
                f"{prefix}.tis_cap={self.tis_cap} has no effect with "
                f"{prefix}.old_logprobs_source=rollout (π_old is then the rollout policy, so the "
                f"importance weight is 1); set {prefix}.tis_cap=0 or old_logprobs_source=trainer"
            )
        c = self.logprob_chunk_size
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"{prefix}.logprob_chunk_size must be an int >= 1, got {c!r}")
        return self

    @property
    def uses_reference(self) -> bool:
        """Whether the loop needs reference-policy log-probs (``ref_logprobs``)."""
        return self.kl_coef > 0
