"""The Megatron-core engine: ``GPTModel`` with memento core attention, tensor and pipeline parallel.

Construction (``build_engine(hf_model, optim, cfg, device)``): Megatron's parallel state is set up on
the existing default process group (``TP = engine.tensor_parallel``, ``PP = engine.pipeline_parallel``,
``DP = world / (TP·PP)``); the model itself comes from :mod:`memento_train.models`: this rank's stage of
a :class:`~memento_train.models.megatron_gpt.MementoGPTModel` built from the HF config, with the HF
weights converted in (:func:`~memento_train.models.megatron_convert.load_hf_weights`), sliced for this
rank's TP shard and PP stage. The engine only wraps it.
Activation recompute (full, every layer) is on when the HF model had gradient checkpointing enabled
(``sft.gradient_checkpointing``).

Two ways to hold gradients and optimizer state, picked by device:

- **CUDA** (the real runs): Megatron's ``DistributedDataParallel`` (fp32 gradient buffers, reduce-
  scatter over DP) and ``get_megatron_optimizer`` with ``use_distributed_optimizer=True`` (fp32 master
  weights and Adam state sharded over DP; bf16 model weights with ``engine.precision=bf16``), with the
  weight-decay groups applied and torch AdamW's checkpoints fixed (:mod:`.megatron_optimizer`).
- **CPU fallback** (CI, gloo): Megatron's DDP and optimizers allocate CUDA tensors unconditionally,
  so on CPU :class:`~memento_train.engines.megatron_cpu.CpuFallback` does the same arithmetic by hand
  (:mod:`.megatron_cpu`). fp32 only.

``engine.zero_stage`` does not apply (the distributed optimizer is Megatron's ZeRO-1 over DP);
offloading is refused. The memento-attention backend is the one the HF model was switched to
(``memento_<backend>``, from ``model.attn_backend``), else ``auto``.

Loss scaling follows the engine contract: ``calculate_per_token_loss=True`` makes Megatron *sum*
gradients over DP (no 1/DP factor), and the pipeline schedule leaves the loss undivided.

Data: every rank of one TP×PP group must see the same micro-batches; shard data by
:attr:`MegatronEngine.dp_rank` / :attr:`MegatronEngine.dp_size`, not by the global rank.

Checkpoints use ``megatron.core.dist_checkpointing`` (reshardable across DP; written to a temporary
directory and renamed, so a crash never leaves a half-written ``megatron/`` directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memento_train.config.errors import ConfigError
from memento_train.engines.base import LossFn, MicroBatch, TrainEngine, register_engine
from memento_train.engines.bulk_gather import scratch_gloo_group
from memento_train.engines.config import EngineConfig
from memento_train.engines.head_stats import HeadRequest, TokenStats, TokenStatsFn, head_request
from memento_train.engines.materialize import BroadcastStateDict, take_weights, weights_on_rank0_only
from memento_train.engines.megatron_cpu import CpuFallback, cpu_checkpoint_shim
from memento_train.models.lm_head import VocabShard
from memento_train.training.optim import OptimConfig

CKPT_DIR = "megatron"
# How the distributed optimizer writes its shards: per gradient bucket, every rank its own slice (no
# gather; resharding across DP only, like the engine). The default of megatron-core 0.16,
# "fully_sharded_model_space", builds ShardedTensors with a flattened_range that its own
# dist_checkpointing then refuses ("ShardedTensor.flattened_range is not supported").
DISTRIBUTED_OPTIMIZER_CKPT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _megatron():
    try:
        from megatron.core import parallel_state
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "engine.kind=megatron needs megatron-core (pip install 'megatron-core>=0.16,<0.17'); "
            "or use engine.kind=fsdp2"
        ) from exc
    return parallel_state


def init_parallel_state(tensor_parallel: int, pipeline_parallel: int) -> None:
    """Initialise Megatron's process groups on the default group (re-initialised if sizes differ)."""
    ps = _megatron()
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ConfigError(
            f"world size {world} is not a multiple of engine.tensor_parallel × engine.pipeline_parallel "
            f"({tensor_parallel} × {pipeline_parallel}); change them or the number of processes"
        )
    if ps.model_parallel_is_initialized():
        if (
            ps.get_tensor_model_parallel_world_size() == tensor_parallel
            and ps.get_pipeline_model_parallel_world_size() == pipeline_parallel
        ):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
    )


def uses_megatron_native(device: torch.device) -> bool:
    """Megatron's own DDP and distributed optimizer (CUDA), or the engine's CPU fallback."""
    return device.type == "cuda"


class _GatherVocab(torch.autograd.Function):
    """All-gather vocabulary shards along the last dim; backward keeps this rank's slice.

    (Every TP rank computes the same loss from the gathered logits, so the slice *is* the gradient.)
    Written with plain ``torch.distributed`` so it runs on gloo too.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, -1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.size, -1)[ctx.rank].contiguous(), None


class MegatronEngine(TrainEngine):
    """Megatron-core training engine; see the module docstring.

    Args:
        model: the HF causal LM (CPU, fp32, memento tokens already added), identical on every rank.
        optim: AdamW settings.
        cfg: ``kind=megatron``, ``tensor_parallel``, ``pipeline_parallel``, ``precision``.
        device: this rank's device (``cpu`` with gloo, or ``cuda:<LOCAL_RANK>``).
    """

    name = "megatron"

    def __init__(self, model: nn.Module, optim: OptimConfig, cfg: EngineConfig, device: torch.device) -> None:
        super().__init__(model, optim, cfg, device)
        cfg.validate()
        if cfg.kind != "megatron":
            raise ConfigError(f"MegatronEngine built with engine.kind={cfg.kind!r}; set engine.kind=megatron")
        if not dist.is_initialized():
            raise RuntimeError("MegatronEngine needs torch.distributed initialised first (world size 1 included)")
        from memento_train.models.megatron_convert import load_hf_weights
        from memento_train.models.megatron_gpt import (
            architecture_of,
            attention_backend_of,
            build_gpt_model,
            padded_vocab_size,
            transformer_config_from_hf,
        )

        if cfg.offload_optimizer or cfg.offload_params:
            raise ConfigError(
                "engine.offload_optimizer / engine.offload_params are not implemented by the megatron "
                "engine (its distributed optimizer shards state over data parallel instead); set them "
                "to false, or use engine.kind=deepspeed to offload"
            )
        if cfg.precision == "fp16":
            raise ConfigError(
                "engine.precision=fp16 needs dynamic loss scaling, which the megatron engine does not "
                "wire up; use engine.precision=bf16"
            )
        self.native = uses_megatron_native(self.device)
        if not self.native and cfg.precision != "fp32":
            raise ConfigError(
                f"engine.precision={cfg.precision} with engine.kind=megatron needs CUDA (Megatron's mixed-precision "
                "optimizer is CUDA-only); use engine.precision=fp32 on CPU"
            )
        recompute = bool(getattr(model, "is_gradient_checkpointing", False))
        if recompute and not self.native:
            warnings.warn(
                "activation recompute is skipped on CPU (Megatron's checkpointing saves CUDA RNG "
                "state); results are identical, only memory differs",
                stacklevel=2,
            )
            recompute = False

        ps = _megatron()
        init_parallel_state(cfg.tensor_parallel, cfg.pipeline_parallel)
        self.ps = ps
        self.tp, self.pp = cfg.tensor_parallel, cfg.pipeline_parallel
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.arch = architecture_of(model)
        self.vocab_padded = padded_vocab_size(self.arch.vocab_size, self.tp)
        self.pre_process = ps.is_pipeline_first_stage()
        self.post_process = ps.is_pipeline_last_stage()

        if self.native:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            torch.cuda.set_device(self.device)
            model_parallel_cuda_manual_seed(1234)  # the TP RNG tracker that recompute replays
        self.tconfig = transformer_config_from_hf(
            model.config,
            tensor_parallel=self.tp,
            pipeline_parallel=self.pp,
            precision=cfg.precision,
            recompute=recompute,
            use_cpu_initialization=not self.native,
        )
        # Packed micro-batches have different lengths: the pipeline schedule must send shapes first.
        self.tconfig.variable_seq_lengths = True
        gpt = build_gpt_model(
            model.config,
            self.tconfig,
            vocab_size=self.vocab_padded,
            pre_process=self.pre_process,
            post_process=self.post_process,
            backend=attention_backend_of(model),
        )
        self.layer_offset = gpt.layer_offset
        # Weights on rank 0 only (other ranks built on meta): every rank reads rank 0's tensors one at a
        # time through a broadcasting mapping, so a rank holds its slice plus one tensor in flight.
        hf_weights = BroadcastStateDict(take_weights(model)) if weights_on_rank0_only(model) else model.state_dict()
        load_hf_weights(gpt, hf_weights, self.arch, tp_rank=self.tp_rank)
        del hf_weights
        gpt.to(self.device)
        self.cpu_fallback: CpuFallback | None = None  # the CPU fallback's gradients and optimizer (off CUDA)
        if self.native:
            self._wrap_native(gpt)
        else:
            self.model = gpt
            self.cpu_fallback = CpuFallback(gpt, optim, self.arch, ps)
            self.optimizer = self.cpu_fallback.optimizer

    # -- wrapping ----------------------------------------------------------------------------------
    def _wrap_native(self, gpt) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from memento_train.engines.megatron_optimizer import build_distributed_optimizer

        if self.cfg.precision != "fp32":
            # Every parameter in the compute dtype, as Megatron-LM's Float16Module does (buffers, i.e.
            # RoPE's inv_freq, stay fp32). Megatron builds its torch norms in fp32 whatever params_dtype
            # says, and a param group holding both dtypes makes the distributed optimizer order its
            # shards unlike its own index map: checkpoints paired Adam state with the wrong parameters.
            for p in gpt.parameters():
                p.data = p.data.to(self.compute_dtype)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
        )
        self.model = DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=gpt)
        self.optimizer = build_distributed_optimizer(
            self.model, self.optim_cfg, bf16=self.cfg.precision == "bf16", params_dtype=self.tconfig.params_dtype
        )

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def gpt(self):
        """The unwrapped :class:`MementoGPTModel` of this rank."""
        return self.model.module if self.native else self.model

    # -- forward -----------------------------------------------------------------------------------
    def _model_forward(self, mb: MicroBatch) -> torch.Tensor:
        from memento_train.models.megatron_gpt import MementoPackedSeqParams

        meta = mb.meta if mb.meta.kill_row.device == self.device else mb.meta.to(self.device)
        return self.model(
            input_ids=mb.input_ids.to(self.device)[None],
            position_ids=mb.position_ids.to(self.device)[None],
            attention_mask=None,
            packed_seq_params=MementoPackedSeqParams.from_meta(meta),
        )

    def _full_logits(self, local: torch.Tensor) -> torch.Tensor:
        """``[1, T, V_pad/TP]`` (or ``[T, 1, …]``) local logits → ``[T, vocab]`` over the real vocabulary."""
        x = local.reshape(-1, local.shape[-1])
        if self.tp > 1:
            x = _GatherVocab.apply(x, self.ps.get_tensor_model_parallel_group())
        return x[:, : self.arch.vocab_size]

    def logits(self, mb: MicroBatch) -> torch.Tensor:
        """Logits ``[T, vocab]`` of one micro-batch (gathered over TP). Pipeline parallel: use
        :meth:`forward_backward` / :meth:`forward_only`, which run Megatron's schedule."""
        if self.pp > 1:
            raise RuntimeError(
                "with engine.pipeline_parallel > 1 logits exist only on the last stage; "
                "call forward_backward / forward_only"
            )
        return self._full_logits(self._model_forward(mb))

    def _vocab_shard(self) -> VocabShard:
        """This TP rank's rows of the padded output layer (pad rows are not tokens)."""
        rows = self.vocab_padded // self.tp
        start = self.tp_rank * rows
        group = self.ps.get_tensor_model_parallel_group() if self.tp > 1 else None
        return VocabShard(group=group, start=start, valid=max(0, min(rows, self.arch.vocab_size - start)))

    def _stage_output(self, output_tensor: torch.Tensor, request: HeadRequest | None):
        """What ``fn`` takes from the last stage's output: token statistics, or the full logits."""
        if request is not None:
            return TokenStats.unpack(output_tensor, request)
        return self._full_logits(output_tensor)

    def token_stats(self, mb: MicroBatch, request: HeadRequest) -> TokenStats:
        """Vocabulary-parallel fused head over this micro-batch (see :meth:`logits` for PP > 1)."""
        if self.pp > 1:
            raise RuntimeError(
                "with engine.pipeline_parallel > 1 token statistics exist only on the last stage; "
                "call forward_backward / forward_only"
            )
        with head_request(self.gpt.output_layer, request, shard=self._vocab_shard(), megatron=True):
            return TokenStats.unpack(self._model_forward(mb), request)

    def forward_backward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> list[dict[str, Any]]:
        if self.pp == 1:
            return super().forward_backward(micro_batches, loss_fn)
        return self._pipeline(micro_batches, loss_fn, forward_only=False)

    def forward_only(self, micro_batches, fn):
        if self.pp == 1:
            return super().forward_only(micro_batches, fn)
        with torch.no_grad():
            return self._pipeline(micro_batches, fn, forward_only=True)

    def _pipeline(self, micro_batches: Sequence[MicroBatch], fn, *, forward_only: bool) -> list[Any]:
        """Megatron's pipeline schedule (1F1B) over the micro-batches; results broadcast to all stages."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        results: list[Any] = []

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            request = fn.request(mb) if isinstance(fn, TokenStatsFn) else None
            if request is not None and self.post_process:
                with head_request(self.gpt.output_layer, request, shard=self._vocab_shard(), megatron=True):
                    output = self._model_forward(mb)
            else:
                output = self._model_forward(mb)

            def loss_func(output_tensor):
                # 3-tuple (loss, num_tokens, reduced): with calculate_per_token_loss the schedule leaves
                # the loss as is (it is already normalised by the loop); num_tokens is unused.
                one = torch.ones((), dtype=torch.int, device=self.device)
                out = fn(self._stage_output(output_tensor, request), mb)
                if forward_only:
                    results.append(out)
                    return torch.zeros((), device=self.device), one, {}
                loss, metrics = out
                results.append(metrics)
                return loss, one, {}

            return output, loss_func

        # The schedule calls this after the last backward: DP / TP-norm / tied-embedding reductions.
        self.tconfig.finalize_model_grads_func = self._finalize_grads_for_schedule
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=max(mb.num_tokens for mb in micro_batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )
        box = [results if self.post_process else None]
        group = self.ps.get_pipeline_model_parallel_group()
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, self.pp - 1), group=group)
        return box[0]

    def _finalize_grads_for_schedule(self, model, num_tokens=None, **kwargs):
        self._finalize_grads()

    # -- gradients ---------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        """Accumulate; the last micro-batch of a step reduces gradients (SUM over DP)."""
        if self.pp > 1:
            raise RuntimeError("with engine.pipeline_parallel > 1 call forward_backward (Megatron's schedule)")
        loss.backward()
        if last_micro_batch:
            self._finalize_grads()

    def _finalize_grads(self) -> None:
        if self.native:
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads([self.model])
            return
        self.cpu_fallback.finalize_grads()

    def step(self, lr: float) -> float:
        """Set ``lr``, clip to ``optim.grad_clip`` (0 = off), step, zero grads; return the pre-clip norm."""
        if self.native:
            from memento_train.engines.megatron_optimizer import set_lr_and_weight_decay

            set_lr_and_weight_decay(self.optimizer, lr, self.optim_cfg.weight_decay)
            ok, norm, _ = self.optimizer.step()
            if not ok:
                warnings.warn("optimizer step skipped (non-finite gradients)", stacklevel=2)
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            return float(norm) if norm is not None else float("nan")
        return self.cpu_fallback.step(lr)

    # -- full views --------------------------------------------------------------------------------
    def _gather_shards(self, local: dict[str, torch.Tensor], *, everyone: bool):
        """Collect the global-numbered local tensors of DP rank 0's TP×PP ranks; → TP-ordered shards.

        ``everyone=False`` (exports): only rank 0 assembles; the others send one tensor at a time."""
        from memento_train.models.megatron_convert import global_view

        mine = None
        if self.dp_rank == 0:
            mine = global_view(
                local, layer_offset=self.layer_offset, pre_process=self.pre_process, tied=self.arch.tied_embeddings
            )
        # Over a scratch gloo group (scratch_group.py says why), as CPU fp32 tensors.
        with scratch_gloo_group() as group:
            if everyone:
                parts: list = [None] * dist.get_world_size()
                mine_cpu = (
                    None
                    if mine is None
                    else (self.tp_rank, {k: v.detach().to("cpu", torch.float32) for k, v in mine.items()})
                )
                dist.all_gather_object(parts, mine_cpu, group=group)
            else:
                parts = self._gather_to_rank0(mine, group)
        if parts is None:
            return None
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(self.tp)]
        for part in parts:
            if part is not None:
                shards[part[0]].update(part[1])
        return shards

    def _gather_to_rank0(self, mine: dict[str, torch.Tensor] | None, group) -> list | None:
        """Rank 0: every contributing rank's ``(tp_rank, {name: fp32 CPU tensor})``; others: ``None``.
        Names and shapes travel first, then each tensor point to point, so a sender never holds more
        than one extra tensor."""
        rank = dist.get_rank()
        index = None if mine is None else (self.tp_rank, [(k, tuple(v.shape)) for k, v in mine.items()])
        indices = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(index, indices, dst=0, group=group)
        if rank != 0:
            for v in (mine or {}).values():
                dist.send(v.detach().to("cpu", torch.float32).contiguous(), dst=0, group=group)
            return None
        parts: list = [None] * len(indices)
        for src, entry in enumerate(indices):
            if entry is None:
                continue
            tp_rank, names = entry
            if src == 0:
                parts[0] = (tp_rank, {k: v.detach().to("cpu", torch.float32) for k, v in mine.items()})
                continue
            received = {}
            for name, shape in names:
                received[name] = torch.empty(shape, dtype=torch.float32)
                dist.recv(received[name], src=src, group=group)
            parts[src] = (tp_rank, received)
        return parts

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: HF-named unsharded fp32 CPU weights on rank 0 (tied ``lm_head`` alias included)."""
        from memento_train.models.megatron_convert import megatron_to_hf

        local = {n: p for n, p in self.gpt.named_parameters()}
        shards = self._gather_shards(local, everyone=False)
        return None if shards is None else megatron_to_hf(shards, self.arch)

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Collective: reduced unsharded fp32 CPU gradients (HF parameter names) on every rank."""
        from memento_train.models.megatron_convert import megatron_to_hf

        if self.native:
            self._gather_reduce_scattered_grads()
        local = {}
        for n, p in self.gpt.named_parameters():
            g = getattr(p, "main_grad", None) if self.native else p.grad
            local[n] = g if g is not None else torch.zeros_like(p)
        out = megatron_to_hf(self._gather_shards(local, everyone=True), self.arch)
        if self.arch.tied_embeddings:
            out.pop("lm_head.weight")  # HF's named_parameters() has no tied alias
        return out

    def _gather_reduce_scattered_grads(self) -> None:
        """Distributed optimizer: each DP rank holds only its reduced shard of every grad bucket; make
        every bucket whole (other shards zeroed, SUM over DP). The optimizer reads only its own shard,
        which is unchanged."""
        from megatron.core.distributed.param_and_grad_buffer import shard_buffer

        for buffer in self.model.buffers:
            group = buffer.data_parallel_group
            if group.size() == 1:
                continue
            for bucket in buffer.buckets:
                for r, shard in enumerate(shard_buffer(bucket.grad_data, group.size())):
                    if r != group.rank():
                        shard.zero_()
                dist.all_reduce(bucket.grad_data, group=group)

    # -- checkpoints -------------------------------------------------------------------------------
    def _sharded_state(self, is_loading: bool) -> dict:
        model_sd = self.gpt.sharded_state_dict()
        state = {"model": model_sd}
        if self.native:
            from memento_train.engines.megatron_optimizer import ensure_adam_state

            ensure_adam_state(self.optimizer)  # torch AdamW fallback: see megatron_optimizer.py
            state["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata=DISTRIBUTED_OPTIMIZER_CKPT_FORMAT
            )
        else:
            state["optimizer"] = self.cpu_fallback.optimizer_sharded_state(model_sd, is_loading)
        return state

    def _checkpoint_io(self):
        """The CPU shim around ``dist_checkpointing`` (see :func:`.megatron_cpu.cpu_checkpoint_shim`)."""
        return contextlib.nullcontext() if self.native else cpu_checkpoint_shim()

    def save(self, path: str) -> None:
        """Collective: model + optimizer with ``dist_checkpointing`` under ``path/megatron`` (atomic rename)."""
        from megatron.core import dist_checkpointing

        final, tmp = os.path.join(path, CKPT_DIR), os.path.join(path, CKPT_DIR + ".tmp")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        with self._checkpoint_io():
            dist_checkpointing.save(self._sharded_state(is_loading=False), tmp)
        dist.barrier()
        if dist.get_rank() == 0:
            with open(os.path.join(tmp, "memento_engine.json"), "w") as f:
                json.dump(
                    {"tensor_parallel": self.tp, "pipeline_parallel": self.pp, "vocab_padded": self.vocab_padded}, f
                )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        dist.barrier()

    def load(self, path: str) -> None:
        """Collective: restore what :meth:`save` wrote (any DP size; same TP/PP)."""
        from megatron.core import dist_checkpointing

        ckpt = os.path.join(path, CKPT_DIR)
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"no Megatron checkpoint at {ckpt!r} (written by MegatronEngine.save)")
        with open(os.path.join(ckpt, "memento_engine.json")) as f:
            saved = json.load(f)
        if (saved["tensor_parallel"], saved["pipeline_parallel"]) != (self.tp, self.pp):
            raise ConfigError(
                f"checkpoint {ckpt!r} was written with engine.tensor_parallel={saved['tensor_parallel']}, "
                f"engine.pipeline_parallel={saved['pipeline_parallel']}; resume with the same values (or start "
                "a new run from its HF export)"
            )
        with self._checkpoint_io():
            state = dist_checkpointing.load(self._sharded_state(is_loading=True), ckpt)
        self.gpt.load_state_dict(state["model"], strict=False)
        if self.native:
            from memento_train.engines.megatron_optimizer import restore_adam_steps

            # no_grad: under fp32 the optimizer's main parameters are views of the model's, and the
            # dp_reshardable loader copies into them without disabling autograd itself.
            with torch.no_grad():
                self.optimizer.load_state_dict(state["optimizer"])
            restore_adam_steps(self.optimizer)  # torch AdamW fallback: see megatron_optimizer.py
            return
        self.cpu_fallback.load_optimizer_state(state["optimizer"])


register_engine("megatron", MegatronEngine)
