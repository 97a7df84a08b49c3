"""A ragged, batched KV cache that physically frees evicted entries, and its HF attention function.

What the serving engine does when a memento block is evicted: the block's K/V entries are dropped
from storage while every remaining entry keeps the *logical* position it was written at (RoPE was
applied with it; nothing is re-rotated). Every sequence (row) keeps its own compacted entries; per
layer the cache stores ``keys``/``values`` ``[B, Hkv, C, D]`` and, shared
by all layers (they hold the same tokens), the logical position of every slot ``positions [B, C]``
(``-1``: an empty padding slot). Row ``b`` uses slots ``0 .. lengths[b]-1`` in increasing logical
position; ``C`` is at least the longest row.

- :meth:`BatchedEvictingCache.prepare_inputs` takes ragged per-row tokens (and logical positions),
  returns left-padded ``input_ids``/``position_ids`` for one forward and plans where the new entries go;
- the model's forward appends them (``Cache.update``), growing ``C`` by ``growth`` spare slots when a
  row runs out, and ``memento_decode_batched`` attends each new query to the valid entries of its own
  row whose logical position is ``<=`` its own (``q_pos - k_pos < window`` on sliding layers, in
  logical positions, exactly like the training mask; the cache never truncates by count);
- :meth:`evict` queues per-row logical spans, :meth:`compact` drops them: every row is compacted with
  one gather into *new* tensors trimmed to the longest live row (plus fewer than ``growth`` spare
  slots), so the freed memory is really released (``nbytes`` reports allocated storage);
  :meth:`select` (finished rows leave) and :meth:`extend` (new rows join) keep the same invariants.

Usage::

    register_batched_decode_attention()
    cache = BatchedEvictingCache(config=model.config)
    ids, pos = cache.prepare_inputs(token_rows, position_rows)
    with attn_implementation_set(model, BATCHED_DECODE_ATTN):
        model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, memento_cache=cache)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from memento_train.attention.hf import register_hf_attention

BATCHED_DECODE_ATTN = "memento_decode_batched"


class BatchedEvictingLayer(CacheLayerMixin):
    """One layer's ``keys``/``values`` ``[B, Hkv, C, D]``; slot bookkeeping lives in the parent cache."""

    is_sliding = False  # sliding windows are masked by logical distance, never truncated by count
    is_compileable = False
    is_croppable = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - the cache calls write
        raise RuntimeError("BatchedEvictingLayer is written through BatchedEvictingCache.update")

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, cache: BatchedEvictingCache):
        """Store the planned new entries of ``key_states``/``value_states`` ``[B, Hkv, T, D]``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.shape[0] != key_states.shape[0]:
            raise ValueError(f"cache holds {self.keys.shape[0]} rows but the forward has {key_states.shape[0]}")
        if self.keys.shape[2] < cache.capacity:  # grow (fresh storage; old tensors are released)
            self.keys = _pad_slots(self.keys, cache.capacity)
            self.values = _pad_slots(self.values, cache.capacity)
        b_idx, t_idx, s_idx = cache._plan
        self.keys[b_idx, :, s_idx] = key_states[b_idx, :, t_idx]
        self.values[b_idx, :, s_idx] = value_states[b_idx, :, t_idx]
        return self.keys, self.values

    def gather_slots(self, index: torch.Tensor) -> None:
        """Keep slots ``index [B, C']`` of every row (fresh, exactly sized storage)."""
        if self.is_initialized:
            b, h, _, d = self.keys.shape
            self.keys = self.keys.gather(2, index[:, None, :, None].expand(b, h, -1, d))
            self.values = self.values.gather(2, index[:, None, :, None].expand(b, h, -1, self.values.shape[-1]))

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else int(self.keys.shape[2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 4.x's abstract name for get_max_length
        return -1


def _pad_slots(t: torch.Tensor, capacity: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, capacity - t.shape[2]))


class BatchedEvictingCache(Cache):
    """Ragged per-row K/V with logical positions; rows evict, leave and join independently.

    ``growth``: spare slots added whenever a row outgrows the tensors (one reallocation per
    ``growth`` decode steps); :meth:`compact` and :meth:`select` reallocate to the longest remaining
    row plus the spare slots the longest row had (fewer than ``growth``).
    """

    def __init__(self, num_layers: int | None = None, *, config=None, growth: int = 64) -> None:
        if config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is None:
            raise ValueError("BatchedEvictingCache needs num_layers or the model config")
        if growth < 0:
            raise ValueError(f"growth must be >= 0 spare slots, got {growth}")
        super().__init__(layers=[BatchedEvictingLayer() for _ in range(num_layers)])
        self.growth = int(growth)  # 0: storage always exactly the live entries (one realloc per append)
        self.positions: torch.Tensor | None = None  # int64 [B, C], -1 = empty slot
        self.lengths: list[int] = []  # live entries per row (host copy, no device sync needed)
        self.next_pos: list[int] = []  # logical position after each row's newest entry
        self._plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._q_pos: torch.Tensor | None = None
        self._q_valid: torch.Tensor | None = None  # None: every query slot is a real token
        self._masks: dict = {}
        self._pending: list[tuple[int, int, int]] = []

    # -- shapes ----------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return 0 if self.positions is None else int(self.positions.shape[1])

    # -- one forward -----------------------------------------------------------------------------
    def prepare_inputs(
        self,
        tokens: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]] | None = None,
        *,
        device: torch.device | str | None = None,
        pad_token_id: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan one forward: row ``b`` appends ``tokens[b]`` at logical ``positions[b]`` (default: the
        next ones after the row's newest entry). Rows may differ in length (left padding; the last
        token of every row is in the last column, so ``logits[:, -1]`` is each row's next-token
        logits). Returns ``(input_ids, position_ids)`` ``[B, T]``.
        """
        if self.positions is None:
            dev = torch.device(device) if device is not None else torch.device("cpu")
            self.positions = torch.full((len(tokens), 0), -1, dtype=torch.long, device=dev)
            self.lengths = [0] * len(tokens)
            self.next_pos = [0] * len(tokens)
        if len(tokens) != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows but {len(tokens)} token rows were given")
        dev = self.positions.device
        if positions is None:
            positions = [range(self.next_pos[b], self.next_pos[b] + len(t)) for b, t in enumerate(tokens)]
        width = max((len(t) for t in tokens), default=0)
        ids = [[pad_token_id] * (width - len(t)) + [int(x) for x in t] for t in tokens]
        pos = [[0] * (width - len(p)) + [int(x) for x in p] for p in positions]
        b_idx, t_idx, s_idx = [], [], []
        for b, (t, p) in enumerate(zip(tokens, positions)):
            if len(t) != len(p):
                raise ValueError(f"row {b}: {len(t)} tokens but {len(p)} positions")
            if len(p) and (int(p[0]) < self.next_pos[b] or any(q1 <= q0 for q0, q1 in zip(p, p[1:]))):
                raise ValueError(f"row {b}: logical positions must increase past the cached ones, got {list(p)[:8]}")
            if len(p):
                self.next_pos[b] = int(p[-1]) + 1
            b_idx += [b] * len(t)
            t_idx += range(width - len(t), width)
            s_idx += range(self.lengths[b], self.lengths[b] + len(t))
            self.lengths[b] += len(t)
        need = max(self.lengths, default=0)
        if need > self.capacity:
            self.positions = F.pad(self.positions, (0, need + self.growth - self.capacity), value=-1)
        self._plan = tuple(torch.tensor(x, dtype=torch.long, device=dev) for x in (b_idx, t_idx, s_idx))
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        position_ids = torch.tensor(pos, dtype=torch.long, device=dev)
        self.positions[self._plan[0], self._plan[2]] = position_ids[self._plan[0], self._plan[1]]
        ragged = any(len(t) != width for t in tokens)
        self._q_valid = None
        if ragged:
            self._q_valid = torch.zeros(len(tokens), width, dtype=torch.bool, device=dev)
            self._q_valid[self._plan[0], self._plan[1]] = True
        self._q_pos = position_ids
        self._masks = {}
        return input_ids, position_ids

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._plan is None:
            raise ValueError("call BatchedEvictingCache.prepare_inputs before the forward")
        return self.layers[layer_idx].write(key_states, value_states, self)

    def attention_mask(self, window: int | None) -> torch.Tensor:
        """``[B, 1, T, C]`` bool: query ``t`` of row ``b`` sees slot ``j`` of row ``b`` (memoised per forward)."""
        mask = self._masks.get(window)
        if mask is None:
            k_pos = self.positions[:, None, :]
            q_pos = self._q_pos[:, :, None]
            valid = k_pos >= 0
            mask = valid & (k_pos <= q_pos)
            if window is not None:
                mask = mask & (q_pos - k_pos < window)
            if self._q_valid is not None:  # padding queries see every valid key: no all-masked rows
                mask = torch.where(self._q_valid[:, :, None], mask, valid)
            mask = mask[:, None]
            self._masks[window] = mask
        return mask

    # -- eviction, leaving and joining rows ------------------------------------------------------
    def evict(self, row: int, start: int, stop: int) -> None:
        """Queue dropping row ``row``'s entries at logical positions ``[start, stop)`` (see :meth:`compact`)."""
        self._pending.append((int(row), int(start), int(stop)))

    def compact(self) -> int:
        """Apply queued evictions: rows are compacted and the tensors trimmed to the longest live row
        (plus the spare slots it had, fewer than ``growth``: no reallocation on the next append).

        Returns the number of entries dropped (per layer, all rows). Absent positions are ignored.
        """
        if not self._pending or self.positions is None:
            self._pending = []
            return 0
        pos = self.positions
        drop = torch.zeros_like(pos, dtype=torch.bool)
        for row, start, stop in self._pending:
            drop[row] |= (pos[row] >= start) & (pos[row] < stop)
        self._pending = []
        keep = (pos >= 0) & ~drop
        new_lengths = keep.sum(1).tolist()
        dropped = sum(self.lengths) - sum(new_lengths)
        if dropped:
            self._reindex(torch.argsort((~keep).to(torch.int8), dim=1, stable=True), new_lengths)
        return dropped

    def _trimmed_capacity(self, new_lengths: Sequence[int]) -> int:
        """The longest of ``new_lengths`` plus the spare slots the longest row has now."""
        spare = max(0, min(self.capacity - max(self.lengths, default=0), self.growth))
        return max(new_lengths, default=0) + spare

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order; repeats allowed), trimmed to the longest one (+ spare slots)."""
        if self._pending:
            raise RuntimeError("compact() queued evictions before selecting rows (row indices would shift)")
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.positions.device)
        lengths = [self.lengths[r] for r in rows]
        cap = self._trimmed_capacity(lengths)
        self.positions = self.positions[index, :cap]
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys[index, :, :cap]
                layer.values = layer.values[index, :, :cap]
        self.lengths = lengths
        self.next_pos = [self.next_pos[r] for r in rows]
        self._masks, self._plan = {}, None

    def extend(self, other: BatchedEvictingCache) -> None:
        """Append ``other``'s rows after this cache's rows (``other`` is consumed)."""
        if other.positions is None:
            return
        if self.positions is None:
            self.positions, self.lengths, self.next_pos = other.positions, list(other.lengths), list(other.next_pos)
            self.layers = other.layers
            return
        cap = max(self.capacity, other.capacity)
        self.positions = torch.cat(
            [F.pad(p, (0, cap - p.shape[1]), value=-1) for p in (self.positions, other.positions)]
        )
        for mine, theirs in zip(self.layers, other.layers):
            if not theirs.is_initialized:
                continue
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys[:0], theirs.values[:0])
            mine.keys = torch.cat([_pad_slots(mine.keys, cap), _pad_slots(theirs.keys, cap)])
            mine.values = torch.cat([_pad_slots(mine.values, cap), _pad_slots(theirs.values, cap)])
        self.lengths = self.lengths + list(other.lengths)
        self.next_pos = self.next_pos + list(other.next_pos)
        self._masks, self._plan = {}, None

    def _reindex(self, order: torch.Tensor, new_lengths: list[int]) -> None:
        cap = self._trimmed_capacity(new_lengths)
        index = order[:, :cap].contiguous()  # slots past a row's length hold dropped/empty ones: marked -1
        positions = self.positions.gather(1, index)
        live = torch.arange(cap, device=index.device)[None, :] < torch.tensor(new_lengths, device=index.device)[:, None]
        self.positions = positions.masked_fill(~live, -1)
        for layer in self.layers:
            layer.gather_slots(index)
        self.lengths = list(new_lengths)
        self._masks = {}

    # -- accounting ------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of K/V storage allocated across layers (all rows, padding slots included)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_entry(self) -> int:
        """K+V bytes one token occupies across all layers, in the cache's actual dtype."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                k, v = layer.keys, layer.values
                total += (k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3]) * k.element_size()
        return total

    def row_positions(self, row: int) -> list[int]:
        """Logical positions of a row's live entries, increasing."""
        return self.positions[row, : self.lengths[row]].tolist()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity


# -- the decode attention function --------------------------------------------------------------
def batched_decode_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    *,
    memento_cache: BatchedEvictingCache | None = None,
    **kwargs,
):
    """HF attention over a :class:`BatchedEvictingCache`: ``query [B, Hq, T, D]`` → ``[B, T, Hq, D]``.

    Row ``b``'s query at logical position ``q`` sees the valid slots of row ``b`` with ``k_pos <= q``
    (and ``q - k_pos < sliding_window`` on sliding layers).
    """
    if not isinstance(memento_cache, BatchedEvictingCache):
        raise ValueError(
            f"{BATCHED_DECODE_ATTN} needs the batched cache: call "
            "model(..., past_key_values=cache, memento_cache=cache) with a BatchedEvictingCache"
        )
    if dropout:
        raise ValueError("attention dropout is not supported while decoding; call model.eval()")
    mask = memento_cache.attention_mask(sliding_window)
    if key.shape[2] != mask.shape[-1] or query.shape[2] != mask.shape[-2]:
        raise ValueError(
            "keys are not the batched cache's slots: pass the same cache as past_key_values and memento_cache"
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def register_batched_decode_attention() -> str:
    """Register ``memento_decode_batched`` (attention + no-op mask builder) with transformers."""
    return register_hf_attention(BATCHED_DECODE_ATTN, batched_decode_attention)
