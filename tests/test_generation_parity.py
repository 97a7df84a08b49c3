"""The number RL depends on: the generator's log-probs == one packed masked training forward.

Tiny random Qwen3 (mask_delimiters=false), Phi-3 (mask_delimiters=true) and Olmo 3 (sliding window 8
< block length) in float64, shipped tokenizer, ChatML prompts. A random model rarely emits memento
tokens, so structure is forced: the three real traces of ``assets/sample_traces.jsonl`` (every block,
summary and answer run condensed to a few dozen tokens, delimiters kept: ~400 response tokens each)
are teacher-forced through :class:`ReferenceGenerator`, and further sequences sample (temperature 1,
then top-k/top-p/min-p with a block-length cap) after a teacher-forced prefix holding complete
blocks, plus plain samples from a ChatML prompt. Everything decodes batched with physical eviction
(``keep_last_n_blocks`` 0 and 1). Then ONE packed ``memento_segment`` forward over all sequences,
masked by ``masking.parse(prompt + response, prompt_len=len(prompt)).kill_row``, recomputes
``log_softmax(logits / T)`` of every generated token: max |Δ| < 1e-9 (float64). float32 and
bfloat16 differences are recorded (printed with ``-s``; ``record_property``).
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch

from memento_train.attention import MementoAttentionMeta, attn_implementation
from memento_train.data import Renderer
from memento_train.generation import BlockMaskingConfig, ReferenceGenerator, SamplingParams, SequenceRequest
from memento_train.masking import Kind, parse
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer
from memento_train.tokens import special_token_ids

TOK = load_shipped_tokenizer()
IDS = special_token_ids(TOK)
BS, BE, SE = IDS["<|block_start|>"], IDS["<|block_end|>"], IDS["<|summary_end|>"]
FAMILIES = {"qwen3": False, "phi3": True, "olmo3": False}  # family -> mask_delimiters
TOL64 = 1e-9
LM_HEAD_SCALE = 30.0  # a random tiny model is near-uniform; this gives realistic log-probs (-24 .. -0.1)
RUN_LIMITS = {Kind.BLOCK: 48, Kind.SUMMARY: 20, Kind.OTHER: 24}


def condensed_traces() -> list[tuple[list[int], list[int]]]:
    """(prompt, response) of the three sample traces, every content run cut to RUN_LIMITS tokens."""
    renderer = Renderer(TOK)
    text = (resources.files("memento_train") / "assets" / "sample_traces.jsonl").read_text()
    out = []
    for line in text.splitlines():
        ex = renderer.render(json.loads(line))
        ids, p = ex.input_ids.tolist(), ex.prompt_len
        keep, run, count = [], None, 0
        for i in range(p, len(ids)):
            key = (int(ex.kinds[i]), int(ex.parsed.block_ids[i]))
            count = count + 1 if key == run else 1
            run = key
            if count <= RUN_LIMITS.get(Kind(key[0]), 1 << 30):
                keep.append(ids[i])
        out.append((ids[:p], keep))
    return out


TRACES = condensed_traces()
CHAT_PROMPT = TOK(
    TOK.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True),
    add_special_tokens=False,
)["input_ids"]


def prefix_cut(response: list[int]) -> int:
    """Inside the third block, 5 tokens after its <|block_start|> (two complete blocks before it)."""
    return [i for i, t in enumerate(response) if t == BS][2] + 6


def requests_for(traces, *, sample_tokens: int, n: int) -> list[SequenceRequest]:
    reqs = [SequenceRequest(p, r, max_new_tokens=len(r), prompt_index=i) for i, (p, r) in enumerate(traces)]
    for i, (p, r) in enumerate(traces):
        cut = prefix_cut(r)
        reqs += [
            SequenceRequest(p, r[:cut], max_new_tokens=cut + sample_tokens, prompt_index=i, sample_index=s)
            for s in range(n)
        ]
    reqs += [
        SequenceRequest(CHAT_PROMPT, (), max_new_tokens=sample_tokens, prompt_index=9, sample_index=s) for s in range(n)
    ]
    return reqs


def packed_logprobs(model, results, mask_config, temperature: float = 1.0, *, evict: bool = True):
    """ONE packed training forward over prompt+response of every result; per-result log-probs."""
    seqs = [r.prompt_ids + r.token_ids for r in results]
    if evict:
        kill = [parse(s, IDS, mask_config, prompt_len=len(r.prompt_ids)).kill_row for s, r in zip(seqs, results)]
        meta = MementoAttentionMeta.from_documents(kill)
    else:
        meta = MementoAttentionMeta.causal(np.concatenate([[0], np.cumsum([len(s) for s in seqs])]))
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    previous = model.config._attn_implementation
    model.set_attn_implementation(attn_implementation("segment"))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids[None], position_ids=pos[None], memento_meta=meta, use_cache=False).logits[0]
    finally:
        model.set_attn_implementation(previous)
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out, offset = [], 0
    for s, r in zip(seqs, results):
        p = len(r.prompt_ids)
        rows = logits[offset + p - 1 : offset + len(s) - 1].to(work)
        lp = torch.log_softmax(rows / temperature, dim=-1)
        out.append(lp.gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0].double())
        offset += len(s)
    return out


def max_diff(results, reference) -> float:
    return max(
        (torch.tensor(r.logprobs, dtype=torch.float64) - ref).abs().max().item() for r, ref in zip(results, reference)
    )


def peaked_lm(make_tiny_lm, family: str, dtype: torch.dtype):
    model = make_tiny_lm(family, dtype=dtype, vocab_size=2048)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, make_tiny_lm):
    return request.param, peaked_lm(make_tiny_lm, request.param, torch.float64)


@pytest.mark.parametrize("keep_last_n_blocks", [0, 1])
def test_generator_logprobs_equal_packed_training_forward(family_model, keep_last_n_blocks, record_property):
    family, model = family_model
    bm = BlockMaskingConfig(keep_last_n_blocks=keep_last_n_blocks, mask_delimiters=FAMILIES[family])
    cfg = bm.rule()
    # 1) temperature 1: teacher-forced real traces, samples after a structured prefix, plain samples.
    plain = ReferenceGenerator(model, TOK, bm).run(
        requests_for(TRACES, sample_tokens=24, n=2), SamplingParams(temperature=1.0, seed=7)
    )
    # 2) truncated sampling (top-k/top-p/min-p, T=0.8) with a block-length cap: log-probs stay pre-truncation.
    capped_bm = BlockMaskingConfig(
        keep_last_n_blocks=keep_last_n_blocks, mask_delimiters=FAMILIES[family], max_block_tokens=12
    )
    params = SamplingParams(temperature=0.8, top_p=0.7, top_k=64, min_p=0.01, seed=11)
    capped = ReferenceGenerator(model, TOK, capped_bm).run(
        requests_for(TRACES, sample_tokens=16, n=1)[len(TRACES) :], params
    )

    worst_plain = max_diff(plain, packed_logprobs(model, plain, cfg))
    worst_capped = max_diff(capped, packed_logprobs(model, capped, cfg, temperature=0.8))
    print(
        f"\nGEN-PARITY {family} float64 N={keep_last_n_blocks}: T=1 max|Δlogprob|={worst_plain:.3e}, "
        f"top-p/k/min-p T=0.8 max|Δlogprob|={worst_capped:.3e}"
    )
    record_property("max_abs_diff_logprob", max(worst_plain, worst_capped))
    assert worst_plain < TOL64 and worst_capped < TOL64

    # Not vacuous: every structured sequence evicted, the cache shrank, and eviction changed the log-probs.
    structured = plain[: 3 * len(TRACES)] + capped[: len(TRACES)]
    assert all(r.extra["evictions"] for r in structured)
    assert all(min(np.diff(r.kv_trace)) < 0 for r in structured)
    no_evict = packed_logprobs(model, plain, cfg, evict=False)
    assert max_diff(plain[: len(TRACES)], no_evict[: len(TRACES)]) > 1e-3
    # The cap fired inside the third block and its <|block_end|> carries the model's log-prob.
    for r in capped[: len(TRACES)]:
        assert r.forced_block_ends >= 1 and BE in r.token_ids[r.extra["num_forced"] :]
    # Sampling really sampled after the prefix (tokens differ between the two samples of a prompt).
    for i in range(len(TRACES)):
        a, b = plain[len(TRACES) + 2 * i], plain[len(TRACES) + 2 * i + 1]
        assert a.token_ids[: a.extra["num_forced"]] == b.token_ids[: b.extra["num_forced"]]
        assert a.token_ids != b.token_ids


def test_batched_equals_alone(make_tiny_lm):
    """Same seeds → same tokens, log-probs and KV traces whether sequences share a batch or not,
    including a batch that refills freed slots as sequences of different lengths finish, and a
    prefill cut into chunks of 37 tokens (the prompts are 81-550 tokens long)."""
    model = peaked_lm(make_tiny_lm, "qwen3", torch.float64)
    bm = BlockMaskingConfig(keep_last_n_blocks=1, max_block_tokens=10)
    reqs = requests_for(TRACES, sample_tokens=12, n=2)[len(TRACES) :]
    for k, r in enumerate(reqs):  # staggered budgets: rows finish at different steps
        r.max_new_tokens += 3 * k
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    runs = {bs: ReferenceGenerator(model, TOK, bm, max_batch_size=bs).run(reqs, params) for bs in (16, 3, 1)}
    runs["chunked"] = ReferenceGenerator(model, TOK, bm, prefill_chunk=37).run(reqs, params)
    for bs in (3, 1, "chunked"):
        for a, b in zip(runs[16], runs[bs]):
            assert a.token_ids == b.token_ids and a.kv_trace == b.kv_trace and a.kinds == b.kinds
            assert np.max(np.abs(np.subtract(a.logprobs, b.logprobs))) < TOL64
    assert len({r.num_tokens for r in runs[16]}) > 1


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-3), (torch.bfloat16, 0.5)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_low_precision_parity_for_information(make_tiny_lm, family, dtype, bound, record_property):
    """Same comparison in float32 / bfloat16 (N=0): loose bounds; the numbers are recorded."""
    model = peaked_lm(make_tiny_lm, family, dtype)
    bm = BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=FAMILIES[family])
    results = ReferenceGenerator(model, TOK, bm).run(
        requests_for(TRACES, sample_tokens=16, n=1), SamplingParams(temperature=1.0, seed=5)
    )
    worst = max_diff(results, packed_logprobs(model, results, bm.rule()))
    record_property("max_abs_diff_logprob", worst)
    print(f"\nGEN-PARITY {family} {str(dtype)[6:]} N=0: max|Δlogprob|={worst:.3e}")
    assert worst < bound
