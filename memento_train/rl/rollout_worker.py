"""Rollout workers: full copies of the policy that sample groups of responses with block eviction.

:class:`RolloutWorker` holds one generator (``rollout.generator``): the
:class:`~memento_train.generation.ReferenceGenerator` (HF model, any device) or
:class:`~memento_train.generation.VLLMEngine` (vLLM 0.32 with the Memento plugin; on CPU in the tests),
and answers ``generate`` with per-sequence seeds, so a request gives the same tokens whichever worker
runs it and however often it is retried (both generators seed a sequence alike, so even switching
generator does not change them). :class:`RolloutPool` owns the workers: inline objects (``use_ray=false``) or Ray
actors, one per ``rollout_cluster`` worker. It shards a step's requests over them, and when a worker
dies mid-step (or raises) it starts a fresh one, loads the current weights into it and reruns *that
worker's* shard: every request is answered exactly once, so the batch has no lost or duplicated
samples.

Rollout workers need no ``torch.distributed`` default group (each holds the whole model), which is why
they are plain actors rather than a :class:`~memento_train.cluster.WorkerGroup`. With
``weight_sync=collective|nccl`` each one also joins the weight-sync group of
:mod:`memento_train.rl.collective_sync` (built directly on its own store, not a default group) and
receives the weights there; a restarted worker is not a member until the next sync rebuilds the group,
so it gets the current weights from its weight *source* (:meth:`RolloutPool.set_weight_source`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memento_train.cluster.session import cluster_gpus, worker_code_paths
from memento_train.config.tree import build
from memento_train.generation import ReferenceGenerator, SamplingParams, SequenceRequest
from memento_train.rl.collective_sync import Rendezvous, WeightSyncGroup
from memento_train.rl.config import RLConfig

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised by an inline rollout worker asked to crash (``faults.inject_rollout_crash_at_step``)."""


@dataclass
class RolloutRequest:
    """One sequence to sample: ``key`` identifies it in the step's batch (``prompt_pos * group + sample``)."""

    key: int
    prompt_ids: list[int]
    seed: int


class RolloutWorker:
    """One rollout generator. Built from the plain config tree (cheap to send to a Ray actor)."""

    def __init__(self, config_tree: dict[str, Any], index: int = 0, num_threads: int | None = None) -> None:
        from memento_train.models.loading import load_model, run_tokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg: RLConfig = build(RLConfig, config_tree)  # validated by the driver already
        self.index = index
        self.tokenizer = run_tokenizer(self.cfg.model)
        self.generator = self.cfg.rollout.resolved_generator(self.cfg.rollout_cluster.gpus_per_worker or 0)
        self.model = None
        if self.generator == "vllm":
            self.engine = self._start_vllm()
        else:
            self.model = load_model(self.cfg.model, self.tokenizer, seed=self.cfg.seed).eval()
            self.model.requires_grad_(False)
            if torch.cuda.is_available():  # a GPU rollout worker (Ray gave it one; CPU ones see none): bf16
                self.model.to("cuda", torch.bfloat16)
            self.engine = ReferenceGenerator(
                self.model,
                self.tokenizer,
                self.cfg.rollout.block_masking,
                max_batch_size=self.cfg.rollout.max_batch_size,
            )
        self._weight_buffers: dict[str, torch.Tensor] | None = None
        self.version = -1  # the weight version loaded (-1: the initial weights from model.path)

    def _start_vllm(self):
        from memento_train.generation import VLLMEngine

        r = self.cfg.rollout
        options = {"gpu_memory_utilization": r.gpu_memory_utilization, **r.vllm.engine_kwargs()}
        # The multiprocess engine core: its own process, so vLLM's torch.distributed state never meets an
        # inline trainer's; weight updates cross to it pickled (enable_weight_sync).
        return VLLMEngine(
            self.cfg.model.path,
            r.block_masking,
            tokenizer=self.tokenizer,
            seed=self.cfg.seed,
            enable_weight_sync=True,
            **options,
        )

    def close(self) -> None:
        """Stop the vLLM engine (its processes); the reference generator needs nothing. Idempotent."""
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def ping(self) -> int:
        return os.getpid()

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> float:
        """Copy ``state`` (full fp32 weights, HF names) into the model in place; returns seconds taken."""
        t0 = time.perf_counter()
        if self.model is None:  # vLLM: its own loader maps HF names onto its (fused, sharded) parameters
            self.engine.update_weights(state.items())
            self.version = version
            return time.perf_counter() - t0
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(
                f"rollout worker {self.index}: weight sync does not match the model: "
                f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        self.version = version
        return time.perf_counter() - t0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current weights (tests: weight-sync equality; the reference generator's HF model only)."""
        if self.model is None:
            raise NotImplementedError("a vLLM rollout worker holds vLLM's fused parameters, not an HF state dict")
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # -- collective weight sync (see memento_train.rl.weight_sync) ---------------------------------
    def join_weight_sync(self, rdv: Rendezvous, rank: int) -> None:
        """Join the weight-sync group as ``rank`` (>= 1); blocks until every member has joined."""
        self.close_weight_sync()
        device = next(self.model.parameters()).device if self.model is not None else torch.device("cpu")
        self._ws_group = WeightSyncGroup(rdv, rank, device=device)

    def receive_weights(self, version: int) -> dict[str, float]:
        """Receive trainer rank 0's broadcast straight into the model (in place) and tag it ``version``.
        Returns ``receive_s`` / ``load_s`` / ``aborted``; raises
        :class:`~memento_train.rl.collective_sync.WeightSyncMismatch` naming a tensor that does not fit."""
        group = getattr(self, "_ws_group", None)
        if group is None:
            raise RuntimeError(f"rollout worker {self.index}: receive_weights before join_weight_sync")
        if self.model is None:  # vLLM: receive into HF-shaped host buffers, then load them into the engine
            targets, tied = self._hf_weight_buffers()
        else:  # the state_dict's tensors share storage with the parameters: copying into them loads in place
            targets = self.model.state_dict()
            tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        out = group.receive(targets, optional=tied, who=f"rollout worker {self.index}")
        if not out["aborted"]:
            if self.model is None:
                t0 = time.perf_counter()
                if tied:  # vLLM's CPU build repacks the head apart from the embedding: load both, equal
                    targets["lm_head.weight"].copy_(targets["model.embed_tokens.weight"])
                self.engine.update_weights(targets.items())
                out["load_s"] = out.get("load_s", 0.0) + time.perf_counter() - t0
            self.version = version
        return out

    def _hf_weight_buffers(self) -> tuple[dict[str, torch.Tensor], set[str]]:
        """Host tensors with the checkpoint's names, shapes and dtypes (read from its safetensors
        headers once), and the tied names that may be absent."""
        if self._weight_buffers is None:
            from pathlib import Path

            from safetensors import safe_open

            buffers = {}
            for path in sorted(Path(self.cfg.model.path).glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        part = f.get_slice(name)
                        dtype = getattr(
                            torch,
                            {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(part.get_dtype(), "float32"),
                        )
                        buffers[name] = torch.empty(part.get_shape(), dtype=dtype)
            from transformers import AutoConfig

            tied = getattr(AutoConfig.from_pretrained(self.cfg.model.path), "tie_word_embeddings", False)
            self._tied = {"lm_head.weight"} if tied else set()
            embed = buffers.get("model.embed_tokens.weight")
            if tied and "lm_head.weight" not in buffers and embed is not None:
                # exports leave the tied head out; the trainer may still send it
                buffers["lm_head.weight"] = torch.empty_like(embed)
            self._weight_buffers = buffers
        return self._weight_buffers, self._tied

    def close_weight_sync(self) -> None:
        """Leave the weight-sync group. Idempotent."""
        group = getattr(self, "_ws_group", None)
        self._ws_group = None
        if group is not None:
            group.close()

    def generate(self, requests: list[RolloutRequest], params: dict[str, Any], crash: str | None = None) -> list[dict]:
        """Sample every request; one plain dict per request (tokens, log-probs, kinds, KV stats).

        ``crash`` is the fault-injection hook: ``"exit"`` kills this process half-way (a Ray actor
        dying mid-step), ``"raise"`` raises :class:`InjectedFault` (inline workers).
        """
        sp = SamplingParams(**params)
        half = len(requests) // 2
        out = self._run(requests[:half], sp) if crash else []
        if crash == "exit":
            os._exit(17)  # noqa: SLF001 - the point: die without cleanup, as an OOM-killed worker does
        if crash == "raise":
            raise InjectedFault(f"rollout worker {self.index}: injected crash")
        return out + self._run(requests[half:] if crash else requests, sp)

    def _run(self, requests: list[RolloutRequest], sp: SamplingParams) -> list[dict]:
        if not requests:
            return []
        reqs = [SequenceRequest(r.prompt_ids, seed=r.seed, prompt_index=r.key) for r in requests]
        results = self.engine.run(reqs, sp)
        out = []
        for r, g in zip(requests, results):
            if len(g.forced) != len(g.token_ids):
                raise RuntimeError(
                    f"rollout worker {self.index}: the generator reported {g.forced_block_ends} "
                    f"forced block ends but not which tokens (GenerationResult.forced)"
                )
            out.append(
                {
                    "key": r.key,
                    "token_ids": np.asarray(g.token_ids, np.int64),
                    "logprobs": np.asarray(g.logprobs, np.float32),
                    "kinds": np.asarray(g.kinds, np.int8),
                    "finish_reason": g.finish_reason,
                    "peak_kv": g.peak_kv,
                    "kv_auc": g.kv_auc,
                    "num_blocks": g.num_blocks,
                    "forced_block_ends": g.forced_block_ends,
                    "forced": np.asarray(g.forced, bool),
                    "text": self.tokenizer.decode(g.token_ids, skip_special_tokens=False),
                }
            )
        return out


class RolloutPool:
    """The rollout workers of a run, with restart-and-retry on failure (module docstring).

    ``placement="colocated"`` places the actors without reserving CPUs of their own (they time-share
    the trainer workers' cores, one engine per trainer rank); GPU colocation, where vLLM frees its
    memory while the trainer runs, is GPU-only and not implemented here.
    """

    def __init__(self, cfg: RLConfig, tree: dict[str, Any]) -> None:
        self.cfg, self.tree = cfg, tree
        self.rc = cfg.rollout_cluster
        self.num_workers = self.rc.num_workers
        self.use_ray = self.rc.use_ray
        self.restarts = 0
        # What a (re)started worker must load: a state dict, its Ray object ref, or a callable returning
        # either (the collective sync's source: the trainer's weights, gathered on demand).
        self._weights: Any = None
        self._version = -1
        self.collective: Any = None  # the driver-side collective weight sync, created by its first sync
        # (GPU colocation is refused by RLConfig.validate, before anything starts.)
        self.workers: list[Any] = [None] * self.num_workers
        for i in range(self.num_workers):
            self.workers[i] = self._start(i)
        if self.use_ray:  # wait until every actor is up (a failing __init__ surfaces here)
            import ray

            try:
                ray.get([w.ping.remote() for w in self.workers], timeout=self.rc.init_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"rollout workers did not start within rollout_cluster.init_timeout_s="
                    f"{self.rc.init_timeout_s} s; Ray has {ray.available_resources()} available, each worker "
                    f"asks for {self.rc.cpus_per_worker} CPU(s) (rollout_cluster.cpus_per_worker)"
                ) from None

    # -- lifecycle -------------------------------------------------------------------------------
    def _start(self, i: int):
        if not self.use_ray:
            return RolloutWorker(self.tree, i)
        import ray

        cpus = 0 if self.cfg.placement == "colocated" else self.rc.cpus_per_worker
        env = {
            **self.rc.worker_env(),
            "OMP_NUM_THREADS": str(self.rc.cpus_per_worker),
            "PYTHONPATH": os.pathsep.join(
                worker_code_paths() + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            ),
        }
        actor_cls = ray.remote(RolloutWorker)
        gpus = self.rc.gpus_per_worker if self.rc.gpus_per_worker is not None else (1 if cluster_gpus() > 0 else 0)
        gpus = 0 if self.cfg.placement == "colocated" else gpus
        runtime_env: dict[str, Any] = {"env_vars": env}
        if self.rc.python:  # e.g. the vLLM 0.13 + overlay environment (docs/vllm.md)
            runtime_env["py_executable"] = self.rc.python
        return actor_cls.options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, name=None, runtime_env=runtime_env
        ).remote(self.tree, i, self.rc.cpus_per_worker)

    def restart(self, i: int) -> None:
        """Replace worker ``i`` by a fresh one holding the current weights."""
        old = self.workers[i]
        if self.use_ray:
            import ray

            try:
                ray.kill(old, no_restart=True)
            except Exception:  # already dead: that is why we restart it
                pass
        elif old is not None:
            old.close()
        self.workers[i] = self._start(i)
        self.restarts += 1
        if self._weights is not None:
            weights = self._weights() if callable(self._weights) else self._weights
            self._call(i, "load_weights", weights, self._version, wait=True)
        log.warning("rollout worker %d restarted (%d restarts so far)", i, self.restarts)

    def shutdown(self) -> None:
        """Leave the weight-sync group (if any), then stop the workers."""
        if self.collective is not None:
            try:
                self.collective.close()
            except Exception:  # noqa: BLE001 - the workers are killed below whatever happened
                log.warning("closing the weight-sync group failed", exc_info=True)
            self.collective = None
        if self.use_ray:
            import ray

            for w in self.workers:
                try:
                    ray.kill(w, no_restart=True)
                except Exception:
                    pass
        else:
            for w in self.workers:
                if w is not None:
                    w.close()
        self.workers = []

    # -- calls -----------------------------------------------------------------------------------
    def _call(self, i: int, method: str, *args, wait: bool = False, **kwargs):
        w = self.workers[i]
        if not self.use_ray:
            return getattr(w, method)(*args, **kwargs)
        ref = getattr(w, method).remote(*args, **kwargs)
        if wait:
            import ray

            return ray.get(ref)
        return ref

    def load_weights(self, weights: Any, version: int) -> float:
        """Load ``weights`` (a state dict, or a Ray object ref to one) into every worker; returns the
        slowest worker's load seconds. Remembered for workers started later."""
        self._weights, self._version = weights, version
        results = [self._call(i, "load_weights", weights, version) for i in range(self.num_workers)]
        if self.use_ray:
            import ray

            results = ray.get(results)
        return max(results)

    def set_weight_source(self, source: Any, version: int) -> None:
        """What a restarted worker loads: a state dict, a Ray ref to one, or a zero-argument callable
        returning either (called at restart time)."""
        self._weights, self._version = source, version

    # Collective weight sync: these start the call on every worker and return at once with the Ray
    # object refs (the members block on each other, so the driver waits on all of them together).
    def join_weight_sync(self, rdv: Rendezvous) -> list:
        """Worker ``i`` joins the weight-sync group as rank ``i + 1``."""
        return [self._call(i, "join_weight_sync", rdv, i + 1) for i in range(self.num_workers)]

    def receive_weights(self, version: int) -> list:
        """Every worker receives the broadcast of ``version``."""
        return [self._call(i, "receive_weights", version) for i in range(self.num_workers)]

    def close_weight_sync(self) -> list:
        """Every worker leaves the weight-sync group."""
        return [self._call(i, "close_weight_sync") for i in range(self.num_workers)]

    def state_dict(self, i: int = 0) -> dict[str, torch.Tensor]:
        return self._call(i, "state_dict", wait=True)

    def generate(
        self,
        requests: list[RolloutRequest],
        params: dict[str, Any],
        *,
        crash_worker: int | None = None,
        max_retries: int = 2,
    ) -> tuple[list[dict], int]:
        """Sample all ``requests`` (sharded contiguously over the workers); returns the results in
        request order and how many shards were retried. ``crash_worker`` injects a fault (first try)."""
        shards = np.array_split(np.arange(len(requests)), self.num_workers)
        parts: list[list[dict] | None] = [None] * self.num_workers
        attempts = [0] * self.num_workers
        retried = 0
        pending = {
            i: self._submit(i, [requests[j] for j in shards[i]], params, "exit" if self.use_ray else "raise")
            if i == crash_worker
            else self._submit(i, [requests[j] for j in shards[i]], params, None)
            for i in range(self.num_workers)
            if len(shards[i])
        }
        for i in range(self.num_workers):
            if not len(shards[i]):
                parts[i] = []
        while pending:
            i, result, error = self._next(pending)
            if error is None:
                parts[i] = result
                continue
            attempts[i] += 1
            if attempts[i] > max_retries:
                raise RuntimeError(
                    f"rollout worker {i} failed {attempts[i]} times in one step "
                    f"(faults.max_step_retries={max_retries}): {error}"
                ) from error
            log.warning(
                "rollout worker %d failed (%s); restarting it and retrying its %d requests",
                i,
                type(error).__name__,
                len(shards[i]),
            )
            self.restart(i)
            retried += 1
            pending[i] = self._submit(i, [requests[j] for j in shards[i]], params, None)
        out = [r for p in parts for r in p]
        keys = [r["key"] for r in out]
        if keys != [r.key for r in requests]:  # every request answered exactly once, in order
            raise RuntimeError("rollout results do not match the requests (lost or duplicated samples)")
        return out, retried

    def _submit(self, i: int, reqs: list[RolloutRequest], params: dict, crash: str | None):
        if self.use_ray:
            return self._call(i, "generate", reqs, params, crash)
        try:  # inline: run now, keep the outcome
            return ("done", self._call(i, "generate", reqs, params, crash))
        except Exception as exc:  # noqa: BLE001 - a failed worker is restarted, whatever it raised
            return ("failed", exc)

    def _next(self, pending: dict) -> tuple[int, Any, BaseException | None]:
        if not self.use_ray:
            i = next(iter(pending))
            status, value = pending.pop(i)
            return (i, value, None) if status == "done" else (i, None, value)
        import ray

        by_ref = {ref: i for i, ref in pending.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=1)
        i = by_ref[ready[0]]
        del pending[i]
        try:
            return i, ray.get(ready[0]), None
        except ray.exceptions.RayError as exc:  # the actor died, or the method raised
            return i, None, exc
