"""Physical KV compaction inside vLLM's paged cache, for any attention backend's cache layout.

A request's cache is a list of blocks; physical slot ``s`` is offset ``s % block_size`` of block
``block_ids[s // block_size]``. Evicting physical ranges moves every later slot down so the live
entries stay contiguous (``seq_lens`` shrink, RoPE positions stay logical), after which the tail
blocks are freed.

Where a slot's K and V elements sit inside a block is the backend's business: vLLM's CPU backend
stores keys transposed per block (``[head_dim, block_size]``) and values row-major, FlashAttention
uses ``[2, blocks, block_size, heads, dim]``, AMX packs pairs. Rather than hard-code layouts,
:func:`probe_slot_offsets` writes id-coded keys and values through the backend's own
``do_kv_cache_update`` into one block at start-up and reads where each element landed. A copy is
then a gather/scatter of element offsets, exact for every layout the backend can write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Integers that a dtype represents exactly (digit values are written as 1..BASE).
_DIGIT_BASE = {torch.float32: 1 << 22, torch.float16: 1 << 10, torch.bfloat16: 1 << 7}


@dataclass
class SlotLayout:
    """Element offsets of each slot of a block, relative to the block's first element."""

    block_dim: int
    block_stride: int  # elements between block b and b + 1
    offsets: torch.Tensor  # int64 [block_size, elements per slot], in (K|V, head, dim) order

    @property
    def block_size(self) -> int:
        return int(self.offsets.shape[0])

    def element_bytes(self, dtype: torch.dtype) -> int:
        return int(self.offsets.shape[1]) * torch.empty((), dtype=dtype).element_size()


def find_block_dim(kv: torch.Tensor, num_blocks: int, backend_shape=None) -> int:
    """The dimension of ``kv`` that indexes blocks.

    ``backend_shape(num_blocks) -> shape`` (the backend's ``get_kv_cache_shape``) disambiguates when
    another dimension happens to have ``num_blocks`` entries too.
    """
    dims = [d for d, n in enumerate(kv.shape) if n == num_blocks]
    if len(dims) == 1:
        return dims[0]
    if backend_shape is not None:
        a, b = backend_shape(num_blocks + 3), backend_shape(num_blocks + 5)
        changed = [d for d, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(changed) == 1:
            return changed[0]
    raise RuntimeError(
        f"cannot tell which dimension of the KV cache tensor {tuple(kv.shape)} indexes its {num_blocks} blocks"
    )


def probe_slot_offsets(
    write, kv: torch.Tensor, block_dim: int, block_size: int, num_kv_heads: int, head_size: int, probe_block: int = 0
) -> SlotLayout:
    """Find where each slot's K/V elements live by writing id-coded values through the backend.

    ``write(key, value, slot_mapping)`` must store ``key``/``value`` (``[tokens, heads, dim]``) into
    ``kv`` at the given slots (the backend's ``do_kv_cache_update``). ``probe_block`` is zeroed before
    and after; call this before the cache holds any request.
    """
    dtype = kv.dtype
    if dtype not in _DIGIT_BASE:
        raise RuntimeError(
            f"KV compaction supports float32/float16/bfloat16 caches, not {dtype} (an fp8 "
            "kv_cache_dtype cannot be probed exactly); use kv_cache_dtype='auto'"
        )
    base = _DIGIT_BASE[dtype]
    view = kv.select(block_dim, probe_block)
    per_slot = 2 * num_kv_heads * head_size
    n = block_size * per_slot
    ids = torch.arange(n, dtype=torch.int64).view(block_size, 2, num_kv_heads, head_size)
    slots = torch.arange(block_size, device=kv.device, dtype=torch.int64) + probe_block * block_size
    found: np.ndarray | None = None
    decoded = np.zeros(0, dtype=np.int64)
    scale, passes = 1, 0
    while scale < n or passes == 0:
        digits = (ids // scale) % base + 1
        view.zero_()
        write(digits[:, 0].to(device=kv.device, dtype=dtype), digits[:, 1].to(device=kv.device, dtype=dtype), slots)
        vals = view.reshape(-1).float().cpu().numpy()
        where = np.flatnonzero(vals)
        if found is None:
            found, decoded = where, np.zeros(len(where), dtype=np.int64)
        elif not np.array_equal(found, where):
            raise RuntimeError("the KV cache layout is not stable across writes; cannot compact it")
        decoded += (np.rint(vals[where]).astype(np.int64) - 1) * scale
        scale *= base
        passes += 1
    view.zero_()
    if found is None or len(found) != n or not np.array_equal(np.sort(decoded), np.arange(n)):
        raise RuntimeError(
            f"probing the KV cache layout found {0 if found is None else len(found)} of {n} "
            "elements of a block; this attention backend's cache cannot be compacted"
        )
    coords = np.unravel_index(found, tuple(view.shape))
    offsets = sum(c.astype(np.int64) * s for c, s in zip(coords, view.stride()))
    by_id = np.empty(n, dtype=np.int64)
    by_id[decoded] = offsets
    return SlotLayout(
        block_dim=block_dim,
        block_stride=int(kv.stride(block_dim)),
        offsets=torch.from_numpy(by_id.reshape(block_size, per_slot)).to(kv.device),
    )


def compaction_moves(removed: Sequence[tuple[int, int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, destination) physical slots that close the ``removed`` ranges of a ``length`` cache."""
    if not removed:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    keep = np.ones(length, dtype=bool)
    for a, b in removed:
        keep[a:b] = False
    first = removed[0][0]
    src = np.flatnonzero(keep[first:]) + first
    return src, np.arange(first, first + len(src), dtype=np.int64)


def move_slots(
    kv: torch.Tensor, layout: SlotLayout, block_ids: Sequence[int], src: np.ndarray, dst: np.ndarray
) -> None:
    """Copy physical slots ``src`` to ``dst`` of one request (blocks ``block_ids``) in cache ``kv``.

    All sources are read before any destination is written, so overlapping moves are safe.
    """
    if len(src) == 0:
        return
    device = kv.device
    blocks = torch.as_tensor(np.asarray(block_ids, dtype=np.int64), device=device)
    bs = layout.block_size
    s, d = torch.from_numpy(src).to(device), torch.from_numpy(dst).to(device)
    base = kv.storage_offset()
    src_addr = (base + blocks[s // bs] * layout.block_stride)[:, None] + layout.offsets[s % bs]
    dst_addr = (base + blocks[d // bs] * layout.block_stride)[:, None] + layout.offsets[d % bs]
    storage = kv.as_strided((kv.untyped_storage().nbytes() // kv.element_size(),), (1,), 0)
    storage[dst_addr.reshape(-1)] = storage[src_addr.reshape(-1)]
