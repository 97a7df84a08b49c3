"""Validate rendered records: reject broken structure before it silently trains a wrong mask.

All structural checks read the parser's result (:func:`memento_train.masking.parse` over token ids);
only field presence is checked on text. Reason codes (stable; counted in :class:`ValidationReport`):

==========================  ===========================================================================
``missing_field``           problem/response (or a ``full``-config piece) missing or empty
``summary_without_block``   ``<|summary_start|>`` with no closed, unsummarised block to attach to
``nested_block``            ``<|block_start|>`` while a block is open
``unclosed_block``          a block never closed by ``<|block_end|>``
``unclosed_summary``        a summary never closed by ``<|summary_end|>``
``stray_delimiter``         ``<|block_end|>`` / ``<|summary_end|>`` without an opener
``block_without_summary``   a closed block never summarised (another block, or the end, came first)
``summary_inside_block``    ``<|summary_start|>`` while a block is open
``block_inside_summary``    ``<|block_start|>`` while a summary is open
``missing_think_end``       no ``</think>`` in the assistant turn
``empty_summary``           a summary with only whitespace between its delimiters
``empty_block``             a block with only whitespace between its delimiters
``overlong``                more than ``max_seq_len`` tokens (``overlong="drop"``, or a prompt that
                            alone fills ``max_seq_len``)
``bad_json``                a line of a local file that is not JSON (the record id is ``file:line``)
``empty_line``              an empty line in a JSON Lines file
``not_an_object``           a JSON value that is not a ``{...}`` record
``wrong_type``              a field of another type, e.g. ``"response": 5`` (Parquet: ``file[row N]``)
==========================  ===========================================================================

The last four come from reading the file row by row (:mod:`.row_reader`), before any rendering.

A record with several problems is counted once, under its first problem: parser anomalies (the
offending delimiter) before block-level findings, each in token order.
With ``overlong="truncate"`` a structurally valid record longer than ``max_seq_len`` keeps its first
``max_seq_len`` tokens and is counted as ``truncated`` (and kept): the cut leaves an unclosed block or
summary, which the visibility rule never evicts, so truncation never shows the model a wrong mask.
Structure is checked on the full stream, before truncation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memento_train.data.render import RenderedExample, Renderer
from memento_train.data.row_reader import ROW_REASONS
from memento_train.masking import (
    BLOCK_INSIDE_SUMMARY,
    NESTED_BLOCK,
    STRAY_BLOCK_END,
    STRAY_SUMMARY_END,
    STRAY_SUMMARY_START,
    SUMMARY_INSIDE_BLOCK,
)
from memento_train.tokens import THINK_END

MISSING_FIELD = "missing_field"
SUMMARY_WITHOUT_BLOCK = "summary_without_block"
NESTED = "nested_block"
UNCLOSED_BLOCK = "unclosed_block"
UNCLOSED_SUMMARY = "unclosed_summary"
STRAY_DELIMITER = "stray_delimiter"
BLOCK_WITHOUT_SUMMARY = "block_without_summary"
SUMMARY_IN_BLOCK = "summary_inside_block"
BLOCK_IN_SUMMARY = "block_inside_summary"
MISSING_THINK_END = "missing_think_end"
EMPTY_SUMMARY = "empty_summary"
EMPTY_BLOCK = "empty_block"
OVERLONG = "overlong"

REASONS: tuple[str, ...] = (
    MISSING_FIELD,
    SUMMARY_WITHOUT_BLOCK,
    NESTED,
    UNCLOSED_BLOCK,
    UNCLOSED_SUMMARY,
    STRAY_DELIMITER,
    BLOCK_WITHOUT_SUMMARY,
    SUMMARY_IN_BLOCK,
    BLOCK_IN_SUMMARY,
    MISSING_THINK_END,
    EMPTY_SUMMARY,
    EMPTY_BLOCK,
    OVERLONG,
    *ROW_REASONS,
)

# Parser anomaly code -> rejection reason.
_ANOMALY_REASON = {
    NESTED_BLOCK: NESTED,
    STRAY_BLOCK_END: STRAY_DELIMITER,
    STRAY_SUMMARY_END: STRAY_DELIMITER,
    STRAY_SUMMARY_START: SUMMARY_WITHOUT_BLOCK,
    SUMMARY_INSIDE_BLOCK: SUMMARY_IN_BLOCK,
    BLOCK_INSIDE_SUMMARY: BLOCK_IN_SUMMARY,
}

_ANOMALY_TEXT = {
    NESTED_BLOCK: "<|block_start|> while another block is still open",
    STRAY_BLOCK_END: "<|block_end|> with no open block",
    STRAY_SUMMARY_END: "<|summary_end|> with no open summary",
    STRAY_SUMMARY_START: "<|summary_start|> with no closed, unsummarised block before it",
    SUMMARY_INSIDE_BLOCK: "<|summary_start|> while a block is still open",
    BLOCK_INSIDE_SUMMARY: "<|block_start|> while a summary is still open",
}

_MAX_EXAMPLE_IDS = 3


@dataclass(frozen=True)
class Issue:
    """One problem of one record: a reason code, the token position (None: whole record), a detail."""

    reason: str
    position: int | None
    detail: str = ""


class InvalidRecordError(ValueError):
    """Raised in strict mode: names the record, the reason, and where in the token stream it is."""

    def __init__(self, record_id: str, reason: str, position: int | None = None, detail: str = "") -> None:
        self.record_id, self.reason, self.position, self.detail = record_id, reason, position, detail
        where = "" if position is None else f" at token {position}"
        # A row that is no record is named by its place in the file (path:line), not an id.
        msg = (
            f"{record_id}: not a valid record: {reason}"
            if reason in ROW_REASONS
            else f"record {record_id!r} is invalid: {reason}{where}"
        )
        if detail:
            msg += f": {detail}"
        msg += " (set data.strict=false to skip and count bad records instead)"
        super().__init__(msg)

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.record_id, self.reason, self.position, self.detail))


@dataclass
class Outcome:
    """Result of checking one record: the example to train on, or why it was rejected."""

    record_id: str
    example: RenderedExample | None
    issues: list[Issue] = field(default_factory=list)
    truncated: bool = False

    @property
    def kept(self) -> bool:
        return self.example is not None

    @property
    def reason(self) -> str | None:
        return self.issues[0].reason if self.issues else None

    def raise_if_rejected(self) -> None:
        if self.example is None:
            first = self.issues[0]
            raise InvalidRecordError(self.record_id, first.reason, first.position, first.detail)


@dataclass
class ValidationReport:
    """Counts over a dataset. ``total == kept + sum(dropped_by_reason.values())``."""

    total: int = 0
    kept: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    examples_by_reason: dict[str, list[str]] = field(default_factory=dict)  # a few record ids each

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def add(self, record_id: str, reason: str | None, truncated: bool = False) -> None:
        """Count one record: kept when ``reason`` is None."""
        self.total += 1
        if reason is None:
            self.kept += 1
            self.truncated += int(bool(truncated))
            return
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + 1
        ids = self.examples_by_reason.setdefault(reason, [])
        if len(ids) < _MAX_EXAMPLE_IDS:
            ids.append(record_id)

    def add_outcome(self, outcome: Outcome) -> None:
        self.add(outcome.record_id, outcome.reason, outcome.truncated)

    def merge(self, other: ValidationReport) -> ValidationReport:
        self.total += other.total
        self.kept += other.kept
        self.truncated += other.truncated
        for reason, n in other.dropped_by_reason.items():
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n
        for reason, ids in other.examples_by_reason.items():
            mine = self.examples_by_reason.setdefault(reason, [])
            mine.extend(ids[: max(0, _MAX_EXAMPLE_IDS - len(mine))])
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "kept": self.kept,
            "dropped": self.dropped,
            "dropped_by_reason": dict(sorted(self.dropped_by_reason.items())),
            "truncated": self.truncated,
            "examples_by_reason": dict(sorted(self.examples_by_reason.items())),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValidationReport:
        """Inverse of :meth:`to_dict` (e.g. the report stored by ``memento-data prepare``)."""
        return cls(
            total=int(d["total"]),
            kept=int(d["kept"]),
            dropped_by_reason=dict(d["dropped_by_reason"]),
            truncated=int(d["truncated"]),
            examples_by_reason={k: list(v) for k, v in d["examples_by_reason"].items()},
        )

    def __str__(self) -> str:
        pct = 100.0 * self.kept / self.total if self.total else 0.0
        lines = [
            f"validation: {self.total} records, {self.kept} kept ({pct:.1f}%), "
            f"{self.dropped} dropped, {self.truncated} truncated"
        ]
        for reason, n in sorted(self.dropped_by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
            ids = ", ".join(self.examples_by_reason.get(reason, []))
            lines.append(f"  dropped {reason}: {n}" + (f" (e.g. {ids})" if ids else ""))
        return "\n".join(lines)


# -- checks --------------------------------------------------------------------------------------
def _snippet(renderer: Renderer, ids: np.ndarray, pos: int | None, radius: int = 6) -> str:
    if pos is None:
        return ""
    lo, hi = max(0, pos - radius), min(len(ids), pos + radius + 1)
    text = renderer.decode(ids[lo:hi])
    if len(text) > 160:
        text = text[:75] + " ... " + text[-75:]
    return f"near {text!r}"


def _blank(renderer: Renderer, ids: np.ndarray, lo: int, hi: int) -> bool:
    return hi <= lo or not renderer.decode(ids[lo:hi]).strip()


def find_issues(example: RenderedExample, renderer: Renderer) -> list[Issue]:
    """Structural problems of a rendered example, most specific first (empty = valid)."""
    parsed = example.parsed
    if parsed is None:
        parsed = renderer.from_ids(example.input_ids, example.prompt_len, record_id=example.record_id).parsed
    ids = example.input_ids
    found: list[Issue] = []

    def add(reason: str, pos: int | None, what: str) -> None:
        snip = _snippet(renderer, ids, pos)
        found.append(Issue(reason, pos, f"{what} {snip}".strip()))

    for pos, code in parsed.anomalies:
        reason = _ANOMALY_REASON.get(code, code)
        add(reason, pos, _ANOMALY_TEXT.get(code, f"parser anomaly {code}"))
    for b in parsed.blocks:
        if b.end is None:
            add(UNCLOSED_BLOCK, b.start, f"block {b.index} opened here is never closed")
            continue
        if _blank(renderer, ids, b.start + 1, b.end):
            add(EMPTY_BLOCK, b.start, f"block {b.index} has no content")
        if b.summary_start is None:
            add(BLOCK_WITHOUT_SUMMARY, b.end, f"block {b.index} closed here gets no summary")
        elif b.summary_end is None:
            add(UNCLOSED_SUMMARY, b.summary_start, f"summary of block {b.index} opened here is never closed")
        elif _blank(renderer, ids, b.summary_start + 1, b.summary_end):
            add(EMPTY_SUMMARY, b.summary_start, f"summary of block {b.index} is empty")
    think_end = renderer.special_ids[THINK_END]
    if not np.any(ids[example.prompt_len :] == think_end):
        found.append(Issue(MISSING_THINK_END, None, f"the assistant turn has no {THINK_END!r}"))
    # Parser anomalies pinpoint the offending token, so they come first; then block-level findings;
    # each tier in token order. (A nested block also leaves its outer block unclosed, earlier.)
    tier = {reason: 0 for reason in _ANOMALY_REASON.values()}
    found.sort(key=lambda i: (tier.get(i.reason, 1), i.position is None, i.position or 0))
    return found


def check_record(record: Mapping[str, Any], renderer: Renderer, *, max_seq_len: int, overlong: str = "drop") -> Outcome:
    """Render + validate one normalised record; apply the overlong policy. Never raises for bad data."""
    record_id = str(record.get("record_id", ""))
    missing = record.get("missing") or ""
    if record.get("reject"):  # a row of the file that is no record (see .row_reader)
        return Outcome(record_id, None, [Issue(str(record["reject"]), None, missing)])
    if missing or not isinstance(record.get("problem"), str) or not isinstance(record.get("response"), str):
        detail = missing or "problem/response missing"
        return Outcome(record_id, None, [Issue(MISSING_FIELD, None, detail)])
    example = renderer.render(record)
    issues = find_issues(example, renderer)
    if issues:
        return Outcome(record_id, None, issues)
    n = example.num_tokens
    if n <= max_seq_len:
        return Outcome(record_id, example)
    if overlong == "truncate" and example.prompt_len < max_seq_len:
        return Outcome(record_id, renderer.truncate(example, max_seq_len), truncated=True)
    why = (
        f"{n} tokens > max_seq_len={max_seq_len}"
        + (f" and the prompt alone has {example.prompt_len} tokens" if overlong == "truncate" else "")
        + "; raise data.max_seq_len"
        + ("" if overlong == "truncate" else " or set data.overlong='truncate'")
    )
    return Outcome(record_id, None, [Issue(OVERLONG, max_seq_len, why)])


def validate_records(
    records, renderer: Renderer, *, max_seq_len: int, overlong: str = "drop", strict: bool = False
) -> tuple[list[RenderedExample], ValidationReport]:
    """Check an iterable of normalised records in-process; strict raises on the first bad one."""
    report = ValidationReport()
    kept: list[RenderedExample] = []
    for record in records:
        outcome = check_record(record, renderer, max_seq_len=max_seq_len, overlong=overlong)
        if strict:
            outcome.raise_if_rejected()
        report.add_outcome(outcome)
        if outcome.example is not None:
            kept.append(outcome.example)
    return kept, report
