"""Run metrics: JSONL always (cut back on resume), wandb offline without an API key, FLOP counting."""

from __future__ import annotations

import pytest
import torch
import transformers

from memento_train.attention import MementoAttentionMeta
from memento_train.training.flops import FlopCounter, layer_windows, peak_tflops
from memento_train.training.tracking import RunLogger, read_metrics, wandb_mode


def test_jsonl_is_cut_back_to_the_resumed_step(tmp_path):
    log = RunLogger(tmp_path, total_steps=5, logger="none", progress=False)
    for step in range(1, 5):
        log.log(step, {"loss": 1.0 / step})
    log.close()
    log = RunLogger(tmp_path, total_steps=5, start_step=2, logger="none", progress=False)
    log.log(3, {"loss": 0.25})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_fresh_run_starts_a_new_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9, "loss": 1}\n')
    RunLogger(tmp_path, total_steps=1, logger="none", progress=False).close()
    assert read_metrics(tmp_path) == []


def test_wandb_runs_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    assert wandb_mode("auto") == "offline"
    log = RunLogger(tmp_path, total_steps=2, logger="wandb", config={"a": 1}, progress=False)
    log.log(1, {"loss": 2.0, "note": "text is kept in JSONL only"})
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert read_metrics(tmp_path)[0]["loss"] == 2.0


def test_flops_count_dense_weights_and_only_the_kept_attention_pairs():
    cfg = transformers.Qwen3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=True,
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    fc = FlopCounter(model)
    # per layer: q 16x16 + k 16x8 + v 16x8 + o 16x16 + mlp 3 x 16x32 = 2304; 2 layers + lm head 64x16
    assert fc.dense_per_token == 6 * (2 * 2304 + 64 * 16)
    # one document of 4 tokens; key 0 is evicted from row 2 on: kept pairs 10 - 2 = 8 per layer
    meta = MementoAttentionMeta.from_packed(torch.tensor([0, 4]), torch.tensor([2, 4, 4, 4]))
    assert fc.attention_pairs(meta) == (16, 20)
    assert fc.step_flops(4, 16) == fc.dense_per_token * 4 + 12 * 2 * 8 * 16


def test_sliding_window_layers_and_peak_table():
    cfg = transformers.Olmo3Config(
        num_hidden_layers=4,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    assert layer_windows(cfg) == [8, 8, 8, None]
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops(None) is None


@pytest.mark.slow
def test_secrets_never_reach_config_yaml_logs_metrics_or_wandb_files(tmp_path):
    """A real run with a wandb key in the environment, secrets in ``cluster.env`` and one forwarded from
    the driver's environment (``cluster.secret_env``): no byte of any value appears in the run
    directory (config.yaml, metrics.jsonl, wandb's own files) or in what the CLI printed."""
    import os
    import subprocess
    import sys

    from sft_runs import SMALL

    secrets = {
        "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
        "HF_TOKEN": "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",
        "MY_SERVICE_CRED": "s3cr3t-from-the-environment",
        "PLAIN_NAME_MARKED": "marked-secret-value",
    }
    env = {
        **os.environ,
        "WANDB_API_KEY": secrets["WANDB_API_KEY"],
        "MY_SERVICE_CRED": secrets["MY_SERVICE_CRED"],
        "WANDB_SILENT": "true",
        "HOME": str(tmp_path),
    }
    out = tmp_path / "run"
    args = [a for a in SMALL if a != "logger=none"] + [
        "recipe=tiny_stage1",
        "logger=wandb",
        "wandb.mode=offline",
        "train.max_steps=2",
        "checkpoint.export_hf=false",
        f"cluster.env.HF_TOKEN={secrets['HF_TOKEN']}",
        f"cluster.env.PLAIN_NAME_MARKED={secrets['PLAIN_NAME_MARKED']}",
        "cluster.env.NCCL_DEBUG=INFO",
        "cluster.secret_env=[PLAIN_NAME_MARKED,MY_SERVICE_CRED]",
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "memento_train.sft.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # wandb did write its files
    config = (out / "config.yaml").read_text()
    assert (
        "HF_TOKEN: <redacted>" in config and "PLAIN_NAME_MARKED: <redacted>" in config and "NCCL_DEBUG: INFO" in config
    )
    leaks = []
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            leaks += [(str(f.relative_to(out)), name) for name, v in secrets.items() if v.encode() in data]
    printed = proc.stdout + proc.stderr
    leaks += [("output", name) for name, v in secrets.items() if v in printed]
    assert not leaks, leaks
