"""The contract every generator implements (reference generator, vLLM adapter, fakes).

RL rollouts and ``memento-eval`` talk to generators only through :class:`GenerationEngine`; the
eviction options travel as :class:`~memento_train.masking.BlockMaskingConfig` (re-exported here),
whose field names are the serving overlay's (``block_masking_config`` in the Memento vLLM overlay),
so one config serves training, rollout and serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from memento_train.masking import BlockMaskingConfig, Kind


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options (vLLM semantics: top_k=0 and min_p=0 disable those filters)."""

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1  # samples per prompt
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, 0 = greedy (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, 0 = off (got {self.top_k})")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1) (got {self.min_p})")
        if self.n < 1:
            problems.append(f"n must be >= 1 (got {self.n})")
        if problems:
            raise ValueError("invalid sampling params: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationResult:
    """One sampled response.

    ``logprobs[i]`` is ``log softmax(logits / temperature)[token_ids[i]]`` under the policy that
    sampled it (temperature 1: the raw policy; greedy counts as temperature 1), before top-k/top-p/
    min-p truncation, which is what the trainer recomputes. ``kv_trace[i]`` is the number of live
    KV entries per layer (prompt included) while token ``i`` was produced; ``kv_bytes`` the bytes
    held across layers at that moment when the engine can measure them. ``forced[i]`` is True when
    token ``i`` was inserted by the block-length cap (``max_block_tokens``) instead of sampled: the
    policy did not choose it, so RL leaves it out of the loss (its log-prob is still reported).
    ``forced_block_ends`` is their count. An engine that cannot tell leaves ``forced`` empty, which is
    read as "none forced" only when ``forced_block_ends`` is 0.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    kinds: list[int]
    kv_trace: list[int]
    finish_reason: str  # "stop" (a stop token was sampled) or "length"
    kv_bytes: list[int] | None = None
    forced_block_ends: int = 0  # <|block_end|> tokens forced by max_block_tokens
    extra: dict = field(default_factory=dict)
    forced: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.forced and self.forced_block_ends == 0:
            self.forced = [False] * len(self.token_ids)
        elif self.forced and len(self.forced) != len(self.token_ids):
            raise ValueError(f"forced has {len(self.forced)} flags for {len(self.token_ids)} tokens")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def peak_kv(self) -> int:
        return max(self.kv_trace, default=0)

    @property
    def kv_auc(self) -> int:
        return int(sum(self.kv_trace))

    @property
    def num_blocks(self) -> int:
        return int(np.count_nonzero(np.asarray(self.kinds) == Kind.BLOCK_DELIM)) // 2

    def tokens_of(self, kind: Kind) -> int:
        return int(np.count_nonzero(np.asarray(self.kinds) == kind))


@runtime_checkable
class GenerationEngine(Protocol):
    """Anything that samples responses with block eviction."""

    block_masking: BlockMaskingConfig

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        """``params.n`` results for each prompt (token-id lists), in prompt order."""
        ...


__all__ = ["BlockMaskingConfig", "GenerationEngine", "GenerationResult", "SamplingParams"]
