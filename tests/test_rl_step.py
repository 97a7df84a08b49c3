"""One RL step through ``memento-rl`` itself: which tokens the loss trains on, how it is normalised,
and what the step logs (the loss maths alone is in test_rl_algorithms.py)."""

from __future__ import annotations

import numpy as np
import pytest
import rl_warmed_policy
from test_rl_loop import run

from memento_train.rl.algorithm import AlgorithmConfig
from memento_train.rl.driver import loss_token_masks


def raising_reward(response: str, record) -> float:
    """Raises on odd-length responses (scored 0 and counted as errors), else 1."""
    if len(response) % 2:
        raise ValueError("odd")
    return 1.0


def constant_reward(response: str, record) -> float:
    return 1.0


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_total", "seq_mean", "group_total"])
def test_every_loss_aggregation_trains_through_memento_rl(tmp_path, loss_agg):
    _, (m,) = run(tmp_path, "train.total_steps=1", f"algorithm.loss_agg={loss_agg}", "optim.lr=0.01")
    assert m["loss_tokens"] == m["train/tokens"] == m["response_tokens"] > 0
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0


def test_step_metrics_count_reward_errors_timeouts_and_crashes(tmp_path):
    _, (m,) = run(tmp_path, "train.total_steps=1", "reward.fn=test_rl_step:raising_reward")
    assert m["reward/errors"] > 0 and m["reward/timeouts"] == 0 and m["reward/crashes"] == 0
    assert m["reward_mean"] == pytest.approx(1 - m["reward/errors"] / m["samples"])


def test_grading_rule_zeroes_truncated_and_unfinished_responses_and_logs_them(tmp_path):
    # A random policy never writes </think> and always hits the budget: by default nothing is graded.
    _, (m,) = run(
        tmp_path / "strict",
        "train.total_steps=1",
        "reward.fn=test_rl_step:constant_reward",
        "reward.require_think_end=true",
        "reward.truncated=zero",
    )
    assert m["reward_mean"] == 0.0 and m["reward/truncated_zeroed"] == m["samples"]
    _, (m,) = run(
        tmp_path / "lenient",
        "train.total_steps=1",
        "reward.fn=test_rl_step:constant_reward",
        "reward.require_think_end=false",
        "reward.truncated=zero",
    )
    assert m["reward_mean"] == 0.0 and m["reward/truncated_zeroed"] == m["samples"]
    _, (m,) = run(
        tmp_path / "think",
        "train.total_steps=1",
        "reward.fn=test_rl_step:constant_reward",
        "reward.require_think_end=true",
        "reward.truncated=score",
    )
    assert m["reward_mean"] == 0.0 and m["reward/no_think_end_zeroed"] == m["samples"]


def test_truncated_responses_and_all_equal_groups_leave_the_loss_when_asked(tmp_path):
    # Every response of a random policy is truncated, and a constant reward makes every group all-equal:
    # either option leaves nothing to train, so the normaliser has nothing to count and nothing moves.
    for option in ("algorithm.mask_truncated=true", "algorithm.drop_zero_adv_groups=true"):
        _, (m,) = run(
            tmp_path / option, "train.total_steps=1", "reward.fn=test_rl_step:constant_reward", option, "optim.lr=0.01"
        )
        assert m["loss_tokens"] == m["train/tokens"] == 0 and m["response_tokens"] > 0
        assert m["loss"] == 0.0 and m["grad_norm"] == 0.0 and m["kl"] == 0.0


def test_loss_token_masks_drop_forced_truncated_and_zero_advantage_groups():
    results = [
        {"token_ids": [1, 2, 3], "forced": [False, True, False], "finish_reason": "stop"},
        {"token_ids": [1, 2], "forced": [False, False], "finish_reason": "length"},
        {"token_ids": [4, 5], "forced": [False, False], "finish_reason": "stop"},
        {"token_ids": [6], "forced": [True], "finish_reason": "stop"},
    ]
    scores = [1.0, 0.0, 1.0, 1.0]  # group 0 has signal, group 1 is all-equal

    def masks(**options):
        return [m.tolist() for m in loss_token_masks(results, scores, 2, AlgorithmConfig(**options))]

    assert masks() == [[True, False, True], [True, True], [True, True], [False]]
    assert masks(train_forced_tokens=True) == [[True] * 3, [True] * 2, [True] * 2, [True]]
    assert masks(mask_truncated=True) == [[True, False, True], [False, False], [True, True], [False]]
    assert masks(drop_zero_adv_groups=True) == [[True, False, True], [True, True], [False, False], [False]]


def test_forced_block_ends_are_left_out_of_the_loss_by_default(tmp_path):
    """The warmed policy writes blocks; a block cap of 4 tokens forces <|block_end|> into them. (With
    ``algorithm.train_forced_tokens=true`` they stay: test_loss_token_masks_... above.)"""
    _, (m,) = run(
        tmp_path,
        "train.total_steps=1",
        f"model.path={rl_warmed_policy.ASSET}",
        "rollout.block_masking.max_block_tokens=4",
        "rollout.max_new_tokens=64",
    )
    assert m["forced_block_ends"] > 0
    assert m["loss_tokens"] == m["train/tokens"] == m["response_tokens"] - m["forced_block_ends"]
    # token_mean over what remains: the loss is the per-token mean over the trained tokens only
    assert m["loss"] == pytest.approx(m["train/pg_loss"] + 0.001 * m["kl"], rel=1e-4, abs=1e-7)


def test_the_reference_forward_runs_through_a_second_engine_sharded_like_the_policy(tmp_path, monkeypatch):
    from test_rl_loop import FAST
    from torch.distributed.tensor import DTensor

    from memento_train.cluster import WorkerGroup
    from memento_train.config.tree import to_dict
    from memento_train.engines.base import TrainEngine
    from memento_train.rl.config import build_rl_config, config_tree
    from memento_train.rl.trainer_worker import RLTrainerWorker

    cfg = build_rl_config(config_tree(None, [*FAST, f"output_dir={tmp_path}"]))
    with WorkerGroup(RLTrainerWorker, cfg.cluster, to_dict(cfg)) as trainer:
        trainer.run("setup")
        policy, ref = trainer._inline.engine, trainer._inline.ref_engine
        assert type(ref) is type(policy) and ref.compute_dtype == policy.compute_dtype
        assert all(isinstance(p, DTensor) for p in ref.module.parameters())  # sharded, as the policy
        assert ref.module is not policy.module
    # In a step, the reference log-probs come from that engine's forward (TrainEngine.logits).
    callers = []
    logits = TrainEngine.logits
    monkeypatch.setattr(TrainEngine, "logits", lambda self, mb: callers.append(self) or logits(self, mb))
    _, (m,) = run(tmp_path / "run", "train.total_steps=1")
    assert len({id(e) for e in callers}) == 2  # the policy's engine and the reference's
    assert m["kl"] == 0.0  # the reference is the initial policy, forward for forward
