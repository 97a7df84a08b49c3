"""``memento-rl`` with ``rollout.generator=vllm``: the seeded tiny RL run (as in test_rl_loop.py) with its
rollouts and evaluations through vLLM 0.32 + the Memento plugin (CPU build) in a Ray actor, weights sent
to the engine after every update over the collective weight-sync group. It must still learn, and at
every step the trainer's recomputed log-probs of vLLM's rollouts (memento-masked training forward)
must equal the log-probs vLLM reported (the trainer-path check)."""

from __future__ import annotations

import numpy as np
import pytest
import rl_warmed_policy
import vllm_harness as vh

from memento_train.rl.config import build_rl_config, config_tree
from memento_train.rl.driver import run_rl
from memento_train.training.tracking import read_metrics

pytestmark = pytest.mark.skipif(vh.plugin_skip_reason() is not None, reason=str(vh.plugin_skip_reason()))


@pytest.mark.slow
def test_tiny_rl_learns_with_vllm_rollouts_and_the_trainer_recomputes_vllms_logprobs(tmp_path):
    stale = rl_warmed_policy.stale_reason()
    assert stale is None, f"tests/assets/tiny_rl_warmed is stale ({stale}): run python tests/rl_warmed_policy.py"
    cfg = build_rl_config(
        config_tree(
            None,
            [
                "logger=none",
                f"output_dir={tmp_path}",
                "warmup.enabled=false",
                f"model.path={vh.ASSET}",
                "rollout.generator=vllm",
                "rollout.vllm.kv_cache_memory_gb=0.0625",
                "rollout.vllm.block_size=32",
                "weight_sync=collective",
                "reward.num_workers=0",
                "checkpoint.export_hf=false",
                "checkpoint.every=0",
                "train.total_steps=8",
                "eval.every=8",
            ],
        )
    )
    result = run_rl(cfg, progress=False)
    steps = [m for m in read_metrics(tmp_path) if "reward_mean" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))
    for m in steps:
        # fp32 on CPU, the same weights and mask: the trainer recomputes what vLLM reported. From step 2 on
        # this also proves the weight sync (the trainer's π_old is the updated policy).
        assert m["logprob_mismatch_max"] < 1e-4, (m["step"], m["logprob_mismatch_max"])
        assert m["peak_kv"] > 0 and m["blocks_per_response"] > 0 and np.isfinite(m["loss"])
    r = result.reward_means
    first, last = float(np.mean(r[:3])), float(np.mean(r[-3:]))
    assert 0.05 < first < 0.6, r
    assert last > first + 0.25, r
    evals = {m["step"]: m["eval/accuracy"] for m in read_metrics(tmp_path) if "eval/accuracy" in m}
    assert set(evals) == {0, 8} and evals[8] > evals[0] + 0.2, evals
