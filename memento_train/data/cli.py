"""``memento-data``: inspect and pre-tokenize Memento datasets.

    memento-data stats [PATH] [--tokenizer T] [--max-seq-len N] [--pack-tokens N]
                       [--model-config qwen3-8b|PATH/config.json] [--json]
    memento-data prepare PATH --output DIR [--tokenizer T] [--keep-last-n-blocks K] [--num-proc P] ...
    memento-data synth N --output FILE.jsonl [--seed S] [--offset K]

``stats`` renders and validates every record (PATH defaults to the shipped sample traces) and prints
per-domain block/summary lengths, compression, simulated peak-KV / KV-AUC for keep_last_n_blocks 0 vs
-1 (and GB for a model's KV geometry), packing efficiency and the validation report.

``prepare`` renders and validates every record once, exactly as training does
(:func:`.cache.prepare_dataset`), and writes the tokenized examples to ``DIR`` (:mod:`.prepared`):
train on them with ``memento-train ... data.prepared=DIR``, which skips tokenization and refuses a
directory rendered with other options (tokenizer, mask, ``--max-seq-len``, ``--overlong``,
``--system-prompt``) than the run's. Packing into micro-batches happens in the trainer, per step.
``DIR/memento_prepare.json`` holds the rendering options and the validation report.

Both commands tokenize with ``--tokenizer`` (default: the shipped one). A base tokenizer without the
memento tokens (e.g. ``Qwen/Qwen3-8B``) gets them added by the function training uses
(:func:`memento_train.models.loading.load_tokenizer`), so the ids are the ones a run on
that base model produces; the output names the added tokens and their ids.

``synth`` writes N records of the deterministic synthetic running-total task
(:mod:`.synthetic`) as OpenMementos-format JSONL.

Exit status: 0 on success, 2 on bad input: a bad flag or option value prints one line
``memento-data: configuration error: ...`` (the form of every memento CLI), a bad dataset
``memento-data: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from typing import Any

from memento_train.config.errors import ConfigError, FlagParser, report_config_error
from memento_train.config.tree import build
from memento_train.data.config import HF_CONFIGS, OVERLONG_POLICIES, SAMPLE_TRACES, DataConfig


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name (default: the shipped one)")
    p.add_argument("--hf-config", default="default", choices=HF_CONFIGS, help="record schema")
    p.add_argument("--split", default="train")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-seq-len", type=int, default=32768, help="longest record in tokens (default 32768)")
    p.add_argument("--overlong", default="drop", choices=OVERLONG_POLICIES)
    p.add_argument("--strict", action="store_true", help="fail on the first invalid record")
    p.add_argument("--mask-delimiters", action="store_true", help="evict block delimiters too (Phi-4)")
    p.add_argument("--keep-last-block-for-answer", action="store_true")
    p.add_argument("--cache-dir", default=None, help="Arrow / datasets cache directory")


def build_parser() -> argparse.ArgumentParser:
    ap = FlagParser(prog="memento-data", description="Inspect and pre-tokenize Memento datasets.")
    sub = ap.add_subparsers(dest="command", required=True)

    st = sub.add_parser("stats", help="block/summary/KV statistics and the validation report")
    st.add_argument("path", nargs="?", default=SAMPLE_TRACES, help="dataset (default: shipped sample traces)")
    _add_common(st)
    st.add_argument(
        "--model-config",
        default="qwen3-8b",
        help="built-in KV geometry (qwen3-8b, qwen3-32b, phi-4, olmo-3-7b) or a config.json path",
    )
    st.add_argument("--kv-dtype-bytes", type=int, default=2, help="bytes per KV value (2 = bf16)")
    st.add_argument("--limit", type=int, default=None, help="only the first N records")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument("--pack-tokens", type=int, default=None, help="micro-batch token budget (default: --max-seq-len)")

    pr = sub.add_parser("prepare", help="tokenize once into a directory training reads (data.prepared=DIR)")
    pr.add_argument("path", help="dataset: .jsonl/.json/.parquet file, directory, or hub name")
    pr.add_argument("--output", required=True, help="directory to write (train with data.prepared=DIR)")
    _add_common(pr)
    pr.add_argument("--keep-last-n-blocks", type=int, default=0, help="-1 = stage 1 (no eviction), 0 = stage 2")
    pr.add_argument("--num-proc", type=int, default=1)
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")

    sy = sub.add_parser("synth", help="write records of the synthetic running-total Memento task")
    sy.add_argument("n", type=int, help="number of records")
    sy.add_argument("--output", required=True, help="JSONL file to write")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--offset", type=int, default=0, help="index of the first record")
    return ap


def _config(args: argparse.Namespace, keep_last_n_blocks: int = 0) -> DataConfig:
    """The flags as a :class:`DataConfig`, built and validated like every config (errors: ConfigError)."""
    block_masking = {
        "keep_last_n_blocks": keep_last_n_blocks,
        "mask_delimiters": args.mask_delimiters,
        "keep_last_block_for_answer": args.keep_last_block_for_answer,
    }
    values = {
        "path": args.path,
        "hf_config": args.hf_config,
        "split": args.split,
        "system_prompt": args.system_prompt,
        "max_seq_len": args.max_seq_len,
        "overlong": args.overlong,
        "strict": args.strict,
        "num_proc": getattr(args, "num_proc", 1),
        "cache_dir": args.cache_dir,
        "block_masking": block_masking,
        "tokenizer": args.tokenizer,
    }
    return build(DataConfig, values, "data").validate()


def _pack_tokens(args: argparse.Namespace) -> int:
    n = args.max_seq_len if args.pack_tokens is None else args.pack_tokens
    if n < 1:
        raise ConfigError(f"--pack-tokens must be >= 1, got {n}")
    return n


def cmd_stats(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from memento_train.data.records import load_records
    from memento_train.data.render import Renderer
    from memento_train.data.stats import dataset_stats, load_geometry
    from memento_train.data.validate import ValidationReport, check_record

    cfg = _config(args)
    pack_tokens = _pack_tokens(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    geometry = load_geometry(args.model_config, args.kv_dtype_bytes)
    renderer = Renderer(_load_tokenizer(cfg, sys.stderr)[0], cfg.block_masking, cfg.system_prompt)
    records = load_records(cfg)
    n = len(records) if args.limit is None else min(args.limit, len(records))
    report, kept = ValidationReport(), []
    rows = records if n == len(records) else records.select(range(n))
    for row in tqdm(rows, total=n, desc="render + validate", disable=None, file=sys.stderr):
        outcome = check_record(row, renderer, max_seq_len=cfg.max_seq_len, overlong=cfg.overlong)
        if cfg.strict:
            outcome.raise_if_rejected()
        report.add_outcome(outcome)
        if outcome.example is not None:
            kept.append(outcome.example)
    stats = dataset_stats(kept, renderer, report, source=str(args.path), pack_tokens=pack_tokens, geometry=geometry)
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2, default=_json_default))
    else:
        print(stats.format())
    return 0


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def _load_tokenizer(cfg: DataConfig, out: Any) -> tuple[Any, dict[str, int]]:
    """``cfg.tokenizer`` with the memento tokens and ``{token: id}`` of those it had to add (said on ``out``)."""
    from memento_train.models.loading import load_tokenizer_and_added

    tokenizer, added = load_tokenizer_and_added(cfg.tokenizer)
    if added:
        ids = ", ".join(f"{t}={i}" for t, i in added.items())
        print(
            f"tokenizer {cfg.tokenizer}: added the memento tokens it lacked, as training on this base "
            f"model does: {ids} ({len(tokenizer)} tokens now)",
            file=out,
        )
    return tokenizer, added


def cmd_prepare(args: argparse.Namespace) -> int:
    from memento_train.data.cache import prepare_dataset
    from memento_train.data.prepared import write_prepared

    cfg = _config(args, args.keep_last_n_blocks)
    out = os.path.abspath(args.output)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not args.overwrite:
            raise ValueError(f"--output {out} already exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    tokenizer, added = _load_tokenizer(cfg, sys.stdout)
    ds, report = prepare_dataset(cfg, tokenizer=tokenizer)
    print(report)
    if len(ds) == 0:
        raise ValueError("no valid records left after validation; nothing to write")
    manifest = write_prepared(
        ds, out, cfg=cfg, tokenizer=tokenizer, tokenizer_source=cfg.tokenizer, added_tokens=added, report=report
    )
    print(
        f"wrote {manifest['num_examples']} tokenized examples ({manifest['num_tokens']} tokens, longest "
        f"{manifest['longest']}) to {out}; train on them with data.prepared={out}"
    )
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from memento_train.data.synthetic import SyntheticTaskConfig, synthetic_records

    records = synthetic_records(args.n, SyntheticTaskConfig(seed=args.seed), offset=args.offset)
    with open(args.output, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"wrote {len(records)} synthetic records to {args.output}")
    return 0


_COMMANDS = {"stats": cmd_stats, "prepare": cmd_prepare, "synth": cmd_synth}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a bad flag: one configuration-error line, exit 2
    from memento_train.data.validate import InvalidRecordError

    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:  # name the command-line flag, not the config field
        flag = re.sub(r"\bdata\.(?:block_masking\.)?(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(exc))
        return report_config_error("memento-data", flag)
    except (InvalidRecordError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"memento-data: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
