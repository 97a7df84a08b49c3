"""Forward Triton kernel: FlashAttention-2 style online softmax over the live key tiles only.

One program per (query tile, query head). It loads its query tile once, then walks the key tiles
listed for it in the :class:`~.tiles.TilePlan`: first the *full* ones (no mask at all: every key is
at or before the first query and alive past the last), then the *partial* ones (diagonal tiles,
tiles that straddle a kill row or the window edge), where the exact predicate
``k <= q  and  q < kill_row[k]  [and q - k < window]`` is applied per element. Dead tiles are never
visited, so the work is proportional to the live tiles, not to the causal triangle.

Scores are kept in log2 units (``qk_scale = scale * log2(e)``) so the softmax uses ``exp2``; the
per-row log-sum-exp (base 2) is saved for the backward. Loads, stores and the mask come from
:mod:`.tile_ops` (shared with the backward).

This module imports Triton: import it only through :mod:`memento_train.kernels.function`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memento_train.kernels.tile_ops import keep_mask, load_rows, load_vec, store_rows
from memento_train.kernels.tiles import TilePlan


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    q,
    Kh,
    Vh,
    KILL,
    k0,
    offs_m,
    stride_kt,
    stride_vt,
    T,
    qk_scale,
    window,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_n = k0 + tl.arange(0, BLOCK_N)
    k = load_rows(Kh, offs_n, stride_kt, T, HEAD_DIM, MASKED)  # full tiles lie inside the document
    v = load_rows(Vh, offs_n, stride_vt, T, HEAD_DIM, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        kill = load_vec(KILL, offs_n, T, 0, True)  # out-of-range keys: kill 0, never visible
        s = tl.where(keep_mask(offs_m, offs_n, kill, window, HAS_WINDOW), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a row with nothing visible yet keeps m = -inf; subtract 0 instead (no inf - inf)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    # Accumulate inside the dot (acc as its C operand): no second [BLOCK_M, HEAD_DIM] temporary.
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _memento_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    KILL,
    Q_START,
    Q_END,
    P_PTR,
    P_ROWS,
    F_PTR,
    F_ROWS,
    ORDER,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    T,
    qk_scale,
    window,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr,
):
    # Grid (heads, tiles): the head varies fastest, so blocks start heaviest tile first across all
    # heads, and the query heads sharing a KV head run side by side (their K/V tiles hit in L2).
    h = tl.program_id(0)
    tile = tl.load(ORDER + tl.program_id(1))
    hk = h // GROUP  # GQA: GROUP query heads share one key/value head
    q0 = tl.load(Q_START + tile)
    q1 = tl.load(Q_END + tile)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    q = load_rows(Q + h * stride_qh, offs_m, stride_qt, q1, HEAD_DIM, True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    Kh = K + hk * stride_kh
    Vh = V + hk * stride_vh

    for i in range(tl.load(F_PTR + tile), tl.load(F_PTR + tile + 1)):
        k0 = tl.load(F_ROWS + i)
        acc, l_i, m_i = _fwd_tile(
            acc,
            l_i,
            m_i,
            q,
            Kh,
            Vh,
            KILL,
            k0,
            offs_m,
            stride_kt,
            stride_vt,
            T,
            qk_scale,
            window,
            BLOCK_N,
            HEAD_DIM,
            False,
            HAS_WINDOW,
            PREC,
        )
    for i in range(tl.load(P_PTR + tile), tl.load(P_PTR + tile + 1)):
        k0 = tl.load(P_ROWS + i)
        acc, l_i, m_i = _fwd_tile(
            acc,
            l_i,
            m_i,
            q,
            Kh,
            Vh,
            KILL,
            k0,
            offs_m,
            stride_kt,
            stride_vt,
            T,
            qk_scale,
            window,
            BLOCK_N,
            HEAD_DIM,
            True,
            HAS_WINDOW,
            PREC,
        )

    # Every in-document row sees at least itself, so l_i > 0 there; rows past the document end
    # (short last tile) are not stored, the guard only avoids computing 0/0 for them.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    store_rows(O + h * stride_oh, offs_m, stride_ot, q1, out, HEAD_DIM)
    tl.store(LSE + h * T + offs_m, m_i + tl.math.log2(l_safe), mask=offs_m < q1)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE products (tests, references); 16-bit inputs are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def memento_forward(
    q, k, v, kill_row, plan: TilePlan, *, scale: float, window: int | None, num_warps: int, num_stages: int
):
    """Launch the forward kernel; returns ``(out [T, Hq, D], lse2 [Hq, T] float32, base 2)``."""
    T, Hq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    grid = (Hq, plan.check_grid(plan.num_q_tiles))
    _memento_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        kill_row,
        plan.q_start,
        plan.q_end,
        plan.q_partial_ptr,
        plan.q_partial_rows,
        plan.q_full_ptr,
        plan.q_full_rows,
        plan.q_order,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        T,
        scale * 1.4426950408889634,
        0 if window is None else window,
        GROUP=Hq // k.shape[1],
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        HEAD_DIM=D,
        HAS_WINDOW=window is not None,
        PREC=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse
