"""``memento-data``: inspect and pre-tokenize Memento datasets.

    memento-data stats [PATH] [--tokenizer T] [--max-seq-len N] [--pack-tokens N]
                       [--model-config qwen3-8b|PATH/config.json] [--json]
    memento-data prepare PATH --output DIR [--pack-tokens N] [--pad-to M] [--num-proc P] ...
    memento-data synth N --output FILE.jsonl [--seed S] [--offset K]

``stats`` renders and validates every record (PATH defaults to the shipped sample traces) and prints
per-domain block/summary lengths, compression, simulated peak-KV / KV-AUC for keep_last_n_blocks 0 vs
-1 (and GB for a model's KV geometry), packing efficiency and the validation report.

``prepare`` pre-tokenizes through the Arrow cache (:func:`.cache.prepare_dataset`), packs into
micro-batches of at most ``--pack-tokens`` tokens and writes them with ``save_to_disk``: load them
with ``datasets.load_from_disk(DIR)`` and turn rows into tensors with
:func:`memento_train.data.pack.batch_from_row`. ``DIR/memento_prepare.json`` holds the report.

``synth`` writes N records of the deterministic synthetic running-total task
(:mod:`.synthetic`) as OpenMementos-format JSONL.

Exit status: 0 on success, 2 on bad input (with a one-line ``memento-data: error: ...`` message).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Any

from memento_train.data.config import SAMPLE_TRACES, DataConfig, DataConfigError
from memento_train.masking import MaskConfig


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub name (default: the shipped one)")
    p.add_argument("--hf-config", default="default", choices=["default", "full"], help="record schema")
    p.add_argument("--split", default="train")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-seq-len", type=int, default=32768, help="longest record in tokens (default 32768)")
    p.add_argument("--overlong", default="drop", choices=["drop", "truncate"])
    p.add_argument("--strict", action="store_true", help="fail on the first invalid record")
    p.add_argument("--mask-delimiters", action="store_true", help="evict block delimiters too (Phi-4)")
    p.add_argument("--keep-last-block-for-answer", action="store_true")
    p.add_argument("--cache-dir", default=None, help="Arrow / datasets cache directory")
    p.add_argument("--pack-tokens", type=int, default=None, help="micro-batch token budget (default: --max-seq-len)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memento-data", description="Inspect and pre-tokenize Memento datasets.")
    sub = ap.add_subparsers(dest="command", required=True)

    st = sub.add_parser("stats", help="block/summary/KV statistics and the validation report")
    st.add_argument("path", nargs="?", default=SAMPLE_TRACES, help="dataset (default: shipped sample traces)")
    _add_common(st)
    st.add_argument("--model-config", default="qwen3-8b",
                    help="built-in KV geometry (qwen3-8b, qwen3-32b, phi-4, olmo-3-7b) or a config.json path")
    st.add_argument("--kv-dtype-bytes", type=int, default=2, help="bytes per KV value (2 = bf16)")
    st.add_argument("--limit", type=int, default=None, help="only the first N records")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pr = sub.add_parser("prepare", help="pre-tokenize + pack into an Arrow dataset on disk")
    pr.add_argument("path", help="dataset: .jsonl/.json/.parquet file, directory, or hub name")
    pr.add_argument("--output", required=True, help="directory for save_to_disk")
    _add_common(pr)
    pr.add_argument("--keep-last-n-blocks", type=int, default=0, help="-1 = stage 1 (no eviction), 0 = stage 2")
    pr.add_argument("--pad-to", type=int, default=None, help="pad each micro-batch to a multiple of this")
    pr.add_argument("--num-proc", type=int, default=1)
    pr.add_argument("--shuffle-seed", type=int, default=None, help="shuffle records before packing")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")

    sy = sub.add_parser("synth", help="write records of the synthetic running-total Memento task")
    sy.add_argument("n", type=int, help="number of records")
    sy.add_argument("--output", required=True, help="JSONL file to write")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--offset", type=int, default=0, help="index of the first record")
    return ap


def _config(args: argparse.Namespace, keep_last_n_blocks: int = 0) -> DataConfig:
    mask = MaskConfig(
        keep_last_n_blocks=keep_last_n_blocks,
        mask_delimiters=args.mask_delimiters,
        keep_last_block_for_answer=args.keep_last_block_for_answer,
    )
    return DataConfig(
        path=args.path, hf_config=args.hf_config, split=args.split, system_prompt=args.system_prompt,
        max_seq_len=args.max_seq_len, overlong=args.overlong, strict=args.strict,
        num_proc=getattr(args, "num_proc", 1), cache_dir=args.cache_dir, mask=mask, tokenizer=args.tokenizer,
    ).validate()


def _pack_tokens(args: argparse.Namespace) -> int:
    n = args.max_seq_len if args.pack_tokens is None else args.pack_tokens
    if n < 1:
        raise ValueError(f"--pack-tokens must be >= 1, got {n}")
    return n


def cmd_stats(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from memento_train.data.records import load_records
    from memento_train.data.render import Renderer
    from memento_train.data.stats import dataset_stats, load_geometry
    from memento_train.data.validate import ValidationReport, check_record
    from memento_train.models.loading import load_tokenizer

    cfg = _config(args)
    pack_tokens = _pack_tokens(args)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    geometry = load_geometry(args.model_config, args.kv_dtype_bytes)
    renderer = Renderer(load_tokenizer(cfg.tokenizer), cfg.mask, cfg.system_prompt)
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


def cmd_prepare(args: argparse.Namespace) -> int:
    import datasets
    from tqdm import tqdm

    from memento_train.data.cache import prepare_dataset
    from memento_train.data.pack import PackingStats, iter_packed_batches, packed_features
    from memento_train.models.loading import load_tokenizer

    cfg = _config(args, args.keep_last_n_blocks)
    pack_tokens = _pack_tokens(args)
    if args.pad_to is not None and args.pad_to < 1:
        raise ValueError(f"--pad-to must be >= 1, got {args.pad_to}")
    out = os.path.abspath(args.output)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not args.overwrite:
            raise ValueError(f"--output {out} already exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    tokenizer = load_tokenizer(cfg.tokenizer)
    ds, report = prepare_dataset(cfg, tokenizer=tokenizer)
    print(report)
    if len(ds) == 0:
        raise ValueError("no valid records left after validation; nothing to write")
    longest = max(ds["num_tokens"])
    if longest > pack_tokens:
        raise ValueError(
            f"a record has {longest} tokens > --pack-tokens={pack_tokens}; raise --pack-tokens "
            "or lower --max-seq-len (with --overlong truncate)"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pstats = PackingStats(0, 0, 0, pack_tokens)

    def rows():
        batches = iter_packed_batches(ds, pack_tokens, pad_to=args.pad_to, pad_token_id=pad_id,
                                      shuffle_seed=args.shuffle_seed, stats=pstats)
        for b in tqdm(batches, desc="pack", unit="batch", disable=None, file=sys.stderr):
            yield b.to_row()

    with tempfile.TemporaryDirectory(dir=cfg.cache_dir) as tmp:
        packed = datasets.Dataset.from_generator(
            rows, features=packed_features(), cache_dir=tmp, fingerprint=f"memento-pack-{os.getpid()}"
        )
        packed.save_to_disk(out)
    summary = {
        "output": out,
        "num_batches": len(packed),
        "validation": report.to_dict(),
        "packing": pstats.to_dict(),
        "config": {
            "path": str(cfg.path), "hf_config": cfg.hf_config, "split": cfg.split, "max_seq_len": cfg.max_seq_len,
            "overlong": cfg.overlong, "pack_tokens": pack_tokens, "pad_to": args.pad_to,
            "mask": {"keep_last_n_blocks": cfg.mask.keep_last_n_blocks, "mask_delimiters": cfg.mask.mask_delimiters,
                     "keep_last_block_for_answer": cfg.mask.keep_last_block_for_answer},
            "tokenizer": cfg.tokenizer or "shipped",
        },
    }
    with open(os.path.join(out, "memento_prepare.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(pstats)
    print(f"wrote {len(packed)} packed micro-batches to {out} (load with datasets.load_from_disk)")
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
    args = build_parser().parse_args(argv)
    from memento_train.data.validate import InvalidRecordError

    try:
        return _COMMANDS[args.command](args)
    except (InvalidRecordError, FileNotFoundError, ValueError, OSError) as exc:
        msg = str(exc)
        if isinstance(exc, DataConfigError):  # name the command-line flag, not the config field
            msg = re.sub(r"\bdata\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), msg)
        print(f"memento-data: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
