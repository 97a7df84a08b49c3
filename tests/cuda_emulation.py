"""Test-only stand-ins that let GPU code paths run on CPU with GPU arithmetic.

- :func:`flash_attn_varlen_func`: a CPU ``flash_attn.flash_attn_varlen_func`` (install it with
  :func:`install_flash_attn`), so the real ``flash_attn`` backend (interval plan, key gather, its
  backward) runs on CPU. Same contract as flash-attn 2 for what the backend uses: packed
  ``q [Tq, Hq, D]``, ``k``/``v`` ``[Tk, Hkv, D]`` (GQA), per-segment ``cu_seqlens_q`` /
  ``cu_seqlens_k``, ``causal=True`` aligned bottom-right, ``window_size=(left, right)``; like the CUDA
  kernel it computes in fp32 and returns (and back-propagates) in the input dtype.
- :class:`AtomicIndexAdd`: ``index_add`` as CUDA computes it, one ``atomicAdd`` per source row, each
  rounded to the destination dtype. (CPU's ``index_add`` of bf16 accumulates in fp32, so without it
  the rounding that a bf16 scatter-add suffers on a GPU would not show on CPU.)
"""

from __future__ import annotations

import sys
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    **unused,
):
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    ratio = q.shape[1] // k.shape[1]
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].float()
        ks = k[cu_k[i] : cu_k[i + 1]].float().repeat_interleave(ratio, 1)
        vs = v[cu_k[i] : cu_k[i + 1]].float().repeat_interleave(ratio, 1)
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


def install_flash_attn(monkeypatch) -> None:
    """Make ``import flash_attn`` give this module's function for the test's duration."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)


class AtomicIndexAdd(TorchDispatchMode):
    """While active, ``index_add`` / ``index_add_`` along dim 0 add the source rows one after another
    into the destination, rounding to its dtype after every addition, like CUDA's ``atomicAdd``."""

    OPS = (torch.ops.aten.index_add.default, torch.ops.aten.index_add_.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS or args[1] != 0 or kwargs.get("alpha", 1) != 1:
            return func(*args, **kwargs)
        dest, _, index, source = args[:4]
        out = dest if func is torch.ops.aten.index_add_.default else dest.clone()
        # Round j adds every row that is the j-th occurrence of its destination index: the additions
        # into one destination row stay sequential, each rounded once.
        order = torch.sort(index, stable=True)
        counts = torch.bincount(order.values, minlength=out.shape[0])
        first = torch.cumsum(counts, 0) - counts
        occurrence = torch.arange(index.numel()) - first[order.values]
        for j in range(int(counts.max()) if index.numel() else 0):
            pick = order.indices[occurrence == j]
            rows = index[pick]
            out[rows] = (out[rows].double() + source[pick].double()).to(out.dtype)
        return out
