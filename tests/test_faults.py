"""The pieces of fault handling, in isolation: the preemption guard, the step watchdog's deadline,
naming the collective a stack is blocked in, and which config values are secrets."""

from __future__ import annotations

import os
import signal

import pytest

from memento_train.cluster.stack_dumps import innermost_collective
from memento_train.config.errors import ConfigError
from memento_train.faults.config import FaultsConfig
from memento_train.faults.preemption import EXIT_PREEMPTED, Preempted, PreemptionGuard
from memento_train.faults.secrets import REDACTED, redact_config, scrub, secret_values
from memento_train.faults.watchdog import StepWatchdog, describe_stacks

SITE = "/usr/lib/python3.11/site-packages"
# What faulthandler writes for a Ray actor blocked in FSDP's all-gather: helper threads first, the
# main thread (the one that does not start in threading._bootstrap) among them.
BLOCKED_IN_ALL_GATHER = f"""Thread 0x00007f32387fe6c0 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "{SITE}/tqdm/_monitor.py", line 69 in run
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f340586ab80 (most recent call first):
  File "{SITE}/torch/distributed/distributed_c10d.py", line 4394 in all_gather_single
  File "{SITE}/torch/distributed/c10d_logger.py", line 83 in wrapper
  File "{SITE}/torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py", line 364 in foreach_all_gather
  File "/src/memento_train/sft/worker.py", line 99 in train_step
  File "{SITE}/ray/_private/workers/default_worker.py", line 323 in <module>
"""
SLEEPING = """Thread 0x00007fa3f3ffe6c0 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Thread 0x00007fa57c8b76c0 (most recent call first):
  File "/src/memento_train/sft/worker.py", line 95 in train_step
  File "/x/ray/_private/workers/default_worker.py", line 323 in <module>
"""
GLOO_TIMEOUT = f"""Traceback (most recent call last):
  File "/src/job.py", line 8, in run
    dist.all_reduce(t)
  File "{SITE}/torch/distributed/c10d_logger.py", line 83, in wrapper
    return func(*args, **kwargs)
  File "{SITE}/torch/distributed/distributed_c10d.py", line 3252, in all_reduce
    work.wait()
RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete
"""


def test_the_collective_is_named_from_a_stack_dump_or_a_traceback():
    assert (
        str(innermost_collective(BLOCKED_IN_ALL_GATHER))
        == "all_gather_single (torch/distributed/distributed_c10d.py:4394)"
    )
    assert str(innermost_collective(GLOO_TIMEOUT)) == "all_reduce (torch/distributed/distributed_c10d.py:3252)"
    assert innermost_collective(SLEEPING) is None
    assert describe_stacks({0: BLOCKED_IN_ALL_GATHER, 1: SLEEPING}).splitlines() == [
        "rank(s) [0] wait in a collective that rank(s) [1] never entered",
        "  rank 0: waiting in collective all_gather_single (torch/distributed/distributed_c10d.py:4394)",
        "  rank 1: not in a collective: train_step (memento_train/sft/worker.py:95)",
    ]


def test_the_watchdog_arms_after_warmup_at_a_multiple_of_the_median_with_a_floor():
    dog = StepWatchdog(factor=10, min_s=5, warmup_steps=3)
    assert dog.deadline() is None
    for t in (1.0, 0.2, 0.3):
        dog.record(t)
    assert dog.deadline() == pytest.approx(5.0)  # 10 x 0.3 = 3 s is below the floor
    for t in (0.8, 0.9, 1.0):
        dog.record(t)
    assert dog.deadline() == pytest.approx(8.5)  # median 0.85: one slow outlier does not move it much
    assert StepWatchdog(factor=0, min_s=0, warmup_steps=0).deadline() is None


@pytest.mark.parametrize(
    "option, value",
    [
        ("watchdog_factor", 0.5),
        ("max_restarts", -1),
        ("on_hang", "panic"),
        ("inject_hang_at_step", 0),
        ("watchdog_min_s", float("nan")),
    ],
)
def test_faults_config_names_the_bad_option(option, value):
    with pytest.raises(ConfigError, match=f"faults.{option}"):
        FaultsConfig(**{option: value}).validate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_the_guard_turns_a_signal_into_a_request_and_restores_the_previous_handler(sig):
    before = signal.getsignal(sig)
    saved = []
    with PreemptionGuard() as guard:
        guard.stop_if_requested(3, 10, -1, save=lambda: saved.append(3), checkpoint="c3")  # nothing yet
        os.kill(os.getpid(), sig)
        assert guard.requested and guard.signal_name == sig.name and saved == []
        guard.stop_if_requested(4, 4, -1, save=lambda: saved.append(4), checkpoint="c4")  # last step: finish
        with pytest.raises(Preempted, match=f"preempted by {sig.name}: stopped after step 5 with checkpoint c5"):
            guard.stop_if_requested(5, 10, -1, save=lambda: saved.append(5), checkpoint="c5")
        with pytest.raises(Preempted):
            guard.stop_if_requested(6, 10, 6, save=lambda: saved.append(6), checkpoint="c6")  # already saved
        assert saved == [5]
        with pytest.raises(SystemExit) as second:  # a second signal stops at once
            os.kill(os.getpid(), sig)
        assert second.value.code == 128 + sig
    assert signal.getsignal(sig) == before and EXIT_PREEMPTED == 75


def test_secret_env_values_are_redacted_and_scrubbed(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("MY_SHARED_VALUE", "from-the-driver-env")
    tree = {
        "output_dir": "/x",
        "cluster": {
            "env": {"HF_TOKEN": "hf_secret123", "MY_SHARED_VALUE": "plain-but-marked", "NCCL_DEBUG": "INFO"},
            "secret_env": ["MY_SHARED_VALUE"],
        },
        "rollout_cluster": {"env": {"AWS_SECRET_ACCESS_KEY": "aws123456"}},
    }
    red = redact_config(tree)
    assert red["cluster"]["env"] == {"HF_TOKEN": REDACTED, "MY_SHARED_VALUE": REDACTED, "NCCL_DEBUG": "INFO"}
    assert red["rollout_cluster"]["env"] == {"AWS_SECRET_ACCESS_KEY": REDACTED}
    assert tree["cluster"]["env"]["HF_TOKEN"] == "hf_secret123"  # a copy: the run itself keeps the values
    values = secret_values(tree)
    assert set(values) == {"hf_secret123", "plain-but-marked", "from-the-driver-env", "aws123456", "k" * 40}
    assert scrub("token hf_secret123 and " + "k" * 40, values) == f"token {REDACTED} and {REDACTED}"


def test_secret_env_names_are_forwarded_from_the_driver_environment(monkeypatch):
    from memento_train.cluster import ClusterConfig

    monkeypatch.setenv("HF_TOKEN", "from-env")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    cfg = ClusterConfig(
        env={"A": "1", "HF_TOKEN": "from-config"}, secret_env=["HF_TOKEN", "NOT_SET_ANYWHERE"]
    ).validate()
    assert cfg.worker_env() == {"A": "1", "HF_TOKEN": "from-config"}  # the config's value wins when given
    assert ClusterConfig(secret_env=["HF_TOKEN"]).worker_env() == {"HF_TOKEN": "from-env"}
    with pytest.raises(ConfigError, match="cluster.env.X: expected a string") as err:
        ClusterConfig(env={"X": 12345678}).validate()
    assert "12345678" not in str(err.value)  # a bad value is not echoed: it may be a secret
