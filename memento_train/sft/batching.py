"""Which examples each optimizer step trains on, how they are packed, and how they split over ranks.

The plan is a pure function of ``(step, seed, data, world size, token budget)``: the driver computes it
and sends each rank its share, so the data position of a run is just its step counter (resuming
replays the same order) and every rank runs the same number of micro-batches (FSDP/ZeRO collectives
must line up; a rank short of work gets an empty micro-batch that contributes no gradient).

Loss normalisation: every micro-batch's summed token loss is divided by the number of loss tokens in
the **whole global batch** (:attr:`StepPlan.num_loss_tokens`), so the update is the token mean of the
global batch however it is split into micro-batches and ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memento_train.attention import MementoAttentionMeta
from memento_train.data.pack import IGNORE_INDEX, PackedBatch, collate, plan_bins
from memento_train.engines import MicroBatch


@dataclass
class StepPlan:
    """One optimizer step: per rank, a list of micro-batches, each a list of example indices
    (an empty list is a padding micro-batch)."""

    step: int
    epoch: int
    per_rank: list[list[list[int]]]
    num_loss_tokens: int
    num_sequences: int


class StepPlanner:
    """Deterministic global-batch schedule over a dataset of ``lengths[i]`` tokens per example."""

    def __init__(
        self,
        lengths: Sequence[int],
        loss_tokens: Sequence[int],
        *,
        global_batch_size: int,
        micro_batch_tokens: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        epochs: float = 1.0,
        max_steps: int | None = None,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.loss_tokens = np.asarray(loss_tokens, dtype=np.int64)
        if self.lengths.size == 0:
            raise ValueError("the dataset is empty: no examples survived validation (see the validation report)")
        too_long = np.flatnonzero(self.lengths > micro_batch_tokens)
        if too_long.size:
            raise ValueError(f"example {int(too_long[0])} has {int(self.lengths[too_long[0]])} tokens, more than "
                             f"train.micro_batch_tokens={micro_batch_tokens}; raise it or lower data.max_seq_len")
        self.global_batch_size = global_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        n = self.lengths.size
        self.steps_per_epoch = math.ceil(n / global_batch_size)
        # The schedule spans the full run even when max_steps stops it early.
        self.schedule_steps = max(1, math.ceil(epochs * self.steps_per_epoch))
        self.total_steps = min(self.schedule_steps, max_steps) if max_steps else self.schedule_steps
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = self.lengths.size
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def indices(self, step: int) -> np.ndarray:
        """Example indices of optimizer step ``step`` (the last batch of an epoch may be smaller)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        lo = within * self.global_batch_size
        return self._order(epoch)[lo : lo + self.global_batch_size]

    def plan(self, step: int) -> StepPlan:
        """Pack step ``step``'s examples best-fit-decreasing into micro-batches of at most
        ``micro_batch_tokens`` tokens, then deal them to ranks, largest first, to the rank with the
        fewest tokens so far; pad every rank to the same number of micro-batches."""
        idx = self.indices(step)
        bins = [[int(idx[j]) for j in b] for b in plan_bins(self.lengths[idx].tolist(), self.micro_batch_tokens)]
        bins.sort(key=lambda b: -int(self.lengths[b].sum()))
        per_rank: list[list[list[int]]] = [[] for _ in range(self.world_size)]
        load = [0] * self.world_size
        for b in bins:
            r = min(range(self.world_size), key=lambda i: (load[i], len(per_rank[i]), i))
            per_rank[r].append(b)
            load[r] += int(self.lengths[b].sum())
        depth = max(1, max(len(p) for p in per_rank))
        for p in per_rank:
            p.extend([] for _ in range(depth - len(p)))
        return StepPlan(step=step, epoch=step // self.steps_per_epoch, per_rank=per_rank,
                        num_loss_tokens=int(self.loss_tokens[idx].sum()), num_sequences=int(idx.size))


def loss_token_count(labels: np.ndarray) -> int:
    """Loss tokens of one rendered example once labels are shifted (the first label never counts)."""
    return int((np.asarray(labels)[1:] != IGNORE_INDEX).sum())


def padding_batch(pad_token_id: int) -> PackedBatch:
    """A one-token micro-batch with no loss: keeps a rank's collectives in step with the others."""
    row = {"input_ids": np.array([pad_token_id]), "labels": np.array([IGNORE_INDEX]),
           "kinds": np.array([0], np.int8), "kill_row": np.array([1])}
    return collate([row])


def build_micro_batch(rows: Sequence[Mapping], *, pad_to: int, pad_token_id: int, device: torch.device) -> tuple[MicroBatch, PackedBatch]:
    """Collate rendered examples into one packed :class:`MicroBatch` on ``device`` (empty = padding)."""
    packed = collate(list(rows), pad_to=pad_to, pad_token_id=pad_token_id) if rows else padding_batch(pad_token_id)
    meta = MementoAttentionMeta.from_packed(packed.cu_seqlens, packed.kill_row, device=device)
    mb = MicroBatch(
        input_ids=packed.input_ids.to(device),
        position_ids=packed.position_ids.to(device),
        meta=meta,
        extras={"labels": packed.labels.to(device)},
    )
    return mb, packed
