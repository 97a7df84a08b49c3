"""Registration into transformers' attention interface, so stock HF models train with memento attention.

``register_with_transformers()`` registers ``memento_<backend>`` attention implementations (and a
no-op mask builder so HF does not materialise its own 4-D mask). Then::

    model.set_attn_implementation("memento_segment")
    model(input_ids=ids[None], position_ids=pos[None], memento_meta=meta, use_cache=False)

(``use_cache=False``: a training forward needs no KV cache, and HF would otherwise copy every
layer's keys and values into one.)

Packed batches arrive as batch size 1; sliding-window layers pass their window through HF's
``sliding_window`` argument (Olmo 3), so one function serves Qwen3, Phi-3/4 and Olmo 3 unchanged.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

from memento_train.attention.meta import MementoAttentionMeta
from memento_train.attention.registry import _BACKENDS, memento_attention

PREFIX = "memento_"


def hf_memento_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    *,
    backend: str = "auto",
    memento_meta: MementoAttentionMeta | None = None,
    **kwargs,
):
    """HF attention function: ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]`` → ``[1, T, Hq, D]``."""
    if memento_meta is None:
        raise ValueError(
            "memento attention needs the batch metadata: call model(..., memento_meta=MementoAttentionMeta...)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"memento attention expects packed batches of batch size 1, got {query.shape[0]}")
    if dropout:
        raise ValueError("attention dropout is not supported by memento attention; set attention_dropout=0")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            "memento attention is for packed training forwards (no KV cache); "
            "use memento_train.generation for incremental decoding"
        )
    out = memento_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        memento_meta,
        scale=scaling,
        window=sliding_window,
        backend=backend,
    )
    return out[None], None


def sliding_window_of(hf_config) -> int | None:
    """The window HF passes to the attention function of this model's sliding-window layers, or None
    when it has none: per-layer ``layer_types`` (Qwen3, Olmo 3: ``"sliding_attention"`` layers use
    ``sliding_window``), else a model-wide ``sliding_window`` (Phi-3/Phi-4 pass it to every layer)."""
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window or None


def _no_mask(*args, **kwargs):
    return None


def register_hf_attention(name: str, fn) -> str:
    """Register ``fn`` as HF attention implementation ``name``, with a no-op mask builder.

    Our attention functions derive visibility from their own metadata (kill rows, cache positions),
    so HF must not build (or pass) a 4-D mask. Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _no_mask)
    return name


def register_with_transformers() -> list[str]:
    """Register ``memento_auto`` and one ``memento_<backend>`` name per backend; returns the names."""
    return [
        register_hf_attention(PREFIX + backend, functools.partial(hf_memento_attention, backend=backend))
        for backend in ["auto", *_BACKENDS]
    ]


def attn_implementation(backend: str = "auto") -> str:
    """The HF ``attn_implementation`` name for a backend (registering on first use)."""
    register_with_transformers()
    return PREFIX + backend


@contextmanager
def attn_implementation_set(model, name: str):
    """Temporarily switch ``model`` to attention implementation ``name`` (restored on exit).

    Decoders switch per forward so that a model shared with a training loop (RL: the policy being
    trained also produces rollouts) is never left in decode mode.
    """
    previous = model.config._attn_implementation
    if previous == name:
        yield model
        return
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
