"""Memento attention: one entry point, several exact backends, HF registration."""

from memento_train.attention.flash import (
    FLASH_NO_WINDOW_WITH_EVICTION,
    flash_attention_backend,
    flash_unavailable_reason,
)
from memento_train.attention.flex import flex_attention_backend, flex_unavailable_reason
from memento_train.attention.hf import attn_implementation, hf_memento_attention, register_with_transformers
from memento_train.attention.meta import IntervalPlan, MementoAttentionMeta
from memento_train.attention.registry import (
    available_backends,
    check_backend_for_model,
    memento_attention,
    register_backend,
    resolve_backend,
)
from memento_train.attention.sdpa import sdpa_attention
from memento_train.attention.segment import segment_attention

register_backend("sdpa", sdpa_attention)
register_backend("segment", segment_attention)
register_backend("flex", flex_attention_backend, unavailable_reason=flex_unavailable_reason)
register_backend(
    "flash_attn",
    flash_attention_backend,
    unavailable_reason=flash_unavailable_reason,
    no_window_with_eviction=FLASH_NO_WINDOW_WITH_EVICTION,
)


# The Triton kernel lives in memento_train.kernels, imported on first use: importing triton is slow,
# and tests must be able to set TRITON_INTERPRET=1 before it is imported.
def _triton_backend(q, k, v, meta, *, scale, window):
    from memento_train.kernels import triton_attention

    return triton_attention(q, k, v, meta, scale=scale, window=window)


def _triton_unavailable_reason():
    from memento_train.kernels import triton_unavailable_reason

    return triton_unavailable_reason()


register_backend("triton", _triton_backend, unavailable_reason=_triton_unavailable_reason)

__all__ = [
    "IntervalPlan",
    "MementoAttentionMeta",
    "attn_implementation",
    "available_backends",
    "check_backend_for_model",
    "hf_memento_attention",
    "memento_attention",
    "register_backend",
    "register_with_transformers",
    "resolve_backend",
]
