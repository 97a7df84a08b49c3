"""The base class of worker actors: :class:`DistributedWorker`.

A subclass holds one rank's state (model shard, optimizer, engine) and defines the methods the driver
calls on all ranks through :class:`~memento_train.cluster.worker_group.WorkerGroup`. The ``_mt_*``
methods are the group's internal hooks: they report where the worker runs and set up / tear down its
``torch.distributed`` default process group. Subclasses should not override them.
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

# Environment variables the group sets in each worker, like torchrun does, so that libraries reading
# them (DeepSpeed, Megatron, HF Accelerate) agree with the process group that is already initialised.
# LOCAL_RANK is the index of the worker's GPU among the GPUs *visible to it* (what DeepSpeed passes to
# torch.cuda.set_device): 0 under Ray, which gives each actor its own CUDA_VISIBLE_DEVICES. The index
# among the group's workers on the node is MEMENTO_NODE_LOCAL_RANK.
NODE_LOCAL_RANK_VAR = "MEMENTO_NODE_LOCAL_RANK"
DIST_ENV_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    NODE_LOCAL_RANK_VAR,
)


class DistributedWorker:
    """Base class of the worker actors of a :class:`~memento_train.cluster.worker_group.WorkerGroup`.

    Subclasses define ``__init__(*args, **kwargs)`` (called with the group's extra arguments) and their
    own methods. ``__init__`` runs before the group is formed, so it must not use ``torch.distributed``
    or the attributes below. Before any user method runs, the group has set:

    * ``self.rank``, ``self.world_size``: the worker's place in the group;
    * ``self.node_local_rank``: its index among the group's workers on the same node (same IP address);
    * ``self.device``: ``cuda:N`` when the worker has GPUs, else ``cpu``;
    * ``self.local_rank``: on GPU, ``N``, the index of its device among the GPUs visible to it (``0``
      under Ray, which sets ``CUDA_VISIBLE_DEVICES`` per actor); on CPU, ``node_local_rank``;

    and initialised the default ``torch.distributed`` process group (gloo on CPU, nccl on GPU), with
    ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (= ``self.local_rank``, so
    libraries that call ``torch.cuda.set_device(LOCAL_RANK)``, like DeepSpeed, pick the worker's own
    GPU), ``LOCAL_WORLD_SIZE`` and ``MEMENTO_NODE_LOCAL_RANK`` in the environment and
    ``torch.set_num_threads(cpus_per_worker)`` applied.
    """

    rank: int
    world_size: int
    local_rank: int
    node_local_rank: int
    device: torch.device

    # ------------------------------------------------------------------ group hooks (internal)

    def _mt_node_info(self) -> dict:
        """Where this worker runs: node IP (for local ranks and the rendezvous), Ray node id, pid."""
        import ray

        context = ray.get_runtime_context()
        return {
            "ip": ray.util.get_node_ip_address(),
            "node_id": context.get_node_id(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def _mt_open_store(self, host: str, world_size: int, init_timeout_s: float) -> int:
        """Rank 0 only: start the rendezvous key-value store on a free port and return the port.

        Letting the store bind port 0 itself (rather than probing for a free port and binding it later)
        leaves no window in which another process can take the port.
        """
        self._mt_store = dist.TCPStore(
            host,
            0,
            world_size,
            is_master=True,
            timeout=timedelta(seconds=init_timeout_s),
            wait_for_workers=False,
        )
        return self._mt_store.port

    def _mt_init_distributed(
        self,
        *,
        rank: int,
        world_size: int,
        local_rank: int,
        local_world_size: int,
        master_addr: str,
        master_port: int,
        backend: str,
        gpus: float,
        num_threads: int,
        init_timeout_s: float,
        collective_timeout_s: float,
    ) -> str:
        """Join the default process group; returns the device chosen, as a string.

        ``local_rank`` is the worker's index among the group's workers on its node (the group counts
        them by IP address); the device, and from it ``LOCAL_RANK``, is derived here, in the worker,
        from what it can see.
        """
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process; a process can be a worker "
                "of one group only (inline mode: shut the other group down, or use use_ray=true)"
            )
        self._mt_saved_env = {k: os.environ.get(k) for k in DIST_ENV_VARS}
        self._mt_saved_threads = torch.get_num_threads()
        self.device = _pick_device(local_rank, gpus)
        self.rank, self.world_size, self.node_local_rank = rank, world_size, local_rank
        self.local_rank = self.device.index if self.device.type == "cuda" else local_rank
        os.environ.update(
            {
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(local_world_size),
                NODE_LOCAL_RANK_VAR: str(local_rank),
            }
        )
        torch.set_num_threads(num_threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        store = getattr(self, "_mt_store", None)
        if store is None:  # ranks > 0 connect to rank 0's store
            store = dist.TCPStore(
                master_addr, master_port, world_size, is_master=False, timeout=timedelta(seconds=init_timeout_s)
            )
        # The store's own timeout bounds the rendezvous; the process group's bounds each collective.
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout_s)
        )
        self._mt_owns_group = True
        return str(self.device)

    def _mt_enable_stack_dumps(self, path: str) -> None:
        """Dump this worker's Python stacks into ``path`` when the group asks (see ``stack_dumps``)."""
        from memento_train.cluster import stack_dumps

        stack_dumps.register(path)

    def _mt_destroy_distributed(self) -> None:
        """Destroy the process group and restore what ``_mt_init_distributed`` changed (inline mode
        shares the driver process, whose environment and thread count must survive the group)."""
        # Only the group this worker made: in inline mode a failed init must not destroy a default
        # group that someone else created in the driver process.
        if getattr(self, "_mt_owns_group", False) and dist.is_initialized():
            dist.destroy_process_group()
        self._mt_owns_group = False
        self._mt_store = None
        saved_env = getattr(self, "_mt_saved_env", None)
        if saved_env is not None:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._mt_saved_env = None
        saved_threads = getattr(self, "_mt_saved_threads", None)
        if saved_threads is not None:
            torch.set_num_threads(saved_threads)
            self._mt_saved_threads = None


def _pick_device(node_local_rank: int, gpus: float) -> torch.device:
    """The worker's device.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs of each actor, so the actor's GPU is ``cuda:0``.
    When more GPUs are visible than the worker reserved (Ray with
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``, or inline mode on a multi-GPU host), the worker
    takes the GPU Ray assigned to it, else ``cuda:node_local_rank``.
    """
    if not gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the worker reserved {gpus} GPU(s) but CUDA is not available in it "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, host {socket.gethostname()}); "
            "set cluster.gpus_per_worker=0 to run on CPU"
        )
    visible = torch.cuda.device_count()
    if visible <= math.ceil(gpus):
        return torch.device("cuda", 0)
    assigned = _ray_gpu_ids()
    if assigned:
        # Ray's ids are those of the node; with CUDA_VISIBLE_DEVICES set, device N is its N-th entry.
        listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        first = str(assigned[0])
        return torch.device("cuda", listed.index(first) if first in listed else int(first) % visible)
    return torch.device("cuda", node_local_rank % visible)


def _ray_gpu_ids() -> list:
    """The GPU ids Ray assigned to this process (empty outside a Ray actor)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return []
    return list(ray.get_gpu_ids()) if ray.is_initialized() else []
