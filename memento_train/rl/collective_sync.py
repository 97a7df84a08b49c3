"""The member side of the collective weight sync: a process group of trainer rank 0 + the rollout workers.

Trainer rank 0 (group rank 0) broadcasts the full weights; rollout worker ``i`` (group rank ``i + 1``)
receives them straight into its model. The group is *not* the trainer's default ``torch.distributed``
group (a process joins at most one of those, and the rollout workers have none): it is a backend object
built directly on a dedicated :class:`~torch.distributed.TCPStore` hosted by trainer rank 0, behind a
:class:`~torch.distributed.PrefixStore` whose prefix carries a *generation* number, so a rebuilt group
(after a rollout worker was restarted) never reads the keys of the previous one.

One sync, on every member:

1. the manifest (names, shapes, dtypes, bucket size) is broadcast as JSON bytes;
2. each receiver checks it against its own model and reports, through a SUM all-reduce, whether it
   found a mismatch; if any did, everyone stops there (the mismatching receivers raise
   :class:`WeightSyncMismatch` naming the tensor, the others return ``aborted``), so no member is
   left waiting in a broadcast that never comes;
3. the tensors go in flattened buckets (:func:`plan_buckets`: one dtype per bucket, up to
   ``bucket_bytes``), one broadcast per bucket, each receiver copying bucket ``k`` into its model
   while bucket ``k + 1`` is on the wire.

Backends: ``gloo`` (CPU tensors; the CPU CI path) or ``nccl`` (CUDA tensors; every member on its own
GPU). Nothing here knows about Ray or the driver: :mod:`memento_train.rl.weight_sync` orchestrates.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 256 << 20
BACKENDS = ("gloo", "nccl")
STORE_PREFIX = "memento/weight_sync"


class WeightSyncMismatch(RuntimeError):
    """The trainer's weights do not fit a rollout worker's model (a tensor missing, extra or reshaped)."""


# ---------------------------------------------------------------- manifest and buckets (pure)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor of the synced state (``dtype`` as ``str(torch.dtype)``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


@dataclass(frozen=True)
class Bucket:
    """Tensors broadcast as one flat buffer: indices into the manifest, all of dtype ``dtype``."""

    dtype: str
    indices: tuple[int, ...]
    numel: int


def parse_dtype(name: str) -> torch.dtype:
    """``"torch.bfloat16"`` (or ``"bfloat16"``) -> ``torch.bfloat16``."""
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return value


def state_manifest(state: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The specs of ``state``, in its order (the order the tensors travel in)."""
    return [TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in state.items()]


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Group ``specs`` into buckets of one dtype and at most ``bucket_bytes`` each (a tensor larger than
    that gets a bucket of its own). Dtypes in order of first appearance, tensors in manifest order
    within a dtype; a pure function of its arguments, so sender and receivers plan alike."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    by_dtype: dict[str, list[int]] = {}
    for i, s in enumerate(specs):
        by_dtype.setdefault(s.dtype, []).append(i)
    buckets: list[Bucket] = []
    for dtype, indices in by_dtype.items():
        item = torch.empty((), dtype=parse_dtype(dtype)).element_size()
        current: list[int] = []
        numel = 0
        for i in indices:
            n = specs[i].numel
            if current and (numel + n) * item > bucket_bytes:
                buckets.append(Bucket(dtype, tuple(current), numel))
                current, numel = [], 0
            current.append(i)
            numel += n
        if current:
            buckets.append(Bucket(dtype, tuple(current), numel))
    return buckets


def flatten_bucket(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous 1-D tensor holding ``tensors`` back to back (same dtype and device)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1).contiguous()
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_bucket(flat: torch.Tensor, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``specs`` (the inverse of :func:`flatten_bucket`)."""
    out, offset = [], 0
    for s in specs:
        out.append(flat[offset : offset + s.numel].view(s.shape))
        offset += s.numel
    if offset != flat.numel():
        raise ValueError(f"bucket holds {flat.numel()} elements, the specs {offset}")
    return out


def check_manifest(
    specs: Sequence[TensorSpec], targets: Mapping[str, torch.Tensor], optional: Iterable[str] = ()
) -> list[str]:
    """Problems that stop ``specs`` from loading into ``targets`` (empty: it fits). Dtypes may differ
    (the copy casts); names and shapes may not. ``optional`` target names may be absent from the specs
    (a tied ``lm_head.weight`` the trainer does not send)."""
    problems = []
    sent = {s.name for s in specs}
    for s in specs:
        t = targets.get(s.name)
        if t is None:
            problems.append(
                f"tensor {s.name!r} (shape {list(s.shape)}) is sent by the trainer but the rollout "
                f"model has no such tensor"
            )
        elif tuple(t.shape) != s.shape:
            problems.append(
                f"tensor {s.name!r} has shape {list(s.shape)} on the trainer but {list(t.shape)} in the rollout model"
            )
    skip = set(optional)
    for name in targets:
        if name not in sent and name not in skip:
            problems.append(f"tensor {name!r} of the rollout model is not sent by the trainer")
    return problems


# ---------------------------------------------------------------- the group


@dataclass(frozen=True)
class Rendezvous:
    """Everything a member needs to join the group (built by the driver, sent to every member).

    Attributes:
        host, port: the dedicated TCPStore on trainer rank 0's node (OS-assigned port).
        world_size: 1 (trainer rank 0) + the rollout workers.
        generation: bumped whenever the group is rebuilt; names the store prefix.
        backend: ``gloo`` or ``nccl``.
        timeout_s: bound of each collective (the trainer's ``cluster.collective_timeout_s``).
        store_timeout_s: bound of the rendezvous (``cluster.init_timeout_s``).
        bucket_bytes: the sender's bucket size (sent again in the manifest, which is what counts).
    """

    host: str
    port: int
    world_size: int
    generation: int
    backend: str = "gloo"
    timeout_s: float = 1800.0
    store_timeout_s: float = 300.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    @property
    def prefix(self) -> str:
        return f"{STORE_PREFIX}/{self.generation}"


def open_store(host: str, timeout_s: float) -> dist.TCPStore:
    """Trainer rank 0: the group's own TCPStore on a port the OS picks (no race for a probed port)."""
    return dist.TCPStore(host, 0, None, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class WeightSyncGroup:
    """One member of the weight-sync group: rank 0 sends (:meth:`send`), the others receive
    (:meth:`receive`). Constructing it blocks until every member has joined, so the driver starts all
    members together. ``store``: rank 0 passes the store it opened; the others connect to it.
    ``device``: where the member's tensors live (must be CUDA for ``nccl``)."""

    def __init__(
        self, rdv: Rendezvous, rank: int, *, store: dist.Store | None = None, device: torch.device | str | None = None
    ) -> None:
        if rdv.backend not in BACKENDS:
            raise ValueError(f"weight-sync backend must be one of {BACKENDS}, got {rdv.backend!r}")
        self.rdv, self.rank = rdv, rank
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if rdv.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"weight_sync=nccl: group rank {rank} holds its weights on {self.device}, not a GPU")
        # Gloo moves CPU tensors; NCCL moves tensors on this member's GPU.
        self.comm_device = self.device if rdv.backend == "nccl" else torch.device("cpu")
        if store is None:
            store = dist.TCPStore(rdv.host, rdv.port, None, False, timeout=timedelta(seconds=rdv.store_timeout_s))
        self._store = store  # keep the client (rank 0: the server) alive as long as the group
        prefixed = dist.PrefixStore(rdv.prefix, store)
        timeout = timedelta(seconds=rdv.timeout_s)
        if rdv.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, rdv.world_size, timeout)
        else:
            if not hasattr(dist, "ProcessGroupNCCL"):
                raise RuntimeError(
                    "weight_sync=nccl: this torch build has no NCCL (a CPU build?); "
                    "use weight_sync=collective, which picks gloo without GPUs"
                )
            torch.cuda.set_device(self.device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, rdv.world_size, opts)

    # -- primitives ------------------------------------------------------------------------------
    def _broadcast(self, tensor: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.pg.broadcast([tensor], opts)

    def _count_failures(self, failed: bool) -> int:
        t = torch.tensor([int(failed)], dtype=torch.int64, device=self.comm_device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self.pg.allreduce([t], opts).wait()
        return int(t.item())

    def _sync_device(self) -> None:
        if self.comm_device.type == "cuda":  # NCCL work is asynchronous to the host: time the real thing
            torch.cuda.synchronize(self.comm_device)

    # -- the two sides ---------------------------------------------------------------------------
    def send(self, state: Mapping[str, torch.Tensor], bucket_bytes: int | None = None) -> dict[str, float]:
        """Rank 0: broadcast ``state``. Returns ``broadcast_s`` (manifest + buckets), ``buckets``,
        ``bytes``, and ``aborted`` = 1.0 when a receiver reported a mismatch (nothing was sent)."""
        if self.rank != 0:
            raise RuntimeError("WeightSyncGroup.send is for group rank 0 (trainer rank 0)")
        t0 = time.perf_counter()
        specs = state_manifest(state)
        bucket_bytes = bucket_bytes or self.rdv.bucket_bytes
        payload = json.dumps(
            {"bucket_bytes": bucket_bytes, "tensors": [[s.name, list(s.shape), s.dtype] for s in specs]}
        ).encode()
        self._broadcast(torch.tensor([len(payload)], dtype=torch.int64, device=self.comm_device)).wait()
        self._broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.comm_device)).wait()
        failures = self._count_failures(False)
        if failures:
            return {"broadcast_s": time.perf_counter() - t0, "buckets": 0.0, "bytes": 0.0, "aborted": 1.0}
        buckets = plan_buckets(specs, bucket_bytes)
        names = [s.name for s in specs]
        total = 0
        in_flight = None  # (work, buffer): the buffer must outlive its broadcast
        for b in buckets:
            # Flatten the next bucket while the previous one is on the wire.
            flat = flatten_bucket([state[names[i]].detach() for i in b.indices]).to(self.comm_device)
            if in_flight is not None:
                in_flight[0].wait()
            in_flight = (self._broadcast(flat), flat)
            total += flat.numel() * flat.element_size()
        if in_flight is not None:
            in_flight[0].wait()
        self._sync_device()
        return {
            "broadcast_s": time.perf_counter() - t0,
            "buckets": float(len(buckets)),
            "bytes": float(total),
            "aborted": 0.0,
        }

    def receive(
        self, targets: Mapping[str, torch.Tensor], *, optional: Iterable[str] = (), who: str = "rollout worker"
    ) -> dict[str, float]:
        """Ranks > 0: receive the broadcast and copy it into ``targets`` in place (a model's
        ``state_dict()``: its tensors share storage with the parameters). Returns ``receive_s`` (the
        whole receive), ``load_s`` (the part spent copying into the model) and ``aborted``.

        Raises :class:`WeightSyncMismatch` naming the tensor when the manifest does not fit ``targets``.
        """
        if self.rank == 0:
            raise RuntimeError("WeightSyncGroup.receive is for group ranks > 0 (the rollout workers)")
        t0 = time.perf_counter()
        size = torch.zeros(1, dtype=torch.int64, device=self.comm_device)
        self._broadcast(size).wait()
        raw = torch.empty(int(size.item()), dtype=torch.uint8, device=self.comm_device)
        self._broadcast(raw).wait()
        manifest = json.loads(raw.cpu().numpy().tobytes().decode())
        specs = [TensorSpec(n, tuple(shape), dtype) for n, shape, dtype in manifest["tensors"]]
        problems = check_manifest(specs, targets, optional)
        if self._count_failures(bool(problems)):
            if problems:
                more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                raise WeightSyncMismatch(
                    f"{who}: the trainer's weights do not match this model: "
                    f"{'; '.join(problems[:3])}{more}. Trainer and rollout workers must "
                    f"load the same architecture (model.*)"
                )
            return {"receive_s": time.perf_counter() - t0, "load_s": 0.0, "aborted": 1.0}

        load_s = 0.0

        def load(bucket: Bucket, flat: torch.Tensor) -> None:
            nonlocal load_s
            t = time.perf_counter()
            parts = [specs[i] for i in bucket.indices]
            with torch.no_grad():
                for spec, value in zip(parts, unflatten_bucket(flat, parts)):
                    targets[spec.name].copy_(value)
            load_s += time.perf_counter() - t

        pending = None  # (bucket, work, buffer) received but not yet loaded
        for b in plan_buckets(specs, int(manifest["bucket_bytes"])):
            buf = torch.empty(b.numel, dtype=parse_dtype(b.dtype), device=self.comm_device)
            work = self._broadcast(buf)  # posted before loading the previous bucket: they overlap
            if pending is not None:
                pending[1].wait()
                load(pending[0], pending[2])
            pending = (b, work, buf)
        if pending is not None:
            pending[1].wait()
            load(pending[0], pending[2])
        self._sync_device()
        return {"receive_s": time.perf_counter() - t0, "load_s": load_s, "aborted": 0.0}

    def close(self) -> None:
        """Shut the backend down and drop the store connection. Idempotent."""
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - a peer already gone must not stop the teardown
                pass
        self._store = None
