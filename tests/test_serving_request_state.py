"""The plugin's pieces that need no engine. The per-request bookkeeping: at every row a scheduled chunk
computes, the compacted cache holds exactly the keys the training mask lets that row see, through
decode, chunked recomputation and preemption at any point, on random (malformed) streams and options.
The request options, and the engine arguments (V1 runner pinned, V2 refused)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic_ids import SPECIAL
from test_masking_properties import malformed_streams, mask_configs

from memento_train.generation import BlockMaskingConfig
from memento_train.masking import SpecialTokens, parse
from memento_train.serving.config import ServingConfig, request_keeps_kv, validate_request_override
from memento_train.serving.request_state import RequestEvictions, merge_spans

SP = SpecialTokens.from_mapping(SPECIAL)


def simulate(ids, prompt_len, config, *, block_size, chunk, restarts):
    """Drive :class:`RequestEvictions` as the scheduler does; check the cache at every computed row."""
    kill = parse(ids, SP, config, prompt_len=prompt_len).kill_row
    ev = RequestEvictions(ids[:prompt_len], SP, config)
    cache: list[int] = []  # logical positions, in physical order
    tokens, computed = prompt_len, 0
    restarts = sorted(restarts)
    while True:
        if restarts and computed >= restarts[0]:  # preemption: the cache is dropped, recomputed later
            restarts.pop(0)
            cache, computed = [], 0
            ev.restart()
        op = ev.take_due(computed, block_size)
        if op is not None:
            assert op.length == len(cache)
            keep = np.ones(len(cache), bool)
            for a, b in op.removed:
                keep[a:b] = False
            cache = [k for k, kept in zip(cache, keep) if kept]
            assert op.num_blocks == -(-len(cache) // block_size)
        assert cache == [k for k in range(computed) if kill[k] > computed], computed
        assert ev.evicted == computed - len(cache)
        assert all(ev.physical(k) == i for i, k in enumerate(cache))
        n = tokens - computed
        nxt = ev.next_row()
        if nxt is not None:
            assert nxt > computed
            n = min(n, nxt - computed)
        n = min(n, chunk)
        for q in range(computed, computed + n):  # compute rows: each attends over the cache + itself
            cache.append(q)
            assert cache == [k for k in range(q + 1) if kill[k] > q], q
        computed += n
        if computed == tokens:
            if tokens == len(ids):
                return ev
            ev.feed(ids[tokens])  # the sampled token: its evictions come due before it is fed
            tokens += 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=malformed_streams(), config=mask_configs(), data=st.data())
def test_compacted_cache_is_the_training_mask_at_every_row_through_chunks_and_preemptions(stream, config, data):
    ids = list(stream[0]) if isinstance(stream, tuple) else list(stream)
    if len(ids) < 2:
        return
    prompt_len = data.draw(st.integers(1, len(ids) - 1))
    block_size = data.draw(st.sampled_from([1, 2, 4, 32]))
    chunk = data.draw(st.sampled_from([1, 3, 1000]))
    restarts = data.draw(st.lists(st.integers(1, len(ids) - 1), max_size=3))
    ev = simulate(ids, prompt_len, config, block_size=block_size, chunk=chunk, restarts=list(restarts))
    full = parse(ids, SP, config, prompt_len=prompt_len)
    applied = [e for e in full.evictions if e.row < len(ids)]
    assert ev.events == [(e.row, e.start, e.stop) for e in applied]  # each event once, replays not re-logged
    assert (ev.restarts > 0) == bool(restarts) and ev.restarts <= len(restarts)


def test_prompt_blocks_of_an_earlier_turn_are_due_at_prompt_len_together():
    from synthetic_ids import ASSISTANT, BE, BS, IM_START, SE, SS

    w = 50
    turn = [BS, w, w, BE, SS, w, SE]
    prompt = [IM_START, ASSISTANT, *turn, *turn, w, IM_START, ASSISTANT]
    ev = RequestEvictions(prompt, SP, BlockMaskingConfig(keep_last_n_blocks=0))
    assert ev.next_row() is None  # nothing evicts while the prompt is read
    ev.feed(w)  # the first generated token (position prompt_len) brings both blocks due
    assert [(e.row, e.start, e.stop) for e in ev.decided] == [(len(prompt), 3, 5), (len(prompt), 10, 12)]
    op = ev.take_due(len(prompt), block_size=4)
    assert op.removed == ((3, 5), (10, 12)) and op.length == len(prompt)  # both in the cache as it is now
    assert op.num_blocks == -(-(len(prompt) - 4) // 4) and ev.evicted == 4


def test_overdue_eviction_is_an_error_and_merge_joins_touching_spans():
    ev = RequestEvictions([1, 2, 10, 50, 11, 12, 50, 13], SP, BlockMaskingConfig(keep_last_n_blocks=0), physical=True)
    ev.feed(50)
    with pytest.raises(RuntimeError, match="overdue"):
        ev.take_due(9, block_size=4)
    assert merge_spans([(5, 7), (1, 3), (3, 4), (6, 9), (10, 10)]) == [(1, 4), (5, 9)]


def test_keep_kv_diagnostic_records_events_but_removes_nothing():
    ev = RequestEvictions([1, 2, 10, 50, 11, 12, 50], SP, BlockMaskingConfig(keep_last_n_blocks=0), physical=False)
    ev.feed(13)
    assert ev.take_due(7, block_size=4) is None and ev.evicted == 0 and ev.events == [(7, 3, 4)]


def test_engine_args_install_the_plugin_and_pin_vllms_v1_model_runner(monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from types import SimpleNamespace

    from memento_train.serving import plugin_engine_args
    from memento_train.serving.worker import MementoGPUWorker

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    kw = plugin_engine_args(ServingConfig(special=SP))
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # vLLM 0.32 defaults to V2 on GPUs with Triton
    assert kw["scheduler_cls"].endswith("MementoScheduler") and kw["async_scheduling"] is False
    assert kw["enable_prefix_caching"] is False and kw["additional_config"]["memento"]["special"]["block_start"] == 10
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        MementoGPUWorker._make_model_runner(SimpleNamespace(use_v2_model_runner=True))


def test_request_options_are_validated_before_they_reach_the_engine():
    serving = ServingConfig(special=SP, block_masking=BlockMaskingConfig(keep_last_n_blocks=2))
    assert serving.request_masking(None) is serving.block_masking
    assert serving.request_masking({"memento": {"mask_delimiters": True}}).keep_last_n_blocks == 2
    assert serving.request_masking(
        {"memento_keep_last_n_blocks": 0, "memento_max_block_tokens": 0}
    ) == BlockMaskingConfig(keep_last_n_blocks=0, max_block_tokens=None)  # flat keys (OpenAI vllm_xargs)
    with pytest.raises(ValueError, match="unknown memento eviction options"):
        validate_request_override({"memento": {"keep_last_blocks": 1}})
    with pytest.raises(ValueError, match="needs keep_last_n_blocks=0 in the same request"):
        validate_request_override({"memento": {"keep_last_block_for_answer": True}})
    with pytest.raises(ValueError, match="compact_on_summary_end"):
        validate_request_override({"memento_compact_on_summary_end": False})
    with pytest.raises(ValueError, match="compact_on_summary_end"):
        ServingConfig(special=SP, block_masking=BlockMaskingConfig(compact_on_summary_end=False))
    assert request_keeps_kv({"memento_debug_keep_kv": True}) and not request_keeps_kv({})
    again = ServingConfig.from_dict(serving.to_dict())
    assert again == serving
    with pytest.raises(ValueError, match="lacks 'special'"):
        ServingConfig.from_dict({"block_masking": {}})
