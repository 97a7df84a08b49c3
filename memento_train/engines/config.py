"""Options of the training engines (how a model is sharded, in which precision, with what offload)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from memento_train.config.errors import ConfigError
from memento_train.config.tree import check_types

EngineKind = Literal["fsdp2", "deepspeed", "megatron"]
Precision = Literal["bf16", "fp16", "fp32"]
ENGINE_KINDS = get_args(EngineKind)


@dataclass
class EngineConfig:
    """How trainer workers hold and update the model.

    Attributes:
        kind: ``fsdp2`` (``torch.distributed.fsdp.fully_shard``), ``deepspeed`` (ZeRO) or ``megatron``
            (megatron-core ``GPTModel``, tensor/pipeline parallel).
        precision: compute dtype. ``bf16``/``fp16`` keep fp32 master weights and optimizer state and
            reduce gradients in fp32; ``fp32`` computes in fp32 (the CPU default).
        zero_stage: 2 shards optimizer state and gradients, 3 also parameters. For FSDP2, 2 keeps
            parameters gathered between forward and backward (``reshard_after_forward=False``), 3
            frees them after forward.
        offload_optimizer: keep optimizer state (and the step) on CPU.
        offload_params: keep sharded parameters on CPU between uses (ZeRO-3 / FSDP2 only).
        tensor_parallel: tensor-parallel size (megatron only).
        pipeline_parallel: pipeline-parallel size (megatron only).
    """

    kind: EngineKind = "fsdp2"
    precision: Precision = "fp32"
    zero_stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    def validate(self, prefix: str = "engine") -> EngineConfig:
        """Raise :class:`ConfigError` naming the first bad option; returns self."""
        check_types(self, prefix)
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(
                f"{prefix}.offload_params needs {prefix}.zero_stage=3 (parameters are only "
                "sharded, hence offloadable, at stage 3)"
            )
        # The fsdp2 engine refuses these too, but only once every rank has loaded the model: say it here.
        if self.kind == "fsdp2" and self.offload_optimizer and not self.offload_params:
            raise ConfigError(
                f"{prefix}.offload_optimizer alone is not possible with fsdp2 (FSDP2 offloads "
                f"parameters, gradients and optimizer state together): set {prefix}.offload_params="
                f"true with {prefix}.zero_stage=3, or {prefix}.kind=deepspeed to offload only the "
                "optimizer"
            )
        if self.kind == "fsdp2" and self.precision == "fp16":
            raise ConfigError(
                f"{prefix}.precision=fp16 needs dynamic loss scaling, which the fsdp2 engine does "
                f"not implement; use {prefix}.precision=bf16, or {prefix}.kind=deepspeed for fp16"
            )
        for name in ("tensor_parallel", "pipeline_parallel"):
            v = getattr(self, name)
            if v < 1:
                raise ConfigError(f"{prefix}.{name} must be an int >= 1, got {v!r}")
            if v > 1 and self.kind != "megatron":
                raise ConfigError(
                    f"{prefix}.{name}={v} needs {prefix}.kind=megatron (fsdp2 and deepspeed are data parallel only)"
                )
        return self
