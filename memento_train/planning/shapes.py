"""The shapes the memory planner needs, read from a model config without loading weights.

:class:`ModelShape` comes from an HF config (a local ``config.json``, or one of the models the shipped
recipes name, whose published configs are copied in :data:`KNOWN_MODELS` so that planning needs no
download) or from the tiny model's config section.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from memento_train.config.errors import ConfigError

# Published configs of the models the shipped recipes train (the fields the planner reads).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen3-32B": dict(
        model_type="qwen3",
        hidden_size=5120,
        intermediate_size=25600,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    "microsoft/Phi-4-reasoning": dict(
        model_type="phi3",
        hidden_size=5120,
        intermediate_size=17920,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=10,
        vocab_size=100352,
        tie_word_embeddings=False,
    ),
    "allenai/Olmo-3-1025-7B": dict(
        model_type="olmo3",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=100278,
        tie_word_embeddings=False,
        sliding_window=4096,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"] * 8,
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only model's dimensions, as the planner uses them.

    ``family`` selects how activations are laid out (``qwen3``: q/k norms per head; ``olmo3``: q/k
    norms over the projection and norms after attention / MLP; ``phi3``: fused qkv and gate/up
    projections; anything else is treated like ``llama``). ``windows`` is each layer's sliding window
    (``None`` = full attention).
    """

    family: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    windows: tuple[int | None, ...] = field(default=())
    name: str = ""

    @property
    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2
        if self.family == "qwen3":
            norms = 2 * h + 2 * d
        elif self.family == "olmo3":
            norms = 2 * h + self.heads * d + self.kv_heads * d
        else:
            norms = 2 * h
        return attn + 3 * h * self.ffn + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The LM head's own parameters (0 when tied to the embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.embedding_params + self.head_params + self.layers * self.layer_params + self.hidden

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest single weight (what a broadcast holds in flight)."""
        return max(self.embedding_params, self.hidden * self.ffn * (2 if self.family == "phi3" else 1))


def shape_from_config(cfg: Any, *, name: str = "") -> ModelShape:
    """A :class:`ModelShape` from an HF config object or a dict of its fields."""
    get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    layers = get("num_hidden_layers")
    window = get("sliding_window")
    types = get("layer_types")
    if types:
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    else:
        windows = tuple([window if window and get("use_sliding_window", True) else None] * layers)
    return ModelShape(
        family=str(get("model_type", "llama")),
        hidden=hidden,
        ffn=get("intermediate_size"),
        layers=layers,
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or hidden // heads,
        vocab=get("vocab_size"),
        tied=bool(get("tie_word_embeddings", False)),
        windows=windows,
        name=name,
    )


def shape_of_model_path(path: str) -> ModelShape:
    """The shape of ``model.path``: a local directory's ``config.json`` or a known hub id."""
    local = os.path.join(os.path.expanduser(path), "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            return shape_from_config(json.load(f), name=path)
    if path in KNOWN_MODELS:
        return shape_from_config(KNOWN_MODELS[path], name=path)
    raise ConfigError(
        f"cannot plan model.path={path!r}: it is not a local model directory (no config.json) and "
        f"not one of the known models ({', '.join(KNOWN_MODELS)}); download its config.json first"
    )


def tiny_shape(tiny: Any, vocab: int) -> ModelShape:
    """The tiny Qwen3 model of ``model.tiny`` (see :mod:`memento_train.models.tiny`)."""
    return ModelShape(
        family="qwen3",
        hidden=tiny.hidden_size,
        ffn=2 * tiny.hidden_size,
        layers=tiny.num_layers,
        heads=tiny.num_heads,
        kv_heads=tiny.num_kv_heads,
        head_dim=tiny.hidden_size // tiny.num_heads,
        vocab=vocab,
        tied=True,
        windows=(None,) * tiny.num_layers,
        name="tiny",
    )
