"""The SFT trainer end to end: gradient equivalence across worker counts and accumulation, the
embedded default pipeline on a local Ray cluster, metrics, and the Hugging Face export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from sft_runs import SMALL, STAGE2, cli

from memento_train.cluster import ClusterConfig, WorkerGroup
from memento_train.config.tree import to_dict
from memento_train.data.cache import prepare_dataset
from memento_train.models.loading import run_tokenizer
from memento_train.sft.cli import main
from memento_train.sft.config import load_sft_config
from memento_train.sft.losses import sft_loss_fn
from memento_train.sft.worker import SFTWorker
from memento_train.training.tracking import read_metrics

METRIC_KEYS = {
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_per_worker",
    "tflops_per_s_per_worker",
    "padding_pct",
    "evicted_pair_frac",
    "blocks",
    "summary_tokens",
    "sequences",
    "epoch",
}


class GradientProbeWorker(SFTWorker):
    """The SFT worker plus a test hook: the reduced full gradients of one step's loss."""

    def gradients(self, micro_plan: list[list[int]], global_loss_tokens: int) -> dict[str, torch.Tensor]:
        """The weights stay unchanged (the step runs at lr 0 to clear the gradients) but the optimizer
        moments advance: do not keep training."""
        batches, _ = self._micro_batches(micro_plan)
        self.engine.train()
        self.engine.forward_backward(batches, sft_loss_fn(global_loss_tokens))
        grads = self.engine.full_grads()
        self.engine.step(0.0)  # lr 0 clears the accumulated gradients through the engine's own path
        return grads


def _grads(tree, cluster: ClusterConfig, per_rank_plans, loss_tokens):
    with WorkerGroup(GradientProbeWorker, cluster, tree) as group:
        group.run("setup")
        return group.run_each("gradients", [(plan, loss_tokens) for plan in per_rank_plans])[0]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_gradients_equal_for_one_big_batch_1x4_accumulation_and_2_workers_x2(tmp_path, engine):
    cfg = load_sft_config(
        "tiny_stage1",
        [*SMALL, *STAGE2, f"engine.kind={engine}", f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    tree = to_dict(cfg)
    ds, _ = prepare_dataset(cfg.data, tokenizer=run_tokenizer(cfg.model))
    loss_tokens = sum(int((torch.tensor(x)[1:] != -100).sum()) for x in ds.select(range(8))["labels"])
    idx = list(range(8))
    inline = ClusterConfig(use_ray=False)
    big = _grads(tree, inline, [[idx]], loss_tokens)
    acc4 = _grads(tree, inline, [[idx[0:2], idx[2:4], idx[4:6], idx[6:8]]], loss_tokens)
    two = _grads(tree, ClusterConfig(num_workers=2), [[idx[0:2], idx[2:4]], [idx[4:6], idx[6:8]]], loss_tokens)
    assert big.keys() == acc4.keys() == two.keys()
    for name in big:
        scale = big[name].abs().max().item() + 1e-12
        assert (acc4[name] - big[name]).abs().max().item() <= 1e-5 * scale + 1e-7, name
        assert (two[name] - big[name]).abs().max().item() <= 1e-5 * scale + 1e-7, name
    assert any(g.abs().sum() > 0 for g in big.values())


@pytest.mark.slow
def test_embedded_default_runs_stage1_then_stage2_on_ray_and_exports_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = [a for a in SMALL if not a.startswith("cluster.")] + ["train.max_steps=3", f"output_dir={tmp_path}"]
    assert main(overrides) == 0  # no recipe: the embedded tiny pipeline, 2 Ray workers, FSDP2
    for stage in ("tiny_stage1", "tiny_stage2"):
        records = read_metrics(tmp_path / stage)
        assert [r["step"] for r in records] == [1, 2, 3]
        assert METRIC_KEYS <= records[0].keys()
        assert records[-1]["loss"] < records[0]["loss"]
    s1, s2 = read_metrics(tmp_path / "tiny_stage1"), read_metrics(tmp_path / "tiny_stage2")
    assert s1[0]["evicted_pair_frac"] == 0.0 and s2[0]["evicted_pair_frac"] > 0.3
    assert s2[0]["loss"] < s1[0]["loss"], "stage 2 starts from stage 1's weights"
    hf = tmp_path / "tiny_stage2" / "hf"
    assert json.loads((hf / "memento_train.json").read_text())["stage"] == 2
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert "<|summary_end|>" in tok.get_vocab() and tok.chat_template
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "7 + 5 mod 100?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[-1] == enc["input_ids"].shape[-1] + 4


@pytest.mark.slow
def test_export_command_writes_the_checkpoint_weights(tmp_path):
    run = tmp_path / "run"
    cli("recipe=tiny_stage1", *SMALL, "train.max_steps=2", "checkpoint.every=2", output_dir=run)
    out = tmp_path / "exported"
    assert main(["export", f"checkpoint={run / 'checkpoints' / 'step_00000002'}", f"output={out}"]) == 0
    a, b = load_file(run / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_megatron_tensor_parallel_2_run_reports_the_same_losses_as_fsdp2(tmp_path):
    run = [a for a in SMALL if not a.startswith("cluster.")] + [
        "recipe=tiny_stage1",
        "train.max_steps=2",
        "model.tiny.num_kv_heads=2",  # split over TP=2
        "checkpoint.export_hf=false",
    ]
    cli(*run, "engine.kind=megatron", "engine.tensor_parallel=2", "cluster.num_workers=2", output_dir=tmp_path / "mg")
    cli(*run, "engine.kind=fsdp2", "cluster.num_workers=1", "cluster.use_ray=false", output_dir=tmp_path / "fs")
    mg, fs = read_metrics(tmp_path / "mg"), read_metrics(tmp_path / "fs")
    assert mg[0]["tokens"] == fs[0]["tokens"], "tensor-parallel peers must not be counted twice"
    for a, b in zip(mg, fs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
