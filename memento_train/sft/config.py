"""The SFT run's configuration: one typed tree, built from a recipe plus ``key=value`` overrides and
validated before any worker starts.

Stage 1 and stage 2 differ only in ``data.block_masking.keep_last_n_blocks`` (-1: full causal attention;
>= 0: memento attention) and in where the weights come from (stage 2 starts from stage 1's export).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memento_train.checkpoint.config import CheckpointConfig
from memento_train.checkpoint.manager import RESUME_MODES
from memento_train.cluster.config import ClusterConfig
from memento_train.config.errors import ConfigError
from memento_train.config.tree import build, canonical_tree, check_types, has_key
from memento_train.data.config import DataConfig
from memento_train.data.synthetic import parse_source
from memento_train.engines.config import EngineConfig
from memento_train.export.writer import (
    MARKER_FILE as EXPORT_MARKER,  # stage 2 reads it: is this a stage-1 model?
)
from memento_train.faults.config import FaultsConfig
from memento_train.models.config import ModelConfig, resolve_init_from
from memento_train.recipes import recipe_tree
from memento_train.training.optim import OptimConfig
from memento_train.training.tracking import Logger, WandbConfig


@dataclass
class TrainConfig:
    """Length of the run and batching.

    Attributes:
        epochs: passes over the data (fractions allowed); the run has
            ``ceil(epochs * samples / global_batch_size)`` optimizer steps unless ``max_steps`` is set.
        max_steps: stop after this many optimizer steps (the schedule still spans the full run when
            ``schedule_steps`` is unset, so a short test run sees the real warm-up).
        global_batch_size: sequences per optimizer step, over all workers.
        micro_batch_tokens: token budget of one packed micro-batch (one forward/backward).
        pad_to_multiple: pad each micro-batch to a multiple of this (kernels' tile size; 1 = none).
        max_samples: use only the first N examples (after validation).
        seed: model init, data order and dropout.
        shuffle: reshuffle the examples every epoch (seeded by ``seed`` and the epoch).
        log_every: log metrics every N steps.
    """

    epochs: float = 5.0
    max_steps: int | None = None
    global_batch_size: int = 512
    micro_batch_tokens: int = 32768
    pad_to_multiple: int = 1
    max_samples: int | None = None
    seed: int = 42
    shuffle: bool = True
    log_every: int = 1


@dataclass
class SFTConfig:
    """Everything one SFT stage needs. ``output_dir`` receives checkpoints, the HF export, metrics."""

    output_dir: str = "runs/memento-sft"
    stage: int = 1
    resume: str = "auto"
    logger: Logger = "wandb"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def data_parallel_size(self) -> int:
        """Model replicas the global batch is split over (workers / tensor x pipeline parallel)."""
        return self.cluster.num_workers // (self.engine.tensor_parallel * self.engine.pipeline_parallel)

    def validate(self) -> SFTConfig:
        """Static checks (no model download); raise :class:`ConfigError` naming what to change."""
        check_types(self)
        self.data.validate()
        self.optim.validate("optim")
        self.engine.validate("engine")
        self.cluster.validate("cluster")
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 (full attention) or 2 (memento attention), got {self.stage!r}")
        keep = self.data.block_masking.rule().keep_last_n_blocks
        if self.stage == 1 and keep != -1:
            raise ConfigError(
                f"stage 1 trains with full causal attention: set data.block_masking.keep_last_n_blocks=-1 "
                f"(got {keep}), or stage=2 for memento attention"
            )
        if self.stage == 2 and keep < 0:
            raise ConfigError(
                "stage 2 trains with memento attention: set data.block_masking.keep_last_n_blocks>=0 "
                "and data.block_masking.enable=true (0 = evict each block at its summary's end)"
            )
        if self.stage == 2 and self.model.require_stage1_init:
            _check_stage1_init(self.model.path)
        if self.resume not in RESUME_MODES and not os.path.isdir(self.resume):
            raise ConfigError(
                f"resume must be 'auto', 'never' or an existing checkpoint directory, got {self.resume!r}"
            )
        mp = self.engine.tensor_parallel * self.engine.pipeline_parallel
        if self.cluster.num_workers % mp:
            raise ConfigError(
                f"cluster.num_workers ({self.cluster.num_workers}) must be a multiple of "
                f"engine.tensor_parallel x engine.pipeline_parallel ({mp})"
            )
        t = self.train
        if not t.epochs > 0:
            raise ConfigError(f"train.epochs must be > 0, got {t.epochs!r}")
        for name in ("global_batch_size", "micro_batch_tokens", "pad_to_multiple", "log_every"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)!r}")
        for name in ("max_steps", "max_samples"):
            if getattr(t, name) is not None and getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1 or null, got {getattr(t, name)!r}")
        if t.global_batch_size < self.data_parallel_size:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be >= the number of "
                f"data-parallel workers ({self.data_parallel_size}) so every replica gets sequences"
            )
        if t.micro_batch_tokens < self.data.max_seq_len:
            raise ConfigError(
                f"train.micro_batch_tokens ({t.micro_batch_tokens}) must be >= data.max_seq_len "
                f"({self.data.max_seq_len}): the longest sequence must fit one micro-batch"
            )
        self.checkpoint.validate("checkpoint")
        self.faults.validate("faults")
        if self.model.path is None and self.data.max_seq_len > self.model.tiny.max_position_embeddings:
            raise ConfigError(
                f"data.max_seq_len ({self.data.max_seq_len}) exceeds the tiny model's "
                f"model.tiny.max_position_embeddings ({self.model.tiny.max_position_embeddings})"
            )
        return self


def _check_stage1_init(path: str | None) -> None:
    hint = (
        "stage 2 starts from the stage-1 model: set model.path=<stage-1 output_dir>/hf "
        "(or model.require_stage1_init=false to start from another model)"
    )
    if path is None:
        raise ConfigError(f"model.path is not set; {hint}")
    marker = Path(os.path.expanduser(path)) / EXPORT_MARKER
    if not marker.is_file():
        raise ConfigError(f"model.path={path!r} is not a memento-train export (no {EXPORT_MARKER}); {hint}")
    info = json.loads(marker.read_text())
    if info.get("stage") != 1:
        raise ConfigError(f"model.path={path!r} was exported by a stage-{info.get('stage')} run; {hint}")


# Keys every recipe must set explicitly because the right value depends on the model family.
REQUIRED_EXPLICIT = {
    "data.block_masking.mask_delimiters": "whether <|block_start|>/<|block_end|> are evicted with their block "
    "must match how the model is served (Memento's Qwen3/Olmo recipes use false, Phi-4-reasoning true)",
}


DEFAULT_RECIPE = "tiny"


def config_tree(recipe: str | None, overrides: Sequence[str] | dict[str, Any] = ()) -> dict[str, Any]:
    """The merged plain tree of ``recipe`` (``None`` = the embedded tiny CPU recipe) and the overrides.

    A pipeline recipe keeps its ``stages`` list in the tree (see :mod:`memento_train.sft.pipeline`).
    """
    return recipe_tree(recipe or DEFAULT_RECIPE, overrides, schema=SFTConfig)


def build_sft_config(tree: dict[str, Any]) -> SFTConfig:
    """Build and validate an :class:`SFTConfig` from a merged tree."""
    tree = canonical_tree(SFTConfig, tree)  # deprecated names (data.block_masking) -> current ones
    for key, why in REQUIRED_EXPLICIT.items():
        if not has_key(tree, key):
            raise ConfigError(f"{key} is not set: {why}. Add {key}=true|false to the recipe or command line")
    cfg = build(SFTConfig, tree)
    resolve_init_from(cfg.model)
    data_path = cfg.data.path
    if parse_source(str(data_path)) is None and not os.path.isabs(str(data_path)) and os.path.exists(str(data_path)):
        cfg.data.path = os.path.abspath(str(data_path))  # workers may run in another directory
    if cfg.data.prepared is not None:
        cfg.data.prepared = os.path.abspath(os.path.expanduser(str(cfg.data.prepared)))
    cfg.output_dir = os.path.abspath(os.path.expanduser(cfg.output_dir))
    return cfg.validate()


def load_sft_config(recipe: str | None, overrides: Sequence[str] | dict[str, Any] = ()) -> SFTConfig:
    """``recipe`` + ``key=value`` overrides -> a validated :class:`SFTConfig`."""
    return build_sft_config(config_tree(recipe, overrides))
