"""The ``memento_attention`` entry point and its backend registry.

Every backend has the signature ``fn(q, k, v, meta, *, scale, window) -> out`` over packed tensors
``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` (``Hq`` a multiple of ``Hkv``: GQA) and returns
``[T, Hq, D]``. New backends (e.g. the Triton kernel) call :func:`register_backend`; a mask option
is a metadata/config key, never a new entry point.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .meta import MementoAttentionMeta

Backend = Callable[..., torch.Tensor]

_BACKENDS: dict[str, Backend] = {}
_AVAILABILITY: dict[str, Callable[[], str | None]] = {}


def register_backend(name: str, fn: Backend, *, unavailable_reason: Callable[[], str | None] | None = None) -> None:
    """Register ``fn`` under ``name``; ``unavailable_reason()`` returns why it cannot run here, or None."""
    _BACKENDS[name] = fn
    _AVAILABILITY[name] = unavailable_reason or (lambda: None)


def available_backends() -> dict[str, str | None]:
    """Backend name → None if usable here, else the reason it is not."""
    return {name: _AVAILABILITY[name]() for name in _BACKENDS}


def resolve_backend(name: str, q: torch.Tensor | None = None) -> str:
    """Pick a concrete backend. ``auto``: flash_attn on CUDA when installed, else flex on CUDA,
    else the exact pure-PyTorch ``segment`` backend (CPU, forward and backward)."""
    if name == "auto":
        on_cuda = q is not None and q.is_cuda
        for candidate in (("flash_attn", "flex") if on_cuda else ()) + ("segment",):
            if candidate in _BACKENDS and _AVAILABILITY[candidate]() is None:
                return candidate
        return "segment"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(_BACKENDS)} or 'auto'")
    reason = _AVAILABILITY[name]()
    if reason is not None:
        raise RuntimeError(f"attention backend {name!r} is unavailable: {reason}")
    return name


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
    return _BACKENDS[resolve_backend(backend, q)](q, k, v, meta, scale=scale, window=window)
