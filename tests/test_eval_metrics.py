"""memento-eval metrics: pass@k / maj@k hand values and properties, KV cost, aggregation over a
scripted engine's memento-structured responses (blocks, summaries, KV sawtooth)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memento_train.data.stats import KV_GEOMETRY
from memento_train.evaluation.metrics import (
    KVCost,
    SampleResult,
    maj_at_k_solved,
    mean_maj_at_k,
    mean_pass_at_k,
    pass_at_k,
    summarize,
)
from memento_train.evaluation.scripted import ScriptedEngine, memento_response
from memento_train.generation.engine import BlockMaskingConfig, SamplingParams
from memento_train.masking import Kind, kv_bytes_per_token, live_kv_trace, parse
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer
from memento_train.tokens import IM_END, special_token_ids


# -- pass@k ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (10, 3, 5, 1 - 21 / 252),  # C(7,5)=21, C(10,5)=252
        (4, 0, 4, 0.0),
        (4, 4, 1, 1.0),
        (4, 2, 3, 1.0),  # n - c < k: some correct sample is always drawn
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_properties(nck):
    n, c, k = nck
    p = pass_at_k(n, c, k)
    assert 0.0 <= p <= 1.0
    assert p == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-9)
    if k == 1:
        assert p == pytest.approx(c / n)
    if k < n:  # monotone in k
        assert pass_at_k(n, c, k + 1) >= p - 1e-12
    if c < n:  # monotone in c
        assert pass_at_k(n, c + 1, k) >= p - 1e-12
    assert (p == 0.0) == (c == 0)


def test_mean_pass_at_k_averages_over_problems():
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4]
    assert mean_pass_at_k(correct, 1) == pytest.approx((0.25 + 0.5 + 0) / 3)
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)


# -- maj@k -------------------------------------------------------------------------------------------
def test_maj_at_k_first_k_samples_and_ties():
    ids = [0, 1, 1, None]
    correct = [True, False, False, False]
    assert maj_at_k_solved(ids, correct, 1) is True  # only class 0 votes
    assert maj_at_k_solved(ids, correct, 2) is True  # 1-1 tie: the class seen first wins
    assert maj_at_k_solved(ids, correct, 3) is False  # class 1 has two votes
    assert maj_at_k_solved(ids, correct, 4) is False  # None does not vote
    assert maj_at_k_solved([None, None], [False, False], 2) is False
    assert maj_at_k_solved([None, 2, 2], [False, True, True], 3) is True
    with pytest.raises(ValueError):
        maj_at_k_solved(ids, correct, 5)


def test_mean_maj_at_k():
    ids = [[0, 1, 1, None], [0, 0, 1, 1], [None, None, None, None]]
    correct = [[True, False, False, False], [False, False, True, True], [False] * 4]
    assert mean_maj_at_k(ids, correct, 1) == pytest.approx(1 / 3)
    assert mean_maj_at_k(ids, correct, 4) == pytest.approx(0.0)  # problem 2: 2-2 tie -> class 0 (wrong)
    assert mean_maj_at_k(ids, correct, 3) == pytest.approx(0.0)


# -- KV cost -----------------------------------------------------------------------------------------
def test_kv_cost_from_config_and_geometry():
    import transformers

    cfg = transformers.Qwen3Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cost = KVCost.from_hf_config(cfg, dtype_bytes=2, name="x")
    assert cost.bytes_per_token == kv_bytes_per_token(cfg, 2) == 3 * 2 * 16 * 2 * 2
    assert cost.bytes([10]).tolist() == [10 * cost.bytes_per_token]
    q = KVCost.from_geometry(KV_GEOMETRY["qwen3-8b"])
    assert q.bytes_per_token == 36 * 8 * 128 * 2 * 2
    olmo = KVCost.from_geometry(KV_GEOMETRY["olmo-3-7b"])
    per_layer = olmo.bytes_per_token / 32
    # 8 full layers hold all entries, 24 sliding layers at most the window.
    assert olmo.bytes(10_000) == pytest.approx(per_layer * (8 * 10_000 + 24 * 4096))
    assert olmo.bytes(100) == pytest.approx(per_layer * 32 * 100)


# -- aggregation -------------------------------------------------------------------------------------
def _sample(pid, i, *, correct, cls, trace, blocks=0, block_tok=0, summary_tok=0, finish="stop", answer="1"):
    return SampleResult(
        problem_id=pid,
        sample_index=i,
        response="",
        num_tokens=len(trace),
        prompt_tokens=trace[0],
        gold="1",
        answer=answer,
        correct=correct,
        peak_kv=max(trace),
        kv_auc=sum(trace),
        num_blocks=blocks,
        block_tokens=block_tok,
        summary_tokens=summary_tok,
        finish_reason=finish,
        answer_class=cls,
        kv_trace=trace,
        summarized_block_tokens=block_tok,
        summarized_summary_tokens=summary_tok,
    )


def test_summarize_hand_values():
    samples = [
        _sample("a", 0, correct=True, cls=0, trace=[10, 11, 12, 8, 9], blocks=1, block_tok=3, summary_tok=1),
        _sample("a", 1, correct=False, cls=1, trace=[10, 11], finish="length"),
        _sample("b", 1, correct=False, cls=None, trace=[5, 6, 7], answer=None),
        _sample("b", 0, correct=True, cls=0, trace=[5, 6, 7, 4], blocks=2, block_tok=5, summary_tok=2),
    ]
    cost = KVCost("m", bytes_per_token=1000)
    m = summarize(samples, [1, 2], cost)
    assert m["num_problems"] == 2 and m["num_samples"] == 4 and m["samples_per_problem"] == 2
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["pass@2"] == pytest.approx(1.0)
    # maj@1 uses sample 0 of each problem (sorted by sample_index): both correct.
    assert m["maj@1"] == pytest.approx(1.0)
    assert m["maj@2"] == pytest.approx(1.0)  # a: tie -> class 0; b: only class 0 votes
    assert m["answered_frac"] == pytest.approx(0.75)
    assert m["response_tokens_mean"] == pytest.approx((5 + 2 + 3 + 4) / 4)
    assert m["response_tokens_max"] == 5
    assert m["truncated_frac"] == pytest.approx(0.25)
    assert m["blocks_per_response"] == pytest.approx(0.75)
    assert m["responses_with_blocks_frac"] == pytest.approx(0.5)
    assert m["compression_summary_per_block"] == pytest.approx(3 / 8)
    assert m["compression_block_per_summary"] == pytest.approx(8 / 3)
    assert m["peak_kv_tokens_mean"] == pytest.approx((12 + 11 + 7 + 7) / 4)
    assert m["peak_kv_tokens_max"] == 12
    assert m["kv_auc_tokens_mean"] == pytest.approx((50 + 21 + 18 + 22) / 4)
    # Without eviction the trace is trace[0] + i.
    assert m["peak_kv_tokens_mean_no_evict"] == pytest.approx((14 + 11 + 7 + 8) / 4)
    assert m["kv_auc_tokens_mean_no_evict"] == pytest.approx((60 + 21 + 18 + 26) / 4)
    assert m["peak_kv_vs_no_evict"] == pytest.approx(37 / 40)
    assert m["peak_kv_gb_mean"] == pytest.approx(37 / 4 * 1000 / 1e9)
    assert m["peak_kv_gb_max"] == pytest.approx(12 * 1000 / 1e9)
    assert m["kv_auc_gb_tok_mean"] == pytest.approx(111 / 4 * 1000 / 1e9)
    assert m["kv_model"] == "m" and m["kv_bytes_per_token"] == 1000


def test_summarize_without_blocks_or_kv_model():
    m = summarize([_sample("a", 0, correct=False, cls=None, trace=[3, 4], answer=None)], [1], None)
    assert m["compression_summary_per_block"] is None and m["compression_block_per_summary"] is None
    assert m["peak_kv_gb_mean"] is None and m["kv_model"] is None
    assert m["maj@1"] == 0.0 and m["pass@1"] == 0.0


# -- a scripted engine: memento-structured responses through the real parser ---------------------------
@pytest.fixture(scope="module")
def tok():
    return load_shipped_tokenizer()


def _prompt(tok, text="What is 1+1?"):
    s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(s + "<think>\n", add_special_tokens=False)["input_ids"]


def test_scripted_engine_sawtooth_and_counts(tok):
    n_blocks = 3
    engine = ScriptedEngine(tok, lambda prompt, i: memento_response(n_blocks, "2", block_words=20, summary_words=4))
    stop = (tok.convert_tokens_to_ids(IM_END),)
    prompt = _prompt(tok)
    [[res]] = engine.generate([prompt], SamplingParams(max_new_tokens=4000, stop_token_ids=stop))
    assert res.finish_reason == "stop" and res.token_ids[-1] == stop[0]
    assert res.num_blocks == n_blocks
    ids = special_token_ids(tok)
    kinds = np.asarray(res.kinds)
    toks = np.asarray(res.token_ids)
    # Content tokens between the delimiters, counted independently of the parser's kinds.
    text_blocks = [
        tok(" ".join(f"step{b}w{w}" for w in range(20)), add_special_tokens=False)["input_ids"] for b in range(3)
    ]
    assert res.tokens_of(Kind.BLOCK) == sum(len(t) for t in text_blocks)
    assert res.tokens_of(Kind.SUMMARY) > 0
    assert (kinds[toks == ids["<|summary_end|>"]] == Kind.SUMMARY_DELIM).all()
    # The live KV drops right after each <|summary_end|> (the block is evicted before it is consumed).
    trace = np.asarray(res.kv_trace)
    ends = np.flatnonzero(toks == ids["<|summary_end|>"])
    for e in ends:
        assert trace[e + 1] < trace[e]
    assert trace[0] == len(prompt)
    assert res.peak_kv < len(prompt) + res.num_tokens - 1  # eviction lowered the peak
    # The trace is live_kv_trace of the parsed stream, shifted by one (row p + i - 1 produced token i).
    parsed = parse(prompt + res.token_ids, special_token_ids(tok), BlockMaskingConfig().rule(), prompt_len=len(prompt))
    live = live_kv_trace(parsed.kill_row)
    assert res.kv_trace == live[len(prompt) - 1 : -1].tolist()


def test_scripted_engine_no_eviction_is_a_ramp(tok):
    engine = ScriptedEngine(tok, lambda p, i: memento_response(2, "2"), BlockMaskingConfig(enable=False))
    [[res]] = engine.generate([_prompt(tok)], SamplingParams(max_new_tokens=4000))
    t = res.kv_trace
    assert t == list(range(t[0], t[0] + len(t)))
    assert res.num_blocks == 2


def test_scripted_engine_truncates_at_max_new_tokens(tok):
    engine = ScriptedEngine(tok, lambda p, i: memento_response(4, "2"))
    [[a, b]] = engine.generate([_prompt(tok)], SamplingParams(max_new_tokens=50, n=2))
    assert a.finish_reason == b.finish_reason == "length" and a.num_tokens == 50


def test_metrics_from_scripted_generations(tok):
    """Compression and blocks per response come out of the engine's kinds exactly."""
    blocks_of = {0: 1, 1: 2, 2: 4, 3: 0}
    engine = ScriptedEngine(tok, lambda p, i: memento_response(blocks_of[i], str(i), block_words=40, summary_words=5))
    results = engine.generate([_prompt(tok)], SamplingParams(max_new_tokens=5000, n=4))[0]
    samples = [
        SampleResult.from_generation(
            r, problem_id="p", sample_index=i, response="", gold="0", answer=str(i), correct=i == 0, answer_class=i
        )
        for i, r in enumerate(results)
    ]
    m = summarize(samples, [1, 4], KVCost.from_geometry(KV_GEOMETRY["qwen3-8b"]))
    assert m["blocks_per_response"] == pytest.approx(7 / 4)
    block = sum(r.tokens_of(Kind.BLOCK) for r in results)
    summ = sum(r.tokens_of(Kind.SUMMARY) for r in results)
    assert m["compression_summary_per_block"] == pytest.approx(summ / block)
    assert 0 < m["compression_summary_per_block"] < 0.5
    assert m["peak_kv_vs_no_evict"] < 1.0 and m["kv_auc_vs_no_evict"] < 1.0
    assert m["pass@1"] == 0.25 and m["pass@4"] == 1.0 and m["maj@1"] == 1.0 and m["maj@4"] == 1.0
    assert m["peak_kv_gb_max"] == pytest.approx(max(r.peak_kv for r in results) * 147456 / 1e9)


def test_compression_counts_complete_blocks_only(tok):
    """A block cut off by max_new_tokens (no summary yet) stays out of the compression ratio."""
    from memento_train.evaluation.metrics import complete_block_tokens
    from memento_train.masking import SpecialTokens

    special = SpecialTokens.from_mapping(special_token_ids(tok))
    full = memento_response(3, "1", block_words=30, summary_words=5)
    engine = ScriptedEngine(tok, lambda p, i: full)
    prompt = _prompt(tok)
    [[done]] = engine.generate([prompt], SamplingParams(max_new_tokens=5000))
    assert complete_block_tokens(done, special) == (done.tokens_of(Kind.BLOCK), done.tokens_of(Kind.SUMMARY))
    # Cut inside the third block: two complete blocks remain, the third block's tokens are open.
    cut = full.index("step2w20")
    engine = ScriptedEngine(tok, lambda p, i: full[:cut])
    [[part]] = engine.generate([prompt], SamplingParams(max_new_tokens=5000))
    blocks, summaries = complete_block_tokens(part, special)
    assert part.tokens_of(Kind.BLOCK) > blocks > 0
    assert summaries == part.tokens_of(Kind.SUMMARY)
    assert blocks * 3 == done.tokens_of(Kind.BLOCK) * 2  # equal-length blocks
    samples = [
        SampleResult.from_generation(
            r, problem_id="p", sample_index=i, response="", gold="1", answer=None, correct=False, special=special
        )
        for i, r in enumerate([done, part])
    ]
    m = summarize(samples, [1], None)
    assert m["compression_summary_per_block"] == pytest.approx(
        (done.tokens_of(Kind.SUMMARY) + summaries) / (done.tokens_of(Kind.BLOCK) + blocks)
    )
    assert m["block_tokens_total"] == done.tokens_of(Kind.BLOCK) + part.tokens_of(Kind.BLOCK)
