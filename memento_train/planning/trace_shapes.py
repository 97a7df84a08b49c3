"""OpenMementos-shaped packed batches: the benchmarks, the memory planner and the GPU self-check.

A document is ChatML-shaped: a prompt (~200 tokens), then blocks of ~1,150 tokens each followed by a
~190-token summary, then a short answer: the statistics of OpenMementos traces. Kill rows come from
the real parser (``masking.parse``), so the benchmark masks are exactly the training masks.
"""

from __future__ import annotations

import numpy as np

from memento_train.attention.meta import MementoAttentionMeta
from memento_train.masking import BlockMaskingConfig, parse

# Synthetic ids; only the delimiters and the assistant header matter to the parser.
SPECIAL = {
    "<|im_start|>": 1,
    "assistant": 2,
    "<|block_start|>": 10,
    "<|block_end|>": 11,
    "<|summary_start|>": 12,
    "<|summary_end|>": 13,
}
PLAIN = 100


def memento_document(
    rng: np.random.Generator, budget: int, *, prompt=200, block=1150, summary=190, answer=150
) -> list[int]:
    """One trace of at most ``budget`` tokens; lengths jitter ±20 % around the given means."""

    def jitter(n):
        return max(1, int(n * rng.uniform(0.8, 1.2)))

    if budget < 2 * prompt:  # no room for a trace: the batch's tail is a short plain document
        return [PLAIN] * budget

    ids = [SPECIAL["<|im_start|>"]] + [PLAIN] * jitter(prompt) + [SPECIAL["<|im_start|>"], SPECIAL["assistant"]]
    while True:
        b, s = jitter(block), jitter(summary)
        unit = [SPECIAL["<|block_start|>"]] + [PLAIN] * b + [SPECIAL["<|block_end|>"], SPECIAL["<|summary_start|>"]]
        unit += [PLAIN] * s + [SPECIAL["<|summary_end|>"]]
        if len(ids) + len(unit) + answer > budget:
            break
        ids += unit
    return ids + [PLAIN] * min(jitter(answer), budget - len(ids))


def memento_batch(
    total_tokens: int, *, seed: int = 0, doc_tokens: int = 12_000, keep_last_n_blocks: int = 0, scale: float = 1.0
):
    """Pack documents of up to ``doc_tokens`` into exactly ``total_tokens``; returns (meta, doc_lengths).

    ``scale`` shrinks every unit (prompt, block, summary, answer) for miniature batches that still evict.
    """
    rng = np.random.default_rng(seed)
    config = BlockMaskingConfig(keep_last_n_blocks=keep_last_n_blocks)
    units = {
        k: max(1, round(n * scale)) for k, n in (("prompt", 200), ("block", 1150), ("summary", 190), ("answer", 150))
    }
    kill_rows, remaining = [], total_tokens
    while remaining > 0:
        doc = memento_document(rng, min(doc_tokens, remaining), **units)
        kill_rows.append(parse(doc, SPECIAL, config).kill_row)
        remaining -= len(doc)
    return MementoAttentionMeta.from_documents(kill_rows), [len(k) for k in kill_rows]
