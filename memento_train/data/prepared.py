"""The examples a training run reads: tokenized in the run, or once ahead of it by ``memento-data prepare``.

``memento-data prepare DATA --output DIR`` (e.g. on a CPU node) runs :func:`.cache.prepare_dataset`, the
same render + validate step training runs, and saves the kept examples (:data:`.cache.EXAMPLE_COLUMNS`)
to ``DIR`` with ``save_to_disk`` plus ``DIR/memento_prepare.json`` (:data:`MANIFEST`): the rendering
key (:func:`.cache.rendering_key`: tokenizer fingerprint, mask, ``max_seq_len``, ``overlong``, system
prompt, cache version), the source, the tokenizer and the memento tokens it got, the validation report.

A run with ``data.prepared=DIR`` loads those examples (:func:`load_examples`) instead of tokenizing
``data.path``, after checking that its own rendering key (its data config and the *model's* tokenizer)
equals the stored one; any difference is a :class:`~memento_train.config.errors.ConfigError` naming
the option, both values and the ``memento-data prepare`` flag to change. Packing is not part of this:
the trainer packs examples into micro-batches step by step (:mod:`memento_train.sft.batching`), the
same way whether they were prepared or rendered in the run.

The data is always tokenized with the model's tokenizer. ``data.tokenizer`` in a training config
therefore only asserts which tokenizer that is: a different one is refused naming both.
"""

from __future__ import annotations

import json
import os
from typing import Any

from memento_train.config.errors import ConfigError
from memento_train.data.cache import CACHE_VERSION, EXAMPLE_COLUMNS, prepare_dataset, rendering_key
from memento_train.data.config import PREPARED_MANIFEST, DataConfig
from memento_train.data.render import tokenizer_fingerprint
from memento_train.data.validate import ValidationReport
from memento_train.models.loading import load_tokenizer

MANIFEST = PREPARED_MANIFEST
FORMAT = "memento-examples-v1"

# The `memento-data prepare` flag that sets each rendering option (named in mismatch errors).
_PREPARE_FLAGS = {
    "max_seq_len": "--max-seq-len",
    "overlong": "--overlong",
    "system_prompt": "--system-prompt",
    "block_masking.keep_last_n_blocks": "--keep-last-n-blocks",
    "block_masking.mask_delimiters": "--mask-delimiters",
    "block_masking.keep_last_block_for_answer": "--keep-last-block-for-answer",
}


def write_prepared(
    dataset: Any,
    out: str,
    *,
    cfg: DataConfig,
    tokenizer: Any,
    tokenizer_source: str | None,
    added_tokens: dict[str, int],
    report: ValidationReport,
) -> dict[str, Any]:
    """Save ``dataset`` (the output of :func:`.cache.prepare_dataset` for ``cfg``) and its manifest to
    ``out``; return the manifest."""
    dataset.save_to_disk(out)
    lengths = dataset["num_tokens"]
    manifest = {
        "format": FORMAT,
        "num_examples": len(dataset),
        "num_tokens": int(sum(lengths)),
        "longest": int(max(lengths, default=0)),
        "key": rendering_key(cfg, tokenizer),
        "source": {"path": str(cfg.path), "hf_config": cfg.hf_config, "split": cfg.split},
        "tokenizer": {
            "source": tokenizer_source or "shipped",
            "size": len(tokenizer),
            "added_memento_tokens": added_tokens,
        },
        "validation": report.to_dict(),
    }
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def read_manifest(directory: str) -> dict[str, Any]:
    """``directory``'s manifest; raise :class:`ConfigError` when it is not a prepared directory this
    version can read."""
    path = os.path.join(os.path.expanduser(str(directory)), MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"data.prepared={directory}: cannot read {MANIFEST} ({exc}); run "
            "`memento-data prepare DATA --output DIR` to write a prepared directory"
        ) from exc
    if manifest.get("format") != FORMAT:
        raise ConfigError(
            f"data.prepared={directory} was written by an older `memento-data prepare` "
            f"(format {manifest.get('format', 'packed micro-batches')!r}, this version reads "
            f"{FORMAT!r}); re-run `memento-data prepare` to rewrite it"
        )
    return manifest


def _flat(key: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in key.items() if k != "mask"}
    # The key keeps the name "mask" (cache fingerprints stay stable); the option is data.block_masking.
    out.update({f"block_masking.{k}": v for k, v in key.get("mask", {}).items()})
    return out


def _describe(source: str | None) -> str:
    return "the shipped tokenizer" if source is None else repr(str(source))


def _flag(flag: str, value: Any) -> str:
    if isinstance(value, bool):
        return flag if value else f"(no {flag})"
    return f"{flag} {value}"


def check_prepared(cfg: DataConfig, tokenizer: Any, tokenizer_source: str | None) -> dict[str, Any]:
    """Check that ``cfg.prepared`` was rendered the way this run would render ``cfg`` with the model's
    ``tokenizer`` (loaded from ``tokenizer_source``, ``None`` = the shipped one); return its manifest."""
    directory = cfg.prepared
    manifest = read_manifest(directory)
    stored, run = _flat(manifest["key"]), _flat(rendering_key(cfg, tokenizer))
    if stored.get("version") != CACHE_VERSION:
        raise ConfigError(
            f"data.prepared={directory} holds examples rendered by {stored.get('version')!r}, "
            f"this memento-train renders {CACHE_VERSION!r}; re-run `memento-data prepare`"
        )
    problems, flags = [], []
    for name in sorted(set(stored) | set(run)):
        if name in ("version", "tokenizer") or stored.get(name) == run.get(name):
            continue
        problems.append(f"data.{name}: prepared with {stored.get(name)!r}, this run has {run.get(name)!r}")
        flags.append(_flag(_PREPARE_FLAGS.get(name, f"--{name.replace('_', '-')}"), run.get(name)))
    if stored.get("tokenizer") != run.get("tokenizer"):
        tok = manifest.get("tokenizer", {})
        problems.append(
            f"tokenizer: prepared with {tok.get('source')!r} ({tok.get('size')} tokens, fingerprint "
            f"{stored.get('tokenizer')}), this run's model tokenizes with {_describe(tokenizer_source)} "
            f"({len(tokenizer)} tokens, fingerprint {run.get('tokenizer')})"
        )
        flags.append("(no --tokenizer)" if tokenizer_source is None else f"--tokenizer {tokenizer_source}")
    if problems:
        raise ConfigError(
            f"data.prepared={directory} was prepared differently from this run: "
            + "; ".join(problems)
            + f". Re-run `memento-data prepare` with {' '.join(flags)} "
            "(or change this run's options to match)"
        )
    return manifest


def check_data_tokenizer(cfg: DataConfig, tokenizer: Any, tokenizer_source: str | None) -> None:
    """``data.tokenizer``, when set in a training run, must be the model's ``tokenizer`` (loaded from
    ``tokenizer_source``): the same ids and chat template once the memento tokens are added. Raise
    :class:`ConfigError` naming both otherwise."""
    if cfg.tokenizer is None or str(cfg.tokenizer) == str(tokenizer_source):
        return
    data_tok = load_tokenizer(str(cfg.tokenizer))
    if tokenizer_fingerprint(data_tok) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(
            f"data.tokenizer={cfg.tokenizer} is not the model's tokenizer ({_describe(tokenizer_source)}, "
            "from model.tokenizer or model.path): they tokenize "
            f"differently ({len(data_tok)} vs {len(tokenizer)} tokens or a different vocabulary / chat "
            "template), and a model must be trained on its own tokenizer's ids. Drop data.tokenizer, or set "
            f"model.tokenizer={cfg.tokenizer} if that is the tokenizer the model should use"
        )


def check_examples_source(cfg: DataConfig, tokenizer: Any, tokenizer_source: str | None) -> None:
    """The checks a training run makes on its data config against the model's tokenizer, before any
    data is read: :func:`check_data_tokenizer`, then :func:`check_prepared` when ``data.prepared`` is set."""
    check_data_tokenizer(cfg, tokenizer, tokenizer_source)
    if cfg.prepared is not None:
        check_prepared(cfg, tokenizer, tokenizer_source)


def load_examples(cfg: DataConfig, tokenizer: Any, tokenizer_source: str | None) -> tuple[Any, ValidationReport]:
    """The run's tokenized examples (:data:`.cache.EXAMPLE_COLUMNS`) and their validation report.

    From ``cfg.prepared`` when set (checked by :func:`check_prepared` first), else rendered from
    ``cfg.path`` through the Arrow cache. ``tokenizer`` is the model's, loaded from
    ``tokenizer_source`` (``None`` = the shipped one; named in errors).
    """
    if cfg.prepared is None:
        return prepare_dataset(cfg, tokenizer=tokenizer)
    import datasets

    manifest = check_prepared(cfg, tokenizer, tokenizer_source)
    ds = datasets.load_from_disk(os.path.expanduser(str(cfg.prepared)))
    missing = sorted(set(EXAMPLE_COLUMNS) - set(ds.column_names))
    if missing or len(ds) != manifest["num_examples"]:
        raise ConfigError(
            f"data.prepared={cfg.prepared} is damaged: columns {missing} missing or "
            f"{len(ds)} rows where {MANIFEST} says {manifest['num_examples']}; re-run "
            "`memento-data prepare`"
        )
    return ds, ValidationReport.from_dict(manifest["validation"])
