"""Backward Triton kernels (FlashAttention-2 split): one for dK/dV, one for dQ, no atomics.

Both recompute the probabilities from the saved base-2 log-sum-exp, ``P = exp2(S*log2e - lse2)``,
and use ``delta = rowsum(dO * O)`` (computed in PyTorch), so ``dS = P * (dP - delta)``.

* ``_memento_dkdv_kernel``: one program per (key tile, key/value head). It keeps ``dK``/``dV`` of
  its tile in registers and walks, for each of the ``GROUP`` query heads sharing that KV head
  (GQA), the query tiles listed for the key tile in the tile plan's by-key CSR. Summing the GQA
  group inside the program makes the result deterministic and avoids atomics or a later reduction.
  (head, query tile) is one flat loop rather than two nested ones: compiled for sm_90 the nested
  form spilled registers (220 bytes at d=128, 32x64 tiles), the flat one does not.
* ``_memento_dq_kernel``: one program per (query tile, query head), walking the same key tiles as
  the forward.

Each kernel has its own block shape (and so its own cached :class:`~.tiles.TilePlan`): dK/dV
wants wide key tiles and short query tiles, dQ the opposite. Full tiles skip the mask, partial
ones apply it, dead ones are never visited, exactly as in the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memento_train.kernels.forward import dot_precision
from memento_train.kernels.tile_ops import keep_mask, keep_mask_t, load_rows, load_vec, store_rows
from memento_train.kernels.tiles import TilePlan


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    kill,
    offs_n,
    Qh,
    DOh,
    LSEh,
    DELTAh,
    q0,
    stride_qt,
    stride_dot,
    T,
    qk_scale,
    window,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr,
):
    offs_m = q0 + tl.arange(0, BLOCK_M)
    q = load_rows(Qh, offs_m, stride_qt, T, HEAD_DIM, MASKED)
    do = load_rows(DOh, offs_m, stride_dot, T, HEAD_DIM, MASKED)
    lse = load_vec(LSEh, offs_m, T, 0.0, MASKED)
    delta = load_vec(DELTAh, offs_m, T, 0.0, MASKED)
    # Transposed scores [BLOCK_N, BLOCK_M]: keys are this program's rows.
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:  # where, not multiply: exp2 of a masked score may overflow
        p_t = tl.where(keep_mask_t(offs_n, offs_m, kill, window, HAS_WINDOW), p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)  # accumulate in the dot
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _memento_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    KILL,
    K_START,
    K_END,
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
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    T,
    scale,
    qk_scale,
    window,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr,
):
    hk = tl.program_id(0)  # grid (heads, tiles): heaviest tiles of every head first
    tile = tl.load(ORDER + tl.program_id(1))
    k0 = tl.load(K_START + tile)
    k1 = tl.load(K_END + tile)
    offs_n = k0 + tl.arange(0, BLOCK_N)
    k = load_rows(K + hk * stride_kh, offs_n, stride_kt, k1, HEAD_DIM, True)
    v = load_rows(V + hk * stride_vh, offs_n, stride_vt, k1, HEAD_DIM, True)
    kill = load_vec(KILL, offs_n, k1, 0, True)  # keys past the document: never visible
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # GQA: the GROUP query heads sharing this KV head are walked as one flat loop over
    # (head, query tile), which the compiler pipelines like a plain loop.
    f_lo = tl.load(F_PTR + tile)
    n_f = tl.load(F_PTR + tile + 1) - f_lo
    for it in range(0, n_f * GROUP):
        g = it // n_f
        h = hk * GROUP + g
        q0 = tl.load(F_ROWS + f_lo + it - g * n_f)
        dk, dv = _dkdv_tile(
            dk,
            dv,
            k,
            v,
            kill,
            offs_n,
            Q + h * stride_qh,
            DO + h * stride_doh,
            LSE + h * T,
            DELTA + h * T,
            q0,
            stride_qt,
            stride_dot,
            T,
            qk_scale,
            window,
            BLOCK_M,
            HEAD_DIM,
            False,
            HAS_WINDOW,
            PREC,
        )
    p_lo = tl.load(P_PTR + tile)
    n_p = tl.load(P_PTR + tile + 1) - p_lo
    for it in range(0, n_p * GROUP):
        g = it // n_p
        h = hk * GROUP + g
        q0 = tl.load(P_ROWS + p_lo + it - g * n_p)
        dk, dv = _dkdv_tile(
            dk,
            dv,
            k,
            v,
            kill,
            offs_n,
            Q + h * stride_qh,
            DO + h * stride_doh,
            LSE + h * T,
            DELTA + h * T,
            q0,
            stride_qt,
            stride_dot,
            T,
            qk_scale,
            window,
            BLOCK_M,
            HEAD_DIM,
            True,
            HAS_WINDOW,
            PREC,
        )

    dk = dk * scale  # dS was taken w.r.t. the scaled scores
    store_rows(DK + hk * stride_dkh, offs_n, stride_dkt, k1, dk, HEAD_DIM)
    store_rows(DV + hk * stride_dvh, offs_n, stride_dvt, k1, dv, HEAD_DIM)


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse,
    delta,
    offs_m,
    Kh,
    Vh,
    KILL,
    k0,
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
    k = load_rows(Kh, offs_n, stride_kt, T, HEAD_DIM, MASKED)
    v = load_rows(Vh, offs_n, stride_vt, T, HEAD_DIM, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        kill = load_vec(KILL, offs_n, T, 0, True)
        p = tl.where(keep_mask(offs_m, offs_n, kill, window, HAS_WINDOW), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _memento_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
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
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    T,
    scale,
    qk_scale,
    window,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr,
):
    h = tl.program_id(0)
    tile = tl.load(ORDER + tl.program_id(1))
    hk = h // GROUP
    q0 = tl.load(Q_START + tile)
    q1 = tl.load(Q_END + tile)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    q = load_rows(Q + h * stride_qh, offs_m, stride_qt, q1, HEAD_DIM, True)
    do = load_rows(DO + h * stride_doh, offs_m, stride_dot, q1, HEAD_DIM, True)
    lse = load_vec(LSE + h * T, offs_m, q1, 0.0, True)
    delta = load_vec(DELTA + h * T, offs_m, q1, 0.0, True)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    Kh = K + hk * stride_kh
    Vh = V + hk * stride_vh

    for i in range(tl.load(F_PTR + tile), tl.load(F_PTR + tile + 1)):
        k0 = tl.load(F_ROWS + i)
        dq = _dq_tile(
            dq,
            q,
            do,
            lse,
            delta,
            offs_m,
            Kh,
            Vh,
            KILL,
            k0,
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
        dq = _dq_tile(
            dq,
            q,
            do,
            lse,
            delta,
            offs_m,
            Kh,
            Vh,
            KILL,
            k0,
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

    dq = dq * scale
    store_rows(DQ + h * stride_dqh, offs_m, stride_dqt, q1, dq, HEAD_DIM)


def memento_backward(
    q,
    k,
    v,
    out,
    lse,
    do,
    kill_row,
    dkdv_plan: TilePlan,
    dq_plan: TilePlan,
    *,
    scale: float,
    window: int | None,
    dkdv_launch: dict,
    dq_launch: dict,
):
    """Launch both backward kernels; returns ``(dq, dk, dv)`` in the input dtypes."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    delta = (out.float() * do.float()).sum(-1).t().contiguous()  # [Hq, T]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(GROUP=Hq // Hkv, HEAD_DIM=D, HAS_WINDOW=window is not None, PREC=dot_precision(q.dtype))
    w = 0 if window is None else window
    qk_scale = scale * 1.4426950408889634
    _memento_dkdv_kernel[(Hkv, dkdv_plan.check_grid(dkdv_plan.num_k_tiles))](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        kill_row,
        dkdv_plan.k_start,
        dkdv_plan.k_end,
        dkdv_plan.k_partial_ptr,
        dkdv_plan.k_partial_rows,
        dkdv_plan.k_full_ptr,
        dkdv_plan.k_full_rows,
        dkdv_plan.k_order,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        T,
        scale,
        qk_scale,
        w,
        BLOCK_M=dkdv_plan.block_m,
        BLOCK_N=dkdv_plan.block_n,
        **common,
        **dkdv_launch,
    )
    _memento_dq_kernel[(Hq, dq_plan.check_grid(dq_plan.num_q_tiles))](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        kill_row,
        dq_plan.q_start,
        dq_plan.q_end,
        dq_plan.q_partial_ptr,
        dq_plan.q_partial_rows,
        dq_plan.q_full_ptr,
        dq_plan.q_full_rows,
        dq_plan.q_order,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
        dq.stride(0),
        dq.stride(1),
        T,
        scale,
        qk_scale,
        w,
        BLOCK_M=dq_plan.block_m,
        BLOCK_N=dq_plan.block_n,
        **common,
        **dq_launch,
    )
    return dq, dk, dv
