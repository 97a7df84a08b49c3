"""The step plan: deterministic, every example once per epoch, equal micro-batch counts per rank."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memento_train.data.pack import IGNORE_INDEX
from memento_train.sft.batching import StepPlanner, loss_token_count
from memento_train.training.micro_batches import build_micro_batch


def planner(lengths, **kw):
    args = dict(global_batch_size=8, micro_batch_tokens=100, world_size=2, seed=3, epochs=2)
    args.update(kw)
    return StepPlanner(lengths, [max(0, n - 2) for n in lengths], **args)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 100), min_size=1, max_size=40),
    world=st.integers(1, 4),
    gbs=st.integers(4, 12),
    cap=st.integers(100, 300),
)
def test_each_epoch_uses_every_example_once_and_ranks_run_equal_micro_batch_counts(lengths, world, gbs, cap):
    p = planner(lengths, world_size=world, global_batch_size=gbs, micro_batch_tokens=cap)
    seen = []
    for step in range(p.steps_per_epoch):
        plan = p.plan(step)
        counts = {len(r) for r in plan.per_rank}
        assert len(counts) == 1, "ranks must run the same number of micro-batches"
        for rank in plan.per_rank:
            for mb in rank:
                assert sum(lengths[i] for i in mb) <= cap
                seen.extend(mb)
        assert plan.num_loss_tokens == sum(max(0, lengths[i] - 2) for r in plan.per_rank for mb in r for i in mb)
    assert sorted(seen) == list(range(len(lengths)))


def test_plan_is_a_pure_function_of_the_step():
    lengths = list(np.random.default_rng(0).integers(5, 90, size=50))
    a, b = planner(lengths), planner(lengths)
    for step in (7, 0, 12, 3):  # any order, as after a resume
        assert a.plan(step).per_rank == b.plan(step).per_rank
    assert a.plan(0).per_rank != a.plan(a.steps_per_epoch).per_rank, "epochs reshuffle"


def test_schedule_spans_the_epochs_and_max_steps_only_stops_early():
    p = planner([10] * 20, global_batch_size=8, epochs=1.5, max_steps=2)
    assert p.steps_per_epoch == 3 and p.schedule_steps == 5 and p.total_steps == 2


def test_example_longer_than_the_micro_batch_budget_is_named():
    with pytest.raises(ValueError, match="example 1 has 150 tokens, more than train.micro_batch_tokens=100"):
        planner([10, 150])


def test_empty_plan_entry_becomes_a_loss_free_padding_micro_batch():
    mb, packed = build_micro_batch([], pad_to=1, pad_token_id=0, device="cpu")
    assert mb.num_tokens == 1 and bool((mb.extras["labels"] == IGNORE_INDEX).all())


def test_loss_token_count_matches_shifted_labels():
    labels = np.array([IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7])
    assert loss_token_count(labels) == 3
