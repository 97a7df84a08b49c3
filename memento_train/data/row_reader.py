"""Read local record files one row at a time, so one broken line costs one record, not the file.

``datasets.load_dataset("json")`` parses a whole file with one Arrow schema: a single non-JSON line, an
empty line or a field of another type (``"response": 5``) rejects every record of the file with an
error that names neither file nor line. :func:`read_local_rows` instead reads JSONL line by line
(a ``.json`` file holding one array element by element, Parquet row by row) and checks the type of
every field the pipeline reads (:data:`FIELD_TYPES`). A row that cannot be a record becomes a
*rejected row*: its ``_reject`` column holds a reason code and ``_where`` its place,
``path:line`` (1-based) for JSON Lines, ``path[row N]`` (0-based row index) for Parquet and JSON arrays.
Rejected rows stay in the dataset, in file order, so they reach the validation report (counted by
reason, with their place) and strict mode fails on the first one in order; every good row is kept.

Reason codes: ``bad_json`` (the line is not JSON), ``empty_line``, ``not_an_object`` (valid JSON but
not a ``{...}`` record), ``wrong_type`` (a known field has a value of another type).

Only the columns the pipeline reads are kept (:data:`FIELD_TYPES`); other columns are dropped here,
so an unrelated column whose type varies between rows cannot break loading either.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterator, Mapping
from typing import Any

BAD_JSON = "bad_json"
EMPTY_LINE = "empty_line"
NOT_AN_OBJECT = "not_an_object"
WRONG_TYPE = "wrong_type"
ROW_REASONS: tuple[str, ...] = (BAD_JSON, EMPTY_LINE, NOT_AN_OBJECT, WRONG_TYPE)

REJECT_COLUMN, DETAIL_COLUMN, WHERE_COLUMN = "_reject", "_detail", "_where"

# Field -> the kind of value it may hold (null is always allowed: validation reports missing fields).
_STR, _ID, _SCALAR, _STR_LIST, _PAIR_LIST = "string", "id", "scalar", "string list", "pair list"
FIELD_TYPES: dict[str, str] = {
    "id": _ID,
    "record_id": _ID,
    "problem": _STR,
    "response": _STR,
    "domain": _STR,
    "source": _STR,
    "answer": _STR,
    "final_answer": _STR,
    "difficulty": _SCALAR,
    "sentences": _STR_LIST,
    "block_summaries": _STR_LIST,
    "blocks": _PAIR_LIST,
}
_EXPECTED = {
    _STR: "a string",
    _ID: "a string or an integer",
    _SCALAR: "a string or a number",
    _STR_LIST: "a list of strings",
    _PAIR_LIST: "a list of [first, last] integer pairs",
}


def row_features():
    """Arrow schema of the rows :func:`read_local_rows` yields."""
    import datasets

    string = datasets.Value("string")
    kinds = {
        _STR: string,
        _ID: string,
        _SCALAR: string,
        _STR_LIST: datasets.List(string),
        _PAIR_LIST: datasets.List(datasets.List(datasets.Value("int64"))),
    }
    columns = {name: kinds[kind] for name, kind in FIELD_TYPES.items()}
    columns.update({REJECT_COLUMN: string, DETAIL_COLUMN: string, WHERE_COLUMN: string})
    return datasets.Features(columns)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _fits(kind: str, value: Any) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _ID:
        return isinstance(value, str) or _is_int(value)
    if kind == _SCALAR:
        return isinstance(value, (str, numbers.Real)) and not isinstance(value, bool)
    if kind == _STR_LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, list) and all(isinstance(p, list) and all(_is_int(x) for x in p) for p in value)


def _rejected(reason: str, where: str, detail: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(FIELD_TYPES)
    row.update({REJECT_COLUMN: reason, DETAIL_COLUMN: detail, WHERE_COLUMN: where})
    return row


def check_row(value: Any, where: str) -> dict[str, Any]:
    """One parsed row -> a dataset row: the known fields (ids and scalars as text) or a rejected row."""
    if not isinstance(value, Mapping):
        return _rejected(NOT_AN_OBJECT, where, f"expected a JSON object (a record), got {type(value).__name__}")
    row: dict[str, Any] = {REJECT_COLUMN: "", DETAIL_COLUMN: "", WHERE_COLUMN: where}
    for name, kind in FIELD_TYPES.items():
        v = value.get(name)
        if v is not None and not _fits(kind, v):
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            return _rejected(
                WRONG_TYPE, where, f"field {name!r} is {shown} ({type(v).__name__}), expected {_EXPECTED[kind]}"
            )
        row[name] = str(v) if v is not None and kind in (_ID, _SCALAR) else v
    return row


def _json_lines(path: str) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                yield _rejected(EMPTY_LINE, where, "empty line")
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                yield _rejected(BAD_JSON, where, f"not JSON ({exc})")
                continue
            yield check_row(value, where)


def _json_file(path: str) -> Iterator[dict[str, Any]]:
    """A ``.json`` file: one array of records, one record, or (as ``datasets`` accepts) JSON Lines."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    try:
        value = json.loads(text)
    except ValueError:
        yield from _json_lines(path)
        return
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        yield check_row(item, f"{path}[row {i}]")


def _parquet_file(path: str, batch_rows: int = 1024) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # not a parquet file at all: there are no rows to keep
        raise ValueError(f"could not read parquet file {path!r}: {exc}") from exc
    columns = [c for c in pf.schema_arrow.names if c in FIELD_TYPES]
    index = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        for value in batch.to_pylist():
            yield check_row(value, f"{path}[row {index}]")
            index += 1


def read_local_rows(files: list[str], signature: Any = None) -> Iterator[dict[str, Any]]:
    """Rows of ``files`` in order (see the module docstring). ``signature`` is unused by the reader:
    it is part of the ``datasets`` cache key, so a changed file is read again."""
    del signature
    for path in files:
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".parquet":
            yield from _parquet_file(path)
        elif suffix == ".json":
            yield from _json_file(path)
        else:
            yield from _json_lines(path)


def load_local_rows(files: list[str], cache_dir: str | None):
    """The rows of ``files`` as a ``datasets.Dataset`` (Arrow-cached; re-read when a file changes)."""
    import datasets

    signature = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return datasets.Dataset.from_generator(
        read_local_rows,
        features=row_features(),
        cache_dir=cache_dir,
        gen_kwargs={"files": [os.path.abspath(f) for f in files], "signature": signature},
    )
