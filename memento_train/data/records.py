"""Load Memento records and normalise them to one schema.

Sources (:func:`load_records`):

- a local ``.jsonl``/``.json`` file or ``.parquet`` file, or a directory of them (all files of one
  format, read in sorted path order) — row by row (:mod:`.row_reader`), so a broken line or a field of
  the wrong type rejects that row only, named by ``file:line`` (Parquet: ``file[row N]``);
- anything else is taken as a Hugging Face hub dataset name and read with
  ``datasets.load_dataset(name, hf_config, split=split)`` (needs network; not exercised offline).

Normalised schema (every record, whatever the source):

- ``record_id`` (str): the record's ``id`` / ``record_id`` column when present, else
  ``"row{index}-{hash8}"``: its row index plus the first 8 hex digits of a SHA-1 over problem and
  response, so a log line can be traced back to the row and a reordered copy still shows the content tag;
- ``problem``, ``response`` (str, or None when missing — validation rejects those as
  ``missing_field``);
- ``domain``, ``source``, ``difficulty`` (str; "" when absent; ``difficulty`` is stringified so that
  mixed int/str columns of different sources concatenate);
- ``missing`` (str): "" or the name of the field that made the record unusable, with a reason
  (validation reports it as ``missing_field`` and strict mode raises with it);
- ``reject`` (str): "" or, for a row of a local file that is no record at all, the reason code of
  :mod:`.row_reader` (``bad_json``, ``empty_line``, ``not_an_object``, ``wrong_type``); its
  ``record_id`` is then the row's place (``file:line``) and ``missing`` says what is wrong.

``default`` config: ``response`` already holds the assistant text with the special tokens written
out (``<think>\\n<|block_start|>…<|block_end|>\\n<|summary_start|>…<|summary_end|>\\n…</think>\\n
answer``).

``full`` config: the record carries ``sentences: list[str]``, ``blocks: list[[first, last]]``
(sentence indices, both inclusive) and ``block_summaries: list[str]`` (one per block). The response is
assembled as::

    "<think>\\n"
    + "".join("<|block_start|>" + " ".join(sentences[first..last]) + "<|block_end|>\\n"
              + "<|summary_start|>" + summary + "<|summary_end|>\\n"  for each block)
    + "</think>\\n" + answer

where ``answer`` is the text after the first ``</think>`` of a ``response`` column when the record
has one (a single newline directly after ``</think>`` belongs to the separator above, so a record
that carries both forms assembles to exactly its own ``response``), else the ``answer`` or
``final_answer`` column. Sentences not covered by any block are not part of the response. Missing or
inconsistent pieces (no sentences, a pair out of range, fewer summaries than blocks, no answer) mark
the record ``missing`` with the record id and field named.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memento_train.data.config import LOCAL_SUFFIXES, DataConfig
from memento_train.data.row_reader import DETAIL_COLUMN, REJECT_COLUMN, WHERE_COLUMN, load_local_rows
from memento_train.tokens import BLOCK_END, BLOCK_START, SUMMARY_END, SUMMARY_START, THINK_END, THINK_START

SCHEMA_COLUMNS = ("record_id", "problem", "response", "domain", "source", "difficulty", "missing", "reject")
ID_COLUMNS = ("id", "record_id")
ANSWER_COLUMNS = ("answer", "final_answer")


class RecordFieldError(ValueError):
    """A record lacks a field (or the field is inconsistent); names the record and the field."""

    def __init__(self, record_id: str, field: str, problem: str) -> None:
        self.record_id, self.field, self.problem = record_id, field, problem
        super().__init__(f"record {record_id!r}: field {field!r} {problem}")

    def __reduce__(self):  # keep picklable across datasets.map worker processes
        return (type(self), (self.record_id, self.field, self.problem))


# -- locating and reading the source ----------------------------------------------------------------
def resolve_local_files(path: str | os.PathLike) -> tuple[str, list[str]] | None:
    """``(builder, files)`` for a local file or directory, ``None`` if ``path`` does not exist locally.

    Raises ``FileNotFoundError``/``ValueError`` with what to change for unusable local paths.
    """
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"data path {str(p)!r} is a directory without any {'/'.join(LOCAL_SUFFIXES)} files")
    else:
        if _looks_like_path(str(path)):
            raise FileNotFoundError(
                f"data path {str(path)!r} does not exist (expected a {'/'.join(LOCAL_SUFFIXES)} file, "
                "a directory of them, or a hub dataset name such as 'org/name')"
            )
        return None
    suffixes = {f.suffix.lower() for f in files}
    bad = suffixes - set(LOCAL_SUFFIXES)
    if bad:
        raise ValueError(
            f"data file {str(files[0])!r} has unsupported extension {sorted(bad)}; use {'/'.join(LOCAL_SUFFIXES)}"
        )
    builders = {"parquet" if s == ".parquet" else "json" for s in suffixes}
    if len(builders) > 1:
        raise ValueError(f"data directory {str(p)!r} mixes JSON and Parquet files; keep one format per directory")
    return builders.pop(), [str(f) for f in files]


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~"))
        or os.sep in text
        and text.count("/") != 1
        or Path(text).suffix.lower() in LOCAL_SUFFIXES
    )


def load_raw(cfg: DataConfig):
    """The source as a ``datasets.Dataset`` (no normalisation): hub and synthetic data with their own
    columns, local files as :mod:`.row_reader` rows (the known fields plus rejected-row markers)."""
    import datasets

    from memento_train.data.synthetic import SyntheticTaskConfig, parse_source, synthetic_records

    synthetic = parse_source(str(cfg.path))
    if synthetic is not None:
        n, seed = synthetic
        return datasets.Dataset.from_list(synthetic_records(n, SyntheticTaskConfig(seed=seed)))
    local = resolve_local_files(cfg.path)
    if local is not None:
        return load_local_rows(local[1], cfg.cache_dir)
    try:  # hub dataset (needs network); config name = hf_config
        return datasets.load_dataset(str(cfg.path), cfg.hf_config, split=cfg.split, cache_dir=cfg.cache_dir)
    except Exception as exc:
        raise ValueError(
            f"could not load hub dataset {cfg.path!r} (config {cfg.hf_config!r}, split {cfg.split!r}): {exc}. "
            "Pass a local .jsonl/.json/.parquet file or directory if you are offline."
        ) from exc


# -- normalisation -----------------------------------------------------------------------------------
def make_record_id(row: Mapping[str, Any], index: int) -> str:
    """The record's own id if it has one, else ``row{index}-{sha1(problem, response)[:8]}``."""
    for col in ID_COLUMNS:
        value = row.get(col)
        if value is not None and str(value) != "":
            return str(value)
    h = hashlib.sha1()
    for col in ("problem", "response", "sentences"):
        h.update(repr(row.get(col)).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return f"row{index}-{h.hexdigest()[:8]}"


def answer_text(row: Mapping[str, Any], record_id: str) -> str:
    """The final answer of a ``full``-config record (see module docstring for the rule)."""
    response = row.get("response")
    if isinstance(response, str) and THINK_END in response:
        answer = response.split(THINK_END, 1)[1]
        return answer[1:] if answer.startswith("\n") else answer
    for col in ANSWER_COLUMNS:
        value = row.get(col)
        if isinstance(value, str):
            return value
    raise RecordFieldError(
        record_id,
        "answer",
        f"is missing: a full-config record needs a 'response' containing {THINK_END!r} "
        f"or an {' / '.join(repr(c) for c in ANSWER_COLUMNS)} column",
    )


def assemble_full_response(row: Mapping[str, Any], record_id: str) -> str:
    """Build the assistant response of a ``full``-config record from sentences, blocks and summaries."""
    sentences = row.get("sentences")
    blocks = row.get("blocks")
    summaries = row.get("block_summaries")
    if not isinstance(sentences, Sequence) or isinstance(sentences, str) or len(sentences) == 0:
        raise RecordFieldError(record_id, "sentences", "is missing or empty (expected a list of strings)")
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or len(blocks) == 0:
        raise RecordFieldError(record_id, "blocks", "is missing or empty (expected [[first, last], ...])")
    if not isinstance(summaries, Sequence) or isinstance(summaries, str):
        raise RecordFieldError(record_id, "block_summaries", "is missing (expected one string per block)")
    if len(summaries) != len(blocks):
        raise RecordFieldError(
            record_id, "block_summaries", f"has {len(summaries)} entries but 'blocks' has {len(blocks)}"
        )
    parts = [THINK_START, "\n"]
    for i, (pair, summary) in enumerate(zip(blocks, summaries)):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise RecordFieldError(record_id, "blocks", f"entry {i} is {pair!r}, expected [first, last]")
        first, last = pair
        ints = all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (first, last))
        if not (ints and 0 <= first <= last < len(sentences)):
            raise RecordFieldError(
                record_id,
                "blocks",
                f"entry {i} = [{first}, {last}] is not an inclusive sentence range within 0..{len(sentences) - 1}",
            )
        if not isinstance(summary, str):
            raise RecordFieldError(record_id, "block_summaries", f"entry {i} is {summary!r}, expected a string")
        bad = [j for j in range(first, last + 1) if not isinstance(sentences[j], str)]
        if bad:
            raise RecordFieldError(record_id, "sentences", f"entry {bad[0]} is not a string")
        first, last = int(first), int(last)
        parts += [
            BLOCK_START,
            " ".join(sentences[first : last + 1]),
            BLOCK_END,
            "\n",
            SUMMARY_START,
            summary,
            SUMMARY_END,
            "\n",
        ]
    parts += [THINK_END, "\n", answer_text(row, record_id)]
    return "".join(parts)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def normalize_row(row: Mapping[str, Any], index: int, hf_config: str) -> dict[str, Any]:
    """One raw row → the normalised schema (never raises on bad content; see ``missing``)."""
    reject = row.get(REJECT_COLUMN) or ""
    if reject:  # not a record (a broken line, a field of the wrong type): keep its place and reason
        where = str(row.get(WHERE_COLUMN) or f"row {index}")
        return {
            "record_id": where,
            "problem": None,
            "response": None,
            "domain": "",
            "source": "",
            "difficulty": "",
            "missing": str(row.get(DETAIL_COLUMN) or reject),
            "reject": reject,
        }
    record_id = make_record_id(row, index)
    missing = ""
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        problem, missing = None, f"field 'problem' is missing or empty in record {record_id!r}"
    if hf_config == "full":
        try:
            response = assemble_full_response(row, record_id)
        except RecordFieldError as exc:
            response, missing = None, missing or str(exc)
    else:
        response = row.get("response")
        if not isinstance(response, str) or not response.strip():
            response = None
            missing = missing or f"field 'response' is missing or empty in record {record_id!r}"
    return {
        "record_id": record_id,
        "problem": problem,
        "response": response,
        "domain": _text(row.get("domain")),
        "source": _text(row.get("source")),
        "difficulty": _text(row.get("difficulty")),
        "missing": missing,
        "reject": "",
    }


class _Normalizer:
    """Picklable batched ``datasets.map`` function applying :func:`normalize_row`."""

    def __init__(self, hf_config: str) -> None:
        self.hf_config = hf_config

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in SCHEMA_COLUMNS}
        cols = list(batch)
        for j, index in enumerate(indices):
            row = normalize_row({c: batch[c][j] for c in cols}, index, self.hf_config)
            for c in SCHEMA_COLUMNS:
                out[c].append(row[c])
        return out


def normalize_dataset(raw, hf_config: str, num_proc: int = 1):
    """Map a raw ``datasets.Dataset`` to the normalised schema (columns :data:`SCHEMA_COLUMNS`)."""
    import datasets

    features = datasets.Features({c: datasets.Value("string") for c in SCHEMA_COLUMNS})
    return raw.map(
        _Normalizer(hf_config),
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=features,
        num_proc=num_proc if num_proc > 1 and len(raw) >= num_proc else None,
        desc="normalise records",
    )


def load_records(cfg: DataConfig):
    """Load ``cfg.path`` and normalise it: a ``datasets.Dataset`` with :data:`SCHEMA_COLUMNS`."""
    cfg.validate()
    return normalize_dataset(load_raw(cfg), cfg.hf_config, cfg.num_proc)
