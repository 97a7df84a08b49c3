"""The megatron engine's CPU fallback: Megatron's DDP and distributed optimizer, done by hand.

Megatron's ``DistributedDataParallel`` and optimizers allocate CUDA tensors unconditionally
(``torch.cuda.current_device()`` buffers, ``torch.cuda.FloatTensor`` type checks), so on CPU (CI,
gloo) :class:`CpuFallback` does the same arithmetic on the bare ``MementoGPTModel``:

- a SUM all-reduce of gradients over DP (no 1/DP factor: the loop already divides by the global token
  count), of q/k-norm gradients over TP and of a tied embedding over the first/last pipeline stages, as
  Megatron's ``finalize_model_grads`` does;
- the global gradient norm counting TP-replicated parameters once, clipping, and ``torch.optim.AdamW``
  with :func:`memento_train.training.optim.param_groups` semantics; fp32 only;
- the optimizer state as ``dist_checkpointing`` sharded tensors keyed like the model's.

None of this runs on CUDA, where the engine uses Megatron's own DDP and distributed optimizer
(:mod:`.megatron_optimizer`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from memento_train.models.megatron_gpt import HFArchitecture, MementoGPTModel
from memento_train.training.optim import OptimConfig


class CpuFallback:
    """Gradient reduction, clipping and AdamW for one rank's bare ``MementoGPTModel`` on CPU.

    Args:
        gpt: this rank's pipeline stage (TP shard) of the model.
        optim: AdamW settings.
        arch: the HF architecture (q/k norms, tied embeddings).
        ps: Megatron's ``parallel_state`` module (initialised).
    """

    def __init__(self, gpt: MementoGPTModel, optim: OptimConfig, arch: HFArchitecture, ps) -> None:
        self.gpt, self.optim_cfg, self.arch, self.ps = gpt, optim, arch, ps
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.dp_size = ps.get_data_parallel_world_size()
        decay, no_decay = [], []
        for name, p in gpt.named_parameters():
            # optim.param_groups semantics; a tied model's last-stage embedding copy is an embedding too.
            embedding = "embedding" in name or getattr(p, "shared_embedding", False)
            (no_decay if p.ndim < 2 or "norm" in name or embedding else decay).append(p)
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps
        )

    # -- gradients ---------------------------------------------------------------------------------
    def finalize_grads(self) -> None:
        """After the last backward of a step: SUM over DP, q/k norms over TP, a tied embedding over PP."""
        params = [p for p in self.gpt.parameters() if p.grad is not None]
        if self.dp_size > 1 and params:
            all_reduce_coalesced([p.grad for p in params], self.ps.get_data_parallel_group())
        if self.tp > 1 and self.arch.qk_layernorm:
            # q/k norms are shared by all heads but each TP rank only sees its own heads.
            qk = [
                p.grad
                for n, p in self.gpt.named_parameters()
                if p.grad is not None and ("q_layernorm" in n or "k_layernorm" in n)
            ]
            all_reduce_coalesced(qk, self.ps.get_tensor_model_parallel_group())
        if self.pp > 1 and self.arch.tied_embeddings and (self.gpt.pre_process or self.gpt.post_process):
            w = self.gpt.shared_embedding_or_output_weight()
            if w.grad is not None:
                dist.all_reduce(w.grad, group=self.ps.get_embedding_group())

    def grad_norm(self) -> float:
        """The global L2 norm of the gradients (every TP-replicated or shared parameter counted once)."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        sq = torch.zeros((), dtype=torch.float64)
        for p in self.gpt.parameters():
            counted = param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False)
            if p.grad is not None and counted:
                sq += p.grad.detach().double().pow(2).sum().cpu()
        if self.tp * self.pp > 1:
            dist.all_reduce(sq, group=self.ps.get_model_parallel_group())
        return float(sq.sqrt())

    def step(self, lr: float) -> float:
        """Set ``lr``, clip to ``optim.grad_clip`` (0 = off), step, zero grads; return the pre-clip norm."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = self.grad_norm()
        clip = self.optim_cfg.grad_clip
        if clip > 0 and norm > clip:
            coef = clip / (norm + 1e-6)
            for p in self.gpt.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- checkpoints -------------------------------------------------------------------------------
    def optimizer_sharded_state(self, model_sd: dict, is_loading: bool) -> dict:
        """AdamW's state as ``dist_checkpointing`` shards of the parameters in ``model_sd`` (one common step)."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if is_loading:  # Adam state must exist to describe its shards
            for p in params:
                st = self.optimizer.state[p]
                if not st:
                    st.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        sd = self.optimizer.state_dict()
        # state_dict() shares the per-parameter dicts with the live optimizer: copy before editing.
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        steps = {float(st.pop("step")) for st in sd["state"].values() if "step" in st}
        optim_state_to_sharding_state(sd, get_param_id_to_sharded_param_map(model_sd, params), exclude_keys=("step",))
        sd["common_step"] = max(steps) if steps else 0.0  # every parameter steps together
        return sd

    def load_optimizer_state(self, sd: dict) -> None:
        """Restore what :meth:`optimizer_sharded_state` described, as ``dist_checkpointing`` loaded it."""
        step = torch.tensor(float(sd.pop("common_step")))
        for st in sd["state"].values():
            st["step"] = step.clone()
        self.optimizer.load_state_dict(sd)


@contextlib.contextmanager
def cpu_checkpoint_shim():
    """CPU-ONLY SHIM (the engine never enters it on CUDA): ``dist_checkpointing``'s ``torch_dist``
    strategy assumes CUDA: it calls ``torch.cuda.synchronize()`` after its non-blocking device-to-host
    copies and all-reduces a failure flag allocated on ``torch.cuda.current_device()``. For the
    duration of a CPU save/load the first is a no-op and the second answers ``"cpu"``."""
    from unittest import mock

    with (
        mock.patch("torch.cuda.synchronize", lambda *args, **kwargs: None),
        mock.patch("torch.cuda.current_device", lambda: "cpu"),
    ):
        yield


def all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    """SUM all-reduce of many tensors in one flat buffer (one collective instead of one per tensor)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
