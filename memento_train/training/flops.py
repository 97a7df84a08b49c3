"""FLOP accounting for throughput and MFU, counting attention over the pairs memento attention keeps.

Dense work is ``6 x (weights of every Linear layer)`` per token (forward 2, backward 4), LM head
included. Attention is ``12 x heads x head_dim`` per *kept* query-key pair and layer (forward: QK^T
and PV, 2 x head_dim each; backward twice that), so eviction shows up as fewer FLOPs, not as a higher
MFU for the same work.
"""

from __future__ import annotations

from torch import nn

from memento_train.attention import MementoAttentionMeta

# Dense bf16 peak, TFLOP/s, by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "B200": 2250.0,
    "GB200": 2450.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def linear_weights(model: nn.Module) -> int:
    """Number of weights in the model's Linear layers (what the dense matmuls multiply by)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def layer_windows(config) -> list[int | None]:
    """Per-layer sliding window of an HF config (``None`` = full attention)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n if window and getattr(config, "use_sliding_window", True) else [None] * n


class FlopCounter:
    """Training FLOPs of packed micro-batches for one model."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.dense_per_token = 6 * linear_weights(model)
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.windows = layer_windows(cfg)

    def attention_pairs(self, meta: MementoAttentionMeta) -> tuple[int, int]:
        """``(kept, causal)`` query-key pairs summed over layers."""
        kept = causal = 0
        cache: dict[int | None, tuple[int, int]] = {}
        for w in self.windows:
            if w not in cache:
                cache[w] = (meta.kept_pairs(w), meta.causal_pairs(w))
            kept += cache[w][0]
            causal += cache[w][1]
        return kept, causal

    def step_flops(self, num_tokens: int, kept_pairs: int) -> float:
        """FLOPs of forward + backward over ``num_tokens`` tokens with ``kept_pairs`` attended pairs."""
        return float(self.dense_per_token * num_tokens + 12 * self.heads * self.head_dim * kept_pairs)


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU by name; ``None`` when unknown (CPU: MFU is not reported)."""
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None
