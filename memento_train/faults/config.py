"""The SFT run's ``faults`` section: what the driver does when a worker dies or a step hangs.

Named like the RL run's ``faults`` section (``max_step_retries``, ``inject_rollout_crash_at_step``):
``max_restarts`` / ``inject_hang_at_step`` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from memento_train.config.errors import ConfigError
from memento_train.config.tree import check_types


@dataclass
class FaultsConfig:
    """Recovery of the trainer worker group.

    Attributes:
        max_restarts: how many times one run may tear its worker group down, rebuild it (same
            placement) and resume from the last valid checkpoint after a worker process died (OOM
            kill, segfault, lost node) or a step hung; 0 fails at the first such fault. Each restart
            is logged (``restarts`` in the metrics).
        watchdog_factor: a step that takes longer than this multiple of the median step time so far
            is a hang: every worker's Python stack is dumped into ``<output_dir>/hangs/`` and the hang
            is named (which rank waits in which collective); 0 disables the watchdog.
        watchdog_min_s: the watchdog never fires before this many seconds (first steps, jitter).
        watchdog_warmup_steps: steps timed before the watchdog arms.
        on_hang: ``restart`` (counts against ``max_restarts``) or ``fail``.
        inject_hang_at_step: test hook: at this step (1-based), on the group's first attempt only,
            the last rank sleeps before training, so the others wait for it inside a collective.
            Never set it in real runs.
    """

    max_restarts: int = 2
    watchdog_factor: float = 10.0
    watchdog_min_s: float = 300.0
    watchdog_warmup_steps: int = 3
    on_hang: Literal["restart", "fail"] = "restart"
    inject_hang_at_step: int | None = None

    def validate(self, prefix: str = "faults") -> FaultsConfig:
        """Raise :class:`ConfigError` naming the first bad option; returns self."""
        check_types(self, prefix)

        def number(name: str, minimum: float) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < minimum:
                raise ConfigError(f"{prefix}.{name} must be a number >= {minimum:g}, got {v!r}")

        for name in ("max_restarts", "watchdog_warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{prefix}.{name} must be an integer >= 0, got {v!r}")
        number("watchdog_factor", 0.0)
        if 0 < self.watchdog_factor <= 1:
            raise ConfigError(
                f"{prefix}.watchdog_factor={self.watchdog_factor} would call every other step a "
                "hang; use a multiple > 1 of the median step time (e.g. 10), or 0 to disable"
            )
        number("watchdog_min_s", 0.0)
        s = self.inject_hang_at_step
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ConfigError(f"{prefix}.inject_hang_at_step must be null or a step >= 1, got {s!r}")
        return self
