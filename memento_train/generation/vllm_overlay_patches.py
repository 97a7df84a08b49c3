"""Runtime fixes for vLLM 0.13 + Microsoft's Memento overlay, loaded *inside* vLLM's engine processes.

This module imports vLLM internals at import time, so only vLLM imports it: VLLMEngine passes
``scheduler_cls`` (:class:`MementoOverlayScheduler`) and ``worker_extension_cls``
(:class:`MementoOverlayWorkerExtension`) as qualified names (see :mod:`.vllm_overlay`), and vLLM
resolves them in the engine-core process and in every worker process. Importing the module installs
the worker-side patches once (:func:`install_worker_patches`); vLLM's own extension points carry the
scheduler change, so nothing here replaces a vLLM or overlay file. The overlay itself (MIT-licensed
third-party code) is installed by the user; nothing of it is copied here.

What is fixed, and why:

1. Livelock on prompts that hold finished blocks (multi-turn histories): the overlay's scheduler asks
   the model runner to skip sampling at the end of such a prefill so that it can compact the prompt's
   blocks first; afterwards no token is left to schedule and the request is never scheduled again.
   :class:`MementoOverlayScheduler` never skips sampling. The first token is then sampled from the
   prefill's logits (the prompt blocks still visible) and the overlay's own first-token path compacts
   the prompt blocks before that token is fed: the evicted keys get kill row ``prompt_len``, the rule
   in ``memento_train.masking`` (docs/architecture.md §2).
2. One step that compacts twice (a multi-turn prompt holding several finished blocks) keeps only the
   last compaction's copy list (the overlay assigns instead of appending), so the KV of every block
   after the first evicted one is wrong. :class:`MementoOverlayScheduler` concatenates the lists.
3. The overlay's KV compaction copy knows only the FlashAttention/FlashInfer cache layouts. vLLM's CPU
   backend stores ``[2, blocks, kv_heads, block_size, head_dim]`` and its kernels keep each block's
   keys transposed (and the layout depends on the kernel ISA), so the overlay's copy indexes the head
   axis with a slot offset: an ``IndexError`` or, for small offsets, silently wrong data.
   :func:`cpu_execute_kv_copy_operations` copies slot by slot through a per-layout index map that it
   learns once from the CPU cache-write kernel itself (:func:`cpu_slot_layout`).
4. Seeded sampling with chunked prefill crashes vLLM 0.13 on CPU: a request whose prefill spans steps
   has its sample discarded, and vLLM rewinds its seeded generator with ``set_offset``, which CPU
   generators lack ("CPU Generator does not use offset"; the engine dies). On CPU the patched model
   runner restores the generator's state around the discarded draw instead (the same stream as a
   request that was never chunked).
5. Engine measurements: the scheduler forwards each executed eviction ``(row, start, stop)`` with the
   step that performs its KV copy, and the model runner records, per request and per sampled step,
   the physical KV length the attention kernel reads (``seq_lens``). VLLMEngine drains both with
   ``collective_rpc("memento_drain_engine_log", ...)`` and reports them instead of simulating them.

(``compilation_config={"custom_ops": ["-rms_norm"]}`` on CPU, the third workaround, is an engine
argument; :mod:`.vllm_overlay` sets it.)
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from memento_train.generation.vllm_overlay import sequential_chunks

PATCH_VERSION = 2  # bumped when the patch set changes; `memento-vllm doctor` prints it
EVICTIONS_ATTR = "memento_evictions"  # SchedulerOutput attribute: {req_id: [(row, start, stop), ...]}
_MAX_FINISHED_LOGS = 4096  # engine logs kept for requests nobody drained (bounded memory)


class MementoOverlayScheduler(Scheduler):
    """The overlay's scheduler with fixes 1 and 2 and eviction reporting (5); everything else inherited."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._memento_pending_events: dict[str, list[tuple[int, int, int]]] = {}

    def schedule(self) -> Any:
        out = super().schedule()
        # Fix 1: sample at the end of every prefill; the overlay then compacts the prompt's blocks in
        # `_update_request_with_output` before the first generated token is appended (and fed).
        out.skip_sampling_req_ids = None
        # Evictions recorded since the last step travel with the step that copies their KV.
        setattr(out, EVICTIONS_ATTR, self._memento_pending_events)
        self._memento_pending_events = {}
        return out

    def mask_token_span(self, request_id: str, start_position: int, end_position: int) -> Any:
        # Fix 2: the overlay *assigns* each compaction's copy list to pending_kv_copy_operations[req], so
        # when one step compacts twice (a multi-turn prompt with several finished blocks) the first
        # list is lost and the second, which assumes the first already ran, copies the wrong slots.
        earlier = self.pending_kv_copy_operations.pop(request_id, None)
        result = super().mask_token_span(request_id, start_position, end_position)
        if earlier:
            self.pending_kv_copy_operations[request_id] = [
                *earlier,
                *self.pending_kv_copy_operations.get(request_id, []),
            ]
        request = self.requests.get(request_id)
        if request is not None and getattr(result, "success", False):
            # Row = the logical position of the token whose input step first misses the span: the
            # just-appended summary_end (or block_start), or prompt_len for the prompt's blocks,
            # which the overlay compacts before the first generated token is appended.
            row = request.num_tokens - 1 if request.output_token_ids else request.num_tokens
            self._memento_pending_events.setdefault(request_id, []).append(
                (int(row), int(start_position), int(end_position))
            )
        return result

    def _free_request(self, request: Any) -> Any:
        # An eviction triggered by a finished request's last token never affects a forward.
        self._memento_pending_events.pop(request.request_id, None)
        return super()._free_request(request)


class MementoOverlayWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); importing this module patches the
    model runner. Its method is called by name through ``LLM.collective_rpc``."""

    def memento_drain_engine_log(self, request_ids: list[str]) -> dict[str, dict[str, list]]:
        """Pop the engine log of each request: ``{"kv_trace": [...], "evictions": [[row, start, stop]]}``."""
        logs = _engine_log(self.model_runner)
        return {rid: logs.pop(rid) for rid in request_ids if rid in logs}

    def memento_patch_version(self) -> int:
        return PATCH_VERSION


# -- model-runner side -------------------------------------------------------------------------------
def _engine_log(runner: Any) -> OrderedDict:
    logs = runner.__dict__.get("_memento_engine_log")
    if logs is None:
        logs = runner.__dict__["_memento_engine_log"] = OrderedDict()
    return logs


def _request_log(runner: Any, req_id: str) -> dict[str, list]:
    logs = _engine_log(runner)
    entry = logs.get(req_id)
    if entry is None:
        entry = logs[req_id] = {"kv_trace": [], "evictions": []}
        while len(logs) > _MAX_FINISHED_LOGS:
            logs.popitem(last=False)
    return entry


def _recording_update_states(original):
    @functools.wraps(original)
    def _update_states(self, scheduler_output):
        for req_id, events in (getattr(scheduler_output, EVICTIONS_ATTR, None) or {}).items():
            _request_log(self, req_id)["evictions"].extend([list(e) for e in events])
        return original(self, scheduler_output)

    return _update_states


def _recording_prepare_inputs(original):
    @functools.wraps(original)
    def _prepare_inputs(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        n = self.input_batch.num_reqs
        seq_lens, discard = self.seq_lens.np[:n], self.discard_request_mask.np[:n]
        for i, req_id in enumerate(self.input_batch.req_ids[:n]):
            if not discard[i]:  # a step that samples this request's next token
                _request_log(self, req_id)["kv_trace"].append(int(seq_lens[i]))
        return out

    return _prepare_inputs


@functools.cache
def cpu_slot_layout(
    isa: str, dtype: torch.dtype, num_kv_heads: int, block_size: int, head_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat in-block element indices of each slot in the CPU backend's key and value caches.

    Returns ``(key_index, value_index)``, each ``[block_size, num_kv_heads * head_size]``: row ``s``
    lists, in one consistent order, where the CPU cache-write kernel puts slot ``s``'s elements inside a
    block. Learned by writing probes with ``cpu_attn_reshape_and_cache`` (so every ISA layout is
    handled, transposed or packed) and checked by writing the same random token into every slot.
    """
    from vllm import _custom_ops as ops

    def write(slot_values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        kc = torch.zeros(1, num_kv_heads, block_size, head_size, dtype=dtype)
        vc = torch.zeros_like(kc)
        for s, val in enumerate(slot_values):
            if val is not None:
                ops.cpu_attn_reshape_and_cache(val, val, kc, vc, torch.tensor([s], dtype=torch.int64), isa)
        return kc.reshape(-1), vc.reshape(-1)

    ones = torch.ones(1, num_kv_heads, head_size, dtype=dtype)
    key_rows, value_rows = [], []
    for s in range(block_size):
        kc, vc = write([None] * s + [ones])
        key_rows.append(kc.nonzero().flatten())
        value_rows.append(vc.nonzero().flatten())
    width = num_kv_heads * head_size
    if any(r.numel() != width for r in key_rows + value_rows):
        raise RuntimeError(f"vLLM CPU KV layout (isa={isa}, {dtype}) is not one element per slot and head dim")
    key_index, value_index = torch.stack(key_rows), torch.stack(value_rows)
    token = torch.randn(1, num_kv_heads, head_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    kc, vc = write([token] * block_size)
    if not (bool((kc[key_index] == kc[key_index[:1]]).all()) and bool((vc[value_index] == vc[value_index[:1]]).all())):
        raise RuntimeError(
            f"vLLM CPU KV layout (isa={isa}, {dtype}) is not slot-separable; KV compaction cannot copy slots safely"
        )
    return key_index, value_index


def cpu_execute_kv_copy_operations(self, kv_copy_operations: dict[str, list[tuple[int, int, int, int]]]) -> None:
    """Layout-aware replacement of the overlay's ``_execute_kv_copy_operations`` for vLLM's CPU backend.

    Each op ``(src_block, src_offset, dst_block, dst_offset)`` moves one token's keys and values, with
    the result of running them in order (:func:`sequential_chunks`; a compaction moves tokens towards
    the front, so its ops usually form one vectorised run, and a second compaction starts another).
    """
    ops = [op for per_request in kv_copy_operations.values() for op in per_request]
    if not ops or not self.kv_caches:
        return
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    runs = [torch.tensor(chunk, dtype=torch.int64).T for chunk in sequential_chunks(ops)]
    for kv_cache in self.kv_caches:
        _, num_blocks, num_kv_heads, block_size, head_size = kv_cache.shape
        isa = _get_attn_isa(kv_cache.dtype, block_size)
        indices = cpu_slot_layout(isa, kv_cache.dtype, num_kv_heads, block_size, head_size)
        for half, index in zip(kv_cache, indices):
            flat = half.view(num_blocks, -1)
            for src_block, src_off, dst_block, dst_off in runs:
                flat[dst_block[:, None], index[dst_off]] = flat[src_block[:, None], index[src_off]]


def _cpu_sample_restoring_discarded_generators(original):
    @functools.wraps(original)
    def _sample(self, *args, **kwargs):
        # Rows whose sample is discarded (a prefill chunk that is not the last) still draw from their
        # seeded generator; vLLM undoes that with `set_offset`, which only CUDA generators have (on CPU
        # it raises and kills the engine). Restore the generator's state instead.
        n = self.input_batch.num_reqs
        saved = {}
        for i in np.nonzero(self.discard_request_mask.np[:n])[0]:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                saved[int(i)] = gen.get_state()
        out = original(self, *args, **kwargs)
        for i, state in saved.items():
            self.input_batch.generators[i].set_state(state)
        return out

    return _sample


def _cpu_bookkeeping_without_generator_rewind(original):
    @functools.wraps(original)
    def _bookkeeping_sync(self, *args, **kwargs):
        generators = self.input_batch.generators
        self.input_batch.generators = {}  # already restored by _sample; hide them from the offset rewind
        try:
            return original(self, *args, **kwargs)
        finally:
            self.input_batch.generators = generators

    return _bookkeeping_sync


def install_worker_patches() -> None:
    """Patch the model runner classes once per process (idempotent)."""
    if getattr(GPUModelRunner, "_memento_patch_version", None) == PATCH_VERSION:
        return
    GPUModelRunner._update_states = _recording_update_states(GPUModelRunner._update_states)
    GPUModelRunner._prepare_inputs = _recording_prepare_inputs(GPUModelRunner._prepare_inputs)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a build without the CPU runner: nothing to fix there
        CPUModelRunner = None
    if CPUModelRunner is not None:
        CPUModelRunner._execute_kv_copy_operations = cpu_execute_kv_copy_operations
        CPUModelRunner._sample = _cpu_sample_restoring_discarded_generators(GPUModelRunner._sample)
        CPUModelRunner._bookkeeping_sync = _cpu_bookkeeping_without_generator_rewind(GPUModelRunner._bookkeeping_sync)
    GPUModelRunner._memento_patch_version = PATCH_VERSION


install_worker_patches()
