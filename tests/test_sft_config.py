"""Recipes and overrides build a validated SFTConfig; bad options fail up front, naming the option."""

from __future__ import annotations

import json

import pytest

from memento_train.config.errors import ConfigError
from memento_train.config.tree import parse_overrides
from memento_train.recipes import available_recipes, load_recipe
from memento_train.sft.cli import main
from memento_train.sft.config import EXPORT_MARKER, build_sft_config, config_tree, load_sft_config

PAPER_RECIPES = [
    "qwen3_8b_stage1",
    "qwen3_8b_stage2",
    "qwen3_32b_stage1",
    "qwen3_32b_stage2",
    "phi4_reasoning_stage1",
    "phi4_reasoning_stage2",
    "olmo3_7b_stage1",
    "olmo3_7b_stage2",
]


@pytest.fixture
def stage1_export(tmp_path):
    d = tmp_path / "stage1" / "hf"
    d.mkdir(parents=True)
    (d / EXPORT_MARKER).write_text(json.dumps({"stage": 1}))
    return str(d)


def test_overrides_parse_yaml_values_into_a_nested_tree():
    tree = parse_overrides(["optim.lr=1e-4", "train.max_steps=10", "model.path=null", "optim.betas=[0.9,0.95]"])
    assert tree == {"optim": {"lr": "1e-4", "betas": [0.9, 0.95]}, "train": {"max_steps": 10}, "model": {"path": None}}
    cfg = load_sft_config("tiny_stage1", ["optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipes_carry_the_paper_hyperparameters(recipe, stage1_export):
    overrides = [f"model.path={stage1_export}"] if recipe.endswith("stage2") else []
    tree = config_tree(recipe, overrides)
    tree["data"]["path"] = "synthetic:4"  # the hub dataset is not reachable offline; the rest is checked
    cfg = build_sft_config(tree)
    assert cfg.optim.lr == 8e-5 and cfg.optim.betas == (0.9, 0.999) and cfg.optim.weight_decay == 0.0
    assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_ratio == 0.05 and cfg.optim.grad_clip == 1.0
    assert cfg.train.epochs == 5 and cfg.train.global_batch_size == 512 and cfg.train.seed == 42
    assert cfg.data.max_seq_len == 32768 and cfg.train.max_samples == 31000
    assert cfg.engine.precision == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.checkpoint.every == (100 if "32b" in recipe else 50)
    assert cfg.data.block_masking.keep_last_n_blocks == (-1 if recipe.endswith("stage1") else 0)
    assert cfg.data.block_masking.mask_delimiters == recipe.startswith("phi4")
    if "32b" in recipe:
        assert cfg.engine.zero_stage == 3
    if recipe.startswith("phi4"):  # ZeRO-3: under ZeRO-2 the 14B model does not fit an 80 GB GPU at 32K tokens
        assert cfg.engine.kind == "deepspeed" and cfg.engine.zero_stage == 3


def test_every_shipped_recipe_loads():
    names = available_recipes()
    assert {"tiny", "tiny_stage1", "tiny_stage2", *PAPER_RECIPES} <= set(names)
    for name in names:
        assert isinstance(load_recipe(name), dict)


def test_stage2_without_a_stage1_checkpoint_names_the_command_to_run_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the stage-1 recipe's default output_dir is relative: runs/qwen3_8b_stage1
    with pytest.raises(
        ConfigError,
        match=r"export .*runs/qwen3_8b_stage1/hf does not exist; "
        r"run `memento-train recipe=qwen3_8b_stage1` first",
    ):
        load_sft_config("qwen3_8b_stage2", ["data.path=synthetic:4"])
    with pytest.raises(ConfigError, match=r"model.path is not set; stage 2 starts from the stage-1 model"):
        load_sft_config("qwen3_8b_stage2", ["data.path=synthetic:4", "model.init_from=null"])


def test_stage2_from_a_non_stage1_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a memento-train export"):
        load_sft_config("tiny_stage2", [f"model.path={tmp_path}"])


def test_unknown_key_names_the_dotted_key_and_lists_accepted_options():
    with pytest.raises(ConfigError, match=r"unknown option optim.learning_rate; valid options of optim: .*\blr\b"):
        load_sft_config("tiny_stage1", ["optim.learning_rate=1"])
    with pytest.raises(
        ConfigError,
        match=r"unknown option trian \(did you mean train\?\); valid options at the top "
        r"level: .*checkpoint",
    ):
        load_sft_config("tiny_stage1", ["trian.max_steps=1"])


def test_data_mask_is_a_deprecated_alias_of_data_block_masking(tmp_path):
    with pytest.deprecated_call(match="data.mask is deprecated; use data.block_masking"):
        cfg = load_sft_config("tiny_stage2", ["model.require_stage1_init=false", "data.mask.keep_last_n_blocks=1"])
    assert cfg.data.block_masking.keep_last_n_blocks == 1
    recipe = tmp_path / "old.yaml"  # a recipe written before the rename: the required key under its old name
    recipe.write_text(
        "data: {path: 'synthetic:4', max_seq_len: 512, mask: {keep_last_n_blocks: -1, mask_delimiters: true}}\n"
    )
    with pytest.deprecated_call():
        assert load_sft_config(str(recipe)).data.block_masking.mask_delimiters
    with pytest.deprecated_call():  # old and new spellings merge, the new one winning
        cfg = load_sft_config(
            str(recipe), ["stage=2", "model.require_stage1_init=false", "data.block_masking.keep_last_n_blocks=0"]
        )
    assert cfg.data.block_masking.keep_last_n_blocks == 0 and cfg.data.block_masking.mask_delimiters


def test_mask_delimiters_must_be_set_explicitly(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {path: 'synthetic:4', mask: {keep_last_n_blocks: -1}}\n")
    with pytest.raises(ConfigError, match=r"data.block_masking.mask_delimiters is not set.*Phi-4-reasoning true"):
        load_sft_config(str(recipe))


def test_sequence_length_above_model_maximum_is_refused():
    with pytest.raises(ConfigError, match=r"data.max_seq_len \(4096\) exceeds .*max_position_embeddings \(2048\)"):
        load_sft_config("tiny_stage1", ["data.max_seq_len=4096", "train.micro_batch_tokens=8192"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage=3", "stage must be 1"),
        ("data.block_masking.keep_last_n_blocks=0", "stage 1 trains with full causal attention"),
        ("train.micro_batch_tokens=512", r"train.micro_batch_tokens \(512\) must be >= data.max_seq_len"),
        ("engine.kind=jax", "engine.kind must be one of"),
        ("engine.offload_params=true", "engine.offload_params needs engine.zero_stage=3"),
        ("optim.schedule=step", "optim.schedule must be one of"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("logger=tensorboard", "logger must be one of"),
        ("resume=/no/such/dir", "resume must be 'auto', 'never' or an existing checkpoint directory"),
        ("cluster.num_workers=0", "cluster.num_workers"),
        (
            "train.global_batch_size=1",
            r"train.global_batch_size \(1\) must be >= the number of data-parallel workers \(2\)",
        ),
        (
            "engine.kind=megatron engine.tensor_parallel=4",
            r"cluster.num_workers \(2\) must be a multiple of engine.tensor_parallel x engine.pipeline_parallel \(4\)",
        ),
    ],
)
def test_bad_option_fails_naming_it(override, message):
    with pytest.raises(ConfigError, match=message):
        load_sft_config("tiny_stage1", override.split())


def test_cli_reports_configuration_errors_with_exit_code_2(capsys):
    assert main(["recipe=tiny_stage1", "optim.lr=-1"]) == 2
    assert "configuration error: optim.lr must be > 0" in capsys.readouterr().err


def test_cli_show_prints_the_resolved_config(capsys):
    assert main(["show", "recipe=tiny_stage1", "train.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "keep_last_n_blocks: -1" in out


def test_recipe_defaults_chain_and_reject_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b]\ntrain: {seed: 1}\n")
    (tmp_path / "b.yaml").write_text("defaults: [a]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_recipe(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("defaults: [tiny_stage1]\ntrain: {seed: 7}\n")
    tree = load_recipe(str(tmp_path / "c.yaml"))
    assert tree["train"]["seed"] == 7 and tree["train"]["global_batch_size"] == 32


@pytest.fixture
def olmo3_stage1_export(tmp_path):
    """A stage-1 export directory of an Olmo 3 shape (config.json only: show never loads weights)."""
    import transformers

    d = tmp_path / "olmo3" / "hf"
    transformers.Olmo3Config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=65536,
        sliding_window=4096,
    ).save_pretrained(d)
    (d / EXPORT_MARKER).write_text(json.dumps({"stage": 1}))
    return str(d)


@pytest.mark.parametrize(
    "overrides, option, named",
    [
        (["model.attn_backend=flash_attn"], "model.attn_backend=flash_attn", "sliding-window layers"),
        (["model.attn_backend=flash"], "model.attn_backend='flash'", "is not an attention backend"),
        (["engine.kind=megatron"], "engine.kind=megatron", "model_type='olmo3'"),
    ],
)
def test_show_rejects_an_olmo3_stage2_config_that_cannot_run_naming_the_option(
    olmo3_stage1_export, capsys, overrides, option, named
):
    args = ["show", "recipe=olmo3_7b_stage2", f"model.path={olmo3_stage1_export}", "data.path=synthetic:4"]
    assert main(args + overrides) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and option in err and named in err
    # auto picks a backend per layer type (flex for the sliding-window layers), so the recipe runs.
    assert main(args) == 0
    assert "attn_backend: auto" in capsys.readouterr().out
