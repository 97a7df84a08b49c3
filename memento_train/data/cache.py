"""Pre-tokenize a dataset into an Arrow cache: render + validate every record once.

:func:`prepare_dataset` loads and normalises records (:mod:`.records`), then runs
render + validate (:func:`.validate.check_record`) through ``datasets.map(num_proc=cfg.num_proc)``.
The map output is fingerprinted by everything that changes it — the source data, the config's
rendering options (``hf_config``, ``system_prompt``, ``max_seq_len``, ``overlong``, ``mask``), the
tokenizer (vocabulary, added tokens, chat template) and :data:`CACHE_VERSION` — and written under
``cfg.cache_dir/memento-prepared/<fingerprint>/`` (or next to the ``datasets`` cache of the source
when ``cache_dir`` is None), so a second call with the same inputs reads the cache and any change
re-renders.

Every record gets a row in the map output, with a ``status`` column ("" = kept, else the reason).
Rejected rows are then dropped and counted in the :class:`~.validate.ValidationReport`, never
rendered half-way into the training set; ``strict`` raises :class:`~.validate.InvalidRecordError`
for the first rejected record (in dataset order) after the map, naming its id, reason and position.
``strict`` is not part of the fingerprint: the map output is the same either way.

Columns of the returned dataset: ``input_ids`` (int32), ``labels`` (int32; unshifted, -100 on the
prompt), ``kinds`` (int8), ``kill_row`` (int32, document-local), ``prompt_len``, ``num_tokens``,
``record_id``, ``domain``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from memento_train.data.config import DataConfig
from memento_train.data.records import load_records, resolve_local_files
from memento_train.data.render import Renderer, tokenizer_fingerprint
from memento_train.data.synthetic import parse_source
from memento_train.data.validate import InvalidRecordError, ValidationReport, check_record
from memento_train.models.loading import load_tokenizer

CACHE_VERSION = "memento-data-v1"
EXAMPLE_COLUMNS = ("input_ids", "labels", "kinds", "kill_row", "prompt_len", "num_tokens", "record_id", "domain")
_STATUS_COLUMNS = ("status", "position", "detail", "truncated")


def prepared_features():
    """Arrow schema of the map output (example columns + validation status)."""
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "kinds": datasets.List(datasets.Value("int8")),
            "kill_row": datasets.List(datasets.Value("int32")),
            "prompt_len": datasets.Value("int32"),
            "num_tokens": datasets.Value("int32"),
            "record_id": datasets.Value("string"),
            "domain": datasets.Value("string"),
            "status": datasets.Value("string"),
            "position": datasets.Value("int64"),
            "detail": datasets.Value("string"),
            "truncated": datasets.Value("bool"),
        }
    )


class _Preparer:
    """Picklable batched map function: normalised records → example columns + status."""

    def __init__(self, renderer: Renderer, max_seq_len: int, overlong: str) -> None:
        self.renderer, self.max_seq_len, self.overlong = renderer, max_seq_len, overlong

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in (*EXAMPLE_COLUMNS, *_STATUS_COLUMNS)}
        cols = list(batch)
        empty32, empty8 = np.zeros(0, np.int32), np.zeros(0, np.int8)
        for j in range(len(batch[cols[0]])):
            record = {c: batch[c][j] for c in cols}
            outcome = check_record(record, self.renderer, max_seq_len=self.max_seq_len, overlong=self.overlong)
            ex = outcome.example
            out["record_id"].append(outcome.record_id)
            out["domain"].append(str(record.get("domain") or ""))
            out["truncated"].append(outcome.truncated)
            if ex is None:
                issue = outcome.issues[0]
                out["status"].append(issue.reason)
                out["position"].append(-1 if issue.position is None else int(issue.position))
                out["detail"].append(issue.detail)
                for c in ("input_ids", "labels", "kill_row"):
                    out[c].append(empty32)
                out["kinds"].append(empty8)
                out["prompt_len"].append(0)
                out["num_tokens"].append(0)
            else:
                out["status"].append("")
                out["position"].append(-1)
                out["detail"].append("")
                out["input_ids"].append(ex.input_ids)
                out["labels"].append(ex.labels)
                out["kinds"].append(ex.kinds)
                out["kill_row"].append(ex.kill_row)
                out["prompt_len"].append(ex.prompt_len)
                out["num_tokens"].append(ex.num_tokens)
        return out


def _source_signature(cfg: DataConfig) -> list[Any]:
    if parse_source(str(cfg.path)) is not None:  # generated: the path string determines the records
        return [str(cfg.path), cfg.split]
    try:
        local = resolve_local_files(cfg.path)
    except (OSError, ValueError):
        local = None
    if local is None:
        return [str(cfg.path), cfg.hf_config, cfg.split]
    sig: list[Any] = [cfg.split]
    for f in local[1]:
        st = os.stat(f)
        sig.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return sig


def rendering_key(cfg: DataConfig, tokenizer: Any) -> dict[str, Any]:
    """Every option that changes how a record becomes a token stream (not which records there are).

    Part of the cache fingerprint, and stored by ``memento-data prepare`` so that a training run with
    ``data.prepared`` can check it renders the same way (:mod:`.prepared`).
    """
    return {
        "version": CACHE_VERSION,
        "system_prompt": cfg.system_prompt,
        "max_seq_len": cfg.max_seq_len,
        "overlong": cfg.overlong,
        "mask": cfg.block_masking.rule_dict(),  # the rule alone: generation-only options do not change the cache
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def cache_fingerprint(cfg: DataConfig, tokenizer: Any, records_fingerprint: str = "") -> str:
    """Hash of everything that changes the rendered examples (``strict``/``num_proc`` excluded)."""
    payload = {
        **rendering_key(cfg, tokenizer),
        "source": _source_signature(cfg),
        "records": records_fingerprint,
        "hf_config": cfg.hf_config,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def report_from_status(mapped) -> ValidationReport:
    """Rebuild the :class:`ValidationReport` from the status columns of the map output."""
    report = ValidationReport()
    status = mapped.data.column("status").to_pylist()
    truncated = mapped.data.column("truncated").to_pylist()
    ids = mapped.data.column("record_id").to_pylist()
    for rid, st, tr in zip(ids, status, truncated):
        report.add(rid, st or None, bool(tr))
    return report


def prepare_dataset(cfg: DataConfig, *, tokenizer: Any = None, load_from_cache: bool = True):
    """Render and validate ``cfg``'s records into a cached Arrow dataset.

    Returns ``(dataset, report)``; the dataset holds only kept records, with :data:`EXAMPLE_COLUMNS`.
    Raises :class:`InvalidRecordError` (strict mode) naming the first bad record.
    """
    cfg.validate()
    tokenizer = load_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
    renderer = Renderer(tokenizer, cfg.block_masking, cfg.system_prompt)
    records = load_records(cfg)
    fp = cache_fingerprint(cfg, tokenizer, getattr(records, "_fingerprint", ""))
    kwargs: dict[str, Any] = {}
    if cfg.cache_dir is not None:
        out_dir = os.path.join(str(cfg.cache_dir), "memento-prepared", fp)
        os.makedirs(out_dir, exist_ok=True)
        kwargs["cache_file_name"] = os.path.join(out_dir, "examples.arrow")
    num_proc = cfg.num_proc if cfg.num_proc > 1 and len(records) >= cfg.num_proc else None
    mapped = records.map(
        _Preparer(renderer, cfg.max_seq_len, cfg.overlong),
        batched=True,
        batch_size=64,
        remove_columns=records.column_names,
        features=prepared_features(),
        num_proc=num_proc,
        new_fingerprint=fp,
        load_from_cache_file=load_from_cache,
        desc="render + validate",
        **kwargs,
    )
    report = report_from_status(mapped)
    status = np.asarray(mapped.data.column("status").to_pylist(), dtype=object)
    bad = np.flatnonzero(status != "")
    if cfg.strict and bad.size:
        row = mapped[int(bad[0])]
        pos = None if row["position"] < 0 else int(row["position"])
        raise InvalidRecordError(row["record_id"], row["status"], pos, row["detail"])
    kept_idx = np.flatnonzero(status == "")
    kept = mapped if bad.size == 0 else mapped.select(kept_idx)
    return kept.remove_columns(list(_STATUS_COLUMNS)), report
