"""Helpers for the engine tests: packed memento micro-batches, the plain-PyTorch reference, and
multi-process jobs (gloo on CPU) that run every engine scenario once and hand the results back.

Spawning ranks is the slow part (each imports torch, transformers and DeepSpeed), so one job per
engine kind runs all scenarios of both ZeRO stages and the tests only compare what it returned.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
import warnings
from typing import Any

import torch
import torch.nn.functional as F

HIDDEN = 32
GRAD_CLIP = 0.05  # small enough that the tiny model's gradients get clipped
LR1, LR2 = 1e-3, 5e-4
SEED, OTHER_SEED = 0, 1


# -- data and model ------------------------------------------------------------------------------
def tiny_model(seed: int = SEED, *, hidden_size: int = HIDDEN, num_layers: int = 2):
    """The tiny Qwen3 (hidden 32, 2 layers, shipped tokenizer) with memento ``segment`` attention."""
    from memento_train.attention.hf import attn_implementation
    from memento_train.models.shipped_tokenizer import load_shipped_tokenizer
    from memento_train.models.tiny import build_tiny_model

    model = build_tiny_model(load_shipped_tokenizer(), seed=seed, hidden_size=hidden_size, num_layers=num_layers)
    model.set_attn_implementation(attn_implementation("segment"))
    return model.train()


def micro_batches(batch: int, n: int = 4, vocab: int = 2048) -> list:
    """``n`` packed micro-batches of two documents each, with evicted keys (kill rows inside the
    document) and different numbers of loss tokens, deterministic in ``batch``."""
    from memento_train.attention.meta import MementoAttentionMeta
    from memento_train.engines.base import MicroBatch

    g = torch.Generator().manual_seed(1000 + batch)
    out = []
    for i in range(n):
        lens = [10 + (i % 3), 12]
        ids, pos, labels, kill, start = [], [], [], [], 0
        for doc, length in enumerate(lens):
            t = torch.randint(0, vocab, (length,), generator=g)
            lab = torch.full((length,), -100)
            prompt = 2 + (i + doc) % 3  # no loss on the "prompt" tokens
            lab[prompt:-1] = t[prompt + 1 :]
            end = start + length
            kr = [end] * length
            for k in range(2, 5):  # a block of keys evicted (a memento) from row start+7 on
                kr[k] = start + 7
            ids.append(t)
            pos.append(torch.arange(length))
            labels.append(lab)
            kill += kr
            start = end
        cu = [0, lens[0], lens[0] + lens[1]]
        out.append(
            MicroBatch(
                input_ids=torch.cat(ids),
                position_ids=torch.cat(pos),
                meta=MementoAttentionMeta.from_packed(cu, kill),
                extras={"labels": torch.cat(labels)},
            )
        )
    return out


def num_loss_tokens(mbs) -> int:
    return sum(int((mb.extras["labels"] != -100).sum()) for mb in mbs)


def token_loss_fn(total_tokens: int):
    """The contract's loss: micro-batch token-loss sum / loss tokens of the whole global batch."""

    def loss_fn(logits, mb):
        s = F.cross_entropy(logits.float(), mb.extras["labels"].to(logits.device), ignore_index=-100, reduction="sum")
        return s / total_tokens, {"loss_sum": float(s.detach())}

    return loss_fn


def _logits(model, mb):
    return model(
        input_ids=mb.input_ids[None], position_ids=mb.position_ids[None], memento_meta=mb.meta, use_cache=False
    ).logits[0]


def reference_run(optim_cfg) -> dict[str, Any]:
    """Single-process plain PyTorch: gradients, pre-clip norms and weights after two AdamW steps."""
    from memento_train.training.optim import param_groups

    model = tiny_model()
    opt = torch.optim.AdamW(
        param_groups(model, optim_cfg.weight_decay), lr=LR1, betas=optim_cfg.betas, eps=optim_cfg.eps
    )
    res: dict[str, Any] = {"keys": list(model.state_dict())}
    for step, lr in ((1, LR1), (2, LR2)):
        mbs = micro_batches(step)
        loss_fn = token_loss_fn(num_loss_tokens(mbs))
        losses = []
        for mb in mbs:
            loss, m = loss_fn(_logits(model, mb), mb)
            loss.backward()
            losses.append(m["loss_sum"])
        if step == 1:
            res["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            res["loss_sum"] = sum(losses)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        res[f"norm{step}"] = float(norm)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad()
        res[f"weights{step}"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step == 1:
            res["weights2_fresh_optimizer"] = _step_without_optimizer_state(res["weights1"], optim_cfg)
    return res


def _step_without_optimizer_state(weights: dict, optim_cfg) -> dict:
    """Step 2 from ``weights`` with a fresh AdamW: what a resume that lost the optimizer gives."""
    from memento_train.training.optim import param_groups

    model = tiny_model()
    model.load_state_dict(weights)
    opt = torch.optim.AdamW(
        param_groups(model, optim_cfg.weight_decay), lr=LR2, betas=optim_cfg.betas, eps=optim_cfg.eps
    )
    mbs = micro_batches(2)
    loss_fn = token_loss_fn(num_loss_tokens(mbs))
    for mb in mbs:
        loss_fn(_logits(model, mb), mb)[0].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- multi-process jobs --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(job, world_size: int, args: tuple, out_dir: str, timeout: float = 300.0) -> Any:
    """Run ``job(rank, world_size, *args)`` on ``world_size`` spawned CPU ranks (gloo); returns what
    rank 0's job returned (passed back through ``out_dir``)."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.start_processes(
        _entry, args=(world_size, port, job, args, out_dir), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"engine job {getattr(job, '__name__', job)} ran past {timeout} s")
    return torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=False)


def _entry(rank: int, world_size: int, port: int, job, args: tuple, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # the CI machine has 2 cores for 2 ranks
    # DeepSpeed ZeRO-3 calls collectives torch has renamed; one warning per call floods failure logs.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = job(rank, world_size, *args)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "rank0.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    # The job succeeded and its result is on disk. Leave without interpreter teardown: DeepSpeed's
    # background threads occasionally abort in C++ destructors at exit ("terminate called without an
    # active exception"), which spawn would report as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _engine(kind: str, stage: int, optim_cfg, seed: int = SEED, precision: str = "fp32", offload: bool = False):
    from memento_train.engines import EngineConfig, build_engine

    cfg = EngineConfig(
        kind=kind, zero_stage=stage, precision=precision, offload_params=offload, offload_optimizer=offload
    )
    return build_engine(tiny_model(seed), optim_cfg, cfg, torch.device("cpu"))


def _train_step(engine, step: int, rank: int, world_size: int) -> list[dict]:
    """Forward/backward this rank's share of global batch ``step`` (4 micro-batches in all)."""
    mbs = micro_batches(step)
    per_rank = len(mbs) // world_size
    mine = mbs[rank * per_rank : (rank + 1) * per_rank]
    return engine.forward_backward(mine, token_loss_fn(num_loss_tokens(mbs)))


def scenarios_job(rank: int, world_size: int, kind: str, stages: list[int], optim_cfg, ckpt_dir: str) -> dict:
    """:func:`scenarios` for each ZeRO stage of one engine kind (one spawn: starting ranks costs more
    than the scenarios). Returns ``{stage: rank 0's observations}``."""
    return {
        stage: scenarios(rank, world_size, kind, stage, optim_cfg, os.path.join(ckpt_dir, str(stage)))
        for stage in stages
    }


def scenarios(rank: int, world_size: int, kind: str, stage: int, optim_cfg, ckpt_dir: str) -> dict[str, Any]:
    """Every engine scenario on one config: gradients, a clipped step, save/resume, state-dict keys,
    a bf16 step and (stage 3) a step with parameters and optimizer offloaded."""
    import torch.distributed as dist

    res: dict[str, Any] = {}
    engine = _engine(kind, stage, optim_cfg)
    metrics = _train_step(engine, 1, rank, world_size)
    loss_sum = torch.tensor(sum(m["loss_sum"] for m in metrics), dtype=torch.float64)
    dist.all_reduce(loss_sum)
    res["loss_sum"] = float(loss_sum)
    res["grads"] = engine.full_grads()
    res["norm1"] = engine.step(LR1)
    res["weights1"] = engine.full_state_dict()
    engine.save(ckpt_dir)
    _train_step(engine, 2, rank, world_size)
    res["norm2"] = engine.step(LR2)
    res["weights2"] = engine.full_state_dict()

    # A fresh engine on a differently seeded model, restored from the checkpoint after step 1.
    resumed = _engine(kind, stage, optim_cfg, seed=OTHER_SEED)
    resumed.load(ckpt_dir)
    res["loaded1"] = resumed.full_state_dict()
    _train_step(resumed, 2, rank, world_size)
    resumed.step(LR2)
    res["resumed2"] = resumed.full_state_dict()

    eng = _engine(kind, stage, optim_cfg, precision="bf16")
    model = eng.model if kind == "deepspeed" else eng.module
    res["bf16_buffers"] = {name: b.dtype for name, b in model.named_buffers()}
    if kind == "deepspeed":
        model_dtype, grad_accum = eng._engine.get_data_types()
        res["bf16_deepspeed"] = {
            "model": model_dtype,
            "grad_accum": grad_accum,
            "communication": eng._engine.communication_data_type,
            "zero_grad_accum": eng.optimizer.gradient_accumulation_dtype,
        }
    m = _train_step(eng, 1, rank, world_size)
    res["bf16_loss_sum"] = sum(x["loss_sum"] for x in m)
    res["bf16_norm"] = eng.step(LR1)
    res["bf16_weights"] = eng.full_state_dict()

    if stage == 3:
        eng = _engine(kind, stage, optim_cfg, offload=True)
        _train_step(eng, 1, rank, world_size)
        res["offload_grads"] = eng.full_grads()
        res["offload_norm1"] = eng.step(LR1)
        res["offload_weights1"] = eng.full_state_dict()
    return res


def one_rank_grads_job(rank: int, world_size: int, configs: list, optim_cfg) -> dict:
    """World size 1, all four micro-batches on the one rank: ``full_grads()`` per (kind, stage)."""
    out = {}
    for kind, stage in configs:
        engine = _engine(kind, stage, optim_cfg)
        _train_step(engine, 1, rank, world_size)
        out[(kind, stage)] = engine.full_grads()
        del engine
    return out


def _thread_names() -> list[str]:
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))


def checkpoint_threads_job(rank: int, world_size: int, optim_cfg, ckpt_dir: str) -> dict:
    """This process's threads around an FSDP2 save + load, then around a plain ``dcp.save`` on the
    default group (the control that shows what the engine avoids; see ``engines/bulk_gather.py``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from memento_train.engines import EngineConfig, build_engine

    torch.set_num_threads(2)  # an OpenMP team of more than one thread is what lingers
    # Enough tensors that DCP's pickled save plan (gathered to rank 0) passes ATen's 32K-element grain.
    model = tiny_model(hidden_size=16, num_layers=8)
    engine = build_engine(model, optim_cfg, EngineConfig(kind="fsdp2"), torch.device("cpu"))
    _train_step(engine, 1, rank, world_size)
    engine.step(LR1)
    x = torch.randn(256, 256)
    x @ x  # the main thread's own OpenMP team exists before we count
    before = _thread_names()
    engine.save(os.path.join(ckpt_dir, "engine"))
    engine.load(os.path.join(ckpt_dir, "engine"))
    after = _thread_names()
    model_sd, optim_sd = get_state_dict(engine.module, engine.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(ckpt_dir, "default_group"))
    return {"before": before, "after": after, "control": _thread_names()}


def fsdp2_gradient_bytes(model) -> dict[str, int]:
    """Bytes of gradient storage this rank holds in an FSDP2 model: ``sharded`` (the sharded parameters'
    ``.grad``) and ``unsharded`` (what FSDP2 keeps per parameter while gradient sync is off: its
    private accumulation buffers, read here from torch's FSDP internals)."""
    from torch.distributed.fsdp import FSDPModule

    out = {"sharded": 0, "unsharded": 0}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                grad = fsdp_param.sharded_param.grad
                if grad is not None:
                    local = grad.to_local()
                    out["sharded"] += local.numel() * local.element_size()
                unsharded_param = getattr(fsdp_param, "_unsharded_param", None)
                for g in (
                    fsdp_param.unsharded_accumulated_grad,
                    None if unsharded_param is None else unsharded_param.grad,
                ):
                    if g is not None:
                        out["unsharded"] += g.numel() * g.element_size()
    return out


def fsdp2_micro_batches_job(rank: int, world_size: int, optim_cfg, num_layers: int) -> dict:
    """One bf16 FSDP2 step of two micro-batches on this rank: how often the attention metadata's
    interval plan is built, and the gradient storage held between the two micro-batches."""
    from memento_train.attention import meta as meta_module
    from memento_train.engines import EngineConfig, build_engine

    builds = []
    build_plan = meta_module._build_interval_plan

    def counting_build(*args, **kwargs):
        builds.append(1)
        return build_plan(*args, **kwargs)

    meta_module._build_interval_plan = counting_build
    model = tiny_model(num_layers=num_layers)
    full_fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    engine = build_engine(model, optim_cfg, EngineConfig(kind="fsdp2", precision="bf16"), torch.device("cpu"))
    mbs = micro_batches(1)
    mine = mbs[rank * 2 : (rank + 1) * 2]
    loss_fn = token_loss_fn(num_loss_tokens(mbs))
    engine.backward(loss_fn(engine.logits(mine[0]), mine[0])[0], last_micro_batch=False)
    between = fsdp2_gradient_bytes(engine.module)
    engine.backward(loss_fn(engine.logits(mine[1]), mine[1])[0], last_micro_batch=True)
    grads = engine.full_grads()
    engine.step(LR1)
    return {
        "builds": len(builds),
        "micro_batches": len(mine),
        "between": between,
        "full_fp32_bytes": full_fp32_bytes,
        "grads": grads,
    }
