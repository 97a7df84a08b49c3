"""Load the model and tokenizer a training run starts from (a Hugging Face model or the tiny one).

Both get the memento special tokens (added and initialised only if missing) and a chat template, the
model gets memento attention and, optionally, gradient checkpointing.

Host memory. Eight ranks of a node each loading a full fp32 Qwen3-32B would hold 8 × 131 GB. A trainer
rank therefore passes its ``rank``: rank 0 reads the weights once, in the checkpoint's own dtype (bf16
for released models and bf16 exports: nothing is upcast on the host), and every other rank builds the
same model with its *parameters on the meta device* (no memory; buffers such as RoPE frequencies are
computed for real). The engine then materialises each rank's share on its device in the training
dtype, broadcasting from rank 0 one tensor at a time (see :mod:`memento_train.engines.materialize`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memento_train.attention.hf import attn_implementation
from memento_train.tokens import add_memento_tokens, load_tokenizer_with_memento_tokens, prepare_model_and_tokenizer


def load_tokenizer(mcfg: Any) -> Any:
    """The run's tokenizer with the memento tokens: ``model.tokenizer`` or ``model.path``'s, else the
    shipped one (tiny models). See :func:`memento_train.tokens.load_tokenizer_with_memento_tokens`."""
    tok, _ = load_tokenizer_with_memento_tokens(mcfg.tokenizer or mcfg.path, trust_remote_code=mcfg.trust_remote_code)
    return tok


def load_model(mcfg: Any, tokenizer: Any, *, seed: int, rank: int | None = None) -> Any:
    """The model to train, in train mode with memento attention.

    ``rank=None``: this process gets the whole model in fp32 on CPU (single-process users: rollout
    workers, the RL reference model, tools). ``rank`` given (trainer ranks under an engine): rank 0
    loads the weights in the checkpoint's dtype, other ranks get the same model with meta parameters
    (see the module docstring); the engine materialises them. The tiny model is always built whole.
    """
    if mcfg.path is None:
        from memento_train.models.tiny import build_tiny_model

        t = mcfg.tiny
        model = build_tiny_model(tokenizer, seed=seed, hidden_size=t.hidden_size, num_layers=t.num_layers,
                                 num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                                 max_position_embeddings=t.max_position_embeddings)
    elif rank is not None and rank != 0:
        model = _meta_parameter_model(mcfg, tokenizer)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            mcfg.path, dtype="auto" if rank is not None else torch.float32, trust_remote_code=mcfg.trust_remote_code
        )
        prepare_model_and_tokenizer(model, tokenizer, seed=seed)
    model.config.use_cache = False
    model.set_attn_implementation(attn_implementation(mcfg.attn_backend))
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _meta_parameter_model(mcfg: Any, tokenizer: Any) -> Any:
    """``mcfg.path``'s model with every parameter on the meta device (same names, shapes and dtypes as
    rank 0's, memento token rows included); buffers real. Reads only the config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(mcfg.path, trust_remote_code=mcfg.trust_remote_code)
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              trust_remote_code=mcfg.trust_remote_code)
        add_memento_tokens(tokenizer)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers are created normally
    (so non-persistent ones, like RoPE inverse frequencies, hold real values)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {k: v for k, v in vars(param).items()}  # e.g. HF's _is_hf_initialized
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(kwargs)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def model_max_length(mcfg: Any) -> int | None:
    """The longest sequence the model's positions support (from its config, no weights loaded)."""
    if mcfg.path is None:
        return mcfg.tiny.max_position_embeddings
    import transformers

    config = transformers.AutoConfig.from_pretrained(mcfg.path, trust_remote_code=mcfg.trust_remote_code)
    return getattr(config, "max_position_embeddings", None)
