"""The scheduler side of the plugin (``scheduler_cls`` engine argument).

:class:`MementoScheduler` is vLLM 0.32's ``Scheduler`` plus the eviction bookkeeping of
:mod:`.request_state` (one :class:`~memento_train.masking.BlockTracker` per request). It hooks in
where vLLM already has seams:

- ``add_request``: the tracker reads the prompt (blocks of earlier turns become pending).
- ``_update_request_with_output``: each appended token is fed to the tracker and recorded with the
  physical KV length its step attended over and whether the block cap forced it (the worker's
  report, :data:`~.model_runner.REPORT_FIELD`).
- ``_reserve_prefill_lookahead`` (called for every request right before its KV slots are allocated,
  running or waiting): due evictions are applied (tail blocks freed, a :class:`Compaction` queued for
  the worker) and the chunk is cut at the next due eviction row, so recomputation after preemption
  (and any chunk) never computes a row that should not see an evicted block.
- the KV manager allocates for *physical* lengths (``num_computed_tokens - evicted``).
- ``_preempt_request``: the cache is gone; every eviction becomes due again for the recomputation.
- ``_free_request``: the request's report goes out in ``kv_transfer_params["memento"]`` (vLLM's
  per-request output dict; the OpenAI server returns it in the response).

Unsupported engine settings (async scheduling, speculative decoding, pipeline parallelism, prefix
caching, KV connectors, several KV cache groups) are refused at start-up with the option to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.scheduler import Scheduler

from memento_train.generation.engine import BlockMaskingConfig
from memento_train.serving.config import CONFIG_KEY, ServingConfig, request_keeps_kv
from memento_train.serving.model_runner import EVICTED_FIELD, OPS_FIELD, REPORT_FIELD
from memento_train.serving.request_state import Compaction, RequestEvictions

log = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """One request's eviction state and what it reports when it finishes."""

    masking: BlockMaskingConfig
    evictions: RequestEvictions
    kv_trace: list[int] = field(default_factory=list)  # physical entries attended over, per token
    forced: list[bool] = field(default_factory=list)  # token forced by the block cap


class _PhysicalView:
    """A request as the KV manager must see it: counts in physical (compacted) entries."""

    __slots__ = ("_request", "num_computed_tokens", "num_tokens")

    def __init__(self, request: Any, evicted: int, planned: int) -> None:
        self._request = request
        self.num_computed_tokens = request.num_computed_tokens - evicted
        self.num_tokens = request.num_tokens - planned

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


class PhysicalKVCacheManager(KVCacheManager):
    """vLLM's KV manager allocating for compacted lengths (installed by :class:`MementoScheduler`)."""

    memento_tracked: dict[str, _Tracked]

    def allocate_slots(self, request, num_new_tokens, *args, **kwargs):
        tracked = self.memento_tracked.get(request.request_id)
        if tracked is not None and tracked.evictions.decided:
            ev = tracked.evictions
            request = _PhysicalView(request, ev.evicted, max(ev.evicted, ev.planned_evicted))
        return super().allocate_slots(request, num_new_tokens, *args, **kwargs)

    def truncate(self, request_id: str, num_blocks: int) -> None:
        """Free the request's blocks beyond the first ``num_blocks`` (after a compaction)."""
        for manager in self.coordinator.single_type_managers:
            blocks = manager.req_to_blocks.get(request_id)
            if blocks is None or len(blocks) <= num_blocks:
                continue
            tail = blocks[num_blocks:]
            del blocks[num_blocks:]
            self.block_pool.free_blocks(reversed(tail))


class MementoScheduler(Scheduler):
    """vLLM's scheduler with Memento block eviction (module docstring)."""

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.memento = ServingConfig.from_vllm_config(vllm_config)
        _refuse_unsupported(self)
        self._tracked: dict[str, _Tracked] = {}
        self._compactions: dict[str, Compaction] = {}
        self._step_report: dict[str, tuple[int, bool]] = {}
        self._kv_bytes_per_token = 0
        if type(self.kv_cache_manager) is not KVCacheManager:
            raise RuntimeError(f"unexpected KV cache manager {type(self.kv_cache_manager).__name__}")
        self.kv_cache_manager.__class__ = PhysicalKVCacheManager
        self.kv_cache_manager.memento_tracked = self._tracked

    # -- requests in -------------------------------------------------------------------------
    def add_request(self, request: Any) -> None:
        if request.request_id not in self.requests and request.sampling_params is not None:
            if request.resumable:
                raise ValueError("streaming-input (resumable) requests are not supported with Memento eviction")
            extra = request.sampling_params.extra_args
            masking = self.memento.request_masking(extra)
            self._tracked[request.request_id] = _Tracked(
                masking,
                RequestEvictions(
                    request.prompt_token_ids or [],
                    self.memento.special,
                    masking.rule(),
                    physical=not request_keeps_kv(extra),
                ),
            )
        super().add_request(request)

    # -- tokens in ---------------------------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        step = getattr(model_runner_output, REPORT_FIELD, None)
        if step is not None:
            self._step_report, self._kv_bytes_per_token = step.requests, step.kv_bytes_per_token
        try:
            return super().update_from_output(scheduler_output, model_runner_output)
        finally:
            self._step_report = {}

    def _update_request_with_output(self, request, new_token_ids, *args, **kwargs):
        new_token_ids, stopped = super()._update_request_with_output(request, new_token_ids, *args, **kwargs)
        tracked = self._tracked.get(request.request_id)
        if tracked is not None:
            length, forced = self._step_report.get(request.request_id, (-1, False))
            for tok in new_token_ids:
                tracked.evictions.feed(tok)
                tracked.kv_trace.append(int(length))
                tracked.forced.append(bool(forced))
        return new_token_ids, stopped

    # -- scheduling ----------------------------------------------------------------------------
    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        tracked = self._tracked.get(request.request_id)
        if tracked is None or num_new_tokens <= 0:
            return num_new_tokens
        ev = tracked.evictions
        op = ev.take_due(num_computed_tokens, self.block_size)
        if op is not None:
            if request.request_id in self._compactions:
                raise RuntimeError(f"two compactions of request {request.request_id} in one step")
            self.kv_cache_manager.truncate(request.request_id, op.num_blocks)
            self._compactions[request.request_id] = op
        row = ev.next_row()
        if row is not None:
            num_new_tokens = min(num_new_tokens, row - num_computed_tokens)
        return num_new_tokens

    def schedule(self, *args: Any, **kwargs: Any):
        output = super().schedule(*args, **kwargs)
        preempted = output.preempted_req_ids or set()
        setattr(output, OPS_FIELD, {r: op for r, op in self._compactions.items() if r not in preempted})
        setattr(
            output,
            EVICTED_FIELD,
            {
                r: t.evictions.evicted
                for r, t in self._tracked.items()
                if t.evictions.evicted and r in output.num_scheduled_tokens
            },
        )
        self._compactions = {}
        return output

    def _preempt_request(self, request, *args: Any, **kwargs: Any) -> None:
        super()._preempt_request(request, *args, **kwargs)
        tracked = self._tracked.get(request.request_id)
        if tracked is not None:
            tracked.evictions.restart()
            self._compactions.pop(request.request_id, None)

    # -- requests out ----------------------------------------------------------------------------
    def _free_request(self, request, *args: Any, **kwargs: Any):
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        tracked = self._tracked.pop(request.request_id, None)
        if tracked is not None:
            kv_params = {**(kv_params or {}), CONFIG_KEY: self._report(request, tracked)}
        return kv_params, ec_params

    def _report(self, request: Any, tracked: _Tracked) -> dict[str, Any]:
        ev = tracked.evictions
        known = [n for n in tracked.kv_trace if n >= 0]
        report: dict[str, Any] = {
            "evicted_tokens": ev.evicted_tokens,
            "evictions": len(ev.events),
            "peak_kv": max(known, default=0),
            "final_kv": known[-1] if known else 0,
            "forced_block_ends": sum(tracked.forced),
            "preemptions": ev.restarts,
            "replayed_evictions": ev.replayed,
            "kv_bytes_per_token": self._kv_bytes_per_token,
            "block_masking": tracked.masking.to_dict(),
        }
        if self.memento.report_traces:
            report["eviction_events"] = [list(e) for e in ev.events]
            report["kv_trace"] = list(tracked.kv_trace)
            report["forced"] = list(tracked.forced)
        return report


def _refuse_unsupported(scheduler: Scheduler) -> None:
    cfg = scheduler.vllm_config
    problems = []
    if getattr(cfg.scheduler_config, "async_scheduling", False):
        problems.append(
            "async_scheduling=True (set async_scheduling=False: an eviction must apply before the "
            "token that triggers it is fed, which needs that token first)"
        )
    if cfg.speculative_config is not None:
        problems.append("speculative decoding (drop speculative_config)")
    if cfg.parallel_config.pipeline_parallel_size > 1:
        problems.append("pipeline_parallel_size > 1 (use tensor parallelism)")
    if cfg.cache_config.enable_prefix_caching:
        problems.append("enable_prefix_caching=True (a cached prefix would share KV entries another request evicted)")
    if cfg.kv_transfer_config is not None:
        problems.append("a KV connector (kv_transfer_config)")
    if getattr(cfg.parallel_config, "decode_context_parallel_size", 1) > 1:
        problems.append("decode context parallelism")
    if len(scheduler.kv_cache_config.kv_cache_groups) != 1:
        problems.append(
            f"{len(scheduler.kv_cache_config.kv_cache_groups)} KV cache groups (models with sliding-"
            "window or hybrid layers; the plugin supports full attention in every layer)"
        )
    if problems:
        raise ValueError("the Memento vLLM plugin cannot run with " + "; ".join(problems))
