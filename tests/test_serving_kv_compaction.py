"""Slot moves in a paged KV cache whose layout is found by probing the backend's write path: after a
compaction, every kept slot holds exactly what writing its K/V at the new slot would have stored.
Checked on vLLM's CPU attention kernels (keys transposed per block) and on layouts written in plain
torch (FlashAttention's ``[2, blocks, block_size, heads, dim]``, a block-in-the-middle layout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memento_train.serving.kv_compaction import compaction_moves, find_block_dim, move_slots, probe_slot_offsets

BS, H, D, NB = 32, 2, 32, 5
BLOCKS = [3, 1, 4]  # a request's blocks, out of order


def _flash_layout():
    kv = torch.zeros(2, NB, BS, H, D)

    def write(k, v, slots):
        kv[0, slots // BS, slots % BS] = k
        kv[1, slots // BS, slots % BS] = v

    return kv, write, 1


def _heads_outer_layout():  # [H, blocks, 2, D, BS]: the block dimension in the middle, keys transposed
    kv = torch.zeros(H, NB, 2, D, BS, dtype=torch.bfloat16)

    def write(k, v, slots):
        for i, s in enumerate(slots.tolist()):
            kv[:, s // BS, 0, :, s % BS] = k[i]
            kv[:, s // BS, 1, :, s % BS] = v[i]

    return kv, write, 1


def _cpu_layout(dtype, isa):
    ops = pytest.importorskip("vllm._custom_ops", reason="vLLM's CPU kernels are not installed")
    kv = torch.zeros(NB, H, BS, 2 * D, dtype=dtype)

    def write(k, v, slots):
        key_cache, value_cache = kv.view(NB, H, BS * 2, D).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)

    return kv, write, 0


LAYOUTS = {
    "flash-attn": _flash_layout,
    "block-in-the-middle-bf16": _heads_outer_layout,
    "vllm-cpu-vec-fp32": lambda: _cpu_layout(torch.float32, "vec"),
    "vllm-cpu-vec-bf16": lambda: _cpu_layout(torch.bfloat16, "vec"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compaction_equals_writing_the_kept_slots_again(layout):
    kv, write, block_dim = LAYOUTS[layout]()
    assert find_block_dim(kv, NB) == block_dim
    slot_layout = probe_slot_offsets(write, kv, block_dim, BS, H, D)
    length, removed = 90, [(5, 20), (33, 34), (60, 64)]  # across block boundaries
    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(length, H, D, generator=g).to(kv.dtype) for _ in range(2))
    slots = torch.tensor([BLOCKS[i // BS] * BS + i % BS for i in range(length)])
    write(keys, values, slots)
    src, dst = compaction_moves(removed, length)
    move_slots(kv, slot_layout, BLOCKS, src, dst)
    keep = [i for i in range(length) if not any(a <= i < b for a, b in removed)]
    expected, write_expected, _ = LAYOUTS[layout]()  # the kept entries written at their new slots
    write_expected(keys[keep], values[keep], slots[: len(keep)])
    flat, ref_flat = kv.reshape(-1), expected.reshape(-1)
    for i in range(len(keep)):
        addr = BLOCKS[i // BS] * slot_layout.block_stride + slot_layout.offsets[i % BS]
        assert torch.equal(flat[addr], ref_flat[addr]), i


def test_moves_close_the_removed_ranges():
    src, dst = compaction_moves([(2, 4), (6, 7)], 9)
    assert src.tolist() == [4, 5, 7, 8] and dst.tolist() == [2, 3, 4, 5]
    assert compaction_moves([], 5)[0].size == 0
    src, dst = compaction_moves([(7, 9)], 9)  # a removed suffix moves nothing
    assert src.size == 0 and dst.size == 0


def test_an_unprobeable_cache_is_refused_with_the_reason():
    kv = torch.zeros(NB, H, BS, 2 * D)
    with pytest.raises(RuntimeError, match="cannot be compacted"):
        probe_slot_offsets(lambda k, v, s: None, kv, 0, BS, H, D)  # a writer that stores nothing
    with pytest.raises(RuntimeError, match="fp8"):
        probe_slot_offsets(lambda k, v, s: None, kv.to(torch.int8), 0, BS, H, D)
    assert np.array_equal(compaction_moves([(0, 1)], 2)[0], [1])
