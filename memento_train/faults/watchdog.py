"""Hangs: a step-time watchdog, and naming the rank and collective a hung group is stuck in.

A collective that one rank never joins (a rank stuck in I/O, a deadlock, a dead NIC) blocks every
other rank inside it until ``cluster.collective_timeout_s`` (30 minutes by default), or forever for
some failure modes. The driver knows how long steps take, so it can tell much sooner:
:class:`StepWatchdog` gives each step a deadline of ``factor x`` the median step time so far (never
below ``min_s``, armed after ``warmup_steps``). When a step misses it, the driver dumps every
worker's Python stack (``faulthandler``, see :mod:`memento_train.cluster.stack_dumps`) into the run
directory and :func:`describe_stacks` names, per rank, the innermost ``torch.distributed`` frame
(the collective it waits in) or, for a rank in no collective, where it is instead.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from memento_train.cluster.stack_dumps import frames_of, innermost_collective


def describe_stacks(stacks: dict[int, str]) -> str:
    """One line per rank: the collective it waits in, or the innermost frame of its main thread."""
    lines, waiting, elsewhere = [], [], []
    for rank in sorted(stacks):
        coll = innermost_collective(stacks[rank])
        if coll is not None:
            waiting.append(rank)
            lines.append(f"  rank {rank}: waiting in collective {coll}")
        else:
            frames = frames_of(stacks[rank])
            elsewhere.append(rank)
            lines.append(f"  rank {rank}: not in a collective: {frames[0] if frames else 'no stack captured'}")
    head = ""
    if waiting and elsewhere:
        head = f"rank(s) {waiting} wait in a collective that rank(s) {elsewhere} never entered\n"
    return head + "\n".join(lines)


@dataclass
class StepWatchdog:
    """Per-step deadline: ``max(min_s, factor * median(step times))`` once ``warmup_steps`` are timed;
    ``None`` (no deadline) before that or when ``factor`` is 0."""

    factor: float
    min_s: float
    warmup_steps: int
    times: list[float] = field(default_factory=list)

    def deadline(self) -> float | None:
        if not self.factor or len(self.times) < max(1, self.warmup_steps):
            return None
        return max(self.min_s, self.factor * statistics.median(self.times))

    def record(self, seconds: float) -> None:
        self.times.append(seconds)


class StepHang(RuntimeError):
    """A step missed the watchdog deadline; ``report`` names what each rank was doing."""

    def __init__(self, step: int, deadline: float, report: str, dump_dir: str) -> None:
        self.step, self.deadline, self.report, self.dump_dir = step, deadline, report, dump_dir
        super().__init__(
            f"step {step} did not finish within {deadline:.1f} s (faults.watchdog_factor x the "
            f"median step time): the worker group is hung.\n{report}\nStacks of every worker: "
            f"{dump_dir}"
        )
