"""KV memory of the reference generator with and without Memento eviction, on the real sample traces.

The three traces of ``memento_train/assets/sample_traces.jsonl`` (full length, ChatML of the shipped
tokenizer) are teacher-forced token by token through a tiny random Qwen3 with
:class:`~memento_train.generation.ReferenceGenerator`, all three in one batch, with eviction on
(``keep_last_n_blocks=0``) and off (``enable=False``). Reported per trace and overall:

- peak KV entries per layer and KV AUC (entries summed over decode steps), from the engine's
  ``kv_trace`` (asserted equal to ``masking.live_kv_trace`` of the parsed trace);
- peak KV bytes measured from the cache tensors: each trace is also decoded alone (batch 1) and the
  cache's allocated K/V storage (``untyped_storage().nbytes()``, spare slots included) is recorded at
  every step; for the batched run, the whole batch's storage peak;
- decode throughput (response tokens per second, prefill included) of the batched run;
- the same peaks scaled to a Qwen3-8B-sized KV (36 layers x 8 KV heads x 128 x bf16 = 144 KiB/token).

    python benchmarks/generation_kv.py                 # ~1-2 min on 2 CPU cores (1 torch thread)
    python benchmarks/generation_kv.py --no-alone      # skip the batch-1 storage runs

``--generator vllm`` measures real decoding instead (vLLM has no teacher forcing): the warmed tiny
policy (``--model``, default ``tests/assets/tiny_rl_warmed``) answers ``--prompts`` problems of the
synthetic task, single- and multi-turn, through vLLM 0.32 + the Memento plugin with eviction on and off
(one engine, per-request options), and through the reference generator on the same prompts and seeds.
Per mode: decode tokens/s (wall time of the batch, prefill included, engine start excluded), per-sequence
peak and AUC of the KV entries the engine attended over (vLLM: measured by the plugin), peak KV bytes
(the engine's bytes per token), and vLLM vs reference ratios from the same run::

    python benchmarks/generation_kv.py --generator vllm --prompts 64 --max-new-tokens 160
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import torch

from memento_train.data import Renderer
from memento_train.generation import BlockMaskingConfig, ReferenceGenerator
from memento_train.masking import live_kv_trace, parse
from memento_train.models import build_tiny_model
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer
from memento_train.tokens import special_token_ids

BIG_MODEL_BYTES_PER_TOKEN = 36 * 8 * 128 * 2 * 2  # Qwen3-8B: layers x kv heads x head_dim x (K+V) x bf16


def load_traces(tokenizer):
    renderer = Renderer(tokenizer)
    text = (resources.files("memento_train") / "assets" / "sample_traces.jsonl").read_text()
    out = []
    for line in text.splitlines():
        ex = renderer.render(json.loads(line))
        ids = ex.input_ids.tolist()
        out.append((ids[: ex.prompt_len], ids[ex.prompt_len :]))
    return out


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run_mode(model, tok, bm: BlockMaskingConfig, traces, *, alone: bool, growth: int):
    gen = ReferenceGenerator(model, tok, bm, max_batch_size=len(traces), kv_growth=growth, track_storage=True)
    prompts, responses = [p for p, _ in traces], [r for _, r in traces]
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = gen.teacher_force(prompts, responses)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    alone_peaks = []
    if alone:
        single = ReferenceGenerator(model, tok, bm, max_batch_size=1, kv_growth=growth, track_storage=True)
        alone_peaks = [max(single.teacher_force([p], [r])[0].extra["cache_storage_bytes"]) for p, r in traces]
    return gen, results, elapsed, alone_peaks


def vllm_benchmark(args) -> None:
    """The ``--generator vllm`` rows (module docstring)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    import vllm_harness as vh  # the tests' prompts and engine settings

    from memento_train.generation import SamplingParams, SequenceRequest, VLLMEngine

    model_path = args.model or vh.ASSET
    tok = vh.tokenizer()
    prompts = vh.single_turn_prompts(tok, args.prompts - args.prompts // 4) + vh.multi_turn_prompts(
        tok, args.prompts // 4
    )
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=0,
        stop_token_ids=(tok.convert_tokens_to_ids("<|im_end|>"),),
    )
    modes = {"on": BlockMaskingConfig(keep_last_n_blocks=0), "off": BlockMaskingConfig(enable=False)}
    requests = [SequenceRequest(p, prompt_index=i) for i, p in enumerate(prompts)]
    options = {**vh.ENGINE_OPTIONS, "dtype": args.dtype}
    if args.device == "cuda":
        options.update(enforce_eager=False, gpu_memory_utilization=0.3)
        options.pop("block_size")
    t0 = time.perf_counter()
    engine = VLLMEngine(model_path, modes["on"], seed=0, **options)
    start_s = time.perf_counter() - t0
    rows = {}
    try:
        engine.run(requests[:2], params, extra_args=vh.memento_args(modes["on"]))  # warm-up
        for name, bm in modes.items():
            t0 = time.perf_counter()
            results = engine.run(requests, params, extra_args=vh.memento_args(bm))
            rows[("vllm", name)] = (results, time.perf_counter() - t0)
    finally:
        engine.shutdown()
    model = vh.reference_model().to(args.device)
    for name, bm in modes.items():
        gen = ReferenceGenerator(model, tok, bm, max_batch_size=len(prompts))
        t0 = time.perf_counter()
        results = gen.run(requests, params)
        rows[("reference", name)] = (results, time.perf_counter() - t0)

    bpt = rows[("vllm", "on")][0][0].kv_bytes[0] // rows[("vllm", "on")][0][0].kv_trace[0]
    print(
        f"model: {model_path} ({args.dtype} on {args.device}); {len(prompts)} prompts "
        f"({args.prompts // 4} multi-turn), max_new_tokens={args.max_new_tokens}, T={args.temperature}; "
        f"vLLM engine start {start_s:.1f} s (excluded); KV bytes/token measured by the plugin: {bpt}"
    )
    header = (
        f"{'generator':>9} {'evict':>5} | {'tokens':>6} {'seconds':>7} {'decode tok/s':>12} | "
        f"{'peak KV (max/mean)':>18} {'KV AUC':>9} | {'peak KV bytes (max)':>19}"
    )
    print(header)
    print("-" * len(header))
    for (gen_name, mode), (results, seconds) in rows.items():
        n = sum(r.num_tokens for r in results)
        peaks = [r.peak_kv for r in results]
        auc = sum(r.kv_auc for r in results)
        print(
            f"{gen_name:>9} {mode:>5} | {n:>6} {seconds:>7.2f} {n / seconds:>12,.1f} | "
            f"{max(peaks):>8} / {sum(peaks) / len(peaks):>7.1f} {auc:>9} | {fmt_bytes(max(peaks) * bpt):>19}"
        )
    print("-" * len(header))
    v_on, v_off = rows[("vllm", "on")], rows[("vllm", "off")]
    r_on = rows[("reference", "on")]
    same = all(a.token_ids == b.token_ids and a.kv_trace == b.kv_trace for a, b in zip(v_on[0], r_on[0]))
    auc_ratio = sum(r.kv_auc for r in v_off[0]) / sum(r.kv_auc for r in v_on[0])
    peak_ratio = sum(r.peak_kv for r in v_off[0]) / sum(r.peak_kv for r in v_on[0])
    tps = {k: sum(r.num_tokens for r in v[0]) / v[1] for k, v in rows.items()}
    print(
        f"vLLM eviction off/on: sum of per-sequence peaks x{peak_ratio:.2f}, KV AUC x{auc_ratio:.2f}; "
        f"decode tok/s on/off x{tps[('vllm', 'on')] / tps[('vllm', 'off')]:.2f}; "
        f"vLLM/reference decode tok/s (eviction on) x{tps[('vllm', 'on')] / tps[('reference', 'on')]:.2f}; "
        f"vLLM tokens and KV traces equal the reference's: {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--generator",
        default="reference",
        choices=["reference", "vllm"],
        help="reference: teacher-force the sample traces; vllm: decode through vLLM + the plugin",
    )
    ap.add_argument("--model", default=None, help="--generator vllm: checkpoint (default: the warmed tiny policy)")
    ap.add_argument("--prompts", type=int, default=64, help="--generator vllm: number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="--generator vllm")
    ap.add_argument("--temperature", type=float, default=0.0, help="--generator vllm (0 = greedy)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--growth", type=int, default=64, help="spare cache slots per reallocation")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: a tiny model's ops are too small to parallelise; 0 = torch default)",
    )
    ap.add_argument("--no-alone", action="store_true", help="skip the batch-1 runs (storage per trace)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generator == "vllm":
        vllm_benchmark(args)
        return

    tok = load_shipped_tokenizer()
    ids = special_token_ids(tok)
    traces = load_traces(tok)
    model = build_tiny_model(
        tok,
        hidden_size=args.hidden,
        num_layers=args.layers,
        max_position_embeddings=8192,
        dtype=getattr(torch, args.dtype),
        device=args.device,
    )
    modes = {"on": BlockMaskingConfig(keep_last_n_blocks=0), "off": BlockMaskingConfig(enable=False)}
    runs = {
        name: run_mode(model, tok, bm, traces, alone=not args.no_alone, growth=args.growth)
        for name, bm in modes.items()
    }

    first = runs["on"][1][0]
    bpt = first.kv_bytes[0] // first.kv_trace[0]
    print(
        f"model: tiny Qwen3 hidden={args.hidden} layers={args.layers} kv_heads=2 head_dim={args.hidden // 4} "
        f"{args.dtype} on {args.device}; KV bytes/token (all layers, measured) = {bpt}"
    )
    print(
        f"traces: {len(traces)} (tokens prompt+response: {[len(p) + len(r) for p, r in traces]}), "
        f"batched together; eviction on = keep_last_n_blocks=0, off = enable=False\n"
    )
    header = (
        f"{'trace':>5} {'tokens':>6} {'blocks':>6} | {'peak KV entries':>17} {'ratio':>5} | "
        f"{'peak KV bytes (alone)':>23} {'ratio':>5} | {'KV AUC (entries)':>21} {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    totals = {"on": [0, 0, 0], "off": [0, 0, 0]}  # sum of peaks, sum of AUC, sum of storage peaks
    for i, (prompt, response) in enumerate(traces):
        row = {}
        for name in ("on", "off"):
            gen, results, _, alone = runs[name]
            r = results[i]
            kill = parse(prompt + response, ids, gen.mask_config, prompt_len=len(prompt)).kill_row
            expected = live_kv_trace(kill)[len(prompt) - 1 : len(prompt) - 1 + r.num_tokens]
            assert r.kv_trace == expected.tolist(), "engine's live KV differs from the parser's"
            storage = alone[i] if alone else r.peak_kv * bpt
            row[name] = (r.peak_kv, storage, r.kv_auc)
            totals[name][0] += r.peak_kv
            totals[name][1] += r.kv_auc
            totals[name][2] += storage
        (pe_on, sb_on, auc_on), (pe_off, sb_off, auc_off) = row["on"], row["off"]
        blocks = results[i].num_blocks
        print(
            f"{i:>5} {len(prompt) + len(response):>6} {blocks:>6} | "
            f"{pe_on:>7} vs {pe_off:>7} {pe_off / pe_on:>5.2f} | "
            f"{fmt_bytes(sb_on):>10} vs {fmt_bytes(sb_off):>10} {sb_off / sb_on:>5.2f} | "
            f"{auc_on:>9} vs {auc_off:>9} {auc_off / auc_on:>5.2f}"
        )
    on, off = totals["on"], totals["off"]
    print("-" * len(header))
    print(
        f"{'all':>5} {sum(len(p) + len(r) for p, r in traces):>6} {'':>6} | {on[0]:>7} vs {off[0]:>7} "
        f"{off[0] / on[0]:>5.2f} | {fmt_bytes(on[2]):>10} vs {fmt_bytes(off[2]):>10} {off[2] / on[2]:>5.2f} | "
        f"{on[1]:>9} vs {off[1]:>9} {off[1] / on[1]:>5.2f}"
    )
    print()
    for name in ("on", "off"):
        gen, results, elapsed, _ = runs[name]
        n_tok = sum(r.num_tokens for r in results)
        batch_peak = max(max(r.extra["cache_storage_bytes"]) for r in results)
        print(
            f"eviction {name:>3}: batched cache storage peak {fmt_bytes(batch_peak):>10} | "
            f"{n_tok} tokens in {elapsed:.2f} s = {n_tok / elapsed:,.0f} decode tok/s "
            f"({len(results)} sequences/step, prefill included)"
        )
    big = BIG_MODEL_BYTES_PER_TOKEN
    print(
        f"\nQwen3-8B-sized KV ({big // 1024} KiB/token, same entries): sum of per-trace peaks "
        f"{on[0] * big / 2**30:.2f} GiB (on) vs {off[0] * big / 2**30:.2f} GiB (off); "
        f"AUC {on[1] * big / 2**40:.2f} vs {off[1] * big / 2**40:.2f} TiB x steps"
    )


if __name__ == "__main__":
    main()
