"""HF ↔ Megatron weight conversion: bit-identical round trips, TP layouts, vocab padding, the HF export.

Pure tensor code (no process group): shards for every TP rank are built and merged back.
"""

from __future__ import annotations

import pytest
import torch
from megatron_harness import megatron_skip_reason

pytestmark = pytest.mark.skipif(megatron_skip_reason() is not None, reason=str(megatron_skip_reason()))

MEMENTO_ROWS = 4


def _tiny(family: str, *, tied: bool, vocab_size: int = 100, seed: int = 0):
    """A tiny HF model whose vocab is then grown by the four memento rows (distinct values), so the
    padded Megatron vocabulary (128) has real rows, memento rows and zero pad rows."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    cls = {
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 8}),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    }[family]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**common, **cls[2]))
    model.resize_token_embeddings(vocab_size + MEMENTO_ROWS)
    with torch.no_grad():
        model.get_input_embeddings().weight[-MEMENTO_ROWS:] = 7.0 + torch.arange(MEMENTO_ROWS)[:, None].float()
        if not tied:
            model.get_output_embeddings().weight[-MEMENTO_ROWS:] = -3.0 - torch.arange(MEMENTO_ROWS)[:, None].float()
    return model


CASES = [("qwen3", False), ("qwen3", True), ("llama", True), ("llama", False), ("phi3", False)]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family,tied", CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def test_hf_to_megatron_to_hf_is_bit_identical(family, tied, tp):
    from memento_train.models.megatron_convert import hf_to_megatron, megatron_to_hf
    from memento_train.models.megatron_gpt import describe_hf_config

    model = _tiny(family, tied=tied)
    arch = describe_hf_config(model.config)
    hf = model.state_dict()
    shards = [hf_to_megatron(hf, arch, tp_rank=r, tp_size=tp) for r in range(tp)]
    back = megatron_to_hf(shards, arch)
    assert set(back) == set(hf)
    for name, t in hf.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert ("output_layer.weight" in shards[0]) == (not tied)


@pytest.mark.parametrize("tp", [1, 2])
def test_memento_rows_survive_vocab_padding(tp):
    from memento_train.models.megatron_convert import hf_to_megatron
    from memento_train.models.megatron_gpt import describe_hf_config, padded_vocab_size

    model = _tiny("qwen3", tied=False)
    arch = describe_hf_config(model.config)
    assert arch.vocab_size == 104 and padded_vocab_size(104, tp) == 128
    shards = [hf_to_megatron(model.state_dict(), arch, tp_rank=r, tp_size=tp) for r in range(tp)]
    emb = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
    head = torch.cat([s["output_layer.weight"] for s in shards])
    assert emb.shape == head.shape == (128, 32)
    assert torch.equal(emb[100:104], 7.0 + torch.arange(4)[:, None].expand(4, 32).float())
    assert torch.equal(head[100:104], -3.0 - torch.arange(4)[:, None].expand(4, 32).float())
    assert not emb[104:].any() and not head[104:].any()  # pad rows are zero


def test_qkv_shards_hold_their_groups_heads():
    """TP rank r's fused QKV holds, per KV group it owns, that group's query heads, key, value."""
    from memento_train.models.megatron_convert import hf_to_megatron
    from memento_train.models.megatron_gpt import describe_hf_config

    model = _tiny("qwen3", tied=False)
    arch = describe_hf_config(model.config)  # 4 query heads, 2 KV groups, head_dim 8
    hf = model.state_dict()
    q, k, v = (hf[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    rank1 = hf_to_megatron(hf, arch, tp_rank=1, tp_size=2)["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(rank1, torch.cat([q[16:32], k[8:16], v[8:16]]))
    fc1 = hf_to_megatron(hf, arch, tp_rank=1, tp_size=2)["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[32:], up[32:]]))


def test_phi3_fused_layouts_match_qwen_style_split():
    """Phi-3's ``qkv_proj`` / ``gate_up_proj`` convert to the same Megatron tensors as separate q/k/v."""
    from memento_train.models.megatron_convert import hf_to_megatron
    from memento_train.models.megatron_gpt import describe_hf_config

    model = _tiny("phi3", tied=False)
    arch = describe_hf_config(model.config)
    hf = model.state_dict()
    q, k, v = hf["model.layers.1.self_attn.qkv_proj.weight"].split([32, 16, 16])
    gate, up = hf["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)
    mg = hf_to_megatron(hf, arch, tp_rank=0, tp_size=2)
    assert torch.equal(mg["decoder.layers.1.self_attention.linear_qkv.weight"], torch.cat([q[:16], k[:8], v[:8]]))
    assert torch.equal(mg["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[:32], up[:32]]))


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stage_views_partition_the_model(tied):
    from memento_train.models.megatron_convert import global_view, hf_to_megatron, stage_view
    from memento_train.models.megatron_gpt import describe_hf_config

    model = _tiny("qwen3", tied=tied)
    arch = describe_hf_config(model.config)
    shard = hf_to_megatron(model.state_dict(), arch)
    first = stage_view(shard, layer_offset=0, num_layers=1, pre_process=True, post_process=False, tied=tied)
    last = stage_view(shard, layer_offset=1, num_layers=1, pre_process=False, post_process=True, tied=tied)
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in last  # local numbering
    assert ("output_layer.weight" in last) and "embedding.word_embeddings.weight" not in last
    merged = {
        **global_view(first, layer_offset=0, pre_process=True, tied=tied),
        **global_view(last, layer_offset=1, pre_process=False, tied=tied),
    }
    assert set(merged) == set(shard) and all(torch.equal(merged[k], shard[k]) for k in shard)


def test_tp2_shards_through_the_hf_export_reload_bit_identical(tmp_path):
    """TP=2 Megatron shards → :func:`megatron_to_hf` → the production HF export → transformers: every
    weight (memento rows included) comes back bit-identical and the tied head is tied again."""
    import transformers as tf

    from memento_train.export.writer import export_hf
    from memento_train.masking import BlockMaskingConfig
    from memento_train.models.megatron_convert import hf_to_megatron, megatron_to_hf
    from memento_train.models.megatron_gpt import architecture_of
    from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

    model = _tiny("qwen3", tied=True)
    arch = architecture_of(model)
    shards = [hf_to_megatron(model.state_dict(), arch, tp_rank=r, tp_size=2) for r in range(2)]
    export_hf(
        megatron_to_hf(shards, arch),
        model.config,
        load_shipped_tokenizer(),
        tmp_path / "out",
        info={"block_masking": BlockMaskingConfig()},
        dtype=torch.float32,
    )
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    again = reloaded.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(again[name], t), name
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_unsupported_configs_name_the_option():
    import transformers as tf

    from memento_train.config.errors import ConfigError
    from memento_train.models.megatron_gpt import describe_hf_config, transformer_config_from_hf

    sliding = tf.Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        head_dim=8,
        use_sliding_window=True,
        sliding_window=16,
    )
    with pytest.raises(ConfigError, match="sliding"):
        describe_hf_config(sliding)
    with pytest.raises(ConfigError, match="model_type"):
        describe_hf_config(tf.GPT2Config())
    ok = tf.Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        head_dim=8,
    )
    with pytest.raises(ConfigError, match="engine.tensor_parallel"):
        transformer_config_from_hf(ok, tensor_parallel=4)
