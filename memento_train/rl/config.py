"""The RL run's configuration (``memento-rl``): one typed tree built from a recipe plus ``key=value``
overrides, validated before any worker starts.

Sections: ``model`` (the policy; ``model.path`` null + ``warmup.enabled`` = a tiny model SFT-warmed on
the synthetic task first), ``prompts`` (where problems come from), ``rollout`` (group size, prompts
per step, sampling, ``block_masking`` and its block cap), ``algorithm`` (:mod:`.algorithm`) /
``reward`` (:mod:`.rewards`), ``optim``,
``engine``, ``cluster`` (trainer workers), ``rollout_cluster`` (rollout workers), ``placement``,
``weight_sync``, ``train`` (steps, micro-batches), ``eval``, ``checkpoint``, ``faults``, logging.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from memento_train.checkpoint.config import CheckpointConfig
from memento_train.checkpoint.manager import RESUME_MODES
from memento_train.cluster.config import ClusterConfig
from memento_train.config.errors import ConfigError
from memento_train.config.tree import build, canonical_tree, check_types, has_key, renamed_from
from memento_train.data.problems import ProblemSource, check_source
from memento_train.data.synthetic import SyntheticTaskConfig
from memento_train.engines.config import EngineConfig
from memento_train.export.writer import MASK_RULE_FIELDS, apply_exported_mask, exported_mask
from memento_train.generation.vllm_engine import VLLMOptions
from memento_train.masking import BlockMaskingConfig
from memento_train.models.config import ModelConfig, resolve_init_from
from memento_train.recipes import recipe_tree
from memento_train.rl.algorithm import AlgorithmConfig
from memento_train.rl.rewards import RewardConfig
from memento_train.training.optim import OptimConfig
from memento_train.training.tracking import Logger, WandbConfig

DEFAULT_RECIPE = "tiny_rl"


@dataclass
class PromptsConfig(ProblemSource):
    """Training problems.

    Attributes:
        path: ``synthetic`` (``num_records`` records of the task in ``synthetic``), or a problem set
            read by :mod:`memento_train.data.problems`: a local ``.jsonl`` / ``.json`` / ``.parquet``
            file or directory, or a hub dataset name (with ``hf_config``, ``split``); its
            ``problem_field`` / ``answer_field`` columns hold the problem and the gold answer.
        num_records: synthetic: how many training problems; a problem set: use at most its first
            ``num_records`` (null = all).
        max_prompt_len: prompts longer than this (in tokens, chat template included) are dropped.
        system_prompt: optional system message.
    """

    path: str = "synthetic"
    num_records: int | None = 4096
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)
    max_prompt_len: int = 1024
    system_prompt: str | None = None


@dataclass
class RolloutConfig:
    """How responses are sampled.

    Attributes:
        group_size: responses per prompt (GRPO's group).
        prompts_per_step: prompts per optimizer step (batch = ``prompts_per_step * group_size``).
        temperature, top_p: sampling (the loss and log-probs use the same temperature).
        max_new_tokens: response budget in tokens.
        block_masking: eviction during generation (``keep_last_n_blocks=0`` evicts a block at its summary's end;
            ``max_block_tokens`` forces ``<|block_end|>`` after that many block tokens, the paper's
            7K cap). The trainer applies the same rule as its attention mask. Options of the rule
            itself (``keep_last_n_blocks``, ``mask_delimiters``, ``keep_last_block_for_answer``) that
            are not set default to the ones ``model.path`` was trained with (its ``memento_train.json``);
            set ones must agree with them. ``mask`` is its deprecated old name.
        allow_mask_mismatch: accept ``rollout.block_masking`` options that differ from the model's training
            rule (an experiment on purpose; the policy then learns under another eviction rule).
        generator: ``reference`` (HF model + physical KV eviction, CPU/GPU), ``vllm`` (vLLM 0.32 with
            the Memento plugin, CPU or GPU; or vLLM 0.13 with the overlay), ``auto`` = vllm when
            rollout workers have GPUs, else reference. ``engine`` is its deprecated old name.
        max_batch_size: sequences decoding together per rollout worker (reference engine).
        gpu_memory_utilization: vLLM's memory fraction (colocated: leave room for the trainer; on
            vLLM's CPU backend a fraction of host memory, so prefer ``vllm.kv_cache_memory_gb``).
        vllm: how the vLLM engine starts (:class:`~memento_train.generation.vllm_engine.VLLMOptions`).
    """

    group_size: int = 8
    prompts_per_step: int = 240
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 31744
    block_masking: BlockMaskingConfig = field(
        default_factory=lambda: BlockMaskingConfig(keep_last_n_blocks=0, max_block_tokens=7168),
        metadata=renamed_from("mask"),
    )
    allow_mask_mismatch: bool = False
    generator: Literal["auto", "reference", "vllm"] = field(default="auto", metadata=renamed_from("engine"))
    max_batch_size: int = 256
    gpu_memory_utilization: float = 0.5
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    def resolved_generator(self, rollout_gpus: int) -> str:
        """``reference`` or ``vllm`` (``auto``: vllm when the rollout workers have GPUs)."""
        if self.generator != "auto":
            return self.generator
        return "vllm" if rollout_gpus else "reference"


@dataclass
class RLTrainConfig:
    """Length of the run and how a step's rollouts are packed for the trainer.

    Attributes:
        total_steps: rollout steps of the run (the lr schedule spans them).
        mini_batches: optimizer updates per rollout batch. The batch is split into this many
            mini-batches of whole groups; π_old (the rollout policy) is fixed before the first update,
            so from the second update on the importance ratio moves and the clip range acts. 1 = one
            on-policy update per step (the paper's setting).
        max_steps: stop after this many steps (schedule unchanged; for tests and staged runs).
        micro_batch_tokens: token budget of one packed micro-batch (prompt + response tokens).
        log_every: progress-bar line every N steps (JSONL gets every step).
    """

    total_steps: int = 500
    mini_batches: int = 1
    max_steps: int | None = None
    micro_batch_tokens: int = 65536
    log_every: int = 1


def _heldout_sets() -> dict[str, ProblemSource]:
    return {"heldout": ProblemSource(path="synthetic")}


@dataclass
class RLEvalConfig:
    """Periodic evaluation (greedy-free sampling at ``temperature``, ``samples`` per problem).

    Attributes:
        every: evaluate every N steps (0 = never); also after the last step when > 0.
        sets: named problem sets (:class:`~memento_train.data.problems.ProblemSource`; ``path:
            synthetic`` = held-out records of the task, seeded apart from the training prompts), each
            logged as ``eval/<name>/accuracy``; ``eval/accuracy`` is over all their problems. A set
            set to null on the command line (``eval.sets.aime25=null``) is dropped.
        num_problems: use the first N problems of each set (null = all).
        samples: responses per problem (pass@1 is their mean accuracy).
        temperature: eval sampling temperature (the paper: 0.6).
        max_new_tokens: null = ``rollout.max_new_tokens``.
        at_start: also evaluate before the first step.
    """

    every: int = 25
    sets: dict[str, ProblemSource] = field(default_factory=_heldout_sets)
    num_problems: int | None = 30
    samples: int = 64
    temperature: float = 0.6
    max_new_tokens: int | None = None
    at_start: bool = False


@dataclass
class WarmupConfig:
    """A short SFT warm-up on the synthetic task before RL (tiny CPU default only).

    Runs the SFT trainer (memento attention, stage-2 settings) from a random tiny model into
    ``<output_dir>/sft_warmup``, so the policy already writes the Memento format and RL starts with a
    reward strictly between 0 and 1. Skipped when that export exists. Needs ``model.path`` null.

    ``unboxed_answer_rate``: the warm-up traces come from a sloppy teacher that leaves this fraction
    of its answers unboxed (ungradable; :class:`~memento_train.data.synthetic.SyntheticTaskConfig`);
    the RL prompts and their answers are unaffected.
    """

    enabled: bool = False
    steps: int = 150
    num_records: int = 2000
    global_batch_size: int = 32
    lr: float = 3e-3
    unboxed_answer_rate: float = 0.0


@dataclass
class RLFaultsConfig:
    """Fault tolerance, and fault *injection* for tests.

    Attributes:
        max_step_retries: a step whose rollout or reward workers die is retried this many times.
        inject_rollout_crash_at_step: test hook: rollout worker 0 kills its own process in the middle
            of generating this step (1-based), on the first attempt only. Never set it in real runs.
    """

    max_step_retries: int = 2
    inject_rollout_crash_at_step: int | None = None


@dataclass
class RLConfig:
    """Everything one RL run needs. ``output_dir`` receives checkpoints, metrics and the HF export.

    ``weight_sync``: ``object_store`` (gather on the trainer, Ray object store to the rollout workers),
    ``collective`` (trainer rank 0 broadcasts to the rollout workers: NCCL on GPUs, gloo on CPU),
    ``nccl`` (the same, GPUs required), ``auto`` (collective on GPUs, else object_store); see
    :mod:`memento_train.rl.weight_sync`. ``inplace`` (colocated vLLM) is not implemented.
    """

    output_dir: str = "runs/memento-rl"
    resume: str = "auto"
    seed: int = 0
    logger: Logger = "wandb"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=10, grad_clip=1.0))
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rollout_cluster: ClusterConfig = field(default_factory=ClusterConfig)
    placement: Literal["disaggregated", "colocated"] = "disaggregated"
    weight_sync: Literal["auto", "object_store", "collective", "nccl", "inplace"] = "auto"
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(keep_last=2))
    faults: RLFaultsConfig = field(default_factory=RLFaultsConfig)
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(project="memento-rl"))

    def validate(self) -> RLConfig:
        """Static checks; raise :class:`ConfigError` naming the option to change. Returns self."""
        check_types(self)
        self.algorithm.validate("algorithm")
        self.reward.validate("reward")
        self.optim.validate("optim")
        self.engine.validate("engine")
        self.cluster.validate("cluster")
        self.rollout_cluster.validate("rollout_cluster")
        self._check_generator()
        if self.resume not in RESUME_MODES and not os.path.isdir(self.resume):
            raise ConfigError(
                f"resume must be 'auto', 'never' or an existing checkpoint directory, got {self.resume!r}"
            )
        r = self.rollout
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "max_batch_size"):
            _positive(f"rollout.{name}", getattr(r, name))
        if not r.temperature > 0:
            raise ConfigError(
                f"rollout.temperature must be > 0 (RL samples; log-probs are taken at it), got {r.temperature!r}"
            )
        if not 0 < r.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p!r}")
        if r.top_p < 1 and self.algorithm.old_logprobs_source == "rollout":
            raise ConfigError(
                "rollout.top_p < 1 with algorithm.old_logprobs_source=rollout: the rollout log-probs "
                "are of the untruncated policy, set rollout.top_p=1"
            )
        if not r.block_masking.evicts:
            raise ConfigError(
                "rollout.block_masking must evict (enable=true, keep_last_n_blocks>=0): Memento RL "
                "trains on block-evicting rollouts"
            )
        if r.group_size < 2 and self.algorithm.adv_norm in ("group", "drgrpo"):
            raise ConfigError(
                f"rollout.group_size={r.group_size} gives every group advantage 0 with "
                f"algorithm.adv_norm={self.algorithm.adv_norm}; use group_size >= 2"
            )
        p = self.prompts
        if p.num_records is not None or p.path == "synthetic":
            _positive("prompts.num_records", p.num_records)
        _positive("prompts.max_prompt_len", p.max_prompt_len)
        _check_source(p, "prompts")
        t = self.train
        _positive("train.total_steps", t.total_steps)
        _positive("train.micro_batch_tokens", t.micro_batch_tokens)
        _positive("train.log_every", t.log_every)
        _positive("train.mini_batches", t.mini_batches)
        if t.mini_batches > r.prompts_per_step:
            raise ConfigError(
                f"train.mini_batches ({t.mini_batches}) must be <= rollout.prompts_per_step "
                f"({r.prompts_per_step}): a mini-batch holds whole groups"
            )
        if t.max_steps is not None:
            _positive("train.max_steps", t.max_steps)
        if t.micro_batch_tokens < p.max_prompt_len + r.max_new_tokens:
            raise ConfigError(
                f"train.micro_batch_tokens ({t.micro_batch_tokens}) must hold the longest sequence, "
                f"prompts.max_prompt_len + rollout.max_new_tokens = {p.max_prompt_len + r.max_new_tokens}"
            )
        if self.model.path is None and p.max_prompt_len + r.max_new_tokens > self.model.tiny.max_position_embeddings:
            raise ConfigError(
                f"prompts.max_prompt_len + rollout.max_new_tokens exceeds the tiny model's "
                f"model.tiny.max_position_embeddings ({self.model.tiny.max_position_embeddings})"
            )
        e = self.eval
        if e.every < 0:
            raise ConfigError(f"eval.every must be >= 0 (0 = never), got {e.every!r}")
        if e.every or e.at_start:
            if not e.sets:
                raise ConfigError("eval.sets is empty: name at least one problem set, or set eval.every=0")
            if e.num_problems is not None or any(src.path == "synthetic" for src in e.sets.values()):
                _positive("eval.num_problems", e.num_problems)
            _positive("eval.samples", e.samples)
            if not e.temperature > 0:
                raise ConfigError(f"eval.temperature must be > 0, got {e.temperature!r}")
            for name, src in e.sets.items():
                _check_source(src, f"eval.sets.{name}")
        w = self.warmup
        if w.enabled:
            if self.model.path is not None:
                raise ConfigError(
                    "warmup.enabled=true trains a tiny model from scratch: set model.path=null, "
                    "or warmup.enabled=false to start RL from model.path"
                )
            for name in ("steps", "num_records", "global_batch_size"):
                _positive(f"warmup.{name}", getattr(w, name))
            if not 0.0 <= w.unboxed_answer_rate < 1.0:
                raise ConfigError(
                    f"warmup.unboxed_answer_rate must be in [0, 1) (a fraction of traces), "
                    f"got {w.unboxed_answer_rate!r}"
                )
        self.checkpoint.validate("checkpoint")
        if self.faults.max_step_retries < 0:
            raise ConfigError(f"faults.max_step_retries must be >= 0, got {self.faults.max_step_retries!r}")
        self._check_placement()
        return self

    def _check_generator(self) -> None:
        r = self.rollout
        try:
            r.vllm.validate("rollout.vllm")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if r.generator == "vllm" and self.model.path is None and not self.warmup.enabled:
            raise ConfigError(
                "rollout.generator=vllm loads the policy from a checkpoint directory: set model.path "
                "(an HF export) or warmup.enabled=true (the warm-up exports one)"
            )

    def _check_placement(self) -> None:
        # GPU-only paths are configured here but not implemented on CPU; say so before anything starts.
        if self.weight_sync == "inplace":
            raise ConfigError(
                "weight_sync=inplace is a GPU path (in-place load for colocated vLLM) not implemented "
                "in this version; use weight_sync=object_store, collective (or auto)"
            )
        if self.weight_sync == "nccl":
            import torch

            # gpus_per_worker=null is "1 if the cluster has GPUs": decidable here only for a local cluster.
            no_gpus = [
                f"{name}.gpus_per_worker=0"
                if c.gpus_per_worker == 0
                else f"{name}.gpus_per_worker=null on a machine without CUDA"
                for name, c in (("cluster", self.cluster), ("rollout_cluster", self.rollout_cluster))
                if c.gpus_per_worker == 0
                or (c.gpus_per_worker is None and c.address is None and not torch.cuda.is_available())
            ]
            if no_gpus:
                raise ConfigError(
                    f"weight_sync=nccl needs GPUs on the trainer and the rollout workers, but they "
                    f"get none ({', '.join(no_gpus)}); use weight_sync=collective (NCCL on GPUs, "
                    f"gloo on CPU), object_store or auto"
                )
        rollout_gpus = self.rollout_cluster.gpus_per_worker
        if self.placement == "colocated" and rollout_gpus:
            raise ConfigError(
                "placement=colocated on GPUs (the rollout engine sleeping beside the trainer) is not "
                "implemented; use placement=disaggregated"
            )
        e = self.engine
        if e.tensor_parallel > 1 or e.pipeline_parallel > 1:
            raise ConfigError(
                f"engine.tensor_parallel={e.tensor_parallel} / engine.pipeline_parallel="
                f"{e.pipeline_parallel}: the RL trainer is data parallel only (the policy and the "
                "reference are sharded with fsdp2 or ZeRO-3); set both to 1"
            )
        if self.placement == "colocated" and self.rollout_cluster.num_workers != self.cluster.num_workers:
            raise ConfigError(
                f"placement=colocated runs one rollout engine beside each trainer rank: set "
                f"rollout_cluster.num_workers={self.cluster.num_workers} (= cluster.num_workers)"
            )
        if self.rollout_cluster.use_ray != self.cluster.use_ray:
            raise ConfigError("cluster.use_ray and rollout_cluster.use_ray must agree (both inline or both on Ray)")

    @property
    def batch_size(self) -> int:
        """Responses per step."""
        return self.rollout.prompts_per_step * self.rollout.group_size


def _check_model(cfg: RLConfig) -> None:
    """What can be known about ``model.path`` before loading it: a local directory exists, its
    positions hold the longest sequence."""
    path = cfg.model.path
    if path is None:
        return
    local = os.path.expanduser(path)
    if path.startswith(("/", "./", "../", "~")) and not os.path.isdir(local):
        raise ConfigError(f"model.path={path!r} is not a directory (a Hugging Face export, or a hub name)")
    if os.path.isfile(os.path.join(local, "config.json")):
        from memento_train.models.loading import model_max_length

        limit = model_max_length(cfg.model)
        need = cfg.prompts.max_prompt_len + cfg.rollout.max_new_tokens
        if limit is not None and need > limit:
            raise ConfigError(
                f"prompts.max_prompt_len + rollout.max_new_tokens = {need} exceeds the "
                f"max_position_embeddings ({limit}) of model.path={path!r}"
            )


def _apply_trained_mask(cfg: RLConfig, tree: dict[str, Any]) -> None:
    """``rollout.block_masking`` defaults to the rule ``model.path`` was trained with; contradicting it is an
    error unless ``rollout.allow_mask_mismatch`` (see :func:`memento_train.export.writer.apply_exported_mask`)."""
    path = cfg.model.path
    trained = exported_mask(path)
    given = {k for k in (*MASK_RULE_FIELDS, "enable") if has_key(tree, f"rollout.block_masking.{k}")}
    if trained is None:
        if path is not None and "mask_delimiters" not in given:
            raise ConfigError(
                f"model.path={path!r} is not a memento-train export (no memento_train.json), so the "
                f"eviction rule it was trained with is unknown: set rollout.block_masking."
                f"mask_delimiters=true|false (and keep_last_n_blocks) to match it"
            )
        return
    cfg.rollout.block_masking, mismatches = apply_exported_mask(cfg.rollout.block_masking, trained, given)
    if mismatches and not cfg.rollout.allow_mask_mismatch:
        raise ConfigError(
            f"rollout.block_masking sets {', '.join(mismatches)}: model.path={path!r} was trained with another "
            f"eviction rule (its memento_train.json), so rollouts and the trainer's mask would not be "
            f"how the model attends; drop the option to use the model's, or set "
            f"rollout.allow_mask_mismatch=true"
        )


def _check_source(source: ProblemSource, option: str) -> None:
    if source.path == "synthetic":
        return
    problem = check_source(source, option)
    if problem:
        raise ConfigError(f"{problem} (or 'synthetic')")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def config_tree(recipe: str | None, overrides: Sequence[str] | dict[str, Any] = ()) -> dict[str, Any]:
    """The merged plain tree of ``recipe`` (``None`` = the embedded tiny CPU default) and overrides."""
    return recipe_tree(recipe or DEFAULT_RECIPE, overrides, schema=RLConfig)


def build_rl_config(tree: dict[str, Any]) -> RLConfig:
    """Build and validate an :class:`RLConfig` from a merged tree (paths made absolute)."""
    tree = canonical_tree(RLConfig, tree)  # deprecated names (rollout.block_masking, rollout.engine) -> current ones
    ev = tree.get("eval")
    if isinstance(ev, dict) and isinstance(ev.get("sets"), dict):  # eval.sets.NAME=null drops a set
        tree = {**tree, "eval": {**ev, "sets": {k: v for k, v in ev["sets"].items() if v is not None}}}
    cfg = build(RLConfig, tree)
    resolve_init_from(cfg.model)
    _apply_trained_mask(cfg, tree)
    _check_model(cfg)
    cfg.output_dir = os.path.abspath(os.path.expanduser(cfg.output_dir))
    for source in (cfg.prompts, *cfg.eval.sets.values()):
        local = os.path.expanduser(source.path)
        if source.path != "synthetic" and os.path.exists(local):  # workers may run elsewhere
            source.path = os.path.abspath(local)
    return cfg.validate()


def load_rl_config(recipe: str | None, overrides: Sequence[str] | dict[str, Any] = ()) -> RLConfig:
    """``recipe`` + ``key=value`` overrides -> a validated :class:`RLConfig`."""
    return build_rl_config(config_tree(recipe, overrides))
