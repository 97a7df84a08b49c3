"""Collective weight sync (``weight_sync=collective|nccl``): bucketing, the group itself (threads in
this process, gloo), config validation, the RL trainer WorkerGroup + RolloutPool on a local Ray
cluster, one RL step over Ray, and (GPU machines) the CUDA / NCCL paths."""

from __future__ import annotations

import threading

import pytest
import torch
from test_rl_loop import FAST
from test_rl_loop import run as run_fast

from memento_train.config.errors import ConfigError
from memento_train.rl.collective_sync import (
    Rendezvous,
    TensorSpec,
    WeightSyncGroup,
    WeightSyncMismatch,
    check_manifest,
    flatten_bucket,
    open_store,
    plan_buckets,
    state_manifest,
    unflatten_bucket,
)
from memento_train.rl.config import build_rl_config, config_tree
from memento_train.rl.trainer_worker import RLTrainerWorker


def run(tmp_path, *overrides: str):
    """One tiny RL run (test_rl_loop's FAST settings), training steps only (no evaluation at step 0)."""
    return run_fast(tmp_path, "eval.at_start=false", *overrides)


def _mixed_state(device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(7, 5, generator=g),
        "a.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(3, 4, 2, generator=g),
        "step": torch.tensor(11, dtype=torch.int64),
        "b.scale": torch.randn((), generator=g),
        "empty": torch.zeros(0, 3),
        "c.half": torch.randn(9, generator=g).to(torch.float16),
        "d.big": torch.randn(64, 64, generator=g),  # bigger than the test buckets: a bucket of its own
    }
    return {k: v.to(device) for k, v in state.items()}


# ---------------------------------------------------------------- bucketing (pure)


def test_buckets_hold_one_dtype_stay_under_the_limit_and_round_trip_exactly():
    state = _mixed_state()
    specs = state_manifest(state)
    buckets = plan_buckets(specs, bucket_bytes=96)
    assert sorted(i for b in buckets for i in b.indices) == list(range(len(specs)))  # each tensor once
    for b in buckets:
        assert {specs[i].dtype for i in b.indices} == {b.dtype}
        nbytes = b.numel * torch.empty((), dtype=specs[b.indices[0]].torch_dtype).element_size()
        assert nbytes <= 96 or len(b.indices) == 1  # only a single oversized tensor may exceed the limit
    assert len(buckets) > len({s.dtype for s in specs})  # the limit really split some dtype
    for b in buckets:
        parts = [specs[i] for i in b.indices]
        flat = flatten_bucket([state[s.name] for s in parts])
        assert flat.dim() == 1 and flat.numel() == b.numel and flat.dtype == parts[0].torch_dtype
        for spec, back in zip(parts, unflatten_bucket(flat.clone(), parts)):
            assert back.shape == state[spec.name].shape and back.dtype == state[spec.name].dtype
            assert torch.equal(back, state[spec.name])
    # one big bucket per dtype with the default limit (256 MiB)
    assert [b.dtype for b in plan_buckets(specs)] == ["torch.float32", "torch.bfloat16", "torch.int64", "torch.float16"]


def test_manifest_check_names_the_mismatching_tensor():
    targets = {"w": torch.zeros(2, 3), "lm_head.weight": torch.zeros(4)}
    assert check_manifest([TensorSpec("w", (2, 3), "torch.float32")], targets, optional={"lm_head.weight"}) == []
    (problem,) = check_manifest([TensorSpec("w", (3, 2), "torch.float32")], targets, optional={"lm_head.weight"})
    assert "'w'" in problem and "[3, 2]" in problem and "[2, 3]" in problem
    problems = check_manifest([TensorSpec("x", (1,), "torch.float32")], targets)
    assert any("'x'" in p and "no such tensor" in p for p in problems)
    assert any("'w'" in p and "not sent" in p for p in problems)


# ---------------------------------------------------------------- the group, in threads


def _run_group(
    state,
    targets: list[dict],
    *,
    bucket_bytes: int,
    device: str = "cpu",
    backend: str = "gloo",
    receiver_devices: list[str] | None = None,
) -> list:
    """Trainer rank 0 sends ``state``; receiver ``i`` (a thread each) loads into ``targets[i]``.
    Returns each member's result or the exception it raised."""
    store = open_store("127.0.0.1", 30.0)
    rdv = Rendezvous(
        "127.0.0.1",
        store.port,
        1 + len(targets),
        generation=1,
        backend=backend,
        timeout_s=30.0,
        store_timeout_s=30.0,
        bucket_bytes=bucket_bytes,
    )
    results: list = [None] * (1 + len(targets))
    devices = [device] + (receiver_devices or [device] * len(targets))

    def member(rank: int) -> None:
        group = None
        try:
            group = WeightSyncGroup(rdv, rank, store=store if rank == 0 else None, device=devices[rank])
            results[rank] = (
                group.send(state)
                if rank == 0
                else group.receive(targets[rank - 1], optional={"lm_head.weight"}, who=f"rollout worker {rank - 1}")
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[rank] = exc
        finally:
            if group is not None:
                group.close()

    threads = [threading.Thread(target=member, args=(r,), daemon=True) for r in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a weight-sync member hung"
    return results


def test_group_broadcasts_every_bucket_into_every_receiver_in_place():
    state = _mixed_state()
    targets = [{k: torch.full_like(v, 0) for k, v in state.items()} for _ in range(2)]
    storages = [{k: v.data_ptr() for k, v in t.items()} for t in targets]
    sent, *received = _run_group(state, targets, bucket_bytes=128)
    assert not isinstance(sent, BaseException), sent
    assert sent["aborted"] == 0 and sent["buckets"] > 4
    assert sent["bytes"] == sum(v.numel() * v.element_size() for v in state.values())
    for t, ptrs, out in zip(targets, storages, received):
        assert out["aborted"] == 0 and out["receive_s"] >= out["load_s"] >= 0
        assert all(torch.equal(t[k], state[k]) for k in state)
        assert {k: v.data_ptr() for k, v in t.items()} == ptrs  # loaded in place, no new tensors


def test_a_mismatching_receiver_names_the_tensor_and_nobody_hangs():
    state = _mixed_state()
    good = {k: torch.zeros_like(v) for k, v in state.items()}
    bad = {**{k: torch.zeros_like(v) for k, v in state.items()}, "a.weight": torch.zeros(5, 7)}
    sent, ok, refused = _run_group(state, [good, bad], bucket_bytes=1 << 20)
    assert sent["aborted"] == 1 and ok["aborted"] == 1  # everyone stopped after the manifest
    assert isinstance(refused, WeightSyncMismatch)
    assert "rollout worker 1" in str(refused) and "'a.weight'" in str(refused)
    assert all(not v.any() for v in good.values())  # nothing was half-loaded


# ---------------------------------------------------------------- config


def _cfg(*overrides: str):
    return build_rl_config(config_tree(None, [*FAST, "output_dir=/tmp/unused-rl-ws", *overrides]))


def test_config_accepts_collective_and_refuses_what_cannot_run():
    assert _cfg("weight_sync=collective").weight_sync == "collective"
    with pytest.raises(ConfigError, match=r"weight_sync=nccl.*cluster\.gpus_per_worker=0"):
        _cfg("weight_sync=nccl", "cluster.gpus_per_worker=0")
    with pytest.raises(ConfigError, match=r"weight_sync=inplace .*not implemented"):
        _cfg("weight_sync=inplace")
    with pytest.raises(ConfigError, match=r"weight_sync must be one of .*collective"):
        _cfg("weight_sync=broadcast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_without_gpus_is_a_config_error_naming_the_option():
    with pytest.raises(ConfigError, match=r"weight_sync=nccl needs GPUs.*rollout_cluster\.gpus_per_worker=null"):
        _cfg("weight_sync=nccl")


def test_inline_mode_passes_the_weights_directly(tmp_path):
    _, (m,) = run(tmp_path, "weight_sync=collective", "train.total_steps=1")
    assert "time/sync_s" in m and "sync/broadcast_s" not in m  # one process: nothing to broadcast
    assert m["logprob_mismatch_max"] < 1e-3


# ---------------------------------------------------------------- Ray: trainer WorkerGroup + RolloutPool


class PerturbableTrainer(RLTrainerWorker):
    """The RL trainer worker plus a test hook that changes its weights (FSDP2 shards: per rank)."""

    def perturb(self, scale: float) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.engine.module.parameters()):
                p.add_(scale * (self.rank + 1) * (i + 1))  # DTensor: this rank's shard only


RAY = [
    "cluster.use_ray=true",
    "rollout_cluster.use_ray=true",
    "cluster.cpus_per_worker=1",
    "rollout_cluster.cpus_per_worker=1",
    "cluster.init_timeout_s=120",
    "cluster.collective_timeout_s=60",
    "weight_sync=collective",
]


@pytest.fixture
def no_ray_left():
    """Shut Ray down after the test whatever happened."""
    ray = pytest.importorskip("ray")
    try:
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _assert_pool_has(pool, full: dict[str, torch.Tensor]) -> None:
    for i in range(pool.num_workers):
        state = pool.state_dict(i)
        bad = [k for k in full if not torch.equal(full[k], state[k])]
        assert not bad, f"rollout worker {i} differs from the trainer in {bad[:3]}"


def test_two_fsdp_ranks_broadcast_to_two_rollout_actors_and_reuse_the_group(tmp_path, no_ray_left):
    from concurrent.futures import ThreadPoolExecutor

    from memento_train.cluster import WorkerGroup
    from memento_train.config.tree import to_dict
    from memento_train.rl.driver import _open_ray
    from memento_train.rl.rollout_worker import RolloutPool
    from memento_train.rl.weight_sync import CollectiveWeightSync, sync_weights

    cfg = build_rl_config(
        config_tree(
            None, [*FAST, f"output_dir={tmp_path}", *RAY, "cluster.num_workers=2", "rollout_cluster.num_workers=2"]
        )
    )
    tree = to_dict(cfg)
    session = _open_ray(cfg)  # as the driver does: one Ray for both pools, CPUs for all four actors
    try:
        with ThreadPoolExecutor(1) as starter:  # the rollout actors start while the trainer ranks do
            starting = starter.submit(RolloutPool, cfg, tree)
            trainer = WorkerGroup(PerturbableTrainer, cfg.cluster, tree, name="rl-trainer")
            pool = starting.result()
        with trainer:
            try:
                trainer.run("setup")
                # Small buckets, so the tiny model travels in several broadcasts per dtype.
                pool.collective = CollectiveWeightSync(trainer, pool, "collective", "gloo", bucket_bytes=16 << 10)
                trainer.run("perturb", 0.01)
                before = pool.state_dict(0)
                first = sync_weights(trainer, pool, version=1)
                full = trainer.run("full_weights")[0]
                assert any(not torch.equal(before[k], full[k]) for k in full)
                _assert_pool_has(pool, full)
                assert (first.method, first.backend) == ("collective", "gloo")
                assert first.broadcast_s > 0 and first.gather_s > 0 and first.setup_s > 0 and first.buckets > 2
                assert {"time/sync_s", "sync/gather_s", "sync/broadcast_s", "sync/load_s"} <= set(first.metrics())

                trainer.run("perturb", -0.02)  # the second sync reuses the group
                sync_weights(trainer, pool, version=2)
                assert pool.collective.generation == 1
                _assert_pool_has(pool, trainer.run("full_weights")[0])
            finally:
                pool.shutdown()
            assert pool.collective is None
    finally:
        session.close()


def test_rl_steps_over_ray_with_collective_sync_keep_trainer_and_rollout_logprobs_equal(tmp_path, no_ray_left):
    # A large lr: after step 1 the policy really moves, so step 2's rollouts agree with the trainer
    # only if the collective sync delivered the new weights.
    _, records = run(tmp_path, *RAY, "train.total_steps=2", "optim.lr=0.05")
    assert [m["step"] for m in records] == [1, 2]
    for m in records:
        for key in ("time/sync_s", "sync/gather_s", "sync/broadcast_s", "sync/load_s", "sync/setup_s"):
            assert key in m and m[key] >= 0, key
    assert records[1]["sync/setup_s"] < records[1]["time/sync_s"]  # the group from the initial sync, reused
    assert records[1]["logprob_mismatch_max"] < 1e-3


@pytest.mark.slow
def test_a_restarted_rollout_actor_gets_the_weights_and_the_group_is_rebuilt_around_it(tmp_path, no_ray_left):
    # Rollout worker 0 dies in step 2: its replacement loads the trainer's current weights (the sync's
    # restart source), which step 2's mismatch checks; the sync after step 2 rebuilds the group with the
    # new actor (setup time again), and step 3's mismatch checks that the rebuilt group delivered.
    _, records = run(
        tmp_path,
        *RAY,
        "rollout_cluster.num_workers=2",
        "train.total_steps=3",
        "optim.lr=0.05",
        "faults.inject_rollout_crash_at_step=2",
    )
    assert [m["rollout_restarts"] for m in records] == [0, 1, 1]
    assert records[1]["sync/setup_s"] > records[2]["sync/setup_s"]
    assert all(m["logprob_mismatch_max"] < 1e-3 for m in records), [m["logprob_mismatch_max"] for m in records]


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gloo_group_moves_cuda_resident_weights():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    state = _mixed_state("cuda")
    targets = [{k: torch.zeros_like(v) for k, v in state.items()}]
    sent, received = _run_group(state, targets, bucket_bytes=128, device="cuda:0")
    assert not isinstance(received, BaseException), received
    assert all(torch.equal(targets[0][k], state[k]) for k in state)


@pytest.mark.gpu
def test_nccl_group_broadcasts_between_two_gpus():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs (NCCL puts each group rank on a GPU of its own)")
    state = _mixed_state("cuda:0")
    targets = [{k: torch.zeros_like(v, device="cuda:1") for k, v in state.items()}]
    sent, received = _run_group(
        state, targets, bucket_bytes=128, device="cuda:0", backend="nccl", receiver_devices=["cuda:1"]
    )
    assert not isinstance(sent, BaseException), sent
    assert not isinstance(received, BaseException), received
    assert all(torch.equal(targets[0][k].cpu(), state[k].cpu()) for k in state)
