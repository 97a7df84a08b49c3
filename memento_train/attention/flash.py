"""``flash_attn`` backend: the exact interval formulation over stock ``flash_attn_varlen_func``.

Intervals partition the packed rows, so queries are passed as they are; each interval's keys are
its gathered still-visible older keys followed by its own tokens, and ``causal=True`` in
flash-attn >= 2.1 aligns the causal diagonal bottom-right, which is exactly the rule. GPU only.
"""

from __future__ import annotations

import torch

from .meta import MementoAttentionMeta

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


def flash_attention_backend(q, k, v, meta: MementoAttentionMeta, *, scale: float, window: int | None):
    from flash_attn import flash_attn_varlen_func

    if window is not None and meta.has_eviction:
        raise NotImplementedError(
            "flash_attn backend cannot combine a sliding window with eviction; use backend 'flex' "
            "(or 'segment') for sliding-window layers"
        )
    plan = meta.interval_plan()
    ks = k.index_select(0, plan.key_index)
    vs = v.index_select(0, plan.key_index)
    return flash_attn_varlen_func(
        q, ks, vs,
        cu_seqlens_q=plan.cu_q, cu_seqlens_k=plan.cu_k,
        max_seqlen_q=plan.max_q, max_seqlen_k=plan.max_k,
        softmax_scale=scale, causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0),
    )
