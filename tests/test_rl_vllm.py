"""``memento-rl`` with ``rollout.generator=vllm``: rollouts through vLLM 0.32 + the Memento plugin (CPU
build), weight sync into the engine after every update, and the trainer-path check: the trainer's
recomputed log-probs of vLLM's rollouts (memento-masked training forward) equal vLLM's own."""

from __future__ import annotations

import numpy as np
import pytest

import vllm_harness as vh
from memento_train.rl.driver import run_rl
from memento_train.rl.rl_config import build_rl_config, config_tree
from memento_train.tracking import read_metrics

pytestmark = pytest.mark.skipif(vh.plugin_skip_reason() is not None, reason=str(vh.plugin_skip_reason()))

VLLM_ROLLOUTS = [
    "logger=none", "warmup.enabled=false", f"model.path={vh.ASSET}", "rollout.generator=vllm",
    "rollout.vllm.kv_cache_memory_gb=0.0625", "rollout.vllm.block_size=32", "reward.num_workers=0",
    "checkpoint.export_hf=false", "checkpoint.every=0",
]


@pytest.mark.slow
def test_rl_steps_with_vllm_rollouts_sync_weights_and_trainer_logprobs_match_vllm(tmp_path):
    cfg = build_rl_config(config_tree(None, [
        *VLLM_ROLLOUTS, f"output_dir={tmp_path}", "cluster.use_ray=true", "rollout_cluster.use_ray=true",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=96",
        "train.total_steps=2", "optim.lr=3e-3", "eval.every=2", "eval.num_problems=4", "eval.samples=2",
    ]))
    result = run_rl(cfg, progress=False)
    steps = [m for m in read_metrics(tmp_path) if "reward_mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        # fp32 on CPU, the same weights and mask: the trainer recomputes what vLLM reported. At step 2
        # this also proves the weight sync: the trainer's π_old is the updated policy (lr 3e-3 moves it).
        assert m["logprob_mismatch_max"] < 1e-4, m["logprob_mismatch_max"]
        assert m["peak_kv"] > 0 and m["blocks_per_response"] > 0
    assert "eval/accuracy" in steps[-1] and len(result.reward_means) == 2
    assert np.isfinite(steps[-1]["loss"])
