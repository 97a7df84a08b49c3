"""``flash_attn`` backend: the exact interval formulation over stock ``flash_attn_varlen_func``.

Intervals partition the packed rows, so queries are passed as they are; each interval's keys are
its gathered still-visible older keys followed by its own tokens, and ``causal=True`` in
flash-attn >= 2.1 aligns the causal diagonal bottom-right, which is exactly the rule. GPU only.

A key that stays visible over many intervals (a prompt, a summary) is gathered once per interval, so
its gradient is a sum of that many terms: :func:`gather_rows` adds them in fp32 (``index_select``'s
own backward adds them in the tensor's dtype: bf16 atomics, ~1 % error at 100 intervals).
"""

from __future__ import annotations

import torch

from memento_train.attention.meta import MementoAttentionMeta

# flash-attn's window counts positions in the gathered (compacted) key list, not logical positions, so
# it cannot express a logical window once keys have been evicted.
FLASH_NO_WINDOW_WITH_EVICTION = "flash-attn's window counts gathered keys, not logical positions"


def flash_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (flash-attn has no CPU kernels); use 'segment' or 'sdpa' on CPU"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed: pip install 'memento-train[gpu]' (or flash-attn>=2.6)"
    return None


# Rows of the fp32 gradient buffer converted per index_add_ call (bounds the fp32 copy to ~256 MiB).
_GATHER_GRAD_CHUNK_ELEMENTS = 1 << 26


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward accumulates repeated rows' gradients in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        acc_dtype = torch.promote_types(ctx.dtype, torch.float32)
        acc = torch.zeros(ctx.shape, dtype=acc_dtype, device=grad.device)
        rows = max(1, _GATHER_GRAD_CHUNK_ELEMENTS // max(1, grad[0].numel())) if grad.shape[0] else 1
        for start in range(0, grad.shape[0], rows):
            acc.index_add_(0, index[start : start + rows], grad[start : start + rows].to(acc_dtype))
        return acc.to(ctx.dtype), None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``x`` (dim 0); the gradient of a row gathered many times is summed in fp32."""
    return _GatherRows.apply(x, index)


def flash_attention_backend(q, k, v, meta: MementoAttentionMeta, *, scale: float, window: int | None):
    from flash_attn import flash_attn_varlen_func

    if window is not None and meta.has_eviction:
        raise NotImplementedError(
            "flash_attn backend cannot combine a sliding window with eviction; use backend 'flex' "
            "(or 'segment') for sliding-window layers"
        )
    plan = meta.interval_plan()
    ks = gather_rows(k, plan.key_index)
    vs = gather_rows(v, plan.key_index)
    return flash_attn_varlen_func(
        q,
        ks,
        vs,
        cu_seqlens_q=plan.cu_q,
        cu_seqlens_k=plan.cu_k,
        max_seqlen_q=plan.max_q,
        max_seqlen_k=plan.max_k,
        softmax_scale=scale,
        causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0),
    )
