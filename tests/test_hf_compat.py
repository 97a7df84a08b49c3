"""Exports and shipped assets load the same in transformers 5.x (this environment) and 4.56+ (vLLM 0.13's).

The transformers-4 side runs in the vLLM 0.13 environment (docs/vllm.md): the same tests, with the
checks that only one major version can make guarded by ``IS_V4``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from memento_train.export.compat import (
    add_legacy_keys,
    check_served_rope_theta,
    legacy_config,
    legacy_tokenizer_config,
    rope_theta_of,
)
from memento_train.masking import BlockMaskingConfig
from memento_train.models.shipped_tokenizer import shipped_tokenizer_path

IS_V4 = int(transformers.__version__.split(".")[0]) < 5
ASSET = Path(__file__).resolve().parent / "assets" / "tiny_rl_warmed"
SAMPLE = (
    "<|im_start|>user\nStart at 9. Apply +3 modulo 10.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    "<|block_start|>The current value is 9.<|block_end|>\n<|summary_start|>It is 2.<|summary_end|>\n"
    "</think>\nThe final value is \\boxed{2}.<|im_end|>"
)

# A transformers-5 config.json of a Qwen3 whose RoPE base is not transformers-4's default (10000).
V5_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "dtype": "bfloat16",
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
}


def _config_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if not IS_V4 and isinstance(params, dict):
        return float(params["rope_theta"])
    return float(cfg.rope_theta)


def test_legacy_config_writes_rope_theta_dtype_and_scaling_beside_the_v5_keys():
    out = legacy_config(V5_QWEN3)
    assert out["rope_theta"] == 1e6 and out["torch_dtype"] == "bfloat16" and "rope_scaling" not in out
    assert {k: out[k] for k in V5_QWEN3} == V5_QWEN3  # nothing transformers 5 reads is changed
    yarn = legacy_config({**V5_QWEN3, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}})
    assert yarn["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0} and yarn["rope_theta"] == 1e6
    assert legacy_config({"rope_theta": 5.0, "torch_dtype": "float32", "dtype": "bfloat16"}) == {
        "rope_theta": 5.0,
        "torch_dtype": "float32",
        "dtype": "bfloat16",
    }
    assert (
        legacy_tokenizer_config({"tokenizer_class": "TokenizersBackend"})["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    assert legacy_tokenizer_config({"tokenizer_class": "Qwen2Tokenizer"})["tokenizer_class"] == "Qwen2Tokenizer"
    assert rope_theta_of({"rope_parameters": {"full_attention": {"rope_theta": 3.0}}}) == 3.0


def test_a_v5_only_config_reads_the_wrong_rope_base_until_the_legacy_keys_are_written(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V5_QWEN3))
    before = transformers.AutoConfig.from_pretrained(tmp_path)
    # transformers 4.x fills its default RoPE base: the silent bug vLLM 0.13 inherits
    assert _config_theta(before) == (10000.0 if IS_V4 else 1e6)
    assert add_legacy_keys(tmp_path) == ["config.json"]
    after = transformers.AutoConfig.from_pretrained(tmp_path)
    assert _config_theta(after) == 1e6
    assert after.torch_dtype == torch.bfloat16 if IS_V4 else after.dtype == torch.bfloat16
    if not IS_V4:  # the legacy keys change nothing transformers 5 loads
        drop = {"_name_or_path", "transformers_version"}
        assert {k: v for k, v in after.to_dict().items() if k not in drop} == {
            k: v for k, v in before.to_dict().items() if k not in drop
        }
    assert add_legacy_keys(tmp_path) == []  # idempotent


class _LoadedConfig:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_a_server_reading_another_rope_base_than_the_file_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V5_QWEN3))
    with pytest.raises(ValueError, match=r"rope_theta\) 1e\+06, but vLLM reads 10000.*add_legacy_keys"):
        check_served_rope_theta(
            tmp_path, _LoadedConfig(rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
        )
    check_served_rope_theta(tmp_path, _LoadedConfig(rope_parameters={"rope_theta": 1e6}))
    check_served_rope_theta(tmp_path, _LoadedConfig(rope_theta=1e6))
    check_served_rope_theta(tmp_path / "absent", _LoadedConfig(rope_theta=1.0))  # nothing to compare


@pytest.mark.parametrize("where", ["shipped", "warmed_policy"])
def test_shipped_tokenizers_load_and_encode_like_their_tokenizer_json(where):
    path = shipped_tokenizer_path() if where == "shipped" else ASSET
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast", "a class transformers 4.x can import"
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok(SAMPLE, add_special_tokens=False).input_ids == raw.encode(SAMPLE, add_special_tokens=False).ids
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_warmed_policy_config_declares_its_rope_base_for_both_major_versions():
    raw = json.loads((ASSET / "config.json").read_text())
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"] and raw["torch_dtype"] == raw["dtype"]
    assert _config_theta(transformers.AutoConfig.from_pretrained(ASSET)) == raw["rope_theta"]


@pytest.mark.skipif(IS_V4, reason="exports are written with transformers 5 (memento-train's training side)")
def test_export_hf_writes_the_legacy_keys(tmp_path):
    from memento_train.export.writer import export_hf
    from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

    tok = load_shipped_tokenizer()
    cfg = transformers.Qwen3Config(
        **{k: v for k, v in V5_QWEN3.items() if k not in ("architectures", "model_type", "dtype")}
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    out = Path(
        export_hf(
            model.state_dict(),
            cfg,
            tok,
            tmp_path / "hf",
            info={"block_masking": BlockMaskingConfig()},
            dtype=torch.bfloat16,
        )
    )
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 1e6 and written["rope_parameters"]["rope_theta"] == 1e6
    assert written["torch_dtype"] == "bfloat16"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert type(transformers.AutoTokenizer.from_pretrained(out)) is type(tok)
    shutil.rmtree(out)
