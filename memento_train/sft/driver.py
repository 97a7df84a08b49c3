"""The SFT driver: the single controller of one training stage.

It validates the config, prepares the data once, plans every step, starts the worker group, and then
for each step sends each rank its micro-batches and the learning rate, sums what the ranks report,
logs, and checkpoints; at the end it exports a Hugging Face model. Workers never decide anything, so
a run is reproducible from ``(config, step)`` and resuming is just starting at a later step.

Faults (``faults.*``, :mod:`memento_train.faults`): a dead worker process or a hung step (watchdog)
tears the group down, rebuilds it and resumes from the last valid checkpoint, up to
``faults.max_restarts`` times; a preemption signal checkpoints at the step boundary and stops; a
checkpoint write that fails on storage stops the run or, with ``checkpoint.on_save_error=retry``,
is retried at the next checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from memento_train.checkpoint.manager import CheckpointManager, read_state
from memento_train.cluster import WorkerError, WorkerGroup
from memento_train.cluster.session import RaySession
from memento_train.cluster.worker_group import group_env
from memento_train.config.errors import ConfigError
from memento_train.config.tree import deep_merge, to_dict
from memento_train.data.prepared import check_examples_source, load_examples
from memento_train.faults.preemption import PreemptionGuard
from memento_train.faults.secrets import redact_config
from memento_train.faults.watchdog import StepHang, StepWatchdog, describe_stacks
from memento_train.models.loading import model_max_length, run_tokenizer
from memento_train.sft.batching import StepPlanner, loss_token_count
from memento_train.sft.config import SFTConfig, build_sft_config
from memento_train.sft.worker import SFTWorker
from memento_train.training.flops import peak_tflops
from memento_train.training.optim import lr_at
from memento_train.training.run_dir import export_hf, open_logger, resume_point, save_or_skip, write_run_config
from memento_train.training.tracking import RunLogger


@dataclass
class StageResult:
    """What a finished stage leaves behind."""

    output_dir: str
    hf_dir: str | None
    steps: int
    final_loss: float | None


def check_against_model(cfg: SFTConfig, tokenizer: Any = None) -> None:
    """Checks that need the model's config or tokenizer (no weights): attention backend vs layer
    types, engine vs architecture, sequence length vs positions, and the data's tokenizer and
    ``data.prepared`` directory vs the model's tokenizer (``tokenizer``, loaded when not given)."""
    from memento_train.models.preflight import check_model

    check_model(cfg.model, evicts=cfg.data.block_masking.keep_last_n_blocks >= 0, engine_kind=cfg.engine.kind)
    limit = model_max_length(cfg.model)
    if limit is not None and cfg.data.max_seq_len > limit:
        raise ConfigError(
            f"data.max_seq_len ({cfg.data.max_seq_len}) exceeds the model's maximum of {limit} "
            f"positions (max_position_embeddings); lower data.max_seq_len"
        )
    if cfg.data.tokenizer is not None or cfg.data.prepared is not None:
        tokenizer = run_tokenizer(cfg.model) if tokenizer is None else tokenizer
        check_examples_source(cfg.data, tokenizer, cfg.model.tokenizer or cfg.model.path)


def _aggregate(
    results: list[dict[str, Any]], plan_loss_tokens: int, elapsed: float, peak: float | None, world: int
) -> dict[str, Any]:
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
    """Train one stage described by ``cfg`` (``tree`` is its plain form, sent to the workers).

    Raises :class:`~memento_train.faults.preemption.Preempted` after checkpointing when a preemption
    signal arrived, and :class:`~memento_train.checkpoint.manager.CheckpointError` (``CheckpointSaveError``)
    when no checkpoint can be resumed from or written.
    """
    tree = to_dict(cfg) if tree is None else tree
    tokenizer = run_tokenizer(cfg.model)
    check_against_model(cfg, tokenizer)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.data.cache_dir is None:  # one shared cache: the driver renders, workers load it
        cfg.data.cache_dir = str(out / "cache")
        tree = deep_merge(tree, {"data": {"cache_dir": cfg.data.cache_dir}})
    tree = deep_merge(tree, {"output_dir": str(out)})
    public = write_run_config(cfg)

    dataset, report = load_examples(cfg.data, tokenizer, cfg.model.tokenizer or cfg.model.path)
    if cfg.train.max_samples is not None:
        dataset = dataset.select(range(min(cfg.train.max_samples, len(dataset))))
    lengths = np.asarray(dataset["num_tokens"], dtype=np.int64)
    # Streamed in batches: the labels column of a full OpenMementos cache is gigabytes.
    loss_tokens = [
        loss_token_count(np.asarray(x))
        for batch in dataset.select_columns(["labels"]).iter(1024)
        for x in batch["labels"]
    ]
    planner = StepPlanner(
        lengths,
        loss_tokens,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_tokens=cfg.train.micro_batch_tokens,
        world_size=cfg.data_parallel_size,
        seed=cfg.train.seed,
        shuffle=cfg.train.shuffle,
        epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
    )

    ckpts, resume_from, start = resume_point(cfg, warn=_warn)
    logger = open_logger(
        cfg, public, total_steps=planner.total_steps, start_step=start, desc=f"stage {cfg.stage}", progress=progress
    )
    source = f"prepared in {cfg.data.prepared}, " if cfg.data.prepared else ""
    logger.write(
        f"[memento-train] stage {cfg.stage}: {report}; {source}{len(lengths)} examples, "
        f"{planner.total_steps} steps of {cfg.train.global_batch_size} sequences "
        f"on {cfg.cluster.num_workers} worker(s), engine {cfg.engine.kind}; writing to {out}"
    )
    # The driver owns Ray (when used), so a rebuilt worker group reuses it; ray.init also installs a
    # SIGTERM handler, which the preemption guard below replaces.
    session = (
        RaySession.open(
            cfg.cluster,
            needed_cpus=cfg.cluster.num_workers * cfg.cluster.cpus_per_worker,
            worker_env=group_env(cfg.cluster),
        )
        if cfg.cluster.use_ray
        else None
    )
    stage = _Stage(cfg, redact_config(tree), out, logger, planner, ckpts)
    try:
        with PreemptionGuard() as preempt:
            stage.run(start, resume_from, preempt)
    finally:
        stage.close()
        logger.close()
        if session is not None:
            session.close()
    return StageResult(str(out), stage.hf_dir, planner.total_steps, stage.last_loss)


def _warn(message: str) -> None:
    print(f"[memento-train] warning: {message}", flush=True)


class _Stage:
    """One stage's training loop around a worker group that may be rebuilt (restarts)."""

    def __init__(
        self,
        cfg: SFTConfig,
        tree: dict[str, Any],
        out: Path,
        logger: RunLogger,
        planner: StepPlanner,
        ckpts: CheckpointManager,
    ) -> None:
        self.cfg, self.tree, self.out, self.logger, self.planner, self.ckpts = cfg, tree, out, logger, planner, ckpts
        f = cfg.faults
        self.watchdog = StepWatchdog(f.watchdog_factor, f.watchdog_min_s, f.watchdog_warmup_steps)
        self.group: WorkerGroup | None = None
        self.restarts = 0
        self.save_failures = 0
        self.saved_at = -1  # the step of the newest checkpoint written (or resumed from) by this run
        self.last_loss: float | None = None
        self.hf_dir: str | None = None

    # ------------------------------------------------------------------ the outer loop: restarts

    def run(self, start: int, resume_from: Path | None, preempt: PreemptionGuard) -> None:
        while True:
            try:
                self._start_group(start, resume_from)
                self._train(start, preempt)
                return
            except Exception as exc:
                why = self._restartable(exc)
                if why is None:
                    raise
                limit = self.cfg.faults.max_restarts
                if self.restarts >= limit:
                    raise RuntimeError(
                        f"{why}; giving up after {self.restarts} restart(s) (faults.max_restarts={limit})"
                    ) from exc
                self.restarts += 1
                self._stop_group(graceful=False)  # its ranks are dead, hung or stuck in a collective
                keep_fresh = self.cfg.resume == "never" and self.saved_at < 0
                resume_from = None if keep_fresh else self.ckpts.resolve("auto", warn=_warn)
                start = read_state(resume_from)["step"] if resume_from else 0
                self.saved_at = start if resume_from else -1
                self.logger.rewind(start)
                self.logger.write(
                    f"[memento-train] {why}: restart {self.restarts} of {limit}: rebuilding the "
                    f"worker group and resuming from {resume_from or 'the start'} (step {start})"
                )

    def _restartable(self, exc: BaseException) -> str | None:
        """Why ``exc`` warrants rebuilding the group, or None (a bug, bad config, storage: fail)."""
        if isinstance(exc, StepHang):
            return f"step {exc.step} hung" if self.cfg.faults.on_hang == "restart" else None
        if isinstance(exc, WorkerError) and exc.died:
            return f"rank {exc.rank} died during {exc.method}()"
        if isinstance(exc, WorkerError) and exc.detail.startswith("failed inside collective"):
            return f"rank {exc.rank} {exc.detail.splitlines()[0]}"
        return None

    def _start_group(self, start: int, resume_from: Path | None) -> None:
        cfg = self.cfg
        self.group = WorkerGroup(SFTWorker, cfg.cluster, self.tree, name=f"sft-stage{cfg.stage}")
        self.group.enable_stack_dumps(str(self.out / "stacks"))
        info = self.group.run("setup")
        self.peak = peak_tflops(info[0]["device_name"])
        self.dp_rank = [i["dp_rank"] for i in info]
        # One reporting rank per model replica: tensor/pipeline-parallel peers see the same tokens.
        self.reporters = sorted({d: r for r, d in reversed(list(enumerate(self.dp_rank)))}.values())
        if resume_from:
            self.group.run("load", str(resume_from))
            self.logger.write(f"[memento-train] resumed from {resume_from} (step {start})")

    def _stop_group(self, graceful: bool = True) -> None:
        if self.group is not None:
            self.group.shutdown(graceful=graceful)
            self.group = None

    def close(self) -> None:
        self._stop_group()

    # ------------------------------------------------------------------ the inner loop: steps

    def _train(self, start: int, preempt: PreemptionGuard) -> None:
        cfg, planner = self.cfg, self.planner
        for i, step in enumerate(range(start, planner.total_steps)):
            metrics = self._step(step, timed=i > 0)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == planner.total_steps:
                self.logger.log(step + 1, metrics)
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0:
                self._save(step + 1, metrics["epoch"], final=False)
            preempt.stop_if_requested(
                step + 1,
                planner.total_steps,
                self.saved_at,
                save=lambda step=step, epoch=metrics["epoch"]: self._save(step + 1, epoch, final=True),
                checkpoint=str(self.ckpts.root / f"step_{step + 1:08d}"),
            )
        if self.saved_at != planner.total_steps:
            self._save(planner.total_steps, planner.total_steps // planner.steps_per_epoch, final=True)
        if cfg.checkpoint.export_hf:
            info = {
                "stage": cfg.stage,
                "step": planner.total_steps,
                "block_masking": to_dict(cfg.data.block_masking),
                "base_model": cfg.model.path,
                "final_loss": self.last_loss,
            }
            self.hf_dir = export_hf(self.group, self.out, info, self.logger, "memento-train")

    def _step(self, step: int, *, timed: bool) -> dict[str, Any]:
        """One optimizer step. The first step of a fresh group (compilation, lazy init) is not timed
        against the median; the others must finish within the watchdog's deadline."""
        cfg, group = self.cfg, self.group
        plan = self.planner.plan(step)
        lr = lr_at(step, self.planner.schedule_steps, cfg.optim)
        args = [(plan.per_rank[self.dp_rank[r]], plan.num_loss_tokens, lr) for r in range(group.world_size)]
        kwargs: list[dict[str, Any]] = [{} for _ in range(group.world_size)]
        if cfg.faults.inject_hang_at_step == step + 1 and self.restarts == 0:
            kwargs[-1] = {"hang_s": 3600.0}
        deadline = self.watchdog.deadline() if timed else None
        t0 = time.perf_counter()
        try:
            results = group.run_each("train_step", args, kwargs, timeout=deadline)
        except TimeoutError:
            raise self._hang(step + 1, deadline) from None
        elapsed = time.perf_counter() - t0
        if timed:
            self.watchdog.record(elapsed)
        metrics = _aggregate(
            [results[r] for r in self.reporters], plan.num_loss_tokens, elapsed, self.peak, group.world_size
        )
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at step {step + 1}; lower optim.lr or check the data")
        metrics.update(lr=lr, epoch=plan.epoch, restarts=self.restarts, checkpoint_save_failures=self.save_failures)
        self.last_loss = metrics["loss"]
        return metrics

    def _hang(self, step: int, deadline: float) -> StepHang:
        """Dump every worker's stacks into ``hangs/`` and name what each rank is doing."""
        dump_dir = self.out / "hangs" / f"step_{step:08d}-attempt{self.restarts}"
        dump_dir.mkdir(parents=True, exist_ok=True)
        stacks = self.group.dump_stacks()
        for rank, text in stacks.items():
            (dump_dir / f"rank_{rank:05d}.txt").write_text(text)
        report = describe_stacks(stacks) if stacks else "  (no stacks: the watchdog needs cluster.use_ray=true)"
        (dump_dir / "summary.txt").write_text(report + "\n")
        hang = StepHang(step, deadline, report, str(dump_dir))
        self.logger.write(f"[memento-train] {hang}")
        return hang

    def _save(self, step: int, epoch: int, *, final: bool) -> None:
        saved = save_or_skip(
            self.group,
            self.ckpts,
            step,
            {"epoch": epoch, "data_position": step},
            on_save_error=self.cfg.checkpoint.on_save_error,
            final=final,
            logger=self.logger,
            prog="memento-train",
            barrier_timeout_s=max(60.0, self.cfg.faults.watchdog_min_s),
        )
        if saved:
            self.saved_at = step
        else:
            self.save_failures += 1


def export_checkpoint(checkpoint: str, out_dir: str, overrides: dict[str, Any] | None = None) -> str:
    """``memento-train export``: load a resumable checkpoint with its run's config, write an HF model."""
    ckpt = Path(checkpoint)
    config_file = ckpt.parent.parent / "config.yaml"
    if not (ckpt / "trainer_state.json").is_file() or not config_file.is_file():
        raise ConfigError(
            f"checkpoint={checkpoint!r} is not a complete memento-train checkpoint "
            f"(expected <output_dir>/checkpoints/step_N with {config_file.name} two levels up)"
        )
    tree = deep_merge(yaml.safe_load(config_file.read_text()), overrides or {})
    tree["model"]["require_stage1_init"] = False  # the stage-1 source need not exist any more
    cfg = build_sft_config(tree)
    state = read_state(ckpt)
    group = WorkerGroup(SFTWorker, cfg.cluster, to_dict(cfg), name="sft-export")
    try:
        group.run("setup")
        group.run("load", str(CheckpointManager(ckpt.parent).resolve(str(ckpt))))
        info = {
            "stage": cfg.stage,
            "step": state["step"],
            "block_masking": to_dict(cfg.data.block_masking),
            "base_model": cfg.model.path,
        }
        group.run("export_hf", out_dir, info)
    finally:
        group.shutdown()
    return out_dir
