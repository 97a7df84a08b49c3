"""The ``triton`` attention backend: availability check, block configs, autograd Function.

Importing this module does not import Triton; the kernels (:mod:`.forward`, :mod:`.backward`) are
imported on the first call. That keeps ``import memento_train`` fast and lets tests choose
Triton's CPU interpreter (``TRITON_INTERPRET=1``, which must be set *before* Triton is imported).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, replace

import torch

from memento_train.kernels.tiles import tile_plan

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class KernelConfig:
    """Block shape and launch parameters of one kernel. ``block_m`` = query rows, ``block_n`` = keys."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class TritonConfig:
    fwd: KernelConfig
    dq: KernelConfig
    dkdv: KernelConfig

    def describe(self) -> str:
        return ",".join(
            f"{n}={c.block_m}x{c.block_n}:w{c.num_warps}:s{c.num_stages}"
            for n, c in (("fwd", self.fwd), ("dq", self.dq), ("dkdv", self.dkdv))
        )


# The interpreter runs every program in numpy: small tiles keep tests fast and exercise many tiles.
INTERPRETER_CONFIG = TritonConfig(KernelConfig(16, 16, 1, 1), KernelConfig(16, 16, 1, 1), KernelConfig(16, 16, 1, 1))

# GPU defaults: the (near) spill-free shapes found by compiling each kernel for sm_90 (H100) with this
# Triton and reading ptxas's register report (not yet timed on a GPU; see benchmarks/attention.py
# --triton-config to compare others). fwd and dQ: 128 query rows; dK/dV: short query tiles against
# the key tile it accumulates. Override with set_triton_config() or, e.g.,
# MEMENTO_TRITON_CONFIG="fwd=128x128:w8:s3,dq=128x64:w8:s2,dkdv=64x64:w8:s3".
GPU_CONFIGS = {
    64: TritonConfig(KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 8, 3)),
    128: TritonConfig(KernelConfig(128, 64, 8, 3), KernelConfig(64, 32, 4, 3), KernelConfig(32, 64, 8, 3)),
}

_override: TritonConfig | str | None = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason() -> str | None:
    """Why the ``triton`` backend cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: pip install 'memento-train[gpu]' (or triton>=3.0)"
    if interpreting():
        return None
    if not torch.cuda.is_available():
        return (
            "triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's slow CPU interpreter, "
            "tests only); use 'segment' or 'sdpa' on CPU"
        )
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"triton backend needs compute capability >= 8.0 (Ampere or newer), found {major}.x"
    return None


def parse_config(text: str, base: TritonConfig) -> TritonConfig:
    """``"fwd=128x64:w8:s3,dq=128x32,dkdv=32x128:w8"`` → config (unnamed kernels keep ``base``)."""
    out = base
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(fwd|dq|dkdv)=(\d+)x(\d+)(?::w(\d+))?(?::s(\d+))?", part)
        if m is None:
            raise ValueError(f"bad triton config {part!r}; expected e.g. 'fwd=128x64:w8:s3'")
        name, bm, bn, w, s = m.groups()
        old = getattr(out, name)
        cfg = KernelConfig(int(bm), int(bn), int(w) if w else old.num_warps, int(s) if s else old.num_stages)
        if min(cfg.block_m, cfg.block_n) < 16 or any(x & (x - 1) for x in (cfg.block_m, cfg.block_n)):
            raise ValueError(f"block sizes must be powers of two >= 16, got {part!r}")
        out = replace(out, **{name: cfg})
    return out


def set_triton_config(config: TritonConfig | str | None) -> None:
    """Force block configs (None: back to the defaults). A :class:`TritonConfig` serves every head dim;
    a string, like ``MEMENTO_TRITON_CONFIG``, changes only the kernels it names in each head dim's
    defaults."""
    global _override
    if isinstance(config, str):
        parse_config(config, GPU_CONFIGS[128])  # a bad string fails here, not at the first call
    _override = config


def triton_config(head_dim: int, device: torch.device) -> TritonConfig:
    """The config used for this head dim and device (override > env var > defaults)."""
    if isinstance(_override, TritonConfig):
        return _override
    if device.type != "cuda":
        base = INTERPRETER_CONFIG
    else:
        base = GPU_CONFIGS[64 if head_dim <= 64 else 128]
    text = _override if _override is not None else os.environ.get("MEMENTO_TRITON_CONFIG")
    return parse_config(text, base) if text else base


def _check_inputs(q, k, v) -> None:
    if not q.is_cuda and not interpreting():
        raise RuntimeError(
            "triton backend needs a CUDA GPU or TRITON_INTERPRET=1 (set before triton is imported); "
            f"got {q.device} tensors: use backend 'segment' or 'sdpa' on CPU"
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"triton backend supports bf16/fp16/fp32 with q, k, v alike; got {q.dtype}/{k.dtype}/{v.dtype}")
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS or k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(
            f"triton backend supports head dims {SUPPORTED_HEAD_DIMS} (q, k, v equal); "
            f"got {d}/{k.shape[-1]}/{v.shape[-1]}"
        )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels take row/head strides but assume unit stride over the head dim (vectorised loads).
    return t if t.stride(-1) == 1 else t.contiguous()


class MementoTritonAttention(torch.autograd.Function):
    """Autograd wrapper: forward kernel, then dK/dV and dQ kernels on backward."""

    @staticmethod
    def forward(ctx, q, k, v, meta, scale, window):
        from memento_train.kernels.forward import memento_forward

        cfg = triton_config(q.shape[-1], q.device)
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        kill = meta.kill_row.contiguous()
        plan = tile_plan(meta, cfg.fwd.block_m, cfg.fwd.block_n, window)
        out, lse = memento_forward(
            q, k, v, kill, plan, scale=scale, window=window, num_warps=cfg.fwd.num_warps, num_stages=cfg.fwd.num_stages
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta, ctx.scale, ctx.window, ctx.cfg = meta, scale, window, cfg
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from memento_train.kernels.backward import memento_backward

        q, k, v, out, lse = ctx.saved_tensors
        meta, cfg, window = ctx.meta, ctx.cfg, ctx.window
        do = grad_out.contiguous()  # autograd may hand an expanded (stride 0) gradient
        dq, dk, dv = memento_backward(
            q,
            k,
            v,
            out,
            lse,
            do,
            meta.kill_row.contiguous(),
            tile_plan(meta, cfg.dkdv.block_m, cfg.dkdv.block_n, window),
            tile_plan(meta, cfg.dq.block_m, cfg.dq.block_n, window),
            scale=ctx.scale,
            window=window,
            dkdv_launch=dict(num_warps=cfg.dkdv.num_warps, num_stages=cfg.dkdv.num_stages),
            dq_launch=dict(num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages),
        )
        return dq, dk, dv, None, None, None


def triton_attention(q, k, v, meta, *, scale: float, window: int | None) -> torch.Tensor:
    """Backend ``triton``: exact memento attention, work proportional to the live tiles."""
    _check_inputs(q, k, v)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if meta.kill_row.device != q.device:
        raise ValueError(f"metadata is on {meta.kill_row.device} but q on {q.device}: build it with device=q.device")
    return MementoTritonAttention.apply(q, k, v, meta, scale, window)
