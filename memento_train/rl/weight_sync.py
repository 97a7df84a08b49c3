"""Weight sync from the trainer workers to the rollout workers, timed: :func:`sync_weights`.

``weight_sync`` picks the path (:func:`resolve_sync`):

``object_store`` (the default ``auto`` on CPU): trainer rank 0 gathers the full fp32 weights
(``engine.full_state_dict()``, a collective over the trainer ranks). Returned from a Ray actor, that
dict is stored once in the Ray object store; each rollout actor receives the object *reference* and
Ray hands it the weights from the store (zero-copy on the same node), so the driver never holds a
copy. Each rollout worker then copies the tensors into its model in place (``load_state_dict``).

``collective`` (backend: NCCL when trainer rank 0 and the rollout workers have GPUs, gloo otherwise,
so the CPU CI runs the very same code) and ``nccl`` (the same, but GPUs required): all trainer ranks
still take part in the gather, then trainer rank 0 *broadcasts* the weights to every rollout worker
over a process group of its own (trainer rank 0 + the rollout workers), in flattened per-dtype buckets
of up to 256 MiB, after a manifest the receivers check against their models
(:mod:`memento_train.rl.collective_sync`). :class:`CollectiveWeightSync` is the driver side: it
creates the group at the first sync (a dedicated TCPStore on trainer rank 0's node, OS-assigned port,
its address passed to the rollout workers through the driver; a PrefixStore per group generation),
reuses it for every later sync, rebuilds it when a rollout worker was restarted, and closes it when
the pool shuts down. The group is a Ray-actor thing: inline (``use_ray=false``) the trainer and the
rollout workers share the driver process, so ``collective`` falls back to passing the dict directly
(``SyncStats.method`` says ``collective-inline``).

``auto`` on GPUs (GPU trainer and GPU rollout workers) means ``collective`` over NCCL. GPU rollout
workers are not wired into :class:`~memento_train.rl.rollout_worker.RolloutPool` yet, so today the NCCL
backend is exercised only by the GPU tests of the group itself (``tests/test_rl_weight_sync.py``).

Not implemented (the config rejects it): ``inplace`` — colocated vLLM engines loading the gathered
tensors in the same process without leaving the GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from memento_train.cluster import WorkerGroup
from memento_train.config.errors import ConfigError
from memento_train.rl.collective_sync import DEFAULT_BUCKET_BYTES, Rendezvous, WeightSyncMismatch
from memento_train.rl.config import RLConfig
from memento_train.rl.rollout_worker import RolloutPool

log = logging.getLogger(__name__)

COLLECTIVE_METHODS = ("collective", "nccl")
# How long closing the group may take before the actors are killed anyway (a member stuck in a
# collective whose peer died never answers).
CLOSE_TIMEOUT_S = 10.0


@dataclass
class SyncStats:
    """What one sync cost.

    Attributes:
        gather_s: the full-state gather on the trainer (slowest rank).
        load_s: copying into the rollout models (slowest worker).
        total_s: the whole sync as the driver saw it.
        method: ``object_store``, ``collective``, ``nccl``, or ``collective-inline`` / ``nccl-inline``
            (inline mode: passed directly).
        broadcast_s: collective only: trainer rank 0's broadcast (manifest + buckets).
        setup_s: collective only: creating (or rebuilding) the group; 0 when it was reused.
        backend: collective only: ``gloo`` or ``nccl``.
        buckets: collective only: broadcasts the weights took (after the manifest).
    """

    gather_s: float
    load_s: float
    total_s: float
    method: str = "object_store"
    broadcast_s: float = 0.0
    setup_s: float = 0.0
    backend: str | None = None
    buckets: int = 0

    def metrics(self) -> dict[str, float]:
        out = {"time/sync_s": self.total_s, "sync/gather_s": self.gather_s, "sync/load_s": self.load_s}
        if self.method in COLLECTIVE_METHODS:
            out.update({"sync/broadcast_s": self.broadcast_s, "sync/setup_s": self.setup_s})
        return out


def resolve_sync(cfg: RLConfig, trainer: WorkerGroup, pool: RolloutPool) -> tuple[str, str | None]:
    """``(method, backend)`` for ``cfg.weight_sync`` given where the workers actually run: method
    ``object_store`` / ``collective`` / ``nccl``, backend ``gloo`` / ``nccl`` (``None`` for the
    object store). Raises :class:`ConfigError` for ``nccl`` without GPUs on both sides."""
    trainer_device = trainer.devices[0] if trainer.devices else "cpu"
    rollout_gpus = pool.rc.gpus_per_worker or 0
    on_gpu = trainer_device.startswith("cuda") and rollout_gpus > 0
    method = cfg.weight_sync
    if method == "auto":
        method = "collective" if on_gpu else "object_store"
    if method == "object_store":
        return method, None
    if method not in COLLECTIVE_METHODS:
        raise ConfigError(f"weight_sync={method} is not implemented; use weight_sync=object_store, collective or auto")
    if method == "nccl" and not on_gpu:
        raise ConfigError(
            f"weight_sync=nccl needs GPUs on trainer rank 0 and the rollout workers, but trainer "
            f"rank 0 runs on {trainer_device} and rollout_cluster.gpus_per_worker={rollout_gpus}; "
            f"use weight_sync=collective (gloo without GPUs) or object_store"
        )
    return method, "nccl" if on_gpu else "gloo"


def sync_weights(trainer: WorkerGroup, pool: RolloutPool, version: int) -> SyncStats:
    """Push the trainer's current weights into every rollout worker (tagged ``version``), by the path
    ``pool.cfg.weight_sync`` selects (module docstring)."""
    method, backend = resolve_sync(pool.cfg, trainer, pool)
    if method == "object_store":
        return _sync_object_store(trainer, pool, version, method)
    if not trainer.cfg.use_ray:  # one process: nothing to broadcast to
        return _sync_object_store(trainer, pool, version, f"{method}-inline")
    sync = pool.collective
    if sync is None or sync.trainer is not trainer or sync.backend != backend:
        if sync is not None:
            sync.close()
        sync = pool.collective = CollectiveWeightSync(trainer, pool, method, backend)
    return sync.sync(version)


def gather_weights(trainer: WorkerGroup) -> Any:
    """The full-state gather on every trainer rank; rank 0's weights (Ray: their object ref, left in the
    object store for the rollout actors to read; inline: the dict)."""
    pending = trainer.run_async("full_weights")
    if not trainer.cfg.use_ray:
        return trainer.get(pending)[0]
    import ray

    # Wait for the collective on every rank, but only fetch the (None) results of ranks > 0: rank 0's
    # weights stay in the object store and travel to the rollout actors by reference.
    ray.wait(list(pending), num_returns=len(pending))
    if len(pending) > 1:
        trainer.get(type(pending)(pending[1:], pending.method, trainer))
    return pending[0]


def _sync_object_store(trainer: WorkerGroup, pool: RolloutPool, version: int, method: str) -> SyncStats:
    t0 = time.perf_counter()
    weights = gather_weights(trainer)
    gathered = time.perf_counter()
    load_s = pool.load_weights(weights, version)
    return SyncStats(gather_s=gathered - t0, load_s=load_s, total_s=time.perf_counter() - t0, method=method)


class CollectiveWeightSync:
    """Driver side of the collective path (Ray actors): owns the group's lifecycle.

    Kept on the pool (``pool.collective``) so that :meth:`RolloutPool.shutdown` closes it; create it
    through :func:`sync_weights`, or directly to pick ``bucket_bytes`` (tests).
    """

    def __init__(
        self,
        trainer: WorkerGroup,
        pool: RolloutPool,
        method: str = "collective",
        backend: str = "gloo",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self.trainer, self.pool = trainer, pool
        self.method, self.backend, self.bucket_bytes = method, backend, bucket_bytes
        self.generation = 0  # groups built so far (each one a fresh store prefix)
        self._address: dict[str, Any] | None = None  # trainer rank 0's store: {"host", "port"}
        self._members: list | None = None  # the rollout actors of the current group

    @property
    def ready(self) -> bool:
        """Whether the current group has exactly the pool's current workers (a restart replaces one)."""
        return (
            self._members is not None
            and len(self._members) == len(self.pool.workers)
            and all(a is b for a, b in zip(self._members, self.pool.workers))
        )

    def sync(self, version: int) -> SyncStats:
        """Gather on the trainer ranks, broadcast from rank 0, receive into every rollout worker."""
        t0 = time.perf_counter()
        if not self.ready:
            self._build()
        setup_s = time.perf_counter() - t0
        sent = list(self.trainer.run_async("send_weights", version))
        received = self.pool.receive_weights(version)
        labels = [f"trainer rank {r}" for r in range(len(sent))] + [f"rollout worker {i}" for i in range(len(received))]
        try:
            # No overall deadline: a large model's gather + broadcast may take long, and a hung member is
            # bounded by the group's per-collective timeout (a dead one fails its call at once).
            results = _wait_all(sent + received, labels, self.method, None)
        except BaseException:
            self._members = None  # the group is in an unknown state: rebuild it before any next sync
            raise
        trainer_out, rollout_out = results[: len(sent)], results[len(sent) :]
        if trainer_out[0]["aborted"]:  # the mismatching receiver raised above; this is a safety net
            raise WeightSyncMismatch(f"weight_sync={self.method}: a rollout worker refused the trainer's weights")
        # A worker restarted before the next sync loads the trainer's current weights: until the next
        # train step they are exactly ``version``.
        self.pool.set_weight_source(lambda: gather_weights(self.trainer), version)
        return SyncStats(
            gather_s=max(o["gather_s"] for o in trainer_out),
            load_s=max(o["load_s"] for o in rollout_out),
            total_s=time.perf_counter() - t0,
            method=self.method,
            broadcast_s=trainer_out[0]["broadcast_s"],
            setup_s=setup_s,
            backend=self.backend,
            buckets=int(trainer_out[0]["buckets"]),
        )

    def _build(self) -> None:
        cluster = self.trainer.cfg
        if self._members is not None:  # a rollout worker was restarted: leave the old group first
            log.info("weight sync: rebuilding the %s group (a rollout worker was restarted)", self.backend)
            self._leave(close_store=False)
        if self._address is None:
            opened = self.trainer.run("open_weight_sync", cluster.init_timeout_s)
            self._address = opened[0]
        self.generation += 1
        rdv = Rendezvous(
            host=self._address["host"],
            port=int(self._address["port"]),
            world_size=1 + self.pool.num_workers,
            generation=self.generation,
            backend=self.backend,
            timeout_s=cluster.collective_timeout_s,
            store_timeout_s=cluster.init_timeout_s,
            bucket_bytes=self.bucket_bytes,
        )
        # Every member blocks in the group's constructor until all have joined: start them together.
        joins = list(self.trainer.run_async("join_weight_sync", rdv)) + self.pool.join_weight_sync(rdv)
        labels = [f"trainer rank {r}" for r in range(self.trainer.world_size)] + [
            f"rollout worker {i}" for i in range(self.pool.num_workers)
        ]
        _wait_all(joins, labels, self.method, cluster.init_timeout_s)
        self._members = list(self.pool.workers)
        log.info(
            "weight sync: %s group %d of trainer rank 0 + %d rollout worker(s) via %s:%s",
            self.backend,
            self.generation,
            self.pool.num_workers,
            rdv.host,
            rdv.port,
        )

    def _leave(self, close_store: bool) -> None:
        """Every member leaves the group (best effort, bounded by CLOSE_TIMEOUT_S)."""
        import ray

        refs: list = []
        try:
            refs += list(self.trainer.run_async("close_weight_sync", close_store))
        except Exception:  # noqa: BLE001 - the trainer group may already be shut down
            log.debug("weight sync: trainer close failed", exc_info=True)
        try:
            refs += self.pool.close_weight_sync()
        except Exception:  # noqa: BLE001 - dead workers: they are being replaced or killed anyway
            log.debug("weight sync: rollout close failed", exc_info=True)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CLOSE_TIMEOUT_S)
        self._members = None

    def close(self) -> None:
        """Shut the group and its store down (pool shutdown). Idempotent."""
        if self._members is None and self._address is None:
            return
        self._leave(close_store=True)
        self._address = None


def _wait_all(refs: list, labels: list[str], method: str, timeout: float | None) -> list:
    """Results of ``refs`` in order, failing fast on the first member that raises or dies (its peers may
    stay blocked in a collective until the group's timeout; the caller rebuilds the group)."""
    import ray

    results: list = [None] * len(refs)
    where = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        if not ready:
            stuck = ", ".join(labels[where[r]] for r in pending)
            raise TimeoutError(f"weight_sync={method}: {stuck} did not finish within {timeout:g} s")
        i = where[ready[0]]
        try:
            results[i] = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            kind = WeightSyncMismatch if isinstance(cause, WeightSyncMismatch) else RuntimeError
            raise kind(f"weight_sync={method}: {labels[i]} failed: {cause}") from exc
    return results
