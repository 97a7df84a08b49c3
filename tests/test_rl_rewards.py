"""RL rewards: math-verify and synthetic-task rewards, ``reward.fn`` loading, and the worker pool."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memento_train.config.errors import ConfigError
from memento_train.data.synthetic import synthetic_records
from memento_train.rl.rewards import (
    DEFAULT_REWARD_FN,
    RewardConfig,
    RewardPool,
    load_reward_fn,
    math_reward,
    synthetic_final_answer,
    synthetic_reward,
)

# Reward functions for the pool tests, in their own module so that spawned workers import them
# without importing pytest or torch. The behaviour is chosen by the response text.
FIXTURE_MODULE = textwrap.dedent(
    """
    import os
    import time

    def chaos(response, record):
        if response == "sleep":
            time.sleep(60)
        if response == "exit":
            os._exit(3)
        if response == "raise":
            raise RuntimeError("bad item")
        if response == "nan":
            return float("nan")
        return float(len(response))

    NOT_CALLABLE = 3
    """
)
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def fixture_module(tmp_path_factory):
    """Importable module ``rl_reward_fixtures`` (spawned workers inherit ``sys.path``)."""
    root = tmp_path_factory.mktemp("rewardfns")
    (root / "rl_reward_fixtures.py").write_text(FIXTURE_MODULE)
    sys.path.insert(0, str(root))
    yield "rl_reward_fixtures"
    sys.path.remove(str(root))
    sys.modules.pop("rl_reward_fixtures", None)


@pytest.fixture(scope="module")
def chaos_pool(fixture_module):
    with RewardPool(f"{fixture_module}:chaos", num_workers=2, timeout_s=TIMEOUT_S) as pool:
        yield pool


# ----------------------------------------------------------------------------------------- math reward


@pytest.mark.parametrize(
    "response,gold,expected",
    [
        (r"<think>\n...\n</think>\nSo the answer is $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
        (r"</think> \boxed{2\sqrt{2}}", "sqrt(8)", 1.0),
        (r"</think> \boxed{3}", "4", 0.0),
        (r"<think>\n<|block_start|>maybe \boxed{5}<|block_end|>\n</think>\n\boxed{7}", "7", 1.0),
        ("no answer here", "7", 0.0),
    ],
)
def test_math_reward_uses_math_verify_equivalence_after_think(response, gold, expected):
    assert math_reward(response, {"answer": gold}) == expected


def test_unfinished_or_truncated_responses_score_zero_by_default_and_the_rule_is_an_option():
    rec = {"answer": "42"}
    unfinished = "<think>So x = 42 maybe, wait"  # math-verify alone extracts 42 from this
    finished = "<think>x = 6 * 7</think> The answer is $\\boxed{42}$."
    texts, reasons = [unfinished, finished, finished], ["length", "stop", "length"]
    assert math_reward(unfinished, rec) == 1.0  # why the rule is needed
    with RewardPool.from_config(RewardConfig(num_workers=0)) as pool:
        batch = pool.score(texts, [rec] * 3, reasons)
    assert batch.scores == [0.0, 1.0, 0.0] and (batch.truncated, batch.no_think_end) == (2, 0)
    with RewardPool.from_config(RewardConfig(num_workers=0, truncated="score")) as pool:
        batch = pool.score(texts, [rec] * 3, reasons)
    assert batch.scores == [0.0, 1.0, 1.0] and (batch.truncated, batch.no_think_end) == (0, 1)
    assert batch.metrics()["reward/no_think_end_zeroed"] == 1.0
    with RewardPool.from_config(RewardConfig(num_workers=0, truncated="score", require_think_end=False)) as pool:
        assert pool.score(texts, [rec] * 3, reasons).scores == [1.0, 1.0, 1.0]


def test_math_reward_accepts_any_of_several_gold_answers():
    assert math_reward("</think> \\boxed{6}", {"answer": ["5", "6"]}) == 1.0
    assert math_reward("</think> \\boxed{7}", {"answer": ["5", "6"]}) == 0.0


def test_reward_without_gold_answer_raises_naming_the_field():
    with pytest.raises(KeyError, match="answer"):
        math_reward(r"\boxed{1}", {"problem": "x"})


# ------------------------------------------------------------------------------------ synthetic reward


def test_synthetic_reward_is_one_on_the_tasks_reference_responses_and_zero_when_wrong():
    for record in synthetic_records(20):
        assert synthetic_reward(record["response"], record) == 1.0
        wrong = dict(record, answer=str(int(record["answer"]) + 1))
        assert synthetic_reward(record["response"], wrong) == 0.0


@settings(max_examples=50, deadline=None)
@given(st.integers(-1000, 1000), st.integers(-1000, 1000))
def test_synthetic_reward_is_exact_integer_match_of_the_boxed_answer(said, gold):
    response = f"<think>\n\\boxed{{{gold}}} in a block\n</think>\nThe final value is \\boxed{{{said}}}.<|im_end|>"
    assert synthetic_reward(response, {"answer": str(gold)}) == float(said == gold)


@pytest.mark.parametrize(
    "response,expected",
    [
        ("<think>...\\boxed{12}", None),  # still thinking: no answer, even when boxed
        ("</think>\nThe final value is \\boxed{12}.", 12),
        ("</think>\\boxed{3} no, \\boxed{ -5 }", -5),  # last box wins
        ("</think>\n42", 42),  # one bare integer
        ("</think>\nThe final value is 42 (mod 100).", None),  # ambiguous without a box
        ("</think>\nno idea", None),
    ],
)
def test_synthetic_final_answer_is_read_after_think(response, expected):
    assert synthetic_final_answer(response) == expected


# ------------------------------------------------------------------------------------- loading reward.fn


def test_load_reward_fn_imports_module_colon_function():
    assert load_reward_fn("memento_train.rl.rewards:synthetic_reward") is synthetic_reward
    assert load_reward_fn(DEFAULT_REWARD_FN) is math_reward


@pytest.mark.parametrize(
    "path,why",
    [
        ("memento_train.rl.rewards.synthetic_reward", "pkg.module:function"),
        (":synthetic_reward", "pkg.module:function"),
        ("no_such_pkg_xyz.mod:fn", "cannot import module"),
        ("memento_train.rl.rewards:no_such_fn", "has no attribute"),
    ],
)
def test_load_reward_fn_errors_name_the_option(path, why):
    with pytest.raises(ConfigError, match=rf"reward\.fn.*{why}"):
        load_reward_fn(path)


def test_load_reward_fn_rejects_non_callables(fixture_module):
    with pytest.raises(ConfigError, match="rl.reward.fn.*not callable"):
        load_reward_fn(f"{fixture_module}:NOT_CALLABLE", option="rl.reward.fn")


@pytest.mark.parametrize(
    "option,value,why",
    [
        ("fn", "nope", "pkg.module:function"),
        ("timeout_s", 0, "> 0"),
        ("num_workers", -1, ">= 0"),
        ("num_workers", 1.5, "must be an integer"),
    ],
)
def test_reward_config_errors_name_the_option(option, value, why):
    assert RewardConfig().validate().fn == DEFAULT_REWARD_FN
    with pytest.raises(ConfigError, match=rf"reward\.{option}.*{why}"):
        RewardConfig(**{option: value}).validate()


# ------------------------------------------------------------------------------------------ reward pool


def test_pool_scores_in_input_order(chaos_pool):
    batch = chaos_pool.score(["a", "bbb", "cc", "dddd", ""], [{}] * 5)
    assert batch.scores == [1.0, 3.0, 2.0, 4.0, 0.0] and batch.failures == 0


def test_pool_scores_a_hung_item_zero_counts_a_timeout_and_keeps_order(chaos_pool):
    t0 = time.monotonic()
    batch = chaos_pool.score(["a", "sleep", "bb", "ccc"], [{}] * 4)
    assert batch.scores == [1.0, 0.0, 2.0, 3.0]
    assert (batch.timeouts, batch.crashes, batch.errors) == (1, 0, 0)
    assert "item 1: timeout" in batch.messages[0]
    assert time.monotonic() - t0 < 20  # the 60 s sleep never stalls the step


def test_pool_scores_a_crashed_worker_zero_counts_it_and_keeps_order(chaos_pool):
    batch = chaos_pool.score(["a", "exit", "bb", "exit", "ccc"], [{}] * 5)
    assert batch.scores == [1.0, 0.0, 2.0, 0.0, 3.0]
    assert (batch.crashes, batch.timeouts, batch.errors) == (2, 0, 0)
    assert "exit code 3" in batch.messages[0]


def test_pool_scores_raising_and_non_finite_items_zero_as_errors(chaos_pool):
    batch = chaos_pool.score(["raise", "nan", "ab"], [{}] * 3)
    assert batch.scores == [0.0, 0.0, 2.0] and batch.errors == 2 and batch.failures == 2
    assert batch.metrics()["reward/errors"] == 2.0


def test_pool_survives_every_failure_at_once_and_counts_totals(chaos_pool):
    before = dict(chaos_pool.totals)
    batch = chaos_pool.score(["exit", "sleep", "raise", "abcd", "sleep", "a"], [{}] * 6)
    assert batch.scores == [0.0, 0.0, 0.0, 4.0, 0.0, 1.0]
    assert (batch.crashes, batch.timeouts, batch.errors) == (1, 2, 1)
    assert chaos_pool.score(["xy"], [{}]).scores == [2.0]  # recycled workers keep working
    assert chaos_pool.totals["timeouts"] - before["timeouts"] == 2
    assert chaos_pool.totals["items"] - before["items"] == 7


def test_pool_runs_the_synthetic_reward_on_task_records():
    records = synthetic_records(4)
    responses = [r["response"] for r in records[:3]] + ["</think> \\boxed{-1}"]
    with RewardPool("memento_train.rl.rewards:synthetic_reward", num_workers=1, timeout_s=60) as pool:
        assert pool.score(responses, records).scores == [1.0, 1.0, 1.0, 0.0]


def test_inline_pool_scores_in_process_and_counts_errors(fixture_module):
    pool = RewardPool(f"{fixture_module}:chaos", num_workers=0)
    batch = pool.score(["ab", "raise", "c"], [{}] * 3)
    assert batch.scores == [2.0, 0.0, 1.0] and batch.errors == 1


def test_pool_rejects_mismatched_lengths_and_bad_paths(chaos_pool):
    with pytest.raises(ValueError, match="2 responses but 1 records"):
        chaos_pool.score(["a", "b"], [{}])
    with pytest.raises(ConfigError, match="reward.fn"):
        RewardPool("no_such_pkg_xyz:fn")


def test_pool_replaces_a_worker_that_died_between_batches(chaos_pool):
    chaos_pool.score(["a"], [{}])  # make sure both workers exist
    for w in chaos_pool._workers:
        w.process.kill()
        w.process.join()
    batch = chaos_pool.score(["ab", "abc"], [{}] * 2)
    assert batch.scores == [2.0, 3.0] and batch.failures == 0
