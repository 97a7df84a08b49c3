"""SFT training throughput, stage 2 (memento attention) vs stage 1 (causal), same tokens, one run.

Both stages train the same Qwen3-shaped model through the same engine on the same packed
OpenMementos-shaped micro-batches (prompt ~200 tokens, blocks ~1,150, summaries ~190, from
``benchmarks/shapes.py``); only the kill rows differ. Each measured step is forward + backward +
optimizer step. Prints tokens/s, achieved TFLOP/s counting only the attention pairs each mask keeps,
MFU on known GPUs, peak memory and the stage-2 / stage-1 ratios.

    python benchmarks/sft_throughput.py                       # CPU: tiny model, 4K-token micro-batches
    python benchmarks/sft_throughput.py --preset gpu-350m --tokens 16384 --backend flash_attn
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import memento_batch  # noqa: E402

from memento_train.attention import MementoAttentionMeta  # noqa: E402
from memento_train.attention.hf import attn_implementation  # noqa: E402
from memento_train.engines import EngineConfig, MicroBatch, build_engine  # noqa: E402
from memento_train.sft.losses import sft_loss_fn  # noqa: E402
from memento_train.training.flops import FlopCounter, peak_tflops  # noqa: E402
from memento_train.training.optim import OptimConfig  # noqa: E402

PRESETS = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "cpu-tiny": (256, 4, 8, 4, 768, 8192),
    "gpu-350m": (1024, 24, 16, 8, 3072, 32768),
    "gpu-600m": (1536, 24, 16, 8, 4608, 32768),
}


def build_model(preset: str, backend: str, checkpointing: bool):
    import transformers

    h, n, heads, kv, inter, vocab = PRESETS[preset]
    cfg = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=h // heads,
        max_position_embeddings=65536,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg)
    model.set_attn_implementation(attn_implementation(backend))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def micro_batch(meta: MementoAttentionMeta, vocab: int, device) -> MicroBatch:
    g = torch.Generator().manual_seed(1)
    T = meta.num_tokens
    cu = meta.cu_seqlens.long()
    pos = torch.arange(T) - torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
    ids = torch.randint(0, vocab, (T,), generator=g)
    labels = torch.roll(ids, -1)
    labels[cu[1:] - 1] = -100  # no target across documents
    return MicroBatch(ids.to(device), pos.to(device), meta.to(device), {"labels": labels.to(device)})


def measure(engine, mb: MicroBatch, steps: int, warmup: int, device) -> tuple[list[float], int]:
    loss_fn = sft_loss_fn(int((mb.extras["labels"] != -100).sum()))
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        engine.forward_backward([mb], loss_fn)
        engine.step(1e-5)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return times, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch (default 4096 CPU, 16384 GPU)")
    ap.add_argument("--doc-tokens", type=int, default=12_000, help="longest packed document")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--engine", default="fsdp2", choices=["fsdp2", "deepspeed"])
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    preset = args.preset or ("gpu-350m" if cuda else "cpu-tiny")
    tokens = args.tokens or (16384 if cuda else 4096)
    steps = args.steps or (10 if cuda else 3)
    precision = args.precision or ("bf16" if cuda else "fp32")
    if cuda:
        torch.cuda.set_device(device)
    init_file = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        model = build_model(preset, args.backend, args.checkpointing)
        flops = FlopCounter(model)
        vocab = model.config.vocab_size
        engine = build_engine(
            model, OptimConfig(lr=1e-5, warmup_steps=1), EngineConfig(kind=args.engine, precision=precision), device
        )
        memento_meta, lengths = memento_batch(tokens, doc_tokens=args.doc_tokens)
        causal_meta = MementoAttentionMeta.causal(memento_meta.cu_seqlens)
        peak = peak_tflops(torch.cuda.get_device_name(device) if cuda else None)
        print(
            f"# {preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), {tokens} tokens per "
            f"micro-batch in {len(lengths)} docs, engine {args.engine} {precision}, backend {args.backend}, "
            f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, {steps} steps after {args.warmup} warm-up"
        )
        rows = {}
        for name, meta in (("stage 1 (causal)", causal_meta), ("stage 2 (memento)", memento_meta)):
            mb = micro_batch(meta, vocab, device)
            times, mem = measure(engine, mb, steps, args.warmup, device)
            t = statistics.median(times)
            kept, causal = flops.attention_pairs(mb.meta)
            tflops = flops.step_flops(tokens, kept) / t / 1e12
            rows[name] = (t, tokens / t, tflops, kept / causal, mem)
            mfu = f"{tflops / peak:6.1%}" if peak else "   n/a"
            print(
                f"{name:18s} step {t * 1e3:9.1f} ms  {tokens / t:10.0f} tok/s  {tflops:8.2f} TFLOP/s (kept pairs)  "
                f"MFU {mfu}  kept/causal pairs {kept / causal:5.2f}  peak mem {mem / 2**30:6.2f} GiB"
            )
        (t1, tps1, *_), (t2, tps2, *_) = rows.values()
        print(f"stage 2 / stage 1 tokens/s: {tps2 / tps1:.2f}x")
    finally:
        dist.destroy_process_group()
        os.unlink(init_file)


if __name__ == "__main__":
    main()
