"""The SFT driver: the single controller of one training stage.

It validates the config, prepares the data once, plans every step, starts the worker group, and then
for each step sends each rank its micro-batches and the learning rate, sums what the ranks report,
logs, and checkpoints; at the end it exports a Hugging Face model. Workers never decide anything, so
a run is reproducible from ``(config, step)`` and resuming is just starting at a later step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from memento_train.checkpoint import CheckpointManager, read_state
from memento_train.cluster import WorkerGroup
from memento_train.config_errors import ConfigError
from memento_train.data.cache import prepare_dataset
from memento_train.flops import peak_tflops
from memento_train.models.loading import load_tokenizer, model_max_length
from memento_train.optim import lr_at
from memento_train.sft.batching import StepPlanner, loss_token_count
from memento_train.sft.config import SFTConfig, build_sft_config
from memento_train.sft.worker import SFTWorker
from memento_train.structured_config import deep_merge, to_dict
from memento_train.tracking import RunLogger


@dataclass
class StageResult:
    """What a finished stage leaves behind."""

    output_dir: str
    hf_dir: str | None
    steps: int
    final_loss: float | None


def check_against_model(cfg: SFTConfig) -> None:
    """Checks that need the model's config (read without weights): attention backend vs layer types,
    engine vs architecture, sequence length vs positions."""
    from memento_train.models.preflight import check_model

    check_model(cfg.model, evicts=cfg.data.mask.keep_last_n_blocks >= 0, engine_kind=cfg.engine.kind)
    limit = model_max_length(cfg.model)
    if limit is not None and cfg.data.max_seq_len > limit:
        raise ConfigError(f"data.max_seq_len ({cfg.data.max_seq_len}) exceeds the model's maximum of {limit} "
                          f"positions (max_position_embeddings); lower data.max_seq_len")


def _aggregate(results: list[dict[str, Any]], plan_loss_tokens: int, elapsed: float, peak: float | None,
               world: int) -> dict[str, Any]:
    total = {k: sum(r[k] for r in results) for k in results[0] if k not in ("grad_norm", "time_s")}
    m: dict[str, Any] = {
        "loss": total["loss_sum"] / max(1, plan_loss_tokens),
        "grad_norm": results[0]["grad_norm"],
        "tokens": total["tokens"],
        "loss_tokens": total["loss_tokens"],
        "sequences": total["sequences"],
        "micro_batches": total["micro_batches"],
        "tokens_per_s": total["tokens"] / elapsed,
        "tokens_per_s_per_worker": float(np.mean([r["tokens"] / r["time_s"] for r in results])),
        "padding_pct": 100.0 * (1 - total["real_tokens"] / max(1, total["tokens"])),
        "evicted_pair_frac": 1 - total["kept_pairs"] / max(1, total["causal_pairs"]),
        "blocks": total["blocks"],
        "summary_tokens": total["summary_tokens"],
        "tflops_per_s_per_worker": total["flops"] / elapsed / world / 1e12,
        "step_time_s": elapsed,
    }
    if peak:
        m["mfu"] = m["tflops_per_s_per_worker"] / peak
    return m


def run_stage(cfg: SFTConfig, tree: dict[str, Any] | None = None, *, progress: bool = True) -> StageResult:
    """Train one stage described by ``cfg`` (``tree`` is its plain form, sent to the workers)."""
    tree = to_dict(cfg) if tree is None else tree
    check_against_model(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.data.cache_dir is None:  # one shared cache: the driver renders, workers load it
        cfg.data.cache_dir = str(out / "cache")
        tree = deep_merge(tree, {"data": {"cache_dir": cfg.data.cache_dir}})
    tree = deep_merge(tree, {"output_dir": str(out)})
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    tokenizer = load_tokenizer(cfg.model)
    dataset, report = prepare_dataset(cfg.data, tokenizer=tokenizer)
    if cfg.train.max_samples is not None:
        dataset = dataset.select(range(min(cfg.train.max_samples, len(dataset))))
    lengths = np.asarray(dataset["num_tokens"], dtype=np.int64)
    # Streamed in batches: the labels column of a full OpenMementos cache is gigabytes.
    loss_tokens = [loss_token_count(np.asarray(x)) for batch in dataset.select_columns(["labels"]).iter(1024)
                   for x in batch["labels"]]
    planner = StepPlanner(lengths, loss_tokens, global_batch_size=cfg.train.global_batch_size,
                          micro_batch_tokens=cfg.train.micro_batch_tokens, world_size=cfg.data_parallel_size,
                          seed=cfg.train.seed, shuffle=cfg.train.shuffle, epochs=cfg.train.epochs,
                          max_steps=cfg.train.max_steps)

    ckpts = CheckpointManager(out / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    ckpts.clean_staging()
    resume_from = ckpts.resolve(cfg.resume)
    start = read_state(resume_from)["step"] if resume_from else 0

    logger = RunLogger(out, total_steps=planner.total_steps, start_step=start, logger=cfg.logger,
                       wandb_cfg=cfg.wandb, config=to_dict(cfg), desc=f"stage {cfg.stage}", progress=progress)
    logger.write(f"[memento-train] stage {cfg.stage}: {report}; {len(lengths)} examples, "
                 f"{planner.total_steps} steps of {cfg.train.global_batch_size} sequences "
                 f"on {cfg.cluster.num_workers} worker(s), engine {cfg.engine.kind}; writing to {out}")
    group = WorkerGroup(SFTWorker, cfg.cluster, tree, name=f"sft-stage{cfg.stage}")
    last_loss = None
    try:
        info = group.run("setup")
        peak = peak_tflops(info[0]["device_name"])
        dp_rank = [i["dp_rank"] for i in info]
        # One reporting rank per model replica: tensor/pipeline-parallel peers see the same tokens.
        reporters = sorted({d: r for r, d in reversed(list(enumerate(dp_rank)))}.values())
        if resume_from:
            group.run("load", str(resume_from))
            logger.write(f"[memento-train] resumed from {resume_from} (step {start})")
        saved_at = start if resume_from else -1
        for step in range(start, planner.total_steps):
            plan = planner.plan(step)
            lr = lr_at(step, planner.schedule_steps, cfg.optim)
            t0 = time.perf_counter()
            results = group.run_each("train_step", [(plan.per_rank[dp_rank[r]], plan.num_loss_tokens, lr)
                                                    for r in range(group.world_size)])
            metrics = _aggregate([results[r] for r in reporters], plan.num_loss_tokens,
                                 time.perf_counter() - t0, peak, group.world_size)
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {step + 1}; lower optim.lr or check the data")
            metrics.update(lr=lr, epoch=plan.epoch)
            last_loss = metrics["loss"]
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == planner.total_steps:
                logger.log(step + 1, metrics)
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0:
                _save(group, ckpts, step + 1, plan.epoch)
                saved_at = step + 1
        if saved_at != planner.total_steps:
            _save(group, ckpts, planner.total_steps, planner.total_steps // planner.steps_per_epoch)
        hf_dir = None
        if cfg.checkpoint.export_hf:
            hf_dir = str(out / "hf")
            info = {"stage": cfg.stage, "step": planner.total_steps, "mask": to_dict(cfg.data.mask),
                    "base_model": cfg.model.path, "final_loss": last_loss}
            group.run("export_hf", hf_dir, info)
            logger.write(f"[memento-train] exported Hugging Face model to {hf_dir}")
    finally:
        group.shutdown()
        logger.close()
    return StageResult(str(out), hf_dir, planner.total_steps, last_loss)


def _save(group: WorkerGroup, ckpts: CheckpointManager, step: int, epoch: int) -> None:
    staging = ckpts.stage(step)
    group.run("save", str(staging))
    ckpts.commit(step, staging, {"epoch": epoch, "data_position": step})


def export_checkpoint(checkpoint: str, out_dir: str, overrides: dict[str, Any] | None = None) -> str:
    """``memento-train export``: load a resumable checkpoint with its run's config, write an HF model."""
    ckpt = Path(checkpoint)
    config_file = ckpt.parent.parent / "config.yaml"
    if not (ckpt / "trainer_state.json").is_file() or not config_file.is_file():
        raise ConfigError(f"checkpoint={checkpoint!r} is not a complete memento-train checkpoint "
                          f"(expected <output_dir>/checkpoints/step_N with {config_file.name} two levels up)")
    tree = deep_merge(yaml.safe_load(config_file.read_text()), overrides or {})
    tree["model"]["require_stage1_init"] = False  # the stage-1 source need not exist any more
    cfg = build_sft_config(tree)
    state = read_state(ckpt)
    group = WorkerGroup(SFTWorker, cfg.cluster, to_dict(cfg), name="sft-export")
    try:
        group.run("setup")
        group.run("load", str(ckpt))
        info = {"stage": cfg.stage, "step": state["step"], "mask": to_dict(cfg.data.mask), "base_model": cfg.model.path}
        group.run("export_hf", out_dir, info)
    finally:
        group.shutdown()
    return out_dir

