"""The RL driver: the single controller of ``memento-rl``.

Each step: the step's prompts (a pure function of ``(seed, step)``) → the rollout pool samples
``group_size`` responses per prompt with block eviction (per-sequence seeds, also pure in
``(seed, step, sample)``, so a retried or resumed step reproduces its samples) → the reward pool
scores them → group advantages → the trainer ranks train on the rollout tokens under the same memento
mask → weights synced to the rollout workers → metrics logged (JSONL + wandb), evaluation every
``eval.every`` steps, a checkpoint every ``checkpoint.every`` steps. Workers never decide anything.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memento_train.cluster import WorkerGroup
from memento_train.config.errors import ConfigError
from memento_train.config.tree import deep_merge, to_dict
from memento_train.data.problems import ProblemSource, load_problem_records
from memento_train.data.synthetic import synthetic_records
from memento_train.faults.preemption import PreemptionGuard
from memento_train.faults.secrets import redact_config
from memento_train.generation.prompt import generation_prompt_ids
from memento_train.generation.sampling import derive_seed
from memento_train.masking import SpecialTokens
from memento_train.models.loading import run_tokenizer
from memento_train.rl.advantages import compute_advantages, group_ids_for, group_reward_stats
from memento_train.rl.config import RLConfig
from memento_train.rl.losses import aggregation_weights, reduce_metrics
from memento_train.rl.rewards import RewardBatch, RewardPool
from memento_train.rl.rollout_worker import RolloutPool, RolloutRequest
from memento_train.rl.trainer_worker import RLTrainerWorker, rollout_document
from memento_train.rl.weight_sync import sync_weights
from memento_train.tokens import special_token_ids
from memento_train.training.micro_batches import plan_micro_batches
from memento_train.training.optim import lr_at
from memento_train.training.run_dir import export_hf, open_logger, resume_point, save_or_skip, write_run_config
from memento_train.training.tracking import RunLogger

# Offsets that keep the seed streams of training rollouts, evaluation and the warm-up data apart.
EVAL_SEED_OFFSET = 1_000_003
WARMUP_DATA_SEED_OFFSET = 2_000_003


@dataclass
class RLResult:
    """What a finished run leaves behind."""

    output_dir: str
    hf_dir: str | None
    steps: int
    reward_means: list[float]


# ---------------------------------------------------------------- pure pieces (unit-tested)


def prompt_indices(step: int, seed: int, num_prompts: int, per_step: int) -> np.ndarray:
    """Dataset indices of step ``step``'s prompts: epoch-wise permutations seeded by ``(seed, epoch)``,
    read consecutively. Pure in its arguments, so a resumed run sees the same prompts."""
    positions = np.arange(step * per_step, (step + 1) * per_step)
    out = np.empty(per_step, np.int64)
    for epoch in np.unique(positions // num_prompts):
        sel = positions // num_prompts == epoch
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_prompts)
        out[sel] = perm[positions[sel] % num_prompts]
    return out


def sample_seed(seed: int, step: int, key: int) -> int:
    """The sampling seed of response ``key`` (``prompt_pos * group_size + sample``) at ``step``."""
    return derive_seed(seed, step, key)


def rollout_metrics(
    results: list[dict], prompt_lens: list[int], scores: list[float], group_size: int
) -> dict[str, float]:
    """Reward, accuracy, length, blocks and KV metrics of one batch of responses.

    ``compression_ratio``: the responses' KV-AUC without eviction (``Σ_i (P + i)``) over the AUC
    measured with eviction; ``peak_kv``: live KV entries per layer at the worst moment.
    """
    r = torch.tensor(scores, dtype=torch.float64)
    stats = group_reward_stats(r, group_ids_for(len(scores) // group_size, group_size))
    lengths = np.array([len(x["token_ids"]) for x in results], np.float64)
    full_auc = np.array([n * p + n * (n - 1) / 2 for n, p in zip(lengths, prompt_lens)])
    auc = np.array([x["kv_auc"] for x in results], np.float64)
    peak = np.array([x["peak_kv"] for x in results], np.float64)
    return {
        "reward_mean": stats["reward/mean"],
        "reward_std": stats["reward/std"],
        "accuracy": float(np.mean(np.asarray(scores) >= 1.0)),
        "groups_all_equal_frac": stats["groups/all_equal_frac"],
        "response_length": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "truncated_frac": float(np.mean([x["finish_reason"] == "length" for x in results])),
        "blocks_per_response": float(np.mean([x["num_blocks"] for x in results])),
        "forced_block_ends": float(np.sum([x["forced_block_ends"] for x in results])),
        "peak_kv": float(peak.mean()),
        "peak_kv_max": float(peak.max()),
        "kv_auc": float(auc.mean()),
        "compression_ratio": float(full_auc.sum() / max(1.0, auc.sum())),
    }


def loss_token_masks(results: list[dict], scores: list[float], group_size: int, algorithm) -> list[np.ndarray]:
    """Per response, which of its tokens the loss trains on (``algorithm`` options, see
    :class:`~memento_train.rl.algorithm.AlgorithmConfig`): every token, minus the block ends the block cap
    forced (unless ``train_forced_tokens``), minus whole responses that hit the token budget
    (``mask_truncated``) or whose group's rewards are all equal (``drop_zero_adv_groups``)."""
    r = np.asarray(scores, np.float64).reshape(-1, group_size)
    flat_group = np.repeat(r.max(1) == r.min(1), group_size)
    out = []
    for x, all_equal in zip(results, flat_group):
        keep = np.ones(len(x["token_ids"]), bool)
        if not algorithm.train_forced_tokens:
            keep &= ~np.asarray(x["forced"], bool)
        if (algorithm.mask_truncated and x["finish_reason"] == "length") or (
            algorithm.drop_zero_adv_groups and all_equal
        ):
            keep[:] = False
        out.append(keep)
    return out


# ---------------------------------------------------------------- problems and prompts


def load_problems(source: ProblemSource, *, synthetic_task=None, num: int | None) -> list[dict[str, Any]]:
    """``num`` synthetic records (``source.path == "synthetic"``), or the first ``num`` (``None``: all)
    records of a problem set (:func:`memento_train.data.problems.load_problem_records`)."""
    if source.path == "synthetic":
        return synthetic_records(num, synthetic_task)
    return load_problem_records(source, limit=num)


def encode_prompts(
    records: list[dict], tokenizer: Any, max_len: int, system_prompt: str | None = None
) -> tuple[list[dict], list[list[int]]]:
    """Generation prompts (:func:`~memento_train.generation.prompt.generation_prompt_ids`: the serving
    chat template, ending with the assistant header; the model writes ``<think>`` itself); records whose
    prompt exceeds ``max_len`` tokens are dropped."""
    kept, ids = [], []
    for rec in records:
        p = generation_prompt_ids(tokenizer, rec["problem"], system_prompt)
        if len(p) <= max_len:
            kept.append(rec)
            ids.append(p)
    if not kept:
        raise ValueError(f"every prompt is longer than prompts.max_prompt_len={max_len} tokens")
    return kept, ids


# ---------------------------------------------------------------- the loop


class _RunState:
    """State of one run (built by :func:`run_rl`); one method per phase keeps the loop readable."""

    def __init__(self, cfg: RLConfig, tree: dict[str, Any], logger: RunLogger) -> None:
        self.cfg, self.tree, self.logger = cfg, tree, logger
        tok = run_tokenizer(cfg.model)
        self.tokenizer = tok
        self.special = SpecialTokens.from_mapping(special_token_ids(tok))
        self.mask = cfg.rollout.block_masking.rule()
        p = cfg.prompts
        self.records, self.prompts = encode_prompts(
            load_problems(p, synthetic_task=p.synthetic, num=p.num_records), tok, p.max_prompt_len, p.system_prompt
        )
        # Evaluation: every set's problems in one list; eval_sets[name] is its slice of it.
        self.eval_records, self.eval_prompts, self.eval_sets = [], [], {}
        if cfg.eval.every or cfg.eval.at_start:
            e = cfg.eval
            task = replace(p.synthetic, seed=p.synthetic.seed + EVAL_SEED_OFFSET)
            for name, source in e.sets.items():
                records, prompts = encode_prompts(
                    load_problems(source, synthetic_task=task, num=e.num_problems),
                    tok,
                    p.max_prompt_len,
                    p.system_prompt,
                )
                self.eval_sets[name] = slice(len(self.eval_records), len(self.eval_records) + len(records))
                self.eval_records += records
                self.eval_prompts += prompts

    def sampling(self, temperature: float, max_new_tokens: int) -> dict[str, Any]:
        r = self.cfg.rollout
        return {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": r.top_p,
            "stop_token_ids": (int(self.tokenizer.eos_token_id),),
        }

    def score(self, rewards: RewardPool, results: list[dict], records: list[dict]) -> tuple[RewardBatch, int]:
        """Scores (with the grading rule's verdicts); a batch in which a reward worker crashed is scored
        again (the reward is a pure function, so retrying changes nothing but the lost items). Returns
        the final batch, whose ``crashes`` also count those of the attempts before it, and the retries."""
        texts = [x["text"] for x in results]
        reasons = [x["finish_reason"] for x in results]
        crashes = 0
        for attempt in range(self.cfg.faults.max_step_retries + 1):
            batch = rewards.score(texts, records, reasons)
            if not batch.crashes:
                batch.crashes = crashes
                return batch, attempt
            crashes += batch.crashes
            self.logger.write(
                f"[memento-rl] {batch.crashes} reward item(s) lost to a crashed reward worker; "
                f"rescoring the batch ({'; '.join(batch.messages[:2])})"
            )
        raise RuntimeError(f"reward workers kept crashing (faults.max_step_retries={self.cfg.faults.max_step_retries})")


def _open_ray(cfg: RLConfig):
    """The driver owns Ray (both worker pools live in it) when either pool uses it."""
    if not cfg.cluster.use_ray:
        return None
    from memento_train.cluster.session import RaySession, worker_code_paths

    env = {"PYTHONPATH": os.pathsep.join(worker_code_paths())}
    cpus = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    if cfg.placement == "disaggregated":
        cpus += cfg.rollout_cluster.num_workers * cfg.rollout_cluster.cpus_per_worker
    return RaySession.open(cfg.cluster, needed_cpus=cpus, worker_env=env)


def run_rl(cfg: RLConfig, tree: dict[str, Any] | None = None, *, progress: bool = True) -> RLResult:
    """Run ``cfg`` to ``train.total_steps`` (or ``train.max_steps``); resumable with ``resume=auto``.

    The policy starts from ``model.path``; with ``warmup.enabled`` that is the SFT warm-up's export,
    made first by :func:`memento_train.pipelines.rl_warmup.warm_up_then_run_rl`."""
    if cfg.warmup.enabled and cfg.model.path is None:
        raise ConfigError(
            "warmup.enabled=true: the policy is the SFT warm-up's export, which run_rl does not "
            "train; run memento_train.pipelines.rl_warmup.warm_up_then_run_rl(cfg) (what memento-rl "
            "does), or set model.path"
        )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tree = deep_merge(to_dict(cfg) if tree is None else tree, {"model": to_dict(cfg.model), "output_dir": str(out)})
    tree = redact_config(tree)  # workers get secrets through their environment, never the config
    public = write_run_config(cfg)

    ckpts, resume_from, start = resume_point(cfg)
    total = cfg.train.total_steps
    end = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    logger = open_logger(cfg, public, total_steps=end, start_step=start, desc="rl", progress=progress)

    def save(step: int, *, final: bool = False) -> bool:
        """Checkpoint ``step``; with ``checkpoint.on_save_error=retry`` a storage failure of a periodic
        checkpoint is logged and training goes on (returns False)."""
        state = {"data_position": step}
        on_error = cfg.checkpoint.on_save_error
        return save_or_skip(
            trainer, ckpts, step, state, on_save_error=on_error, final=final, logger=logger, prog="memento-rl"
        )

    session = _open_ray(cfg)
    preempt = PreemptionGuard().__enter__()  # after ray.init, which installs its own SIGTERM handler
    trainer = pool = rewards = None
    reward_means: list[float] = []
    hf_dir = None
    try:
        run = _RunState(cfg, tree, logger)
        logger.write(
            f"[memento-rl] {len(run.prompts)} prompts, {cfg.rollout.prompts_per_step} x "
            f"{cfg.rollout.group_size} responses per step, steps {start + 1}..{end} of {total}; "
            f"trainer {cfg.cluster.num_workers} x {cfg.engine.kind}, rollout {cfg.rollout_cluster.num_workers} "
            f"worker(s), placement {cfg.placement}; writing to {out}"
        )
        trainer = WorkerGroup(RLTrainerWorker, cfg.cluster, tree, name="rl-trainer")
        trainer.run("setup")
        pool = RolloutPool(cfg, tree)
        rewards = RewardPool.from_config(cfg.reward)
        if resume_from:
            trainer.run("load", str(resume_from))
            logger.write(f"[memento-rl] resumed from {resume_from} (step {start})")
        sync = sync_weights(trainer, pool, start)
        via = f"{sync.method} ({sync.backend}, {sync.buckets} bucket(s))" if sync.backend else sync.method
        logger.write(f"[memento-rl] initial weight sync via {via}: {sync.total_s:.2f} s")
        if cfg.eval.at_start and start == 0:
            logger.log(0, _evaluate(run, pool, rewards, 0))
        saved_at = start if resume_from else -1
        for step in range(start, end):
            metrics = _step(run, trainer, pool, rewards, step)
            reward_means.append(metrics["reward_mean"])
            if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == end):
                metrics.update(_evaluate(run, pool, rewards, step + 1))
            logger.log(step + 1, metrics)
            if (step + 1) % cfg.train.log_every == 0:
                logger.write(
                    f"[memento-rl] step {step + 1}: reward {metrics['reward_mean']:.3f} "
                    f"acc {metrics['accuracy']:.3f} len {metrics['response_length']:.0f} "
                    f"step {metrics['time/step_s']:.1f}s"
                )
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and save(step + 1):
                saved_at = step + 1
            preempt.stop_if_requested(
                step + 1,
                end,
                saved_at,
                save=lambda step=step: save(step + 1, final=True),
                checkpoint=str(ckpts.root / f"step_{step + 1:08d}"),
            )
        if saved_at != end and end > start:
            save(end, final=True)
        if cfg.checkpoint.export_hf and end == total:
            hf_dir = export_hf(
                trainer,
                out,
                {"stage": "rl", "step": end, "block_masking": to_dict(run.mask), "base_model": cfg.model.path},
                logger,
                "memento-rl",
            )
    finally:
        preempt.__exit__(None, None, None)
        for closer in (rewards, pool, trainer):
            if closer is not None:
                (closer.close if isinstance(closer, RewardPool) else closer.shutdown)()
        logger.close()
        if session is not None:
            session.close()
    return RLResult(str(out), hf_dir, end, reward_means)


def _step(run: _RunState, trainer: WorkerGroup, pool: RolloutPool, rewards: RewardPool, step: int) -> dict[str, Any]:
    cfg = run.cfg
    g, n_prompts = cfg.rollout.group_size, cfg.rollout.prompts_per_step
    t_step = time.perf_counter()
    idx = prompt_indices(step, cfg.seed, len(run.prompts), n_prompts)
    requests = [
        RolloutRequest(key=j * g + s, prompt_ids=run.prompts[i], seed=sample_seed(cfg.seed, step, j * g + s))
        for j, i in enumerate(idx)
        for s in range(g)
    ]
    records = [run.records[i] for i in idx for _ in range(g)]

    t0 = time.perf_counter()
    crash = 0 if cfg.faults.inject_rollout_crash_at_step == step + 1 else None
    results, rollout_retries = pool.generate(
        requests,
        run.sampling(cfg.rollout.temperature, cfg.rollout.max_new_tokens),
        crash_worker=crash,
        max_retries=cfg.faults.max_step_retries,
    )
    rollout_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    reward_batch, reward_retries = run.score(rewards, results, records)
    scores = reward_batch.scores
    reward_s = time.perf_counter() - t0

    alg = cfg.algorithm
    prompt_lens = [len(r.prompt_ids) for r in requests]
    adv = compute_advantages(
        torch.tensor(scores, dtype=torch.float64), group_ids_for(n_prompts, g), alg.adv_norm, alg.adv_eps
    ).tolist()
    trained = loss_token_masks(results, scores, g, alg)
    # Mini-batches hold whole groups (a group's advantages are relative to each other); each is packed
    # into micro-batches per rank. Its aggregation weights and normaliser depend on whole sequences and
    # groups of the mini-batch, which micro-batches and ranks split, so they are computed here.
    minis = [
        list(range(int(c[0]) * g, (int(c[-1]) + 1) * g))  # array_split keeps the prompt chunks contiguous
        for c in np.array_split(np.arange(n_prompts), cfg.train.mini_batches)
    ]
    per_rank: list[list[list[list[dict]]]] = [[] for _ in range(trainer.world_size)]
    normalisers = []
    for mini in minis:
        weights, z = aggregation_weights(
            alg.loss_agg,
            [int(trained[i].sum()) for i in mini],
            [i // g for i in mini],
            max_response_len=cfg.rollout.max_new_tokens,
        )
        docs = [
            rollout_document(
                requests[i].prompt_ids,
                results[i]["token_ids"],
                results[i]["logprobs"],
                adv[i],
                run.special,
                run.mask,
                trained=trained[i],
                weight=w,
            )
            for i, w in zip(mini, weights)
        ]
        plan = plan_micro_batches([len(d["input_ids"]) for d in docs], cfg.train.micro_batch_tokens, trainer.world_size)
        for r in range(trainer.world_size):
            per_rank[r].append([[docs[i] for i in mb] for mb in plan[r]])
        normalisers.append(z)
    num_response_tokens = sum(len(x["token_ids"]) for x in results)
    lr = lr_at(step, cfg.train.total_steps, cfg.optim)
    t0 = time.perf_counter()
    outs = trainer.run_each("train_step", [(per_rank[r], normalisers, lr) for r in range(trainer.world_size)])
    train_s = time.perf_counter() - t0
    train = reduce_metrics([m for o in outs for m in o["metrics"]])
    if not math.isfinite(train["loss"]):
        raise FloatingPointError(f"RL loss is {train['loss']} at step {step + 1}; lower optim.lr")

    sync = sync_weights(trainer, pool, step + 1)
    metrics = rollout_metrics(results, prompt_lens, scores, g)
    metrics.update({f"train/{k}": v for k, v in train.items()})
    metrics.update(
        {
            "loss": train["loss"],
            "clip_fraction": train.get("clip_frac", 0.0),
            "kl": train.get("kl", 0.0),
            "entropy": train.get("entropy", 0.0),
            "approx_kl": train.get("approx_kl", 0.0),
            "logprob_mismatch_mean": train.get("mismatch/abs", 0.0),
            "logprob_mismatch_max": train.get("mismatch/abs/max", 0.0),
            "grad_norm": float(np.mean(outs[0]["grad_norms"])),
            "lr": lr,
            "updates": len(minis),
            "samples": len(results),
            "response_tokens": num_response_tokens,
            "loss_tokens": int(sum(int(m.sum()) for m in trained)),
            "gen_tokens_per_s": num_response_tokens / max(rollout_s, 1e-9),
            "rollout_retries": rollout_retries,
            "reward_retries": reward_retries,
            "rollout_restarts": pool.restarts,
            **{k: v for k, v in reward_batch.metrics().items() if k != "reward/mean"},
            "time/rollout_s": rollout_s,
            "time/reward_s": reward_s,
            "time/old_logprobs_s": max(o["times"]["old_logprobs_s"] for o in outs),
            "time/ref_logprobs_s": max(o["times"]["ref_logprobs_s"] for o in outs),
            "time/update_s": max(o["times"]["update_s"] for o in outs),
            "time/train_call_s": train_s,
            **sync.metrics(),
        }
    )
    metrics["time/step_s"] = time.perf_counter() - t_step
    return metrics


def _evaluate(run: _RunState, pool: RolloutPool, rewards: RewardPool, step: int) -> dict[str, float]:
    """Sample ``eval.samples`` responses per eval problem at ``eval.temperature``; pass@1 = accuracy."""
    cfg, e = run.cfg, run.cfg.eval
    t0 = time.perf_counter()
    requests = [
        RolloutRequest(
            key=j * e.samples + s, prompt_ids=p, seed=sample_seed(cfg.seed + EVAL_SEED_OFFSET, step, j * e.samples + s)
        )
        for j, p in enumerate(run.eval_prompts)
        for s in range(e.samples)
    ]
    records = [r for r in run.eval_records for _ in range(e.samples)]
    params = run.sampling(e.temperature, e.max_new_tokens or cfg.rollout.max_new_tokens)
    results, _ = pool.generate(requests, params, max_retries=cfg.faults.max_step_retries)
    scores = run.score(rewards, results, records)[0].scores
    lens = [len(r.prompt_ids) for r in requests]
    m = rollout_metrics(results, lens, scores, e.samples)
    keys = ("accuracy", "reward_mean", "response_length", "blocks_per_response", "peak_kv", "compression_ratio")
    out = {f"eval/{k}": m[k] for k in keys}
    if len(run.eval_sets) > 1:
        for name, part in run.eval_sets.items():
            rows = slice(part.start * e.samples, part.stop * e.samples)
            m = rollout_metrics(results[rows], lens[rows], scores[rows], e.samples)
            out.update({f"eval/{name}/{k}": m[k] for k in keys})
    out["eval/time_s"] = time.perf_counter() - t0
    return out
