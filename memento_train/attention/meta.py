"""Metadata shared by every memento-attention backend, and the interval plan derived from it.

A packed batch holds documents back to back (``cu_seqlens``). For every key position ``kill_row``
is the first query row (global, packed coordinates) that no longer sees it; a key never evicted has
``kill_row`` equal to its document's end. With that, every backend implements one predicate
(docs/architecture.md §2, FlashMask's column-wise form)::

    visible(q, k) = same_doc(q, k) and k <= q and q < kill_row[k]   [and q - k < window]

Backends compute the same thing in different ways; the metadata is built once per batch and its
derived structures (interval plans, flex block masks) are cached on it, so every layer reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class IntervalPlan:
    """Exact interval formulation of the memento mask (docs/architecture.md §4).

    Each document is cut at its distinct kill rows. Every query row in an interval ``[a, b)`` sees
    the same set of older keys (those with ``kill_row > a``), so the interval is one attention
    segment whose keys are those gathered older keys followed by the interval's own tokens, with
    causal *bottom-right* alignment. Intervals partition the packed rows in order, so queries need
    no gather; keys are ``key_index[cu_k[i]:cu_k[i+1]]``.
    """

    cu_q: torch.Tensor  # int32 [I+1], interval boundaries over packed rows
    cu_k: torch.Tensor  # int32 [I+1], offsets into key_index
    key_index: torch.Tensor  # int64 [sum of segment key lengths], packed key positions
    max_q: int
    max_k: int

    @property
    def num_intervals(self) -> int:
        return int(self.cu_q.numel()) - 1


class DerivedCache:
    """The structures derived from one batch's metadata (interval plan, flex block masks, tile plans),
    built on first use and shared by every layer.

    Deliberately not a dict: tree-mapping utilities copy dicts and dataclasses field by field (FSDP2's
    mixed-precision cast of forward inputs does so at every wrapped layer), so a dict would reach each
    layer as a fresh copy, empty if taken before the first layer filled it, and every layer would
    rebuild the plans. Other objects pass through those utilities as they are, so all copies of one
    batch's metadata share this one.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict = {}

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __getitem__(self, key):
        return self._entries[key]

    def __setitem__(self, key, value) -> None:
        self._entries[key] = value

    def get(self, key, default=None):
        return self._entries.get(key, default)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class MementoAttentionMeta:
    """Per-batch metadata: document boundaries and kill rows, in packed coordinates."""

    cu_seqlens: torch.Tensor  # int32 [D+1]
    kill_row: torch.Tensor  # int32 [T]
    max_seqlen: int
    _cache: DerivedCache = field(default_factory=DerivedCache, repr=False, compare=False)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_packed(
        cls,
        cu_seqlens: Sequence[int] | np.ndarray | torch.Tensor,
        kill_row: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        device: torch.device | str | None = None,
    ) -> MementoAttentionMeta:
        """Validate and wrap packed metadata (``kill_row`` already in global coordinates)."""
        cu = torch.as_tensor(np.asarray(cu_seqlens), dtype=torch.int64)
        kr = torch.as_tensor(np.asarray(kill_row), dtype=torch.int64)
        if cu.ndim != 1 or cu.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be 1-D with at least 2 entries ([0, len_0, ...]); got shape {tuple(cu.shape)}"
            )
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing; got {cu.tolist()[:8]}...")
        total = int(cu[-1])
        if kr.ndim != 1 or kr.numel() != total:
            raise ValueError(f"kill_row has {kr.numel()} entries but cu_seqlens covers {total} tokens")
        doc_end = cu[1:].repeat_interleave(cu[1:] - cu[:-1])
        pos = torch.arange(total)
        if bool((kr <= pos).any()):
            k = int(torch.nonzero(kr <= pos)[0])
            raise ValueError(f"kill_row[{k}]={int(kr[k])} <= {k}: a key must at least see itself")
        # Anything past the document's end means "never evicted"; clamp so backends can rely on it.
        kr = torch.minimum(kr, doc_end)
        lengths = cu[1:] - cu[:-1]
        meta = cls(
            cu_seqlens=cu.to(torch.int32),
            kill_row=kr.to(torch.int32),
            max_seqlen=int(lengths.max()) if lengths.numel() else 0,
        )
        return meta.to(device) if device is not None else meta

    @classmethod
    def from_documents(
        cls,
        local_kill_rows: Sequence[Sequence[int] | np.ndarray],
        *,
        device: torch.device | str | None = None,
    ) -> MementoAttentionMeta:
        """Pack per-document kill rows (as returned by ``masking.kill_rows``) into one batch."""
        lengths = [len(kr) for kr in local_kill_rows]
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        glob = (
            np.concatenate([np.asarray(kr, dtype=np.int64) + cu[i] for i, kr in enumerate(local_kill_rows)])
            if lengths
            else np.zeros(0, dtype=np.int64)
        )
        return cls.from_packed(cu, glob, device=device)

    @classmethod
    def causal(cls, cu_seqlens, *, device=None) -> MementoAttentionMeta:
        """Plain causal attention per document (stage 1 / no eviction)."""
        cu = np.asarray(torch.as_tensor(cu_seqlens).cpu(), dtype=np.int64)
        lengths = np.diff(cu)
        return cls.from_packed(cu, np.repeat(cu[1:], lengths), device=device)

    def to(self, device: torch.device | str) -> MementoAttentionMeta:
        """Move tensors; derived caches are rebuilt lazily on the new device."""
        return MementoAttentionMeta(
            cu_seqlens=self.cu_seqlens.to(device),
            kill_row=self.kill_row.to(device),
            max_seqlen=self.max_seqlen,
        )

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.kill_row.numel())

    @property
    def num_docs(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def has_eviction(self) -> bool:
        """Whether any key is evicted inside its document (cached: on GPU the test synchronises)."""
        if "has_eviction" not in self._cache:
            self._cache["has_eviction"] = bool((self.kill_row.long() < self.doc_end()).any())
        return self._cache["has_eviction"]

    def doc_end(self) -> torch.Tensor:
        cu = self.cu_seqlens.long()
        return cu[1:].repeat_interleave(cu[1:] - cu[:-1])

    def doc_ids(self) -> torch.Tensor:
        cu = self.cu_seqlens.long()
        return torch.repeat_interleave(torch.arange(self.num_docs, device=cu.device), cu[1:] - cu[:-1])

    def kept_pairs(self, window: int | None = None) -> int:
        """Number of visible (q, k) pairs: the work an exact kernel must do."""
        k = torch.arange(self.num_tokens, device=self.kill_row.device)
        stop = self.kill_row.long()
        if window is not None:
            stop = torch.minimum(stop, k + window)
        return int((stop - k).sum())

    def causal_pairs(self, window: int | None = None) -> int:
        """Visible pairs of plain causal attention over the same documents (the yardstick)."""
        k = torch.arange(self.num_tokens, device=self.kill_row.device)
        stop = self.doc_end()
        if window is not None:
            stop = torch.minimum(stop, k + window)
        return int((stop - k).sum())

    def interval_plan(self) -> IntervalPlan:
        """The interval formulation (cached): see :class:`IntervalPlan`."""
        plan = self._cache.get("interval_plan")
        if plan is None:
            plan = _build_interval_plan(self.cu_seqlens.cpu(), self.kill_row.cpu())
            plan = IntervalPlan(
                cu_q=plan.cu_q.to(self.kill_row.device),
                cu_k=plan.cu_k.to(self.kill_row.device),
                key_index=plan.key_index.to(self.kill_row.device),
                max_q=plan.max_q,
                max_k=plan.max_k,
            )
            self._cache["interval_plan"] = plan
        return plan


def _build_interval_plan(cu_seqlens: torch.Tensor, kill_row: torch.Tensor) -> IntervalPlan:
    cu = cu_seqlens.long().numpy()
    kr = kill_row.long().numpy()
    cu_q, cu_k, keys = [0], [0], []
    max_q = max_k = 0
    for d in range(len(cu) - 1):
        s, e = int(cu[d]), int(cu[d + 1])
        if e == s:
            continue
        doc_kr = kr[s:e]
        cuts = np.unique(doc_kr[doc_kr < e])
        bounds = np.concatenate([[s], cuts[cuts > s], [e]])
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            # Older keys alive for the whole interval: kill rows are interval boundaries, so
            # kill_row > a implies kill_row >= b.
            older = np.nonzero(doc_kr[: a - s] > a)[0] + s
            seg = np.concatenate([older, np.arange(a, b)])
            keys.append(seg)
            cu_q.append(b)
            cu_k.append(cu_k[-1] + seg.size)
            max_q, max_k = max(max_q, b - a), max(max_k, seg.size)
    key_index = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    return IntervalPlan(
        cu_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_k=torch.tensor(cu_k, dtype=torch.int32),
        key_index=torch.from_numpy(key_index.astype(np.int64)),
        max_q=max_q,
        max_k=max_k,
    )
