"""Megatron forward == HF forward under the memento mask (tiny random models, fp32, CPU, gloo).

A packed batch of three ChatML Memento documents whose blocks are evicted (``keep_last_n_blocks=0``)
goes through the stock HF model with ``memento_segment`` attention and through the converted
Megatron ``GPTModel`` with the memento core attention; the logits must agree at TP=1 (in process)
and TP=2 (two spawned gloo ranks).
"""

from __future__ import annotations

import pytest
import torch
from megatron_harness import megatron_skip_reason, memento_batch, run_workers, single_process_group

pytestmark = pytest.mark.skipif(megatron_skip_reason() is not None, reason=str(megatron_skip_reason()))

TOL32 = 2e-5


def tiny_hf(family: str, tied: bool):
    import transformers as tf
    from conftest import tiny_causal_lm

    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    if family == "llama":  # not in conftest; Llama-3.1 RoPE scaling, short original context so it bites
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_parameters=rope)).eval()
    elif family == "phi3-partial":  # Phi-4-mini style: RoPE on the first half of each head only
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common, rope_parameters=rope)).eval()
    else:
        model = tiny_causal_lm(family, dtype=torch.float32)
    if tied:  # the shipped tiny model ties embeddings; exercise that layout too
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def hf_logits(model, ids, pos, meta) -> torch.Tensor:
    from memento_train.attention import attn_implementation

    model.set_attn_implementation(attn_implementation("segment"))
    with torch.no_grad():
        return model(input_ids=ids[None], position_ids=pos[None], memento_meta=meta, use_cache=False).logits[0]


def megatron_logits(family: str, tied: bool, tp: int, *, causal: bool = False):
    """(megatron logits, HF logits) on this rank; parallel state is set up and torn down here."""
    from megatron.core import parallel_state as ps

    from memento_train.attention import MementoAttentionMeta
    from memento_train.engines.megatron import _GatherVocab, init_parallel_state
    from memento_train.models.megatron_convert import load_hf_weights
    from memento_train.models.megatron_gpt import (
        MementoPackedSeqParams,
        architecture_of,
        build_gpt_model,
        transformer_config_from_hf,
    )

    hf = tiny_hf(family, tied)
    ids, pos, meta = memento_batch(0, mask_delimiters=family.startswith("phi3"))
    if causal:
        meta = MementoAttentionMeta.causal(meta.cu_seqlens)
    init_parallel_state(tp, 1)
    try:
        arch = architecture_of(hf)
        gpt = build_gpt_model(hf.config, transformer_config_from_hf(hf.config, tensor_parallel=tp))
        load_hf_weights(gpt, hf.state_dict(), arch, tp_rank=ps.get_tensor_model_parallel_rank())
        gpt.eval()
        with torch.no_grad():
            out = gpt(
                input_ids=ids[None],
                position_ids=pos[None],
                attention_mask=None,
                packed_seq_params=MementoPackedSeqParams.from_meta(meta),
            )[0]
            if tp > 1:
                out = _GatherVocab.apply(out, ps.get_tensor_model_parallel_group())
        return out[:, : arch.vocab_size], hf_logits(hf, ids, pos, meta)
    finally:
        ps.destroy_model_parallel()


CASES = [("qwen3", False), ("qwen3", True), ("llama", False), ("phi3", False), ("phi3-partial", False)]


@pytest.mark.parametrize("family,tied", CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def test_megatron_logits_equal_hf_under_memento_mask_tp1(family, tied):
    with single_process_group():
        got, ref = megatron_logits(family, tied, 1)
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    print(f"\nPARITY megatron TP=1 {family} tied={tied}: max|Δ|={diff:.3e}")
    assert diff < TOL32


def test_eviction_changes_megatron_logits():
    """Not vacuous: the same batch with a plain causal mask gives different logits."""
    with single_process_group():
        evicting, _ = megatron_logits("qwen3", False, 1)
        causal, _ = megatron_logits("qwen3", False, 1, causal=True)
    assert (evicting - causal).abs().max().item() > 1e-3


def _tp2_parity():
    return {case: megatron_logits(*case, 2) for case in [("qwen3", False), ("qwen3", True)]}


@pytest.mark.slow
def test_megatron_logits_equal_hf_under_memento_mask_tp2():
    ranks = run_workers(_tp2_parity, 2)
    for case in ranks[0]:
        for r, res in enumerate(ranks):
            got, ref = res[case]
            diff = (got - ref).abs().max().item()
            print(f"\nPARITY megatron TP=2 {case} rank {r}: max|Δ|={diff:.3e}")
            assert diff < TOL32
        assert torch.equal(ranks[0][case][0], ranks[1][case][0])  # both ranks gather the same logits
