"""Host memory of trainer ranks at load and at export (#17 item 6), measured on two CPU ranks.

A ~105 MB fp32 Qwen3-shaped checkpoint is loaded the way a trainer rank does (``load_model(...,
rank=r)``: rank 0 reads it, rank 1 builds on meta) and handed to each engine; then the engine's full
state is gathered and rank 0 exports it. Each rank's resident set is measured (peak = kernel high-
water mark). "transient" is the peak above what the rank still holds once the engine is built: what
loading costs beyond the engine's own state. The old way (every rank loads the whole model) runs in
the same job for comparison. The numbers are printed (``pytest -s``) and written to the report.
"""

from __future__ import annotations

import gc
import os

import engine_harness as H
import pytest
import torch
import torch.distributed as dist
from host_memory import MALLOC_ENV, peak, reset_peak, rss

from memento_train.masking import BlockMaskingConfig

HIDDEN, LAYERS, FFN = 512, 8, 1536


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, int]:
    """An fp32 HF checkpoint (with the shipped tokenizer) and its weight bytes."""
    import transformers

    from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

    tok = load_shipped_tokenizer()
    cfg = transformers.Qwen3Config(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=HIDDEN // 8,
        tie_word_embeddings=True,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg)
    path = str(tmp_path_factory.mktemp("ckpt"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, sum(p.numel() * p.element_size() for p in model.parameters())


def _measure(rank: int, make_engine, out_dir: str, checkpoint_path: str) -> dict:
    """Peak / steady / transient resident bytes of load + engine build, then of the full-state gather
    and (rank 0) the HF export; checks rank 0's gathered weights against the checkpoint."""
    from safetensors.torch import load_file

    from memento_train.export.writer import export_hf

    gc.collect()
    base = rss()
    reset_peak()
    engine, model_config, tok = make_engine()
    gc.collect()
    load_peak, steady = peak() - base, rss() - base
    gc.collect()
    before = rss()
    reset_peak()
    state = engine.full_state_dict()
    mismatched = None
    if rank == 0:
        ref = load_file(os.path.join(checkpoint_path, "model.safetensors"))
        mismatched = [k for k, v in ref.items() if not torch.equal(state[k], v)]
        export_hf(state, model_config, tok, out_dir, info={"block_masking": BlockMaskingConfig()}, dtype=torch.float32)
    del state
    gc.collect()
    export_peak = peak() - before
    del engine
    gc.collect()
    return {
        "load_peak": load_peak,
        "steady": steady,
        "transient": load_peak - steady,
        "export_peak": export_peak,
        "mismatched": mismatched,
    }


def load_export_job(rank: int, world_size: int, checkpoint_path: str, configs: list, out_dir: str) -> list:
    from memento_train.engines import EngineConfig, build_engine
    from memento_train.models.config import ModelConfig
    from memento_train.models.loading import load_model, run_tokenizer
    from memento_train.training.optim import OptimConfig

    mcfg = ModelConfig(path=checkpoint_path, attn_backend="segment")
    results = {}
    for i, (kind, stage, how) in enumerate([configs[0], *configs]):  # the first run warms up (imports)

        def make_engine(how=how, kind=kind, stage=stage):
            tok = run_tokenizer(mcfg)
            model = load_model(mcfg, tok, seed=0, rank=rank if how == "rank0" else None)
            engine = build_engine(model, OptimConfig(), EngineConfig(kind=kind, zero_stage=stage), torch.device("cpu"))
            return engine, model.config, tok

        results[(kind, stage, how) if i else "warm-up"] = _measure(
            rank, make_engine, os.path.join(out_dir, f"{kind}{stage}{how}"), checkpoint_path
        )
    del results["warm-up"]
    every: list = [None] * world_size
    dist.all_gather_object(every, results)
    return every


def _report(per_rank: list, model_bytes: int) -> None:
    mb = 2**20
    print(
        f"\nmodel weights {model_bytes / mb:.0f} MiB (fp32); resident MiB per rank: load peak / steady / "
        f"transient / export peak"
    )
    for key in per_rank[0]:
        cells = "   ".join(
            f"rank {r}: {res[key]['load_peak'] / mb:5.0f} {res[key]['steady'] / mb:5.0f} "
            f"{res[key]['transient'] / mb:5.0f} {res[key]['export_peak'] / mb:5.0f}"
            for r, res in enumerate(per_rank)
        )
        print(f"{'/'.join(map(str, key)):24s} {cells}")


def _run(checkpoint, configs, tmp_path, monkeypatch) -> list:
    for k, v in MALLOC_ENV.items():
        monkeypatch.setenv(k, v)
    path, model_bytes = checkpoint
    per_rank = H.run_ranks(load_export_job, 2, (path, configs, str(tmp_path / "out")), str(tmp_path))
    _report(per_rank, model_bytes)
    for res in per_rank[0].values():
        assert res["mismatched"] == [], f"gathered weights differ from the checkpoint: {res['mismatched'][:5]}"
    return per_rank


def test_fsdp2_rank1_loads_only_its_shard_and_exports_nothing(checkpoint, tmp_path, monkeypatch):
    model_bytes = checkpoint[1]
    ranks = _run(checkpoint, [("fsdp2", 3, "rank0"), ("fsdp2", 3, "every")], tmp_path, monkeypatch)
    new, old = ranks[1][("fsdp2", 3, "rank0")], ranks[1][("fsdp2", 3, "every")]
    assert old["load_peak"] > 0.95 * model_bytes  # every rank loading the whole model: what this fixes
    assert new["load_peak"] < 0.7 * model_bytes  # its half of the weights plus one tensor in flight
    assert new["transient"] < 0.2 * model_bytes
    assert new["export_peak"] < 0.2 * model_bytes


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_rank1_loads_from_rank0_and_exports_nothing(checkpoint, tmp_path, monkeypatch, stage):
    model_bytes = checkpoint[1]
    ranks = _run(checkpoint, [("deepspeed", stage, "rank0")], tmp_path, monkeypatch)
    new = ranks[1][("deepspeed", stage, "rank0")]
    if stage == 3:  # (ZeRO-2 keeps the whole module on every device: on CPU that *is* host memory)
        assert new["transient"] < 0.3 * model_bytes
    # DeepSpeed's gather used to leave a full fp32 copy on every rank
    assert new["export_peak"] < 0.2 * model_bytes


def megatron_load_job(checkpoint_path: str, out_dir: str) -> list:
    rank = dist.get_rank()
    from memento_train.engines import EngineConfig, build_engine
    from memento_train.models.config import ModelConfig
    from memento_train.models.loading import load_model, run_tokenizer
    from memento_train.training.optim import OptimConfig

    mcfg = ModelConfig(path=checkpoint_path, attn_backend="segment")

    def make_engine():
        tok = run_tokenizer(mcfg)
        model = load_model(mcfg, tok, seed=0, rank=rank)
        engine = build_engine(
            model, OptimConfig(), EngineConfig(kind="megatron", tensor_parallel=2), torch.device("cpu")
        )
        return engine, model.config, tok

    _measure(rank, make_engine, os.path.join(out_dir, "warm-up"), checkpoint_path)
    return {("megatron", "tp2", "rank0"): _measure(rank, make_engine, os.path.join(out_dir, "tp2"), checkpoint_path)}


@pytest.mark.slow
def test_megatron_tp_rank1_converts_only_its_slice(checkpoint, tmp_path, monkeypatch):
    from megatron_harness import megatron_skip_reason, run_workers

    if megatron_skip_reason():
        pytest.skip(megatron_skip_reason())
    for k, v in MALLOC_ENV.items():
        monkeypatch.setenv(k, v)
    path, model_bytes = checkpoint
    ranks = run_workers(megatron_load_job, 2, path, str(tmp_path))
    _report(ranks, model_bytes)
    assert ranks[0][("megatron", "tp2", "rank0")]["mismatched"] == []
    new = ranks[1][("megatron", "tp2", "rank0")]
    assert new["load_peak"] < 0.75 * model_bytes  # its TP half of the weights (+ one tensor in flight)
    assert new["export_peak"] < 0.2 * model_bytes
