"""Shared test helpers: tiny random HF causal LMs built from configs (offline, no downloads)."""

from __future__ import annotations

import pytest
import torch

# Olmo 3: two sliding layers around a full one, with a window much shorter than the test documents.
OLMO3_WINDOW = 8


def tiny_causal_lm(family: str, *, dtype: torch.dtype = torch.float64, seed: int = 0, vocab_size: int = 128):
    """A tiny randomly initialised ``Qwen3`` / ``Phi3`` / ``Olmo3`` ``ForCausalLM`` (no downloads), in eval mode."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    if family == "qwen3":
        config, cls = tf.Qwen3Config(num_hidden_layers=2, head_dim=8, **common), tf.Qwen3ForCausalLM
    elif family == "phi3":
        config, cls = tf.Phi3Config(num_hidden_layers=2, **common), tf.Phi3ForCausalLM
    elif family == "olmo3":
        config, cls = (
            tf.Olmo3Config(
                num_hidden_layers=3,
                sliding_window=OLMO3_WINDOW,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                **common,
            ),
            tf.Olmo3ForCausalLM,
        )
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    return model


@pytest.fixture(scope="session")
def make_tiny_lm():
    """The :func:`tiny_causal_lm` factory."""
    return tiny_causal_lm


@pytest.fixture(autouse=True, scope="module")
def _ray_shut_down_after_each_module():
    """Tests never leave a Ray instance to the next module: a leaked 2-CPU local Ray would be reused by
    the next driver (``RaySession.open``), whose workers then wait forever for CPUs it cannot add."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
