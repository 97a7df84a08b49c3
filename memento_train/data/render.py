"""Render a normalised record as a ChatML token stream with kinds, kill rows and labels.

Text layout (no system message unless ``system_prompt`` is set)::

    <|im_start|>system\\n{system_prompt}<|im_end|>\\n          (optional)
    <|im_start|>user\\n{problem}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>\\n

How the text is produced and tokenized:

- The prompt (system + user + assistant header) is
  :func:`memento_train.generation.prompt.generation_prompt_text`: the tokenizer's chat template with
  ``add_generation_prompt=True`` when it has one, else the literal layout above. RL, evaluation and
  serving render prompts with the same function, so training sees the bytes the model is served.
- The response is appended *verbatim*, followed by the template's end-of-turn text (found by rendering
  a sentinel assistant message; ``<|im_end|>\\n`` for ChatML). Templates such as Qwen3's rewrite the
  reasoning of assistant messages (strip or re-wrap ``<think>``), so the response never goes through
  the template.
- Prompt and response are tokenized separately and concatenated, exactly as at inference time where
  the prompt is encoded and the response is generated token by token. ``prompt_len`` is therefore the
  number of prompt tokens: the index right after the ``<|im_start|>assistant\\n`` header.

Structure comes only from :func:`memento_train.masking.parse` over the ids (called with this
``prompt_len``), never from the text. Labels are the ids with prompt positions set to -100; every
assistant token, specials and the final ``<|im_end|>`` included, is trained. Labels here are *not*
shifted; :mod:`.pack` shifts them per document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memento_train.generation.prompt import encode_text, generation_prompt_text
from memento_train.masking import BlockMaskingConfig, ParsedStream, SpecialTokens, parse
from memento_train.tokens import ASSISTANT, IM_END, IM_START, MEMENTO_TOKENS, THINK_TOKENS

IGNORE_INDEX = -100
_SENTINEL = "\ue000MEMENTO-SENTINEL\ue001"


@dataclass
class RenderedExample:
    """One tokenized record. Arrays are 1-D numpy arrays of equal length ``n``.

    ``kill_row`` is document-local: entry k is the first row that no longer sees key k, ``n`` if never.
    ``parsed`` is the parser's full result (blocks, anomalies) for validation and statistics; it is
    not stored in the Arrow cache.
    """

    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], IGNORE_INDEX on the prompt; unshifted
    kinds: np.ndarray  # int8 [n], masking.Kind values
    kill_row: np.ndarray  # int32 [n], document-local
    prompt_len: int
    record_id: str
    domain: str = ""
    parsed: ParsedStream | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that changes token ids or the rendered text."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(sorted(tokenizer.get_added_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:16]


class Renderer:
    """Turns normalised records into :class:`RenderedExample`. Picklable (for ``datasets.map``).

    Args:
        tokenizer: a Hugging Face tokenizer holding the memento, think and ChatML tokens atomically
            (see :func:`memento_train.tokens.add_memento_tokens`).
        mask: eviction options for the kill rows.
        system_prompt: optional system message.
    """

    def __init__(
        self, tokenizer: Any, mask: BlockMaskingConfig | None = None, system_prompt: str | None = None
    ) -> None:
        from memento_train.tokens import special_token_ids

        self.tokenizer = tokenizer
        self.mask = mask or BlockMaskingConfig()
        self.system_prompt = system_prompt
        self.special_ids: dict[str, int] = special_token_ids(tokenizer)  # raises naming a non-atomic token
        self.special = SpecialTokens.from_mapping(self.special_ids)
        self.use_template = bool(getattr(tokenizer, "chat_template", None))
        self.turn_end = self._find_turn_end()

    # -- text ------------------------------------------------------------------------------------
    def _find_turn_end(self) -> str:
        default = f"{IM_END}\n"
        if not self.use_template:
            return default
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        if _SENTINEL not in text:
            return default
        return text.split(_SENTINEL, 1)[1] or default

    def prompt_text(self, problem: str) -> str:
        """System + user turn + assistant header, as the model sees it before generating."""
        return generation_prompt_text(self.tokenizer, problem, self.system_prompt)

    def _encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    # -- ids and structure ---------------------------------------------------------------------
    def render(self, record: Mapping[str, Any]) -> RenderedExample:
        """Render one normalised record (``problem``, ``response``, ``record_id``, ``domain``).

        Raises ``ValueError`` when the record has no problem/response (validate first) or when the
        tokenizer splits a special token (a tokenizer problem, not a record problem).
        """
        record_id = str(record.get("record_id", ""))
        problem, response = record.get("problem"), record.get("response")
        if not isinstance(problem, str) or not isinstance(response, str):
            raise ValueError(f"record {record_id!r} has no problem/response text; normalise and validate it first")
        prompt_ids = self._encode(self.prompt_text(problem))
        response_text = response + self.turn_end
        ids = prompt_ids + self._encode(response_text)
        self._check_atomic(ids, response_text, record_id)
        prompt_len = len(prompt_ids)
        return self.from_ids(ids, prompt_len, record_id=record_id, domain=str(record.get("domain") or ""))

    def from_ids(self, ids, prompt_len: int, *, record_id: str = "", domain: str = "") -> RenderedExample:
        """Kinds, kill rows and labels for an already tokenized stream (e.g. a truncated one)."""
        arr = np.asarray(ids, dtype=np.int64)
        parsed = parse(arr, self.special, self.mask, prompt_len=prompt_len)
        if parsed.prompt_len != prompt_len:
            raise ValueError(
                f"record {record_id!r}: the masking parser did not find the assistant header at "
                f"{prompt_len} (found {parsed.prompt_len}); the chat template must end the prompt "
                f"with '{IM_START}{ASSISTANT}' followed by at most one token"
            )
        labels = arr.astype(np.int32)
        labels[:prompt_len] = IGNORE_INDEX
        return RenderedExample(
            input_ids=arr.astype(np.int32),
            labels=labels,
            kinds=parsed.kinds.astype(np.int8),
            kill_row=parsed.kill_row.astype(np.int32),
            prompt_len=int(prompt_len),
            record_id=record_id,
            domain=domain,
            parsed=parsed,
        )

    def truncate(self, example: RenderedExample, max_len: int) -> RenderedExample:
        """The first ``max_len`` tokens, re-parsed (a block cut open is never evicted)."""
        return self.from_ids(
            example.input_ids[:max_len], example.prompt_len, record_id=example.record_id, domain=example.domain
        )

    def _check_atomic(self, ids: list[int], text: str, record_id: str) -> None:
        for tok in (*MEMENTO_TOKENS, *THINK_TOKENS):
            want = text.count(tok)
            if want and ids.count(self.special_ids[tok]) < want:
                raise ValueError(
                    f"record {record_id!r}: {tok!r} occurs {want}x in the text but its id "
                    f"{self.special_ids[tok]} only {ids.count(self.special_ids[tok])}x in the tokens; "
                    "the tokenizer must hold it as an atomic special token (memento_train.tokens.add_memento_tokens)"
                )

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def render_record(
    record: Mapping[str, Any], tokenizer: Any, mask: BlockMaskingConfig | None = None, system_prompt: str | None = None
) -> RenderedExample:
    """One-off convenience: ``Renderer(tokenizer, mask, system_prompt).render(record)``.

    Build a :class:`Renderer` once and reuse it when rendering many records.
    """
    return Renderer(tokenizer, mask, system_prompt).render(record)
