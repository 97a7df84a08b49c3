"""Checks of a run against its model's config (read without weights), done before any worker starts.

``memento-train show`` and the SFT driver call :func:`check_model`, so a model/option combination
that cannot train is rejected up front, naming the option, instead of after every rank loaded the
weights.
"""

from __future__ import annotations

from typing import Any

from memento_train.attention import check_backend_for_model
from memento_train.attention.hf import sliding_window_of


def read_hf_config(mcfg: Any) -> Any | None:
    """The HF config of ``model.path`` (``config.json`` only, no weights); ``None`` for the tiny model
    (a Qwen3 shape without sliding windows)."""
    if mcfg.path is None:
        return None
    import transformers

    return transformers.AutoConfig.from_pretrained(mcfg.path, trust_remote_code=mcfg.trust_remote_code)


def check_model(
    mcfg: Any, *, evicts: bool, engine_kind: str, prefix: str = "model", hf_config: Any | None = None
) -> None:
    """Raise :class:`~memento_train.config.errors.ConfigError` naming the option when the model cannot
    train with these options: the attention backend must support every layer type of the model with
    the mask (``evicts``: memento eviction, i.e. ``keep_last_n_blocks >= 0``), and the megatron engine
    must be able to build the architecture.
    """
    hf_config = read_hf_config(mcfg) if hf_config is None else hf_config
    window = sliding_window_of(hf_config) if hf_config is not None else None
    check_backend_for_model(mcfg.attn_backend, sliding_window=window, evicts=evicts, option=f"{prefix}.attn_backend")
    if engine_kind == "megatron" and hf_config is not None:
        from memento_train.models.megatron_gpt import describe_hf_config

        describe_hf_config(hf_config)  # ConfigError for what the megatron engine cannot reproduce
