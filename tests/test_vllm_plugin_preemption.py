"""Preemption under a tiny KV budget: vLLM drops a request's cache and recomputes it later. The
recomputation must rebuild the *compacted* cache (chunks end at every eviction row, each eviction is
applied there again) and a seeded request must draw the same numbers, so the results still equal the
reference engine's exactly, including the eviction events (logged once) and the KV trace."""

from __future__ import annotations

import pytest
import vllm_harness as vh

from memento_train.generation import BlockMaskingConfig, ReferenceGenerator, SamplingParams, SequenceRequest

pytestmark = pytest.mark.skipif(vh.plugin_skip_reason() is not None, reason=str(vh.plugin_skip_reason()))

BLOCKS = 40  # x 32 slots: room for a handful of the batch's sequences at a time


@pytest.mark.slow
def test_preempted_and_recomputed_requests_still_equal_the_reference_engine():
    tok = vh.tokenizer()
    prompts = vh.single_turn_prompts(tok, 6) + vh.multi_turn_prompts(tok, 3)
    runs = [
        (BlockMaskingConfig(keep_last_n_blocks=0), SamplingParams(max_new_tokens=128, temperature=0.0)),
        (
            BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True, max_block_tokens=6),
            SamplingParams(max_new_tokens=128, temperature=1.0, n=2, seed=3),
        ),
    ]
    reqs, extra, caps = [], [], []
    for cfg, params in runs:
        for p, prompt in enumerate(prompts):
            for s in range(params.n):
                reqs.append(SequenceRequest(prompt, prompt_index=p, sample_index=s))
                extra.append(vh.memento_args(cfg))
                caps.append(cfg.max_block_tokens)
    engine = vh.start_engine(num_gpu_blocks_override=BLOCKS)
    try:
        got = engine.run(reqs[: len(prompts)], runs[0][1], extra_args=extra[: len(prompts)])
        got += engine.run(reqs[len(prompts) :], runs[1][1], extra_args=extra[len(prompts) :])
    finally:
        engine.shutdown()
    model = vh.reference_model()
    want = []
    for cfg, params in runs:
        want += [r for samples in ReferenceGenerator(model, tok, cfg).generate(prompts, params) for r in samples]
    problems, worst = vh.compare(got, want, caps, vh.special_ids(tok))
    assert not problems, problems[:10]
    preempted = [g for g in got if g.extra["preemptions"] > 0]
    assert len(preempted) >= 3, [g.extra["preemptions"] for g in got]
    assert sum(g.extra["replayed_evictions"] for g in preempted) > 0  # recomputed across eviction rows
    assert worst < 1e-4
