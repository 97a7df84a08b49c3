"""The FSDP2 engine: ``torch.distributed.fsdp.fully_shard`` per decoder layer, then the root.

Mapping of :class:`~memento_train.engines.config.EngineConfig` onto FSDP2:

- ``zero_stage``: parameters, gradients and optimizer state are always sharded (FSDP2 has no
  "gradients only" mode); stage 2 keeps each layer's parameters gathered from its forward to its
  backward (``reshard_after_forward=False``: more memory, one all-gather less), stage 3 frees them
  after forward.
- ``precision``: ``bf16`` computes in bf16 from fp32 master weights and reduces gradients in fp32
  (``MixedPrecisionPolicy``). ``fp16`` needs dynamic loss scaling, which this engine does not do, so
  it is refused (use ``bf16``, or ``engine.kind=deepspeed``).
- ``offload_params``: ``CPUOffloadPolicy``. FSDP2 offloads *parameters, gradients and optimizer state
  together*: sharded parameters live on CPU, so gradients land on CPU and the optimizer steps there.
  That also offloads the optimizer, hence ``offload_optimizer`` is honoured only together with
  ``offload_params``; asking for ``offload_optimizer`` alone raises :class:`ConfigError` (use
  ``offload_params=true`` with ``zero_stage=3``, or ``engine.kind=deepspeed``, which offloads the
  optimizer alone).

Gradient accumulation: every micro-batch reduce-scatters its gradients into the sharded fp32
gradients (sync is never switched off, see :meth:`FSDP2Engine.backward`), so a rank never holds
unsharded gradients between micro-batches.

Weights on rank 0 only (``load_model(..., rank=r)``: other ranks hold meta parameters): the meta
model is sharded first and each rank then receives its slice from rank 0, tensor by tensor
(:mod:`memento_train.engines.materialize`), straight into its fp32 shard on the device.

Gradient reduction: the contract wants the **sum** over ranks (the loop already divides by the
global token count). FSDP2 averages by default, so every FSDP module is set to gradient divide
factor 1 with sum-only collectives (``set_gradient_divide_factor(1.0)`` +
``set_force_sum_reduction_for_comms(True)``): a plain SUM reduce-scatter, which gloo and NCCL both
support, no extra multiply, and the loss the loop sees is left untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from memento_train.config.errors import ConfigError
from memento_train.engines.base import TrainEngine, register_engine
from memento_train.engines.bulk_gather import scratch_gloo_group
from memento_train.engines.config import EngineConfig
from memento_train.engines.materialize import take_weights, weights_on_rank0_only
from memento_train.training.optim import OptimConfig, param_groups


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of repeated blocks (each is sharded as one FSDP unit).

    Hugging Face causal LMs keep them in ``model.model.layers``; otherwise the largest
    ``nn.ModuleList`` whose entries all share one class is taken.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    candidates = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: expected model.model.layers or an "
            "nn.ModuleList of identical blocks"
        )
    return max(candidates, key=len)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Unsharded local copy of a (possibly DTensor) tensor; collective for DTensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDP2Engine(TrainEngine):
    """Data-parallel training with FSDP2 (``fully_shard``); see the module docstring for the options.

    Args:
        model: an fp32 model on CPU (or already on ``device``), identical on every rank.
        optim: AdamW settings (the learning rate comes with each :meth:`step`).
        cfg: engine options (``kind`` must be ``fsdp2``).
        device: this rank's device (``cpu`` with gloo, or ``cuda:<LOCAL_RANK>``).
    """

    name = "fsdp2"

    def __init__(self, model: nn.Module, optim: OptimConfig, cfg: EngineConfig, device: torch.device) -> None:
        super().__init__(model, optim, cfg, device)
        self._check_config(cfg)
        if not dist.is_initialized():
            raise RuntimeError("FSDP2Engine needs torch.distributed initialised first (world size 1 included)")
        self.world_size = dist.get_world_size()
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))

        shard_kwargs: dict = {"mesh": self.mesh, "reshard_after_forward": cfg.zero_stage == 3}
        if cfg.precision != "fp32":
            shard_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        # Weights on rank 0 only (other ranks built on meta): shard the empty model first, then take
        # each rank's slice from rank 0 tensor by tensor; no rank materialises the whole model.
        rank0_weights = take_weights(model) if weights_on_rank0_only(model) else False
        if cfg.offload_params:
            # Pinned memory only helps (and only exists) with an accelerator to copy to.
            shard_kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type != "cpu")
        elif rank0_weights is False:
            model.to(self.device)
        model.to(torch.float32)  # master weights are fp32 whatever the compute precision

        for layer in find_layers(model):
            fully_shard(layer, **shard_kwargs)
        # The root unit holds the rest (embeddings, final norm, a tied or untied LM head). Its
        # parameters are needed again right at the start of backward (the LM head), so keeping them
        # gathered after forward costs little.
        fully_shard(model, **{**shard_kwargs, "reshard_after_forward": False})
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
        if rank0_weights is not False:
            _load_sharded_from_rank0(
                model, rank0_weights, cpu=cfg.offload_params or self.device.type == "cpu", device=self.device
            )
        self._model = model
        self.optimizer = torch.optim.AdamW(
            param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps
        )

    @staticmethod
    def _check_config(cfg: EngineConfig) -> None:
        cfg.validate()
        if cfg.kind != "fsdp2":
            raise ConfigError(f"FSDP2Engine built with engine.kind={cfg.kind!r}; set engine.kind=fsdp2")
        if cfg.precision == "fp16":
            raise ConfigError(
                "engine.precision=fp16 needs dynamic loss scaling, which the fsdp2 engine does not implement; "
                "use engine.precision=bf16, or engine.kind=deepspeed for fp16"
            )
        if cfg.offload_optimizer and not cfg.offload_params:
            raise ConfigError(
                "engine.offload_optimizer alone is not possible with fsdp2: FSDP2 offloads parameters, gradients "
                "and optimizer state together; set engine.offload_params=true (with engine.zero_stage=3), or use "
                "engine.kind=deepspeed to offload only the optimizer"
            )

    # -- training ------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self._model

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        """Backward one micro-batch; every micro-batch reduce-scatters (summing over ranks) into the
        sharded fp32 gradients, which accumulate over the step.

        Gradient sync is never turned off between micro-batches: FSDP2 would then keep each layer's
        *unsharded* gradient (fp32 under bf16) until the last one, a full fp32 copy of the model's
        gradients per rank (29 GB for a 7B model). One reduce-scatter per micro-batch costs
        communication that overlaps with backward instead.
        """
        loss.backward()

    def _params_with_grads(self) -> list[torch.Tensor]:
        return [p for p in self._model.parameters() if p.grad is not None]

    def step(self, lr: float) -> float:
        """Set ``lr``, clip to ``optim.grad_clip`` (0 = off), step AdamW, zero grads; return pre-clip norm."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        # Over DTensor gradients the norm is a DTensor whose full value is the global norm; an
        # infinite max_norm computes it without scaling anything.
        total = torch.nn.utils.clip_grad_norm_(self._params_with_grads(), max_norm)
        norm = float(_plain(total))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- state ---------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Collective: sharded model + optimizer state with ``torch.distributed.checkpoint`` under ``path``."""
        model_sd, optim_sd = get_state_dict(self._model, self.optimizer)
        with scratch_gloo_group() as group:  # see scratch_group.py: DCP's gathers slow the process down
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, process_group=group)

    def load(self, path: str) -> None:
        """Collective: restore what :meth:`save` wrote (same world size or any: DCP reshards)."""
        # get_state_dict builds the (sharded) templates, initialising empty optimizer state first.
        model_sd, optim_sd = get_state_dict(self._model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with scratch_gloo_group() as group:
            dcp.load(state, checkpoint_id=path, process_group=group)
        set_state_dict(self._model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: unsharded fp32 CPU weights (HF names, tied aliases included) on rank 0."""
        sd = get_model_state_dict(self._model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        return {k: v.detach().to(torch.float32).clone() for k, v in sd.items()}

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Collective: reduced unsharded fp32 CPU gradients on every rank (named parameters only)."""
        out = {}
        # Same parameter order on every rank, so the all-gathers line up.
        for name, p in self._model.named_parameters():
            if p.grad is not None:
                out[name] = _plain(p.grad).detach().to(device="cpu", dtype=torch.float32).clone()
        return out


def _load_sharded_from_rank0(
    model: nn.Module, state: dict[str, torch.Tensor] | None, *, cpu: bool, device: torch.device
) -> None:
    """Give the sharded meta ``model`` storage (on CPU when parameters are offloaded) and load rank 0's
    ``state`` into it: one tensor broadcast at a time, each rank keeping its shard (cast to the
    parameters' fp32). Buffers were computed on every rank and are kept."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device="cpu" if cpu else device)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    set_model_state_dict(model, state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


register_engine("fsdp2", FSDP2Engine)
