"""Megatron-core's distributed optimizer as the megatron engine uses it on CUDA.

``get_megatron_optimizer`` (megatron-core 0.16) leaves two things to its caller, or gets them wrong:

- **Weight-decay groups.** It tags norms, biases (and, with our override, the input embedding) with
  ``wd_mult=0`` but gives every param group ``weight_decay=config.weight_decay``: applying the
  multipliers is the job of Megatron-LM's ``OptimizerParamScheduler``, which the engine does not use.
  :func:`set_lr_and_weight_decay` applies them whenever the engine sets the learning rate.
- **torch AdamW** (what it falls back to without TransformerEngine or Apex). torch's Adam keeps a
  ``step`` tensor per parameter; ``DistributedOptimizer.state_dict()`` asserts that they hold one
  value, so it fails while the optimizer has no state yet (every load into a fresh engine), and
  ``load_state_dict()`` gives every parameter *the same* step tensor, which torch's AdamW then
  increments once per parameter per step, and the ``dp_reshardable`` loader then copies into it the
  step the optimizer had *before* the load (the per-parameter step is a local, non-persistent entry
  of that format): bias correction is wrong after a resume. :func:`ensure_adam_state` and
  :func:`restore_adam_steps` fix both around checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from memento_train.training.optim import OptimConfig


def build_distributed_optimizer(ddp_model, optim: OptimConfig, *, bf16: bool, params_dtype: torch.dtype):
    """``get_megatron_optimizer`` with the distributed optimizer (fp32 master weights and Adam state
    sharded over DP) and :func:`memento_train.training.optim.param_groups`' decay rule: no weight decay on
    biases, norms (1-D) and the input embedding."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey

    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        bf16=bf16,
        params_dtype=params_dtype,
        use_distributed_optimizer=True,
        # clip_grad=inf still computes (and returns) the norm without scaling anything.
        clip_grad=optim.grad_clip if optim.grad_clip > 0 else float("inf"),
    )
    overrides = get_standard_config_overrides(config)  # wd_mult=0 for 1-D parameters and biases
    # (A tied model's last pipeline stage holds its copy of the embedding as output_layer.weight.)
    overrides[ParamKey(name="*embedding.word_embeddings.weight", attr="shared_embedding")] = {"wd_mult": 0.0}
    optimizer = get_megatron_optimizer(config, [ddp_model], config_overrides=overrides)
    set_lr_and_weight_decay(optimizer, optim.lr, optim.weight_decay)
    return optimizer


def set_lr_and_weight_decay(optimizer, lr: float, weight_decay: float) -> None:
    """Set every param group's learning rate and weight decay, scaled by its ``lr_mult`` / ``wd_mult``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def _torch_adams(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch Adam/AdamW instances inside a (chained) Megatron optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def ensure_adam_state(optimizer) -> None:
    """Give every parameter of a torch Adam without state the state a fresh Adam starts from (step 0,
    zero moments), so that Megatron can describe (and load into) it. The next step is unchanged."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p].update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )


def restore_adam_steps(optimizer) -> None:
    """After ``DistributedOptimizer.load_state_dict``: give every parameter its own ``step`` tensor
    holding the checkpoint's step (which the load leaves in each torch param group)."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                adam.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
