"""Device functions shared by the forward and backward kernels: tile loads/stores and the mask.

Every kernel reads tiles of rows from ``[T, H, D]`` tensors (one head at a time, unit stride over
the head dim) and per-row vectors (``kill_row``, LSE, delta). ``MASKED`` is a compile-time switch:
*partial* tiles (and the program's own, possibly short, tile) guard every row against ``limit``;
*full* tiles lie inside their document and load without bounds checks.

The visibility predicate is the one of :mod:`memento_train.masking`, on packed rows:
``k <= q  and  q < kill_row[k]  [and q - k < window]``. Tiles never straddle documents and
``kill_row <= document end``, so it also masks rows and keys of a neighbouring document that a
short last tile reads (their ``kill`` loads as 0 out of range, and is never above a later row).

This module imports Triton: import it only through :mod:`memento_train.kernels.function`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def keep_mask(offs_m, offs_n, kill, window, HAS_WINDOW: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` visibility of query rows ``offs_m`` and keys ``offs_n`` (packed rows)."""
    keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < kill[None, :])
    if HAS_WINDOW:
        keep = keep & (offs_m[:, None] - offs_n[None, :] < window)
    return keep


@triton.jit
def keep_mask_t(offs_n, offs_m, kill, window, HAS_WINDOW: tl.constexpr):
    """The same predicate built directly as ``[BLOCK_N, BLOCK_M]`` (dK/dV works on transposed scores)."""
    keep = (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < kill[:, None])
    if HAS_WINDOW:
        keep = keep & (offs_m[None, :] - offs_n[:, None] < window)
    return keep


@triton.jit
def load_rows(base, offs, stride, limit, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """``[len(offs), HEAD_DIM]`` rows ``offs`` of one head at ``base``; with MASKED, rows >= limit read 0."""
    ptrs = base + offs.to(tl.int64)[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        rows = tl.load(ptrs, mask=(offs < limit)[:, None], other=0.0)
    else:
        rows = tl.load(ptrs)
    return rows


@triton.jit
def store_rows(base, offs, stride, limit, value, HEAD_DIM: tl.constexpr):
    """Store ``value`` (cast to the tensor's dtype) into rows ``offs`` < ``limit`` of one head."""
    ptrs = base + offs.to(tl.int64)[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(offs < limit)[:, None])


@triton.jit
def load_vec(base, offs, limit, other, MASKED: tl.constexpr):
    """``base[offs]``; with MASKED, entries at ``offs >= limit`` read ``other``."""
    if MASKED:
        vec = tl.load(base + offs, mask=offs < limit, other=other)
    else:
        vec = tl.load(base + offs)
    return vec
