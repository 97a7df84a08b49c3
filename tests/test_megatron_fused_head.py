"""The fused LM head under Megatron: vocabulary parallel over TP (no rank gathers the full logits),
through the pipeline schedule too, and the same training as the plain logits loss.

TP=1 runs in process; TP=2 and PP=2 on two spawned gloo ranks, with the full-logits gather
(``_GatherVocab``) made to fail, so the fused path provably never uses it.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from megatron_harness import megatron_skip_reason, micro_batches, run_workers, single_process_group

pytestmark = pytest.mark.skipif(megatron_skip_reason() is not None, reason=str(megatron_skip_reason()))


def _train_fused(engine) -> dict:
    """As ``test_megatron_engine.train`` but with the SFT loss (fused, vocabulary-parallel head)."""
    from test_megatron_engine import LR, STEP_SEEDS, loss_tokens

    from memento_train.sft.losses import sft_loss_fn

    losses, norms, grads = [], [], None
    for seeds in STEP_SEEDS:
        mbs = micro_batches(seeds)
        mine = mbs[engine.dp_rank :: engine.dp_size]
        denom = loss_tokens(mbs)
        metrics = engine.forward_backward(mine, sft_loss_fn(denom, chunk_rows=16))
        if grads is None:
            grads = engine.full_grads()
        norms.append(engine.step(LR))
        losses.append(sum(m["loss_sum"] for m in metrics) / denom)
    return {"losses": losses, "norms": norms, "grads": grads, "state": engine.full_state_dict()}


def _forward_logprobs(engine) -> list[torch.Tensor]:
    from test_megatron_engine import STEP_SEEDS

    from memento_train.engines.head_stats import token_logprob_fn

    return engine.forward_only(micro_batches(STEP_SEEDS[0]), token_logprob_fn(temperature=0.7, chunk_rows=16))


def _no_logits_gather(*args, **kwargs):
    raise AssertionError("the fused head gathered full logits over tensor parallel")


def _two_rank_job() -> dict:
    from test_megatron_engine import make_engine

    with mock.patch("memento_train.engines.megatron._GatherVocab.forward", _no_logits_gather):
        return {
            "tp2": _train_fused(make_engine(tp=2)),
            "tp2_logprobs": _forward_logprobs(make_engine(tp=2)),
            "pp2_tied": _train_fused(make_engine(pp=2, tied=True)),
            "pp2_logprobs": _forward_logprobs(make_engine(pp=2, tied=True)),
        }


@pytest.fixture(scope="module")
def tp1():
    from test_megatron_engine import make_engine, train

    with single_process_group():
        return {
            "fused": {tied: _train_fused(make_engine(tied=tied)) for tied in (False, True)},
            "plain": {tied: train(make_engine(tied=tied)) for tied in (False, True)},
            "logprobs": _forward_logprobs(make_engine()),
            "logprobs_tied": _forward_logprobs(make_engine(tied=True)),
            "plain_logprobs": _plain_logprobs(make_engine()),
        }


def _plain_logprobs(engine) -> list[torch.Tensor]:
    from test_megatron_engine import STEP_SEEDS

    from memento_train.rl.logprobs import make_logprob_fn

    return engine.forward_only(micro_batches(STEP_SEEDS[0]), make_logprob_fn(temperature=0.7))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_sft_loss_trains_like_the_plain_logits_loss_at_tp1(tp1, tied):
    from test_megatron_engine import assert_runs_match

    assert_runs_match(tp1["fused"][tied], tp1["plain"][tied])


def test_fused_logprobs_equal_the_plain_ones_at_tp1(tp1):
    for got, ref in zip(tp1["logprobs"], tp1["plain_logprobs"]):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def two_ranks():
    return run_workers(_two_rank_job, 2)


@pytest.mark.slow
def test_vocab_parallel_tp2_reproduces_tp1_without_gathering_logits(two_ranks, tp1):
    from test_megatron_engine import assert_runs_match

    assert_runs_match(two_ranks[0]["tp2"], tp1["fused"][False])
    assert two_ranks[1]["tp2"]["losses"] == two_ranks[0]["tp2"]["losses"]
    for rank in two_ranks:
        for got, ref in zip(rank["tp2_logprobs"], tp1["logprobs"]):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fused_head_through_the_pipeline_schedule_reproduces_pp1(two_ranks, tp1):
    from test_megatron_engine import assert_runs_match

    assert_runs_match(two_ranks[0]["pp2_tied"], tp1["fused"][True])
    for rank in two_ranks:
        for got, ref in zip(rank["pp2_logprobs"], tp1["logprobs_tied"]):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
