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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memento_train.data.pack import IGNORE_INDEX
from memento_train.training.micro_batches import plan_micro_batches


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
            raise ValueError(
                f"example {int(too_long[0])} has {int(self.lengths[too_long[0]])} tokens, more than "
                f"train.micro_batch_tokens={micro_batch_tokens}; raise it or lower data.max_seq_len"
            )
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
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def indices(self, step: int) -> np.ndarray:
        """Example indices of optimizer step ``step`` (the last batch of an epoch may be smaller)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        lo = within * self.global_batch_size
        return self._order(epoch)[lo : lo + self.global_batch_size]

    def plan(self, step: int) -> StepPlan:
        """Step ``step``'s examples packed into micro-batches and dealt to ranks
        (:func:`~memento_train.training.micro_batches.plan_micro_batches`)."""
        idx = self.indices(step)
        plan = plan_micro_batches(self.lengths[idx].tolist(), self.micro_batch_tokens, self.world_size)
        per_rank = [[[int(idx[j]) for j in mb] for mb in rank] for rank in plan]
        return StepPlan(
            step=step,
            epoch=step // self.steps_per_epoch,
            per_rank=per_rank,
            num_loss_tokens=int(self.loss_tokens[idx].sum()),
            num_sequences=int(idx.size),
        )


def loss_token_count(labels: np.ndarray) -> int:
    """Loss tokens of one rendered example once labels are shifted (the first label never counts)."""
    return int((np.asarray(labels)[1:] != IGNORE_INDEX).sum())
