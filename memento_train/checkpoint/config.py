"""The ``checkpoint`` section of SFT and RL runs: :class:`CheckpointConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memento_train.config.errors import ConfigError


@dataclass
class CheckpointConfig:
    """Resumable checkpoints and the final export.

    Attributes:
        every: save a resumable checkpoint every N optimizer steps (0 = only at the end).
        keep_last: keep the newest K checkpoints.
        export_hf: write a Hugging Face model (safetensors + tokenizer + chat template) at the end.
        on_save_error: when writing a checkpoint fails on storage (disk full, quota, permission):
            ``fail`` stops the run naming the directory and the free space; ``retry`` logs it, keeps
            training and tries again at the next checkpoint (the final checkpoint, and one written for
            a preemption signal, must succeed). Either way the partial checkpoint is removed and
            earlier ones are untouched.
    """

    every: int = 50
    keep_last: int = 3
    export_hf: bool = True
    on_save_error: Literal["fail", "retry"] = "fail"

    def validate(self, prefix: str = "checkpoint") -> CheckpointConfig:
        """Raise :class:`ConfigError` naming the first bad option; returns self."""
        if self.every < 0:
            raise ConfigError(f"{prefix}.every must be >= 0 (0 = only at the end), got {self.every}")
        if self.keep_last < 1:
            raise ConfigError(f"{prefix}.keep_last must be >= 1, got {self.keep_last}")
        return self
