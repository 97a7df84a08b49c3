"""memento-eval scoring: math-verify extraction and equivalence, majority grouping, threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from memento_train.evaluation import scoring
from memento_train.evaluation.scoring import (
    answer_region,
    equivalence_classes,
    extract_answer,
    is_correct,
    majority_answer,
    parse_response,
)


@pytest.mark.parametrize(
    "response,gold",
    [
        (r"so the answer is $\boxed{\frac{1}{2}}$", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{1/2}", r"\frac{1}{2}"),
        (r"\boxed{\dfrac{1}{2}}", "1/2"),
        (r"\boxed{2\sqrt{2}}", "sqrt(8)"),
        (r"\boxed{\sqrt{8}}", r"2\sqrt{2}"),
        (r"\boxed{3\sqrt{2}}", r"\sqrt{18}"),
        (r"The final answer is $\boxed{42}$.<|im_end|>", "42"),
        (r"\boxed{40\text{ cm}^2}", "40"),
        (r"\boxed{x = 6}", "6"),
        (r"<think>\n<|block_start|>try \boxed{5}<|block_end|>\n</think>\nThe answer is \boxed{53}.", "53"),
    ],
)
def test_equivalent_forms_are_correct(response, gold):
    assert is_correct(response, gold)


@pytest.mark.parametrize(
    "response,gold",
    [
        (r"\boxed{0.25}", r"\frac{1}{2}"),
        (r"\boxed{2\sqrt{3}}", "sqrt(8)"),
        (r"<think>\boxed{53}</think> so \boxed{51}", "53"),  # only the text after </think> counts
        ("no answer at all", "7"),
        ("", "7"),
    ],
)
def test_wrong_or_missing_answers(response, gold):
    assert not is_correct(response, gold)


def test_extract_answer_prefers_boxed_after_think():
    assert extract_answer(r"<think>\boxed{1}</think> The answer: $\boxed{\dfrac{7}{8}}$") == r"\frac{7}{8}"
    assert extract_answer(r"first 3 then \boxed{12}") == "12"
    assert extract_answer("nothing numeric here") is None
    # No </think>: the whole text is searched (a response cut off while thinking).
    assert extract_answer(r"<think><|block_start|> it is \boxed{9}") == "9"
    assert answer_region("a</think>b</think>c") == "c"
    assert answer_region("abc") == "abc"


def test_majority_answer_groups_equivalent_answers():
    # 1/2, 0.5 and \frac{1}{2} are one answer with three votes; 3 has two.
    assert majority_answer(["3", "1/2", "0.5", r"\frac{1}{2}", "3", None]) == "1/2"
    assert majority_answer([r"2\sqrt{2}", "3", "sqrt(8)"]) == r"2\sqrt{2}"
    assert majority_answer(["4", "3"]) == "4"  # tie: the answer seen first
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None


def test_equivalence_classes_from_responses():
    answers = [
        parse_response(t) for t in (r"\boxed{0.5}", r"\boxed{2}", "none", r"\boxed{\frac{1}{2}}", r"\boxed{4/2}")
    ]
    assert equivalence_classes(answers) == [0, 1, None, 0, 1]


def test_scoring_works_off_the_main_thread():
    cases = [(r"\boxed{1/2}", "0.5", True), (r"\boxed{2\sqrt{2}}", "sqrt(8)", True), (r"\boxed{3}", "4", False)] * 3
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda c: is_correct(c[0], c[1]), cases))
    assert got == [c[2] for c in cases]
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("m", majority_answer(["0.5", "1/2", "3"])))
    t.start()
    t.join()
    assert box["m"] == "0.5"


def test_guard_times_out_off_the_main_thread():
    def slow(_timeout):
        time.sleep(5)
        return "late"

    box = {}

    def worker():
        t0 = time.perf_counter()
        box["value"] = scoring._guarded(slow, default="default", timeout=1)
        box["seconds"] = time.perf_counter() - t0

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert box["value"] == "default" and box["seconds"] < 3
    # In the main thread math-verify's own (signal) timeout is passed through.
    assert scoring._guarded(lambda t: t, default=None, timeout=3) == 3


def test_eval_counts_unfinished_and_truncated_responses_wrong_by_default():
    from memento_train.evaluation.runner import Problem, score_problem
    from memento_train.generation.engine import GenerationResult
    from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

    tok = load_shipped_tokenizer()

    def result(text, finish):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return GenerationResult([1], ids, [0.0] * len(ids), [0] * len(ids), [1] * len(ids), finish)

    results = [
        result("<think>So x = 42 maybe, wait", "length"),
        result("<think>x = 42</think> \\boxed{42}", "length"),
        result("<think>x = 42</think> \\boxed{42}<|im_end|>", "stop"),
    ]
    problem = Problem("p", "What is 6 * 7?", "42")
    strict = score_problem(problem, results, tok)
    assert [s.correct for s in strict] == [False, False, True] and strict[0].answer is None
    lenient = score_problem(problem, results, tok, rule=scoring.GradingRule(require_think_end=False, truncated="score"))
    assert [s.correct for s in lenient] == [True, True, True]
