"""vLLM 0.32 + the Memento plugin against the reference engine, exactly (fp32, warmed tiny policy).

One engine serves every configuration: each request carries its own eviction options. Checked per
sequence: token ids, log-probs (|Δ| < 1e-4), the eviction events ``(row, start, stop)``, the
physical KV length each token's step attended over, the tokens the block cap forced, kinds and
finish reason; for ``keep_last_n_blocks`` 0/1/2, ``mask_delimiters`` both ways,
``keep_last_block_for_answer`` and the block cap, on single-turn prompts and on multi-turn prompts
whose earlier turn holds completed blocks (compacted at ``prompt_len``), greedy and seeded sampling.
The negative control (the same bookkeeping, KV kept) must diverge from the reference.
"""

from __future__ import annotations

import pytest
import vllm_harness as vh

from memento_train.generation import BlockMaskingConfig, ReferenceGenerator, SamplingParams, SequenceRequest

pytestmark = pytest.mark.skipif(vh.plugin_skip_reason() is not None, reason=str(vh.plugin_skip_reason()))

CONFIGS = {
    "k0": BlockMaskingConfig(keep_last_n_blocks=0),
    "k1": BlockMaskingConfig(keep_last_n_blocks=1),
    "k2": BlockMaskingConfig(keep_last_n_blocks=2),
    "k0-delims": BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=True),
    "k1-delims": BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True),
    "answer": BlockMaskingConfig(keep_last_n_blocks=0, keep_last_block_for_answer=True),
    "cap": BlockMaskingConfig(keep_last_n_blocks=0, max_block_tokens=6),
    "cap-k1-delims": BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True, max_block_tokens=6),
}
GREEDY = SamplingParams(max_new_tokens=128, temperature=0.0)
SAMPLED = {
    "t1": SamplingParams(max_new_tokens=128, temperature=1.0, n=2, seed=7),
    "t07-topk-topp": SamplingParams(max_new_tokens=128, temperature=0.7, top_k=20, top_p=0.9, n=2, seed=11),
}
SAMPLED_CONFIGS = ("k0", "k1-delims", "cap-k1-delims")


@pytest.fixture(scope="module")
def setup():
    tok = vh.tokenizer()
    prompts = vh.single_turn_prompts(tok, 6) + vh.multi_turn_prompts(tok, 3)
    engine = vh.start_engine()
    yield tok, prompts, engine, vh.reference_model()
    engine.shutdown()


def _requests(prompts, params: SamplingParams, configs):
    """One request per (config, prompt, sample), seeded as the reference seeds sequence (p, s)."""
    reqs, extra, keys = [], [], []
    for name in configs:
        for p, prompt in enumerate(prompts):
            for s in range(params.n):
                reqs.append(SequenceRequest(prompt, prompt_index=p, sample_index=s))
                extra.append(vh.memento_args(CONFIGS[name]))
                keys.append((name, p, s))
    return reqs, extra, keys


def _reference(model, tok, prompts, params, configs):
    out = {}
    for name in configs:
        results = ReferenceGenerator(model, tok, CONFIGS[name]).generate(prompts, params)
        out.update({(name, p, s): r for p, samples in enumerate(results) for s, r in enumerate(samples)})
    return out


def _check(tok, got, want, keys):
    caps = [CONFIGS[k[0]].max_block_tokens for k in keys]
    problems, worst = vh.compare(got, [want[k] for k in keys], caps, vh.special_ids(tok))
    assert not problems, [(keys[m.index], m.what, m.detail) for m in problems][:10]
    return worst


@pytest.mark.slow
def test_greedy_generation_equals_the_reference_engine_event_for_event(setup):
    tok, prompts, engine, model = setup
    reqs, extra, keys = _requests(prompts, GREEDY, CONFIGS)
    got = engine.run(reqs, GREEDY, extra_args=extra)
    want = _reference(model, tok, prompts, GREEDY, CONFIGS)
    worst = _check(tok, got, want, keys)
    assert worst < 1e-4
    by_config = {name: [g for g, k in zip(got, keys) if k[0] == name] for name in CONFIGS}
    # Coverage: every evicting configuration evicted, the cap forced, multi-turn prompts compacted
    # their completed blocks at prompt_len, before the first generated token was fed.
    for name, results in by_config.items():
        assert sum(len(r.extra["evictions"]) for r in results) > 0, name
    assert sum(r.forced_block_ends for r in by_config["cap"]) > 0
    multi = [(g, k) for g, k in zip(got, keys) if k[1] >= 6 and k[0] == "k0"]
    for g, _ in multi:
        row = len(g.prompt_ids)
        deferred = [e for e in g.extra["evictions"] if e[0] == row]
        assert deferred, g.extra["evictions"]
        assert g.kv_trace[1] == g.kv_trace[0] + 1 - sum(stop - start for _, start, stop in deferred)
    assert all(r.extra["preemptions"] == 0 for r in got)  # this engine has room: preemption is tested apart


@pytest.mark.slow
def test_seeded_sampling_equals_the_reference_engine(setup):
    tok, prompts, engine, model = setup
    for params in SAMPLED.values():
        reqs, extra, keys = _requests(prompts, params, SAMPLED_CONFIGS)
        got = engine.run(reqs, params, extra_args=extra)
        want = _reference(model, tok, prompts, params, SAMPLED_CONFIGS)
        _check(tok, got, want, keys)
        assert len({tuple(g.token_ids) for g in got}) > len(got) // 2  # really sampled
        assert sum(len(g.extra["evictions"]) for g in got) > 0


@pytest.mark.slow
def test_negative_control_bookkeeping_without_compaction_diverges(setup):
    """The same tracker and events, but the KV keeps the evicted blocks: the model then sees keys the
    reference (and the training mask) dropped, and its tokens or log-probs must differ after the
    first eviction. Shows that the comparisons above have teeth."""
    tok, prompts, engine, model = setup
    cfg = CONFIGS["k0"]
    reqs = [SequenceRequest(p, prompt_index=i) for i, p in enumerate(prompts)]
    got = engine.run(reqs, GREEDY, extra_args=[vh.memento_args(cfg, memento_debug_keep_kv=True)] * len(reqs))
    want = ReferenceGenerator(model, tok, cfg).generate(prompts, GREEDY)
    diverged = 0
    for g, [w] in zip(got, want):
        assert all(b > a for a, b in zip(g.kv_trace, g.kv_trace[1:]))  # nothing left the cache
        if not w.extra["evictions"]:
            continue
        assert g.extra["evictions"][0] == tuple(w.extra["evictions"][0])  # the same bookkeeping
        first = w.extra["evictions"][0][0] - len(w.prompt_ids)  # first token fed after an eviction
        same = g.token_ids[: first + 1] == w.token_ids[: first + 1]
        assert same  # identical until the first eviction
        later = [abs(a - b) for a, b in zip(g.logprobs[first + 1 :], w.logprobs[first + 1 :])]
        diverged += g.token_ids != w.token_ids or max(later, default=0.0) > 1e-3
    evicting = sum(bool(w.extra["evictions"]) for [w] in want)
    assert evicting >= 6 and diverged == evicting
