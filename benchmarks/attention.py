"""Attention benchmark on OpenMementos-shaped packed batches: every backend, one run, GPU or CPU.

Batches come from ``shapes.memento_batch`` (prompt ~200 tokens, blocks ~1,150, mementos ~190,
documents up to 12K tokens packed to exactly ``--tokens``; kill rows from the real parser). For each
size and mode (``fwd``, ``fwd+bwd``) it times:

- ``causal *``: plain causal attention over the same tokens, no eviction (the yardstick): on GPU
  stock ``flash_attn_varlen_func`` (if installed), PyTorch SDPA's FlashAttention per document, and
  our Triton kernel with causal metadata; on CPU the exact ``segment`` backend;
- ``sdpa dense mask``: a dense boolean mask per document (what the paper's HF implementation did);
- ``flex``: FlexAttention with the memento ``mask_mod`` (compiled; block mask built once, untimed);
- ``flash_attn``: stock flash-attn over gathered intervals (if installed);
- ``triton``: ``memento_train.kernels`` (tile skipping); ``segment``: the exact pure-PyTorch backend.

It prints time (median), speed-up over the causal yardstick and over dense SDPA, peak memory above
the inputs, and TFLOP/s counting only the pairs each row's mask keeps (4·pairs·D·H forward, 3.5× that
for forward+backward), then a summary against the issue's H100 targets. Backends that cannot run
here are listed with the reason; a backend that fails (e.g. out of memory) shows its error.

On a GPU (what the targets are about; ~3-5 min on an H100, first Triton/flex compilation included)::

    python benchmarks/attention.py                          # 8K/16K/32K, 32 q / 8 kv heads, d 128, bf16
    python benchmarks/attention.py --head-dim 64 --heads 16 --kv-heads 16 --json out.json
    python benchmarks/attention.py --triton-config fwd=128x128:w8:s3 --triton-config dq=64x64:w4:s2
                                                            # extra rows: try Triton block configs

Without a GPU, ``--tiles-only`` prints what the Triton kernels would visit at the GPU block configs
(pure PyTorch, seconds): the share of causal tile pairs that are live, full (no mask) or partial,
and so the speed-up over causal attention that tile skipping allows at equal per-tile speed::

    python benchmarks/attention.py --tiles-only             # 8K/16K/32K, d 128 configs
    python benchmarks/attention.py --tiles-only --head-dim 64 --triton-config dkdv=32x64

On CPU (float32, each measurement in a fresh process so peak RSS is per backend; Triton runs only
under ``TRITON_INTERPRET=1`` and is far too slow for these sizes, so it is skipped with the reason)::

    python benchmarks/attention.py --device cpu --tokens 4096 8192
    TRITON_INTERPRET=1 python benchmarks/attention.py --device cpu --tokens 512 --allow-interpreter
                                                            # smoke test of the triton rows (minutes)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FLASH_LIKE = ("causal flash_attn", "causal sdpa-flash")  # "causal FlashAttention" for the TFLOP/s target


def cases(device: str) -> list[tuple[str, str, bool]]:
    """(label, runner, evict). ``runner`` is a memento backend or a causal-only baseline."""
    if device == "cpu":
        return [
            ("causal segment", "segment", False),
            ("sdpa dense mask", "sdpa", True),
            ("flex", "flex", True),
            ("segment", "segment", True),
            ("triton", "triton", True),
        ]
    return [
        ("causal flash_attn", "causal_flash_attn", False),
        ("causal sdpa-flash", "causal_sdpa", False),
        ("causal triton", "triton", False),
        ("sdpa dense mask", "sdpa", True),
        ("flex", "flex", True),
        ("flash_attn", "flash_attn", True),
        ("segment", "segment", True),
        ("triton", "triton", True),
    ]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _causal_runner(kind: str, meta, q, k, v, scale):
    """Plain causal attention per document with a stock kernel (no memento metadata involved)."""
    import torch
    import torch.nn.functional as F

    if kind == "causal_flash_attn":
        from flash_attn import flash_attn_varlen_func

        cu = meta.cu_seqlens

        def run():
            return flash_attn_varlen_func(
                q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, softmax_scale=scale, causal=True
            )

        return run
    # PyTorch SDPA restricted to its FlashAttention kernel: one call per document; K/V heads are
    # expanded for GQA so the flash kernel applies (the expansion is part of what is timed).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bounds = list(zip(meta.cu_seqlens.tolist()[:-1], meta.cu_seqlens.tolist()[1:]))
    group = q.shape[1] // k.shape[1]

    def run():
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        outs = []
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for s, e in bounds:
                o = F.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1)[None],
                    kk[s:e].transpose(0, 1)[None],
                    vv[s:e].transpose(0, 1)[None],
                    is_causal=True,
                    scale=scale,
                )
                outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    return run


def unavailable(runner: str, device: str, allow_interpreter: bool = False) -> str | None:
    """Why ``runner`` cannot run on ``device`` (checked in the parent, so the table can say so)."""
    from memento_train.attention import available_backends

    if runner == "causal_flash_attn":
        return available_backends()["flash_attn"]
    if runner == "causal_sdpa":
        return None if device == "cuda" else "SDPA's FlashAttention kernel needs CUDA"
    reason = available_backends()[runner]
    if reason is None and runner == "triton" and device == "cpu" and not allow_interpreter:
        return "CPU interpreter (TRITON_INTERPRET=1) is far too slow at benchmark sizes; run on a GPU"
    if reason is None and runner == "flex" and device == "cpu":
        return "fwd only (no CPU backward in torch)"  # only refuses fwd+bwd: see measure()
    return reason


def print_tile_work(tokens: list[int], head_dim: int, configs: list[str | None]) -> None:
    """Tile pairs each Triton kernel visits on the benchmark batches, as shares of the causal ones."""
    from shapes import memento_batch

    from memento_train.kernels import build_tile_plan
    from memento_train.kernels.function import GPU_CONFIGS, parse_config

    base = GPU_CONFIGS[64 if head_dim <= 64 else 128]
    print(
        f"tile work of the triton kernels (head_dim {head_dim}): shares of the causal tile pairs; "
        "'bound' = causal / live tiles, the speed-up over causal at equal per-tile speed"
    )
    for n in tokens:
        meta, _ = memento_batch(n)
        print(f"  {n} tokens: the mask keeps {meta.kept_pairs() / meta.causal_pairs():.1%} of the causal pairs")
        for text in configs:
            cfg = parse_config(text, base) if text else base
            for name in ("fwd", "dq", "dkdv"):
                c = getattr(cfg, name)
                plan = build_tile_plan(meta.cu_seqlens, meta.kill_row, c.block_m, c.block_n)
                live, full = plan.live_pairs / plan.causal_pairs, plan.full_pairs / plan.causal_pairs
                print(
                    f"    {name:4s} {c.block_m:>3d}x{c.block_n:<3d}  live {live:6.1%}  full {full:6.1%}  "
                    f"partial {live - full:6.1%}  bound {1 / live:4.2f}x"
                )


def _measure(args: dict) -> dict:
    import torch
    from shapes import memento_batch

    from memento_train.attention import flex, memento_attention
    from memento_train.kernels import set_triton_config, tile_plan, triton_config

    device = torch.device(args["device"])
    dtype = getattr(torch, args["dtype"])
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(args["threads"])
        flex.FLEX_COMPILE = True
    set_triton_config(args.get("triton_config"))
    meta, _ = memento_batch(args["tokens"], keep_last_n_blocks=0 if args["evict"] else -1)
    meta = meta.to(device)
    T, H, Hkv, D = meta.num_tokens, args["heads"], args["kv_heads"], args["head_dim"]
    grad = args["mode"] == "fwd+bwd"
    q = torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(T, Hkv, D, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(T, Hkv, D, device=device, dtype=dtype, requires_grad=grad)
    upstream = torch.randn(T, H, D, device=device, dtype=dtype)
    scale = D**-0.5
    runner = args["runner"]
    # Per-batch structures are built once and shared by all layers: not timed.
    extra = {}
    if runner in ("segment", "flash_attn"):
        meta.interval_plan()
    elif runner == "flex":
        flex.block_mask_for(meta, None)
    elif runner == "triton":
        cfg = triton_config(D, device)
        plans = [tile_plan(meta, c.block_m, c.block_n) for c in (cfg.fwd, cfg.dq, cfg.dkdv)]
        extra = {"live_tiles": plans[0].live_pairs / plans[0].causal_pairs, "config": cfg.describe()}
    attend = (
        _causal_runner(runner, meta, q, k, v, scale)
        if runner.startswith("causal_")
        else lambda: memento_attention(q, k, v, meta, scale=scale, backend=runner)
    )

    def run():
        q.grad = k.grad = v.grad = None
        with torch.set_grad_enabled(grad):
            out = attend()
            if grad:
                out.backward(upstream)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        for _ in range(args["warmup"]):  # compilation (Triton, flex), autotuning, allocator warm-up
            run()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mb()
        times = []
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, 0.0)
        pairs = meta.kept_pairs()
        flops = 4 * pairs * D * H * (3.5 if grad else 1.0)
        ms = 1000 * statistics.median(times)
        return {
            "ms": ms,
            "peak_mb": peak,
            "pairs": pairs,
            "tflops": flops / (ms / 1000) / 1e12,
            "kept": pairs / meta.causal_pairs(),
            **extra,
        }
    except Exception as exc:  # report, do not hide: the table shows the error
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"}


def _measure_child(args: dict, queue) -> None:
    queue.put(_measure(args))


def measure(**args) -> dict:
    """GPU: in this process (CUDA memory stats are exact). CPU: in a fresh process (per-run RSS)."""
    if args["device"] == "cuda":
        import torch

        result = _measure(args)
        torch.cuda.empty_cache()  # the next backend starts from the same allocator state
        return result
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_child, args=(args, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"error": f"exit code {proc.exitcode}"}


def _fmt_ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:7.2f}x" if num and den else "      -"


def print_table(tokens: int, mode: str, rows: dict[str, dict], yardstick: str | None) -> None:
    ref = rows.get("sdpa dense mask", {}).get("ms")
    causal = rows.get(yardstick, {}).get("ms") if yardstick else None
    print(f"-- {mode}   (speed-ups: vs '{yardstick}' and vs dense-mask SDPA; TFLOP/s over kept pairs)")
    w = max(24, *(len(label) + 1 for label in rows))
    print(f"{'backend':{w}s} {'ms':>9s} {'vs causal':>9s} {'vs sdpa':>9s} {'peak MiB':>9s} {'TFLOP/s':>8s}")
    for label, r in rows.items():
        if "ms" not in r:
            print(f"{label:{w}s} {'skipped: ' if 'skipped' in r else 'error: '}{r.get('skipped') or r.get('error')}")
            continue
        print(
            f"{label:{w}s} {r['ms']:9.2f} {_fmt_ratio(causal, r['ms']):>9s} {_fmt_ratio(ref, r['ms']):>9s} "
            f"{r['peak_mb']:9.0f} {r['tflops']:8.2f}"
        )


def print_targets(tokens: int, rows: dict[str, dict]) -> None:
    """The issue's targets (H100, bf16, 32K, fwd+bwd) checked on the largest measured size."""
    tri = rows.get("triton", {}).get("ms")
    if tri is None:
        print("targets: triton did not run here")
        return

    def ms(label):
        return rows.get(label, {}).get("ms")

    def check(name, other, goal):
        if other is None:
            print(f"  {name:42s} n/a (baseline did not run)")
        else:
            print(f"  {name:42s} {other / tri:6.2f}x  (target >= {goal}x) {'OK' if other / tri >= goal else 'MISSED'}")

    print(f"targets at {tokens} tokens, fwd+bwd (triton {tri:.2f} ms):")
    best_causal = min((m for m in (ms(lbl) for lbl in rows if lbl.startswith("causal")) if m), default=None)
    check("vs causal on the same tokens (fastest causal)", best_causal, 2.0)
    check("vs causal triton (same kernel, no eviction)", ms("causal triton"), 2.0)
    check("vs FlexAttention, same mask", ms("flex"), 1.3)
    check("vs dense-mask SDPA", ms("sdpa dense mask"), 20.0)
    flash = [rows[lbl]["tflops"] for lbl in FLASH_LIKE if "tflops" in rows.get(lbl, {})]
    if flash:
        share = rows["triton"]["tflops"] / max(flash)
        print(
            f"  {'kept-pair TFLOP/s vs causal FlashAttention':42s} {share:6.0%}   (target >= 80%) "
            f"{'OK' if share >= 0.8 else 'MISSED'}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--tokens", type=int, nargs="+", help="default: 8192 16384 32768 (GPU), 8192 (CPU)")
    p.add_argument("--heads", type=int, help="query heads (default 32 GPU / 8 CPU)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default 8 GPU / 2 CPU)")
    p.add_argument("--head-dim", type=int, help="default 128 GPU / 64 CPU")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bfloat16 GPU / float32 CPU")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd+bwd", "fwd"])
    p.add_argument("--backends", nargs="+", help="only these labels (e.g. triton flex 'causal triton')")
    p.add_argument(
        "--triton-config",
        action="append",
        default=[],
        help="extra 'triton [CONFIG]' rows, e.g. fwd=128x128:w8:s3,dq=64x64,dkdv=64x64 (repeatable)",
    )
    p.add_argument("--repeats", type=int, help="timed runs, median reported (default 10 GPU / 2 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--json", type=Path, help="also write all results here")
    p.add_argument(
        "--tiles-only",
        action="store_true",
        help="print the Triton kernels' tile work at the GPU configs and exit (no GPU needed)",
    )
    p.add_argument(
        "--allow-interpreter",
        action="store_true",
        help="with TRITON_INTERPRET=1 on CPU, run triton anyway (a smoke test of this script: use --tokens 512 or so)",
    )
    a = p.parse_args()

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    gpu = device == "cuda"
    tokens = a.tokens or ([8192, 16384, 32768] if gpu else [8192])
    shape = dict(
        heads=a.heads or (32 if gpu else 8),
        kv_heads=a.kv_heads or (8 if gpu else 2),
        head_dim=a.head_dim or (128 if gpu else 64),
        dtype=a.dtype or ("bfloat16" if gpu else "float32"),
    )
    repeats = a.repeats or (10 if gpu else 2)
    if a.tiles_only or gpu:
        print_tile_work(a.tokens or [8192, 16384, 32768], a.head_dim or 128, [None, *a.triton_config])
        if a.tiles_only:
            return
    all_cases = cases(device) + [(f"triton [{c}]", "triton", True) for c in a.triton_config]
    if a.backends:
        all_cases = [c for c in all_cases if c[0] in a.backends or c[0].split(" [")[0] in a.backends]
    name = torch.cuda.get_device_name() if gpu else f"CPU, {a.threads} threads"
    print(
        f"memento attention benchmark on {name}: heads {shape['heads']}/{shape['kv_heads']}, head_dim "
        f"{shape['head_dim']}, {shape['dtype']}, median of {repeats}"
    )

    results = []
    for n in tokens:
        print(f"\n== {n} tokens ==")
        for mode in a.modes:
            rows: dict[str, dict] = {}
            for label, runner, evict in all_cases:
                reason = unavailable(runner, device, a.allow_interpreter)
                if reason and not (runner == "flex" and mode == "fwd" and reason.startswith("fwd only")):
                    rows[label] = {"skipped": reason}
                    continue
                config = label.split(" [", 1)[1][:-1] if " [" in label else None
                rows[label] = measure(
                    device=device,
                    tokens=n,
                    mode=mode,
                    runner=runner,
                    evict=evict,
                    repeats=repeats,
                    warmup=a.warmup,
                    threads=a.threads,
                    triton_config=config,
                    **shape,
                )
                results.append({"tokens": n, "mode": mode, "backend": label, **shape, **rows[label]})
            yardstick = next((lbl for lbl in rows if lbl.startswith("causal") and "ms" in rows[lbl]), None)
            if gpu:  # the fastest causal kernel is the honest yardstick
                timed = [lbl for lbl in rows if lbl.startswith("causal") and "ms" in rows[lbl]]
                yardstick = min(timed, key=lambda lbl: rows[lbl]["ms"]) if timed else None
            print_table(n, mode, rows, yardstick)
            memento = rows.get("triton", {})
            kept = next((r["kept"] for lbl, r in rows.items() if "kept" in r and not lbl.startswith("causal")), None)
            if kept is not None:
                tiles = (
                    f"; triton visits {memento['live_tiles']:.1%} of the causal tiles ({memento['config']})"
                    if "live_tiles" in memento
                    else ""
                )
                print(f"   memento mask keeps {kept:.1%} of the causal pairs{tiles}")
            if mode == "fwd+bwd" and n == max(tokens):
                print_targets(n, rows)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
