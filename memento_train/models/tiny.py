"""The tiny Qwen3-shaped model with random weights used by every embedded default and CPU benchmark.

Built from a config (no download) around a tokenizer holding the memento tokens (the shipped one by
default), with the memento/think rows initialised exactly as training initialises them.
"""

from __future__ import annotations

from typing import Any

from memento_train.tokens import IM_END, MEMENTO_TOKENS, THINK_TOKENS


def tiny_model_config(
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 4096,
) -> Any:
    """A small ``Qwen3Config`` sized to ``tokenizer`` (GQA, q/k norms: the Qwen3 shape in miniature)."""
    import transformers

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    return transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def build_tiny_model(tokenizer: Any, *, seed: int = 0, dtype: Any = None, device: Any = "cpu", **config_kwargs) -> Any:
    """Seeded random-weight ``Qwen3ForCausalLM`` in eval mode; ``config_kwargs`` go to :func:`tiny_model_config`.

    Random weights: it exercises plumbing (data, masks, eviction, evaluation), not the method.
    """
    import torch
    import transformers

    from memento_train.tokens import init_new_token_embeddings

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(tiny_model_config(tokenizer, **config_kwargs))
    init_new_token_embeddings(model, tokenizer, [*THINK_TOKENS, *MEMENTO_TOKENS], seed=seed)
    return model.to(dtype=dtype or torch.float32, device=device).eval()
