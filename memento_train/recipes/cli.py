"""The front shared by the recipe-driven commands (``memento-train``, ``memento-rl``, ``memento-eval``).

All take ``[show] [recipe=NAME|PATH] [section.option=value ...]``, print their help for ``help``,
list the shipped recipes for ``recipes``, and turn a :class:`ConfigError` into one line on stderr
(``<prog>: configuration error: ...``, :func:`~memento_train.config.errors.report_config_error`) and
exit code 2. The training commands also plan a recipe's memory for ``plan`` (see
:mod:`memento_train.planning.cli`: ``<command> plan recipe=NAME [gpu=H100|H200|B200] [key=value ...]``).
Each command supplies only what it does with the parsed arguments.

Exit codes: 0 done, 2 bad configuration, 75 (:data:`~memento_train.faults.preemption.EXIT_PREEMPTED`)
checkpointed and stopped on a preemption signal (run the same command again to continue), 1 a
checkpoint that cannot be resumed from or written (message on stderr) or any other failure.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memento_train.checkpoint.manager import CheckpointError
from memento_train.config.errors import ConfigError, report_config_error
from memento_train.faults.preemption import EXIT_PREEMPTED, Preempted
from memento_train.recipes import available_recipes, split_recipe_arg


@dataclass
class RecipeArgs:
    """``show`` (print the resolved config and exit), the recipe name, the remaining overrides."""

    show: bool
    recipe: str | None
    overrides: list[str]


def run_recipe_cli(
    prog: str,
    doc: str,
    argv: Sequence[str] | None,
    run: Callable[[RecipeArgs], int],
    subcommands: dict[str, Callable[[list[str]], int]] | None = None,
    *,
    plan: bool = True,
) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``): help, ``recipes``, ``plan`` (when ``plan``),
    ``subcommands``, else ``run``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help", "help"):
        print(doc)
        return 0
    try:
        if args and args[0] == "recipes":
            print("\n".join(available_recipes()))
            return 0
        if plan and args and args[0] == "plan":
            from memento_train.planning.cli import __doc__ as plan_doc
            from memento_train.planning.cli import plan_command

            if args[1:2] in (["help"], ["-h"], ["--help"]):
                print(plan_doc)
                return 0
            recipe, rest = split_recipe_arg(args[1:])
            return plan_command(prog, recipe, rest)
        if args and args[0] in (subcommands or {}):
            return subcommands[args[0]](args[1:])
        show = bool(args) and args[0] == "show"
        recipe, rest = split_recipe_arg(args[1:] if show else args)
        return run(RecipeArgs(show, recipe, rest))
    except ConfigError as exc:
        return report_config_error(prog, exc)
    except Preempted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except CheckpointError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
