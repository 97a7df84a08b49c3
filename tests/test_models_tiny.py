import pytest
import torch

from memento_train.models import build_tiny_model, tiny_model_config
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer
from memento_train.tokens import special_token_ids

TOK = load_shipped_tokenizer()


def test_tiny_model_is_sized_to_the_tokenizer_and_seeded():
    a, b = build_tiny_model(TOK, seed=3), build_tiny_model(TOK, seed=3)
    assert a.config.vocab_size == len(TOK)
    assert a.config.eos_token_id == special_token_ids(TOK)["<|im_end|>"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not a.training


def test_tiny_model_memento_rows_are_initialised_exactly_as_training_does():
    import transformers

    from memento_train.tokens import MEMENTO_TOKENS, THINK_TOKENS, init_new_token_embeddings

    torch.manual_seed(0)
    raw = transformers.Qwen3ForCausalLM(tiny_model_config(TOK)).eval()
    before = raw.get_input_embeddings().weight.detach().clone()
    init_new_token_embeddings(raw, TOK, [*THINK_TOKENS, *MEMENTO_TOKENS], seed=0)
    model = build_tiny_model(TOK, seed=0)
    assert torch.equal(model.get_input_embeddings().weight, raw.get_input_embeddings().weight)
    row = special_token_ids(TOK)["<|summary_start|>"]
    assert not torch.equal(before[row], model.get_input_embeddings().weight[row])


def test_tiny_model_config_rejects_heads_that_do_not_divide_hidden():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        tiny_model_config(TOK, hidden_size=66, num_heads=4)
