"""``memento-eval``: evaluate a Memento model on a math problem set.

Usage::

    memento-eval output_dir=PATH [recipe=NAME|PATH] [key=value ...]
    memento-eval show [recipe=NAME|PATH] [key=value ...]   # print the resolved config and exit
    memento-eval recipes                                   # list the shipped recipes
    memento-eval help                                      # this text and every option

The same front as ``memento-train`` and ``memento-rl`` (:func:`memento_train.recipes.cli.run_recipe_cli`):
``recipe=`` takes a shipped name or a file, with ``defaults:`` inheritance; without one the shipped
``tiny_eval`` runs (the ``math_small`` problems, 4 samples each, the tiny random Qwen3 and the
reference generator with eviction on: a plumbing check, accuracy and blocks ~0, that writes the full
report). ``recipe=<a memento-train / memento-rl recipe>`` evaluates the export that recipe writes.

Exit codes: 0 success, 2 bad configuration (``memento-eval: configuration error: ...`` on stderr) or
bad input such as an unreadable problem set (``memento-eval: error: ...``), 1 a failure while running.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import yaml

from memento_train.config.errors import ConfigError
from memento_train.config.tree import describe_options, to_dict
from memento_train.evaluation.config import EvalConfig, load_eval_config
from memento_train.recipes.cli import RecipeArgs, run_recipe_cli

PROG = "memento-eval"


def usage() -> str:
    """The help text: the module docstring and every option with its default."""
    options = "\n".join(f"  {key}={'null' if value is None else value}" for key, value in describe_options(EvalConfig))
    return (
        f"{__doc__}\nEvaluates pass@1, pass@k, maj@k, KV peak / AUC (tokens and GB), compression (summary / "
        f"block tokens), blocks and length per response; writes generations.jsonl, summary.json, summary.md and "
        f"kv_sawtooth.png under output_dir. generator_kwargs.NAME=VALUE passes NAME to the generator.\n\n"
        f"options (defaults):\n{options}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_recipe_cli(PROG, usage(), argv, _run, plan=False)


def _run(args: RecipeArgs) -> int:
    cfg = load_eval_config(args.recipe, args.overrides, require_output_dir=not args.show)
    if args.show:
        print(yaml.safe_dump(to_dict(cfg.to_dict()), sort_keys=False))
        return 0
    from memento_train.evaluation.runner import run_eval

    try:
        run_eval(cfg)
    except ConfigError:
        raise  # the common front reports it
    except (ValueError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
