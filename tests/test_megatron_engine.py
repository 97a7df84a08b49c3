"""The Megatron engine on CPU (gloo): training matches HF + AdamW, TP/PP/DP reproduce TP=1, checkpoints resume.

TP=1 runs in process (world size 1); TP=2, DP=2 and PP=2 run on two spawned gloo ranks (one job,
shared by the tests that compare it with the in-process run).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from megatron_harness import (
    megatron_native_on_cpu,
    megatron_skip_reason,
    micro_batches,
    run_workers,
    single_process_group,
)

pytestmark = pytest.mark.skipif(megatron_skip_reason() is not None, reason=str(megatron_skip_reason()))

LR = 1e-2
STEP_SEEDS = [[0, 1], [2, 3]]  # two optimizer steps of two micro-batches each


def optim_config():
    from memento_train.training.optim import OptimConfig

    # Clipping is active: the first step's gradient norm is ~1.1.
    return OptimConfig(lr=LR, weight_decay=0.1, grad_clip=0.5)


def tiny_hf(tied: bool = False):
    from conftest import tiny_causal_lm

    model = tiny_causal_lm("qwen3", dtype=torch.float32)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def make_engine(tp: int = 1, pp: int = 1, *, tied: bool = False):
    from memento_train.engines import EngineConfig, build_engine

    cfg = EngineConfig(kind="megatron", tensor_parallel=tp, pipeline_parallel=pp)
    return build_engine(tiny_hf(tied), optim_config(), cfg, torch.device("cpu"))


def token_loss(total_tokens: int):
    """The loop's loss: micro-batch token-loss sum / loss tokens of the whole global batch."""

    def loss_fn(logits, mb):
        loss = F.cross_entropy(logits.float(), mb.extras["labels"], ignore_index=-100, reduction="sum") / total_tokens
        return loss, {"loss": loss.item()}

    return loss_fn


def loss_tokens(mbs) -> int:
    return sum(int((mb.extras["labels"] != -100).sum()) for mb in mbs)


def train(engine, step_seeds=STEP_SEEDS) -> dict:
    """Run the steps (this DP rank's share of each global batch); the first step's grads included
    (taken from identical weights, so they are comparable tightly)."""
    losses, norms, grads = [], [], None
    for seeds in step_seeds:
        mbs = micro_batches(seeds)
        mine = mbs[engine.dp_rank :: engine.dp_size]
        metrics = engine.forward_backward(mine, token_loss(loss_tokens(mbs)))
        if grads is None:
            grads = engine.full_grads()
        norms.append(engine.step(LR))
        losses.append(sum(m["loss"] for m in metrics))
    return {"losses": losses, "norms": norms, "grads": grads, "state": engine.full_state_dict()}


def train_hf_adamw(tied: bool = False) -> dict:
    """The reference: the HF model with memento attention and plain ``torch.optim.AdamW``."""
    from memento_train.attention import attn_implementation
    from memento_train.training.optim import param_groups

    model = tiny_hf(tied)
    model.set_attn_implementation(attn_implementation("segment"))
    model.train()
    cfg = optim_config()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=LR, betas=cfg.betas, eps=cfg.eps)
    losses, norms, grads = [], [], None
    for seeds in STEP_SEEDS:
        mbs = micro_batches(seeds)
        loss_fn, total = token_loss(loss_tokens(mbs)), 0.0
        for mb in mbs:
            logits = model(
                input_ids=mb.input_ids[None], position_ids=mb.position_ids[None], memento_meta=mb.meta, use_cache=False
            ).logits[0]
            loss, m = loss_fn(logits, mb)
            loss.backward()
            total += m["loss"]
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return {"losses": losses, "norms": norms, "grads": grads, "state": copy.deepcopy(model.state_dict())}


def assert_runs_match(got: dict, ref: dict) -> None:
    """fp32 agreement: losses and norms to ~1e-6; first-step gradients to 1e-7; weights to 5e-3 × LR (Adam turns
    fp32 noise in near-zero gradients into O(LR) noise in single elements of the update)."""
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-6)
    assert got["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    assert set(got["grads"]) == set(ref["grads"]) and set(got["state"]) == set(ref["state"])
    for name, g in ref["grads"].items():
        assert torch.allclose(got["grads"][name], g, atol=1e-7, rtol=1e-5), name
    for name, w in ref["state"].items():
        assert torch.allclose(got["state"][name], w, atol=5e-3 * LR), name


def evaluate(engine) -> list[float]:
    """``forward_only``: summed token loss per micro-batch (what RL's old log-probs pass looks like)."""

    def fn(logits, mb):
        return F.cross_entropy(logits.float(), mb.extras["labels"], ignore_index=-100, reduction="sum").item()

    return engine.forward_only(micro_batches(STEP_SEEDS[0]), fn)


# -- TP=1, in process ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp1_run():
    with single_process_group():
        runs = {tied: train(make_engine(tied=tied)) for tied in (False, True)}
        runs["eval_tied"] = evaluate(make_engine(tied=True))
        return runs


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_training_steps_match_hf_with_adamw(tp1_run, tied):
    assert_runs_match(tp1_run[tied], train_hf_adamw(tied))


def resume_check(tp: int, pp: int, ckpt: str, tied: bool = False) -> dict:
    """Step, save, step (A); fresh engine, load, step (B). Returns both second steps."""
    a = make_engine(tp, pp, tied=tied)
    train(a, STEP_SEEDS[:1])
    a.save(ckpt)
    after_a = train(a, STEP_SEEDS[1:])
    b = make_engine(tp, pp, tied=tied)
    b.load(ckpt)
    after_b = train(b, STEP_SEEDS[1:])
    return {"a": after_a, "b": after_b, "files": sorted(os.listdir(ckpt))}


def assert_resumed_identically(res: dict) -> None:
    assert res["files"] == ["megatron"]  # the temporary directory was renamed away
    assert res["a"]["losses"] == res["b"]["losses"] and res["a"]["norms"] == res["b"]["norms"]
    if res["a"]["state"] is not None:
        for name, w in res["a"]["state"].items():
            assert torch.equal(res["b"]["state"][name], w), name


def test_save_load_resumes_identically(tmp_path):
    with single_process_group():
        res = resume_check(1, 1, str(tmp_path))
    assert_resumed_identically(res)


def test_export_hf_loads_in_transformers(tmp_path):
    """The production export path (``EngineWorker.export_hf``): the engine's ``full_state_dict`` written
    by :func:`memento_train.export.writer.export_hf` loads in transformers with the trained weights."""
    import transformers as tf

    from memento_train.export.writer import export_hf
    from memento_train.masking import BlockMaskingConfig
    from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

    with single_process_group():
        engine = make_engine(tied=True)
        train(engine, STEP_SEEDS[:1])
        state = engine.full_state_dict()
    export_hf(
        dict(state),
        tiny_hf(tied=True).config,
        load_shipped_tokenizer(),
        tmp_path,
        info={"block_masking": BlockMaskingConfig()},
        dtype=torch.float32,
    )
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, w in reloaded.state_dict().items():
        assert torch.equal(w, state[name]), name


def test_core_attention_uses_the_models_memento_backend():
    from memento_train.attention import attn_implementation
    from memento_train.engines import EngineConfig, build_engine
    from memento_train.models.megatron_gpt import MementoCoreAttention

    hf = tiny_hf()
    hf.set_attn_implementation(attn_implementation("sdpa"))
    with single_process_group():
        engine = build_engine(hf, optim_config(), EngineConfig(kind="megatron"), torch.device("cpu"))
        backends = {m.backend for m in engine.module.modules() if isinstance(m, MementoCoreAttention)}
    assert backends == {"sdpa"}


def test_bad_configs_name_the_option():
    from memento_train.config.errors import ConfigError
    from memento_train.engines import EngineConfig, build_engine

    with single_process_group():
        for bad in (dict(precision="bf16"), dict(precision="fp16"), dict(offload_optimizer=True)):
            with pytest.raises(ConfigError, match="engine.(precision|offload)"):
                build_engine(tiny_hf(), optim_config(), EngineConfig(kind="megatron", **bad), torch.device("cpu"))
        with pytest.raises(ConfigError, match="engine.tensor_parallel"):
            make_engine(tp=2)  # world size 1


# -- the CUDA path (Megatron's DDP + distributed optimizer, torch AdamW inside) on CPU -------------------
NATIVE_STEPS = [[0, 1], [2, 3], [4, 5]]


def adam_state(engine) -> list[dict[str, torch.Tensor]]:
    """Per parameter of the inner torch AdamW (Megatron's order): step and moments, copied."""
    adam = engine.optimizer.chained_optimizers[0].optimizer
    return [{k: v.clone() for k, v in adam.state[p].items()} for g in adam.param_groups for p in g["params"]]


def assert_same_adam_state(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.keys() == e.keys() == {"step", "exp_avg", "exp_avg_sq"}, i
        for key in e:
            assert torch.equal(g[key], e[key]), (i, key, g[key].flatten()[:3], e[key].flatten()[:3])


@pytest.mark.slow  # two engines, five steps, a checkpoint round trip: ~25 s on 2 cores
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_native_distributed_optimizer_with_torch_adamw_resumes_exactly(tmp_path, precision):
    """Without TransformerEngine/Apex Megatron's distributed optimizer wraps torch AdamW, whose per-
    parameter ``step`` tensors its checkpointing mishandles (assertion on a fresh optimizer, one shared
    step after a load). Train, save, train on (A); a fresh engine loads and trains (B); A reloads
    and replays (A'): same losses, weights and Adam state as the uninterrupted run, exactly. (bf16:
    fp32 torch norms among bf16 parameters also paired Adam state with the wrong parameters.)"""
    from memento_train.engines import EngineConfig, build_engine

    def make():
        return build_engine(
            tiny_hf(), optim_config(), EngineConfig(kind="megatron", precision=precision), torch.device("cpu")
        )

    with single_process_group(), megatron_native_on_cpu():
        a = make()
        assert a.native and type(a.optimizer.chained_optimizers[0].optimizer) is torch.optim.AdamW
        train(a, NATIVE_STEPS[:1])
        a.save(str(tmp_path))
        uninterrupted = train(a, NATIVE_STEPS[1:])
        uninterrupted_adam = adam_state(a)

        b = make()
        b.load(str(tmp_path))
        resumed = train(b, NATIVE_STEPS[1:])
        a.load(str(tmp_path))
        replayed = train(a, NATIVE_STEPS[1:])
        for run, engine in ((resumed, b), (replayed, a)):
            assert run["losses"] == uninterrupted["losses"] and run["norms"] == uninterrupted["norms"]
            for name, w in uninterrupted["state"].items():
                assert torch.equal(run["state"][name], w), name
            assert_same_adam_state(adam_state(engine), uninterrupted_adam)
        assert all(float(s["step"]) == len(NATIVE_STEPS) for s in uninterrupted_adam)


def test_native_megatron_applies_weight_decay_only_to_matrices_not_to_norms_biases_or_embeddings():
    """A step with zero gradients: Adam's update is 0, so only decoupled weight decay moves weights.
    Weight matrices shrink by (1 - lr * wd); norms, biases and the embedding must not move."""
    from memento_train.engines import EngineConfig, build_engine
    from memento_train.training.optim import OptimConfig

    lr, wd = 1e-2, 0.5
    model = tiny_hf()
    model.config.attention_bias = False
    with single_process_group(), megatron_native_on_cpu():
        engine = build_engine(
            model,
            OptimConfig(lr=lr, weight_decay=wd, grad_clip=0.0),
            EngineConfig(kind="megatron"),
            torch.device("cpu"),
        )
        before = {n: p.detach().clone() for n, p in engine.gpt.named_parameters()}
        mb = micro_batches([0])[0]
        engine.forward_backward([mb], lambda logits, _: (logits.sum() * 0.0, {}))
        engine.step(lr)
        after = {n: p.detach().clone() for n, p in engine.gpt.named_parameters()}
    no_decay = {n for n, w in before.items() if w.ndim < 2 or "embedding" in n}
    assert {n for n in no_decay if "norm" in n} and "embedding.word_embeddings.weight" in no_decay
    assert "output_layer.weight" not in no_decay  # an untied LM head decays, as in optim.param_groups
    for name, w in before.items():
        expected = w if name in no_decay else w * (1 - lr * wd)
        assert torch.equal(after[name], expected), name


# -- two ranks: TP=2, DP=2, PP=2 ----------------------------------------------------------------------
def _two_rank_job(ckpt: str) -> dict:
    return {
        "tp2": train(make_engine(tp=2)),
        "dp2": train(make_engine()),
        "pp2_tied": train(make_engine(pp=2, tied=True)),
        "pp2_eval": evaluate(make_engine(pp=2, tied=True)),
        "tp2_resume": resume_check(2, 1, ckpt),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_workers(_two_rank_job, 2, str(tmp_path_factory.mktemp("megatron_tp2_ckpt")))


@pytest.mark.slow
def test_tensor_parallel_2_reproduces_tp1(two_ranks, tp1_run):
    assert_runs_match(two_ranks[0]["tp2"], tp1_run[False])
    assert two_ranks[1]["tp2"]["state"] is None  # full_state_dict lives on rank 0 only
    assert two_ranks[1]["tp2"]["losses"] == two_ranks[0]["tp2"]["losses"]


@pytest.mark.slow
def test_data_parallel_2_sums_gradients_like_one_rank(two_ranks, tp1_run):
    ref = tp1_run[False]
    summed = [a + b for a, b in zip(two_ranks[0]["dp2"]["losses"], two_ranks[1]["dp2"]["losses"])]
    assert summed == pytest.approx(ref["losses"], abs=1e-6)
    assert_runs_match({**two_ranks[0]["dp2"], "losses": summed}, ref)


@pytest.mark.slow
def test_pipeline_parallel_2_reproduces_pp1_with_tied_embeddings(two_ranks, tp1_run):
    assert_runs_match(two_ranks[0]["pp2_tied"], tp1_run[True])
    assert two_ranks[1]["pp2_tied"]["losses"] == two_ranks[0]["pp2_tied"]["losses"]  # metrics on every stage


@pytest.mark.slow
def test_pipeline_parallel_2_forward_only_matches_pp1(two_ranks, tp1_run):
    for rank in two_ranks:
        assert rank["pp2_eval"] == pytest.approx(tp1_run["eval_tied"], rel=1e-6)


@pytest.mark.slow
def test_tensor_parallel_2_save_load_resumes_identically(two_ranks):
    for rank in two_ranks:
        assert_resumed_identically(rank["tp2_resume"])
