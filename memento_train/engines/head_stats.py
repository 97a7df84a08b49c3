"""Per-token log-probs (and entropies) from the fused LM head, computed *inside* the model's forward.

Loops that only need per-token results (the SFT loss, RL log-probs and losses) hand an engine a
:class:`TokenStatsFn` instead of a function of logits. The engine then runs the model's forward with
a :class:`HeadRequest` attached to the module that computes the logits (the Hugging Face ``lm_head``,
Megatron's ``output_layer``); for that one forward, the module returns the requested per-token
statistics, computed by :func:`memento_train.models.lm_head.fused_token_logprobs`, instead of ``[T, V]``
logits. Nothing else in the model changes.

Why inside the head's own forward: sharded engines hold the head weight whole only there. FSDP2
unshards the root unit's parameters (embeddings, final norm, LM head) in its pre-forward hook;
DeepSpeed ZeRO-3 gathers a module's parameters in its pre-forward hook and, for backward, in a hook
on that module's *outputs* (the statistics returned here, so the recomputing backward finds the weight
gathered again). A tied head is the embedding's parameter, gathered the same way. Outside the
forward, ``lm_head.weight`` is a shard (FSDP2) or an empty placeholder (ZeRO-3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memento_train.models.lm_head import DEFAULT_CHUNK_ROWS, IGNORE_INDEX, VocabShard, fused_token_logprobs

_REQUEST_ATTR = "_memento_head_request"


@dataclass(frozen=True)
class HeadRequest:
    """What the head computes for one micro-batch: log-probs of ``labels`` (``[T]``, global token ids,
    ``-100`` = none) at ``temperature``, entropies too if ``with_entropy``."""

    labels: torch.Tensor
    temperature: float = 1.0
    with_entropy: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS


@dataclass
class TokenStats:
    """Per-token results of one micro-batch: ``logprobs`` ``[T]`` (0 where there is no label) and
    ``entropy`` ``[T]`` (``None`` unless requested); fp32, differentiable."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None

    def pack(self) -> torch.Tensor:
        """``[T, 2]`` (log-prob, entropy): the tensor a head module returns in place of logits."""
        ent = self.entropy if self.entropy is not None else torch.zeros_like(self.logprobs)
        return torch.stack([self.logprobs, ent], dim=-1)

    @classmethod
    def unpack(cls, packed: torch.Tensor, request: HeadRequest) -> TokenStats:
        """Inverse of :meth:`pack` (any leading shape that flattens to ``[T, 2]``)."""
        flat = packed.reshape(-1, 2)
        return cls(flat[:, 0], flat[:, 1] if request.with_entropy else None)


class TokenStatsFn:
    """A per-micro-batch function of :class:`TokenStats` (not of logits), for
    :meth:`~memento_train.engines.base.TrainEngine.forward_backward` (``fn(stats, mb) -> (loss, metrics)``)
    and :meth:`~memento_train.engines.base.TrainEngine.forward_only` (``fn(stats, mb) -> anything``).

    The labels are ``mb.extras[labels_key]`` (shifted, ``-100`` = no label); where ``mb.extras`` has a
    ``loss_mask`` (bool / 0-1), masked-out positions are treated as unlabelled (log-prob 0, no gradient,
    no compute).
    """

    def __init__(
        self,
        fn: Callable[[TokenStats, Any], Any],
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        labels_key: str = "labels",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        self.fn = fn
        self.temperature = float(temperature)
        self.with_entropy = bool(with_entropy)
        self.labels_key = labels_key
        self.chunk_rows = int(chunk_rows)

    def request(self, mb: Any) -> HeadRequest:
        """The :class:`HeadRequest` of micro-batch ``mb``."""
        labels = mb.extras[self.labels_key]
        mask = mb.extras.get("loss_mask")
        if mask is not None:
            labels = torch.where(mask.to(labels.device).bool(), labels, IGNORE_INDEX)
        return HeadRequest(labels, self.temperature, self.with_entropy, self.chunk_rows)

    def __call__(self, stats: TokenStats, mb: Any) -> Any:
        return self.fn(stats, mb)


def token_logprob_fn(
    *, temperature: float = 1.0, labels_key: str = "labels", chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> TokenStatsFn:
    """For ``engine.forward_only``: detached fp32 log-probs ``[T]`` of ``mb.extras[labels_key]``
    (old / reference log-probs of RL), from the fused head."""
    return TokenStatsFn(
        lambda stats, mb: stats.logprobs.detach(), temperature=temperature, labels_key=labels_key, chunk_rows=chunk_rows
    )


# -- running the request inside the head module's forward ------------------------------------------
def _compute(module: nn.Module, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    request: HeadRequest = getattr(module, _REQUEST_ATTR)
    shard: VocabShard | None = getattr(module, "_memento_head_shard", None)
    lead = hidden.shape[:-1]
    logp, ent = fused_token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        request.labels.reshape(-1),
        temperature=request.temperature,
        with_entropy=request.with_entropy,
        chunk_rows=request.chunk_rows,
        shard=shard,
    )
    return TokenStats(logp, ent).pack().reshape(*lead, 2)


def _hf_forward(module: nn.Linear, original: Callable) -> Callable:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if getattr(module, _REQUEST_ATTR, None) is None:
            return original(hidden_states)
        return _compute(module, hidden_states, module.weight)

    return forward


def _megatron_forward(module: nn.Module, original: Callable) -> Callable:
    # ColumnParallelLinear.forward(input_, weight=None, runtime_gather_output=None) -> (output, bias);
    # a tied model passes the embedding as ``weight``.
    def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
        if getattr(module, _REQUEST_ATTR, None) is None:
            return original(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        return _compute(module, input_, module.weight if weight is None else weight), None

    return forward


def _install(module: nn.Module, *, megatron: bool) -> None:
    if getattr(module, "_memento_fused_head", False):
        return
    if getattr(module, "bias", None) is not None:
        raise ValueError(f"the fused LM head supports heads without bias; {type(module).__name__} has one")
    module.forward = (_megatron_forward if megatron else _hf_forward)(module, module.forward)
    module._memento_fused_head = True


@contextlib.contextmanager
def head_request(
    module: nn.Module, request: HeadRequest, *, shard: VocabShard | None = None, megatron: bool = False
) -> Iterator[None]:
    """While active, ``module`` (the model's logits layer: an HF ``nn.Linear`` head, or Megatron's
    ``ColumnParallelLinear`` with ``megatron=True``) returns packed :class:`TokenStats` for ``request``
    instead of logits; ``shard`` describes a vocabulary-parallel head."""
    _install(module, megatron=megatron)
    setattr(module, _REQUEST_ATTR, request)
    module._memento_head_shard = shard
    try:
        yield
    finally:
        setattr(module, _REQUEST_ATTR, None)
        module._memento_head_shard = None
