"""Tile metadata for the Triton kernel: which (query tile, key tile) pairs hold any kept pair.

Pure PyTorch, no Triton: built once per batch, block shape and window, and cached on the
:class:`~memento_train.attention.MementoAttentionMeta`, so every layer reuses it.

Tiles are *document-aligned*: a document ``[s, e)`` is cut into query tiles ``s + i*BLOCK_M`` and
key tiles ``s + j*BLOCK_N`` (the last ones short), so no tile straddles two documents and a pair
of tiles from different documents is never even listed. For each key tile we take the minimum and
maximum of ``kill_row`` over its keys (FlashMask's per-tile min/max, docs/architecture.md §4). A tile pair
with query rows ``[q0, q1)`` and keys ``[k0, k1)`` (``q1``/``k1`` clipped to the document end)

* is **dead** (skipped, never loaded) unless ``k0 < q1`` (some key is not after every query),
  ``max_kill > q0`` (some key is still alive at the first query row) and, with a sliding window,
  ``q0 - (k1 - 1) < window``. If any ``(q, k)`` in the tile is visible, all three hold
  (``k0 <= k <= q < q1``; ``max_kill >= kill_row[k] > q >= q0``; ``q0 - (k1-1) <= q - k``),
  so a tile with a kept pair is never skipped;
* is **full** (computed without any mask) when every pair is visible: ``k0 + BLOCK_N - 1 <= q0``
  (the whole nominal key tile is at or before the first query), ``min_kill >= q0 + BLOCK_M`` (every
  key outlives the last nominal query row, which also puts the whole query tile inside the
  document, since ``kill_row <= document end``) and ``q0 + BLOCK_M - 1 - k0 < window``;
* is **partial** otherwise (live but not full): the kernel applies the exact per-element mask.

The live pairs are stored twice in CSR form: by query tile (forward and dQ iterate a query tile's
key tiles) and by key tile (dK/dV iterate a key tile's query tiles). The lists hold the other
tile's *first row*, not its index, so a kernel needs one load per visited tile, not two chained
ones. ``*_order`` lists tiles by decreasing work so the longest programs start first and the tail
of the grid is short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TilePlan:
    """Live tile pairs of one batch for one ``(BLOCK_M, BLOCK_N, window)``."""

    block_m: int
    block_n: int
    q_start: torch.Tensor  # int32 [NQ] first packed row of each query tile
    q_end: torch.Tensor  # int32 [NQ] one past its last row (clipped to the document end)
    k_start: torch.Tensor  # int32 [NK]
    k_end: torch.Tensor  # int32 [NK]
    k_kill_min: torch.Tensor  # int32 [NK] min kill_row over the tile's keys
    k_kill_max: torch.Tensor  # int32 [NK] max kill_row over the tile's keys
    # by query tile i: first rows of its key tiles, rows[ptr[i]:ptr[i+1]]; partial and full apart
    q_partial_ptr: torch.Tensor
    q_partial_rows: torch.Tensor
    q_full_ptr: torch.Tensor
    q_full_rows: torch.Tensor
    # by key tile j: first rows of its query tiles
    k_partial_ptr: torch.Tensor
    k_partial_rows: torch.Tensor
    k_full_ptr: torch.Tensor
    k_full_rows: torch.Tensor
    q_order: torch.Tensor  # int32 [NQ] query tiles, most live key tiles first
    k_order: torch.Tensor  # int32 [NK] key tiles, most live query tiles first
    causal_pairs: int  # tile pairs plain causal attention would visit (same tiling)

    def check_grid(self, tiles: int) -> int:
        """Kernels put tiles on the launch grid's second axis, which CUDA caps at 65,535 blocks."""
        if tiles > 65535:
            raise ValueError(
                f"{tiles} tiles of {self.block_m}x{self.block_n} exceed the 65,535-block grid axis: "
                "split the packed batch or use larger blocks"
            )
        return tiles

    @property
    def num_q_tiles(self) -> int:
        return int(self.q_start.numel())

    @property
    def num_k_tiles(self) -> int:
        return int(self.k_start.numel())

    @property
    def live_pairs(self) -> int:
        return int(self.q_partial_rows.numel() + self.q_full_rows.numel())

    @property
    def full_pairs(self) -> int:
        return int(self.q_full_rows.numel())

    def pair_mask(self, kind: str = "live", by: str = "q") -> torch.Tensor:
        """Dense ``[NQ, NK]`` boolean of the ``live``/``full``/``partial`` tile pairs, read from the
        by-query (``by="q"``) or by-key (``by="k"``) lists. For tests and reports (small batches)."""
        dense = torch.zeros(self.num_q_tiles, self.num_k_tiles, dtype=torch.bool, device=self.q_start.device)
        lists = {"partial": ["partial"], "full": ["full"], "live": ["partial", "full"]}[kind]
        for name in lists:
            ptr, rows = getattr(self, f"{by}_{name}_ptr"), getattr(self, f"{by}_{name}_rows")
            n = ptr.numel() - 1
            own = torch.repeat_interleave(torch.arange(n, device=ptr.device), ptr.diff())
            other = torch.searchsorted(self.k_start if by == "q" else self.q_start, rows)  # starts increase
            dense[(own, other) if by == "q" else (other, own)] = True
        return dense


def _doc_tiles(cu: torch.Tensor, block: int):
    """Document-aligned tiles: (start, end, first tile index of each doc, tile count per doc)."""
    lengths = cu[1:] - cu[:-1]
    counts = (lengths + block - 1) // block
    first = torch.cumsum(counts, 0) - counts
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), counts)
    local = torch.arange(int(counts.sum()), device=cu.device) - first[doc]
    start = cu[doc] + local * block
    end = torch.minimum(start + block, cu[doc + 1])
    return start, end, doc, first, counts


def _csr(group: torch.Tensor, member: torch.Tensor, num_groups: int):
    """CSR (ptr, idx) of ``member`` grouped by ``group`` (stable within a group)."""
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=num_groups)
    ptr = torch.zeros(num_groups + 1, dtype=torch.int64, device=group.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr.to(torch.int32), member[order].to(torch.int32)


def build_tile_plan(
    cu_seqlens: torch.Tensor, kill_row: torch.Tensor, block_m: int, block_n: int, window: int | None = None
) -> TilePlan:
    """Classify every same-document, causal-reachable tile pair as dead, partial or full."""
    cu = cu_seqlens.long()
    kill = kill_row.long()
    device = kill.device
    q_start, q_end, q_doc, _, _ = _doc_tiles(cu, block_m)
    k_start, k_end, _, k_first, _ = _doc_tiles(cu, block_n)
    nq, nk = q_start.numel(), k_start.numel()

    # Per key tile min/max kill row (segment reduction over each tile's keys).
    tile_of_key = torch.repeat_interleave(torch.arange(nk, device=device), k_end - k_start)
    k_kill_min = torch.full((nk,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    k_kill_max = torch.zeros(nk, dtype=torch.int64, device=device)
    k_kill_min.scatter_reduce_(0, tile_of_key, kill, reduce="amin")
    k_kill_max.scatter_reduce_(0, tile_of_key, kill, reduce="amax")

    # Candidate pairs: for each query tile, the key tiles of its document from the first one up to
    # the one holding its last row (the causal triangle of tiles), as a ragged arange.
    last_k_tile = k_first[q_doc] + (q_end - 1 - cu[q_doc]) // block_n
    counts = last_k_tile - k_first[q_doc] + 1
    causal_pairs = int(counts.sum())
    pair_q = torch.repeat_interleave(torch.arange(nq, device=device), counts)
    first_pair = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(causal_pairs, device=device) - torch.repeat_interleave(first_pair, counts)
    pair_k = k_first[q_doc][pair_q] + offsets

    q0, q1 = q_start[pair_q], q_end[pair_q]
    k0, k1 = k_start[pair_k], k_end[pair_k]
    kmin, kmax = k_kill_min[pair_k], k_kill_max[pair_k]
    live = (k0 < q1) & (kmax > q0)
    full = (k0 + block_n - 1 <= q0) & (kmin >= q0 + block_m)
    if window is not None:
        live &= q0 - (k1 - 1) < window
        full &= q0 + block_m - 1 - k0 < window
    full &= live
    partial = live & ~full

    qp_ptr, qp_rows = _csr(pair_q[partial], k0[partial], nq)
    qf_ptr, qf_rows = _csr(pair_q[full], k0[full], nq)
    kp_ptr, kp_rows = _csr(pair_k[partial], q0[partial], nk)
    kf_ptr, kf_rows = _csr(pair_k[full], q0[full], nk)
    q_work = qp_ptr.diff() + qf_ptr.diff()
    k_work = kp_ptr.diff() + kf_ptr.diff()
    return TilePlan(
        block_m=block_m,
        block_n=block_n,
        q_start=q_start.to(torch.int32),
        q_end=q_end.to(torch.int32),
        k_start=k_start.to(torch.int32),
        k_end=k_end.to(torch.int32),
        k_kill_min=k_kill_min.to(torch.int32),
        k_kill_max=k_kill_max.to(torch.int32),
        q_partial_ptr=qp_ptr,
        q_partial_rows=qp_rows,
        q_full_ptr=qf_ptr,
        q_full_rows=qf_rows,
        k_partial_ptr=kp_ptr,
        k_partial_rows=kp_rows,
        k_full_ptr=kf_ptr,
        k_full_rows=kf_rows,
        q_order=torch.argsort(q_work, descending=True, stable=True).to(torch.int32),
        k_order=torch.argsort(k_work, descending=True, stable=True).to(torch.int32),
        causal_pairs=causal_pairs,
    )


def tile_plan(meta, block_m: int, block_n: int, window: int | None = None) -> TilePlan:
    """:func:`build_tile_plan` for ``meta``, cached on it (one per block shape and window)."""
    key = ("triton_tile_plan", block_m, block_n, window)
    plan = meta._cache.get(key)
    if plan is None:
        plan = build_tile_plan(meta.cu_seqlens, meta.kill_row, block_m, block_n, window)
        meta._cache[key] = plan
    return plan
