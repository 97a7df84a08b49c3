"""Memento special tokens: tokenizer extension and embedding initialisation (docs/architecture.md §1).

The four memento delimiters are added as atomic special tokens; their embedding rows (and LM-head
rows when the head is untied) start as the mean of related existing words plus small Gaussian noise,
so a fresh model already "reads" them as something block/summary-like instead of as random vectors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

BLOCK_START = "<|block_start|>"
BLOCK_END = "<|block_end|>"
SUMMARY_START = "<|summary_start|>"
SUMMARY_END = "<|summary_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ASSISTANT = "assistant"

MEMENTO_TOKENS: tuple[str, ...] = (BLOCK_START, BLOCK_END, SUMMARY_START, SUMMARY_END)
THINK_TOKENS: tuple[str, ...] = (THINK_START, THINK_END)

# Related words whose embeddings seed each new token (docs/architecture.md §1).
INIT_WORDS: dict[str, tuple[str, ...]] = {
    BLOCK_START: ("block", "start", "begin", "section", "step"),
    BLOCK_END: ("block", "end", "finish", "section", "done"),
    SUMMARY_START: ("summary", "summarize", "brief", "recap", "overview"),
    SUMMARY_END: ("summary", "end", "finish", "done", "complete"),
}

# Qwen-style ChatML without a default system prompt. Kept in one place so the shipped tokenizer, the
# data renderer and models prepared here all render byte-identical prompts.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def add_memento_tokens(tokenizer: Any) -> list[str]:
    """Add ``<think>``/``</think>`` (if missing) and the four memento tokens as atomic special tokens.

    Returns the strings that received new ids, in id order. Calling it again adds nothing.
    """
    vocab, added = tokenizer.get_vocab(), tokenizer.get_added_vocab()
    # Think tags first so that base tokenizer + this call reproduces the shipped tokenizer's ids.
    wanted = (*THINK_TOKENS, *MEMENTO_TOKENS)
    new = [t for t in wanted if t not in vocab]
    # A string already in the vocab but not registered as an added token would still be split by
    # BPE inside text; registering it keeps its id and makes it atomic.
    todo = [t for t in wanted if t not in added]
    if todo:
        tokenizer.add_tokens(
            [_added_token(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in todo],
            special_tokens=True,
        )
    return new


def _single_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"token {token!r} is not atomic in this tokenizer: it encodes to {len(ids)} ids {ids}; "
            "add it with memento_train.tokens.add_memento_tokens (or as a special token)"
        )
    return int(ids[0])


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Map each structural token (memento, think, ChatML and the ``assistant`` role word) to its id.

    Raises ValueError naming the token if it is missing or does not encode to exactly one id. The
    ``assistant`` role is checked as it appears in ChatML (``<|im_start|>assistant\\n``), because the
    masking parser locates the assistant section by that single id.
    """
    out: dict[str, int] = {}
    vocab = tokenizer.get_vocab()
    for tok in (*MEMENTO_TOKENS, IM_START, IM_END, *THINK_TOKENS):
        if tok not in vocab:
            raise ValueError(f"tokenizer is missing the special token {tok!r}")
        out[tok] = _single_id(tokenizer, tok)
        if out[tok] != vocab[tok]:
            raise ValueError(f"token {tok!r} encodes to id {out[tok]} but the vocab says {vocab[tok]}")
    ids = tokenizer.encode(f"{IM_START}{ASSISTANT}\n", add_special_tokens=False)
    if len(ids) < 2 or ids[0] != out[IM_START] or tokenizer.decode([ids[1]]) != ASSISTANT:
        pieces = [tokenizer.decode([i]) for i in ids[1:]]
        raise ValueError(
            f"the role word {ASSISTANT!r} does not encode to exactly one id after {IM_START!r} "
            f"(got pieces {pieces}); the masking parser needs a single assistant id"
        )
    out[ASSISTANT] = int(ids[1])
    return out


def _related_ids(tokenizer: Any, words: Iterable[str], exclude: set[int], limit: int) -> list[int]:
    ids: set[int] = set()
    for word in words:
        # Both variants: BPE vocabularies usually hold the word-initial (" word") and bare forms.
        for variant in (word, " " + word):
            ids.update(tokenizer.encode(variant, add_special_tokens=False))
    return sorted(i for i in ids if i not in exclude and i < limit)


@torch.no_grad()
def init_new_token_embeddings(
    model: Any, tokenizer: Any, new_tokens: Sequence[str], *, std: float = 0.01, seed: int = 0
) -> None:
    """Initialise rows of ``new_tokens`` to the mean of related-word rows plus N(0, std) noise.

    Related words come from :data:`INIT_WORDS`; tokens without an entry (e.g. ``<think>``) or whose
    words yield no ids use the mean of all existing rows. The LM-head rows are set the same way (from
    LM-head rows) when the head is not tied to the input embeddings. Noise comes from a generator
    seeded with ``seed``, so the result is reproducible.
    """
    if not new_tokens:
        return
    new_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in new_tokens}
    exclude = set(new_ids.values())
    inp = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings()
    matrices = [inp]
    if out_emb is not None and out_emb.weight is not inp:
        matrices.append(out_emb.weight)
    # Rows past len(tokenizer) (e.g. Qwen's vocab padding) are untrained: keep them out of the means.
    limit = min(len(tokenizer), inp.shape[0])
    existing = torch.tensor([i for i in range(limit) if i not in exclude], dtype=torch.long)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for tok in new_tokens:
        row = new_ids[tok]
        if row is None or row >= inp.shape[0]:
            raise ValueError(f"token {tok!r} has no embedding row (id {row}); resize the embeddings first")
        related = _related_ids(tokenizer, INIT_WORDS.get(tok, ()), exclude, limit)
        src = torch.tensor(related, dtype=torch.long) if related else existing
        for weight in matrices:
            mean = weight[src.to(weight.device)].float().mean(dim=0)
            noise = torch.randn(weight.shape[1], generator=gen) * std
            weight[row] = (mean + noise.to(weight.device)).to(weight.dtype)


def prepare_model_and_tokenizer(
    model: Any, tokenizer: Any, *, chat_template: str | None = None, seed: int = 0
) -> list[str]:
    """Add the memento tokens, grow the embeddings if needed, initialise new rows, set a chat template.

    The embedding matrix is only grown, never shrunk, so an existing padded vocabulary (Qwen's) keeps
    its size and new tokens land in its spare rows. ``chat_template`` overrides the tokenizer's; if
    neither exists, :data:`CHATML_TEMPLATE` is set. Returns the newly added token strings.
    """
    new = add_memento_tokens(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # mean_resizing would fit a covariance we immediately overwrite; skip that cost.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    init_new_token_embeddings(model, tokenizer, new, seed=seed)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return new


def save_model_and_tokenizer(model: Any, tokenizer: Any, path: str | os.PathLike) -> None:
    """Save model (safetensors) and tokenizer (with its chat template) side by side in ``path``."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _added_token(content: str, **kwargs: Any) -> Any:
    # Imported here: the parser (masking.py) needs this module's token names, and the GPU self-check
    # runs it on images without `tokenizers`.
    from tokenizers import AddedToken

    return AddedToken(content, **kwargs)
