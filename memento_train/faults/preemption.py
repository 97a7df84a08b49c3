"""Preemption: a signal becomes a checkpoint at the next step boundary and a distinct exit status.

SLURM warns a job before killing it: ``--signal=B:USR1@120`` sends SIGUSR1 to the batch shell
120 s before the time limit (the launcher's script forwards it to the driver), and ``scancel``,
preemption and node shutdown send SIGTERM. A driver that dies there loses everything since its last
periodic checkpoint; one that finishes the step it is in, checkpoints and exits loses nothing.

Usage in a driver loop (installed *after* ``ray.init``, which sets its own SIGTERM handler)::

    with PreemptionGuard() as preempt:
        for step in range(start, end):
            ...  # train, log, periodic checkpoint
            preempt.stop_if_requested(step + 1, end, saved_at, save=lambda: save(step + 1),
                                      checkpoint=checkpoint_dir_of(step + 1))

The CLIs turn :class:`Preempted` into exit status :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``:
"temporary failure, try again"), which the SLURM script answers by requeueing the job; the requeued
job's ``resume=auto`` continues from that checkpoint. A second signal while the first is being
honoured stops the driver at once (exit ``128 + signal``): the checkpoint being written then is
never the one resumed from (see :mod:`memento_train.checkpoint.manager`).
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Callable
from types import FrameType

EXIT_PREEMPTED = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a preemption signal after checkpointing ``step`` at ``checkpoint``."""

    def __init__(self, step: int, signal_name: str, checkpoint: str | None) -> None:
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (nothing trained yet)"
        super().__init__(
            f"preempted by {signal_name}: stopped after step {step} with {where}; "
            f"run the same command (resume=auto) to continue"
        )


class PreemptionGuard:
    """Context manager: while active, :data:`PREEMPTION_SIGNALS` set :attr:`requested` instead of
    killing the process. Outside the main thread (where handlers cannot be installed) it warns and
    does nothing. The previous handlers are restored on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a preemption signal has arrived."""
        return self.signal_name is not None

    def stop_if_requested(
        self, step: int, end: int, saved_step: int, save: Callable[[], object], checkpoint: str
    ) -> None:
        """At the boundary after ``step``: when a signal arrived and the run is not finishing anyway
        (``step < end``), checkpoint unless ``saved_step == step``, then raise :class:`Preempted`."""
        if not self.requested or step >= end:
            return
        if saved_step != step:
            save()
        raise Preempted(step, self.signal_name or "", checkpoint)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # the second signal: stop now
            print(
                f"[memento] second signal ({name}) while checkpointing for {self.signal_name}: stopping at once",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(128 + signum)
        self.signal_name = name
        print(
            f"[memento] received {name}: will checkpoint at the end of this step and exit with status {EXIT_PREEMPTED}",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "preemption signals are not handled: the driver is not running in the main thread", stacklevel=2
            )
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}
