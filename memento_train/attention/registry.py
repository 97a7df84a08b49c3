"""The ``memento_attention`` entry point and its backend registry.

Every backend has the signature ``fn(q, k, v, meta, *, scale, window) -> out`` over packed tensors
``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` (``Hq`` a multiple of ``Hkv``: GQA) and returns
``[T, Hq, D]``. New backends (e.g. the Triton kernel) call :func:`register_backend`; a mask option
is a metadata/config key, never a new entry point.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memento_train.attention.meta import MementoAttentionMeta
from memento_train.config.errors import ConfigError

Backend = Callable[..., torch.Tensor]

_BACKENDS: dict[str, Backend] = {}
_AVAILABILITY: dict[str, Callable[[], str | None]] = {}
# Backends that cannot apply a sliding window once keys are evicted (name -> why).
_NO_WINDOW_WITH_EVICTION: dict[str, str] = {}

# What ``auto`` tries, in order, on CUDA; on CPU it is always ``segment`` (exact, forward and backward).
AUTO_CUDA_ORDER = ("flash_attn", "flex")


def register_backend(
    name: str,
    fn: Backend,
    *,
    unavailable_reason: Callable[[], str | None] | None = None,
    no_window_with_eviction: str | None = None,
) -> None:
    """Register ``fn`` under ``name``; ``unavailable_reason()`` returns why it cannot run here, or None.

    ``no_window_with_eviction``: set (to the reason) for a backend that cannot run sliding-window
    layers on batches with evicted keys; ``auto`` then never picks it for sliding-window layers.
    """
    _BACKENDS[name] = fn
    _AVAILABILITY[name] = unavailable_reason or (lambda: None)
    if no_window_with_eviction:
        _NO_WINDOW_WITH_EVICTION[name] = no_window_with_eviction
    else:
        _NO_WINDOW_WITH_EVICTION.pop(name, None)


def available_backends() -> dict[str, str | None]:
    """Backend name → None if usable here, else the reason it is not."""
    return {name: _AVAILABILITY[name]() for name in _BACKENDS}


def resolve_backend(name: str, q: torch.Tensor | None = None, *, window: int | None = None) -> str:
    """Pick a concrete backend for one layer type: full attention (``window=None``) or sliding window.

    ``auto``: on CUDA the first available of :data:`AUTO_CUDA_ORDER` that supports the layer type (for
    sliding-window layers, one that applies the window together with eviction: ``flex``, never
    ``flash_attn``), else the exact pure-PyTorch ``segment`` backend (CPU, forward and backward). The
    choice depends on the layer type only, not on the batch, so every batch of a run uses the same
    kernels per layer.
    """
    if name == "auto":
        on_cuda = q is not None and q.is_cuda
        for candidate in (AUTO_CUDA_ORDER if on_cuda else ()) + ("segment",):
            if window is not None and candidate in _NO_WINDOW_WITH_EVICTION:
                continue
            if candidate in _BACKENDS and _AVAILABILITY[candidate]() is None:
                return candidate
        return "segment"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(_BACKENDS)} or 'auto'")
    reason = _AVAILABILITY[name]()
    if reason is not None:
        raise RuntimeError(f"attention backend {name!r} is unavailable: {reason}")
    return name


def check_backend_for_model(
    name: str, *, sliding_window: int | None, evicts: bool, option: str = "model.attn_backend"
) -> None:
    """Raise :class:`ConfigError` (naming ``option``) if backend ``name`` cannot train a model whose
    layers use ``sliding_window`` (None: no sliding-window layers) with a mask that ``evicts`` keys.

    Availability on the training machines (GPU, installed packages) is not checked: the driver may
    not run where the workers do.
    """
    if name != "auto" and name not in _BACKENDS:
        raise ConfigError(
            f"{option}={name!r} is not an attention backend; choose one of {['auto', *sorted(_BACKENDS)]}"
        )
    if sliding_window is not None and evicts and name in _NO_WINDOW_WITH_EVICTION:
        raise ConfigError(
            f"{option}={name} cannot train this model: it has sliding-window layers (window {sliding_window}) and "
            f"the mask evicts keys ({_NO_WINDOW_WITH_EVICTION[name]}); set {option}=auto (picks flex for the "
            f"sliding-window layers) or {option}=flex"
        )


def memento_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: MementoAttentionMeta,
    *,
    scale: float | None = None,
    window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Memento attention over a packed batch: ``visible(q,k) = same_doc ∧ k ≤ q ∧ q < kill_row[k]``
    (∧ ``q - k < window`` on sliding-window layers). Shapes ``[T, H, D]``."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"expected packed [T, H, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)}")
    if q.shape[0] != meta.num_tokens or k.shape[0] != meta.num_tokens:
        raise ValueError(
            f"q has {q.shape[0]} tokens, k has {k.shape[0]}, metadata covers {meta.num_tokens}: "
            "pass the metadata built for this packed batch"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if window is not None and window <= 0:
        raise ValueError(f"sliding window must be positive, got {window}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _BACKENDS[resolve_backend(backend, q, window=window)](q, k, v, meta, scale=scale, window=window)
