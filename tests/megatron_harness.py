"""Test-only helpers for the Megatron engine on CPU: gloo process groups, spawned workers, CPU shims.

Nothing here is imported by the package. The one CPU shim, :func:`cpu_stands_in_for_cuda`, patches
``torch.cuda.current_device`` to answer ``"cpu"``: Megatron allocates pipeline send/receive buffers
(and a few gather buffers) on ``torch.cuda.current_device()``, which has no CPU fallback. The model
itself needs no shim (its RoPE never touches CUDA).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
from synthetic_ids import ASSISTANT, BE, BS, ETHINK, IM_END, IM_START, NL, SE, SPECIAL, SS, THINK, USER


def megatron_skip_reason() -> str | None:
    """Why the megatron tests cannot run here, or None."""
    try:
        import megatron.core  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"megatron-core is not importable: {exc}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cpu_stands_in_for_cuda():
    """CPU-ONLY TEST SHIM for Megatron's pipeline code, which assumes CUDA:

    - ``torch.cuda.current_device()`` returns ``"cpu"`` (p2p send/receive buffers);
    - ``torch.zeros(..., device="cuda")`` allocates on CPU (the schedule's token counter);
    - ``torch.cuda.synchronize()`` does nothing (after batched p2p);
    - ``Tensor.cuda()`` is the identity (a tied model's last stage moves its embedding copy to CUDA
      before syncing it with the first stage).
    """
    zeros = torch.zeros

    def cpu_zeros(*args, device=None, **kwargs):
        return zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    with (
        mock.patch("torch.cuda.current_device", lambda: "cpu"),
        mock.patch("torch.cuda.synchronize", lambda *a, **k: None),
        mock.patch("torch.zeros", cpu_zeros),
        mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self),
    ):
        yield


@contextlib.contextmanager
def megatron_native_on_cpu():
    """CPU-ONLY TEST SHIM: run the megatron engine's CUDA path (Megatron's own DDP and distributed
    optimizer, torch AdamW inside as without TransformerEngine/Apex) on CPU tensors. On top of
    :func:`cpu_stands_in_for_cuda`:

    - the engine takes its native path (``uses_megatron_native``);
    - ``torch.tensor(..., device="cuda")`` allocates on CPU (the optimizer's overflow flag);
    - ``Tensor.type()`` names CPU tensors as CUDA ones (the optimizer accepts only
      ``torch.cuda.*Tensor`` parameters);
    - ``torch.cuda.set_device``, the TP CUDA RNG seeding and forking do nothing (initial weights are
      replaced by the HF ones anyway).
    """
    import megatron.core.tensor_parallel as tensor_parallel
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    from memento_train.engines import megatron as megatron_engine

    tensor, type_of = torch.tensor, torch.Tensor.type

    def cpu_tensor(*args, device=None, **kwargs):
        return tensor(*args, device="cpu" if device == "cuda" else device, **kwargs)

    def cuda_type(self, *args, **kwargs):
        name = type_of(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu":
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    with (
        cpu_stands_in_for_cuda(),
        mock.patch.object(megatron_engine, "uses_megatron_native", lambda device: True),
        mock.patch("torch.tensor", cpu_tensor),
        mock.patch.object(torch.Tensor, "type", cuda_type),
        mock.patch("torch.cuda.set_device", lambda device: None),
        mock.patch.object(tensor_parallel, "model_parallel_cuda_manual_seed", lambda seed: None),
        mock.patch.object(CudaRNGStatesTracker, "fork", lambda self, *a, **k: contextlib.nullcontext()),
    ):
        yield


@contextlib.contextmanager
def single_process_group():
    """A world-size-1 gloo group for in-process tests (reuses one that exists; tears down its own)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        destroy_megatron_state()
        if created:
            dist.destroy_process_group()


def destroy_megatron_state() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        with cpu_stands_in_for_cuda():
            result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_megatron_state()
        dist.destroy_process_group()


def run_workers(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned gloo ranks; returns each rank's result (rank order).

    ``fn`` must be importable by name (a module-level function) and return CPU tensors / plain data.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), fn, args, out_dir),
            nprocs=world_size,
            start_method="spawn",
            join=True,
        )
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# -- data -------------------------------------------------------------------------------------------
def memento_batch(seed: int = 0, *, keep_last_n_blocks: int = 0, mask_delimiters: bool = False):
    """``(input_ids, position_ids, meta)``: three packed ChatML Memento documents (~30 tokens each)
    with complete blocks, so the mask really evicts (asserted)."""
    from memento_train.attention import MementoAttentionMeta
    from memento_train.masking import BlockMaskingConfig, parse

    rng = np.random.default_rng(seed)

    def words(n):
        return rng.integers(20, 128, size=n).tolist()

    docs = []
    for blocks in ([5, 4], [6, 3, 4], [4]):
        ids = [IM_START, USER, NL, *words(3), IM_END, NL, IM_START, ASSISTANT, NL, THINK]
        for b in blocks:
            ids += [BS, *words(b), BE, SS, *words(2), SE]
        ids += [ETHINK, *words(3), IM_END]
        docs.append(ids)
    cfg = BlockMaskingConfig(keep_last_n_blocks=keep_last_n_blocks, mask_delimiters=mask_delimiters)
    parsed = [parse(d, SPECIAL, cfg) for d in docs]
    assert any(p.evictions for p in parsed), "the batch must evict something"
    meta = MementoAttentionMeta.from_documents([p.kill_row for p in parsed])
    input_ids = torch.tensor([t for d in docs for t in d])
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])
    return input_ids, position_ids, meta


def micro_batches(seeds, **mask):
    """One :class:`MicroBatch` per seed, with next-token ``labels`` (``-100`` at document ends)."""
    from memento_train.engines import MicroBatch

    out = []
    for s in seeds:
        ids, pos, meta = memento_batch(s, **mask)
        labels = torch.roll(ids, -1)
        labels[meta.cu_seqlens[1:].long() - 1] = -100
        out.append(MicroBatch(input_ids=ids, position_ids=pos, meta=meta, extras={"labels": labels}))
    return out
