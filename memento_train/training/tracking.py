"""Run metrics: a JSONL file always, wandb when enabled, a console progress bar.

The JSONL file (``<output_dir>/metrics.jsonl``, one record per logged step) is the project's own
record that tests and scripts read; wandb's offline files are binary. On resume the JSONL file is cut
back to the resumed step, so an interrupted-and-resumed run ends with exactly the records an
uninterrupted run would have written; :meth:`RunLogger.rewind` does the same after an in-process
restart. Secret values given to the logger never reach the file, the console or wandb.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The ``logger`` option of SFT and RL runs: wandb (plus the JSONL file) or the JSONL file alone.
Logger = Literal["wandb", "none"]
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


@dataclass
class WandbConfig:
    """wandb run options; ``mode=auto`` is online with an API key, offline without one."""

    project: str = "memento-train"
    entity: str | None = None
    name: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = field(default_factory=list)


def wandb_mode(mode: str) -> str:
    """``auto`` -> ``online`` when an API key is configured (env or netrc), else ``offline``."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.path.expanduser("~/.netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's JSONL metrics file."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Writes metrics to JSONL (+ wandb) and drives the progress bar of the driver process."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        logger: str = "wandb",
        wandb_cfg: Any = None,
        config: dict[str, Any] | None = None,
        desc: str = "train",
        progress: bool = True,
        secrets: list[str] | None = None,
    ) -> None:
        from memento_train.faults.secrets import scrub

        self._secrets = list(secrets or [])
        self._scrub = lambda text: scrub(text, self._secrets) if self._secrets else text
        # wandb records the process's command line (sys.argv) with the run; a secret given there as an
        # override (cluster.env.HF_TOKEN=...) would end up in its files. The CLI has parsed it already.
        sys.argv[:] = [self._scrub(a) for a in sys.argv]
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS_FILE
        kept = [r for r in read_metrics(self.dir) if r.get("step", 0) <= start_step] if start_step else []
        with open(self.path, "w") as f:  # truncate to the resumed step (or start fresh)
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")
        self._wandb = self._init_wandb(wandb_cfg, config, start_step) if logger == "wandb" else None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def _init_wandb(self, cfg: Any, config: dict[str, Any] | None, start_step: int):
        try:
            import wandb

            id_file = self.dir / WANDB_ID_FILE
            # Reuse the run id on resume so wandb continues the same run; a fresh run gets a new id.
            run_id = id_file.read_text().strip() if start_step and id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            run = wandb.init(
                project=getattr(cfg, "project", "memento-train"),
                entity=getattr(cfg, "entity", None),
                name=getattr(cfg, "name", None),
                tags=list(getattr(cfg, "tags", []) or []),
                mode=wandb_mode(getattr(cfg, "mode", "auto")),
                dir=str(self.dir),
                id=run_id,
                resume="allow",
                config=config or {},
                settings=wandb.Settings(silent=True),
            )
            return run
        except Exception as exc:  # a broken wandb must never stop training: JSONL still has everything
            warnings.warn(
                f"wandb disabled for this run ({type(exc).__name__}: {exc}); metrics go to {self.path}", stacklevel=2
            )
            return None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` for optimizer step ``step`` (1-based: the number of steps done)."""
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(self._scrub(json.dumps(record)) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self._bar is not None:
            shown = {k: metrics[k] for k in ("loss", "lr", "tokens_per_s", "reward_mean") if k in metrics}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(step - self._bar.n)

    def rewind(self, step: int) -> None:
        """Forget the records after ``step`` (the run goes back to a checkpoint and redoes them).
        wandb keeps what it received: it cannot delete logged steps."""
        self._file.close()
        kept = [r for r in read_metrics(self.dir) if r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        text = self._scrub(text)
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
