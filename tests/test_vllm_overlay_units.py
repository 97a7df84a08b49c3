"""The vLLM 0.13 + overlay integration's pure parts (no vLLM needed): engine arguments, version
selection, and the ordering rule of the KV compaction copy. The real engine: test_vllm_overlay.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memento_train.generation import vllm_overlay
from memento_train.generation.vllm_overlay import applies, engine_kwargs, sequential_chunks, version_tuple


def test_overlay_path_is_chosen_for_vllm_0_13_only():
    assert version_tuple("0.13.0+cpu") == (0, 13) and version_tuple("0.13.1.dev0+g72506c9") == (0, 13)
    assert applies("0.13.0") and not applies("0.32.0") and not applies(None) and not applies("garbage")


def test_engine_kwargs_add_the_patch_layer_and_the_cpu_rms_norm_workaround():
    gpu = engine_kwargs({"model": "m"}, cpu=False)
    assert gpu == {
        "model": "m",
        "scheduler_cls": vllm_overlay.SCHEDULER_CLS,
        "worker_extension_cls": vllm_overlay.WORKER_EXTENSION_CLS,
    }
    cpu = engine_kwargs({"model": "m", "compilation_config": {"custom_ops": ["-silu_and_mul"], "mode": 0}}, cpu=True)
    assert cpu["compilation_config"] == {"custom_ops": ["-silu_and_mul", "-rms_norm"], "mode": 0}
    assert engine_kwargs(cpu, cpu=True) == cpu  # idempotent
    kept = engine_kwargs({"compilation_config": {"custom_ops": ["+rms_norm"]}}, cpu=True)  # the user's explicit choice
    assert kept["compilation_config"]["custom_ops"] == ["+rms_norm"]
    with pytest.raises(ValueError, match="scheduler_cls='my.Scheduler'.*Memento runtime patches"):
        engine_kwargs({"scheduler_cls": "my.Scheduler"}, cpu=False)


def _apply_in_order(cache: np.ndarray, ops) -> np.ndarray:
    out = cache.copy()
    for sb, so, db, do in ops:
        out[db, do] = out[sb, so]
    return out


def _apply_chunked(cache: np.ndarray, ops) -> np.ndarray:
    out = cache.copy()
    for chunk in sequential_chunks(ops):
        sb, so, db, do = np.asarray(chunk).T
        out[db, do] = out[sb, so]  # one gather, then one scatter, as the CPU copy does per run
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 2), st.integers(0, 3)), max_size=12),
        max_size=3,
    )
)
def test_chunked_kv_copies_equal_copying_op_by_op(phases):
    """Any op list (e.g. two compactions of one step concatenated) gives the in-order result."""
    ops = [op for phase in phases for op in phase]
    cache = np.arange(3 * 4 * 2).reshape(3, 4, 2)
    assert np.array_equal(_apply_chunked(cache, ops), _apply_in_order(cache, ops))


def test_one_compaction_is_one_vectorised_run():
    # 8 slots of 4 per block, tokens 2..4 evicted: 5,6,7 move to 2,3,4 (the overlay's op order).
    ops = [(p // 4, p % 4, q // 4, q % 4) for p, q in [(5, 2), (6, 3), (7, 4)]]
    assert sequential_chunks(ops) == [ops]
    # A second compaction of the same step reads slots the first one wrote: a new run.
    again = [(0, 3, 0, 2), (1, 0, 0, 3)]
    assert sequential_chunks(ops + again) == [ops, again]


# -- rollout workers in the vLLM 0.13 environment (docs/vllm.md) ------------------------------------------
def test_rollout_workers_may_run_in_a_second_interpreter(tmp_path):
    import sys

    from memento_train.cluster.config import ClusterConfig
    from memento_train.config.errors import ConfigError

    assert ClusterConfig(python=sys.executable).validate("rollout_cluster").python == sys.executable
    with pytest.raises(ConfigError, match=r"rollout_cluster\.python: .*nope.* is not an executable file"):
        ClusterConfig(python=str(tmp_path / "nope")).validate("rollout_cluster")
    with pytest.raises(ConfigError, match=r"^cluster\.python: a second interpreter is supported for rollout workers"):
        ClusterConfig(python=sys.executable).validate("cluster")
    with pytest.raises(ConfigError, match=r"rollout_cluster\.python: needs use_ray=true"):
        ClusterConfig(python=sys.executable, use_ray=False).validate("rollout_cluster")


def test_vllm_rollouts_need_a_checkpoint_directory(tmp_path):
    from memento_train.config.errors import ConfigError
    from memento_train.rl.config import build_rl_config, config_tree

    base = ["logger=none", f"output_dir={tmp_path}", "rollout.generator=vllm", "warmup.enabled=false"]
    with pytest.raises(ConfigError, match="rollout.generator=vllm loads the policy from a checkpoint directory"):
        build_rl_config(config_tree(None, base))
    cfg = build_rl_config(
        config_tree(None, [*base, "model.path=tests/assets/tiny_rl_warmed", "weight_sync=collective"])
    )
    assert cfg.rollout.generator == "vllm"  # collective sync loads host buffers into vLLM (update_weights)


def test_rollout_actors_start_with_the_configured_interpreter(monkeypatch, tmp_path):
    import sys
    import types

    import ray

    from memento_train.rl import rollout_worker
    from memento_train.rl.config import build_rl_config, config_tree

    started = []

    class Actor:
        def __init__(self):
            self.ping = types.SimpleNamespace(remote=lambda: "pong")

    class Remote:
        def options(self, **kw):
            started.append(kw)
            return types.SimpleNamespace(remote=lambda *a: Actor())

    monkeypatch.setattr(ray, "remote", lambda cls: Remote())
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: refs)
    cfg = build_rl_config(
        config_tree(
            None,
            [
                "logger=none",
                f"output_dir={tmp_path}",
                f"rollout_cluster.python={sys.executable}",
                "rollout_cluster.gpus_per_worker=0",
                "rollout_cluster.num_workers=2",
            ],
        )
    )
    rollout_worker.RolloutPool(cfg, {})
    assert [kw["runtime_env"].get("py_executable") for kw in started] == [sys.executable] * 2
    cfg = build_rl_config(
        config_tree(None, ["logger=none", f"output_dir={tmp_path}", "rollout_cluster.gpus_per_worker=0"])
    )
    rollout_worker.RolloutPool(cfg, {})
    assert "py_executable" not in started[-1]["runtime_env"]


def test_status_never_loads_the_patches_into_another_vllm(monkeypatch):
    """Importing vllm_overlay_patches patches vLLM's model runner: only ever on vLLM 0.13."""
    import sys
    import types

    fake = types.ModuleType("vllm")
    fake.__version__ = "0.32.0"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.delitem(sys.modules, vllm_overlay.PATCHES_MODULE, raising=False)
    st = vllm_overlay.status()
    assert st.vllm_version == "0.32.0" and st.patches.startswith("not loaded")
    assert vllm_overlay.PATCHES_MODULE not in sys.modules
    assert any("not 0.13.x" in p for p in st.problems)
