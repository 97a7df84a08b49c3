"""The visibility rule: one state machine over token ids, and everything derived from it.

This module is the single place that knows Memento block structure (docs/architecture.md §2). Data rendering,
validation, the attention mask, the reference decoder's physical eviction, rollout post-processing
and KV accounting all call it; nothing else re-derives blocks.

The tracker mirrors the serving engine's block-masking tracker, malformed streams included, so that
a masked training forward sees exactly the keys an evicting decode saw:

- ``<|block_start|>`` opens a block (blocks nest: a stack); ``<|block_end|>`` closes the innermost
  open block, ignored when none is open.
- ``<|summary_start|>`` attaches to the newest (by opening order) closed block without a summary;
  ignored when there is none. ``<|summary_end|>`` closes the open summary, ignored when none is open.
  A block whose summary closed is *complete* and joins a FIFO of pending blocks.
- Each completing ``<|summary_end|>`` evicts at most one block, the oldest pending one, when more than
  ``keep_last_n_blocks`` are pending. With ``keep_last_block_for_answer`` nothing is evicted at summary
  end; each ``<|block_start|>`` first evicts the oldest pending block instead.
- Eviction happens *before* the triggering token is consumed, so ``kill_row`` of an evicted key is the
  position of the triggering token.
- Tracking starts after the first ``assistant`` token within two positions after ``<|im_start|>``;
  tokens before ``prompt_len`` are tracked but evict nothing. At ``prompt_len`` (the first generated
  position) the serving scheduler first compacts every completed prompt block beyond
  ``keep_last_n_blocks`` (its deferred compaction after prefill): their keys get kill row ``prompt_len``.
"""

from __future__ import annotations

import enum
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from memento_train.tokens import ASSISTANT, BLOCK_END, BLOCK_START, IM_START, SUMMARY_END, SUMMARY_START


class Kind(enum.IntEnum):
    """What a token is, for loss masks, statistics and KV accounting."""

    PROMPT = 0
    BLOCK_DELIM = 1
    BLOCK = 2
    SUMMARY_DELIM = 3
    SUMMARY = 4
    OTHER = 5  # think tags, whitespace between units, the answer


@dataclass(frozen=True)
class BlockMaskingConfig:
    """The eviction options, under the Memento vLLM overlay's names (its ``block_masking_config``):
    one class for the training mask (``data.block_masking``), rollouts (``rollout.block_masking``),
    ``memento-eval`` (``block_masking``) and serving, so a rule is written once and means one thing.

    The rule (what a query row can see; training and serving must agree):
        enable: ``false`` never evicts (the overlay's switch; the same as ``keep_last_n_blocks=-1``).
        keep_last_n_blocks: completed blocks that stay visible; ``0`` evicts each block when its
            summary ends, ``-1`` never evicts (stage 1's full causal attention).
        mask_delimiters: ``<|block_start|>``/``<|block_end|>`` are evicted with their block (Phi-4).
        keep_last_block_for_answer: evict at the next ``<|block_start|>`` instead of at the summary's
            end, so the answer still sees the last block (needs ``keep_last_n_blocks=0``).
        require_assistant_section: track blocks only after the ``<|im_start|>assistant`` header
            (what the serving tracker does); ``false`` tracks a bare token stream from position 0.

    Generation only (they decide what is generated, not what is visible; the overlay takes them in
    the same dict, so they live here and ride along to every generator; the training mask, the
    data cache and exports ignore them):
        max_block_tokens: force ``<|block_end|>`` after this many block tokens (the paper's RL cap:
            7168); ``None`` = no cap.
        compact_on_summary_end: free evicted KV slots at once (the reference generator and the vLLM
            plugin always do; ``false`` only exists for the overlay).
    """

    enable: bool = True
    keep_last_n_blocks: int = 0
    mask_delimiters: bool = False
    keep_last_block_for_answer: bool = False
    require_assistant_section: bool = True
    max_block_tokens: int | None = None
    compact_on_summary_end: bool = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.keep_last_n_blocks, bool)
            or not isinstance(self.keep_last_n_blocks, int)
            or self.keep_last_n_blocks < -1
        ):
            raise ValueError(
                f"keep_last_n_blocks must be an int >= -1 (-1 = never evict, stage 1), got {self.keep_last_n_blocks!r}"
            )
        if self.enable and self.keep_last_block_for_answer and self.keep_last_n_blocks > 0:
            # The serving engine's rule evicts one block per <|block_start|> in this mode; it is
            # defined (and conformance-tested) only with keep_last_n_blocks=0.
            raise ValueError(
                "keep_last_block_for_answer=true requires keep_last_n_blocks=0 (or -1, no eviction); "
                f"got keep_last_n_blocks={self.keep_last_n_blocks}"
            )
        if self.max_block_tokens is not None and self.max_block_tokens < 1:
            raise ValueError(f"max_block_tokens must be >= 1 or None (got {self.max_block_tokens})")

    @property
    def evicts(self) -> bool:
        return self.enable and self.keep_last_n_blocks >= 0

    def rule(self) -> BlockMaskingConfig:
        """The visibility rule alone, in one spelling: ``enable=false`` folded into
        ``keep_last_n_blocks=-1`` and the generation-only options at their defaults. Two configs
        mask alike exactly when their rules are equal."""
        return BlockMaskingConfig(
            keep_last_n_blocks=self.keep_last_n_blocks if self.enable else -1,
            mask_delimiters=self.mask_delimiters,
            keep_last_block_for_answer=self.keep_last_block_for_answer and self.evicts,
            require_assistant_section=self.require_assistant_section,
        )

    def rule_dict(self) -> dict[str, Any]:
        """:meth:`rule` as the plain mapping exports record (``memento_train.json``) and the data cache
        fingerprints: the fields of :data:`RULE_FIELDS`."""
        rule = self.rule()
        return {name: getattr(rule, name) for name in RULE_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """The overlay's ``block_masking_config`` / the plugin's options (every field but the
        tracker-only ``require_assistant_section``, which serving always has on)."""
        out = asdict(self)
        out.pop("require_assistant_section")
        return out


# The options of the visibility rule itself, in the canonical form of BlockMaskingConfig.rule().
RULE_FIELDS = ("keep_last_n_blocks", "mask_delimiters", "keep_last_block_for_answer", "require_assistant_section")


def __getattr__(name: str) -> Any:
    if name == "MaskConfig":  # the training-side name before the two mask configs became one
        warnings.warn(
            "memento_train.masking.MaskConfig is deprecated; use BlockMaskingConfig (the same "
            "options; enable=false is keep_last_n_blocks=-1)",
            DeprecationWarning,
            stacklevel=2,
        )
        return BlockMaskingConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the tracker reacts to. ``im_start``/``assistant`` locate the assistant section."""

    block_start: int
    block_end: int
    summary_start: int
    summary_end: int
    im_start: int | None = None
    assistant: int | None = None

    @classmethod
    def from_mapping(cls, ids: Mapping[str, int]) -> SpecialTokens:
        """Build from a token-string → id mapping such as ``tokens.special_token_ids(tokenizer)``."""
        missing = [t for t in (BLOCK_START, BLOCK_END, SUMMARY_START, SUMMARY_END) if t not in ids]
        if missing:
            raise ValueError(
                f"special_token_ids lacks {missing}; add the memento tokens to the tokenizer "
                "(memento_train.tokens.add_memento_tokens) and pass their ids"
            )
        return cls(
            block_start=int(ids[BLOCK_START]),
            block_end=int(ids[BLOCK_END]),
            summary_start=int(ids[SUMMARY_START]),
            summary_end=int(ids[SUMMARY_END]),
            im_start=None if ids.get(IM_START) is None else int(ids[IM_START]),
            assistant=None if ids.get(ASSISTANT) is None else int(ids[ASSISTANT]),
        )


@dataclass
class Block:
    """One block as the tracker saw it. Positions are token indices in the stream."""

    index: int  # opening order, 0-based
    start: int  # position of <|block_start|>
    end: int | None = None  # position of <|block_end|>; None while open
    summary_start: int | None = None
    summary_end: int | None = None
    evicted_at: int | None = None  # row of the eviction (kill row of its keys)

    @property
    def complete(self) -> bool:
        return self.summary_end is not None

    def evicted_span(self, mask_delimiters: bool) -> tuple[int, int]:
        """Half-open key range that eviction removes (delimiters included iff mask_delimiters)."""
        assert self.end is not None, "only closed blocks are evicted"
        if mask_delimiters:
            return self.start, self.end + 1
        return self.start + 1, self.end


@dataclass(frozen=True)
class Eviction:
    """Block ``block`` stops being visible from query row ``row`` onward; keys ``[start, stop)``."""

    row: int
    block: int
    start: int
    stop: int


# Anomaly codes recorded while parsing; data validation turns them into rejection reasons.
STRAY_BLOCK_END = "stray_block_end"
STRAY_SUMMARY_START = "summary_without_block"
STRAY_SUMMARY_END = "stray_summary_end"
NESTED_BLOCK = "nested_block"
SUMMARY_INSIDE_BLOCK = "summary_inside_block"
BLOCK_INSIDE_SUMMARY = "block_inside_summary"


class BlockTracker:
    """Incremental state machine: feed one token at a time, get the evictions it triggers.

    The reference decoder drives it token by token to free KV entries physically; :func:`parse`
    drives it over a whole stream to compute kill rows. Both therefore apply the same rule.
    """

    def __init__(
        self,
        special: SpecialTokens,
        config: BlockMaskingConfig,
        *,
        prompt_len: int | None = None,
    ) -> None:
        if config.require_assistant_section and (special.im_start is None or special.assistant is None):
            raise ValueError(
                "require_assistant_section=True needs the ids of '<|im_start|>' and 'assistant' "
                "in special_token_ids (or set require_assistant_section=False)"
            )
        self.special = special
        self.config = config
        self._explicit_prompt_len = prompt_len
        self.tracking = not config.require_assistant_section
        # Without an assistant section everything is tracked from 0; otherwise prompt_len is known
        # once the assistant header has been seen.
        self.prompt_len: int | None = (prompt_len or 0) if self.tracking else None
        self.pos = 0
        self.blocks: list[Block] = []
        self.anomalies: list[tuple[int, str]] = []
        self._open: list[Block] = []  # stack of open blocks
        self._open_summary: Block | None = None
        self._pending: deque[Block] = deque()
        self._recent_im_start: int | None = None

    # -- queries -----------------------------------------------------------------------------
    @property
    def open_blocks(self) -> list[Block]:
        return list(self._open)

    @property
    def pending(self) -> list[Block]:
        """Complete, not yet evicted blocks, oldest first."""
        return list(self._pending)

    def _in_prompt(self) -> bool:
        return self.prompt_len is None or self.pos < self.prompt_len

    # -- the state machine -------------------------------------------------------------------
    def step(self, token_id: int) -> tuple[Kind, int, list[Eviction]]:
        """Consume the token at position ``self.pos``.

        Returns its kind, its block index (-1 if none) and the evictions that take effect *before*
        this token is consumed (its own row already does not see them).
        """
        pos, sp = self.pos, self.special
        evictions: list[Eviction] = []
        if not self.tracking:
            kind, block_idx = Kind.PROMPT, -1
            if sp.im_start is not None and token_id == sp.im_start:
                self._recent_im_start = pos
            elif token_id == sp.assistant and self._recent_im_start is not None and pos - self._recent_im_start <= 2:
                self.tracking = True  # the assistant token itself is not tracked
                self.prompt_len = pos + 1 if self._explicit_prompt_len is None else self._explicit_prompt_len
            self.pos += 1
            return kind, block_idx, evictions

        may_evict = self.config.evicts and not self._in_prompt()
        if may_evict and pos == self.prompt_len:
            # The serving scheduler's deferred compaction after prefill: before the first generated
            # token, every completed prompt block beyond keep_last_n_blocks is dropped at once.
            while len(self._pending) > self.config.keep_last_n_blocks:
                evictions.append(self._evict_oldest(pos))
        if token_id == sp.block_start:
            if may_evict and self.config.keep_last_block_for_answer and self._pending:
                evictions.append(self._evict_oldest(pos))
            if self._open:
                self.anomalies.append((pos, NESTED_BLOCK))
            if self._open_summary is not None:
                self.anomalies.append((pos, BLOCK_INSIDE_SUMMARY))
            block = Block(index=len(self.blocks), start=pos)
            self.blocks.append(block)
            self._open.append(block)
            kind, block_idx = Kind.BLOCK_DELIM, block.index
        elif token_id == sp.block_end:
            if self._open:
                block = self._open.pop()
                block.end = pos
                kind, block_idx = Kind.BLOCK_DELIM, block.index
            else:
                self.anomalies.append((pos, STRAY_BLOCK_END))
                kind, block_idx = self._content_kind()
        elif token_id == sp.summary_start:
            target = next(
                (b for b in reversed(self.blocks) if b.end is not None and b.summary_start is None),
                None,
            )
            if target is None:
                self.anomalies.append((pos, STRAY_SUMMARY_START))
                kind, block_idx = self._content_kind()
            else:
                if self._open:
                    self.anomalies.append((pos, SUMMARY_INSIDE_BLOCK))
                target.summary_start = pos
                # A second summary_start while one is open re-targets the open summary, as the
                # serving tracker keeps a single "current summary" slot.
                self._open_summary = target
                kind, block_idx = Kind.SUMMARY_DELIM, target.index
        elif token_id == sp.summary_end:
            block = self._open_summary
            if block is None:
                self.anomalies.append((pos, STRAY_SUMMARY_END))
                kind, block_idx = self._content_kind()
            else:
                block.summary_end = pos
                self._open_summary = None
                self._pending.append(block)
                if (
                    may_evict
                    and not self.config.keep_last_block_for_answer
                    and len(self._pending) > self.config.keep_last_n_blocks
                ):
                    evictions.append(self._evict_oldest(pos))
                kind, block_idx = Kind.SUMMARY_DELIM, block.index
        else:
            kind, block_idx = self._content_kind()
        if self._in_prompt():
            kind = Kind.PROMPT
        self.pos += 1
        return kind, block_idx, evictions

    def _content_kind(self) -> tuple[Kind, int]:
        if self._open_summary is not None:
            return Kind.SUMMARY, self._open_summary.index
        if self._open:
            return Kind.BLOCK, self._open[-1].index
        return Kind.OTHER, -1

    def _evict_oldest(self, row: int) -> Eviction:
        block = self._pending.popleft()
        block.evicted_at = row
        start, stop = block.evicted_span(self.config.mask_delimiters)
        return Eviction(row=row, block=block.index, start=start, stop=stop)


@dataclass
class ParsedStream:
    """Per-token results of running the tracker over a whole stream."""

    kinds: np.ndarray  # int8 [n], Kind values
    block_ids: np.ndarray  # int32 [n], block index or -1
    kill_row: np.ndarray  # int64 [n], first row that no longer sees key k (n if never)
    blocks: list[Block]
    evictions: list[Eviction]
    prompt_len: int  # first position where evictions may happen (n if no assistant section)
    anomalies: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.kill_row.shape[0])


def parse(
    token_ids: Sequence[int] | np.ndarray,
    special: SpecialTokens | Mapping[str, int],
    config: BlockMaskingConfig,
    *,
    prompt_len: int | None = None,
) -> ParsedStream:
    """Run the visibility rule over one document's token ids."""
    if not isinstance(special, SpecialTokens):
        special = SpecialTokens.from_mapping(special)
    ids = np.asarray(token_ids, dtype=np.int64).tolist()
    n = len(ids)
    tracker = BlockTracker(special, config, prompt_len=prompt_len)
    kinds = np.empty(n, dtype=np.int8)
    block_ids = np.empty(n, dtype=np.int32)
    kill_row = np.full(n, n, dtype=np.int64)
    evictions: list[Eviction] = []
    for i, tok in enumerate(ids):
        kind, block_idx, evs = tracker.step(tok)
        kinds[i] = kind
        block_ids[i] = block_idx
        for ev in evs:
            # Overlapping spans (nested blocks): the earliest eviction wins.
            np.minimum(kill_row[ev.start : ev.stop], ev.row, out=kill_row[ev.start : ev.stop])
            evictions.append(ev)
    return ParsedStream(
        kinds=kinds,
        block_ids=block_ids,
        kill_row=kill_row,
        blocks=tracker.blocks,
        evictions=evictions,
        prompt_len=n if tracker.prompt_len is None else tracker.prompt_len,
        anomalies=tracker.anomalies,
    )


def kill_rows(
    token_ids: Sequence[int],
    special_token_ids: Mapping[str, int],
    *,
    keep_last_n_blocks: int,
    mask_delimiters: bool,
    keep_last_block_for_answer: bool = False,
    require_assistant_section: bool = True,
    prompt_len: int | None = None,
) -> list[int]:
    """Entry k: the first query row that can no longer see key k, or ``len(token_ids)`` if never."""
    config = BlockMaskingConfig(
        keep_last_n_blocks=keep_last_n_blocks,
        mask_delimiters=mask_delimiters,
        keep_last_block_for_answer=keep_last_block_for_answer,
        require_assistant_section=require_assistant_section,
    )
    return parse(token_ids, special_token_ids, config, prompt_len=prompt_len).kill_row.tolist()


# -- dense reference mask ---------------------------------------------------------------------
def dense_mask(
    kill_row: Sequence[int] | np.ndarray,
    cu_seqlens: Sequence[int] | np.ndarray | None = None,
    *,
    window: int | None = None,
) -> np.ndarray:
    """Boolean ``[n, n]`` matrix, True where query row q may attend to key k.

    ``kill_row`` is in the same coordinates as the rows (global for a packed batch);
    ``cu_seqlens`` gives document boundaries (one document if None); ``window`` adds the
    sliding-window limit ``q - k < window``.
    """
    kr = np.asarray(kill_row, dtype=np.int64)
    n = kr.shape[0]
    q = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    mask = (k <= q) & (q < kr[None, :])
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens, n)
        mask &= doc[:, None] == doc[None, :]
    if window is not None:
        mask &= (q - k) < window
    return mask


def document_ids(cu_seqlens: Sequence[int] | np.ndarray, n: int | None = None) -> np.ndarray:
    """Document index of every packed position from ``cu_seqlens`` (``[0, len0, len0+len1, ...]``)."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    n = int(cu[-1]) if n is None else n
    return np.searchsorted(cu, np.arange(n), side="right") - 1


# -- KV accounting ----------------------------------------------------------------------------
def live_kv_trace(kill_row: Sequence[int] | np.ndarray, *, window: int | None = None) -> np.ndarray:
    """Live KV entries when row q is processed: ``#{k <= q : q < kill_row[k] (and q - k < window)}``.

    This is what an evicting decoder holds in its cache at step q (the new token included).
    """
    kr = np.asarray(kill_row, dtype=np.int64)
    n = kr.shape[0]
    # Key k is live on rows [k, min(kill_row[k], k + window)): a difference array counts them.
    stop = np.minimum(kr, n)
    if window is not None:
        stop = np.minimum(stop, np.arange(n) + window)
    delta = np.zeros(n + 1, dtype=np.int64)
    np.add.at(delta, np.arange(n), 1)
    np.add.at(delta, np.maximum(stop, np.arange(n)), -1)
    return np.cumsum(delta)[:n]


@dataclass(frozen=True)
class KVStats:
    """Peak and area-under-curve of the live KV cache over one stream, in tokens."""

    peak: int
    auc: int
    num_tokens: int

    def to_gb(self, bytes_per_token: int) -> tuple[float, float]:
        """(peak GB, AUC GB·tokens) for a model with ``bytes_per_token`` of KV per token."""
        return self.peak * bytes_per_token / 1e9, self.auc * bytes_per_token / 1e9


def kv_stats(kill_row: Sequence[int] | np.ndarray, *, window: int | None = None) -> KVStats:
    """Peak and AUC of :func:`live_kv_trace`."""
    trace = live_kv_trace(kill_row, window=window)
    return KVStats(peak=int(trace.max()) if trace.size else 0, auc=int(trace.sum()), num_tokens=int(trace.size))


def kv_bytes_per_token(model_config, dtype_bytes: int = 2) -> int:
    """KV bytes one token occupies across all layers: layers × kv_heads × head_dim × 2 (K and V) × bytes.

    Accepts an HF ``PretrainedConfig`` (or anything with the same attribute names).
    """
    layers = int(model_config.num_hidden_layers)
    heads = int(getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads)
    head_dim = getattr(model_config, "head_dim", None) or (model_config.hidden_size // model_config.num_attention_heads)
    return layers * heads * int(head_dim) * 2 * dtype_bytes
