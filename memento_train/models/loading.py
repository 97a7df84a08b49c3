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
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memento_train.attention.hf import attn_implementation
from memento_train.tokens import CHATML_TEMPLATE, prepare_model_and_tokenizer
from memento_train.tokens import add_memento_tokens as _add_memento_tokens


def load_tokenizer(
    source: str | os.PathLike | None = None, *, trust_remote_code: bool = False, add_memento_tokens: bool = True
) -> Any:
    """The one tokenizer loader: ``source`` (a directory or hub id; ``None`` = the tokenizer shipped with
    the package, the tiny models').

    ``add_memento_tokens=True`` (training and data preparation): the think and memento tokens are added
    as atomic special tokens when missing, with the ids training gives them (the model's rows for them
    are initialised by :func:`load_model`), and a tokenizer without a chat template gets ChatML, the
    template the export saves. ``False`` (generation from a checkpoint: ``memento-eval``, vLLM, serving):
    the tokenizer as the checkpoint ships it; a model trained without the memento tokens has no rows
    for them, so ids added here would be ids the model does not know
    (:func:`~memento_train.tokens.special_token_ids` then names the missing token).

    Raises ``ValueError`` naming ``source`` when it cannot be loaded.
    """
    return load_tokenizer_and_added(source, trust_remote_code=trust_remote_code, add_memento_tokens=add_memento_tokens)[
        0
    ]


def load_tokenizer_and_added(
    source: str | os.PathLike | None = None, *, trust_remote_code: bool = False, add_memento_tokens: bool = True
) -> tuple[Any, dict[str, int]]:
    """:func:`load_tokenizer`, and ``{token: id}`` of the tokens it added (empty when the tokenizer had
    them all): ``memento-data`` reports them."""
    if source is None:
        from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

        tok = load_shipped_tokenizer()
    else:
        import transformers

        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ValueError(
                f"could not load tokenizer {str(source)!r}: {exc}. Pass a local tokenizer directory "
                "(with tokenizer.json / tokenizer_config.json), or omit it to use the shipped tokenizer."
            ) from exc
    added: dict[str, int] = {}
    if add_memento_tokens:
        added = {t: int(tok.convert_tokens_to_ids(t)) for t in _add_memento_tokens(tok)}
        if not getattr(tok, "chat_template", None):
            tok.chat_template = CHATML_TEMPLATE
    return tok, added


def run_tokenizer(mcfg: Any) -> Any:
    """:func:`load_tokenizer` for a run's ``model`` section (:class:`~memento_train.models.config.ModelConfig`):
    ``model.tokenizer``, else ``model.path``'s, else the shipped one (tiny models); memento tokens added."""
    return load_tokenizer(mcfg.tokenizer or mcfg.path, trust_remote_code=mcfg.trust_remote_code)


def load_model(
    mcfg: Any,
    tokenizer: Any,
    *,
    seed: int,
    rank: int | None = None,
    training: bool = True,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Any:
    """The one model loader: ``mcfg.path``'s Hugging Face model, or with ``mcfg.path`` null the seeded
    tiny random model shaped by ``mcfg.tiny`` (:class:`~memento_train.models.config.ModelConfig`).

    Training (``training=True``): in train mode with memento attention (``mcfg.attn_backend``) and,
    optionally, gradient checkpointing. The think and memento tokens that the checkpoint's own
    tokenizer lacks (a base model) get embedding rows initialised from related tokens
    (:func:`~memento_train.tokens.prepare_model_and_tokenizer`), at the ids :func:`load_tokenizer` gave
    them in ``tokenizer``. ``rank=None``: this process gets the whole model in fp32 on CPU
    (single-process users: rollout workers, the RL reference model, tools). ``rank`` given (trainer
    ranks under an engine): rank 0 loads the weights in the checkpoint's dtype, other ranks get the same
    model with meta parameters (see the module docstring); the engine materialises them. The tiny model
    is always built whole.

    Generation (``training=False``: ``memento-eval``'s reference generator, tools): the checkpoint as it
    is, in eval mode, in ``dtype`` (default float32) on ``device``, with its own attention (the reference
    generator evicts KV entries physically) and nothing added to its vocabulary.

    Raises ``ValueError`` naming ``mcfg.path`` when the checkpoint cannot be loaded.
    """
    if mcfg.path is None:
        from memento_train.models.tiny import build_tiny_model

        model = build_tiny_model(tokenizer, seed=seed, dtype=dtype, device=device, **dataclasses.asdict(mcfg.tiny))
        if not training:
            return model
    elif not training:
        return _from_pretrained(mcfg, dtype or torch.float32).to(device).eval()
    elif rank is not None and rank != 0:
        model = _meta_parameter_model(mcfg, tokenizer)
    else:
        model = _from_pretrained(mcfg, "auto" if rank is not None else torch.float32)
        # The rows to initialise are those of the tokens new to the *checkpoint*: ``tokenizer`` holds
        # them already (load_tokenizer added them), so the checkpoint's own tokenizer says which.
        checkpoint_tok = load_tokenizer(
            mcfg.tokenizer or mcfg.path, trust_remote_code=mcfg.trust_remote_code, add_memento_tokens=False
        )
        prepare_model_and_tokenizer(model, checkpoint_tok, seed=seed)
        if len(checkpoint_tok) != len(tokenizer):
            raise ValueError(
                f"the training tokenizer has {len(tokenizer)} tokens but {mcfg.path!r}'s own tokenizer "
                f"extended with the memento tokens has {len(checkpoint_tok)}: load the training "
                f"tokenizer with load_tokenizer from the same source"
            )
    model.config.use_cache = False
    model.set_attn_implementation(attn_implementation(mcfg.attn_backend))
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _from_pretrained(mcfg: Any, dtype: Any) -> Any:
    import transformers

    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            mcfg.path, dtype=dtype, trust_remote_code=mcfg.trust_remote_code
        )
    except Exception as exc:
        raise ValueError(f"could not load model {mcfg.path!r}: {exc}") from exc


def _meta_parameter_model(mcfg: Any, tokenizer: Any) -> Any:
    """``mcfg.path``'s model with every parameter on the meta device (same names, shapes and dtypes as
    rank 0's, memento token rows included); buffers real. Reads only the config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(mcfg.path, trust_remote_code=mcfg.trust_remote_code)
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=mcfg.trust_remote_code
        )
        _add_memento_tokens(tokenizer)
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
