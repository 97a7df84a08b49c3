"""ReferenceGenerator and its parts: sampling semantics, stopping, the block cap, KV accounting, the cache.

Tiny random Qwen3 (vocab of the shipped tokenizer) in float64; Memento responses are built from the
shipped tokenizer's special ids and plain word ids and teacher-forced, since a random model rarely
emits memento tokens by itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memento_train.generation import (
    BatchedEvictingCache,
    BlockMaskingConfig,
    GenerationEngine,
    ReferenceGenerator,
    SamplingParams,
    SequenceRequest,
    derive_seed,
    filter_logits,
    make_generator,
    sample_next,
    token_logprobs,
)
from memento_train.masking import Kind, kv_bytes_per_token, live_kv_trace, parse
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer
from memento_train.tokens import special_token_ids

TOK = load_shipped_tokenizer()
IDS = special_token_ids(TOK)
BS, BE, SS, SE = (IDS[t] for t in ("<|block_start|>", "<|block_end|>", "<|summary_start|>", "<|summary_end|>"))
THINK, ETHINK, IM_END = IDS["<think>"], IDS["</think>"], IDS["<|im_end|>"]
NL = TOK.encode("\n", add_special_tokens=False)[0]
W = TOK.encode(
    " the cat sat on a mat and then it ran to the big red barn where a dog slept all day long "
    "while the sun shone over fields of corn and wheat",
    add_special_tokens=False,
)
PROMPT = TOK(
    TOK.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True),
    add_special_tokens=False,
)["input_ids"]
PROMPT2 = TOK(
    TOK.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True
    ),
    add_special_tokens=False,
)["input_ids"]
# Three blocks with summaries, then the answer.
MEMENTO = [
    THINK,
    NL,
    BS,
    *W[:30],
    BE,
    SS,
    *W[:6],
    SE,
    NL,
    BS,
    *W[3:28],
    BE,
    NL,
    SS,
    *W[:5],
    SE,
    NL,
    BS,
    *W[5:25],
    BE,
    SS,
    *W[1:5],
    SE,
    NL,
    ETHINK,
    *W[:4],
    IM_END,
]


@pytest.fixture(scope="module")
def model(make_tiny_lm):
    m = make_tiny_lm("qwen3", dtype=torch.float64, vocab_size=2048)
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)  # peaked, realistic next-token distributions
    return m


def gen_for(model, **bm) -> ReferenceGenerator:
    return ReferenceGenerator(model, TOK, BlockMaskingConfig(**bm), track_storage=True)


# -- sampling ------------------------------------------------------------------------------------
def test_sampling_params_validation():
    for bad, word in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(n=0), "n"),
    ]:
        with pytest.raises(ValueError, match=word):
            SamplingParams(**bad)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    with pytest.raises(ValueError, match="max_block_tokens"):
        BlockMaskingConfig(max_block_tokens=0)


P4 = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
L4 = P4.log()


def kept(logits) -> list[int]:
    return torch.nonzero(torch.isfinite(logits[0])).flatten().tolist()


def test_filters_hand_computed():
    assert kept(filter_logits(L4, top_k=2)) == [0, 1]
    assert kept(filter_logits(L4, top_k=0)) == [0, 1, 2, 3]
    assert kept(filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=1)) == [1, 2]  # ties with the k-th kept
    # top-p: ascending cumulative mass [0.05, 0.2, 0.5, 1.0]; drop what is <= 1 - p.
    assert kept(filter_logits(L4, top_p=0.9)) == [0, 1, 2]
    assert kept(filter_logits(L4, top_p=0.7)) == [0, 1]
    assert kept(filter_logits(L4, top_p=0.4)) == [0]
    assert kept(filter_logits(L4, top_p=0.01)) == [0]  # the most likely token always survives
    # min-p: threshold min_p * 0.5.
    assert kept(filter_logits(L4, min_p=0.2)) == [0, 1, 2]
    assert kept(filter_logits(L4, min_p=0.5)) == [0, 1]
    # top-p after top-k works on the renormalised survivors: [0.625, 0.375] -> drop 0.375 for p=0.6.
    assert kept(filter_logits(L4, top_k=2, top_p=0.6)) == [0]
    assert kept(filter_logits(L4, top_p=0.6)) == [0, 1]  # without top-k: ascending [.05,.2,.5,1], drop <= .4
    # surviving logits are unchanged (no renormalisation inside the logits)
    assert torch.equal(filter_logits(L4, top_k=2)[0, :2], L4[0, :2])


def test_logprobs_are_pre_truncation_and_temperature_scaled():
    tok = torch.tensor([0])
    assert math.isclose(token_logprobs(L4, tok, 1.0).item(), math.log(0.5), rel_tol=1e-12)
    assert math.isclose(token_logprobs(L4, tok, 0.0).item(), math.log(0.5), rel_tol=1e-12)  # greedy: T=1
    t2 = torch.log_softmax(L4 / 2.0, -1)[0, 0].item()
    assert math.isclose(token_logprobs(L4, tok, 2.0).item(), t2, rel_tol=1e-12)
    # top_k=1 forces the argmax, but the reported log-prob is still log 0.5 (not 0).
    toks, lps = sample_next(L4, SamplingParams(top_k=1, seed=0), [make_generator(0)])
    assert toks.tolist() == [0] and math.isclose(lps.item(), math.log(0.5), rel_tol=1e-12)
    toks, lps = sample_next(L4, SamplingParams(temperature=0), None)
    assert toks.tolist() == [0] and math.isclose(lps.item(), math.log(0.5), rel_tol=1e-12)


def test_sampling_frequencies_and_determinism():
    n = 4000
    logits = L4.expand(n, -1)
    params = SamplingParams(top_k=3, seed=0)
    toks, _ = sample_next(logits, params, [make_generator(s) for s in range(n)])
    freq = np.bincount(toks.numpy(), minlength=4) / n
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.03)
    again, _ = sample_next(logits, params, [make_generator(s) for s in range(n)])
    assert torch.equal(toks, again)
    # A row's draw does not depend on the other rows of the batch.
    alone, _ = sample_next(logits[:1], params, [make_generator(17)])
    assert alone.item() == toks[17].item()


def test_derive_seed():
    assert derive_seed(1, 0, 0) == derive_seed(1, 0, 0)
    seeds = {derive_seed(s, p, k) for s in (1, 2) for p in range(3) for k in range(3)}
    assert len(seeds) == 18 and all(0 <= s < 2**63 for s in seeds)


# -- the generator -------------------------------------------------------------------------------
def test_protocol_shapes_and_errors(model):
    gen = gen_for(model)
    assert isinstance(gen, GenerationEngine)
    out = gen.generate([PROMPT, PROMPT2], SamplingParams(max_new_tokens=3, n=2, seed=0))
    assert [len(g) for g in out] == [2, 2]
    assert all(r.prompt_ids == p and r.num_tokens == 3 for g, p in zip(out, [PROMPT, PROMPT2]) for r in g)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="forced prefixes"):
        gen.generate([PROMPT], SamplingParams(), forced_token_ids=[[1], [2]])
    with pytest.raises(ValueError, match="non-empty"):
        gen.teacher_force([PROMPT], [[]])
    with pytest.raises(TypeError):
        ReferenceGenerator(model, 42)


def test_greedy_is_deterministic(model):
    gen = gen_for(model, enable=False)  # plain causal: comparable with a stock forward below
    params = SamplingParams(temperature=0, max_new_tokens=12, n=2)
    a = gen.generate([PROMPT, PROMPT2], params)
    b = gen.generate([PROMPT, PROMPT2], params)
    for ga, gb in zip(a, b):
        assert ga[0].token_ids == ga[1].token_ids == gb[0].token_ids
        assert ga[0].logprobs == gb[1].logprobs
    r = a[0][0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT + r.token_ids]), use_cache=False).logits[0, len(PROMPT) - 1 : -1]
    assert logits.argmax(-1).tolist() == r.token_ids  # greedy = argmax; log-prob at T=1
    np.testing.assert_allclose(r.logprobs, torch.log_softmax(logits, -1).amax(-1).numpy(), rtol=0, atol=1e-9)


def test_seeds_reproducible(model):
    gen = gen_for(model)
    run = lambda seed: gen.generate([PROMPT], SamplingParams(max_new_tokens=16, n=3, seed=seed))[0]  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert len({tuple(r.token_ids) for r in a}) > 1  # samples of one prompt differ
    assert [r.extra["seed"] for r in a] == [derive_seed(1, 0, k) for k in range(3)]
    assert [r.token_ids for r in run(None)] != [r.token_ids for r in run(None)]


def test_stop_tokens_and_length(model):
    gen = gen_for(model)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    ref = gen.generate([PROMPT], greedy)[0][0]
    assert ref.finish_reason == "length" and ref.num_tokens == 10
    i = next(i for i in range(1, 10) if ref.token_ids[i] not in ref.token_ids[:i])
    stop = ref.token_ids[i]
    out = gen.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop,)))[0][0]
    assert out.token_ids == ref.token_ids[: i + 1] and out.finish_reason == "stop"
    assert out.logprobs == ref.logprobs[: i + 1]
    # Default stop: the tokenizer's <|im_end|>; a teacher-forced response ends there.
    tf = gen.teacher_force([PROMPT], [[*W[:3], IM_END, *W[:3]]])[0]
    assert tf.token_ids == [*W[:3], IM_END] and tf.finish_reason == "stop"
    assert gen.teacher_force([PROMPT], [W[:3]])[0].finish_reason == "length"


def replay_cap(prompt, response, cap):
    """Indices of response tokens the serving overlay's block cap forces (flat scan, delimiters excluded)."""
    in_block, count, forced = False, 0, []
    for pos, tok in enumerate([*prompt, *response]):
        if pos >= len(prompt) and in_block and count >= cap:
            forced.append(pos - len(prompt))
        if tok == BS:
            in_block, count = True, 0
        elif tok == BE:
            in_block, count = False, 0
        elif in_block and tok not in (SS, SE):
            count += 1
    return forced


def test_max_block_tokens_forces_block_end_and_flags_each_forced_token(model):
    prefix = [THINK, NL, BS, *W[:3]]
    params = SamplingParams(max_new_tokens=20, n=2, seed=4)
    results = gen_for(model, max_block_tokens=5).generate([PROMPT], params, forced_token_ids=[prefix])[0]
    for r in results:
        forced = replay_cap(PROMPT, r.token_ids, 5)
        assert forced and forced[0] == len(prefix) + 2  # 3 content tokens in the prefix, 2 sampled
        assert all(r.token_ids[i] == BE for i in forced) and r.forced_block_ends == len(forced)
        assert r.kinds[forced[0]] == Kind.BLOCK_DELIM and r.token_ids[: len(prefix)] == prefix
        # The per-token flag marks exactly the tokens the cap inserted (not the teacher-forced ones).
        assert [i for i, f in enumerate(r.forced) if f] == forced and len(r.forced) == r.num_tokens
    # The cap belongs to block masking: disabled with it, like the overlay's logits processor.
    off = gen_for(model, enable=False, max_block_tokens=5).generate([PROMPT], params, forced_token_ids=[prefix])[0]
    assert all(r.forced_block_ends == 0 and not any(r.forced) for r in off)


@pytest.mark.parametrize("keep,kl4a", [(0, False), (1, False), (0, True), (-1, False)])
def test_kv_trace_kinds_and_bytes_follow_the_parser(model, keep, kl4a):
    gen = gen_for(model, keep_last_n_blocks=max(keep, 0), enable=keep >= 0, keep_last_block_for_answer=kl4a)
    cut = MEMENTO.index(SE, MEMENTO.index(SE) + 1) + 4  # two complete blocks, then sampling
    requests = [SequenceRequest(PROMPT, MEMENTO), SequenceRequest(PROMPT2, MEMENTO[:cut], max_new_tokens=cut + 12)]
    results = gen.run(requests, SamplingParams(seed=0, max_new_tokens=len(MEMENTO)))
    bpt = kv_bytes_per_token(model.config, dtype_bytes=8)
    for r in results:
        p, full = len(r.prompt_ids), r.prompt_ids + r.token_ids
        parsed = parse(full, IDS, gen.mask_config, prompt_len=p)
        assert r.kv_trace == live_kv_trace(parsed.kill_row)[p - 1 : p - 1 + r.num_tokens].tolist()
        assert r.kinds == parsed.kinds[p:].tolist()
        assert r.kv_bytes == [n * bpt for n in r.kv_trace]
        assert [e[0] for e in r.extra["evictions"]] == [ev.row for ev in parsed.evictions]
    assert results[0].token_ids == MEMENTO and results[0].finish_reason == "stop"
    if keep < 0:
        assert results[0].kv_trace == list(range(len(PROMPT), len(PROMPT) + len(MEMENTO)))


def test_live_kv_storage_drops_after_summary_end(model):
    """keep_last_n_blocks=0, teacher-forced: the cache's allocated K/V storage (untyped_storage bytes)
    is smaller right after each <|summary_end|> is consumed than right before."""
    r = gen_for(model, keep_last_n_blocks=0).teacher_force([PROMPT], [MEMENTO])[0]
    storage = r.extra["cache_storage_bytes"]
    ends = [i for i, t in enumerate(MEMENTO) if t == SE]
    assert len(ends) == 3
    bpt = kv_bytes_per_token(model.config, dtype_bytes=8)
    for i in ends:  # token i is consumed by the forward that produces token i + 1
        assert storage[i + 1] < storage[i] and r.kv_bytes[i + 1] < r.kv_bytes[i]
        # exactly the evicted entries were released (the new token's entry is the + bpt)
        assert storage[i] - storage[i + 1] == r.kv_bytes[i] - r.kv_bytes[i + 1] + bpt
        assert 0 <= storage[i + 1] - r.kv_bytes[i + 1] < 64 * bpt  # live entries + fewer than `growth` spares
    assert (
        max(storage)
        < gen_for(model, keep_last_n_blocks=-1).teacher_force([PROMPT], [MEMENTO])[0].extra["cache_storage_bytes"][-1]
    )


def test_enable_false_never_evicts_and_equals_plain_causal_forward(model):
    gen = gen_for(model, enable=False)
    r = gen.teacher_force([PROMPT], [MEMENTO])[0]
    assert not r.extra["evictions"] and r.kv_trace == list(range(len(PROMPT), len(PROMPT) + len(MEMENTO)))
    assert all(b >= a for a, b in zip(r.extra["cache_storage_bytes"], r.extra["cache_storage_bytes"][1:]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT + MEMENTO]), use_cache=False).logits[0]
    ref = torch.log_softmax(logits[len(PROMPT) - 1 : -1], -1).gather(-1, torch.tensor(MEMENTO)[:, None])[:, 0]
    assert (torch.tensor(r.logprobs, dtype=torch.float64) - ref).abs().max().item() < 1e-9


# -- the batched cache ---------------------------------------------------------------------------
def test_batched_cache_evicts_compacts_selects_and_extends():
    cache = BatchedEvictingCache(2, growth=4)
    torch.manual_seed(0)

    def feed(rows, positions=None):
        ids, pos = cache.prepare_inputs(rows, positions)
        b, t = ids.shape
        kv = torch.randn(b, 2, t, 3, dtype=torch.float64)
        for layer in range(2):
            cache.update(kv + layer, kv - layer, layer)
        return ids, pos, kv

    ids, pos, kv = feed([[5, 6, 7, 8, 9, 10], [5, 6, 7]])  # ragged prefill, left padded
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10], [0, 0, 0, 5, 6, 7]] and pos[1].tolist() == [0, 0, 0, 0, 1, 2]
    assert cache.lengths == [6, 3] and cache.row_positions(1) == [0, 1, 2]
    assert torch.equal(cache.layers[1].keys[1, :, :3], kv[1, :, 3:] + 1)
    mask = cache.attention_mask(None)[:, 0]  # [B, T, C]
    assert mask[1, 3].tolist()[:6] == [True, False, False, False, False, False]  # row 1, first real token
    assert mask[1, 0, :3].all() and not mask[1, 0, 3:].any()  # padding queries see the row's valid keys
    feed([[11], [8]])
    before = cache.nbytes()
    layer_storage = sum(x.untyped_storage().nbytes() for layer in cache.layers for x in (layer.keys, layer.values))
    assert before == layer_storage == 2 * 2 * 2 * 2 * cache.capacity * 3 * 8  # layers, K+V, rows, heads
    row0 = cache.layers[0].keys[0].clone()
    cache.evict(0, 1, 5)  # positions 1..4 of row 0
    assert cache.compact() == 4
    assert cache.row_positions(0) == [0, 5, 6] and cache.row_positions(1) == [0, 1, 2, 3]
    assert cache.capacity == 4 + 3 and cache.nbytes() < before  # longest live row + its 3 spare slots
    assert torch.equal(cache.layers[0].keys[0, :, :3], row0[:, [0, 5, 6]])
    assert cache.attention_mask(None) is not None and cache.next_pos == [7, 4]
    ids, pos, _ = feed([[12], [9]])
    assert pos[:, -1].tolist() == [7, 4]  # logical positions continue after eviction
    cache.select([1])
    assert cache.lengths == [5] and cache.capacity == 7 and cache.next_pos == [5]
    other = BatchedEvictingCache(2)
    other.prepare_inputs([[1, 2]])
    for layer in range(2):
        other.update(torch.zeros(1, 2, 2, 3, dtype=torch.float64), torch.zeros(1, 2, 2, 3, dtype=torch.float64), layer)
    cache.extend(other)
    assert cache.lengths == [5, 2] and cache.row_positions(1) == [0, 1] and cache.layers[0].keys.shape[0] == 2
    with pytest.raises(ValueError, match="increase"):
        cache.prepare_inputs([[1], [2]], [[3], [9]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generator_on_gpu_matches_cpu(make_tiny_lm):
    """The same teacher-forced log-probs (and eviction) on CUDA as on CPU, float32."""
    cpu = make_tiny_lm("qwen3", dtype=torch.float32, vocab_size=2048)
    gpu = make_tiny_lm("qwen3", dtype=torch.float32, vocab_size=2048).cuda()
    a = gen_for(cpu, keep_last_n_blocks=0).teacher_force([PROMPT, PROMPT2], [MEMENTO, MEMENTO[:40]])
    b = gen_for(gpu, keep_last_n_blocks=0).teacher_force([PROMPT, PROMPT2], [MEMENTO, MEMENTO[:40]])
    for x, y in zip(a, b):
        assert x.kv_trace == y.kv_trace and np.max(np.abs(np.subtract(x.logprobs, y.logprobs))) < 1e-4
    s = gen_for(gpu, keep_last_n_blocks=0).generate([PROMPT], SamplingParams(max_new_tokens=8, n=2, seed=0))
    assert all(r.num_tokens == 8 for r in s[0])
