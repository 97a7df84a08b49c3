"""The RL loop (``memento-rl``): prompt scheduling, rollout -> micro-batch assembly, weight sync,
train/rollout log-prob agreement, and (slow) the seeded run whose mean reward must rise."""

from __future__ import annotations

import numpy as np
import pytest
import rl_warmed_policy
import torch

from memento_train.data.render import Renderer
from memento_train.data.synthetic import SyntheticTaskConfig, synthetic_record
from memento_train.masking import BlockMaskingConfig, SpecialTokens, parse
from memento_train.rl.config import build_rl_config, config_tree
from memento_train.rl.driver import prompt_indices, run_rl
from memento_train.rl.trainer_worker import TOKEN_EXTRAS, rollout_document
from memento_train.tokens import special_token_ids
from memento_train.training.micro_batches import build_micro_batch, plan_micro_batches
from memento_train.training.tracking import read_metrics

# A random, very small policy and a tiny batch: plumbing tests, seconds per step, inline workers.
FAST = [
    "logger=none",
    "warmup.enabled=false",
    "cluster.use_ray=false",
    "rollout_cluster.use_ray=false",
    "model.tiny.hidden_size=16",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=1",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "reward.num_workers=0",
    "reward.fn=test_rl_loop:length_parity_reward",
    "checkpoint.export_hf=false",
    "eval.every=0",
    "eval.at_start=false",
    # a random policy never closes </think> and always hits the budget: let the parity reward see it all
    "reward.require_think_end=false",
    "reward.truncated=score",
]


def length_parity_reward(response: str, record) -> float:
    """A reward a random policy gets half the time (non-zero advantages, so updates really happen)."""
    return float(len(response) % 2)


def run(tmp_path, *overrides: str, progress: bool = False):
    cfg = build_rl_config(config_tree(None, [*FAST, f"output_dir={tmp_path}", *overrides]))
    return run_rl(cfg, progress=progress), read_metrics(tmp_path)


def test_prompt_order_is_a_pure_function_of_seed_and_step():
    a = [prompt_indices(s, seed=3, num_prompts=10, per_step=4) for s in range(5)]
    b = [prompt_indices(s, seed=3, num_prompts=10, per_step=4) for s in range(5)]
    assert all((x == y).all() for x, y in zip(a, b))
    flat = np.concatenate(a)  # 20 positions = two epochs, each a permutation of all prompts
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not (prompt_indices(0, seed=4, num_prompts=10, per_step=4) == a[0]).all()


def test_warmup_unboxed_answer_rate_must_be_a_fraction_and_reaches_the_warmup_data(tmp_path, monkeypatch):
    from memento_train.config.errors import ConfigError
    from memento_train.pipelines import rl_warmup

    with pytest.raises(ConfigError, match="warmup.unboxed_answer_rate"):
        build_rl_config(config_tree(None, [f"output_dir={tmp_path}", "warmup.unboxed_answer_rate=1.0"]))
    cfg = build_rl_config(config_tree(None, [f"output_dir={tmp_path}", "warmup.num_records=200"]))
    assert cfg.warmup.unboxed_answer_rate == 0.75  # the tiny default's sloppy teacher

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # stop at the SFT stage: only the warm-up data it was handed matters here
        raise Stop

    monkeypatch.setattr(rl_warmup, "run_stage", stop)
    with pytest.raises(Stop):
        rl_warmup.sft_warmup(cfg, progress=False)
    lines = (tmp_path / "sft_warmup" / "data.jsonl").read_text().splitlines()
    unboxed = sum("\\boxed" not in line for line in lines)
    assert len(lines) == 200 and 0.6 < unboxed / 200 < 0.9


def test_run_rl_with_the_warmup_enabled_but_not_run_names_the_pipeline_that_runs_it(tmp_path):
    from memento_train.config.errors import ConfigError

    cfg = build_rl_config(config_tree(None, [f"output_dir={tmp_path}", "logger=none"]))
    with pytest.raises(ConfigError, match="warm_up_then_run_rl"):
        run_rl(cfg, progress=False)
    assert not (tmp_path / "config.yaml").exists()  # refused before the run directory is touched


def _tokenizer():
    from memento_train.models.config import ModelConfig
    from memento_train.models.loading import run_tokenizer

    return run_tokenizer(ModelConfig())


def test_rollout_document_trains_response_tokens_with_rollout_mask_logprobs_and_advantage():
    tok = _tokenizer()
    mask = BlockMaskingConfig(keep_last_n_blocks=0)
    special = SpecialTokens.from_mapping(special_token_ids(tok))
    rec = synthetic_record(0, SyntheticTaskConfig(min_blocks=2, max_blocks=2))
    ren = Renderer(tok, mask)
    prompt = ren._encode(ren.prompt_text(rec["problem"]))
    response = ren._encode(rec["response"] + "<|im_end|>")
    lps = -np.arange(1, len(response) + 1, dtype=np.float32) / 100
    docs = [
        rollout_document(prompt, response, lps, 1.5, special, mask),
        rollout_document(prompt, response[:5], lps[:5], -0.5, special, mask),
    ]
    mb, _ = build_micro_batch(docs, pad_token_id=0, device=torch.device("cpu"), token_extras=TOKEN_EXTRAS)
    p, n = len(prompt), len(prompt) + len(response)
    labels, adv, rlp = mb.extras["labels"], mb.extras["advantages"], mb.extras["rollout_logprobs"]
    # document 1: position t predicts ids[t + 1]; only response tokens are trained
    assert (labels[: p - 1] == -100).all() and labels[n - 1] == -100
    assert labels[p - 1 : n - 1].tolist() == response
    assert torch.allclose(rlp[p - 1 : n - 1], torch.from_numpy(lps))
    assert (adv[p - 1 : n - 1] == 1.5).all() and (adv[: p - 1] == 0).all()
    # document 2 follows, with its own advantage on its 5 response tokens
    second = labels[n:] != -100
    assert int(second.sum()) == 5 and (adv[n:][second] == -0.5).all() and (adv[n:][~second] == 0).all()
    # the trainer's mask is the rollout's eviction rule over prompt + response
    kill = parse(np.asarray(prompt + response), special, mask, prompt_len=p).kill_row
    assert (docs[0]["kill_row"] == kill).all() and (kill < n).any()


def test_micro_batch_plan_places_every_sample_once_and_ranks_get_equal_counts():
    lengths = [300, 120, 500, 80, 80, 410, 60, 230, 90]
    plan = plan_micro_batches(lengths, 512, world_size=2)
    flat = sorted(i for rank in plan for mb in rank for i in mb)
    assert flat == list(range(len(lengths)))
    assert len(plan[0]) == len(plan[1])
    assert all(sum(lengths[i] for i in mb) <= 512 for rank in plan for mb in rank)


def test_weight_sync_gives_rollout_workers_the_trainer_weights(tmp_path):
    from memento_train.cluster import WorkerGroup
    from memento_train.config.tree import to_dict
    from memento_train.rl.rollout_worker import RolloutPool
    from memento_train.rl.trainer_worker import RLTrainerWorker
    from memento_train.rl.weight_sync import sync_weights

    cfg = build_rl_config(config_tree(None, [*FAST, f"output_dir={tmp_path}"]))
    tree = to_dict(cfg)
    with WorkerGroup(RLTrainerWorker, cfg.cluster, tree) as trainer:
        trainer.run("setup")
        pool = RolloutPool(cfg, tree)
        with torch.no_grad():  # make the trainer differ from the freshly loaded rollout copy
            for p in trainer._inline.engine.module.parameters():
                p.add_(0.01)
        before = pool.state_dict()
        stats = sync_weights(trainer, pool, version=1)
        after = pool.state_dict()
        full = trainer.run("full_weights")[0]
    assert stats.total_s >= stats.load_s >= 0
    assert any(not torch.equal(before[k], after[k]) for k in full)
    assert all(torch.equal(full[k], after[k]) for k in full)


def test_one_step_logs_every_metric_and_trainer_logprobs_match_rollout(tmp_path):
    _, records = run(tmp_path, "train.total_steps=1", "eval.every=1", "eval.num_problems=2", "eval.samples=2")
    (m,) = records
    for key in (
        "reward_mean",
        "reward_std",
        "accuracy",
        "response_length",
        "blocks_per_response",
        "compression_ratio",
        "peak_kv",
        "kv_auc",
        "clip_fraction",
        "kl",
        "entropy",
        "logprob_mismatch_mean",
        "logprob_mismatch_max",
        "gen_tokens_per_s",
        "time/rollout_s",
        "time/reward_s",
        "time/old_logprobs_s",
        "time/ref_logprobs_s",
        "time/update_s",
        "time/sync_s",
        "eval/accuracy",
    ):
        assert key in m, key
    assert m["samples"] == 8
    assert m["logprob_mismatch_max"] < 1e-3  # fp32, same weights, same mask (blocks: the test below)


def test_trainer_recomputes_the_rollout_logprobs_of_block_evicting_responses_and_a_causal_mask_would_not(tmp_path):
    """The warmed policy writes blocks and summaries, so the rollout engine physically evicts KV. The
    trainer's own path (rollout_document -> packed micro-batch -> engine forward under the memento
    mask) must reproduce the rollout's log-probs; the same tokens under a plain causal mask must not."""
    from memento_train.cluster import WorkerGroup
    from memento_train.config.tree import to_dict
    from memento_train.rl.driver import encode_prompts, load_problems, sample_seed
    from memento_train.rl.rollout_worker import RolloutRequest, RolloutWorker
    from memento_train.rl.trainer_worker import RLTrainerWorker

    cfg = build_rl_config(
        config_tree(
            None,
            [*FAST, f"output_dir={tmp_path}", f"model.path={rl_warmed_policy.ASSET}", "rollout.max_new_tokens=160"],
        )
    )
    tree = to_dict(cfg)
    rollout = RolloutWorker(tree)
    records, prompts = encode_prompts(
        load_problems(cfg.prompts, synthetic_task=cfg.prompts.synthetic, num=2),
        rollout.tokenizer,
        cfg.prompts.max_prompt_len,
    )
    requests = [RolloutRequest(key=i, prompt_ids=prompts[i // 2], seed=sample_seed(0, 0, i)) for i in range(4)]
    params = {
        "max_new_tokens": 160,
        "temperature": 1.0,
        "top_p": 1.0,
        "stop_token_ids": (int(rollout.tokenizer.eos_token_id),),
    }
    results = rollout.generate(requests, params)
    special = SpecialTokens.from_mapping(special_token_ids(rollout.tokenizer))
    mask = cfg.rollout.block_masking.rule()
    docs = [
        rollout_document(q.prompt_ids, x["token_ids"], x["logprobs"], 1.0, special, mask)
        for q, x in zip(requests, results)
    ]
    evicted = sum(int((d["kill_row"] < len(d["input_ids"])).sum()) for d in docs)
    assert evicted > 50, "the warmed policy should write (and so evict) blocks"
    causal = [{**d, "kill_row": np.full(len(d["input_ids"]), len(d["input_ids"]))} for d in docs]
    with WorkerGroup(RLTrainerWorker, cfg.cluster, tree) as trainer:
        trainer.run("setup")
        memento, *plain = trainer._inline.policy_logprobs([docs, causal[:2], causal[2:]])
    plain = np.concatenate(plain)
    response = np.concatenate([d["loss_mask"] for d in docs]) > 0
    rollout_lp = np.concatenate([d["rollout_logprobs"] for d in docs])[response]
    assert np.abs(memento[response] - rollout_lp).max() < 1e-4
    assert np.abs(plain[response] - rollout_lp).max() > 1e-2  # the control: eviction changes log-probs


def test_mini_batches_update_several_times_against_the_rollout_policy_so_the_clip_range_acts(tmp_path):
    # One update per batch: π_θ = π_old when the loss is taken, every ratio is exactly 1.
    _, (one,) = run(tmp_path / "one", "train.total_steps=1", "optim.lr=0.05", "rollout.prompts_per_step=4")
    assert one["updates"] == 1 and one["train/ratio/max"] == one["train/ratio/min"] == 1.0
    assert one["clip_fraction"] == 0.0
    # Four updates: π_old is fixed before the first, so later mini-batches see moved ratios (a large lr
    # moves them past the clip range); recomputing π_old per mini-batch would leave them at 1.
    _, (four,) = run(
        tmp_path / "four", "train.total_steps=1", "optim.lr=0.05", "rollout.prompts_per_step=4", "train.mini_batches=4"
    )
    assert four["updates"] == 4 and four["samples"] == 16
    assert four["train/ratio/max"] > 1.0 > four["train/ratio/min"] and four["clip_fraction"] > 0.0
    with pytest.raises(Exception, match=r"train.mini_batches \(5\) must be <= rollout.prompts_per_step"):
        build_rl_config(
            config_tree(None, [*FAST, f"output_dir={tmp_path}", "train.mini_batches=5", "rollout.prompts_per_step=4"])
        )


@pytest.mark.slow
def test_seeded_tiny_run_raises_the_mean_reward_and_held_out_accuracy(tmp_path):
    """The shorter, seeded twin of the `memento-rl` default: from its SFT warm-up on a sloppy teacher's
    traces (most answers unboxed, hence ungradable; the warm-up's export is shipped, see
    rl_warmed_policy.py), 8 RL steps; the outcome reward alone must teach the policy to box its
    answers, on the training prompts and on held-out problems."""
    stale = rl_warmed_policy.stale_reason()
    assert stale is None, f"tests/assets/tiny_rl_warmed is stale ({stale}): run python tests/rl_warmed_policy.py"
    cfg = build_rl_config(
        config_tree(
            None,
            [
                "logger=none",
                f"output_dir={tmp_path}",
                "cluster.use_ray=false",
                "rollout_cluster.use_ray=false",
                "reward.num_workers=0",
                "checkpoint.export_hf=false",
                "checkpoint.every=0",
                "train.total_steps=8",
                "eval.every=8",
                "warmup.enabled=false",
                f"model.path={rl_warmed_policy.ASSET}",
            ],
        )
    )
    result = run_rl(cfg, progress=False)
    r = result.reward_means
    first, last = float(np.mean(r[:3])), float(np.mean(r[-3:]))
    assert 0.05 < first < 0.6, r  # the warm-up leaves room to learn
    assert last > first + 0.25, r
    evals = {m["step"]: m["eval/accuracy"] for m in read_metrics(tmp_path) if "eval/accuracy" in m}
    assert set(evals) == {0, 8}, evals
    assert evals[8] > evals[0] + 0.2, evals


def test_the_shipped_warmed_policy_matches_the_warmup_and_goes_stale_when_an_input_changes(monkeypatch):
    assert rl_warmed_policy.stale_reason() is None
    monkeypatch.setattr(rl_warmed_policy, "WARMUP_OVERRIDES", ["logger=none", "warmup.unboxed_answer_rate=0.5"])
    assert rl_warmed_policy.stale_reason() == "the warm-up's records changed since it was built"
    monkeypatch.setattr(rl_warmed_policy, "WARMUP_OVERRIDES", ["logger=none", "warmup.lr=1e-3"])
    assert rl_warmed_policy.stale_reason() == "the warm-up's stage_config changed since it was built"


def test_a_failed_periodic_checkpoint_with_on_save_error_retry_lets_rl_train_on(tmp_path, monkeypatch):
    """checkpoint.on_save_error means the same in memento-rl as in memento-train: a storage failure of a
    periodic checkpoint is logged and the run goes on; ``fail`` (the default) stops it."""
    from memento_train.checkpoint.manager import CheckpointSaveError
    from memento_train.training import run_dir

    real, calls = run_dir.save_checkpoint, []

    def full_disk_at_step_2(trainer, ckpts, step, state):
        calls.append(step)
        if step == 2:
            path = ckpts.root / f"step_{step:08d}"
            raise CheckpointSaveError(step, path, "No space left on device", 0, 1 << 30, ckpts.root / "step_00000001")
        return real(trainer, ckpts, step, state)

    monkeypatch.setattr(run_dir, "save_checkpoint", full_disk_at_step_2)
    _, metrics = run(tmp_path / "retry", "train.max_steps=3", "checkpoint.every=1", "checkpoint.on_save_error=retry")
    assert [m["step"] for m in metrics] == [1, 2, 3] and calls == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "retry" / "checkpoints").glob("step_*")) == [
        "step_00000001",
        "step_00000003",
    ]
    with pytest.raises(CheckpointSaveError):
        run(tmp_path / "fail", "train.max_steps=3", "checkpoint.every=1")
