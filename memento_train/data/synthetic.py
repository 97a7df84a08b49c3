"""A deterministic synthetic Memento task whose blocks *need* their summaries.

Each problem is a chain of modular additions/subtractions. The reasoning is split into blocks of a
few operations; each block starts from the running value, works the operations out step by step,
and its summary states the value reached. The next block restates that value, and under memento
attention it can only copy it from the summary (the previous block is already evicted); a model that
ignores summaries would have to redo every earlier step from the prompt inside one block. The answer
is ``\\boxed{value}``.

``unboxed_answer_rate`` makes a sloppy teacher: with that probability a trace ends with
``The final value is V (mod M).`` instead of ``\\boxed{V}``, an answer a rule-based grader cannot
extract (two integers, no box), so it scores 0 even when ``V`` is right. The RL default warms up on
such traces; the outcome reward then has to teach the answer format on top of the arithmetic.

Records use the OpenMementos default schema (``problem``, ``response``, ``domain``, ``source``,
``difficulty``) plus ``answer`` and ``id``, so the data pipeline, ``memento-eval`` and RL rewards read
them as they are. Generation is a pure function of ``(config, index)``: the same seed gives the same
records on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from memento_train.tokens import BLOCK_END, BLOCK_START, SUMMARY_END, SUMMARY_START, THINK_END, THINK_START


@dataclass(frozen=True)
class SyntheticTaskConfig:
    """Shape of the running-total task."""

    seed: int = 0
    modulus: int = 100
    min_blocks: int = 2
    max_blocks: int = 5
    min_ops_per_block: int = 2
    max_ops_per_block: int = 3
    max_operand: int = 49
    unboxed_answer_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.modulus < 2:
            raise ValueError(f"modulus must be >= 2, got {self.modulus}")
        if not 1 <= self.min_blocks <= self.max_blocks:
            raise ValueError(f"need 1 <= min_blocks <= max_blocks, got {self.min_blocks}..{self.max_blocks}")
        if not 1 <= self.min_ops_per_block <= self.max_ops_per_block:
            raise ValueError(
                f"need 1 <= min_ops_per_block <= max_ops_per_block, got "
                f"{self.min_ops_per_block}..{self.max_ops_per_block}"
            )
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not 0.0 <= self.unboxed_answer_rate <= 1.0:
            raise ValueError(f"unboxed_answer_rate must be in [0, 1], got {self.unboxed_answer_rate}")


def synthetic_record(index: int, config: SyntheticTaskConfig = SyntheticTaskConfig()) -> dict:
    """Record ``index`` of the task (deterministic in ``(config, index)``)."""
    rng = random.Random(f"{config.seed}:{index}")  # string seeds hash stably across processes
    m = config.modulus
    start = rng.randrange(m)
    blocks = [
        [
            (rng.choice("+-"), rng.randint(1, config.max_operand))
            for _ in range(rng.randint(config.min_ops_per_block, config.max_ops_per_block))
        ]
        for _ in range(rng.randint(config.min_blocks, config.max_blocks))
    ]
    ops = [op for block in blocks for op in block]
    listed = ", ".join(f"{sign}{n}" for sign, n in ops)
    problem = (
        f"Start at {start}. Apply these operations in order, working modulo {m} "
        f"(reduce after every step): {listed}. What is the final value?"
    )

    value, done, parts = start, 0, [f"{THINK_START}\n"]
    for block in blocks:
        lines = [f"The current value is {value}."]
        for sign, n in block:
            done += 1
            new = (value + n) % m if sign == "+" else (value - n) % m
            verb = "Add" if sign == "+" else "Subtract"
            lines.append(f"Step {done}: {verb} {n}: {value} {sign} {n} = {new} (mod {m}).")
            value = new
        parts.append(f"{BLOCK_START}{' '.join(lines)}{BLOCK_END}\n")
        parts.append(f"{SUMMARY_START}After step {done} of {len(ops)} the value is {value}.{SUMMARY_END}\n")
    # A separate stream: the teacher's sloppiness never changes which problem record `index` is.
    sloppy = random.Random(f"{config.seed}:{index}:unboxed").random() < config.unboxed_answer_rate
    answer = f"{value} (mod {m})" if sloppy else f"\\boxed{{{value}}}"
    parts.append(f"{THINK_END}\nThe final value is {answer}.")
    return {
        "id": f"synthetic-{config.seed}-{index}",
        "problem": problem,
        "response": "".join(parts),
        "answer": str(value),
        "domain": "math",
        "source": "memento-train synthetic running total",
        "difficulty": len(ops),
    }


def synthetic_records(n: int, config: SyntheticTaskConfig = SyntheticTaskConfig(), *, offset: int = 0) -> list[dict]:
    """Records ``offset .. offset + n - 1``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [synthetic_record(offset + i, config) for i in range(n)]


SOURCE_PREFIX = "synthetic:"


def parse_source(path: str) -> tuple[int, int] | None:
    """``(num_records, seed)`` for a ``data.path`` of the form ``synthetic:N`` or ``synthetic:N:SEED``;
    ``None`` for any other path. Lets recipes and tests train on the task with no file on disk."""
    text = str(path)
    if not text.startswith(SOURCE_PREFIX):
        return None
    parts = text[len(SOURCE_PREFIX) :].split(":")
    try:
        n = int(parts[0])
        seed = int(parts[1]) if len(parts) > 1 else 0
        if n < 1 or len(parts) > 2:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"data.path {text!r}: the synthetic source is written 'synthetic:N' or 'synthetic:N:SEED' "
            "with N >= 1 records (e.g. 'synthetic:2000')"
        ) from None
    return n, seed
