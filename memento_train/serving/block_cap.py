"""The block-length cap as a vLLM logits processor: ``<|block_end|>`` is forced after ``max_block_tokens``.

Counting follows the reference engine and the serving overlay: scanning prompt then output,
``<|block_start|>`` opens a block and resets the count, ``<|block_end|>`` closes it, every other
token inside a block except the summary delimiters counts. While an open block holds
``max_block_tokens`` counted tokens, every logit but ``<|block_end|>``'s is set to ``-inf``, so greedy
and random sampling both pick it; its reported log-prob is still the model's (the plugin's sampler
takes log-probs before logits processors). The rows it forced in the last step are left in
:attr:`BlockLengthCap.forced_rows`, which the model runner reports with the step's output, so every
generated token comes back flagged ``forced`` or not.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from memento_train.serving.config import ServingConfig, validate_request_override


class _CapCounter:
    """The cap's per-request scan state over prompt + output tokens."""

    __slots__ = ("cap", "output", "seen", "in_block", "count", "_start", "_end", "_skip")

    def __init__(self, cap: int, output: list[int], start: int, end: int, skip: frozenset[int]) -> None:
        self.cap, self.output, self.seen = cap, output, 0
        self.in_block, self.count = False, 0
        self._start, self._end, self._skip = start, end, skip

    def scan(self, tokens) -> None:
        for tok in tokens:
            if tok == self._start:
                self.in_block, self.count = True, 0
            elif tok == self._end:
                self.in_block, self.count = False, 0
            elif self.in_block and tok not in self._skip:
                self.count += 1

    def catch_up(self) -> None:
        if len(self.output) > self.seen:
            self.scan(self.output[self.seen :])
            self.seen = len(self.output)

    @property
    def must_close(self) -> bool:
        return self.in_block and self.count >= self.cap


class BlockLengthCap(LogitsProcessor):
    """Force ``<|block_end|>`` in rows whose open block reached the request's ``max_block_tokens``."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Reject malformed per-request eviction options before the request reaches the engine."""
        validate_request_override(getattr(sampling_params, "extra_args", None))

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.config = ServingConfig.from_vllm_config(vllm_config)
        sp = self.config.special
        self._start, self._end = sp.block_start, sp.block_end
        self._skip = frozenset({sp.summary_start, sp.summary_end})
        self._rows: dict[int, _CapCounter] = {}
        self.forced_rows: list[int] = []

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax: greedy requests are capped too

    def _cap(self, params: Any) -> int | None:
        try:
            masking = self.config.request_masking(getattr(params, "extra_args", None))
        except ValueError:
            return None  # the scheduler fails such a request with the error
        return masking.max_block_tokens if masking.enable else None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            for index in batch_update.removed:
                self._rows.pop(index, None)
            for index, params, prompt, output in batch_update.added:
                cap = self._cap(params)
                if cap is None:
                    self._rows.pop(index, None)
                    continue
                row = _CapCounter(cap, output, self._start, self._end, self._skip)
                row.scan(prompt or ())
                self._rows[index] = row
            for a, b, direction in batch_update.moved:
                row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
                if row_a is not None:
                    self._rows[b] = row_a
                if direction == MoveDirectionality.SWAP and row_b is not None:
                    self._rows[a] = row_b
        for row in self._rows.values():
            row.catch_up()

    def rows_to_force(self, num_rows: int) -> list[int]:
        """Batch rows whose next token this processor will force (state as of the last update)."""
        return [i for i, row in self._rows.items() if row.must_close and i < num_rows]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        self.forced_rows = self.rows_to_force(logits.shape[0])
        if self.forced_rows:
            rows = torch.tensor(self.forced_rows, device=logits.device)
            keep = logits[rows, self._end].clone()
            logits[rows] = float("-inf")
            logits[rows, self._end] = keep
        return logits
