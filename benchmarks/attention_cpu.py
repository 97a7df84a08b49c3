"""CPU attention benchmark: dense-mask ``sdpa`` vs exact ``segment`` vs ``flex`` on OpenMementos shapes.

Every measurement runs in a fresh subprocess, so peak memory (RSS above the process's baseline after
the inputs exist) belongs to that backend alone. All figures come from one invocation and are
printed as ratios to the dense-mask reference and to plain causal attention on the same tokens.

    python benchmarks/attention_cpu.py                  # 8K and 16K tokens
    python benchmarks/attention_cpu.py --tokens 8192 --heads 8 --kv-heads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = [
    # (label, backend, mode, evict)
    ("causal (segment, no eviction)", "segment", "fwd+bwd", False),
    ("sdpa dense mask", "sdpa", "fwd+bwd", True),
    ("segment", "segment", "fwd+bwd", True),
    ("causal (segment, no eviction)", "segment", "fwd", False),
    ("sdpa dense mask", "sdpa", "fwd", True),
    ("segment", "segment", "fwd", True),
    ("flex (compiled)", "flex", "fwd", True),
]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _measure(args: dict, queue) -> None:
    import torch

    from memento_train.attention import flex, memento_attention
    from shapes import memento_batch

    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    flex.FLEX_COMPILE = True
    meta, _ = memento_batch(args["tokens"], keep_last_n_blocks=0 if args["evict"] else -1)
    T, H, Hkv, D = meta.num_tokens, args["heads"], args["kv_heads"], args["head_dim"]
    grad = args["mode"] == "fwd+bwd"
    q = torch.randn(T, H, D, requires_grad=grad)
    k = torch.randn(T, Hkv, D, requires_grad=grad)
    v = torch.randn(T, Hkv, D, requires_grad=grad)
    meta.interval_plan()  # plans are built once per batch and shared by all layers: not timed

    def run():
        with torch.set_grad_enabled(grad):
            out = memento_attention(q, k, v, meta, backend=args["backend"])
            if grad:
                out.sum().backward()

    try:
        run()  # warm-up (and flex compilation)
        base = _rss_mb()
        times = []
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put({"ms": 1000 * min(times), "peak_mb": max(peak - base, 0.0),
                   "kept": meta.kept_pairs() / meta.causal_pairs()})
    except Exception as exc:  # report, do not hide: the table shows the error
        queue.put({"error": f"{type(exc).__name__}: {str(exc)[:120]}"})


def measure(**args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(args, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"error": f"exit code {proc.exitcode}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()

    results = []
    for tokens in a.tokens:
        print(f"\n== {tokens} tokens, heads {a.heads}/{a.kv_heads}, head_dim {a.head_dim}, float32, "
              f"{a.threads} threads ==")
        rows = {}
        for label, backend, mode, evict in CASES:
            r = measure(tokens=tokens, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                        repeats=a.repeats, threads=a.threads, backend=backend, mode=mode, evict=evict)
            rows[(label, mode)] = r
            results.append({"tokens": tokens, "backend": label, "mode": mode, **r})
        for mode in ("fwd+bwd", "fwd"):
            ref = rows.get(("sdpa dense mask", mode), {})
            causal = rows.get(("causal (segment, no eviction)", mode), {})
            print(f"-- {mode}")
            print(f"{'backend':32s} {'ms':>9s} {'peak MB':>9s} {'x vs sdpa':>10s} {'x vs causal':>12s}")
            for (label, m), r in rows.items():
                if m != mode:
                    continue
                if "error" in r:
                    print(f"{label:32s} error: {r['error']}")
                    continue
                vs_sdpa = ref.get("ms", float("nan")) / r["ms"]
                vs_causal = causal.get("ms", float("nan")) / r["ms"]
                print(f"{label:32s} {r['ms']:9.1f} {r['peak_mb']:9.0f} {vs_sdpa:10.2f} {vs_causal:12.2f}")
        kept = rows.get(("segment", "fwd"), {}).get("kept")
        if kept is not None:
            print(f"memento mask keeps {kept:.1%} of the causal pairs")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
