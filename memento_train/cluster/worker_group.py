"""A group of workers that the driver calls as one: :class:`WorkerGroup` (single-controller style).

As in verl / OpenRLHF, one driver process builds the group and calls a method on every rank::

    class Trainer(DistributedWorker):
        def __init__(self, model_name): ...
        def train_step(self, batch): ...

    with WorkerGroup(Trainer, ClusterConfig(num_workers=8), "qwen3-8b") as group:
        losses = group.run("train_step", batch)      # one result per rank, ordered by rank

With ``use_ray=True`` the workers are Ray actors, one per placement-group bundle, forming one
``torch.distributed`` group. With ``use_ray=False`` one worker lives in the driver process and forms a
world-size-1 group on localhost: same interface, no Ray, for debugging and fast tests.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
import traceback
from collections import defaultdict
from typing import Any

import torch

from memento_train.cluster.config import ClusterConfig
from memento_train.cluster.session import RaySession, cluster_gpus, reserve_placement_group, worker_code_paths
from memento_train.cluster.worker import DistributedWorker
from memento_train.config.errors import ConfigError

log = logging.getLogger(__name__)

# How long shutdown() lets workers destroy their process groups before killing them; a worker stuck
# in a collective (its peer failed) never answers, and shutdown must not wait collective_timeout_s.
GRACEFUL_STOP_S = 10.0
# How long a rank's raised error waits for a peer's death to show up (the likelier root cause).
PEER_DEATH_GRACE_S = 3.0
_SLOW_START = "; raise cluster.init_timeout_s if start-up is just slow"


class WorkerError(RuntimeError):
    """A worker method raised, or a worker process died, during a group call.

    Attributes: ``rank``, ``method``, ``detail`` (the remote error and traceback as text) and
    ``cause`` (the remote exception object when it could be recovered, else ``None``).
    """

    def __init__(self, rank: int, method: str, detail: str, *, died: bool = False, cause: BaseException | None = None):
        self.rank, self.method, self.detail, self.died, self.cause = rank, method, detail, died, cause
        what = "the worker process died" if died else "the method raised"
        super().__init__(
            f"rank {rank}: {method}() failed: {what}. If other ranks wait for it in a collective, the "
            f"group is stuck: shut it down.\n{detail}"
        )


class AsyncResults(list):
    """What :meth:`WorkerGroup.run_async` returns: one pending result per rank (Ray object refs, or
    completed futures inline). Pass it to :meth:`WorkerGroup.get`, or call :meth:`get` on it."""

    def __init__(self, items, method: str, group: WorkerGroup):
        super().__init__(items)
        self.method = method
        self._group = group

    def get(self, timeout: float | None = None) -> list:
        """The results ordered by rank (see :meth:`WorkerGroup.get`)."""
        return self._group.get(self, timeout=timeout)


class WorkerGroup:
    """``cfg.num_workers`` instances of ``worker_cls`` forming one ``torch.distributed`` group.

    ``worker_cls(*args, **kwargs)`` is constructed on every rank; ``name`` labels the placement group
    and error messages. Construction reserves the resources (waiting up to ``cfg.init_timeout_s``),
    starts the workers and forms the process group; on any failure everything already started is
    released before the error propagates. Use as a context manager, or call :meth:`shutdown`.

    After construction: ``world_size``, ``backend`` (``"gloo"``/``"nccl"``), and per rank ``devices``
    (as strings), ``local_ranks`` (index among the group's workers on the same node, which workers
    also see as ``MEMENTO_NODE_LOCAL_RANK``; their ``LOCAL_RANK`` is the index of their GPU among the
    GPUs visible to them) and ``node_ids`` (Ray node ids; ``"inline"`` in inline mode).
    """

    world_size: int

    def __init__(
        self, worker_cls: type[DistributedWorker], cfg: ClusterConfig, *args: Any, name: str = "trainer", **kwargs: Any
    ):
        if not (isinstance(worker_cls, type) and issubclass(worker_cls, DistributedWorker)):
            raise TypeError(f"WorkerGroup: worker_cls must be a subclass of DistributedWorker, got {worker_cls!r}")
        self.cfg = cfg.validate()
        self.name = name
        self.worker_cls = worker_cls
        self.world_size = cfg.num_workers
        self.backend: str | None = None
        self.devices: list[str] = []
        self.node_ids: list[str] = []
        self.local_ranks: list[int] = []
        self.pids: list[int] = []
        self._stack_files: list[str] = []
        self._session: RaySession | None = None
        self._pg = None
        self._actors: list = []
        self._inline: DistributedWorker | None = None
        self._restore_env: dict[str, str | None] = {}
        self._closed = False
        try:
            if cfg.use_ray:
                self._start_ray_workers(args, kwargs)
            else:
                self._start_inline_worker(args, kwargs)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ calls

    def run(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Call ``method(*args, **kwargs)`` on every rank; return the results ordered by rank.

        Raises :class:`WorkerError` as soon as any rank fails (without waiting for the others).
        """
        return self.get(self.run_async(method, *args, **kwargs))

    def run_each(
        self,
        method: str,
        args_per_rank: list[tuple],
        kwargs_per_rank: list[dict] | None = None,
        *,
        timeout: float | None = None,
    ) -> list:
        """Call ``method(*args_per_rank[r], **kwargs_per_rank[r])`` on each rank ``r``; results by rank.

        ``timeout``: as in :meth:`get` (``TimeoutError`` naming the ranks still running).
        """
        if len(args_per_rank) != self.world_size:
            raise ValueError(
                f"run_each({method!r}): args_per_rank has {len(args_per_rank)} entries, "
                f"expected one per rank ({self.world_size})"
            )
        if kwargs_per_rank is None:
            kwargs_per_rank = [{} for _ in range(self.world_size)]
        elif len(kwargs_per_rank) != self.world_size:
            raise ValueError(
                f"run_each({method!r}): kwargs_per_rank has {len(kwargs_per_rank)} entries, "
                f"expected one per rank ({self.world_size})"
            )
        pending = [
            self._submit(rank, method, tuple(a), dict(k))
            for rank, (a, k) in enumerate(zip(args_per_rank, kwargs_per_rank))
        ]
        return self.get(AsyncResults(pending, method, self), timeout=timeout)

    def run_async(self, method: str, *args: Any, **kwargs: Any) -> AsyncResults:
        """Start ``method`` on every rank and return at once; :meth:`get` the results later.

        With Ray the items are object refs (usable as arguments of other Ray calls); inline, the
        method has already run and the items are completed ``concurrent.futures.Future`` objects.
        """
        return AsyncResults([self._submit(rank, method, args, kwargs) for rank in range(self.world_size)], method, self)

    def get(self, pending: list, timeout: float | None = None) -> list:
        """Wait for the results of :meth:`run_async`, ordered by rank.

        Raises :class:`WorkerError` on the first rank that fails, and ``TimeoutError`` naming the ranks
        still running when ``timeout`` seconds pass.
        """
        method = getattr(pending, "method", "<method>")
        if all(isinstance(p, concurrent.futures.Future) for p in pending):  # inline: already ran
            return [future.result() for future in pending]
        return self._wait_all(list(pending), method, timeout)

    # ------------------------------------------------------------------ diagnostics

    def enable_stack_dumps(self, directory: str) -> None:
        """Let :meth:`dump_stacks` read every worker's Python stacks; each rank appends them to
        ``directory/rank_NNNNN.txt`` (use shared storage on several nodes). Ray mode only."""
        if self._inline is not None:
            return
        self._stack_files = [os.path.join(directory, f"rank_{r:05d}.txt") for r in range(self.world_size)]
        self._wait_all(
            [a._mt_enable_stack_dumps.remote(path) for a, path in zip(self._actors, self._stack_files)],
            "enable_stack_dumps",
            self.cfg.init_timeout_s,
        )

    def dump_stacks(self, timeout: float = 20.0) -> dict[int, str]:
        """Every worker's Python stacks (all threads) now, by rank, even while it is blocked in a
        collective (see :mod:`memento_train.cluster.stack_dumps`); ``{}`` unless enabled."""
        from memento_train.cluster import stack_dumps

        if not self._stack_files:
            return {}
        offsets = [os.path.getsize(p) if os.path.exists(p) else 0 for p in self._stack_files]
        stack_dumps.signal_workers(list(zip(self.node_ids, self.pids)), timeout=timeout)
        texts = stack_dumps.read_new(self._stack_files, offsets, timeout=timeout)
        return dict(enumerate(texts))

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self, graceful: bool = True) -> None:
        """Destroy the workers' process groups, stop the workers, release the placement group, and shut
        Ray down if this group started it. Idempotent; never raises for an already dead worker.
        ``graceful=False`` kills the workers at once (they are known to be hung or half dead)."""
        if self._closed:
            return
        self._closed = True
        if self._inline is not None:
            try:
                self._inline._mt_destroy_distributed()
            except Exception:  # teardown must go on; the error is only worth a warning
                log.warning("cluster: destroying the inline process group failed", exc_info=True)
            self._inline = None
        for key, value in self._restore_env.items():  # inline mode set cfg.env in this process
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._restore_env = {}
        if self._actors:
            self._stop_actors(GRACEFUL_STOP_S if graceful else 0.0)
        if self._pg is not None:
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self._pg)
            except Exception:
                log.warning("cluster: removing the placement group failed", exc_info=True)
            self._pg = None
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ start-up

    def _start_inline_worker(self, args: tuple, kwargs: dict) -> None:
        cfg = self.cfg
        gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else int(torch.cuda.is_available())
        self.backend = _resolve_backend(cfg.backend, gpus)
        env = cfg.worker_env()
        self._restore_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            worker = self.worker_cls(*args, **kwargs)
        except Exception as exc:
            raise WorkerError(0, f"{self.worker_cls.__name__}.__init__", _format_exc(exc), cause=exc) from exc
        port = worker._mt_open_store("127.0.0.1", 1, cfg.init_timeout_s)
        self._inline = worker  # from here shutdown() destroys what init creates
        device = worker._mt_init_distributed(
            rank=0,
            world_size=1,
            local_rank=0,
            local_world_size=1,
            master_addr="127.0.0.1",
            master_port=port,
            backend=self.backend,
            gpus=gpus,
            num_threads=cfg.cpus_per_worker,
            init_timeout_s=cfg.init_timeout_s,
            collective_timeout_s=cfg.collective_timeout_s,
        )
        self.devices, self.node_ids, self.local_ranks = [device], ["inline"], [0]

    def _start_ray_workers(self, args: tuple, kwargs: dict) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg, n = self.cfg, self.world_size
        env = group_env(cfg)
        self._session = RaySession.open(cfg, needed_cpus=n * cfg.cpus_per_worker, worker_env=env)
        gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1 if cluster_gpus() > 0 else 0)
        self.backend = _resolve_backend(cfg.backend, gpus)
        bundle = {"CPU": float(cfg.cpus_per_worker), **({"GPU": float(gpus)} if gpus else {})}
        self._pg = reserve_placement_group(
            [dict(bundle) for _ in range(n)],
            cfg.placement_strategy,
            f"{self.name}-{os.getpid()}-{id(self):x}",
            cfg.init_timeout_s,
        )

        # The job's env already has ours when this group initialised Ray; an actor-level runtime_env
        # (merged over the job's by Ray) is needed only on a Ray someone else started.
        actor_env = {} if self._session.job_env == env else {"runtime_env": {"env_vars": env}}
        remote_cls = ray.remote(self.worker_cls)
        for rank in range(n):
            self._actors.append(
                remote_cls.options(
                    num_cpus=cfg.cpus_per_worker,
                    num_gpus=gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self._pg, placement_group_bundle_index=rank
                    ),
                    **actor_env,
                    max_restarts=0,  # a restarted rank would have lost its process group: fail instead
                ).remote(*args, **kwargs)
            )

        # Every actor has run __init__ once it answers; a failing __init__ surfaces here.
        infos = self._wait_all(
            [a._mt_node_info.remote() for a in self._actors],
            f"{self.worker_cls.__name__}.__init__",
            cfg.init_timeout_s,
            _SLOW_START,
        )
        self.node_ids = [info["node_id"] for info in infos]
        self.pids = [info["pid"] for info in infos]
        self.local_ranks, local_sizes = _local_ranks([info["ip"] for info in infos])
        master_addr = infos[0]["ip"]
        master_port = self._wait_all(
            [self._actors[0]._mt_open_store.remote(master_addr, n, cfg.init_timeout_s)],
            "rendezvous store",
            cfg.init_timeout_s,
            _SLOW_START,
        )[0]
        # All ranks must enter init_process_group together: it blocks until every rank has joined.
        self.devices = self._wait_all(
            [
                actor._mt_init_distributed.remote(
                    rank=rank,
                    world_size=n,
                    local_rank=self.local_ranks[rank],
                    local_world_size=local_sizes[rank],
                    master_addr=master_addr,
                    master_port=master_port,
                    backend=self.backend,
                    gpus=gpus,
                    num_threads=cfg.cpus_per_worker,
                    init_timeout_s=cfg.init_timeout_s,
                    collective_timeout_s=cfg.collective_timeout_s,
                )
                for rank, actor in enumerate(self._actors)
            ],
            "init_process_group",
            cfg.init_timeout_s,
            _SLOW_START,
        )
        log.info(
            "cluster: %s: %d workers, backend %s, master %s:%d", self.name, n, self.backend, master_addr, master_port
        )

    # ------------------------------------------------------------------ internals

    def _submit(self, rank: int, method: str, args: tuple, kwargs: dict):
        if self._closed:
            raise RuntimeError(f"WorkerGroup {self.name!r} is shut down; cannot call {method!r}")
        if not callable(getattr(self.worker_cls, method, None)):
            raise AttributeError(f"{self.worker_cls.__name__} has no method {method!r}")
        if self._inline is None:
            return getattr(self._actors[rank], method).remote(*args, **kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(getattr(self._inline, method)(*args, **kwargs))
        except Exception as exc:
            future.set_exception(WorkerError(rank, method, _format_exc(exc), cause=exc))
        return future

    def _wait_all(self, refs: list, method: str, timeout: float | None, hint: str = "") -> list:
        """Results of one ref per rank, failing fast: a rank's error is raised while others still run."""
        import ray

        results: list = [None] * len(refs)
        pending = {ref: rank for rank, ref in enumerate(refs)}
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=remaining)
            if not ready:
                ranks = sorted(pending.values())
                raise TimeoutError(
                    f"{self.name}: {method}() did not finish within {timeout:g} s on rank(s) {ranks}{hint}"
                )
            ref = ready[0]
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                # The method raised: str(exc) carries the remote traceback. A collective that failed
                # because a peer died raises too, often before the peer's death is reported: name the
                # dead peer (the root cause) when one shows up within a short grace period.
                dead = self._first_death(pending, method)
                if dead is not None:
                    raise dead from None
                raise WorkerError(
                    rank,
                    method,
                    _with_collective(str(exc), sorted(pending.values())),
                    cause=getattr(exc, "cause", None),
                ) from None
            except ray.exceptions.RayError as exc:  # ActorDiedError, worker crash, node death
                raise WorkerError(rank, method, f"{type(exc).__name__}: {exc}", died=True) from None
        return results

    @staticmethod
    def _first_death(pending: dict, method: str) -> WorkerError | None:
        """A ``died`` :class:`WorkerError` for the first still-pending rank whose process is gone."""
        import ray

        if not pending:
            return None
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=PEER_DEATH_GRACE_S)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError:
                continue
            except ray.exceptions.RayError as exc:
                return WorkerError(pending[ref], method, f"{type(exc).__name__}: {exc}", died=True)
        return None

    def _stop_actors(self, grace_s: float) -> None:
        import ray

        try:
            if grace_s > 0:
                refs = [actor._mt_destroy_distributed.remote() for actor in self._actors]
                ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        except Exception:  # dead actors, Ray already gone: killing below is what matters
            log.debug("cluster: graceful stop failed", exc_info=True)
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                log.debug("cluster: ray.kill failed", exc_info=True)
        self._actors = []


def group_env(cfg: ClusterConfig) -> dict[str, str]:
    """The environment of the group's Ray workers (what a driver that opens Ray itself should give the
    job, so that the group can take over Ray's prestarted worker processes)."""
    return {
        **cfg.worker_env(),
        # Torch and BLAS in each worker use the cores it reserved, not every core of the node.
        "OMP_NUM_THREADS": str(cfg.cpus_per_worker),
        "PYTHONPATH": os.pathsep.join(
            worker_code_paths() + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    }


def _resolve_backend(backend: str, gpus: float) -> str:
    if backend == "auto":
        return "nccl" if gpus else "gloo"
    if backend == "nccl" and not gpus:
        raise ConfigError(
            "cluster.backend: nccl needs GPUs but the workers get none (the Ray cluster has "
            "no GPUs, or gpus_per_worker=0); use backend=gloo or auto"
        )
    return backend


def _local_ranks(ips: list[str]) -> tuple[list[int], list[int]]:
    """Per rank: index among the ranks with the same node IP, and how many ranks share that IP."""
    seen: dict[str, int] = defaultdict(int)
    local = []
    for ip in ips:
        local.append(seen[ip])
        seen[ip] += 1
    return local, [seen[ip] for ip in ips]


def _with_collective(detail: str, still_running: list[int]) -> str:
    """Prefix a remote traceback that failed inside a ``torch.distributed`` call (a collective timeout,
    a peer that closed its connection) with the collective and the ranks that had not finished."""
    from memento_train.cluster.stack_dumps import innermost_collective

    frame = innermost_collective(detail)
    if frame is None:
        return detail
    peers = f"; rank(s) {still_running} had not finished this call" if still_running else ""
    return f"failed inside collective {frame}{peers}\n{detail}"


def _format_exc(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()
