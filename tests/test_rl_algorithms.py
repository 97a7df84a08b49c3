"""RL algorithm layer: log-probs, advantages, CISPO / PPO-clip, KL, aggregation, mismatch, config."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memento_train.attention import MementoAttentionMeta
from memento_train.config.errors import ConfigError
from memento_train.engines.base import MicroBatch
from memento_train.rl.advantages import broadcast_to_tokens, compute_advantages, group_ids_for, group_reward_stats
from memento_train.rl.algorithm import AlgorithmConfig
from memento_train.rl.logprobs import IGNORE_INDEX, make_logprob_fn, token_logprobs, token_logprobs_and_entropy
from memento_train.rl.losses import (
    MAX_K3,
    aggregation_weights,
    cispo_token_loss,
    kl_penalty,
    make_loss_fn,
    ppo_clip_token_loss,
    reduce_metrics,
)
from memento_train.rl.mismatch import importance_weights, logprob_mismatch

LN_HALF = math.log(0.5)
FAST = settings(max_examples=40, deadline=None)


def micro_batch(**extras: torch.Tensor) -> MicroBatch:
    """A one-document MicroBatch over the labels' length carrying ``extras``."""
    t = extras["labels"].shape[0]
    meta = MementoAttentionMeta.from_packed([0, t], [t] * t)
    return MicroBatch(torch.zeros(t, dtype=torch.long), torch.arange(t), meta, dict(extras))


# --------------------------------------------------------------------------------------------- logprobs


def test_logprob_and_entropy_match_hand_values_and_are_zero_where_ignored():
    # row 0: logits [0, ln 3] -> p = [1/4, 3/4]; label 1 -> logp = ln(3/4);
    #        H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351
    # row 1: label -100 -> logp = H = 0
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, -5.0]])
    logp, h = token_logprobs_and_entropy(logits, torch.tensor([1, IGNORE_INDEX]))
    assert logp.tolist() == pytest.approx([math.log(0.75), 0.0], abs=1e-6)
    assert h.tolist() == pytest.approx([0.5623351, 0.0], abs=1e-6)


def test_temperature_divides_logits_before_softmax():
    # logits [0, 2 ln 3] at T = 2 are [0, ln 3] at T = 1: logp(label 1) = ln(3/4)
    logp = token_logprobs(torch.tensor([[0.0, 2 * math.log(3.0)]]), torch.tensor([1]), temperature=2.0)
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_ignore_index_is_the_packers():
    from memento_train.data.pack import IGNORE_INDEX as PACK_IGNORE

    assert IGNORE_INDEX == PACK_IGNORE


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_logprobs_and_their_gradients_equal_plain_log_softmax(chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(9, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, -100, 0, 10, 5, -100, -100, 7, 1])
    wl, wh = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    logp, h = token_logprobs_and_entropy(logits, labels, temperature=0.7, chunk_size=chunk_size)
    (logp * wl + h * wh).sum().backward()
    ours = logits.grad.clone()

    logits.grad = None
    ref = torch.log_softmax(logits / 0.7, -1)
    keep = labels != -100
    ref_lp = torch.where(keep, ref.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ref_h = torch.where(keep, -(ref.exp() * ref).sum(-1), 0.0)
    (ref_lp * wl + ref_h * wh).sum().backward()
    torch.testing.assert_close(logp, ref_lp)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(ours, logits.grad)


def test_logprob_gradcheck_through_both_outputs():
    torch.manual_seed(1)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 3, 0, 2])
    assert torch.autograd.gradcheck(lambda x: token_logprobs_and_entropy(x, labels, chunk_size=2), (logits,))


def test_bf16_logits_give_fp32_logprobs_and_bf16_gradients():
    logits = torch.randn(4, 6).to(torch.bfloat16).requires_grad_()
    logp = token_logprobs(logits, torch.tensor([1, 2, -100, 5]))
    logp.sum().backward()
    assert logp.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16


def test_make_logprob_fn_reads_labels_from_the_micro_batch():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    lp = make_logprob_fn()(logits, micro_batch(labels=torch.tensor([1, -100])))
    assert lp.tolist() == pytest.approx([math.log(0.75), 0.0]) and not lp.requires_grad


# ------------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_values():
    # group [1, 0, 0, 1]: mean 0.5, Bessel std sqrt((4 * 0.25) / 3) = 0.57735 -> ±0.5 / 0.57735 = ±0.866025
    adv = compute_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_ids_for(1, 4), "group")
    assert adv.tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)


def test_drgrpo_advantages_are_mean_centred_without_std():
    # groups [1, 2, 3] (mean 2) and [0, 4] (mean 2)
    adv = compute_advantages(torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0]), torch.tensor([0, 0, 0, 1, 1]), "drgrpo")
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0, -2.0, 2.0])


def test_batch_advantages_use_one_std_over_the_group_centred_batch():
    # centred [.5, -.5, -.5, .5, 0, 0, 0, 0]: Σ² = 1, Bessel std = sqrt(1/7) = 0.377964 -> ±1.322876
    adv = compute_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]), group_ids_for(2, 4), "batch")
    assert adv.tolist() == pytest.approx([1.322876, -1.322876, -1.322876, 1.322876, 0, 0, 0, 0], abs=1e-5)


@pytest.mark.parametrize("mode", ["group", "drgrpo", "batch"])
def test_all_equal_groups_get_exactly_zero_advantage_never_nan(mode):
    # 0.1 repeated: the float mean is not bit-equal to 0.1; groups of one are degenerate too
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 0.0, 0.7])
    adv = compute_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 2, 3]), mode)
    assert torch.equal(adv, torch.zeros(7))


def test_group_ids_need_not_be_contiguous_or_sorted():
    a = compute_advantages(torch.tensor([1.0, 5.0, 0.0, 5.0]), torch.tensor([7, 3, 7, 3]))
    b = compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert a[[0, 2]].tolist() == pytest.approx(b.tolist()) and a[[1, 3]].tolist() == [0.0, 0.0]


rewards_and_groups = st.lists(
    st.tuples(st.integers(0, 4), st.floats(-10, 10, allow_nan=False, width=32)), min_size=1, max_size=24
)


@FAST
@given(rewards_and_groups, st.sampled_from(["group", "drgrpo", "batch"]), st.floats(-5, 5, width=32))
def test_advantages_sum_to_zero_per_group_and_ignore_a_reward_offset(items, mode, offset):
    groups = torch.tensor([g for g, _ in items])
    rewards = torch.tensor([r for _, r in items], dtype=torch.float64)
    adv = compute_advantages(rewards, groups, mode)
    assert torch.isfinite(adv).all()
    for g in groups.unique():
        assert adv[groups == g].double().sum().item() == pytest.approx(0.0, abs=1e-3)
    shifted = compute_advantages(rewards + offset, groups, mode)
    torch.testing.assert_close(shifted, adv, atol=1e-3, rtol=1e-3)


@FAST
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(-10, 10)), min_size=1, max_size=24), st.floats(0.5, 20))
def test_group_advantages_are_scale_invariant(items, scale):
    # integer rewards: spreads are either 0 or ≥ 1, far above adv_eps (which breaks exact invariance)
    groups = torch.tensor([g for g, _ in items])
    rewards = torch.tensor([r for _, r in items], dtype=torch.float64)
    torch.testing.assert_close(
        compute_advantages(rewards * scale, groups), compute_advantages(rewards, groups), atol=1e-3, rtol=1e-3
    )


def test_group_reward_stats_count_groups_without_signal():
    stats = group_reward_stats(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    assert stats == pytest.approx({"reward/mean": 0.75, "reward/std": math.sqrt(0.1875), "groups/all_equal_frac": 0.5})


def test_broadcast_to_tokens_gives_padding_zero():
    out = broadcast_to_tokens(torch.tensor([0.5, -1.0]), torch.tensor([1, 1, 0, -1]))
    assert out.tolist() == [-1.0, -1.0, 0.5, 0.0]


# ----------------------------------------------------------------------------------------- policy loss

# Four tokens, logp = ln 0.5 each; old = ln [.25, .5, 1, 1] -> r = [2, 1, .5, .5]; A = [1, 1, -1, 1]; ε = .2
OLD = torch.log(torch.tensor([0.25, 0.5, 1.0, 1.0]))
ADV = torch.tensor([1.0, 1.0, -1.0, 1.0])
MASK = torch.ones(4, dtype=torch.bool)


def _logp():
    return torch.full((4,), LN_HALF, requires_grad=True)


def test_cispo_hand_values_and_every_token_keeps_its_gradient():
    # w = clip(r, .8, 1.2) = [1.2, 1, .8, .8]; ℓ = -w A ln .5 -> [.831777, .693147, -.554518, .554518]
    # ∂ℓ/∂logp = -w A = [-1.2, -1, .8, -.8]: never 0, clipped or not
    logp = _logp()
    loss, ratio, clipped = cispo_token_loss(logp, OLD, ADV, MASK)
    loss.sum().backward()
    assert loss.tolist() == pytest.approx([0.831777, 0.693147, -0.554518, 0.554518], abs=1e-5)
    assert logp.grad.tolist() == pytest.approx([-1.2, -1.0, 0.8, -0.8])
    assert ratio.tolist() == pytest.approx([2.0, 1.0, 0.5, 0.5])
    assert clipped.tolist() == [True, False, True, True]


def test_ppo_clip_hand_values_and_clipped_tokens_get_no_gradient():
    # token 0: r=2, A=1:  max(-2, -1.2) = -1.2 (clipped branch, grad 0)
    # token 1: r=1:       -1, grad -r A = -1
    # token 2: r=.5, A=-1: max(.5, .8) = .8 (clipped, grad 0)
    # token 3: r=.5, A=1:  max(-.5, -.8) = -.5 (unclipped: pessimistic side), grad -r A = -.5
    logp = _logp()
    loss, _, clipped = ppo_clip_token_loss(logp, OLD, ADV, MASK)
    loss.sum().backward()
    assert loss.tolist() == pytest.approx([-1.2, -1.0, 0.8, -0.5])
    assert logp.grad.tolist() == pytest.approx([0.0, -1.0, 0.0, -0.5])
    assert clipped.tolist() == [True, False, True, False]


@FAST
@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(-2, 2), st.floats(0, 0.9), st.floats(0, 2))
def test_cispo_gradient_is_minus_clipped_ratio_times_advantage(lp, old, adv, el, eh):
    logp = torch.tensor([lp], dtype=torch.float64, requires_grad=True)
    old_t, adv_t = torch.tensor([old], dtype=torch.float64), torch.tensor([adv], dtype=torch.float64)
    cispo_token_loss(logp, old_t, adv_t, torch.tensor([True]), el, eh)[0].sum().backward()
    w = min(max(math.exp(lp - old), 1 - el), 1 + eh)
    assert logp.grad.item() == pytest.approx(-w * adv, rel=1e-9, abs=1e-12)


@FAST
@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(-2, 2).filter(lambda a: abs(a) > 1e-3), st.floats(0.01, 0.9))
def test_ppo_gradient_vanishes_exactly_on_clipped_tokens(lp, old, adv, eps):
    logp = torch.tensor([lp], dtype=torch.float64, requires_grad=True)
    old_t, adv_t = torch.tensor([old], dtype=torch.float64), torch.tensor([adv], dtype=torch.float64)
    _, _, clipped = ppo_clip_token_loss(logp, old_t, adv_t, torch.tensor([True]), eps, eps)
    ppo_clip_token_loss(logp, old_t, adv_t, torch.tensor([True]), eps, eps)[0].sum().backward()
    r = math.exp(lp - old)
    assert bool(clipped) == ((adv > 0 and r > 1 + eps) or (adv < 0 and r < 1 - eps))
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -r * adv, rel=1e-9, abs=1e-12)


def _far_off_policy_batch():
    """Logits leaf [4, 3]; old log-probs 5 nats below the current ones (r = e⁵ ≫ 1.2), A = +1."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 2, 1, IGNORE_INDEX])
    old = token_logprobs(logits, labels).detach() - 5.0
    return logits, micro_batch(labels=labels, advantages=torch.ones(4), old_logprobs=old)


def test_cispo_loss_fn_sends_gradient_to_every_token_even_when_every_ratio_is_clipped():
    logits, mb = _far_off_policy_batch()
    loss, metrics = make_loss_fn(AlgorithmConfig(loss_agg="token_mean", kl_coef=0.0), normaliser=3)(logits, mb)
    loss.backward()
    row_norms = logits.grad.norm(dim=1)
    assert (row_norms[:3] > 1e-3).all() and row_norms[3] == 0  # the unlabelled row has no loss
    assert reduce_metrics([metrics])["clip_frac"] == 1.0


def test_ppo_loss_fn_sends_no_gradient_through_clipped_tokens():
    logits, mb = _far_off_policy_batch()
    loss, metrics = make_loss_fn(AlgorithmConfig(loss_agg="token_mean", loss="grpo", kl_coef=0.0), normaliser=3)(
        logits, mb
    )
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    assert reduce_metrics([metrics])["clip_frac"] == 1.0


# ------------------------------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    # logp = ln .5, ref = ln .25 -> log ρ = ln .5 = -0.693147
    # k1 = -log ρ = 0.693147; k2 = ½ (log ρ)² = 0.240227; k3 = ρ - 1 - log ρ = .5 - 1 + .693147 = 0.193147
    logp, ref = torch.tensor([LN_HALF]), torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k4")


@FAST
@given(st.floats(-15, 0), st.floats(-15, 0))
def test_kl_estimators_match_their_formulas_and_k3_is_non_negative(lp, ref):
    logp, ref_t = torch.tensor([lp], dtype=torch.float64), torch.tensor([ref], dtype=torch.float64)
    log_rho = ref - lp
    assert kl_penalty(logp, ref_t, "k1").item() == pytest.approx(-log_rho, abs=1e-9)
    assert kl_penalty(logp, ref_t, "k2").item() == pytest.approx(0.5 * log_rho**2, abs=1e-9)
    k3 = kl_penalty(logp, ref_t, "k3").item()
    assert k3 == pytest.approx(min(math.exp(log_rho) - 1 - log_rho, MAX_K3), rel=1e-9, abs=1e-12)
    assert k3 >= 0.0


def test_k3_is_clamped_to_ten_and_gets_no_gradient_beyond():
    # log ρ = 20 (the reference far likelier than the policy): unclamped k3 = e^20 - 21 ≈ 4.85e8
    logp = torch.tensor([-25.0, -1.0], requires_grad=True)
    ref = torch.tensor([-5.0, -1.5])
    k3 = kl_penalty(logp, ref, "k3")
    assert k3[0].item() == MAX_K3 == 10.0 and k3[1].item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    k3.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1] != 0


def test_k3_plus_has_k3_values_and_k2_gradients():
    logp = torch.tensor([-1.0, -2.0, -15.0], requires_grad=True)  # the last: k3 clamped, k2 not
    ref = torch.tensor([-1.5, -1.0, -2.0])
    value = kl_penalty(logp, ref, "k3+")
    torch.testing.assert_close(value, kl_penalty(logp, ref, "k3"))
    (g_plus,) = torch.autograd.grad(value.sum(), logp)
    (g_k2,) = torch.autograd.grad(kl_penalty(logp, ref, "k2").sum(), logp)
    torch.testing.assert_close(g_plus, g_k2)  # ∂/∂logp ½ (ref - logp)² = logp - ref
    assert g_plus.tolist() == pytest.approx([0.5, -1.0, -13.0])


# --------------------------------------------------------------------------------------- aggregation


def test_aggregation_weights_and_normaliser_per_loss_agg():
    # 4 sequences in 2 groups; loss tokens [3, 1, 0, 4] (sequence 2 left entirely out of the loss)
    n, groups = [3, 1, 0, 4], [0, 0, 1, 1]
    assert aggregation_weights("token_mean", n, groups) == ([1.0] * 4, 8)
    assert aggregation_weights("seq_total", n, groups, max_response_len=128) == ([1.0] * 4, 4 * 128)
    w, z = aggregation_weights("seq_mean", n, groups)
    assert w == pytest.approx([1 / 3, 1.0, 0.0, 1 / 4]) and z == 3  # sequence 2 does not count
    w, z = aggregation_weights("group_total", n, groups)
    assert w == pytest.approx([1 / 4, 1 / 4, 1 / 4, 1 / 4]) and z == 2  # group totals 4 and 4
    w, z = aggregation_weights("group_total", [5, 0, 0, 0], groups)
    assert w == pytest.approx([1 / 5, 1 / 5, 0.0, 0.0]) and z == 1  # an empty group does not count
    assert aggregation_weights("token_mean", [0, 0], [0, 0]) == ([1.0, 1.0], 1)  # loss 0, not 0/0
    with pytest.raises(ValueError, match="loss_agg"):
        aggregation_weights("sum", n, groups)


def test_loss_fn_hand_value_with_kl_and_entropy_and_masked_garbage():
    # token 0: logits [0, ln 3], label 1 -> logp = ln .75 = -0.287682, old = logp (r = 1), A = 2
    #   CISPO   -1 · 2 · (-0.287682)                     =  0.575364
    #   KL k3   ρ = .5/.75: 2/3 - 1 - ln(2/3)             =  0.072132  (× β = 0.1)
    #   entropy -(¼ ln ¼ + ¾ ln ¾) = 0.562335               (× -0.01)
    #   ℓ = 0.575364 + 0.0072132 - 0.00562335 = 0.576954; / normaliser 2 = 0.288477
    # token 1: label -100 with -inf / nan extras: must not leak
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]], requires_grad=True)
    mb = micro_batch(
        labels=torch.tensor([1, -100]),
        advantages=torch.tensor([2.0, float("nan")]),
        old_logprobs=torch.tensor([math.log(0.75), -math.inf]),
        ref_logprobs=torch.tensor([LN_HALF, math.nan]),
    )
    cfg = AlgorithmConfig(loss_agg="token_mean", kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    loss, metrics = make_loss_fn(cfg, normaliser=2)(logits, mb)
    loss.backward()
    assert loss.item() == pytest.approx(0.288477, abs=1e-5)
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0
    m = reduce_metrics([metrics])
    assert m["tokens"] == 1 and m["kl"] == pytest.approx(0.072132, abs=1e-5)
    assert m["entropy"] == pytest.approx(0.562335, abs=1e-5) and m["ratio/max"] == pytest.approx(1.0)


@pytest.mark.parametrize("loss", ["cispo", "ppo_clip"])
def test_tokens_dropped_by_loss_mask_neither_count_nor_leak_nan_gradients(loss):
    # token 1 has a label but loss_mask = 0 and NaN / -inf extras (e.g. an overlong, dropped response)
    logits = torch.randn(3, 4, requires_grad=True)
    nan = float("nan")
    mb = micro_batch(
        labels=torch.tensor([1, 2, 3]),
        loss_mask=torch.tensor([1, 0, 1]),
        advantages=torch.tensor([1.0, nan, -1.0]),
        old_logprobs=torch.tensor([-1.0, -math.inf, -2.0]),
        ref_logprobs=torch.tensor([-1.0, nan, -1.0]),
        rollout_logprobs=torch.tensor([-1.0, nan, -2.0]),
    )
    cfg = AlgorithmConfig(loss_agg="token_mean", loss=loss, kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0)
    loss_value, metrics = make_loss_fn(cfg, normaliser=2)(logits, mb)
    loss_value.backward()
    assert torch.isfinite(loss_value) and torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0
    m = reduce_metrics([metrics])
    assert m["tokens"] == 2 and all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_total", "seq_mean", "group_total"])
@pytest.mark.parametrize("loss", ["cispo", "ppo_clip"])
def test_micro_batch_losses_add_up_to_the_whole_batch_loss(loss, loss_agg):
    # The engines' contract: Σ over micro-batches (and ranks) of (micro-batch sum / mini-batch
    # normaliser) is the loss and gradient of the whole batch, for every aggregation, also when a
    # sequence's group is split over micro-batches (sequences 0 and 1 form group 0, sequence 2 group 1,
    # and the split below separates 0 from 1) and a token is masked out.
    torch.manual_seed(3)
    logits = torch.randn(8, 5, requires_grad=True)
    labels = torch.tensor([-100, 1, 2, 3, -100, 4, 0, 2])
    mask = torch.tensor([0, 1, 1, 1, 0, 1, 0, 1])  # sequence 2 has one token left out
    seq_of_token = [0, 0, 0, 1, 1, 2, 2, 2]
    weights, z = aggregation_weights(loss_agg, [2, 1, 2], [0, 0, 1], max_response_len=4)
    extras = dict(
        labels=labels,
        loss_mask=mask,
        advantages=torch.randn(8),
        old_logprobs=token_logprobs(logits, labels).detach() + 0.3 * torch.randn(8),
        ref_logprobs=torch.randn(8) - 2,
        loss_weights=torch.tensor([weights[i] for i in seq_of_token]),
    )
    fn = make_loss_fn(AlgorithmConfig(loss=loss, loss_agg=loss_agg, kl_coef=0.05, entropy_coef=0.01), z)

    whole, _ = fn(logits, micro_batch(**extras))
    (g_whole,) = torch.autograd.grad(whole, logits)
    parts = [fn(logits[a:b], micro_batch(**{k: v[a:b] for k, v in extras.items()}))[0] for a, b in [(0, 3), (3, 8)]]
    (g_parts,) = torch.autograd.grad(sum(parts), logits)
    torch.testing.assert_close(sum(parts), whole)
    torch.testing.assert_close(g_parts, g_whole)


def test_group_total_gives_each_group_its_total_token_mean_averaged_over_groups():
    # Group 0: one sequence of 1 token (loss 3); group 1: sequences of 1 and 3 tokens (losses 1, 1, 1, 1).
    # group_total = mean over groups of (group token sum / group tokens) = (3/1 + 4/4) / 2 = 2;
    # token_mean would give 7/5.
    logits = torch.zeros(5, 2)  # logp = ln .5 everywhere; CISPO with r = 1: ℓ = -A · ln .5
    adv = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0]) / -LN_HALF
    labels = torch.zeros(5, dtype=torch.long)
    for agg, expected in [("group_total", 2.0), ("token_mean", 7 / 5)]:
        weights, z = aggregation_weights(agg, [1, 1, 3], [0, 1, 1])
        w = torch.tensor([weights[0], weights[1], weights[2], weights[2], weights[2]])
        mb = micro_batch(labels=labels, advantages=adv, old_logprobs=torch.full((5,), LN_HALF), loss_weights=w)
        loss, _ = make_loss_fn(AlgorithmConfig(kl_coef=0.0, loss_agg=agg), z)(logits, mb)
        assert loss.item() == pytest.approx(expected)


def test_loss_fn_names_the_missing_extra_and_the_option():
    logits = torch.zeros(2, 3)
    base = dict(labels=torch.tensor([1, 2]), advantages=torch.ones(2))
    with pytest.raises(KeyError, match="old_logprobs.*old_logprobs_source=trainer"):
        make_loss_fn(AlgorithmConfig(loss_agg="token_mean", kl_coef=0.0), 2)(logits, micro_batch(**base))
    with pytest.raises(KeyError, match="ref_logprobs.*kl_coef"):
        make_loss_fn(AlgorithmConfig(loss_agg="token_mean"), 2, on_policy=True)(logits, micro_batch(**base))
    with pytest.raises(KeyError, match="rollout_logprobs.*old_logprobs_source=rollout"):
        make_loss_fn(AlgorithmConfig(loss_agg="token_mean", kl_coef=0.0, old_logprobs_source="rollout"), 2)(
            logits, micro_batch(**base)
        )
    with pytest.raises(KeyError, match="loss_weights.*loss_agg=group_total"):
        make_loss_fn(AlgorithmConfig(kl_coef=0.0), 2, on_policy=True)(logits, micro_batch(**base))


def test_rollout_source_uses_rollout_logprobs_as_old_and_logs_the_mismatch():
    logits = torch.zeros(2, 2)  # logp = ln .5 for both tokens
    rollout = torch.tensor([math.log(0.25), LN_HALF])  # r = [2, 1]; |Δ| = [ln 2, 0]
    mb = micro_batch(labels=torch.tensor([0, 1]), advantages=torch.ones(2), rollout_logprobs=rollout)
    _, metrics = make_loss_fn(AlgorithmConfig(loss_agg="token_mean", kl_coef=0.0, old_logprobs_source="rollout"), 2)(
        logits, mb
    )
    m = reduce_metrics([metrics])
    assert m["ratio/max"] == pytest.approx(2.0) and m["clip_frac"] == pytest.approx(0.5)
    assert m["mismatch/abs"] == pytest.approx(math.log(2) / 2) and m["mismatch/abs/max"] == pytest.approx(math.log(2))


def test_on_policy_takes_detached_current_logprobs_as_old():
    logits = torch.randn(3, 4, requires_grad=True)
    mb = micro_batch(labels=torch.tensor([0, 1, 2]), advantages=torch.ones(3))
    loss, metrics = make_loss_fn(AlgorithmConfig(loss_agg="token_mean", kl_coef=0.0), 3, on_policy=True)(logits, mb)
    m = reduce_metrics([metrics])
    assert m["ratio/max"] == m["ratio/min"] == 1.0 and m["clip_frac"] == 0.0 and m["approx_kl"] == 0.0


def test_tis_weights_scale_the_policy_term_by_the_capped_train_over_rollout_ratio():
    # trainer old = rollout + ln 4 on token 0 (w = 4, capped to 2), equal on token 1 (w = 1)
    logits = torch.zeros(2, 2, requires_grad=True)  # logp = ln .5
    old = torch.tensor([LN_HALF, LN_HALF])
    rollout = torch.tensor([LN_HALF - math.log(4.0), LN_HALF])
    mb = micro_batch(labels=torch.tensor([0, 1]), advantages=torch.ones(2), old_logprobs=old, rollout_logprobs=rollout)
    cfg = AlgorithmConfig(loss_agg="token_mean", kl_coef=0.0, tis_cap=2.0)
    loss, metrics = make_loss_fn(cfg, 2)(logits, mb)
    # CISPO with r = 1: ℓ = -ln .5 per token; weighted (2 + 1) · ln 2 / 2
    assert loss.item() == pytest.approx(3 * math.log(2) / 2, abs=1e-6)
    m = reduce_metrics([metrics])
    assert m["tis/weight"] == pytest.approx(1.5) and m["tis/capped_frac"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ mismatch / metrics


def test_logprob_mismatch_hand_values_ignore_masked_tokens():
    # |Δ| = [.1, 0, (masked: 0.5)] -> mean .05, max .1; k3 = e^Δ - 1 - Δ: e^.1 - 1.1 = 0.0051709
    m = logprob_mismatch(
        torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.1, -2.0, -2.5]), torch.tensor([True, True, False])
    )
    out = reduce_metrics([m])
    assert out["mismatch/abs"] == pytest.approx(0.05) and out["mismatch/abs/max"] == pytest.approx(0.1)
    assert out["mismatch/k3"] == pytest.approx(0.0051709 / 2, abs=1e-6)


def test_importance_weights_truncate_or_mask_above_the_cap():
    # w = exp(train - rollout) = [e^2 ≈ 7.39, 1, e^-1 ≈ .368]; cap 2
    train, rollout = torch.tensor([0.0, -1.0, -2.0]), torch.tensor([-2.0, -1.0, -1.0])
    mask = torch.ones(3, dtype=torch.bool)
    w, capped = importance_weights(train, rollout, mask, cap=2.0)
    assert w.tolist() == pytest.approx([2.0, 1.0, math.exp(-1)]) and capped.tolist() == [True, False, False]
    w, _ = importance_weights(train, rollout, mask, cap=2.0, mode="mask")
    assert w.tolist() == pytest.approx([0.0, 1.0, math.exp(-1)])


def test_reduce_metrics_token_weighted_means_extrema_and_totals():
    # x: (4 + 4) / (2 + 6) = 1; ratio/max: 3; ratio/min: -1; loss/total: .75
    a = {"tokens": 2, "x/sum": 4.0, "ratio/max": 1.0, "ratio/min": -1.0, "loss/total": 0.5}
    b = {"tokens": 6, "x/sum": 4.0, "ratio/max": 3.0, "ratio/min": 0.0, "loss/total": 0.25}
    assert reduce_metrics([a, b]) == {"tokens": 8, "x": 1.0, "ratio/max": 3.0, "ratio/min": -1.0, "loss": 0.75}
    with pytest.raises(ValueError, match="no reduction suffix"):
        reduce_metrics([{"clip_frac": 1.0}])


# --------------------------------------------------------------------------------------------- config


def test_algorithm_defaults_are_the_papers():
    cfg = AlgorithmConfig().validate()
    assert (cfg.loss, cfg.eps_low, cfg.eps_high, cfg.kl_coef) == ("cispo", 0.2, 0.2, 0.001)
    assert (cfg.adv_norm, cfg.loss_agg) == ("batch", "group_total")  # batch advantages, 1/Σ_group |o_i|
    assert not cfg.train_forced_tokens and not cfg.mask_truncated and not cfg.drop_zero_adv_groups
    assert cfg.old_logprobs_source == "trainer" and cfg.uses_reference


@pytest.mark.parametrize(
    "option,value",
    [
        ("loss", "ppo2"),
        ("kl_estimator", "k4"),
        ("adv_norm", "zscore"),
        ("loss_agg", "sum"),
        ("old_logprobs_source", "vllm"),
        ("tis_mode", "clip"),
        ("eps_low", 1.5),
        ("eps_high", -0.1),
        ("kl_coef", -1.0),
        ("entropy_coef", float("nan")),
        ("adv_eps", 0.0),
        ("tis_cap", -1.0),
        ("logprob_chunk_size", 0),
    ],
)
def test_algorithm_config_errors_name_the_option(option, value):
    with pytest.raises(ConfigError, match=rf"rl\.algorithm\.{option}"):
        AlgorithmConfig(**{option: value}).validate("rl.algorithm")


def test_tis_with_rollout_old_logprobs_is_rejected():
    with pytest.raises(ConfigError, match="algorithm.tis_cap.*old_logprobs_source"):
        AlgorithmConfig(tis_cap=2.0, old_logprobs_source="rollout").validate()


def test_grpo_is_the_old_name_of_the_ppo_clip_loss():
    """GRPO names the advantage scheme; the clipped loss is PPO's. The old option value still works."""
    from memento_train.rl.losses import POLICY_LOSSES

    assert AlgorithmConfig(loss="grpo").validate().loss == "ppo_clip"
    assert POLICY_LOSSES["grpo"] is POLICY_LOSSES["ppo_clip"]
