"""THE proof (docs/architecture.md §2, §6): masked packed training forward == evicting incremental decode.

For tiny random Qwen3 (mask_delimiters=false), Phi-3 (mask_delimiters=true) and Olmo 3 (sliding and
full layers, window 8 < block length) in float64, several synthetic Memento documents (well-formed,
truncated inside an open block, multi-turn with an explicit prompt_len, malformed) are

* packed into one batch and run once through the stock HF model with ``memento_segment`` (and
  ``memento_sdpa``) attention, masked by ``masking.parse(...).kill_row``;
* decoded one token at a time with :func:`teacher_forced_logits`: physical eviction of KV entries
  from the cache before each row, logical RoPE positions;

and the logits must agree to ``1e-10``. The decode's cache must really shrink, and eviction must
really change the logits (otherwise the comparison would prove nothing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_ids import ASSISTANT, BE, BS, ETHINK, IM_END, IM_START, NL, SE, SPECIAL, SS, THINK, USER  # noqa: F401

from memento_train.attention import MementoAttentionMeta, attn_implementation
from memento_train.generation import (
    BATCHED_DECODE_ATTN,
    BatchedEvictingCache,
    EvictingDecoder,
    register_batched_decode_attention,
    teacher_forced_logits,
)
from memento_train.masking import BlockMaskingConfig, kv_bytes_per_token, live_kv_trace, parse

TOL64 = 1e-10
FAMILIES = {"qwen3": False, "phi3": True, "olmo3": False}  # family -> mask_delimiters


def _words(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(20, 128, size=n).tolist()


def _user_turn(rng, q_len: int) -> list[int]:
    return [IM_START, USER, NL, *_words(rng, q_len), IM_END, NL]


def _assistant_turn(rng, block_lens, summary_lens, *, answer_len=0, gap=(), close=True) -> list[int]:
    ids = [IM_START, ASSISTANT, NL, THINK, NL]
    for i, (b, s) in enumerate(zip(block_lens, summary_lens)):
        ids += [BS, *_words(rng, b), BE]
        ids += [NL] * (i in gap)  # tokens between block_end and summary_start are never evicted
        ids += [SS, *_words(rng, s), SE, NL]
    if close:
        ids += [ETHINK, NL, *_words(rng, answer_len), IM_END]
    return ids


def memento_documents() -> list[tuple[list[int], int | None]]:
    """(ids, prompt_len) of four ChatML-shaped Memento documents, 40-120 tokens each."""
    rng = np.random.default_rng(1234)
    docs = []
    # 1. well-formed, three blocks, answer.
    docs.append((_user_turn(rng, 6) + _assistant_turn(rng, [12, 10, 14], [4, 5, 3], answer_len=5, gap=(1,)), None))
    # 2. truncated inside an open block: two complete blocks, the third never closes.
    ids = _user_turn(rng, 5) + _assistant_turn(rng, [11, 13], [4, 3], close=False)
    docs.append((ids + [BS, *_words(rng, 9)], None))
    # 3. multi-turn: a block of the first assistant turn sits in the prompt (tracked, evicts nothing);
    #    evictions start after the second assistant header (explicit prompt_len).
    first = _user_turn(rng, 4) + _assistant_turn(rng, [9], [3], answer_len=2) + [NL]
    second_user = _user_turn(rng, 4)
    prompt_len = len(first) + len(second_user) + 2  # right after the second 'assistant' token
    docs.append((first + second_user + _assistant_turn(rng, [10, 9], [3, 4], answer_len=3), prompt_len))
    # 4. malformed rollout: stray summary_end, nested block, summary_start without block, stray block_end.
    ids = _user_turn(rng, 3) + [IM_START, ASSISTANT, NL, THINK, SE, SS, *_words(rng, 2)]
    ids += [BS, *_words(rng, 4), BS, *_words(rng, 5), BE, *_words(rng, 3), BE, SS, *_words(rng, 3), SE]
    ids += [BE, SS, *_words(rng, 2), SE, BS, *_words(rng, 8), BE, SS, *_words(rng, 2), SE, *_words(rng, 4)]
    docs.append((ids, None))
    for ids, _ in docs:
        assert 40 <= len(ids) <= 120, len(ids)
    return docs


DOCS = memento_documents()
# keep_last_block_for_answer is defined with N <= 0 only (BlockMaskingConfig rejects N > 0).
CONFIGS = [(n, kl4a) for n in (-1, 0, 1, 2) for kl4a in (False, True) if not (kl4a and n > 0)]


def packed_logits(model, docs, kill_rows, backend: str) -> list[torch.Tensor]:
    """One packed forward (batch size 1, positions restart per document); logits split per document."""
    meta = MementoAttentionMeta.from_documents(kill_rows)
    ids = torch.tensor([t for d, _ in docs for t in d])
    pos = torch.cat([torch.arange(len(d)) for d, _ in docs])
    model.set_attn_implementation(attn_implementation(backend))
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None], position_ids=pos[None], memento_meta=meta, use_cache=False).logits[0]
    finally:
        model.set_attn_implementation("sdpa")
    return list(out.split([len(d) for d, _ in docs]))


def run_parity(model, mask_config: BlockMaskingConfig):
    parsed = [parse(d, SPECIAL, mask_config, prompt_len=pl) for d, pl in DOCS]
    kill_rows = [p.kill_row for p in parsed]
    train = packed_logits(model, DOCS, kill_rows, "segment")
    decoded = [teacher_forced_logits(model, d, SPECIAL, mask_config, prompt_len=pl) for d, pl in DOCS]
    return parsed, train, decoded


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, make_tiny_lm):
    return request.param, make_tiny_lm(request.param, dtype=torch.float64)


@pytest.mark.parametrize(
    "keep_last_n_blocks,keep_last_block_for_answer", CONFIGS, ids=[f"N{n}{'-kl4a' if k else ''}" for n, k in CONFIGS]
)
def test_training_forward_equals_evicting_decode(
    family_model, keep_last_n_blocks, keep_last_block_for_answer, record_property
):
    family, model = family_model
    cfg = BlockMaskingConfig(
        keep_last_n_blocks=keep_last_n_blocks,
        mask_delimiters=FAMILIES[family],
        keep_last_block_for_answer=keep_last_block_for_answer,
    )
    parsed, train, decoded = run_parity(model, cfg)
    sdpa = packed_logits(model, DOCS, [p.kill_row for p in parsed], "sdpa")
    bpt = kv_bytes_per_token(model.config, dtype_bytes=8)
    worst = 0.0
    for i, (p, t, s, (logits, trace)) in enumerate(zip(parsed, train, sdpa, decoded)):
        assert logits.shape == t.shape
        diff = (logits - t).abs().max().item()
        worst = max(worst, diff)
        assert diff < TOL64, f"{family} doc {i} {cfg}: max |Δlogits| = {diff:.3e}"
        assert (s - t).abs().max().item() < TOL64, f"{family} doc {i}: memento_sdpa != memento_segment"
        # The cache held exactly the live keys of the rule, and storage matched them byte for byte.
        np.testing.assert_array_equal(trace.entries, live_kv_trace(p.kill_row))
        np.testing.assert_array_equal(trace.nbytes, trace.entries * bpt)
        for ev in trace.evictions:  # every eviction with >= 2 fresh keys shrinks the cache
            fresh = int(((p.kill_row[ev.start : ev.stop]) == ev.row).sum())
            if fresh >= 2:
                assert trace.nbytes[ev.row] < trace.nbytes[ev.row - 1]
        if keep_last_n_blocks == 0 and not keep_last_block_for_answer and i in (0, 1):
            # Single-turn documents: every complete block dies at its own summary_end, and the cache
            # is smaller after consuming that summary_end than before it.
            complete = [b for b in p.blocks if b.complete]
            assert complete and all(b.evicted_at == b.summary_end for b in complete)
            assert all(trace.nbytes[b.summary_end] < trace.nbytes[b.summary_end - 1] for b in complete)
    if keep_last_n_blocks >= 0:
        assert any(p.evictions for p in parsed), "configuration evicted nothing: the test would be vacuous"
    record_property("max_abs_diff", worst)
    print(f"\nPARITY {family} float64 N={keep_last_n_blocks} kl4a={keep_last_block_for_answer}: max|Δ|={worst:.3e}")


def test_eviction_changes_logits(family_model):
    """Not vacuous: with eviction, logits after the first eviction differ from plain causal decoding."""
    family, model = family_model
    evict = BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=FAMILIES[family])
    never = BlockMaskingConfig(keep_last_n_blocks=-1, mask_delimiters=FAMILIES[family])
    ids, pl = DOCS[0]
    first = min(ev.row for ev in parse(ids, SPECIAL, evict).evictions)
    a, ta = teacher_forced_logits(model, ids, SPECIAL, evict, prompt_len=pl)
    b, tb = teacher_forced_logits(model, ids, SPECIAL, never, prompt_len=pl)
    assert (a[:first] - b[:first]).abs().max().item() < TOL64  # identical until the first eviction
    assert (a[first:] - b[first:]).abs().max().item() > 1e-3
    assert ta.peak_bytes < tb.peak_bytes and ta.nbytes[-1] < tb.nbytes[-1]


def test_float32_parity_for_information(family_model, make_tiny_lm, record_property):
    """Same comparison in float32 (the precision used on CPU training runs): loose bound, recorded."""
    family, _ = family_model
    model = make_tiny_lm(family, dtype=torch.float32)
    cfg = BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=FAMILIES[family])
    _, train, decoded = run_parity(model, cfg)
    worst = max((lg - t).abs().max().item() for t, (lg, _) in zip(train, decoded))
    record_property("max_abs_diff_float32", worst)
    print(f"\nPARITY {family} float32 N=0: max|Δ|={worst:.3e}")
    assert worst < 1e-4


# -- the decoder and the cache themselves ---------------------------------------------------------
def test_feed_equals_step_by_step(make_tiny_lm):
    """``feed`` (one forward per run between eviction rows) == one token at a time, trace included."""
    model = make_tiny_lm("olmo3")
    cfg = BlockMaskingConfig(keep_last_n_blocks=1)
    for ids, pl in DOCS:
        ref, ref_trace = teacher_forced_logits(model, ids, SPECIAL, cfg, prompt_len=pl)
        dec = EvictingDecoder(model, SPECIAL, cfg, prompt_len=pl)
        split = len(ids) // 3
        out = torch.cat([dec.feed(ids[:split]), dec.feed(ids[split:])])
        assert (out - ref).abs().max().item() < TOL64
        np.testing.assert_array_equal(dec.trace().entries, ref_trace.entries)
        np.testing.assert_array_equal(dec.trace().nbytes, ref_trace.nbytes)
    assert model.config._attn_implementation == "sdpa", "decoder must restore the attention implementation"


def test_cache_without_eviction_equals_stock_forward(make_tiny_lm):
    """Prefill then one token at a time through the evicting cache, no eviction == stock sdpa forward."""
    model = make_tiny_lm("olmo3")
    ids = DOCS[0][0]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        cache = BatchedEvictingCache(config=model.config, growth=1)
        register_batched_decode_attention()
        model.set_attn_implementation(BATCHED_DECODE_ATTN)
        try:
            chunks = [ids[:20]] + [[t] for t in ids[20:]]
            outs = []
            for chunk in chunks:
                input_ids, position_ids = cache.prepare_inputs([chunk])
                outs.append(
                    model(
                        input_ids=input_ids,
                        position_ids=position_ids,
                        past_key_values=cache,
                        use_cache=True,
                        memento_cache=cache,
                    ).logits[0]
                )
        finally:
            model.set_attn_implementation("sdpa")
    got = torch.cat(outs)
    assert (got - ref).abs().max().item() < TOL64
    assert cache.lengths == [len(ids)] and cache.row_positions(0) == list(range(len(ids)))


def test_decode_attention_needs_the_cache(make_tiny_lm):
    model = make_tiny_lm("qwen3")
    register_batched_decode_attention()
    model.set_attn_implementation(BATCHED_DECODE_ATTN)
    try:
        with pytest.raises(ValueError, match="memento_cache"):
            model(input_ids=torch.tensor([[5, 6]]), use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")


def test_empty_stream(make_tiny_lm):
    model = make_tiny_lm("qwen3")
    logits, trace = teacher_forced_logits(model, [], SPECIAL, BlockMaskingConfig())
    assert logits.shape == (0, 128) and trace.entries.size == 0
