"""``memento-rl`` configuration: the paper's recipe and data, commands that chain through default
output dirs, the eviction rule taken from the model's export, and everything ``show`` can refuse
before any rank loads weights."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memento_train.config.errors import ConfigError
from memento_train.export.writer import MARKER_FILE, export_hf, exported_mask
from memento_train.masking import BlockMaskingConfig
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer
from memento_train.rl.cli import main as rl_main
from memento_train.rl.config import build_rl_config, config_tree, load_rl_config
from memento_train.rl.driver import encode_prompts, load_problems
from memento_train.rl.rewards import math_reward
from memento_train.sft.cli import main as sft_main

OFFLINE = ["logger=none"]  # hub datasets are named, not read: show never downloads


def fake_export(path, *, stage, mask_delimiters=False, keep=0, max_positions=40960):
    """An export directory as memento-train writes it (config, tokenizer, marker), without weights:
    enough for every check that happens before weights are loaded."""
    from memento_train.models import tiny_model_config

    tok = load_shipped_tokenizer()
    path.mkdir(parents=True, exist_ok=True)
    tiny_model_config(tok, max_position_embeddings=max_positions).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    mask = {
        "keep_last_n_blocks": keep,
        "mask_delimiters": mask_delimiters,
        "keep_last_block_for_answer": False,
        "require_assistant_section": True,
    }
    (path / MARKER_FILE).write_text(json.dumps({"stage": stage, "mask": mask}))
    return path


def run_cli(main, capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------- commands that chain


def test_the_paper_commands_chain_through_each_recipes_default_output_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(sft_main, capsys, "show", "recipe=qwen3_8b_stage2")
    assert rc == 2 and "run `memento-train recipe=qwen3_8b_stage1` first" in err
    rc, _, err = run_cli(rl_main, capsys, "show", "recipe=grpo", *OFFLINE)
    assert rc == 2 and "run `memento-train recipe=qwen3_8b_stage2` first" in err

    fake_export(tmp_path / "runs" / "qwen3_8b_stage1" / "hf", stage=1, keep=-1)  # what stage 1 leaves behind
    rc, out, err = run_cli(sft_main, capsys, "show", "recipe=qwen3_8b_stage2")
    assert rc == 0, err
    assert f"path: {tmp_path / 'runs' / 'qwen3_8b_stage1' / 'hf'}" in out

    fake_export(tmp_path / "runs" / "qwen3_8b_stage2" / "hf", stage=2, keep=0)
    rc, out, err = run_cli(rl_main, capsys, "show", "recipe=grpo", *OFFLINE)
    assert rc == 0, err
    cfg = load_rl_config("grpo", OFFLINE)
    assert cfg.model.path == str(tmp_path / "runs" / "qwen3_8b_stage2" / "hf")
    assert cfg.output_dir == str(tmp_path / "runs" / "grpo")


def test_a_model_whose_positions_cannot_hold_the_budget_is_refused_in_show(tmp_path):
    export = fake_export(tmp_path / "s2", stage=2, max_positions=4096)
    with pytest.raises(ConfigError, match=r"32768 exceeds the max_position_embeddings \(4096\)"):
        load_rl_config("grpo", [*OFFLINE, f"model.path={export}"])


# ------------------------------------------------------------------------------------ the paper's recipe


def test_grpo_recipe_is_the_papers_run(tmp_path):
    cfg = load_rl_config("grpo", [*OFFLINE, f"model.path={fake_export(tmp_path / 's2', stage=2)}"])
    a = cfg.algorithm
    assert (a.loss, a.eps_low, a.eps_high, a.kl_coef, a.kl_estimator) == ("cispo", 0.2, 0.2, 0.001, "k3")
    assert (a.adv_norm, a.loss_agg) == ("batch", "group_total")
    r = cfg.rollout
    assert (r.group_size, r.prompts_per_step, r.temperature, r.max_new_tokens) == (8, 240, 1.0, 31744)
    assert r.block_masking.max_block_tokens == 7168 and r.generator == "vllm"
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.optim.schedule) == (1e-6, 10, 1.0, "cosine")
    p = cfg.prompts
    assert (p.path, p.problem_field, p.answer_field, p.max_prompt_len) == (
        "allenai/Dolci-RL-Zero-Math-7B",
        "prompt",
        "ground_truth",
        1024,
    )
    e = cfg.eval
    assert (e.every, e.samples, e.temperature) == (25, 64, 0.6)
    assert {k: v.path for k, v in e.sets.items()} == {
        "aime24": "HuggingFaceH4/aime_2024",
        "aime25": "MathArena/aime_2025",
    }
    assert cfg.reward.require_think_end and cfg.reward.truncated == "zero"


def test_dolci_math_prompts_map_through_the_prompt_reader(tmp_path, monkeypatch):
    # A small file in the hub dataset's schema: id, prompt, ground_truth (a list), solution.
    rows = [
        {"id": "d0", "prompt": "What is $6 \\times 7$?", "ground_truth": ["42"], "solution": "42"},
        {"id": "d1", "prompt": "Solve $x^2 = 4$, $x > 0$.", "ground_truth": ["2", "2"], "solution": "2"},
    ]
    local = tmp_path / "dolci.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(local))
    calls = []

    def fake_load_dataset(path, config=None, split=None):  # the hub, offline: hand back the local rows
        calls.append((path, config, split))
        return rows

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    cfg = load_rl_config("grpo", [*OFFLINE, f"model.path={fake_export(tmp_path / 's2', stage=2)}"])
    from_hub = load_problems(cfg.prompts, num=cfg.prompts.num_records)
    assert calls == [("allenai/Dolci-RL-Zero-Math-7B", None, "train")]
    cfg = load_rl_config("grpo", [*OFFLINE, f"model.path={tmp_path / 's2'}", f"prompts.path={local}"])
    from_file = load_problems(cfg.prompts, num=cfg.prompts.num_records)
    for records in (from_hub, from_file):
        assert [(r["problem"], r["answer"]) for r in records] == [(rows[0]["prompt"], "42"), (rows[1]["prompt"], "2")]
        kept, ids = encode_prompts(records, load_shipped_tokenizer(), cfg.prompts.max_prompt_len)
        assert len(kept) == 2 and all(ids)
        assert math_reward("<think>6*7</think> $\\boxed{42}$", records[0]) == 1.0


def test_aime_eval_sets_map_and_a_set_can_be_dropped(tmp_path, monkeypatch):
    aime25 = [{"problem_idx": 1, "problem": "Find the sum of all bases...", "answer": 70}]  # MathArena: int answers
    monkeypatch.setattr("datasets.load_dataset", lambda path, config=None, split=None: aime25)
    cfg = load_rl_config("grpo", [*OFFLINE, f"model.path={fake_export(tmp_path / 's2', stage=2)}"])
    (rec,) = load_problems(cfg.eval.sets["aime25"], num=cfg.eval.num_problems)
    assert rec["problem"] == aime25[0]["problem"] and rec["answer"] == "70"
    cfg = load_rl_config("grpo", [*OFFLINE, f"model.path={tmp_path / 's2'}", "eval.sets.aime25=null"])
    assert list(cfg.eval.sets) == ["aime24"]


# --------------------------------------------------------------------- the eviction rule of the model


def test_rollout_mask_defaults_to_the_models_and_a_contradiction_is_refused(tmp_path):
    phi4 = fake_export(tmp_path / "phi4", stage=2, mask_delimiters=True)  # a Phi-4 stage-2 export
    cfg = load_rl_config("grpo", [*OFFLINE, f"model.path={phi4}"])
    assert cfg.rollout.block_masking.mask_delimiters and cfg.rollout.block_masking.keep_last_n_blocks == 0
    assert cfg.rollout.block_masking.max_block_tokens == 7168  # the recipe's serving option stays
    with pytest.raises(
        ConfigError,
        match=r"rollout.block_masking sets mask_delimiters=False \(the model: True\).*"
        r"rollout.allow_mask_mismatch=true",
    ):
        load_rl_config("grpo", [*OFFLINE, f"model.path={phi4}", "rollout.block_masking.mask_delimiters=false"])
    cfg = load_rl_config(
        "grpo",
        [
            *OFFLINE,
            f"model.path={phi4}",
            "rollout.block_masking.mask_delimiters=false",
            "rollout.allow_mask_mismatch=true",
        ],
    )
    assert not cfg.rollout.block_masking.mask_delimiters
    stage1 = fake_export(tmp_path / "s1", stage=1, keep=-1)  # RL needs a model trained to evict
    with pytest.raises(ConfigError, match="rollout.block_masking must evict"):
        load_rl_config("grpo", [*OFFLINE, f"model.path={stage1}"])


def test_a_model_without_a_marker_must_state_its_mask(tmp_path):
    plain = fake_export(tmp_path / "plain", stage=2)
    (plain / MARKER_FILE).unlink()
    with pytest.raises(ConfigError, match="not a memento-train export.*rollout.block_masking.mask_delimiters"):
        load_rl_config("grpo", [*OFFLINE, f"model.path={plain}"])
    cfg = load_rl_config("grpo", [*OFFLINE, f"model.path={plain}", "rollout.block_masking.mask_delimiters=true"])
    assert cfg.rollout.block_masking.mask_delimiters


def test_every_export_records_its_mask(tmp_path):
    from memento_train.models import build_tiny_model

    tok = load_shipped_tokenizer()
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="info\\['block_masking'\\] is required"):
        export_hf(model.state_dict(), model.config, tok, tmp_path / "a", info={"stage": 2})
    export_hf(
        model.state_dict(),
        model.config,
        tok,
        tmp_path / "b",
        info={
            "stage": 2,
            "block_masking": BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=True, max_block_tokens=64),
        },
    )
    marker = json.loads((tmp_path / "b" / MARKER_FILE).read_text())
    assert marker["block_masking"] == {
        "keep_last_n_blocks": 0,
        "mask_delimiters": True,  # the rule alone
        "keep_last_block_for_answer": False,
        "require_assistant_section": True,
    }
    assert exported_mask(tmp_path / "b") == BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=True)


def test_exports_written_before_the_rename_are_still_read(tmp_path):
    # memento_train.json of older exports calls the rule "mask"; enable=false is keep_last_n_blocks=-1.
    old = fake_export(tmp_path / "old", stage=1, mask_delimiters=True, keep=-1)
    assert "mask" in json.loads((old / MARKER_FILE).read_text())
    assert exported_mask(old) == BlockMaskingConfig(keep_last_n_blocks=-1, mask_delimiters=True)
    assert exported_mask(old) == BlockMaskingConfig(enable=False, mask_delimiters=True).rule()


def test_memento_eval_uses_the_models_mask_and_refuses_a_contradiction(tmp_path, capsys):
    from memento_train.evaluation.cli import main as eval_main
    from memento_train.evaluation.config import build_config

    phi4 = fake_export(tmp_path / "phi4", stage=2, mask_delimiters=True)
    cfg = build_config([f"model={phi4}", "output_dir=o"])
    assert cfg.block_masking.mask_delimiters and cfg.block_masking.enable
    rc, _, err = run_cli(eval_main, capsys, f"model={phi4}", "output_dir=o", "block_masking.mask_delimiters=false")
    assert rc == 2 and "mask_delimiters=False (the model: True)" in err and "allow_mask_mismatch=true" in err
    cfg = build_config([f"model={phi4}", "output_dir=o", "block_masking.enable=false", "allow_mask_mismatch=true"])
    assert not cfg.block_masking.enable
    stage1 = fake_export(tmp_path / "s1", stage=1, keep=-1)
    assert not build_config([f"model={stage1}", "output_dir=o"]).block_masking.enable  # never evicts


# ------------------------------------------------------------- show refuses what cannot run on a cluster


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["engine.offload_optimizer=true"], r"engine.offload_optimizer alone is not possible with fsdp2"),
        (["engine.precision=fp16"], r"engine.precision=fp16"),
        (["placement=colocated"], r"placement=colocated on GPUs"),
        (["engine.kind=megatron", "engine.tensor_parallel=2"], r"engine.tensor_parallel=2.*data parallel only"),
    ],
)
def test_show_refuses_what_would_fail_after_the_ranks_loaded_weights(tmp_path, capsys, monkeypatch, overrides, named):
    def no_loading(*args, **kwargs):
        raise AssertionError("show loaded a model")

    monkeypatch.setattr("memento_train.models.loading.load_model", no_loading)
    export = fake_export(tmp_path / "s2", stage=2)
    rc, _, err = run_cli(rl_main, capsys, "show", "recipe=grpo", *OFFLINE, f"model.path={export}", *overrides)
    assert rc == 2
    import re

    assert re.search(named, err), err


def test_the_shipped_grpo_recipe_passes_show(tmp_path, capsys):
    rc, out, err = run_cli(
        rl_main, capsys, "show", "recipe=grpo", *OFFLINE, f"model.path={fake_export(tmp_path / 's2', stage=2)}"
    )
    assert rc == 0, err
    assert "generator: vllm" in out  # the recipe says which rollout generator it uses


def test_tiny_default_still_builds():
    cfg = build_rl_config(config_tree(None, OFFLINE))
    assert cfg.warmup.enabled and cfg.model.path is None and list(cfg.eval.sets) == ["heldout"]


def test_rollout_mask_and_engine_are_deprecated_aliases():
    with pytest.deprecated_call(match="rollout.mask is deprecated; use rollout.block_masking"):
        cfg = load_rl_config("tiny_rl", [*OFFLINE, "rollout.mask.max_block_tokens=50"])
    assert cfg.rollout.block_masking.max_block_tokens == 50
    with pytest.deprecated_call(match="rollout.engine is deprecated; use rollout.generator"):
        assert load_rl_config("tiny_rl", [*OFFLINE, "rollout.engine=reference"]).rollout.generator == "reference"
    with (
        pytest.raises(
            ConfigError,
            match=r"rollout.engine='reference' \(deprecated\) contradicts "
            r"rollout.generator='vllm'; set rollout.generator only",
        ),
        pytest.deprecated_call(),
    ):
        load_rl_config("tiny_rl", [*OFFLINE, "rollout.engine=reference", "rollout.generator=vllm"])
