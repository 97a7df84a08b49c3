"""A CPU stand-in for ``flash_attn.flash_attn_varlen_func``, so the real ``flash_attn`` backend code
path (interval plan, key gather, its backward) runs on CPU.

Same contract as flash-attn 2 for what the backend uses: packed ``q [Tq, Hq, D]``, ``k``/``v``
``[Tk, Hkv, D]`` (GQA), per-segment ``cu_seqlens_q`` / ``cu_seqlens_k``, ``causal=True`` aligned
bottom-right, ``window_size=(left, right)``; like the CUDA kernel it computes in fp32 and returns
(and back-propagates) in the input dtype, one rounding per segment.
"""

from __future__ import annotations

import sys
import types

import torch


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), **unused):
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    ratio = q.shape[1] // k.shape[1]
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].float()
        ks = k[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(ratio, 1)
        vs = v[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(ratio, 1)
        lq, lk = qs.shape[0], ks.shape[0]
        row = torch.arange(lq)[:, None] + (lk - lq)  # bottom-right: the last query sees the last key
        col = torch.arange(lk)[None, :]
        visible = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            visible &= col <= row
        if window_size[0] >= 0:
            visible &= col >= row - window_size[0]
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        probs = scores.masked_fill(~visible[None], float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, vs).to(dtype))
    return torch.cat(outs, 0)


def install(monkeypatch) -> None:
    """Make ``import flash_attn`` give this module's function for the test's duration."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
