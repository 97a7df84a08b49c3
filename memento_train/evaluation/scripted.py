"""A scripted :class:`~memento_train.generation.engine.GenerationEngine`: canned responses, real bookkeeping.

:class:`ScriptedEngine` does not run a model. A ``respond(prompt_text, sample_index)`` callable writes
each response as text (special tokens written out); the engine tokenizes it, truncates it at
``max_new_tokens`` or the first stop token, and derives ``kinds`` and ``kv_trace`` from the same parser
the real engines use (:func:`memento_train.masking.parse` with the engine's block masking), so blocks,
summaries, compression and the KV sawtooth come out exactly as an evicting engine would report them
for that token stream. Logprobs are zeros.

Used by the tests and for dry runs of the evaluation pipeline (reports, plots) without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from memento_train.generation.engine import BlockMaskingConfig, GenerationResult, SamplingParams
from memento_train.masking import SpecialTokens, live_kv_trace, parse
from memento_train.tokens import special_token_ids

Respond = Callable[[str, int], str]


class ScriptedEngine:
    """Replays ``respond(prompt_text, sample_index)`` for every prompt and sample."""

    def __init__(self, tokenizer: Any, respond: Respond, block_masking: BlockMaskingConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.respond = respond
        self.block_masking = block_masking or BlockMaskingConfig()
        self.special = SpecialTokens.from_mapping(special_token_ids(tokenizer))
        self.calls: list[tuple[int, SamplingParams]] = []  # (number of prompts, params) per generate()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[GenerationResult]]:
        self.calls.append((len(prompts), params))
        out = []
        for prompt in prompts:
            prompt = [int(t) for t in prompt]
            prompt_text = self.tokenizer.decode(prompt, skip_special_tokens=False)
            out.append([self._one(prompt, prompt_text, i, params) for i in range(params.n)])
        return out

    def _one(self, prompt: list[int], prompt_text: str, index: int, params: SamplingParams) -> GenerationResult:
        ids = self._encode(self.respond(prompt_text, index))
        finish = "length"
        stops = set(params.stop_token_ids)
        for j, tok in enumerate(ids[: params.max_new_tokens]):
            if tok in stops:
                ids, finish = ids[: j + 1], "stop"
                break
        else:
            ids = ids[: params.max_new_tokens]
        p = len(prompt)
        stream = prompt + ids
        parsed = parse(stream, self.special, self.block_masking.rule(), prompt_len=p)
        live = live_kv_trace(parsed.kill_row)
        # Token i is sampled from the logits of row p + i - 1: that row's live KV is what it saw.
        trace = [int(live[p + i - 1]) for i in range(len(ids))]
        return GenerationResult(
            prompt_ids=prompt,
            token_ids=ids,
            logprobs=[0.0] * len(ids),
            kinds=[int(k) for k in parsed.kinds[p:]],
            kv_trace=trace,
            finish_reason=finish,
        )


def memento_response(
    num_blocks: int,
    answer: str,
    *,
    block_words: int = 30,
    summary_words: int = 6,
    end: str = "<|im_end|>",
) -> str:
    """A well-formed Memento response with ``num_blocks`` blocks and a boxed ``answer``."""
    parts: list[str] = ["<think>\n"]  # the prompt ends at the assistant header: the model opens thinking
    for b in range(num_blocks):
        body = " ".join(f"step{b}w{w}" for w in range(block_words))
        memo = " ".join(f"memo{b}m{w}" for w in range(summary_words))
        parts.append(f"<|block_start|>{body}<|block_end|>\n<|summary_start|>{memo}<|summary_end|>\n")
    parts.append(f"</think>\nThe answer is $\\boxed{{{answer}}}$.{end}")
    return "".join(parts)


__all__ = ["ScriptedEngine", "memento_response"]
