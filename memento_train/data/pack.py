"""Pack rendered documents into micro-batches of at most ``max_tokens`` tokens.

Bin packing is best-fit decreasing: documents sorted longest first, each placed in the open bin with
the least room that still fits it, a new bin when none does. The order of documents inside a bin is
the order in which they were placed (longest first).

A :class:`PackedBatch` is one flat stream of ``T`` tokens holding ``D`` documents back to back:

- ``labels`` are **already shifted, per document**: ``labels[t] = input_ids[t + 1]`` when ``t + 1`` is
  in the same document and that next token is trained (not prompt), else ``-100``. In particular the
  last position of every document is ``-100``, so no document predicts the next document's first
  token. The loss is ``cross_entropy(logits[t], labels[t])`` with **no further shifting**.
- ``position_ids`` restart at 0 for each document (logical positions, evicted tokens included).
- ``cu_seqlens`` (int32, ``[D + 1]``) are the document boundaries ``[0, len0, len0 + len1, ..., T]``.
- ``kill_row`` (int32) is in *global packed coordinates*: ``doc_start + local kill row``, so a key
  that is never evicted has ``kill_row == its document's end`` (``cu_seqlens[d + 1]``); the attention
  rule is ``same_doc(q, k) and k <= q < kill_row[k]``.
- ``kinds`` (int8) are :class:`memento_train.masking.Kind` values.

Padding (``pad_to``): the stream is padded to a multiple of ``pad_to`` with ``pad_token_id``; the
padding forms one extra trailing pseudo-document in ``cu_seqlens`` (so varlen kernels never attend
across it), with ``labels = -100``, positions restarting at 0, ``kinds = OTHER`` and kill rows at its
own end. ``doc_lengths``/``record_ids`` list the real documents only; ``num_pad`` counts padding.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memento_train.masking import Kind

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One packed micro-batch; see the module docstring for the meaning of each tensor."""

    input_ids: torch.Tensor  # int64 [T]
    labels: torch.Tensor  # int64 [T], shifted per document
    position_ids: torch.Tensor  # int64 [T]
    cu_seqlens: torch.Tensor  # int32 [D + 1] (+1 more if padded)
    kill_row: torch.Tensor  # int32 [T], global
    kinds: torch.Tensor  # int8 [T]
    doc_lengths: torch.Tensor  # int32 [D], real documents only
    max_seqlen: int
    num_pad: int = 0
    record_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class PackingStats:
    """How well documents filled the bins.

    ``efficiency = real_tokens / (num_bins * max_tokens)``: the fraction of a fixed ``max_tokens``
    budget per micro-batch that holds real tokens; ``padding_pct`` is the rest in percent.
    """

    num_docs: int
    num_bins: int
    real_tokens: int
    max_tokens: int

    @property
    def capacity(self) -> int:
        return self.num_bins * self.max_tokens

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.capacity if self.capacity else 0.0

    @property
    def padding_pct(self) -> float:
        return 100.0 * (1.0 - self.efficiency) if self.capacity else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_docs": self.num_docs,
            "num_bins": self.num_bins,
            "real_tokens": self.real_tokens,
            "max_tokens": self.max_tokens,
            "efficiency": self.efficiency,
            "padding_pct": self.padding_pct,
        }

    def __str__(self) -> str:
        return (
            f"packing: {self.num_docs} docs into {self.num_bins} bins of {self.max_tokens} tokens, "
            f"efficiency {100 * self.efficiency:.1f}% (padding {self.padding_pct:.1f}%)"
        )


class OverlongDocumentError(ValueError):
    """A document does not fit the packing budget."""


# -- bin planning -----------------------------------------------------------------------------------
def plan_bins(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: indices of ``lengths`` grouped into bins whose sums are ``<= max_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lens = [int(n) for n in lengths]
    for i, n in enumerate(lens):
        if n > max_tokens:
            raise OverlongDocumentError(
                f"document {i} has {n} tokens > max_tokens={max_tokens}; truncate it "
                "(data.overlong='truncate' with data.max_seq_len <= max_tokens) or raise max_tokens"
            )
        if n < 1:
            raise ValueError(f"document {i} is empty; every packed document needs at least one token")
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    bins: list[list[int]] = []
    # Open bins keyed by remaining room, kept sorted: (room, bin index).
    rooms: list[tuple[int, int]] = []
    for i in order:
        n = lens[i]
        j = bisect.bisect_left(rooms, (n, -1))
        if j < len(rooms):
            room, b = rooms.pop(j)
        else:
            room, b = max_tokens, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(rooms, (room - n, b))
    return bins


# -- collation ------------------------------------------------------------------------------------------
@dataclass
class _Doc:
    input_ids: np.ndarray
    labels: np.ndarray  # unshifted, -100 on the prompt
    kinds: np.ndarray
    kill_row: np.ndarray  # local
    record_id: str


def _as_doc(x: Any) -> _Doc:
    get = (lambda k, d=None: x.get(k, d)) if isinstance(x, Mapping) else (lambda k, d=None: getattr(x, k, d))
    ids = np.asarray(get("input_ids"), dtype=np.int64)
    n = ids.shape[0]
    labels = get("labels")
    if labels is None:
        labels = ids.copy()
        labels[: int(get("prompt_len", 0))] = IGNORE_INDEX
    kinds = get("kinds")
    kill = get("kill_row")
    doc = _Doc(
        input_ids=ids,
        labels=np.asarray(labels, dtype=np.int64),
        kinds=np.full(n, Kind.OTHER, np.int8) if kinds is None else np.asarray(kinds, dtype=np.int8),
        kill_row=np.full(n, n, np.int64) if kill is None else np.asarray(kill, dtype=np.int64),
        record_id=str(get("record_id", "") or ""),
    )
    if not (doc.labels.shape[0] == doc.kinds.shape[0] == doc.kill_row.shape[0] == n):
        raise ValueError(f"document {doc.record_id!r}: input_ids/labels/kinds/kill_row lengths differ")
    return doc


def shift_labels(labels: np.ndarray) -> np.ndarray:
    """Per-document shift: ``out[t] = labels[t + 1]``, ``-100`` at the last position."""
    out = np.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    return out


def collate(examples: Sequence[Any], *, pad_to: int | None = None, pad_token_id: int = 0) -> PackedBatch:
    """Concatenate documents (``RenderedExample``s or mappings with ``input_ids``/``labels``/``kinds``/
    ``kill_row``) into one :class:`PackedBatch`, in the given order."""
    if not examples:
        raise ValueError("collate needs at least one document")
    docs = [_as_doc(x) for x in examples]
    lengths = [d.input_ids.shape[0] for d in docs]
    if min(lengths) < 1:
        raise ValueError("collate got an empty document")
    total = sum(lengths)
    num_pad = 0
    if pad_to is not None:
        if pad_to < 1:
            raise ValueError(f"pad_to must be >= 1, got {pad_to}")
        num_pad = (-total) % pad_to
    seg_lengths = lengths + ([num_pad] if num_pad else [])
    cu = np.zeros(len(seg_lengths) + 1, dtype=np.int64)
    cu[1:] = np.cumsum(seg_lengths)
    ids, labels, pos, kill, kinds = [], [], [], [], []
    for d, start in zip(docs, cu[:-1]):
        ids.append(d.input_ids)
        labels.append(shift_labels(d.labels))
        pos.append(np.arange(d.input_ids.shape[0], dtype=np.int64))
        kill.append(np.minimum(d.kill_row, d.input_ids.shape[0]) + start)
        kinds.append(d.kinds)
    if num_pad:
        end = int(cu[-1])
        ids.append(np.full(num_pad, pad_token_id, np.int64))
        labels.append(np.full(num_pad, IGNORE_INDEX, np.int64))
        pos.append(np.arange(num_pad, dtype=np.int64))
        kill.append(np.full(num_pad, end, np.int64))
        kinds.append(np.full(num_pad, Kind.OTHER, np.int8))
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(ids)),
        labels=torch.from_numpy(np.concatenate(labels)),
        position_ids=torch.from_numpy(np.concatenate(pos)),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        kill_row=torch.from_numpy(np.concatenate(kill).astype(np.int32)),
        kinds=torch.from_numpy(np.concatenate(kinds).astype(np.int8)),
        doc_lengths=torch.tensor(lengths, dtype=torch.int32),
        max_seqlen=int(max(seg_lengths)),
        num_pad=num_pad,
        record_ids=[d.record_id for d in docs],
    )


def _length(x: Any) -> int:
    ids = x.get("input_ids") if isinstance(x, Mapping) else x.input_ids
    return len(ids)


def pack_examples(
    examples: Sequence[Any], max_tokens: int, *, pad_to: int | None = None, pad_token_id: int = 0
) -> tuple[list[PackedBatch], PackingStats]:
    """Best-fit-decreasing pack ``examples`` into batches of at most ``max_tokens`` real tokens.

    With ``pad_to`` each batch is padded up to a multiple of it (the padded length may then exceed
    ``max_tokens`` unless ``max_tokens`` is itself a multiple of ``pad_to``).
    """
    lengths = [_length(x) for x in examples]
    bins = plan_bins(lengths, max_tokens)
    batches = [collate([examples[i] for i in b], pad_to=pad_to, pad_token_id=pad_token_id) for b in bins]
    stats = PackingStats(len(lengths), len(bins), sum(lengths), max_tokens)
    return batches, stats
