"""Special tokens, the shipped tokenizer, and embedding initialisation of new tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from memento_train import tokens as T
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer, shipped_tokenizer_path

ROOT = Path(__file__).resolve().parents[1]
ALL_SPECIAL = (
    T.BLOCK_START,
    T.BLOCK_END,
    T.SUMMARY_START,
    T.SUMMARY_END,
    T.THINK_START,
    T.THINK_END,
    T.IM_START,
    T.IM_END,
    "<|endoftext|>",
)


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "scripts" / "build_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def build_mod():
    return _load_build_script()


@pytest.fixture(scope="module")
def shipped():
    return load_shipped_tokenizer()


@pytest.fixture(scope="module")
def base_tok_path(build_mod, tmp_path_factory):
    # Built once and saved: each test reloads a fresh copy so additions never leak between tests.
    path = tmp_path_factory.mktemp("base_tok")
    build_mod.build_tokenizer(include_memento_tokens=False).save_pretrained(str(path))
    return path


def _base(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _tiny_qwen3(vocab_size: int, tied: bool):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=tied,
    )
    return transformers.Qwen3ForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- shipped tokenizer


def test_shipped_tokenizer_loads(shipped):
    assert shipped_tokenizer_path().joinpath("tokenizer.json").is_file()
    assert len(shipped) == 2048
    assert shipped.eos_token == T.IM_END
    assert shipped.pad_token == "<|endoftext|>"
    assert shipped.model_max_length == 32768


@pytest.mark.parametrize("tok", ALL_SPECIAL)
def test_special_tokens_are_atomic(shipped, tok):
    ids = shipped.encode(tok, add_special_tokens=False)
    assert len(ids) == 1
    assert shipped.convert_ids_to_tokens(ids[0]) == tok
    # Atomic inside text too, and round-trips through decode.
    text = f"a{tok}b {tok} c"
    enc = shipped.encode(text, add_special_tokens=False)
    assert enc.count(ids[0]) == 2
    assert shipped.decode(enc, skip_special_tokens=False) == text


def test_role_words_single_token_after_im_start(shipped):
    for role in ("assistant", "user", "system"):
        ids = shipped.encode(f"{T.IM_START}{role}\n", add_special_tokens=False)
        assert len(ids) == 3, (role, ids)
        assert shipped.decode([ids[1]]) == role
    ids = T.special_token_ids(shipped)
    assert set(ids) == {*T.MEMENTO_TOKENS, *T.THINK_TOKENS, T.IM_START, T.IM_END, "assistant"}
    assert ids["assistant"] == shipped.convert_tokens_to_ids("assistant")
    assert len(set(ids.values())) == len(ids)


def test_chat_template_renders_chatml(shipped):
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "<think>\nx</think> 4"}]
    text = shipped.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nx</think> 4<|im_end|>\n"
    prompt = shipped.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert shipped.chat_template == T.CHATML_TEMPLATE


def test_build_reproduces_shipped_tokenizer(build_mod, shipped):
    rebuilt = build_mod.build_tokenizer(include_memento_tokens=True)
    assert rebuilt.get_vocab() == shipped.get_vocab()
    shipped_json = json.loads(shipped_tokenizer_path().joinpath("tokenizer.json").read_text())
    assert json.loads(rebuilt.backend_tokenizer.to_str())["model"]["merges"] == shipped_json["model"]["merges"]


# ----------------------------------------------------------------------------- add_memento_tokens


def test_add_memento_tokens_on_base(base_tok_path, shipped):
    tok = _base(base_tok_path)
    assert len(tok) == 2042
    with pytest.raises(ValueError, match=r"<\|block_start\|>"):
        T.special_token_ids(tok)
    added = T.add_memento_tokens(tok)
    assert added == [*T.THINK_TOKENS, *T.MEMENTO_TOKENS]
    assert len(tok) == 2048
    # Base + add_memento_tokens gives the shipped ids.
    assert T.special_token_ids(tok) == T.special_token_ids(shipped)
    assert T.add_memento_tokens(tok) == []
    assert len(tok) == 2048
    text = f"{T.THINK_START}\n{T.BLOCK_START}step{T.BLOCK_END}\n{T.SUMMARY_START}s{T.SUMMARY_END}"
    assert tok.encode(text, add_special_tokens=False) == shipped.encode(text, add_special_tokens=False)


def test_add_memento_tokens_keeps_existing_think(base_tok_path):
    tok = _base(base_tok_path)
    tok.add_tokens([T.THINK_START, T.THINK_END])  # e.g. Qwen3 ships these already
    n = len(tok)
    assert T.add_memento_tokens(tok) == list(T.MEMENTO_TOKENS)
    assert len(tok) == n + 4


def test_special_token_ids_rejects_split_assistant():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(["<|im_start|>", "<|im_end|>", "a", "s", "i", "t", "n", "\n"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    T.add_memento_tokens(tok)
    with pytest.raises(ValueError, match="'assistant' does not encode to exactly one id"):
        T.special_token_ids(tok)


# ----------------------------------------------------------------------------- model preparation


def _related_mean(weight, tok, token):
    ids = set()
    for w in T.INIT_WORDS[token]:
        for v in (w, " " + w):
            ids.update(tok.encode(v, add_special_tokens=False))
    return weight[sorted(ids)].mean(0)


@pytest.mark.parametrize("tied", [False, True])
def test_prepare_model_and_tokenizer(base_tok_path, tied):
    tok = _base(base_tok_path)
    tok.chat_template = None
    model = _tiny_qwen3(len(tok), tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    new = T.prepare_model_and_tokenizer(model, tok, seed=0)
    assert new == [*T.THINK_TOKENS, *T.MEMENTO_TOKENS]
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert emb.shape[0] == len(tok) == 2048
    assert (head.data_ptr() == emb.data_ptr()) == tied
    assert model.config.vocab_size == 2048
    torch.testing.assert_close(emb[:2042], old_in)  # old rows untouched
    if not tied:
        torch.testing.assert_close(head[:2042], old_out)
    assert tok.chat_template == T.CHATML_TEMPLATE

    mats = [emb] if tied else [emb, head]
    for w in mats:
        residuals = []
        for token in T.MEMENTO_TOKENS:
            row = w[tok.convert_tokens_to_ids(token)]
            residuals.append(row - _related_mean(w[:2042], tok, token))
        for token in T.THINK_TOKENS:
            residuals.append(w[tok.convert_tokens_to_ids(token)] - w[:2042].mean(0))
        res = torch.stack(residuals)
        assert res.abs().max() < 0.06  # 6 sigma of N(0, 0.01)
        assert 0.007 < res.std().item() < 0.013
    if not tied:  # head rows use the head's own related-word rows, with independent noise
        i = tok.convert_tokens_to_ids(T.BLOCK_START)
        assert not torch.allclose(emb[i], head[i])

    # Deterministic for a fixed seed.
    tok2 = _base(base_tok_path)
    model2 = _tiny_qwen3(len(tok2), tied)
    T.prepare_model_and_tokenizer(model2, tok2, seed=0)
    torch.testing.assert_close(model2.get_input_embeddings().weight, model.get_input_embeddings().weight)
    # Idempotent: a second call adds and changes nothing.
    assert T.prepare_model_and_tokenizer(model, tok) == []
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), emb)


def test_prepare_keeps_padded_vocab(base_tok_path):
    tok = _base(base_tok_path)
    model = _tiny_qwen3(2112, tied=False)  # padded like Qwen's 151936 > len(tokenizer)
    new = T.prepare_model_and_tokenizer(model, tok)
    assert len(new) == 6
    assert model.get_input_embeddings().weight.shape[0] == 2112
    assert model.get_output_embeddings().weight.shape[0] == 2112
    w = model.get_input_embeddings().weight.detach()
    i = tok.convert_tokens_to_ids(T.SUMMARY_END)
    assert (w[i] - _related_mean(w[:2042], tok, T.SUMMARY_END)).abs().max() < 0.06


def test_save_and_reload_roundtrip(base_tok_path, tmp_path):
    tok = _base(base_tok_path)
    model = _tiny_qwen3(len(tok), tied=False)
    T.prepare_model_and_tokenizer(model, tok)
    T.save_model_and_tokenizer(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()

    tok2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    model2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    assert T.special_token_ids(tok2) == T.special_token_ids(tok)
    assert tok2.chat_template == tok.chat_template == T.CHATML_TEMPLATE
    assert T.add_memento_tokens(tok2) == []
    torch.testing.assert_close(model2.get_input_embeddings().weight, model.get_input_embeddings().weight)
    torch.testing.assert_close(model2.get_output_embeddings().weight, model.get_output_embeddings().weight)
    text = f"{T.BLOCK_START}a step{T.BLOCK_END}{T.SUMMARY_START}done{T.SUMMARY_END}"
    assert tok2.decode(tok2.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
