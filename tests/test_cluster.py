"""Ray orchestration (memento_train.cluster): worker groups, rendezvous, errors, shutdown, placement.

Every test that touches Ray shuts it down in a ``finally`` (the ``no_ray_left`` fixture), and the
tests that could hang on a misbehaving Ray run under a SIGALRM guard.
"""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import torch
import torch.distributed as dist

from memento_train.cluster import ClusterConfig, DistributedWorker, WorkerError, WorkerGroup
from memento_train.config.errors import ConfigError

ray = pytest.importorskip("ray")


class Probe(DistributedWorker):
    """A worker that reports what the group set up and runs small collectives."""

    def __init__(self, tag: str = "probe", fail_init: bool = False):
        if fail_init:
            raise RuntimeError("constructor refused")
        self.tag = tag

    def info(self) -> dict:
        return {
            "tag": self.tag,
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": self.local_rank,
            "device": str(self.device),
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
            "env": {
                k: os.environ.get(k)
                for k in (
                    "RANK",
                    "WORLD_SIZE",
                    "LOCAL_RANK",
                    "MASTER_ADDR",
                    "MASTER_PORT",
                    "OMP_NUM_THREADS",
                    "MEMENTO_TEST_VAR",
                )
            },
            "dist": (
                dist.is_initialized() and dist.get_rank(),
                dist.is_initialized() and dist.get_world_size(),
                dist.is_initialized() and dist.get_backend(),
            ),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        }

    def all_reduce_rank(self) -> float:
        t = torch.tensor([float(self.rank)])
        dist.all_reduce(t)
        return t.item()

    def echo(self, x, *, k=None):
        return (self.rank, x, k)

    def fail_on(self, rank: int):
        if self.rank == rank:
            raise ValueError(f"boom from rank {self.rank}")
        return "ok"

    def exit_on(self, rank: int):
        if self.rank == rank:
            os._exit(3)  # the process vanishes mid-call, like a segfault or an OOM kill
        return self.all_reduce_rank()  # the survivor waits in a collective its peer never joins


@pytest.fixture
def no_ray_left():
    """Shut Ray down after the test whatever happened."""
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    """Fail instead of hanging: SIGALRM interrupts the main thread after ``seconds``."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def ray_cfg(**overrides) -> ClusterConfig:
    # Short timeouts: a broken rendezvous should fail the test in seconds, not after 5 minutes.
    return ClusterConfig(**{"num_workers": 2, "init_timeout_s": 120.0, "collective_timeout_s": 60.0, **overrides})


# ---------------------------------------------------------------------- local Ray cluster


def test_two_ray_workers_form_a_gloo_group_and_get_per_rank_calls(no_ray_left):
    with time_limit(240, "two-worker group"):
        with WorkerGroup(Probe, ray_cfg(env={"MEMENTO_TEST_VAR": "set"}), tag="t") as group:
            assert group.world_size == 2 and group.backend == "gloo"
            assert group.run("all_reduce_rank") == [1.0, 1.0]  # 0 + 1 on both ranks

            infos = group.run("info")
            assert [i["rank"] for i in infos] == [0, 1]
            assert [i["world_size"] for i in infos] == [2, 2]
            # One node, CPU: the index among its workers (no device is selected by it).
            assert [i["local_rank"] for i in infos] == [0, 1]
            assert [i["dist"] for i in infos] == [(0, 2, "gloo"), (1, 2, "gloo")]
            assert all(i["device"] == "cpu" and i["tag"] == "t" for i in infos)
            assert infos[0]["pid"] != infos[1]["pid"] and os.getpid() not in {i["pid"] for i in infos}
            assert [i["env"]["RANK"] for i in infos] == ["0", "1"]
            assert [i["env"]["LOCAL_RANK"] for i in infos] == ["0", "1"]
            assert infos[0]["env"]["MASTER_PORT"] == infos[1]["env"]["MASTER_PORT"]
            assert all(i["env"]["MEMENTO_TEST_VAR"] == "set" for i in infos)  # cfg.env reaches workers
            assert all(i["threads"] == 1 and i["env"]["OMP_NUM_THREADS"] == "1" for i in infos)

            assert group.run_each("echo", [("a",), ("b",)], [{"k": 1}, {"k": 2}]) == [(0, "a", 1), (1, "b", 2)]
            assert group.run_each("echo", [(10,), (20,)]) == [(0, 10, None), (1, 20, None)]
            with pytest.raises(ValueError, match="one per rank"):
                group.run_each("echo", [(1,)])

            pending = group.run_async("echo", "x", k=0)
            assert len(pending) == 2 and all(isinstance(r, ray.ObjectRef) for r in pending)
            assert pending.get() == group.get(pending) == [(0, "x", 0), (1, "x", 0)]
    assert not ray.is_initialized()  # the group started Ray, so the group stopped it


def test_worker_method_raising_or_worker_dying_gives_worker_error_naming_rank_and_method(no_ray_left):
    with time_limit(240, "error propagation"):
        with WorkerGroup(Probe, ray_cfg(collective_timeout_s=10.0)) as group:
            with pytest.raises(WorkerError) as err:
                group.run("fail_on", 1)
            assert err.value.rank == 1 and err.value.method == "fail_on" and not err.value.died
            assert "rank 1" in str(err.value) and "fail_on" in str(err.value)
            assert "boom from rank 1" in str(err.value) and "ValueError" in str(err.value)
            assert isinstance(err.value.cause, ValueError)

            assert group.run("fail_on", 5) == ["ok", "ok"]  # a raising method leaves the workers alive

            # Rank 1's process exits while rank 0 waits for it in an all_reduce: an error, not a hang.
            with pytest.raises(WorkerError) as err:
                group.run("exit_on", 1)
            assert err.value.rank == 1 and err.value.method == "exit_on" and err.value.died
            assert "died" in str(err.value)

            # Later calls fail fast too, even though rank 0 may still sit in that all_reduce.
            with pytest.raises(WorkerError) as err:
                group.run("echo", 1)
            assert err.value.rank == 1 and err.value.method == "echo" and err.value.died


def test_unplaceable_workers_time_out_listing_asked_and_available_resources(no_ray_left):
    # Ray initialised by someone else (here the test) must survive the failed group.
    ray.init(num_cpus=2, include_dashboard=False)
    with time_limit(240, "placement timeout"):
        with pytest.raises(TimeoutError) as err:
            # One local node cannot host two workers on different nodes.
            WorkerGroup(Probe, ray_cfg(placement_strategy="STRICT_SPREAD", init_timeout_s=1.0))
    message = str(err.value)
    assert "init_timeout_s=1" in message and "STRICT_SPREAD" in message
    assert "asked: 2 bundle(s) of {CPU: 1}" in message and "available now: {CPU: 2}" in message
    assert ray.is_initialized()
    assert ray.util.placement_group_table() and all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
    )


def test_shut_down_or_failed_group_stops_the_ray_it_started_and_another_group_can_start(no_ray_left):
    with time_limit(240, "groups in a row"):
        group = WorkerGroup(Probe, ray_cfg(num_workers=1))
        assert group.run("all_reduce_rank") == [0.0]
        group.shutdown()
        group.shutdown()  # idempotent
        assert not ray.is_initialized()
        with pytest.raises(RuntimeError, match="shut down"):
            group.run("info")

        # A second group starts Ray again and its worker runs (here its constructor raises, which
        # fails the group: it must release everything it started, Ray included).
        with pytest.raises(WorkerError) as err:
            WorkerGroup(Probe, ray_cfg(num_workers=1), fail_init=True)
        assert err.value.rank == 0 and err.value.method == "Probe.__init__"
        assert "constructor refused" in str(err.value)
        assert not ray.is_initialized()


class OneVisibleGpu(DistributedWorker):
    """A worker on a Ray node that *claims* GPUs (``ray.init(num_gpus=2)``) while torch here is CPU-only.

    Ray gives each actor its own ``CUDA_VISIBLE_DEVICES`` (one entry); ``__init__`` (which runs before
    the group forms) makes ``torch.cuda`` answer like a CUDA build that sees exactly those devices:
    ``device_count()`` is the number of entries and ``set_device(i)`` fails like CUDA does for an
    ordinal beyond them. The process group itself stays gloo.
    """

    def __init__(self):
        import torch.cuda as cuda

        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        self.set_devices: list[int] = []

        def set_device(device):
            index = device.index if isinstance(device, torch.device) else int(device)
            if not 0 <= index < len(visible):
                raise RuntimeError("CUDA error: invalid device ordinal")
            self.set_devices.append(index)

        cuda.is_available = lambda: True
        cuda.device_count = lambda: len(visible)
        cuda.set_device = set_device

    def deepspeed_device(self) -> dict:
        """Run DeepSpeed's own device selection (``DeepSpeedEngine._configure_with_arguments`` reads
        ``LOCAL_RANK``, ``_set_distributed_vars`` calls the CUDA accelerator's ``set_device`` with it)."""
        from types import SimpleNamespace

        import deepspeed.comm as ds_dist
        from deepspeed.accelerator import set_accelerator
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
        from deepspeed.runtime.engine import DeepSpeedEngine

        set_accelerator(CUDA_Accelerator())
        ds_dist.init_distributed(dist_backend="gloo", dist_init_required=False)
        engine = SimpleNamespace()
        DeepSpeedEngine._configure_with_arguments(engine, None, None)
        DeepSpeedEngine._set_distributed_vars(engine, None)
        return {
            "ds_device": str(engine.device),
            "set_devices": self.set_devices,
            "device": str(self.device),
            "local_rank": self.local_rank,
            "node_local_rank": self.node_local_rank,
            "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "MEMENTO_NODE_LOCAL_RANK")},
        }


def test_deepspeed_under_ray_selects_each_workers_own_gpu_from_local_rank(no_ray_left):
    """Each Ray actor sees one GPU, so ``LOCAL_RANK`` (which DeepSpeed hands to ``set_device``) must be
    0 on every worker, not the worker's index on its node (rank 1 would ask for device 1 of 1)."""
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    with time_limit(240, "fake-GPU group"):
        with WorkerGroup(OneVisibleGpu, ray_cfg(gpus_per_worker=1, backend="gloo")) as group:
            infos = group.run("deepspeed_device")
    assert sorted(i["env"]["CUDA_VISIBLE_DEVICES"] for i in infos) == ["0", "1"]  # one GPU per actor
    assert [i["ds_device"] for i in infos] == ["cuda:0", "cuda:0"]
    assert [i["device"] for i in infos] == ["cuda:0", "cuda:0"]
    assert [i["set_devices"] for i in infos] == [[0, 0], [0, 0]]  # the worker's own call, then DeepSpeed's
    assert [i["env"]["LOCAL_RANK"] for i in infos] == ["0", "0"] and [i["local_rank"] for i in infos] == [0, 0]
    # The index among the node's workers stays available under its own name.
    assert [i["node_local_rank"] for i in infos] == [0, 1]
    assert [i["env"]["MEMENTO_NODE_LOCAL_RANK"] for i in infos] == ["0", "1"]


# ---------------------------------------------------------------------- multi-node (simulated)


@pytest.mark.slow
def test_strict_spread_places_workers_on_two_nodes_that_form_a_gloo_group(no_ray_left):
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        with time_limit(240, "2-node Ray cluster"):
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            # Joining by address, as the SLURM launcher's address="auto" does on a real cluster.
            cfg = ray_cfg(address=cluster.address, placement_strategy="STRICT_SPREAD")
            with WorkerGroup(Probe, cfg) as group:
                assert len(set(group.node_ids)) == 2
                infos = group.run("info")
                assert infos[0]["node_id"] != infos[1]["node_id"]
                assert group.run("all_reduce_rank") == [1.0, 1.0]
                # Simulated nodes share this host's IP, and local ranks count workers per IP.
                assert group.local_ranks == [0, 1]
            assert ray.is_initialized()  # a joined cluster is never shut down by the group
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


# ---------------------------------------------------------------------- inline mode


def test_inline_mode_runs_the_worker_in_the_driver_with_a_world_size_one_group():
    threads_before = torch.get_num_threads()
    cfg = ClusterConfig(use_ray=False, cpus_per_worker=1, env={"MEMENTO_TEST_VAR": "inline"})
    with WorkerGroup(Probe, cfg, tag="inline") as group:
        info = group.run("info")[0]
        assert info["pid"] == os.getpid() and info["tag"] == "inline"
        assert (info["rank"], info["world_size"], info["local_rank"], info["device"]) == (0, 1, 0, "cpu")
        assert info["dist"] == (0, 1, "gloo") and info["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert info["env"]["MEMENTO_TEST_VAR"] == "inline" and info["threads"] == 1
        assert group.run("all_reduce_rank") == [0.0]
        assert group.run_each("echo", [(7,)], [{"k": 8}]) == [(0, 7, 8)]
        pending = group.run_async("echo", 1)
        assert pending.get() == [(0, 1, None)]
        with pytest.raises(WorkerError) as err:
            group.run("fail_on", 0)
        assert err.value.rank == 0 and "fail_on" in str(err.value) and "boom from rank 0" in str(err.value)
    # The driver process gets back what the group changed.
    assert not dist.is_initialized()
    assert "MASTER_ADDR" not in os.environ and "MEMENTO_TEST_VAR" not in os.environ
    assert torch.get_num_threads() == threads_before
    assert not ray.is_initialized()


def test_inline_mode_constructor_error_is_a_worker_error_and_leaves_no_group():
    with pytest.raises(WorkerError, match="Probe.__init__"):
        WorkerGroup(Probe, ClusterConfig(use_ray=False), fail_init=True)
    assert not dist.is_initialized()


def test_inline_mode_refuses_a_driver_that_already_has_a_process_group_and_leaves_it_alone():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="already initialised"):
            WorkerGroup(Probe, ClusterConfig(use_ray=False))
        assert dist.is_initialized()  # the caller's group survives the failed WorkerGroup
    finally:
        dist.destroy_process_group()


def test_inline_mode_with_two_workers_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cluster\.num_workers"):
        WorkerGroup(Probe, ClusterConfig(use_ray=False, num_workers=2))


# ---------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides, option",
    [
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": True}, "num_workers"),
        ({"use_ray": False, "num_workers": 2}, "num_workers"),
        ({"use_ray": False, "address": "auto"}, "address"),
        ({"address": ""}, "address"),
        ({"use_ray": "yes"}, "use_ray"),
        ({"gpus_per_worker": -1}, "gpus_per_worker"),
        ({"gpus_per_worker": 1.5}, "gpus_per_worker"),
        ({"cpus_per_worker": 0}, "cpus_per_worker"),
        ({"placement_strategy": "pack"}, "placement_strategy"),
        ({"backend": "mpi"}, "backend"),
        ({"backend": "nccl", "gpus_per_worker": 0}, "backend"),
        ({"init_timeout_s": 0}, "init_timeout_s"),
        ({"collective_timeout_s": -1.0}, "collective_timeout_s"),
        ({"env": {"A": 1}}, "env.A"),
        ({"env": {"": "x"}}, "env"),
    ],
)
def test_config_validation_names_the_bad_option(overrides, option):
    with pytest.raises(ConfigError, match=rf"^trainer\.cluster\.{option}(:| must be)"):
        ClusterConfig(**overrides).validate(prefix="trainer.cluster")


def test_valid_config_validates_to_itself():
    cfg = ClusterConfig(
        address="auto",
        num_workers=4,
        gpus_per_worker=0.5,
        placement_strategy="STRICT_SPREAD",
        env={"NCCL_DEBUG": "WARN"},
    )
    assert cfg.validate() is cfg
