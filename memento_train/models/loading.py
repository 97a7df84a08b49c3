"""Load the model and tokenizer a training run starts from (a Hugging Face model or the tiny one).

Both get the memento special tokens (added and initialised only if missing) and a chat template, the
model gets memento attention and, optionally, gradient checkpointing.
"""

from __future__ import annotations

from typing import Any

import torch

from memento_train.attention.hf import attn_implementation
from memento_train.tokens import CHATML_TEMPLATE, add_memento_tokens, prepare_model_and_tokenizer


def load_tokenizer(mcfg: Any) -> Any:
    """The run's tokenizer with the memento tokens: ``model.tokenizer`` or ``model.path``'s, else the
    shipped one (tiny models)."""
    source = mcfg.tokenizer or mcfg.path
    if source is None:
        from memento_train.tokenizer_assets import load_shipped_tokenizer

        tok = load_shipped_tokenizer()
    else:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=mcfg.trust_remote_code)
    add_memento_tokens(tok)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    return tok


def load_model(mcfg: Any, tokenizer: Any, *, seed: int) -> Any:
    """The fp32 CPU model to train (engines cast and shard it), in train mode with memento attention."""
    if mcfg.path is None:
        from memento_train.models.tiny import build_tiny_model

        t = mcfg.tiny
        model = build_tiny_model(tokenizer, seed=seed, hidden_size=t.hidden_size, num_layers=t.num_layers,
                                 num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                                 max_position_embeddings=t.max_position_embeddings)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            mcfg.path, dtype=torch.float32, trust_remote_code=mcfg.trust_remote_code
        )
        prepare_model_and_tokenizer(model, tokenizer, seed=seed)
    model.config.use_cache = False
    model.set_attn_implementation(attn_implementation(mcfg.attn_backend))
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def model_max_length(mcfg: Any) -> int | None:
    """The longest sequence the model's positions support (from its config, no weights loaded)."""
    if mcfg.path is None:
        return mcfg.tiny.max_position_embeddings
    import transformers

    config = transformers.AutoConfig.from_pretrained(mcfg.path, trust_remote_code=mcfg.trust_remote_code)
    return getattr(config, "max_position_embeddings", None)
