"""The training engines (FSDP2, DeepSpeed ZeRO-2/3) against plain single-process PyTorch, on CPU/gloo.

Each engine kind runs once as a 2-rank job (``engine_harness.scenarios_job``, both ZeRO stages): 4 packed memento
micro-batches per global batch, 2 per rank, loss = token-loss sum / global loss tokens. The tests
compare what it returned with the reference: one process, all 4 micro-batches, ``torch.optim.AdamW``
and ``clip_grad_norm_``. DeepSpeed configs are marked slow: their first use on a machine compiles a
small C++ communication op (~30 s, cached afterwards).
"""

from __future__ import annotations

import math

import engine_harness as H
import pytest
import torch

from memento_train.config.errors import ConfigError
from memento_train.engines import EngineConfig, build_engine
from memento_train.training.optim import OptimConfig

CONFIGS = [
    pytest.param(("fsdp2", 2), id="fsdp2-zero2"),
    pytest.param(("fsdp2", 3), id="fsdp2-zero3"),
    pytest.param(("deepspeed", 2), id="deepspeed-zero2", marks=pytest.mark.slow),
    pytest.param(("deepspeed", 3), id="deepspeed-zero3", marks=pytest.mark.slow),
]
ALL_CONFIGS = [p.values[0] for p in CONFIGS]

GRAD_RTOL = 1e-5
# Adam divides by sqrt(v): parameters whose gradient is ~0 move by an amount sensitive to fp32
# summation order, so weights after a step agree to a small fraction of the learning rate.
WEIGHT_ATOL = 1e-2 * H.LR1


def _optim() -> OptimConfig:
    return OptimConfig(grad_clip=H.GRAD_CLIP, weight_decay=0.1).validate()


def _assert_tensors_close(
    actual: dict, expected: dict, *, rtol: float = 0.0, atol: float = 0.0, rel_to_max: float = 0.0
):
    assert set(actual) == set(expected)
    for name, exp in expected.items():
        tol = atol + rel_to_max * float(exp.abs().max())
        torch.testing.assert_close(actual[name], exp, rtol=rtol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def reference():
    return H.reference_run(_optim())


@pytest.fixture(scope="module")
def kind_jobs(tmp_path_factory):
    """kind -> {zero_stage: rank 0's results}; one 2-rank job per engine kind, run on first use."""
    cache: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            out = tmp_path_factory.mktemp(kind)
            cache[kind] = H.run_ranks(H.scenarios_job, 2, (kind, [2, 3], _optim(), str(out / "ckpt")), str(out))
        return cache[kind]

    return get


@pytest.fixture(scope="module", params=CONFIGS)
def job(request, kind_jobs):
    """((kind, zero_stage), rank 0's results of the 2-rank scenarios on that config)."""
    kind, stage = request.param
    return request.param, kind_jobs(kind)[stage]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """full_grads() of every config at world size 1 with all 4 micro-batches on the one rank."""
    out = tmp_path_factory.mktemp("one_rank")
    return H.run_ranks(H.one_rank_grads_job, 1, (ALL_CONFIGS, _optim()), str(out))


# -- 1. gradients ------------------------------------------------------------------------------
def test_full_grads_equal_single_process_gradient_of_global_token_mean(job, reference):
    _, res = job
    _assert_tensors_close(res["grads"], reference["grads"], rtol=GRAD_RTOL, rel_to_max=GRAD_RTOL)
    assert all(g.dtype == torch.float32 and g.device.type == "cpu" for g in res["grads"].values())


@pytest.mark.slow  # the world-size-1 job builds all four engines in one process
def test_full_grads_do_not_depend_on_how_micro_batches_split_over_ranks(job, one_rank, reference):
    config, res = job
    _assert_tensors_close(one_rank[config], res["grads"], rtol=GRAD_RTOL, rel_to_max=GRAD_RTOL)
    _assert_tensors_close(one_rank[config], reference["grads"], rtol=GRAD_RTOL, rel_to_max=GRAD_RTOL)


# -- 2. optimizer step -------------------------------------------------------------------------
def test_step_matches_torch_adamw_with_clipping(job, reference):
    _, res = job
    assert reference["norm1"] > H.GRAD_CLIP, "the test must exercise clipping"
    assert res["norm1"] == pytest.approx(reference["norm1"], rel=GRAD_RTOL)  # the pre-clip norm
    assert res["norm2"] == pytest.approx(reference["norm2"], rel=GRAD_RTOL)
    _assert_tensors_close(res["weights1"], reference["weights1"], atol=WEIGHT_ATOL)
    _assert_tensors_close(res["weights2"], reference["weights2"], atol=WEIGHT_ATOL)


# -- 3. checkpoints ----------------------------------------------------------------------------
def test_save_load_restores_weights_and_optimizer_state(job, reference):
    _, res = job
    # The fresh engine started from a differently seeded model: loading replaced every weight.
    _assert_tensors_close(res["loaded1"], res["weights1"])
    # Its next step equals the uninterrupted run's, and differs from a step with a fresh optimizer.
    _assert_tensors_close(res["resumed2"], res["weights2"], atol=1e-7)
    lost = max(float((res["resumed2"][k] - v).abs().max()) for k, v in reference["weights2_fresh_optimizer"].items())
    assert lost > 10 * WEIGHT_ATOL, "restoring the optimizer state must change the next step"


def test_fsdp2_save_and_load_leave_no_gloo_thread_or_openmp_team_behind(tmp_path):
    """DCP gathers its save plan to rank 0; on the default gloo group that gives a gloo worker thread an
    OpenMP team for the rest of the process, and every later small matmul slows down (1.6x on 2 cores).
    The engine runs DCP on a scratch group that it destroys, so the process's threads are as before."""
    res = H.run_ranks(H.checkpoint_threads_job, 1, (_optim(), str(tmp_path / "ckpt")), str(tmp_path))
    assert res["after"] == res["before"]
    # The control (plain dcp.save on the default group) does leave threads: the check can see them.
    assert len(res["control"]) > len(res["before"]), res


# -- 3b. FSDP2 across micro-batches ------------------------------------------------------------
FSDP2_LAYERS = 2  # the reference model's depth


@pytest.fixture(scope="module")
def fsdp2_micro_batches(tmp_path_factory):
    """Rank 0's observations of one bf16 FSDP2 step of two micro-batches per rank (2 ranks)."""
    out = tmp_path_factory.mktemp("fsdp2_micro_batches")
    return H.run_ranks(H.fsdp2_micro_batches_job, 2, (_optim(), FSDP2_LAYERS), str(out))


def test_fsdp2_builds_attention_plans_once_per_micro_batch_not_per_layer(fsdp2_micro_batches):
    """FSDP2's mixed-precision cast copies the forward inputs of every wrapped layer, the metadata
    included; its derived plans must survive the copy (they were rebuilt in every layer)."""
    res = fsdp2_micro_batches
    assert res["builds"] == res["micro_batches"], (
        f"{res['builds']} interval plans for {res['micro_batches']} micro-batches"
    )


def test_fsdp2_keeps_gradients_sharded_between_micro_batches(fsdp2_micro_batches):
    """Each micro-batch reduce-scatters into sharded fp32 gradients: no rank holds an unsharded fp32
    gradient of the whole model between micro-batches (29 GB for a 7B model)."""
    res = fsdp2_micro_batches
    between, full = res["between"], res["full_fp32_bytes"]
    assert between["unsharded"] == 0, between
    assert 0 < between["sharded"] <= 0.55 * full, (between, full)  # half of the fp32 model, plus padding


def test_fsdp2_per_micro_batch_reduce_scatter_gives_the_reference_gradient(fsdp2_micro_batches, reference):
    # bf16 compute: the summed gradient matches the fp32 single-process one to bf16 accuracy.
    _assert_tensors_close(fsdp2_micro_batches["grads"], reference["grads"], rtol=0.05, rel_to_max=0.05)


# -- 4. weights out ----------------------------------------------------------------------------
def test_full_state_dict_has_hf_keys_and_loads_strictly_into_a_fresh_model(job, reference):
    _, res = job
    sd = res["weights1"]
    assert set(sd) == set(reference["keys"])  # lm_head.weight included: HF lists tied aliases
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
    model = H.tiny_model(seed=H.OTHER_SEED)
    model.load_state_dict(sd, strict=True)
    # Tied embeddings stay tied and carry the trained value.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.model.embed_tokens.weight, sd["model.embed_tokens.weight"])


# -- 5. memento attention through the engine ---------------------------------------------------
def test_forward_backward_runs_memento_attention_like_the_reference(job, reference):
    _, res = job
    # The micro-batches evict keys (kill rows inside documents); the summed token loss over both
    # ranks equals the single-process memento-attention loss.
    assert res["loss_sum"] == pytest.approx(reference["loss_sum"], rel=1e-6)


# -- 6. precision, offload and config errors ---------------------------------------------------
def test_bf16_step_on_cpu_has_finite_loss_and_keeps_fp32_master_weights(job, reference):
    _, res = job
    assert math.isfinite(res["bf16_loss_sum"]) and res["bf16_loss_sum"] > 0
    assert math.isfinite(res["bf16_norm"])
    assert res["bf16_norm"] == pytest.approx(reference["norm1"], rel=0.05)
    assert all(v.dtype == torch.float32 for v in res["bf16_weights"].values())
    # bf16 compute, fp32 masters started from the exact fp32 weights: the first Adam step moves each
    # weight by at most lr, so even a flipped update direction stays within 2 lr of the reference.
    _assert_tensors_close(res["bf16_weights"], reference["weights1"], atol=2.05 * H.LR1)


def test_offloading_params_and_optimizer_gives_the_same_step(job, reference):
    (kind, stage), res = job
    if stage != 3:
        pytest.skip("offload_params needs zero_stage=3")
    _assert_tensors_close(res["offload_grads"], reference["grads"], rtol=GRAD_RTOL, rel_to_max=GRAD_RTOL)
    assert res["offload_norm1"] == pytest.approx(reference["norm1"], rel=GRAD_RTOL)
    _assert_tensors_close(res["offload_weights1"], reference["weights1"], atol=WEIGHT_ATOL)


@pytest.mark.parametrize("kind", ["fsdp2", "deepspeed"])
def test_offload_params_without_zero3_is_a_config_error_naming_the_option(kind):
    cfg = EngineConfig(kind=kind, zero_stage=2, offload_params=True)
    with pytest.raises(ConfigError, match=r"engine\.offload_params.*zero_stage=3"):
        build_engine(torch.nn.Linear(2, 2), _optim(), cfg, torch.device("cpu"))


@pytest.mark.parametrize(
    ("kind", "options", "named"),
    [
        ("fsdp2", {"offload_optimizer": True}, r"engine\.offload_optimizer.*offload_params=true.*deepspeed"),
        ("fsdp2", {"precision": "fp16"}, r"engine\.precision=fp16.*bf16"),
        ("deepspeed", {"precision": "fp16"}, r"engine\.precision=fp16.*CPU"),
    ],
)
def test_unsupported_engine_options_are_config_errors_naming_the_option(kind, options, named):
    # Checked before any process group or sharding is needed.
    cfg = EngineConfig(kind=kind, **options)
    with pytest.raises(ConfigError, match=named):
        build_engine(torch.nn.Linear(2, 2), _optim(), cfg, torch.device("cpu"))


def test_deepspeed_config_maps_engine_and_optimizer_options():
    from memento_train.engines.deepspeed import deepspeed_config

    cfg = EngineConfig(kind="deepspeed", zero_stage=3, precision="bf16", offload_optimizer=True, offload_params=True)
    ds = deepspeed_config(cfg, _optim(), 4, client_cpu_optimizer=True)
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == H.GRAD_CLIP
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        1,
        1,
        4,
    )
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert "optimizer" not in ds and "scheduler" not in ds
    # bf16: micro-batches are accumulated and ranks reduced in fp32, not in bf16.
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"


def test_deepspeed_floor_is_the_first_release_that_keeps_fp32_buffers_under_bf16():
    import re
    import tomllib
    from pathlib import Path

    from memento_train.engines.deepspeed import MIN_VERSION_KEEPING_FP32_BUFFERS, _check_deepspeed_version

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pins = [r for extra in project["optional-dependencies"].values() for r in extra if r.startswith("deepspeed")]
    assert pins and all(re.search(rf">={re.escape(MIN_VERSION_KEEPING_FP32_BUFFERS)}\b", r) for r in pins), pins
    with pytest.raises(ConfigError, match=r"engine\.precision=bf16 with deepspeed 0\.19\.1.*inv_freq"):
        _check_deepspeed_version("0.19.1", EngineConfig(kind="deepspeed", precision="bf16"))
    _check_deepspeed_version("0.19.1", EngineConfig(kind="deepspeed"))  # fp32 casts nothing


def test_bf16_engine_keeps_rope_buffers_fp32_and_deepspeed_sums_gradients_in_fp32(job):
    """The real engines under bf16 on CPU: RoPE's inv_freq stays fp32 (DeepSpeed < 0.19.2 rounded it to
    bf16), and DeepSpeed accumulates micro-batches and reduces ranks in fp32."""
    (kind, _), res = job
    buffers = res["bf16_buffers"]
    assert any(name.endswith("inv_freq") for name in buffers), buffers
    assert all(dtype == torch.float32 for name, dtype in buffers.items() if name.endswith("inv_freq")), buffers
    if kind == "deepspeed":
        assert res["bf16_deepspeed"] == {
            "model": torch.bfloat16,
            "grad_accum": torch.float32,
            "communication": torch.float32,
            "zero_grad_accum": torch.float32,
        }


@pytest.mark.parametrize("kind", ["fsdp2", "deepspeed", "megatron"])
def test_engine_public_methods_are_the_engine_contract(kind):
    """Test tooling lives in tests/: an engine class has no public method beyond :class:`TrainEngine`'s
    (the megatron engine once carried an ``export_hf`` that only tests called)."""
    import importlib
    import inspect

    from memento_train.engines.base import _ENGINES, TrainEngine

    if kind == "megatron":
        pytest.importorskip("megatron.core")
    importlib.import_module(f"memento_train.engines.{kind}")

    def public_methods(cls) -> set[str]:
        return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}

    assert public_methods(_ENGINES[kind]) - public_methods(TrainEngine) == set()
