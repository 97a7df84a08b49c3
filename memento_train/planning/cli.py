"""``memento-train plan`` / ``memento-rl plan``: will this recipe fit, per GPU and per host, before launch.

    memento-train plan recipe=qwen3_8b_stage2 [gpu=H100|H200|B200] [section.option=value ...]
    memento-rl plan recipe=grpo [gpu=...] [model.path=...]

Reads the resolved config (the same one ``show`` prints; nothing is loaded, no weights, no data), the
model's shape (a local ``config.json`` or one of the models the shipped recipes name) and prints the
planned per-GPU peak of a trainer rank line by line, whether it fits the GPU (default H100, 80 GB),
the host memory per rank at load and export, and, when it does not fit, single changes that make it
fit. Exit status 0 when it fits, 1 when it does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from memento_train.config.errors import ConfigError
from memento_train.config.tree import deep_merge, parse_overrides
from memento_train.planning.memory import (
    GPUS,
    GiB,
    MemoryPlan,
    Parallel,
    Workload,
    gpu_capacity,
    kv_cache_tokens,
    plan_memory,
    suggestions,
)
from memento_train.planning.shapes import ModelShape, shape_of_model_path, tiny_shape
from memento_train.recipes import recipe_path

DEFAULT_GPU = "H100"
# memento-rl plan with no model.path (the grpo recipe leaves it to the user): the paper's RL policy.
DEFAULT_RL_MODEL = "Qwen/Qwen3-8B"


def plan_command(prog: str, recipe: str | None, args: list[str]) -> int:
    """Entry point from :func:`memento_train.recipes.cli.run_recipe_cli` (``<prog> plan ...``)."""
    opts = parse_overrides(args)
    gpu = str(opts.pop("gpu", DEFAULT_GPU))
    capacity = gpu_capacity(gpu)
    gpu = gpu.upper()
    if prog == "memento-rl":
        fits = _plan_rl(recipe, opts, gpu, capacity)
    else:
        fits = _plan_sft(recipe, opts, gpu, capacity)
    return 0 if fits else 1


# -- SFT ---------------------------------------------------------------------------------------------
def _plan_sft(recipe: str | None, opts: dict[str, Any], gpu: str, capacity: float) -> bool:
    from memento_train.sft.config import build_sft_config, config_tree

    tree = config_tree(recipe, opts)
    stages = tree.pop("stages", None)
    trees = [(name, config_tree(name, opts)) for name in stages] if stages else [(recipe, tree)]
    fits = True
    for name, stage_tree in trees:
        # A stage-2 recipe's model.path is the stage-1 export, which need not exist yet: plan with the
        # model its base recipe names.
        stage_tree, note = _with_base_model(stage_tree, name)
        cfg = build_sft_config(deep_merge(stage_tree, {"model": {"require_stage1_init": False}}))
        shape = _shape(cfg.model)
        work = Workload(
            tokens=cfg.train.micro_batch_tokens,
            doc_tokens=cfg.data.max_seq_len,
            keep_last_n_blocks=cfg.data.block_masking.keep_last_n_blocks,
            checkpointing=cfg.model.gradient_checkpointing,
            backend=_gpu_backend(cfg.model.attn_backend),
        )
        par = _parallel(cfg.engine, cfg.optim, cfg.cluster.num_workers)
        note = "; ".join(x for x in (note, _refusal_note(cfg.engine)) if x)
        title = (
            f"recipe {name or 'tiny'}: {shape.name} ({shape.params / 1e9:.2f} B parameters), stage {cfg.stage}, "
            f"{_engine_words(par)} on {par.world} x {gpu} ({capacity / GiB:.1f} GiB)"
        )
        fits &= _print_plan(title, note, shape, par, work, capacity, min_tokens=cfg.data.max_seq_len)
    return fits


# -- RL ------------------------------------------------------------------------------------------------
def _plan_rl(recipe: str | None, opts: dict[str, Any], gpu: str, capacity: float) -> bool:
    from memento_train.rl.config import build_rl_config, config_tree

    tree = config_tree(recipe, opts)
    warmup = bool((tree.get("warmup") or {}).get("enabled", False))  # the tiny default trains a tiny model
    init_from = (tree.get("model") or {}).get("init_from")
    if (tree.get("model") or {}).get("path") is None and init_from:
        # The policy is the previous stage's export, which need not exist yet: plan with that recipe's
        # model and eviction rule.
        tree = _with_previous_stage(tree, init_from)
        note = (
            f"model.path is unset (the export of {init_from}, run it first): planning with the shape of "
            f"{tree['model']['path']}"
        )
    else:
        tree, note = _with_base_model(tree, recipe, default=None if warmup else DEFAULT_RL_MODEL)
    cfg = build_rl_config(tree)
    shape = _shape(cfg.model)
    rollout, prompts, train = cfg.rollout, cfg.prompts, cfg.train
    algorithm = cfg.algorithm
    reference = bool(getattr(algorithm, "uses_reference", getattr(algorithm, "kl_coef", 0) > 0))
    work = Workload(
        tokens=train.micro_batch_tokens,
        doc_tokens=prompts.max_prompt_len + rollout.max_new_tokens,
        keep_last_n_blocks=rollout.block_masking.keep_last_n_blocks,
        checkpointing=cfg.model.gradient_checkpointing,
        backend=_gpu_backend(cfg.model.attn_backend),
        with_entropy=True,
        reference_model=reference,
    )
    par = _parallel(cfg.engine, cfg.optim, cfg.cluster.num_workers)
    note = "; ".join(x for x in (note, _refusal_note(cfg.engine)) if x)
    util = float(getattr(rollout, "gpu_memory_utilization", 0.5))
    colocated = getattr(cfg, "placement", "disaggregated") == "colocated"
    trainer_capacity = capacity * (1 - util) if colocated else capacity
    title = (
        f"recipe {recipe or 'tiny_rl'} (trainer): {shape.name} ({shape.params / 1e9:.2f} B parameters), "
        f"{_engine_words(par)} on {par.world} x {gpu}"
        + (
            f", colocated with rollouts: {trainer_capacity / GiB:.1f} of {capacity / GiB:.1f} GiB"
            if colocated
            else f" ({capacity / GiB:.1f} GiB)"
        )
    )
    fits = _print_plan(title, note, shape, par, work, trainer_capacity, min_tokens=work.doc_tokens)
    weights = 2 * shape.params
    budget = util * capacity
    kv = kv_cache_tokens(shape, budget - weights - 2 * GiB)
    need = rollout.max_batch_size * work.doc_tokens
    rollouts_fit = weights + 2 * GiB <= budget
    print(
        f"rollout workers ({getattr(cfg.rollout_cluster, 'num_workers', '?')} x {gpu}, gpu_memory_utilization={util}): "
        f"bf16 weights {weights / GiB:.1f} GiB + 2 GiB activations of {budget / GiB:.1f} GiB -> KV cache for "
        f"{kv:,} tokens ({'fits' if rollouts_fit else 'DOES NOT FIT'}; {rollout.max_batch_size} sequences of up to "
        f"{work.doc_tokens} tokens need at most {need:,} before eviction)"
    )
    return fits and rollouts_fit


# -- shared ---------------------------------------------------------------------------------------------
def _with_base_model(tree: dict[str, Any], recipe: str | None, default: str | None = None) -> tuple[dict, str]:
    """``tree`` with ``model.path`` filled in when it is unset: the first path in the recipe's chain of
    ``defaults`` (a stage-2 recipe starts from the stage-1 export of that model), else ``default``."""
    if (tree.get("model") or {}).get("path") is not None:
        return tree, ""
    base = _base_model_path(recipe) if recipe else None
    if base:
        note = f"model.path is unset (the stage-1 export, set it before running): planning with the shape of {base}"
    elif default:
        base, note = (
            default,
            (
                f"model.path is unset: planning for {default}; pass model.path=... (a local model "
                "directory or a known model) for another policy"
            ),
        )
    else:
        return tree, ""
    return deep_merge(tree, {"model": {"path": base}}), note


def _with_previous_stage(tree: dict[str, Any], init_from: str) -> dict[str, Any]:
    """``tree`` with the model and the unset ``rollout.block_masking`` options of SFT recipe ``init_from``."""
    from memento_train.config.tree import canonical_tree
    from memento_train.rl.config import RLConfig
    from memento_train.sft.config import SFTConfig
    from memento_train.sft.config import config_tree as sft_tree

    stage = canonical_tree(SFTConfig, sft_tree(init_from, {}))
    tree = canonical_tree(RLConfig, tree)
    rule = {
        k: v
        for k, v in ((stage.get("data") or {}).get("block_masking") or {}).items()
        if k in ("keep_last_n_blocks", "mask_delimiters")
    }
    mask = {**rule, **((tree.get("rollout") or {}).get("block_masking") or {})}
    return deep_merge(
        tree, {"model": {"path": _base_model_path(init_from) or DEFAULT_RL_MODEL}, "rollout": {"block_masking": mask}}
    )


def _shape(mcfg: Any) -> ModelShape:
    if mcfg.path is not None:
        return shape_of_model_path(mcfg.path)
    from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

    return tiny_shape(mcfg.tiny, len(load_shipped_tokenizer()))


def _base_model_path(recipe: str, relative_to: Any = None) -> str | None:
    """The first non-null ``model.path`` in ``recipe``'s chain of ``defaults`` (the recipe itself first)."""
    path = recipe_path(recipe, relative_to)
    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    value = (tree.get("model") or {}).get("path")
    if value:
        return str(value)
    bases = tree.get("defaults") or []
    for base in [bases] if isinstance(bases, str) else bases:
        found = _base_model_path(str(base), path.parent)
        if found:
            return found
    return None


def _gpu_backend(name: str) -> str:
    # ``auto`` on CUDA is flash_attn when installed (gathering keys per interval: the larger workspace).
    return "flash_attn" if name == "auto" else name


def _parallel(engine: Any, optim: Any, world: int) -> Parallel:
    comm, bucket = 2 if engine.precision != "fp32" else 4, None
    if engine.kind == "deepspeed":
        from memento_train.engines.deepspeed import deepspeed_config

        ds = deepspeed_config(engine, optim, world, client_cpu_optimizer=False)
        comm = 4 if ds.get("communication_data_type") in ("fp32", "float32") else comm
        bucket = ds.get("zero_optimization", {}).get("reduce_bucket_size")
    kwargs = {"bucket": int(bucket)} if bucket else {}
    return Parallel(
        kind=engine.kind,
        precision=engine.precision,
        zero_stage=engine.zero_stage,
        offload_optimizer=engine.offload_optimizer,
        offload_params=engine.offload_params,
        tensor_parallel=engine.tensor_parallel,
        pipeline_parallel=engine.pipeline_parallel,
        world=world,
        comm_bytes=comm,
        **kwargs,
    )


def _engine_words(p: Parallel) -> str:
    if p.kind == "megatron":
        return f"megatron TP {p.tensor_parallel} x PP {p.pipeline_parallel} x DP {p.data_parallel} {p.precision}"
    offload = " + optimizer offload" if p.offload_optimizer and (p.kind == "deepspeed" or p.offload_params) else ""
    offload += " + parameter offload" if p.offload_params else ""
    return f"{p.kind} ZeRO-{p.zero_stage} {p.precision}{offload}"


def _refusal_note(engine: Any) -> str:
    why = _engine_refusal(engine)
    return f"WARNING: the engine will refuse this config ({why}); planned without that offload" if why else ""


def _engine_refusal(engine: Any) -> str | None:
    """Why the engine would refuse ``engine`` at build time (checked here too, before any plan), or None."""
    if engine.kind != "fsdp2":
        return None
    from memento_train.engines.fsdp2 import FSDP2Engine

    try:
        FSDP2Engine._check_config(engine)
    except ConfigError as exc:
        return str(exc)
    return None


def _print_plan(
    title: str,
    note: str,
    shape: ModelShape,
    par: Parallel,
    work: Workload,
    capacity: float,
    *,
    min_tokens: int,
    out: Callable[[str], None] = print,
) -> bool:
    plan = plan_memory(shape, par, work, capacity=capacity)
    out(title)
    if note:
        out(f"  note: {note}")
    mask = (
        "causal (stage 1)" if work.keep_last_n_blocks < 0 else f"memento, keep_last_n_blocks={work.keep_last_n_blocks}"
    )
    out(
        f"  micro-batch {work.tokens} tokens of documents up to {work.doc_tokens}, {mask}, gradient checkpointing "
        f"{'on' if work.checkpointing else 'off'}, attention {work.backend}"
    )
    _table(plan, out)
    if plan.fits:
        out(
            f"  fits: peak {plan.device_total / GiB:.1f} of {capacity / GiB:.1f} GiB "
            f"({(capacity - plan.device_total) / GiB:.1f} GiB free)\n"
        )
        return True
    out(f"  DOES NOT FIT: peak {plan.device_total / GiB:.1f} GiB > {capacity / GiB:.1f} GiB")
    fixes = suggestions(shape, par, work, capacity=capacity, min_tokens=min_tokens)
    if fixes:
        out("  any one of these fits:")
        for change, p2 in fixes:
            out(f"    {change:50s} peak {p2.device_total / GiB:6.1f} GiB")
    bigger = [g for g, cap in GPUS.items() if plan.device_total <= cap * GiB]
    out(f"  or a larger GPU: {', '.join(f'gpu={g}' for g in bigger) or 'none is large enough'}\n")
    return False


def _table(plan: MemoryPlan, out: Callable[[str], None]) -> None:
    out(f"  {'per GPU':24s} {'GiB':>7s}")
    for line in plan.device:
        phase = "  [transient]" if line.phase else ""
        out(f"  {line.name:24s} {line.bytes / GiB:7.2f}  {line.note}{phase}")
    out(f"  {'peak':24s} {plan.device_total / GiB:7.2f}  (transient phases do not overlap: the larger counts)")
    out(f"  {'host, per rank':24s} {'GiB':>7s}")
    for line in plan.host:
        out(f"  {line.name:24s} {line.bytes / GiB:7.2f}  {line.note}")
