"""``memento-eval``: evaluate a Memento model on a math problem set.

Usage::

    memento-eval output_dir=PATH [recipe=RECIPE.yaml] [key=value ...]

With only ``output_dir`` it runs the embedded default on CPU: the shipped ``math_small`` problems,
4 samples each, the tiny random Qwen3 and the reference engine with eviction on — a plumbing check
(accuracy and blocks ~0) that writes the full report. ``memento-eval --help`` lists every key.

Exit codes: 0 success, 2 bad configuration or input (``memento-eval: error: ...`` on stderr),
1 a failure while running.
"""

from __future__ import annotations

import sys

from .config import EvalConfigError, build_config, describe_options

PROG = "memento-eval"

USAGE = f"""usage: {PROG} output_dir=PATH [recipe=RECIPE.yaml|.json] [key=value ...]

Evaluate a Memento model: pass@1, pass@k, maj@k, KV peak / AUC (tokens and GB), compression
(summary / block tokens), blocks and length per response. Writes generations.jsonl, summary.json,
summary.md and kv_sawtooth.png under output_dir. With no other key it runs the embedded default
(shipped problems, tiny random model, CPU): a plumbing check, not a benchmark.

Overrides are Hydra-style key=value; nested keys use dots (sampling.temperature=0.6,
block_masking.keep_last_n_blocks=0). A recipe's eval: section (or its top level) gives defaults.

keys (defaults):
{describe_options()}
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(USAGE)
        return 0
    try:
        cfg = build_config(args)
    except EvalConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from .runner import run_eval

    try:
        run_eval(cfg)
    except (EvalConfigError, ValueError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
