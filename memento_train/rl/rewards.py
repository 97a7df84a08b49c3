"""Rewards: the math-verify reward, the synthetic-task reward, ``reward.fn`` import paths, and a
process pool that scores a batch with a per-item timeout.

A reward function is ``fn(response: str, record: Mapping) -> float`` where ``record`` is the dataset
record the prompt came from (``answer``, ``problem``, ...). Any such function can be plugged in by
import path: ``reward.fn=pkg.module:function``.

:class:`RewardPool` runs the function in ``num_workers`` spawned worker processes (spawn: the trainer
may hold CUDA contexts and threads, which ``fork`` does not survive). Each item gets ``timeout_s``
seconds from the moment a worker picks it up; a worker that overruns is killed and replaced, one that
dies (segfault, ``os._exit``) is replaced; the item scores 0 and is counted (``timeouts`` / ``crashes``),
as does an item whose function raises or returns a non-finite value (``errors``). A step therefore
waits at most about ``ceil(items / workers) * timeout_s`` plus worker restarts.

This module imports neither torch nor math-verify at import time: worker processes import it, and the
rewards import their helpers on first use (inside the worker). Note that ``memento_train.tokens`` and
``memento_train.evaluation`` import torch (and transformers), so a worker that scores with the math or
synthetic reward pays that import once, at its first item.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

from memento_train.config.errors import ConfigError
from memento_train.config.tree import check_types
from memento_train.rl.algorithm import _finite

RewardFn = Callable[[str, Mapping[str, Any]], float]
DEFAULT_REWARD_FN = "memento_train.rl.rewards:math_reward"

_BOXED_INT = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
_INT = re.compile(r"-?\d+")


def _gold(record: Mapping[str, Any]) -> Any:
    if "answer" not in record:
        raise KeyError(f"reward record has no 'answer' field (fields: {sorted(record)})")
    return record["answer"]


def math_reward(response: str, record: Mapping[str, Any]) -> float:
    """1.0 when the response's final answer is math-verify-equivalent to ``record["answer"]`` (or to
    any of them, when it is a list), else 0.0.

    Extraction and equivalence are :func:`memento_train.evaluation.scoring.is_correct`'s: the answer is
    looked for after the last ``</think>`` (the whole text when there is none), ``\\boxed{}`` first.
    Responses without ``</think>`` or cut off by the budget never reach this function under the
    default grading rule (:class:`RewardPool`, ``reward.require_think_end`` / ``reward.truncated``).
    """
    from memento_train.evaluation.scoring import is_correct  # lazy: see the module docstring

    gold = _gold(record)
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    return 1.0 if any(is_correct(response, g) for g in golds) else 0.0


def synthetic_final_answer(response: str) -> int | None:
    """The integer answer of a synthetic running-total response, ``None`` when there is none.

    Only text after the last ``</think>`` counts (a response still thinking has no answer); there the
    last ``\\boxed{n}`` wins; without one, the region's integer if it holds exactly one (``42 (mod 100)``
    is ambiguous, hence no answer).
    """
    from memento_train.tokens import THINK_END  # lazy: memento_train.tokens imports torch

    if THINK_END not in response:
        return None
    region = response.rsplit(THINK_END, 1)[1]
    boxed = _BOXED_INT.findall(region)
    if boxed:
        return int(boxed[-1])
    plain = _INT.findall(region)
    return int(plain[0]) if len(plain) == 1 else None


def synthetic_reward(response: str, record: Mapping[str, Any]) -> float:
    """1.0 when :func:`synthetic_final_answer` equals ``int(record["answer"])`` exactly, else 0.0
    (the task of :mod:`memento_train.data.synthetic`)."""
    answer = synthetic_final_answer(response)
    return 1.0 if answer is not None and answer == int(_gold(record)) else 0.0


def load_reward_fn(path: str, *, option: str = "reward.fn") -> RewardFn:
    """Import ``pkg.module:function``; :class:`ConfigError` naming ``option`` when that fails."""
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{option} must look like 'pkg.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ConfigError(
            f"{option}={path!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"{option}={path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{option}={path!r}: {attr!r} is not callable")
    return fn


def _as_score(value: Any) -> float:
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward is not finite: {value!r}")
    return score


def _worker_main(fn_path: str, conn: Connection) -> None:
    """Worker process: import the function, say ready, then score ``(index, response, record)`` items."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns shutdown on Ctrl-C
    try:
        fn = load_reward_fn(fn_path)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("fatal", None, str(exc)))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the parent went away
            return
        if item is None:
            return
        index, response, record = item
        try:
            conn.send(("ok", index, _as_score(fn(response, record))))
        except Exception as exc:  # noqa: BLE001 - one bad item scores 0, the worker lives on
            conn.send(("error", index, f"{type(exc).__name__}: {exc}"))


_FAILURE_LABEL = {"timeouts": "timeout", "errors": "error", "crashes": "crash"}


@dataclass
class RewardConfig:
    """How rollouts are scored.

    Attributes:
        fn: ``pkg.module:function`` of a reward function ``fn(response: str, record: dict) -> float``
            (``record`` is the dataset record: ``answer``, ``problem``, ...). Default: math-verify.
        timeout_s: seconds one response may take to score; a timeout scores 0 and is counted.
        num_workers: reward worker processes; 0 scores in the calling process (debugging only:
            no timeout, a crash or hang takes the caller with it).
        require_think_end: a response without ``</think>`` scores 0 without calling ``fn`` (the
            default; :class:`~memento_train.evaluation.scoring.GradingRule`). ``false`` hands it to
            ``fn``, which for the math reward then searches the whole text.
        truncated: ``zero`` — a response that hit ``rollout.max_new_tokens`` scores 0 without calling
            ``fn`` (the default); ``score`` — it is scored like any other.
    """

    fn: str = DEFAULT_REWARD_FN
    timeout_s: float = 10.0
    num_workers: int = 2
    require_think_end: bool = True
    # evaluation.scoring.TruncatedPolicy, spelled out: reward workers import this module without torch.
    truncated: Literal["zero", "score"] = "zero"

    def validate(self, prefix: str = "reward") -> RewardConfig:
        """Raise :class:`ConfigError` naming the first bad option (``fn`` must import); returns self."""
        check_types(self, prefix)
        load_reward_fn(self.fn, option=f"{prefix}.fn")
        if not (_finite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"{prefix}.timeout_s must be a finite number > 0, got {self.timeout_s!r}")
        n = self.num_workers
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"{prefix}.num_workers must be an int >= 0 (0 scores in-process), got {n!r}")
        return self

    @property
    def grading_rule(self):
        """The :class:`~memento_train.evaluation.scoring.GradingRule` these options describe."""
        from memento_train.evaluation.scoring import GradingRule  # lazy: it imports torch via tokens

        return GradingRule(require_think_end=self.require_think_end, truncated=self.truncated)


@dataclass
class RewardBatch:
    """Scores of one batch, in input order, and what went wrong (each failure scored 0)."""

    scores: list[float]
    timeouts: int = 0
    errors: int = 0
    crashes: int = 0
    truncated: int = 0  # scored 0 by the grading rule: hit the token budget
    no_think_end: int = 0  # scored 0 by the grading rule: no </think>
    wall_s: float = 0.0
    messages: list[str] = field(default_factory=list)  # the first few failure descriptions

    @property
    def failures(self) -> int:
        return self.timeouts + self.errors + self.crashes

    def metrics(self) -> dict[str, float]:
        """For the step's log: counts, and mean score."""
        n = len(self.scores)
        return {
            "reward/timeouts": float(self.timeouts),
            "reward/errors": float(self.errors),
            "reward/crashes": float(self.crashes),
            "reward/truncated_zeroed": float(self.truncated),
            "reward/no_think_end_zeroed": float(self.no_think_end),
            "reward/score_s": self.wall_s,
            "reward/mean": sum(self.scores) / n if n else 0.0,
        }

    def _fail(self, kind: str, index: int, message: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.messages) < 5:
            self.messages.append(f"item {index}: {_FAILURE_LABEL[kind]}: {message}")


class _Worker:
    """One worker process, its pipe, and the item it is working on."""

    def __init__(self, ctx, fn_path: str) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(fn_path, child), daemon=True, name="reward-worker")
        self.process.start()
        child.close()
        self.born = time.monotonic()
        self.ready = False
        self.item: int | None = None
        self.started = 0.0

    def send(self, index: int, response: str, record: Mapping[str, Any]) -> None:
        self.conn.send((index, response, dict(record)))
        self.item, self.started = index, time.monotonic()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class RewardPool:
    """Score ``(response, record)`` pairs with ``fn`` in worker processes, per-item timeout, never stalling.

    ``num_workers=0`` scores in this process instead (no timeout; exceptions still score 0). Workers
    persist across :meth:`score` calls; :meth:`close` (or ``with``) stops them.
    """

    def __init__(
        self,
        fn: str,
        *,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
        grading_rule: Any = None,
    ) -> None:
        self.fn_path = fn
        self.grading_rule = grading_rule  # evaluation.scoring.GradingRule, or None: score everything
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._fn = load_reward_fn(fn)  # fail here, with the option's name, not inside a worker
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self.totals = {"items": 0, "timeouts": 0, "errors": 0, "crashes": 0}

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> RewardPool:
        cfg.validate()
        return cls(cfg.fn, num_workers=cfg.num_workers, timeout_s=cfg.timeout_s, grading_rule=cfg.grading_rule)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (politely, then by force)."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            w.process.join(timeout=1)
            w.kill()
        self._workers = []

    def score(
        self,
        responses: Sequence[str],
        records: Sequence[Mapping[str, Any]],
        finish_reasons: Sequence[str | None] | None = None,
    ) -> RewardBatch:
        """Scores in input order; failures score 0 and are counted in the result and in ``totals``.

        With a grading rule, responses it rejects (``finish_reasons[i] == "length"``, no ``</think>``)
        score 0 without reaching the reward function, and are counted as ``truncated`` /
        ``no_think_end``.
        """
        if len(responses) != len(records):
            raise ValueError(f"got {len(responses)} responses but {len(records)} records")
        if finish_reasons is not None and len(finish_reasons) != len(responses):
            raise ValueError(f"got {len(responses)} responses but {len(finish_reasons)} finish reasons")
        t0 = time.monotonic()
        batch = RewardBatch(scores=[0.0] * len(responses))
        todo = list(range(len(responses)))
        if self.grading_rule is not None:
            reasons = finish_reasons or [None] * len(responses)
            todo = []
            for i, (text, why) in enumerate(zip(responses, reasons)):
                verdict = self.grading_rule.ungraded_reason(text, why)
                if verdict is None:
                    todo.append(i)
                else:
                    setattr(batch, verdict, getattr(batch, verdict) + 1)
        if self.num_workers == 0:
            self._score_inline(responses, records, batch, todo)
        elif todo:
            self._score_in_workers(responses, records, batch, todo)
        batch.wall_s = time.monotonic() - t0
        for key in ("timeouts", "errors", "crashes"):
            self.totals[key] += getattr(batch, key)
        self.totals["items"] += len(responses)
        return batch

    def _score_inline(self, responses, records, batch: RewardBatch, todo: list[int]) -> None:
        for i in todo:
            try:
                batch.scores[i] = _as_score(self._fn(responses[i], records[i]))
            except Exception as exc:  # noqa: BLE001
                batch._fail("errors", i, f"{type(exc).__name__}: {exc}")

    def _score_in_workers(self, responses, records, batch: RewardBatch, todo: list[int]) -> None:
        pending = deque(todo)
        remaining = len(todo)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.fn_path))
        while remaining:
            for w in self._workers:
                if w.ready and w.item is None and pending:
                    i = pending[0]
                    try:
                        w.send(i, responses[i], records[i])
                    except OSError:  # died while idle (e.g. killed between batches): _reap replaces it
                        continue
                    pending.popleft()
            wait(
                [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers],
                timeout=self._next_deadline(),
            )
            remaining -= self._collect(batch)
            remaining -= self._reap(batch)

    def _next_deadline(self) -> float:
        now, deadlines = time.monotonic(), []
        for w in self._workers:
            if w.item is not None:
                deadlines.append(w.started + self.timeout_s)
            elif not w.ready:
                deadlines.append(w.born + self.startup_timeout_s)
        return max(0.0, min(deadlines) - now) if deadlines else 0.0

    def _collect(self, batch: RewardBatch) -> int:
        """Read every message waiting on the pipes; returns the number of items finished."""
        finished = 0
        for w in self._workers:
            while not w.conn.closed and w.conn.poll():
                try:
                    kind, index, payload = w.conn.recv()
                except (EOFError, OSError):
                    break  # died; _reap replaces it
                if kind == "ready":
                    w.ready = True
                elif kind == "fatal":
                    self.close()
                    raise RuntimeError(f"reward worker could not load reward.fn={self.fn_path!r}: {payload}")
                elif index == w.item:
                    if kind == "ok":
                        batch.scores[index] = payload
                    else:
                        batch._fail("errors", index, payload)
                    w.item = None
                    finished += 1
        return finished

    def _reap(self, batch: RewardBatch) -> int:
        """Replace dead and overdue workers, scoring their items 0; returns the number of items failed."""
        failed, now = 0, time.monotonic()
        for k, w in enumerate(self._workers):
            overdue = w.item is not None and now - w.started > self.timeout_s
            dead = not w.process.is_alive()
            if not (overdue or dead):
                if not w.ready and now - w.born > self.startup_timeout_s:
                    self.close()
                    raise RuntimeError(
                        f"reward worker did not start within {self.startup_timeout_s:.0f} s "
                        f"(importing reward.fn={self.fn_path!r})"
                    )
                continue
            if dead and not w.ready:
                self.close()
                raise RuntimeError(
                    f"reward worker died while importing reward.fn={self.fn_path!r} (exit code {w.process.exitcode})"
                )
            if w.item is not None:
                if dead:
                    batch._fail("crashes", w.item, f"worker died (exit code {w.process.exitcode})")
                else:
                    batch._fail("timeouts", w.item, f"no result within {self.timeout_s:g} s")
                failed += 1
            w.kill()
            self._workers[k] = _Worker(self._ctx, self.fn_path)
        return failed


__all__ = [
    "RewardBatch",
    "RewardFn",
    "RewardPool",
    "load_reward_fn",
    "math_reward",
    "synthetic_final_answer",
    "synthetic_reward",
]
