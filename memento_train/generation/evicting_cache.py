"""A KV cache for stock HF causal LMs that *physically* frees evicted entries.

This is what the serving engine does when a memento block is evicted (DESIGN.md §2): the block's
K/V entries are dropped from storage, while every remaining entry keeps the *logical* position it
was written at (RoPE was applied with that position; it is never re-rotated). Per layer the cache
stores compacted ``keys``/``values`` tensors ``[batch, kv_heads, entries, head_dim]`` plus the
logical positions of the stored entries. :meth:`EvictingCache.evict` rebuilds smaller tensors with
``index_select``, so the old storage really is released; :meth:`EvictingCache.nbytes` reports the
bytes of storage actually held.

It plugs into transformers' model forward as ``past_key_values`` together with the ``memento_decode``
attention implementation registered here::

    register_decode_attention()
    model.set_attn_implementation(DECODE_ATTN)          # "memento_decode"
    cache = EvictingCache(config=model.config)
    cache.set_query_positions([pos])                    # logical position of the new token
    model(input_ids=ids, position_ids=torch.tensor([[pos]]), past_key_values=cache,
          use_cache=True, memento_cache=cache)

``memento_decode`` attends from the new queries to every cached (non-evicted) key whose logical
position is ``<=`` the query's. Sliding-window layers (HF passes ``sliding_window``) additionally
require ``q_pos - k_pos < window`` in *logical* positions, exactly like the training mask; the cache
itself never truncates by count (HF's ``DynamicSlidingWindowLayer`` keeps the last ``window``
*physical* entries, which is wrong once entries have been evicted).

:class:`memento_train.generation.teacher_forced.EvictingDecoder` drives this cache with the
block tracker; use it rather than calling :meth:`EvictingCache.evict` by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attention.hf import register_hf_attention

DECODE_ATTN = "memento_decode"

# ``evict`` accepts: a (start, stop) pair, a ``range``/``slice`` (step 1), anything with ``start`` and
# ``stop`` attributes (e.g. ``masking.Eviction``), or an explicit collection of logical positions.
PositionsOrSpan = Any


class EvictingLayer(CacheLayerMixin):
    """One layer's compacted K/V storage plus the logical position of every stored entry.

    Invariants: ``positions`` is strictly increasing; ``keys.shape[-2] == values.shape[-2] ==
    positions.numel()``; ``seen_tokens`` counts every token ever appended (the next logical position
    when positions are implicit).
    """

    is_sliding = False  # never truncated by count; sliding windows are applied by logical distance
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None  # int64 [entries]
        self.query_positions: torch.Tensor | None = None  # int64 [T] of the latest update
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args,
        positions: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``T`` new entries at logical ``positions`` (default: the next ``T`` positions)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if positions is None:
            positions = torch.arange(self.seen_tokens, self.seen_tokens + t, device=self.device)
        positions = torch.as_tensor(positions, dtype=torch.long, device=self.device).reshape(-1)
        if positions.numel() != t:
            raise ValueError(f"{t} new key/value entries but {positions.numel()} logical positions")
        if t > 1 and bool((positions[1:] <= positions[:-1]).any()):
            raise ValueError(f"logical positions must be strictly increasing, got {positions.tolist()}")
        if self.positions.numel() and t and int(positions[0]) <= int(self.positions[-1]):
            raise ValueError(
                f"new logical position {int(positions[0])} is not after the last cached one "
                f"({int(self.positions[-1])}); the evicting cache only appends"
            )
        # torch.cat always allocates fresh storage, so no tensor here is a view into a larger buffer.
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, positions])
        self.query_positions = positions
        self.seen_tokens = max(self.seen_tokens, int(positions[-1]) + 1) if t else self.seen_tokens
        return self.keys, self.values

    def evict(self, positions_or_span: PositionsOrSpan) -> int:
        """Drop the entries at the given logical positions (absent ones are ignored); returns how many.

        The kept entries are gathered into *new* tensors, so the evicted entries' memory is freed.
        """
        if not self.is_initialized or self.positions.numel() == 0:
            return 0
        drop = _drop_mask(self.positions, positions_or_span)
        n_drop = int(drop.sum())
        if n_drop:
            keep = torch.nonzero(~drop).squeeze(1)
            self.keys = self.keys.index_select(-2, keep)
            self.values = self.values.index_select(-2, keep)
            self.positions = self.positions.index_select(0, keep)
        return n_drop

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def num_entries(self) -> int:
        return 0 if not self.is_initialized else int(self.positions.numel())

    def nbytes(self) -> int:
        """Bytes of K and V storage this layer holds (storage, not view size: what is really allocated)."""
        if not self.is_initialized:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def get_seq_length(self) -> int:
        # Logical length (tokens seen, evicted ones included): HF derives default position ids from it.
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_entries + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.query_positions = None
        self.seen_tokens = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the evicting cache cannot be cropped; evict logical positions instead")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]


def _drop_mask(positions: torch.Tensor, spec: PositionsOrSpan) -> torch.Tensor:
    if hasattr(spec, "start") and hasattr(spec, "stop") and not isinstance(spec, torch.Tensor):
        step = getattr(spec, "step", None)
        if step not in (None, 1):
            raise ValueError(f"evict takes contiguous spans only (step 1), got {spec!r}")
        return (positions >= int(spec.start)) & (positions < int(spec.stop))
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, int) for x in spec):
        return (positions >= spec[0]) & (positions < spec[1])
    targets = torch.as_tensor(
        spec if isinstance(spec, torch.Tensor) else list(spec), dtype=torch.long, device=positions.device
    ).reshape(-1)
    return torch.isin(positions, targets)


class EvictingCache(Cache):
    """Per-layer compacted K/V plus logical positions; entries are physically freed by :meth:`evict`.

    All layers are full layers: sliding windows are applied by the ``memento_decode`` attention
    function from logical distances, never by truncating storage by count.
    """

    def __init__(self, num_layers: int | None = None, *, config=None) -> None:
        if config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is None:
            super().__init__(layer_class_to_replicate=EvictingLayer)
        else:
            super().__init__(layers=[EvictingLayer() for _ in range(num_layers)])
        self._query_positions: torch.Tensor | None = None

    # -- the HF interface ------------------------------------------------------------------------
    def set_query_positions(self, positions: Sequence[int] | torch.Tensor | None) -> None:
        """Logical positions of the tokens of the next forward (``None``: continue after the last)."""
        self._query_positions = None if positions is None else torch.as_tensor(positions, dtype=torch.long).reshape(-1)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        return self.layers[layer_idx].update(key_states, value_states, positions=self._query_positions)

    # -- eviction and accounting -----------------------------------------------------------------
    def evict(self, positions_or_span: PositionsOrSpan) -> int:
        """Remove the given logical positions from every layer; returns entries removed per layer."""
        removed = {layer.evict(positions_or_span) for layer in self.layers}
        if len(removed) > 1:  # pragma: no cover - all layers are fed the same tokens
            raise RuntimeError(f"layers disagree on the evicted entries: {sorted(removed)}")
        return removed.pop() if removed else 0

    def nbytes(self) -> int:
        """Bytes of K/V storage held across all layers (what eviction must make smaller)."""
        return sum(layer.nbytes() for layer in self.layers)

    def num_entries(self, layer_idx: int = 0) -> int:
        """Entries physically stored in one layer (all layers hold the same positions)."""
        return self.layers[layer_idx].num_entries if layer_idx < len(self.layers) else 0

    def positions(self, layer_idx: int = 0) -> torch.Tensor:
        """Logical positions of the entries stored in one layer, increasing."""
        layer = self.layers[layer_idx]
        return layer.positions if layer.is_initialized else torch.zeros(0, dtype=torch.long)

    @property
    def seen_tokens(self) -> int:
        return max((layer.seen_tokens for layer in self.layers), default=0)


# -- the decode attention function --------------------------------------------------------------
def memento_decode_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    *,
    memento_cache: EvictingCache | None = None,
    **kwargs,
):
    """HF attention function over an :class:`EvictingCache`.

    ``query [B, Hq, T, D]`` (the new tokens), ``key/value [B, Hkv, L, D]`` (every cached entry,
    the new ones included). Query ``i`` sees cached entry ``j`` iff ``k_pos[j] <= q_pos[i]`` (and
    ``q_pos[i] - k_pos[j] < sliding_window`` on sliding layers), all in logical positions.
    Returns ``([B, T, Hq, D], None)``.
    """
    if memento_cache is None:
        raise ValueError(
            "memento_decode needs the evicting cache: call model(..., past_key_values=cache, memento_cache=cache)"
        )
    if dropout:
        raise ValueError("attention dropout is not supported while decoding; call model.eval()")
    layer = memento_cache.layers[module.layer_idx]
    k_pos, q_pos = layer.positions, layer.query_positions
    if k_pos is None or key.shape[-2] != k_pos.numel() or q_pos.numel() != query.shape[-2]:
        raise ValueError(
            "memento_decode got keys that are not the evicting cache's entries: pass the same EvictingCache "
            "as past_key_values and memento_cache"
        )
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask = mask & ((q_pos[:, None] - k_pos[None, :]) < sliding_window)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask.to(query.device), scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register_decode_attention() -> str:
    """Register ``memento_decode`` (attention + a no-op mask builder) with transformers; returns the name."""
    return register_hf_attention(DECODE_ATTN, memento_decode_attention)


@contextmanager
def attn_implementation_set(model, name: str):
    """Temporarily switch ``model`` to attention implementation ``name`` (restored on exit).

    The decoder switches per forward so that a model shared with a training loop (e.g. RL: the
    policy being trained also produces rollouts) is never left in decode mode.
    """
    previous = model.config._attn_implementation
    if previous == name:
        yield model
        return
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)

