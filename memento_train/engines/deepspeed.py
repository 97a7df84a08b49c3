"""The DeepSpeed ZeRO engine (stage 2 or 3, optional CPU offload of optimizer and parameters).

How the contract maps onto DeepSpeed:

- **Micro-batches.** The DeepSpeed config says one micro-batch per step
  (``gradient_accumulation_steps=1``) and the engine marks the boundary itself: before each backward
  it calls ``set_gradient_accumulation_boundary(last_micro_batch)``, and ``step`` runs the DeepSpeed
  step only after a boundary backward. So a step may have any number of micro-batches, and DeepSpeed
  never divides the loss by an accumulation count (it divides by ``gradient_accumulation_steps=1``).
- **Sum over ranks.** ZeRO *averages* gradients over the data-parallel ranks, so the loss is
  multiplied by the world size before DeepSpeed's backward; the reduced gradient is then the sum the
  contract asks for.
- **Clipping and the norm.** ``gradient_clipping`` is ``optim.grad_clip``; DeepSpeed clips inside its
  step with ``max_norm / (norm + 1e-6)``, like ``torch.nn.utils.clip_grad_norm_``.
  ``get_global_grad_norm()`` is the norm ZeRO computed *before* clipping (and after removing the fp16
  loss scale), which is what :meth:`DeepSpeedEngine.step` returns.
- **Optimizer.** On CPU always a client ``torch.optim.AdamW`` (no C++ op to compile). On CUDA:
  ``DeepSpeedCPUAdam`` when the optimizer is offloaded, otherwise ``torch.optim.AdamW(fused=True)``
  (DeepSpeed supports it under ZeRO and it needs no JIT build, unlike ``FusedAdam``).
- **Precision.** ``bf16``/``fp16`` sections of the DeepSpeed config; ZeRO keeps fp32 master weights
  and optimizer state. ``fp16`` uses DeepSpeed's dynamic loss scaling. Under ``bf16`` gradients are
  accumulated over the micro-batches (``data_types.grad_accum_dtype``) and reduced over ranks
  (``communication_data_type``) in fp32: DeepSpeed's default for both is the model dtype, i.e. bf16
  sums over 20-30 micro-batches and ranks. Buffers stay in their dtype (fp32 RoPE ``inv_freq``) from
  DeepSpeed 0.19.2 on (:data:`MIN_VERSION_KEEPING_FP32_BUFFERS`), which the engine requires.
- **Weights in and out.** Under ``bf16``/``fp16`` the fp32 masters are set from the fp32 weights the
  engine was given (DeepSpeed itself would start them from the rounded low-precision copies), and
  :meth:`DeepSpeedEngine.full_state_dict` gathers the fp32 *masters* (``safe_get_full_fp32_param``,
  ZeRO-2 and ZeRO-3 alike), not the bf16 copies the module computes with; only rank 0 keeps the
  gathered copy. With weights on rank 0 only (other ranks built on meta), the other ranks start from
  uninitialised storage in the compute dtype and DeepSpeed's broadcast from rank 0 fills it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memento_train.config.errors import ConfigError
from memento_train.engines.base import TrainEngine, register_engine
from memento_train.engines.config import EngineConfig
from memento_train.engines.materialize import broadcast_from_rank0, materialize_meta_params, weights_on_rank0_only
from memento_train.training.optim import OptimConfig, param_groups

CHECKPOINT_TAG = "engine"
# First DeepSpeed release whose bf16/fp16 cast leaves fp32 buffers (RoPE inv_freq) alone (PR #8066);
# before it, module.bfloat16() rounded inv_freq to bf16. pyproject.toml's floor is this version.
MIN_VERSION_KEEPING_FP32_BUFFERS = "0.19.2"


def deepspeed_config(cfg: EngineConfig, optim: OptimConfig, world_size: int, *, client_cpu_optimizer: bool) -> dict:
    """The DeepSpeed config dict for ``cfg``/``optim`` (no optimizer or scheduler section: the engine
    passes its own optimizer and sets the learning rate itself).

    ``client_cpu_optimizer``: the client optimizer is a plain torch one while the optimizer is
    offloaded (the CPU-only case), which DeepSpeed refuses unless told it is intended.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": float(optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # loss_scale 0 = dynamic loss scaling.
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0},
        "steps_per_print": 1 << 30,  # the loops log; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        # Sum micro-batches and ranks in fp32, not in the bf16 the model computes in.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    if client_cpu_optimizer and cfg.offload_optimizer:
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


class DeepSpeedEngine(TrainEngine):
    """Data-parallel training with DeepSpeed ZeRO-2/3; see the module docstring for the mapping.

    Args:
        model: an fp32 model on CPU, identical on every rank.
        optim: AdamW settings (the learning rate comes with each :meth:`step`).
        cfg: engine options (``kind`` must be ``deepspeed``).
        device: this rank's device (``cpu`` with gloo, or ``cuda:<LOCAL_RANK>``).
    """

    name = "deepspeed"

    def __init__(self, model: nn.Module, optim: OptimConfig, cfg: EngineConfig, device: torch.device) -> None:
        super().__init__(model, optim, cfg, device)
        cfg.validate()
        if cfg.kind != "deepspeed":
            raise ConfigError(f"DeepSpeedEngine built with engine.kind={cfg.kind!r}; set engine.kind=deepspeed")
        if cfg.precision == "fp16" and self.device.type == "cpu":
            raise ConfigError("engine.precision=fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedEngine needs torch.distributed initialised first (world size 1 included)")
        import deepspeed

        _check_deepspeed_version(deepspeed.__version__, cfg)
        _forget_stale_deepspeed_groups()
        self.world_size = dist.get_world_size()
        rank0_weights = weights_on_rank0_only(model)
        if rank0_weights:
            # Other ranks were built on meta: give them uninitialised storage in the compute dtype;
            # DeepSpeed's broadcast from rank 0 fills it (ZeRO-2: the module on the device; ZeRO-3 below:
            # host pages that stay untouched until their own parameter is received and partitioned).
            materialize_meta_params(model, self.device if cfg.zero_stage == 2 else "cpu", self.compute_dtype)
        if cfg.precision == "fp32":
            model.to(torch.float32)
        groups = param_groups(model, optim.weight_decay)
        hyper = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        on_cuda = self.device.type == "cuda"
        if on_cuda and cfg.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
        else:
            optimizer = torch.optim.AdamW(groups, fused=on_cuda or None, **hyper)
        config = deepspeed_config(cfg, optim, self.world_size, client_cpu_optimizer=not on_cuda)
        # DeepSpeed casts the module to bf16/fp16 *before* it builds the fp32 master copies, so the
        # masters would start from rounded weights. Keep references to rank 0's given tensors (not
        # copies: the caller's model holds them already) and write them into the masters afterwards,
        # unless they are no more precise than the compute dtype (a bf16 checkpoint: nothing to restore).
        originals = None
        if cfg.precision != "fp32" and _broadcast_flag(any(p.dtype == torch.float32 for p in model.parameters())):
            # (rank 0's only: other ranks must not pin their full, soon partitioned, parameters)
            originals = [p.data if dist.get_rank() == 0 else None for p in model.parameters()]
        if rank0_weights and cfg.zero_stage == 3:
            # Partition parameter by parameter now (zero.Init: move one to the device, broadcast it from
            # rank 0, keep this rank's slice), instead of letting initialize() first move the whole
            # module to every device and broadcast it there.
            model.to(self.compute_dtype)
            # (its config parser may see world size 1 before initialize(): leave the batch size derived)
            init_config = {k: v for k, v in config.items() if k != "train_batch_size"}
            deepspeed.zero.Init(module=model, config_dict_or_path=init_config, dtype=self.compute_dtype)
        self._engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        if originals is not None:
            self._restore_fp32_masters(originals)
        self._boundary_done = False

    def _restore_fp32_masters(self, originals: list[torch.Tensor]) -> None:
        """Set the fp32 masters from rank 0's weights, one parameter at a time (collective)."""
        from deepspeed.utils import safe_set_full_fp32_param

        for p, value in zip(self.model.parameters(), originals, strict=True):
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            full = broadcast_from_rank0(value, shape, torch.float32)
            safe_set_full_fp32_param(p, full.to(device=self._engine.device))

    # -- training ------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The ``deepspeed.DeepSpeedEngine`` (callable like the model; ZeRO-3 gathers in its hooks)."""
        return self._engine

    @property
    def model(self) -> nn.Module:
        """The underlying model (under ZeRO-3 its parameters are partitioned placeholders)."""
        return self._engine.module

    def output_head(self) -> nn.Module:
        """The HF model's ``lm_head`` (ZeRO-3 gathers its weight in the head's own forward hooks)."""
        return self.model.get_output_embeddings()

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        """Backward one micro-batch; ``loss * world_size`` because ZeRO averages over ranks."""
        self._engine.set_gradient_accumulation_boundary(last_micro_batch)
        self._engine.backward(loss * self.world_size)
        self._boundary_done = last_micro_batch

    def step(self, lr: float) -> float:
        """Set ``lr``, clip + step (inside DeepSpeed), zero grads; return the pre-clip global norm."""
        if not self._boundary_done:
            raise RuntimeError("step() before the last micro-batch: call backward(..., last_micro_batch=True) first")
        # ZeRO's optimizer wrappers share their param-group dicts with the client optimizer.
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._engine.step()  # steps the optimizer and zeroes gradients (at the boundary)
        self._boundary_done = False
        norm = self._engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed computed no gradient norm (gradient norm computation is disabled)")
        return float(norm)

    # -- state ---------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Collective: DeepSpeed checkpoint (module, ZeRO-partitioned optimizer and fp32 masters) under ``path``."""
        self._engine.save_checkpoint(path, tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, path: str) -> None:
        """Collective: restore what :meth:`save` wrote (ZeRO checkpoints need the same world size)."""
        load_path, _ = self._engine.load_checkpoint(
            path,
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {CHECKPOINT_TAG!r} under {path}")

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters())

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the fp32 master weights, unsharded, keyed like the model's ``state_dict()``
        (tied weights appear under every name the model's own ``state_dict`` uses), on rank 0."""
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[int, torch.Tensor] = {}
        rank0 = dist.get_rank() == 0
        for _name, p in self._named_params():  # same order on every rank: each call is collective
            value = safe_get_full_fp32_param(p)
            if value is None:
                # Not managed by a ZeRO optimizer (e.g. frozen): the module holds it whole.
                value = p.data
            if rank0:  # only rank 0 keeps a host copy: the others drop each gathered tensor at once
                full[id(p)] = value.detach().to(device="cpu", dtype=torch.float32).clone()
            del value
        # Every rank asks for the key list, in case a ZeRO hook makes state_dict() collective.
        module_sd = self.model.state_dict(keep_vars=True)
        if dist.get_rank() != 0:
            return None
        out = {}
        for key, value in module_sd.items():
            if id(value) in full:
                out[key] = full[id(value)]
            else:  # a persistent buffer: never partitioned
                out[key] = value.detach().to(device="cpu", dtype=torch.float32).clone()
        return out

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Collective: the reduced unsharded fp32 gradients on every rank; call between the boundary
        backward and :meth:`step` (the loss scale is not removed under ``fp16``)."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in self._named_params():
            g = safe_get_full_grad(p)
            if g is not None:
                out[name] = g.detach().to(device="cpu", dtype=torch.float32).clone()
        return out


def _broadcast_flag(value: bool) -> bool:
    """Rank 0's ``value`` on every rank (collective)."""
    return bool(int(broadcast_from_rank0(torch.tensor([int(value)]), torch.Size([1]), torch.int64)[0]))


register_engine("deepspeed", DeepSpeedEngine)


def _release(version: str) -> tuple[int, ...]:
    """``"0.19.2+abc"`` -> ``(0, 19, 2)``."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _check_deepspeed_version(version: str, cfg: EngineConfig) -> None:
    if cfg.precision != "fp32" and _release(version) < _release(MIN_VERSION_KEEPING_FP32_BUFFERS):
        raise ConfigError(
            f"engine.precision={cfg.precision} with deepspeed {version}: releases before "
            f"{MIN_VERSION_KEEPING_FP32_BUFFERS} round fp32 buffers (RoPE inv_freq) to {cfg.precision}; "
            f"pip install 'deepspeed>={MIN_VERSION_KEEPING_FP32_BUFFERS},<0.20'"
        )


def _forget_stale_deepspeed_groups() -> None:
    """Drop DeepSpeed's cached process-group clones from an earlier engine in this process.

    DeepSpeed caches clones of the world group in module globals and only forgets them when the
    group is destroyed through ``deepspeed.comm``. A process that trains twice (an inline pipeline:
    stage 1 then stage 2, each with its own process group) would otherwise hand DeepSpeed a group
    of the destroyed world ("Group ... is not registered").
    """
    from deepspeed.utils import groups

    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(None)
