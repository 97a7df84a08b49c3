"""The worker side of the plugin: compact KV, attend over physical lengths, report what happened.

:class:`MementoRunnerMixin` goes in front of vLLM's V1 ``GPUModelRunner`` (and of the CPU runner,
its subclass). Per step:

1. ``_update_states``: before vLLM touches the batch (and before it zeroes freshly allocated blocks,
   which may be blocks a compaction just freed and still reads), apply the scheduler's compactions:
   move the live slots down (:mod:`.kv_compaction`), cut the request's block list and its
   ``InputBatch`` block-table row to the blocks it keeps.
2. ``_prepare_inputs``: vLLM computes everything from ``num_computed_tokens`` (logical). Positions
   (RoPE) stay so; the attention's ``seq_lens``, its CPU upper bound (``max_seq_len``) and the slot
   mapping are shifted by each request's evicted count, so new keys land right after the live ones
   and attention reads exactly the live entries. The discard mask (partial prefills) was computed
   from logical lengths before the shift and stays right.
3. Sampling: log-probs are ``log_softmax(logits / T)`` before any logits processor or truncation
   (:class:`MementoSampler`: exact for every temperature, a forced ``<|block_end|>`` gets its model
   log-prob); seeded rows draw with vLLM's exponential race on every device (on CPU vLLM would use
   its fused Gumbel kernel for them, whose draws differ). A row whose token is not a draw leaves its
   request's generator untouched, as in the reference engine: a discarded sample (partial prefill,
   e.g. a chunk ending at an eviction row; vLLM rewinds CUDA Philox offsets, which CPU generators do
   not have) and a ``<|block_end|>`` forced by the block cap. So a seeded sequence's draws do not
   depend on how it was chunked, preempted or capped.
4. The output carries :data:`REPORT_FIELD`: per request the physical KV length the step attended
   over and whether the block cap forced its token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.v1.sample.sampler import Sampler

from memento_train.serving.block_cap import BlockLengthCap
from memento_train.serving.kv_compaction import (
    SlotLayout,
    compaction_moves,
    find_block_dim,
    move_slots,
    probe_slot_offsets,
)

REPORT_FIELD = "memento_step"  # attribute of ModelRunnerOutput: StepReport
OPS_FIELD = "memento_compactions"  # attribute of SchedulerOutput: {req_id: Compaction}
EVICTED_FIELD = "memento_evicted"  # attribute of SchedulerOutput: {req_id: evicted entries}
_EPS = 1e-5  # vLLM's greedy threshold on temperature


@dataclass(frozen=True)
class StepReport:
    """What the worker measured in one step: per request (physical KV length attended over, forced by
    the block cap), and the KV bytes one token occupies across this worker's layers."""

    requests: dict[str, tuple[int, bool]]
    kv_bytes_per_token: int


class MementoSampler(Sampler):
    """vLLM's sampler with temperature-scaled raw log-probs and the exponential race for seeded rows."""

    def __init__(self, logprobs_mode: str = "raw_logprobs", **kwargs: Any) -> None:
        super().__init__(logprobs_mode=logprobs_mode, **kwargs)
        self._temperature: torch.Tensor | None = None
        sampler = self.topk_topp_sampler
        if sampler.forward.__func__ is type(sampler).forward_cpu:  # type: ignore[attr-defined]
            cpu, native = sampler.forward_cpu, sampler.forward_native
            # Seeded rows: the algorithm vLLM's GPU path uses with per-request generators.
            sampler.forward = lambda logits, generators, k, p: (native if generators else cpu)(logits, generators, k, p)

    def forward(self, logits, sampling_metadata, predict_bonus_token: bool = False, logprobs_mode_override=None):
        raw = (logprobs_mode_override or self.logprobs_mode) == "raw_logprobs"
        self._temperature = None if (sampling_metadata.all_greedy or not raw) else sampling_metadata.temperature
        try:
            return super().forward(logits, sampling_metadata, predict_bonus_token, logprobs_mode_override)
        finally:
            self._temperature = None

    def compute_logprobs(self, logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = self._temperature
        if t is not None:
            logits = logits.to(torch.float32) / torch.where(t < _EPS, 1.0, t).to(torch.float32).unsqueeze(1)
        return logits.log_softmax(dim=-1, dtype=torch.float32)


class MementoRunnerMixin:
    """Put in front of vLLM's V1 model runner class (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampler = MementoSampler(
            logprobs_mode=self.model_config.logprobs_mode, use_fp64_gumbel=self.model_config.use_fp64_gumbel
        )
        self._memento_evicted: dict[str, int] = {}
        self._memento_lengths: dict[str, int] = {}
        self._memento_layouts: list[tuple[torch.Tensor, SlotLayout]] = []
        self._restored_generators: list[int] = []
        self.memento_kv_bytes_per_token = 0

    # -- KV cache ------------------------------------------------------------------------------
    def initialize_kv_cache(self, kv_cache_config, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        if kwargs.get("is_profiling") or (args and args[0] is True):
            return
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(
                f"the Memento plugin supports models with one KV cache group (full attention in "
                f"every layer); this model has {len(groups)} (sliding-window or hybrid layers)"
            )
        spec = groups[0].kv_cache_spec
        table = self.input_batch.block_table[0]
        if table.block_size != spec.block_size:
            raise ValueError(
                f"the Memento plugin needs the attention kernel's block size ({table.block_size}) "
                f"to equal the KV manager's ({spec.block_size})"
            )
        context = self.compilation_config.static_forward_context
        layouts: dict[tuple, SlotLayout] = {}
        seen: set[int] = set()
        self._memento_layouts = []
        for name in groups[0].layer_names:
            layer = context[name]
            kv = layer.kv_cache
            if not isinstance(kv, torch.Tensor) or kv.data_ptr() in seen:
                continue
            seen.add(kv.data_ptr())
            key = (tuple(kv.shape), tuple(kv.stride()), kv.dtype)
            if key not in layouts:
                backend = layer.attn_backend
                block_dim = find_block_dim(
                    kv,
                    self.kv_cache_config.num_blocks,
                    lambda n, backend=backend: backend.get_kv_cache_shape(
                        n, spec.block_size, spec.num_kv_heads, spec.head_size
                    ),
                )

                def write(k, v, slots, layer=layer, kv=kv):
                    layer.impl.do_kv_cache_update(layer, k, v, kv, slots)

                layouts[key] = probe_slot_offsets(
                    write, kv, block_dim, spec.block_size, spec.num_kv_heads, spec.head_size
                )
            self._memento_layouts.append((kv, layouts[key]))
        self.memento_kv_bytes_per_token = sum(lay.element_bytes(kv.dtype) for kv, lay in self._memento_layouts)

    def _memento_compact(self, compactions: dict[str, Any]) -> None:
        for req_id, op in compactions.items():
            state = self.requests.get(req_id)
            if state is None:
                continue
            blocks = state.block_ids[0]
            src, dst = compaction_moves(op.removed, op.length)
            for kv, layout in self._memento_layouts:
                move_slots(kv, layout, blocks, src, dst)
            old = len(blocks)
            del blocks[op.num_blocks :]
            row = self.input_batch.req_id_to_index.get(req_id)
            if row is not None:
                table = self.input_batch.block_table[0]
                table.num_blocks_per_row[row] = op.num_blocks
                table.block_table.np[row, op.num_blocks : old] = 0

    # -- per step ------------------------------------------------------------------------------
    def _update_states(self, scheduler_output):
        compactions = getattr(scheduler_output, OPS_FIELD, None)
        if compactions:
            self._memento_compact(compactions)
        self._memento_evicted = dict(getattr(scheduler_output, EVICTED_FIELD, None) or {})
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        evicted = np.array([self._memento_evicted.get(r, 0) for r in req_ids], dtype=np.int64)
        logical = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64) + num_scheduled_tokens
        self._memento_lengths = dict(zip(req_ids, (logical - evicted).tolist()))
        if evicted.any():
            shift = torch.from_numpy(evicted)
            self.optimistic_seq_lens_cpu[:num_reqs] -= shift.to(self.optimistic_seq_lens_cpu.dtype)
            shift = shift.to(self.seq_lens.device)
            self.seq_lens[:num_reqs] -= shift.to(self.seq_lens.dtype)
            total = scheduler_output.total_num_scheduled_tokens
            per_token = shift[self.req_indices.gpu[:total].long()]
            physical = self.positions[:total] - per_token.to(self.positions.dtype)
            self.input_batch.block_table.compute_slot_mapping(
                num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical
            )
        return out

    def _sample(self, logits, spec_decode_metadata):
        num_reqs = self.input_batch.num_reqs
        generators = self.input_batch.generators
        cap = self._block_cap()
        not_drawn = {int(i) for i in np.flatnonzero(self.discard_request_mask.np[:num_reqs])}
        not_drawn.update(cap.rows_to_force(num_reqs) if cap is not None else ())
        saved = {i: generators[i].get_state() for i in not_drawn if i in generators}
        out = super()._sample(logits, spec_decode_metadata)
        for i, state in saved.items():
            generators[i].set_state(state)
        self._restored_generators = list(saved)
        return out

    def _block_cap(self) -> BlockLengthCap | None:
        return next((p for p in self.input_batch.logitsprocs.all if isinstance(p, BlockLengthCap)), None)

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any):
        # vLLM rewinds a discarded row's generator by a Philox offset (CPU generators have none and
        # raise); _sample restored their exact state already, so hide them from that rewind.
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i in self._restored_generators if i in generators}
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            generators.update(hidden)
            self._restored_generators = []

    def sample_tokens(self, grammar_output):
        cap = self._block_cap()
        if cap is not None:
            cap.forced_rows = []
        out = super().sample_tokens(grammar_output)
        req_ids = getattr(out, "req_ids", None)
        if req_ids:
            forced = {req_ids[i] for i in (cap.forced_rows if cap is not None else ()) if i < len(req_ids)}
            setattr(
                out,
                REPORT_FIELD,
                StepReport(
                    {r: (self._memento_lengths.get(r, -1), r in forced) for r in req_ids},
                    self.memento_kv_bytes_per_token,
                ),
            )
        return out
