"""Problem sets (a problem text and its gold answer per record): the one reader behind RL prompts, RL's
periodic evaluation and ``memento-eval``.

A source is a local ``.jsonl`` / ``.json`` / ``.parquet`` file or directory of them, or a Hugging Face
hub dataset (``datasets.load_dataset(path, hf_config, split=split)``, needs network). Its columns are
mapped onto ``problem`` and ``answer`` by :class:`ProblemSource`'s field names, so a dataset is used in
its published schema (the ``grpo`` recipe's: AllenAI's Dolci RL-Zero math prompts have ``prompt`` and a
list-valued ``ground_truth``, the AIME sets ``problem`` and ``answer``).

Gold answers are normalised: numbers become strings, a list with one distinct answer becomes that
answer, a longer list stays a list (the math reward accepts any of them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memento_train.data.records import resolve_local_files


@dataclass
class ProblemSource:
    """Where problems come from and which columns hold them.

    Attributes:
        path: a local file / directory, or a hub dataset name (``org/name``).
        hf_config: the hub dataset's config name, if it has several.
        split: the split to read (local files are read whole).
        problem_field: the column with the problem text.
        answer_field: the column with the gold answer (a string, a number or a list of them).
    """

    path: str = ""
    hf_config: str | None = None
    split: str = "train"
    problem_field: str = "problem"
    answer_field: str = "answer"


def read_rows(source: ProblemSource) -> list[dict[str, Any]]:
    """The raw rows of ``source`` (local JSONL/JSON/Parquet file or directory, or a hub dataset)."""
    local = resolve_local_files(source.path)
    if local is not None:
        rows: list[dict[str, Any]] = []
        for f in local[1]:
            rows.extend(_read_local_file(Path(f)))
        return rows
    import datasets

    try:
        ds = datasets.load_dataset(source.path, source.hf_config, split=source.split)
    except Exception as exc:
        raise ValueError(
            f"could not load hub dataset {source.path!r} (config {source.hf_config!r}, split {source.split!r}): "
            f"{exc}. Pass a local .jsonl/.json/.parquet file if you are offline."
        ) from exc
    return [dict(r) for r in ds]


def _read_local_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"problems file {str(path)!r} is not valid JSON: {exc}") from exc
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"problems file {str(path)!r}: every entry of the JSON list must be an object")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"problems file {str(path)!r} line {lineno} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"problems file {str(path)!r} line {lineno} is not a JSON object")
        rows.append(row)
    return rows


def normalise_answer(value: Any) -> str | list[str] | None:
    """A gold answer as a string (or a list of distinct strings); ``None`` when there is none."""
    if isinstance(value, (list, tuple)):
        distinct = list(dict.fromkeys(str(v).strip() for v in value if v is not None and str(v).strip()))
        if not distinct:
            return None
        return distinct[0] if len(distinct) == 1 else distinct
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value).strip() if isinstance(value, str) else str(value)


def map_row(row: Mapping[str, Any], source: ProblemSource, index: int, record_id: str | None = None) -> dict[str, Any]:
    """``row`` with ``problem`` and ``answer`` taken from the source's fields (other columns kept);
    ``ValueError`` naming the record and the field when one is missing or empty."""
    problem = row.get(source.problem_field)
    answer = normalise_answer(row.get(source.answer_field))
    where = f"record {record_id!r} (row {index})" if record_id is not None else f"row {index}"
    for name, value in ((source.problem_field, problem), (source.answer_field, answer)):
        if value is None or (isinstance(value, str) and not value.strip()):
            option = "problem_field" if name == source.problem_field else "answer_field"
            hint = f" (set {option}=COLUMN)" if name not in row else ""
            raise ValueError(
                f"problem set {source.path!r}, {where}: field {name!r} is missing or empty; "
                f"the record has: {', '.join(sorted(map(str, row)))}{hint}"
            )
    return {**row, "problem": str(problem), "answer": answer}


def load_problem_records(source: ProblemSource, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` (``None``: all) records of ``source`` with ``problem`` and ``answer``."""
    rows = read_rows(source)
    if not rows:
        raise ValueError(f"problem set {source.path!r} is empty")
    rows = rows if limit is None else rows[:limit]
    return [map_row(r, source, i) for i, r in enumerate(rows)]


def check_source(source: ProblemSource, option: str) -> str | None:
    """Why ``source.path`` cannot be read (a local-looking path that does not exist, a bad file), or
    ``None``; hub names cannot be checked offline and pass."""
    if not source.path:
        return f"{option}.path is empty"
    try:
        resolve_local_files(source.path)
    except (FileNotFoundError, ValueError) as exc:
        return f"{option}.path: {exc}"
    return None


__all__ = ["ProblemSource", "check_source", "load_problem_records", "map_row", "normalise_answer", "read_rows"]
