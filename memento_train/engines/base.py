"""The one small interface every training engine implements (FSDP2, DeepSpeed ZeRO, Megatron-core).

An engine wraps a model for distributed training: sharding, mixed precision, gradient reduction,
clipping, the optimizer and checkpoints. The SFT and RL loops only ever talk to this interface, so
parallelism stays out of model code and out of the loops (torchtitan's rule).

Contract, for every engine:

- The default ``torch.distributed`` process group is initialised before the engine is built (world
  size 1 included); ``device`` is this rank's device.
- **Loss scaling.** The loop calls ``backward(loss)`` once per micro-batch with
  ``loss = sum of token losses of the micro-batch / number of loss tokens in the whole global batch``
  (all ranks, all micro-batches). After the last micro-batch of a step, every rank's gradient must be
  the **sum over ranks** of those losses' gradients, i.e. the gradient of the global-batch token mean.
  Engines whose reduction averages over ranks multiply by the world size internally.
- ``backward(loss, last_micro_batch=False)`` may skip gradient synchronisation; the last micro-batch
  of a step passes ``True``. Every rank runs the same number of micro-batches per step.
- ``step(lr)`` sets the learning rate, clips the global gradient norm to ``optim.grad_clip`` (0 = no
  clipping), steps the optimizer, zeroes gradients, and returns the global norm *before* clipping.
- ``save(path)`` / ``load(path)`` are collective; they write / read model **and** optimizer state under
  the directory ``path`` (created by the caller, shared by all ranks), sharded as the engine likes.
- ``full_state_dict()`` is collective; it returns the unsharded model weights as fp32 CPU tensors
  keyed by the model's own (Hugging Face) parameter names on rank 0, and ``None`` on other ranks.
- ``full_grads()`` is collective; called after the last backward of a step and before ``step``, it
  returns the reduced, unsharded gradients as fp32 CPU tensors keyed by parameter name, on every rank.
- ``forward_backward(micro_batches, loss_fn)`` is what loops call: forward each :class:`MicroBatch`,
  ``loss_fn(logits, mb) -> (loss, metrics)``, backward. The default runs them one after another
  through :meth:`logits` and :meth:`backward`; a pipeline-parallel engine overrides it with its own
  schedule. ``forward_only`` is the no-grad twin (reference / old log-probs, eval loss).
- Loops that need only per-token log-probs / entropies pass a
  :class:`~memento_train.engines.head_stats.TokenStatsFn` instead (``fn(stats, mb)``): the engine then
  runs the model with the fused, chunked LM head (:meth:`token_stats`), which never materialises the
  ``[T, vocab]`` logits nor keeps them for backward. The SFT loss always does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memento_train.attention import MementoAttentionMeta
from memento_train.engines.config import EngineConfig
from memento_train.engines.head_stats import HeadRequest, TokenStats, TokenStatsFn, head_request
from memento_train.training.optim import OptimConfig


@dataclass
class MicroBatch:
    """One packed micro-batch as the engines see it: tokens, positions, memento-attention metadata,
    and whatever per-token tensors the loss needs (``labels``, advantages, old log-probs, ...)."""

    input_ids: torch.Tensor  # int64 [T]
    position_ids: torch.Tensor  # int64 [T], restarting per document
    meta: MementoAttentionMeta
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


LossFn = Callable[[torch.Tensor, MicroBatch], "tuple[torch.Tensor, dict[str, Any]]"]


class TrainEngine(ABC):
    """Base class of the training engines; see the module docstring for the contract."""

    name: str = ""

    def __init__(self, model: nn.Module, optim: OptimConfig, cfg: EngineConfig, device: torch.device) -> None:
        self.optim_cfg = optim
        self.cfg = cfg
        self.device = torch.device(device)

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The wrapped model; call it for forward passes."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        """Accumulate gradients of ``loss`` (see the scaling contract)."""

    @abstractmethod
    def step(self, lr: float) -> float:
        """Set ``lr``, clip, step the optimizer, zero grads; return the pre-clip global grad norm."""

    @abstractmethod
    def save(self, path: str) -> None:
        """Collective: write model and optimizer state under directory ``path``."""

    @abstractmethod
    def load(self, path: str) -> None:
        """Collective: restore model and optimizer state written by :meth:`save`."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: unsharded fp32 CPU weights on rank 0 (HF names), ``None`` elsewhere."""

    @abstractmethod
    def full_grads(self) -> dict[str, torch.Tensor]:
        """Collective: reduced unsharded fp32 CPU gradients on every rank (before :meth:`step`)."""

    def logits(self, mb: MicroBatch) -> torch.Tensor:
        """Forward one micro-batch; returns logits ``[T, vocab]`` (HF causal-LM models by default)."""
        out = self.module(
            input_ids=mb.input_ids[None], position_ids=mb.position_ids[None], memento_meta=mb.meta, use_cache=False
        )
        return out.logits[0]

    def output_head(self) -> nn.Module:
        """The module that computes the logits (an HF model's ``lm_head``; tied or not)."""
        return self.module.get_output_embeddings()

    def token_stats(self, mb: MicroBatch, request: HeadRequest) -> TokenStats:
        """Forward one micro-batch through the fused LM head: per-token log-probs (and entropies) of
        ``request.labels``, computed chunk by chunk inside the head module's forward (where sharded
        engines hold its weight whole); see :mod:`memento_train.engines.head_stats`."""
        with head_request(self.output_head(), request):
            out = self.module(
                input_ids=mb.input_ids[None], position_ids=mb.position_ids[None], memento_meta=mb.meta, use_cache=False
            )
        return TokenStats.unpack(out.logits[0], request)

    def evaluate(self, mb: MicroBatch, fn: Callable[..., Any]) -> Any:
        """``fn`` on one micro-batch: ``fn(token_stats, mb)`` for a :class:`TokenStatsFn`, else ``fn(logits, mb)``."""
        if isinstance(fn, TokenStatsFn):
            return fn(self.token_stats(mb, fn.request(mb)), mb)
        return fn(self.logits(mb), mb)

    def forward_backward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> list[dict[str, Any]]:
        """Forward + backward every micro-batch of one step (the last one syncs gradients).

        ``loss_fn`` is a function of logits or a :class:`TokenStatsFn`. Returns each micro-batch's
        metrics from ``loss_fn``.
        """
        metrics = []
        for i, mb in enumerate(micro_batches):
            loss, m = self.evaluate(mb, loss_fn)
            self.backward(loss, last_micro_batch=i == len(micro_batches) - 1)
            metrics.append(m)
        return metrics

    @torch.no_grad()
    def forward_only(
        self, micro_batches: Sequence[MicroBatch], fn: Callable[[torch.Tensor, MicroBatch], Any]
    ) -> list[Any]:
        """Evaluate ``fn(logits, mb)`` (or a :class:`TokenStatsFn`) on every micro-batch without gradients."""
        return [self.evaluate(mb, fn) for mb in micro_batches]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.train(False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.cfg.precision]


_ENGINES: dict[str, Callable[..., TrainEngine]] = {}


def register_engine(kind: str, factory: Callable[..., TrainEngine]) -> None:
    """Make ``engine.kind=<kind>`` build ``factory(model, optim, cfg, device)``."""
    _ENGINES[kind] = factory


def build_engine(model: nn.Module, optim: OptimConfig, cfg: EngineConfig, device: torch.device) -> TrainEngine:
    """Build the engine named by ``cfg.kind`` around ``model`` (a CPU or meta-free model in fp32)."""
    cfg.validate()
    if cfg.kind not in _ENGINES:
        # Import lazily: each engine imports its heavy dependency (deepspeed, megatron) on use only.
        import importlib

        importlib.import_module(f"memento_train.engines.{cfg.kind}")
    return _ENGINES[cfg.kind](model, optim, cfg, device)
