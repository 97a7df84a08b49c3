"""Math answer checking with the ``math-verify`` package (no hand-rolled string matching).

- :class:`GradingRule`: which responses can earn credit at all. By default a response without
  ``</think>`` or one cut off by the token budget (``finish_reason == "length"``) is wrong whatever it
  contains: otherwise a number picked out of unfinished reasoning ("So x = 42 maybe, wait") would
  count, and with a 32K budget rambling would pay. RL rewards (``reward.require_think_end``,
  ``reward.truncated``) and ``memento-eval`` (same option names) apply the same rule.
- :func:`extract_answer` / :func:`parse_response`: the answer region is the text after the *last*
  ``</think>`` when the response has one, else the whole response (reachable only when the grading
  rule lets think-less responses through). ``math_verify.parse`` then extracts from that region with
  a LaTeX config (``\\boxed{...}`` first, then ``$...$`` and "the answer is" anchors) and a plain
  expression config, and turns the match into a SymPy object.
- :func:`parse_gold`: gold answers (LaTeX or plain, e.g. ``\\frac{1}{2}``, ``2\\sqrt{2}``, ``sqrt(8)``,
  ``0.5``) are parsed as if boxed, falling back to parsing the raw text.
- :func:`is_correct`: ``math_verify.verify(gold, prediction)``: symbolic / numeric equivalence
  (``1/2`` = ``0.5`` = ``\\frac{1}{2}``, ``2\\sqrt{2}`` = ``\\sqrt{8}``).
- :func:`majority_answer` / :func:`equivalence_classes`: answers grouped by ``math_verify``
  equivalence, not by string equality.

Timeouts and threads. ``math_verify`` bounds each parse/compare with ``signal.alarm``, which only
works in the main thread of the main interpreter (elsewhere it raises ``ValueError``). Every call here
goes through :func:`_guarded`: in the main thread it uses math-verify's own timeout; in any other
thread it runs the call with math-verify's timeout disabled inside a daemon worker thread and waits at
most ``timeout`` seconds for it. A call that overruns counts as "no answer" / "not equivalent"; its
worker thread is abandoned and finishes (or not) in the background — Python threads cannot be killed —
so a pathological input costs a CPU core until SymPy returns, but never blocks the caller.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from memento_train.tokens import THINK_END

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 5


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once when called with timeouts disabled; off the main thread we do that on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def _extraction_configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # boxed_match_priority=0: a \boxed{} answer beats every other LaTeX match.
    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _guarded(fn: Callable[[int | None], T], default: T, timeout: int = DEFAULT_TIMEOUT_S) -> T:
    """Run ``fn(math_verify_timeout)`` with a timeout that works in any thread.

    Main thread: ``fn(timeout)`` (math-verify's signal-based timeout). Other threads: ``fn(None)`` in a
    daemon thread, waited on for ``timeout`` seconds; ``default`` when it overruns or raises.
    """
    if _in_main_thread():
        try:
            return fn(timeout)
        except Exception:
            return default
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn(None)
        except BaseException:  # noqa: BLE001 - any failure scores as "no answer"
            box["value"] = default

    worker = threading.Thread(target=work, name="math-verify", daemon=True)
    worker.start()
    worker.join(timeout)
    return box.get("value", default)


# What a response that hit max_new_tokens scores: 0 without grading, or graded like any other.
TruncatedPolicy = Literal["zero", "score"]
TRUNCATED_POLICIES = get_args(TruncatedPolicy)


@dataclass(frozen=True)
class GradingRule:
    """Which responses are graded at all (the rest score 0 / count as wrong).

    Attributes:
        require_think_end: a response without ``</think>`` gets no credit (the default); ``False``
            searches the whole text for an answer.
        truncated: ``zero`` — a response that hit the token budget (``finish_reason == "length"``)
            gets no credit (the default); ``score`` — it is graded like any other.
    """

    require_think_end: bool = True
    truncated: str = "zero"

    def __post_init__(self) -> None:
        if self.truncated not in TRUNCATED_POLICIES:
            raise ValueError(f"truncated must be one of {TRUNCATED_POLICIES}, got {self.truncated!r}")

    def ungraded_reason(self, text: str, finish_reason: str | None = None) -> str | None:
        """``"truncated"`` or ``"no_think_end"`` when the response earns no credit whatever it says,
        ``None`` when it is graded."""
        if self.truncated == "zero" and finish_reason == "length":
            return "truncated"
        if self.require_think_end and THINK_END not in text:
            return "no_think_end"
        return None


def answer_region(text: str) -> str:
    """The text after the last ``</think>``, or the whole text when there is none."""
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1]
    return text


@dataclass(frozen=True)
class ParsedAnswer:
    """An extracted answer: ``text`` is the matched string (``None`` when nothing was found),
    ``parsed`` what ``math_verify.parse`` returned (SymPy objects and the matched string)."""

    text: str | None
    parsed: tuple

    @property
    def found(self) -> bool:
        return bool(self.parsed)


def _parse(text: str, timeout: int) -> list:
    from math_verify import parse

    return _guarded(
        lambda t: parse(
            text, extraction_config=_extraction_configs(), extraction_mode="first_match", parsing_timeout=t
        ),
        default=[],
        timeout=timeout,
    )


def _match_text(parsed: Sequence) -> str | None:
    if not parsed:
        return None
    strings = [p for p in parsed if isinstance(p, str)]
    return strings[-1] if strings else str(parsed[0])


def parse_response(response_text: str, *, timeout: int = DEFAULT_TIMEOUT_S) -> ParsedAnswer:
    """Extract and parse the final answer of a response (see the module docstring for the rules)."""
    parsed = _parse(answer_region(response_text), timeout)
    return ParsedAnswer(text=_match_text(parsed), parsed=tuple(parsed))


def parse_gold(gold: Any, *, timeout: int = DEFAULT_TIMEOUT_S) -> ParsedAnswer:
    """Parse a reference answer (LaTeX or plain); numbers are accepted as-is."""
    text = str(gold).strip()
    if text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    parsed = _parse(f"\\boxed{{{text}}}", timeout) if "\\boxed" not in text else []
    if not parsed:
        parsed = _parse(text, timeout)
    return ParsedAnswer(text=str(gold), parsed=tuple(parsed))


def extract_answer(text: str, *, timeout: int = DEFAULT_TIMEOUT_S) -> str | None:
    """The final answer of a response as matched text (e.g. ``\\frac{1}{2}``), ``None`` when none found."""
    return parse_response(text, timeout=timeout).text


def equivalent(gold: ParsedAnswer, pred: ParsedAnswer, *, timeout: int = DEFAULT_TIMEOUT_S) -> bool:
    """``math_verify.verify(gold, pred)`` on already parsed answers; False if either is empty."""
    if not gold.found or not pred.found:
        return False
    from math_verify import verify

    return bool(
        _guarded(
            lambda t: verify(list(gold.parsed), list(pred.parsed), timeout_seconds=t), default=False, timeout=timeout
        )
    )


def is_correct(response_text: str, gold: Any, *, timeout: int = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the response's final answer is mathematically equivalent to ``gold``."""
    return equivalent(
        parse_gold(gold, timeout=timeout), parse_response(response_text, timeout=timeout), timeout=timeout
    )


def equivalence_classes(
    answers: Sequence[ParsedAnswer | None], *, timeout: int = DEFAULT_TIMEOUT_S
) -> list[int | None]:
    """A class id per answer (``None`` for no answer); equivalent answers share the id.

    Greedy: each answer joins the first earlier class whose representative (first member) it is
    equivalent to, checked both ways (``verify`` is not symmetric for equations and intervals).
    Class ids are numbered in order of first appearance.
    """
    reps: list[ParsedAnswer] = []
    out: list[int | None] = []
    for ans in answers:
        if ans is None or not ans.found:
            out.append(None)
            continue
        for cid, rep in enumerate(reps):
            if (
                (rep.text is not None and rep.text == ans.text)
                or equivalent(rep, ans, timeout=timeout)
                or equivalent(ans, rep, timeout=timeout)
            ):
                out.append(cid)
                break
        else:
            reps.append(ans)
            out.append(len(reps) - 1)
    return out


def majority_class(class_ids: Sequence[int | None]) -> int | None:
    """The most frequent class id (ties: the class that appeared first); ``None`` when there are none."""
    counts: dict[int, int] = {}
    for cid in class_ids:
        if cid is not None:
            counts[cid] = counts.get(cid, 0) + 1
    if not counts:
        return None
    first = {cid: i for i, cid in reversed(list(enumerate(class_ids))) if cid is not None}
    return max(counts, key=lambda c: (counts[c], -first[c]))


def majority_answer(answers: Sequence[str | ParsedAnswer | None], *, timeout: int = DEFAULT_TIMEOUT_S) -> str | None:
    """The majority answer, grouping mathematically equivalent answers (``1/2``, ``0.5``, ``\\frac12``).

    Strings are parsed like gold answers (plain or LaTeX); ``None`` entries (no answer) do not vote.
    Returns the text of the winning class's first member; ties go to the class seen first.
    """
    parsed = [a if isinstance(a, ParsedAnswer) or a is None else parse_gold(a, timeout=timeout) for a in answers]
    ids = equivalence_classes(parsed, timeout=timeout)
    winner = majority_class(ids)
    if winner is None:
        return None
    idx = ids.index(winner)
    item = answers[idx]
    return item.text if isinstance(item, ParsedAnswer) else item


__all__ = [
    "TRUNCATED_POLICIES",
    "GradingRule",
    "ParsedAnswer",
    "answer_region",
    "equivalence_classes",
    "equivalent",
    "extract_answer",
    "is_correct",
    "majority_answer",
    "majority_class",
    "parse_gold",
    "parse_response",
]
