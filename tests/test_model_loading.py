"""The one tokenizer loader and the one model loader (:mod:`memento_train.models.loading`): training
extends a base checkpoint with the memento tokens and initialises their rows, generation takes the
checkpoint as it is, and the data tools tokenize with exactly the training tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from memento_train import tokens as T
from memento_train.models.config import ModelConfig
from memento_train.models.loading import load_model, load_tokenizer, run_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen3 checkpoint whose tokenizer has no think/memento tokens (a base model), with spare
    embedding rows as Qwen's padded vocabulary has."""
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "scripts" / "build_tokenizer.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    path = tmp_path_factory.mktemp("base_ckpt")
    tok = build.build_tokenizer(include_memento_tokens=False)
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=len(tok) + 8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
    )
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(str(path))
    return path


def test_training_from_a_base_checkpoint_initialises_the_memento_token_rows(base_checkpoint):
    mcfg = ModelConfig(path=str(base_checkpoint))
    tok = run_tokenizer(mcfg)
    model = load_model(mcfg, tok, seed=0)
    # What initialising the new tokens of that base checkpoint gives (tokens.prepare_model_and_tokenizer).
    want_tok = transformers.AutoTokenizer.from_pretrained(str(base_checkpoint))
    want = transformers.Qwen3ForCausalLM.from_pretrained(str(base_checkpoint), dtype=torch.float32)
    assert T.prepare_model_and_tokenizer(want, want_tok, seed=0) == [*T.THINK_TOKENS, *T.MEMENTO_TOKENS]
    for token in (*T.THINK_TOKENS, *T.MEMENTO_TOKENS):
        i = tok.convert_tokens_to_ids(token)
        assert i == want_tok.convert_tokens_to_ids(token)
        torch.testing.assert_close(model.get_input_embeddings().weight[i], want.get_input_embeddings().weight[i])
    assert model.training and not model.config.use_cache


def test_generation_load_takes_the_checkpoint_as_it_is(base_checkpoint):
    tok = load_tokenizer(base_checkpoint, add_memento_tokens=False)
    assert not set(T.MEMENTO_TOKENS) & set(tok.get_vocab())
    with pytest.raises(ValueError, match="missing the special token"):
        T.special_token_ids(tok)  # what memento-eval / serving report for a checkpoint without the tokens
    model = load_model(ModelConfig(path=str(base_checkpoint)), tok, seed=0, training=False, dtype=torch.float64)
    saved = transformers.Qwen3ForCausalLM.from_pretrained(str(base_checkpoint), dtype=torch.float64)
    assert not model.training and model.dtype == torch.float64
    torch.testing.assert_close(model.get_input_embeddings().weight, saved.get_input_embeddings().weight)


def test_a_checkpoint_that_cannot_be_loaded_is_named(tmp_path):
    with pytest.raises(ValueError, match="could not load tokenizer .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="could not load model .*nowhere"):
        load_model(ModelConfig(path=str(tmp_path / "nowhere")), load_tokenizer(), seed=0, training=False)


def test_memento_data_tokenizes_a_base_tokenizer_with_the_training_ids(base_checkpoint, capsys):
    from memento_train.data.cli import main

    # Before the loaders were one, memento-data loaded the base tokenizer as it is and stopped with
    # "tokenizer is missing the special token"; training adds the tokens itself.
    assert main(["stats", "--tokenizer", str(base_checkpoint), "--limit", "2", "--max-seq-len", "4096"]) == 0
    assert "missing the special token" not in capsys.readouterr().err
