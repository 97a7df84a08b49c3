"""Which model a run trains and how it computes attention: the ``model`` section of the SFT and RL
configs (:class:`ModelConfig`), and :func:`resolve_init_from`, which chains a run to the previous
stage's export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from memento_train.config.errors import ConfigError
from memento_train.export.writer import MARKER_FILE
from memento_train.recipes import load_recipe


@dataclass
class TinyModelConfig:
    """Shape of the random-weight Qwen3-style model used when ``model.path`` is unset (CPU runs)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096


@dataclass
class ModelConfig:
    """Which model to train and how it computes attention.

    Attributes:
        path: a Hugging Face model directory or hub id; ``None`` builds a tiny random model (``tiny``)
            with the shipped tokenizer, unless ``init_from`` names where the model comes from.
        init_from: the recipe (shipped name or file) of the previous stage: with ``path`` null the model
            is that recipe's export, ``<its default output_dir>/hf``, so the paper's commands chain
            with defaults (``qwen3_8b_stage1`` -> ``qwen3_8b_stage2`` -> ``grpo``). When that export
            does not exist the error names the command to run first.
        tokenizer: tokenizer directory / hub id; ``None`` = ``path``'s (the shipped one for tiny).
        attn_backend: memento attention backend (``auto``, ``segment``, ``sdpa``, ``flex``,
            ``flash_attn``, ``triton``); ``auto`` picks the fastest available on the device for each
            layer type (never ``flash_attn`` for sliding-window layers). ``memento-train show``
            rejects a backend that cannot run the model's layers with the mask.
        gradient_checkpointing: recompute decoder layers in backward (long sequences).
        require_stage1_init: at stage 2, insist that ``path`` is a memento-train stage-1 export.
        trust_remote_code: passed to ``from_pretrained``.
    """

    path: str | None = None
    init_from: str | None = None
    tokenizer: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    attn_backend: str = "auto"
    gradient_checkpointing: bool = False
    require_stage1_init: bool = True
    trust_remote_code: bool = False


def resolve_init_from(model: ModelConfig) -> None:
    """Set ``model.path`` from ``model.init_from`` (see :class:`ModelConfig`) when it is unset; raise
    :class:`ConfigError` naming the command that produces the export when it does not exist yet."""
    if model.path is not None or model.init_from is None:
        return
    name = model.init_from
    tree = load_recipe(name)
    cli = "memento-rl" if "rollout" in tree else "memento-train"
    out = tree.get("output_dir")
    if not out:
        raise ConfigError(
            f"model.init_from={name!r}: that recipe sets no output_dir to find its export in; "
            f"set model.path=<its output_dir>/hf"
        )
    hf = Path(os.path.abspath(os.path.expanduser(str(out)))) / "hf"
    if not (hf / MARKER_FILE).is_file():
        raise ConfigError(
            f"model.init_from={name}: the previous stage's export {hf} does not exist; run "
            f"`{cli} recipe={name}` first (it exports there), or set model.path=DIR to its export"
        )
    model.path = str(hf)
