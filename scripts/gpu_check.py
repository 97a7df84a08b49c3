#!/usr/bin/env python
"""One-GPU self-check of memento-train: run it first on any new GPU machine (about 5-9 minutes).

    python scripts/gpu_check.py                   # full sizes, one GPU; writes gpu_check.json
    python scripts/gpu_check.py --out DIR/x.json  # elsewhere
    python scripts/gpu_check.py --small           # CPU-sized smoke run of the script itself (CI)

Needs only torch, triton and numpy (a bare CUDA image) and this repository; flash-attn, DeepSpeed and
vLLM are used when present and their parts reported as skipped otherwise. Each step runs in its own
process with its own time limit, so a crash (an illegal memory access, an OOM) fails that step only.
Steps, in order:

1. environment: versions, device, capability, memory, optional packages;
2. set_device: a process that sees one GPU (``CUDA_VISIBLE_DEVICES``) must use device 0: what a Ray
   actor's ``LOCAL_RANK`` has to be;
3. triton_d128 / triton_d64_window: the Triton kernel at 32K tokens of an OpenMementos-shaped batch,
   32 query / 8 KV heads, d=128 (and d=64 with a 4K window) against an fp32 reference, forward and
   backward; ms and TFLOP/s over the pairs the mask keeps, and the speed-up over causal attention on
   the same tokens;
4. sft_loss_memory: peak memory of the fused LM head + cross-entropy at 32K x 151,936 against the
   plain logits path (the pre-fix SFT loss);
5. flash_gather: the ``flash_attn`` path's per-interval key gather (cost and size) and, with
   flash-attn, its fwd+bwd against causal flash-attn;
6. flex_compile: FlexAttention compile time, a second length (recompiles?) and block-mask memory;
7. sft_step: a bf16 SFT step of a ~0.6B Qwen3-shaped model at 16K tokens with the stage-1 (causal) and
   stage-2 (memento) masks: tokens/s, MFU and their ratio;
8. attention_benchmark: ``benchmarks/attention.py`` at 32K.

It prints one table and writes every number to one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Sizes:
    tokens: int  # attention checks
    doc_tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    window_head_dim: int
    window: int
    vocab: int
    loss_tokens: int
    loss_hidden: int
    model: tuple[int, int, int, int, int]  # hidden, layers, heads, kv heads, ffn (head dim = hidden / heads)
    sft_tokens: int
    bench_args: tuple[str, ...]
    repeats: int
    warmup: int = 1
    shape_scale: float = 1.0  # OpenMementos unit lengths (prompt, block, summary) times this


FULL = Sizes(
    tokens=32768,
    doc_tokens=12000,
    heads=32,
    kv_heads=8,
    head_dim=128,
    window_head_dim=64,
    window=4096,
    vocab=151936,
    loss_tokens=32768,
    loss_hidden=4096,
    model=(1024, 24, 16, 8, 3072),
    sft_tokens=16384,
    bench_args=("--tokens", "32768", "--repeats", "5"),
    repeats=5,
)
SMALL = Sizes(
    tokens=256,
    doc_tokens=128,
    heads=4,
    kv_heads=2,
    head_dim=32,
    window_head_dim=16,
    window=32,
    vocab=2048,
    loss_tokens=512,
    loss_hidden=64,
    model=(64, 2, 4, 2, 192),
    sft_tokens=512,
    bench_args=(
        "--device",
        "cpu",
        "--tokens",
        "512",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--modes",
        "fwd",
        "--backends",
        "segment",
        "causal segment",
    ),
    repeats=1,
    warmup=0,
    shape_scale=1 / 16,
)

# (name, time limit in seconds on a GPU)
STEPS = [
    ("environment", 60),
    ("set_device", 60),
    ("triton_d128", 150),
    ("triton_d64_window", 120),
    ("sft_loss_memory", 90),
    ("flash_gather", 60),
    ("flex_compile", 150),
    ("sft_step", 180),
    ("attention_benchmark", 300),
]
BUDGET_S = 9 * 60


class Skip(Exception):
    """The step cannot run here (reason in the message)."""


def _torch():
    import torch

    return torch


def _cuda() -> bool:
    return _torch().cuda.is_available()


def _device():
    return _torch().device("cuda" if _cuda() else "cpu")


def _sync():
    if _cuda():
        _torch().cuda.synchronize()


def _time_ms(fn, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in ms (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _peak_reset():
    if _cuda():
        torch = _torch()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak_gib(base: int) -> float | None:
    if not _cuda():
        return None
    return (_torch().cuda.max_memory_allocated() - base) / 2**30


def _batch(sz: Sizes, keep: int = 0):
    from memento_train.attention.meta import MementoAttentionMeta
    from memento_train.planning.trace_shapes import memento_batch

    meta, lengths = memento_batch(
        sz.tokens, doc_tokens=sz.doc_tokens, keep_last_n_blocks=max(keep, 0), scale=sz.shape_scale
    )
    if keep < 0:
        meta = MementoAttentionMeta.causal(meta.cu_seqlens)
    return meta.to(_device()), lengths


def _qkv(sz: Sizes, head_dim: int, dtype, requires_grad: bool = True):
    torch = _torch()
    g = torch.Generator(device=_device()).manual_seed(0)
    shapes = [(sz.tokens, sz.heads, head_dim), (sz.tokens, sz.kv_heads, head_dim), (sz.tokens, sz.kv_heads, head_dim)]
    return [torch.randn(s, generator=g, device=_device(), dtype=dtype).requires_grad_(requires_grad) for s in shapes]


def _size(nbytes: float | None) -> str:
    if nbytes is None:
        return "n/a"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"


def _attention_flops(heads: int, head_dim: int, pairs: int) -> float:
    return 12.0 * heads * head_dim * pairs  # forward 4, backward 8 per kept pair, head and dim


# -- steps --------------------------------------------------------------------------------------------
def step_environment(sz: Sizes) -> dict:
    import importlib.util
    import platform

    import numpy

    torch = _torch()
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu",
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    for pkg in ("flash_attn", "deepspeed", "vllm", "transformers"):
        out[pkg] = importlib.util.find_spec(pkg) is not None
    if _cuda():
        p = torch.cuda.get_device_properties(0)
        out.update(
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            gpus_visible=torch.cuda.device_count(),
        )
    out["summary"] = f"{out['device']}, torch {out['torch']}, triton {out['triton']}"
    return out


def step_set_device(sz: Sizes) -> dict:
    if not _cuda():
        raise Skip("no CUDA device")
    torch = _torch()
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    code = (
        "import torch; n = torch.cuda.device_count(); torch.cuda.set_device(0); torch.ones(1, device='cuda'); "
        "ok1 = True\ntry:\n torch.cuda.set_device(1); ok1 = True\nexcept Exception:\n ok1 = False\n"
        "print(n, ok1)"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": first}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=50)
    if res.returncode:
        raise RuntimeError(f"one-GPU process failed: {res.stderr[-500:]}")
    n, device1 = res.stdout.split()
    if n != "1" or device1 != "False":
        raise RuntimeError(
            f"with CUDA_VISIBLE_DEVICES={first} the process saw {n} devices (device 1 usable: {device1})"
        )
    return {
        "visible_in_actor": int(n),
        "device_1_refused": True,
        "gpus_on_machine": torch.cuda.device_count(),
        "summary": "one visible GPU is cuda:0; LOCAL_RANK must be 0 inside such a worker",
    }


def _triton_check(sz: Sizes, head_dim: int, window: int | None) -> dict:
    torch = _torch()
    from memento_train.attention import memento_attention
    from memento_train.kernels import triton_unavailable_reason

    why = triton_unavailable_reason()
    if why:
        raise Skip(why)
    dtype = torch.bfloat16 if _cuda() else torch.float32
    meta, _ = _batch(sz, keep=0)
    scale = head_dim**-0.5
    q, k, v = _qkv(sz, head_dim, dtype)
    out = memento_attention(q, k, v, meta, scale=scale, window=window, backend="triton")
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = memento_attention(*ref_in, meta, scale=scale, window=window, backend="segment")
    ref_grads = torch.autograd.grad(ref, ref_in, grad.float())
    errors = {
        name: float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6))
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref, *ref_grads))
    }
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    del ref, ref_grads, ref_in

    def fwd_bwd(m):
        def run():
            o = memento_attention(q, k, v, m, scale=scale, window=window, backend="triton")
            torch.autograd.grad(o, (q, k, v), grad)

        return run

    kept = meta.kept_pairs(window)
    ms = _time_ms(fwd_bwd(meta), sz.repeats, sz.warmup)
    causal_meta, _ = _batch(sz, keep=-1)
    causal_ms = _time_ms(fwd_bwd(causal_meta), sz.repeats, sz.warmup)
    out_d = {
        "tokens": sz.tokens,
        "heads": sz.heads,
        "kv_heads": sz.kv_heads,
        "head_dim": head_dim,
        "window": window,
        "rel_errors": errors,
        "tolerance": tol,
        "fwd_bwd_ms": ms,
        "tflops_kept": _attention_flops(sz.heads, head_dim, kept) / ms / 1e9,
        "causal_fwd_bwd_ms": causal_ms,
        "speedup_vs_causal": causal_ms / ms,
        "kept_over_causal_pairs": kept / max(1, causal_meta.kept_pairs(window)),
    }
    bad = {k_: e for k_, e in errors.items() if not e <= tol}
    out_d["summary"] = (
        f"{ms:.1f} ms fwd+bwd, {out_d['tflops_kept']:.0f} TFLOP/s kept, {out_d['speedup_vs_causal']:.2f}x "
        f"vs causal; max rel err {max(errors.values()):.1e}"
    )
    if bad:
        raise RuntimeError(f"Triton kernel disagrees with the fp32 reference: {bad} (tolerance {tol}); {out_d}")
    return out_d


def step_triton_d128(sz: Sizes) -> dict:
    return _triton_check(sz, sz.head_dim, None)


def step_triton_d64_window(sz: Sizes) -> dict:
    return _triton_check(sz, sz.window_head_dim, sz.window)


def step_sft_loss_memory(sz: Sizes) -> dict:
    torch = _torch()
    import torch.nn.functional as F

    from memento_train.models.lm_head import fused_token_loss_sum

    dtype = torch.bfloat16 if _cuda() else torch.float32
    g = torch.Generator(device=_device()).manual_seed(0)
    t, h, v = sz.loss_tokens, sz.loss_hidden, sz.vocab
    hidden = (torch.randn(t, h, generator=g, device=_device(), dtype=dtype) * 0.05).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=_device(), dtype=dtype) * 0.05).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=g, device=_device())

    def measure(fn):
        hidden.grad = weight.grad = None
        base = _peak_reset()
        saved = _saved_bytes(lambda: fn().backward())
        return _peak_gib(base), saved

    def fused():
        return fused_token_loss_sum(hidden, weight, labels)

    def plain():  # what sft/losses.py did: full logits, then fp32 cross-entropy in 4096-row chunks
        logits = hidden @ weight.t()
        return sum(
            F.cross_entropy(logits[i : i + 4096].float(), labels[i : i + 4096], reduction="sum")
            for i in range(0, t, 4096)
        )

    fused_peak, fused_saved = measure(fused)
    fused_value = float(fused().detach())
    out = {"tokens": t, "vocab": v, "hidden": h, "fused_peak_gib": fused_peak, "fused_saved_gib": fused_saved / 2**30}
    try:
        plain_peak, plain_saved = measure(plain)
        out.update(
            plain_peak_gib=plain_peak,
            plain_saved_gib=plain_saved / 2**30,
            loss_rel_diff=abs(float(plain().detach()) - fused_value) / abs(fused_value),
        )
    except torch.OutOfMemoryError:
        out.update(plain_peak_gib="OOM")
    peak = f"peak {fused_peak:.1f} GiB vs plain {out.get('plain_peak_gib')}" if fused_peak is not None else ""
    plain_saved = out.get("plain_saved_gib")
    out["summary"] = (
        f"saved for backward {_size(fused_saved)} fused vs "
        f"{_size(plain_saved * 2**30) if plain_saved is not None else 'OOM'} plain; {peak}"
    ).strip("; ")
    return out


def _saved_bytes(run) -> int:
    torch = _torch()
    storages: dict[int, int] = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run()
    return sum(storages.values())


def step_flash_gather(sz: Sizes) -> dict:
    torch = _torch()
    from memento_train.attention.flash import flash_unavailable_reason

    dtype = torch.bfloat16 if _cuda() else torch.float32
    meta, _ = _batch(sz, keep=0)
    plan = meta.interval_plan()
    _, k, v = _qkv(sz, sz.head_dim, dtype, requires_grad=False)
    gather_ms = _time_ms(
        lambda: (k.index_select(0, plan.key_index), v.index_select(0, plan.key_index)), sz.repeats, sz.warmup
    )
    gathered = int(plan.key_index.numel())
    out = {
        "tokens": sz.tokens,
        "gathered_keys": gathered,
        "gathered_over_tokens": gathered / sz.tokens,
        "gathered_kv_gib": 2 * gathered * sz.kv_heads * sz.head_dim * k.element_size() / 2**30,
        "gather_ms": gather_ms,
    }
    why = flash_unavailable_reason()
    if why:
        out["flash_attn"] = f"skipped: {why}"
    else:
        from flash_attn import flash_attn_varlen_func

        from memento_train.attention import memento_attention

        q, k2, v2 = _qkv(sz, sz.head_dim, dtype)
        grad = torch.randn_like(q)

        def memento():
            o = memento_attention(q, k2, v2, meta, scale=sz.head_dim**-0.5, backend="flash_attn")
            torch.autograd.grad(o, (q, k2, v2), grad)

        cu = meta.cu_seqlens.to(torch.int32)

        def causal():
            o = flash_attn_varlen_func(q, k2, v2, cu, cu, meta.max_seqlen, meta.max_seqlen, causal=True)
            torch.autograd.grad(o, (q, k2, v2), grad)

        out["flash_memento_fwd_bwd_ms"] = _time_ms(memento, sz.repeats, sz.warmup)
        out["flash_causal_fwd_bwd_ms"] = _time_ms(causal, sz.repeats, sz.warmup)
    out["summary"] = (
        f"{gathered / sz.tokens:.2f}x keys gathered ({_size(out['gathered_kv_gib'] * 2**30)} K/V per layer) "
        f"in {gather_ms:.2f} ms"
        + (
            f"; flash memento {out['flash_memento_fwd_bwd_ms']:.1f} ms vs causal "
            f"{out['flash_causal_fwd_bwd_ms']:.1f} ms"
            if "flash_memento_fwd_bwd_ms" in out
            else "; flash-attn absent"
        )
    )
    return out


def step_flex_compile(sz: Sizes) -> dict:
    torch = _torch()
    from memento_train.attention import flex as flex_mod

    if not _cuda():
        raise Skip("FlexAttention's compiled kernels and backward need CUDA")
    from torch import _dynamo

    _dynamo.reset()
    dtype = torch.bfloat16
    meta, _ = _batch(sz, keep=0)
    base = _peak_reset()
    t0 = time.perf_counter()
    flex_mod.block_mask_for(meta, None)
    _sync()
    mask_s, mask_gib = time.perf_counter() - t0, _peak_gib(base)
    q, k, v = _qkv(sz, sz.head_dim, dtype)
    grad = torch.randn_like(q)

    def step(m):
        o = flex_mod.flex_attention_backend(q, k, v, m, scale=sz.head_dim**-0.5, window=None)
        torch.autograd.grad(o, (q, k, v), grad)
        _sync()

    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    step(meta)
    first_s = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    warm_ms = _time_ms(lambda: step(meta), sz.repeats, warmup=0)
    other = _shorter_batch(sz)
    t0 = time.perf_counter()
    step(other)
    second_length_s = time.perf_counter() - t0
    recompiled = counters["stats"]["unique_graphs"] > graphs
    out = {
        "block_mask_s": mask_s,
        "block_mask_gib": mask_gib,
        "first_call_s": first_s,
        "warm_fwd_bwd_ms": warm_ms,
        "other_length_first_call_s": second_length_s,
        "recompiled_for_other_length": recompiled,
    }
    out["summary"] = (
        f"compile {first_s:.1f} s, warm {warm_ms:.1f} ms; another length {second_length_s:.1f} s "
        f"({'recompiled' if recompiled else 'no recompile'}); block mask {mask_gib:.2f} GiB in {mask_s:.2f} s"
    )
    return out


def _shorter_batch(sz: Sizes):
    from memento_train.planning.trace_shapes import memento_batch

    meta, _ = memento_batch(sz.tokens - 1000, doc_tokens=sz.doc_tokens, scale=sz.shape_scale)
    return meta.to(_device())


def _qwen_shaped(sz: Sizes, backend: str):
    """A Qwen3-shaped decoder in plain torch (q/k norms, GQA, RoPE, SwiGLU, untied head) whose attention
    is memento attention: the SFT step runs on a bare CUDA image, without transformers."""
    torch = _torch()
    from torch import nn

    from memento_train.attention import memento_attention

    hidden, layers, heads, kv_heads, ffn = sz.model
    hd = hidden // heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
            self.q, self.k = nn.Linear(hidden, heads * hd, bias=False), nn.Linear(hidden, kv_heads * hd, bias=False)
            self.v, self.o = nn.Linear(hidden, kv_heads * hd, bias=False), nn.Linear(heads * hd, hidden, bias=False)
            self.qn, self.kn = nn.RMSNorm(hd), nn.RMSNorm(hd)
            self.gate, self.up = nn.Linear(hidden, ffn, bias=False), nn.Linear(hidden, ffn, bias=False)
            self.down = nn.Linear(ffn, hidden, bias=False)

        def forward(self, x, cos, sin, meta):
            t = x.shape[0]
            y = self.ln1(x)
            q = rope(self.qn(self.q(y).view(t, heads, hd)), cos, sin)
            k = rope(self.kn(self.k(y).view(t, kv_heads, hd)), cos, sin)
            v = self.v(y).view(t, kv_heads, hd)
            x = x + self.o(memento_attention(q, k, v, meta, scale=hd**-0.5, backend=backend).reshape(t, -1))
            y = self.ln2(x)
            return x + self.down(nn.functional.silu(self.gate(y)) * self.up(y))

    def rope(x, cos, sin):
        a, b = x.chunk(2, -1)
        return x * cos + torch.cat([-b, a], -1) * sin

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(sz.vocab, hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.RMSNorm(hidden)
            self.head = nn.Linear(hidden, sz.vocab, bias=False)
            self.register_buffer("inv_freq", 1.0 / 1e6 ** (torch.arange(0, hd, 2).float() / hd), persistent=False)

        def forward(self, ids, pos, meta):
            ang = pos.float()[:, None] * self.inv_freq[None]
            cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None].to(self.embed.weight.dtype)
            sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None].to(self.embed.weight.dtype)
            x = self.embed(ids)
            for blk in self.blocks:
                x = blk(x, cos, sin, meta)
            return self.norm(x)

    return Model()


def step_sft_step(sz: Sizes) -> dict:
    torch = _torch()
    from memento_train.models.lm_head import fused_token_loss_sum
    from memento_train.planning.trace_shapes import memento_batch
    from memento_train.training.flops import PEAK_BF16_TFLOPS

    backend = "triton" if _cuda() else "segment"
    if _cuda():
        from memento_train.kernels import triton_unavailable_reason

        if triton_unavailable_reason():
            backend = "flex"
    dtype = torch.bfloat16 if _cuda() else torch.float32
    model = _qwen_shaped(sz, backend).to(_device(), dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=_cuda() or None)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    hidden, layers, heads, _, _ = sz.model
    sub = Sizes(**{**asdict(sz), "tokens": sz.sft_tokens, "doc_tokens": min(sz.sft_tokens, sz.doc_tokens)})
    memento_meta, lengths = memento_batch(sub.tokens, doc_tokens=sub.doc_tokens, scale=sz.shape_scale)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sz.vocab, (sub.tokens,), generator=g)
    labels = torch.roll(ids, -1)
    labels[memento_meta.cu_seqlens[1:].long() - 1] = -100
    pos = torch.cat([torch.arange(n) for n in lengths])
    ids, labels, pos = ids.to(_device()), labels.to(_device()), pos.to(_device())
    name = torch.cuda.get_device_name(0) if _cuda() else ""
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    rows = {}
    base = _peak_reset()
    for stage, keep in (("stage1", -1), ("stage2", 0)):
        meta = _batch(sub, keep=keep)[0]

        def step(meta=meta):
            loss = fused_token_loss_sum(model(ids, pos, meta), model.head.weight, labels) / labels.numel()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = _time_ms(step, sz.repeats, sz.warmup)
        kept = meta.kept_pairs(None)
        flops = 6 * linear * sub.tokens + layers * _attention_flops(heads, hidden // heads, kept)
        tflops = flops / ms / 1e9
        rows[stage] = {
            "ms": ms,
            "tokens_per_s": sub.tokens / ms * 1e3,
            "tflops": tflops,
            "mfu": tflops / peak if peak else None,
        }
    out = {
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": sub.tokens,
        "backend": backend,
        **rows,
        "stage2_over_stage1_tokens_per_s": rows["stage2"]["tokens_per_s"] / rows["stage1"]["tokens_per_s"],
        "peak_gib": _peak_gib(base),
    }
    mfu = "/".join(f"{r['mfu']:.0%}" for r in rows.values()) if peak else "n/a"
    out["summary"] = (
        f"{out['params'] / 1e6:.0f}M params, {rows['stage1']['tokens_per_s']:.0f} / "
        f"{rows['stage2']['tokens_per_s']:.0f} tok/s (stage 1 / 2), MFU {mfu}, "
        f"ratio {out['stage2_over_stage1_tokens_per_s']:.2f}x"
    )
    return out


def step_attention_benchmark(sz: Sizes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "attention.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "attention.py"), *sz.bench_args, "--json", str(path)]
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=dict(STEPS)["attention_benchmark"] - 20,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        )
        if res.returncode:
            raise RuntimeError(f"benchmarks/attention.py exited {res.returncode}: {res.stderr[-1500:]}")
        results = json.loads(path.read_text()) if path.exists() else None
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return {"table": lines[-30:], "results": results, "summary": (lines[-1] if lines else "")[:120]}


# -- driver -----------------------------------------------------------------------------------------------
def run_step_here(name: str, small: bool) -> dict:
    """Run one step in this process; returns its record (status ok / skipped / failed)."""
    sz = SMALL if small else FULL
    t0 = time.perf_counter()
    try:
        result = globals()[f"step_{name}"](sz)
        record = {"status": "ok", **result}
    except Skip as why:
        record = {"status": "skipped", "summary": str(why)}
    except Exception as exc:  # noqa: BLE001 - one step's failure must not hide the others
        record = {
            "status": "failed",
            "summary": f"{type(exc).__name__}: {exc}"[:300],
            "traceback": traceback.format_exc()[-4000:],
        }
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def run_step_isolated(name: str, limit: float, small: bool) -> dict:
    """One step in a child process (its own CUDA context), killed after ``limit`` seconds."""
    env = {**os.environ}
    if small and not _cuda():
        env.setdefault("TRITON_INTERPRET", "1")  # the Triton kernel runs in Triton's interpreter on CPU
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        cmd = [sys.executable, __file__, "--step", name, "--step-out", str(out)] + (["--small"] if small else [])
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "summary": f"timed out after {limit:.0f} s", "seconds": limit}
        if out.exists():
            return json.loads(out.read_text())
        return {
            "status": "failed",
            "summary": f"step process died (exit {res.returncode}): {res.stderr[-300:]}",
            "stderr": res.stderr[-4000:],
        }


def print_table(records: dict[str, dict]) -> None:
    width = max(len(n) for n in records)
    print(f"\n{'step':{width}s}  {'status':8s} {'s':>6s}  result")
    for name, rec in records.items():
        print(f"{name:{width}s}  {rec['status']:8s} {rec.get('seconds', 0):6.1f}  {rec.get('summary', '')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-sized shapes (a smoke test of this script)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    ap.add_argument("--only", nargs="+", choices=[n for n, _ in STEPS], help="run only these steps")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--step-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:  # child process: one step
        args.step_out.write_text(json.dumps(run_step_here(args.step, args.small), default=str))
        return 0
    start = time.perf_counter()
    records: dict[str, dict] = {}
    for name, limit in STEPS:
        if args.only and name not in args.only:
            continue
        left = BUDGET_S - (time.perf_counter() - start)
        if left < 20 and not args.small:
            records[name] = {"status": "skipped", "summary": f"time budget of {BUDGET_S} s spent", "seconds": 0}
            continue
        records[name] = run_step_isolated(name, limit if not args.small else 600, args.small)
        print(
            f"[gpu_check] {name}: {records[name]['status']} ({records[name].get('seconds', 0):.1f} s) "
            f"{records[name].get('summary', '')}",
            flush=True,
        )
    report = {
        "small": args.small,
        "total_seconds": round(time.perf_counter() - start, 1),
        "sizes": asdict(SMALL if args.small else FULL),
        "steps": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print_table(records)
    print(f"\nreport: {args.out} ({report['total_seconds']:.0f} s)")
    return 1 if any(r["status"] == "failed" for r in records.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
