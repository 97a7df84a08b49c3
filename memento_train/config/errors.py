"""The one error type for bad configuration, shared by every config dataclass and the CLIs, and the
one way a CLI reports it: ``<prog>: configuration error: <message>`` on one stderr line, exit code 2.

``memento-train``, ``memento-rl`` and ``memento-eval`` report it through
:func:`memento_train.recipes.cli.run_recipe_cli`; the flag-style ``memento-data`` and ``memento-launch``
use :func:`report_config_error` and :class:`FlagParser` (whose usage errors take the same form).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_CONFIG_ERROR = 2


class ConfigError(ValueError):
    """A config option has a value that cannot be used; the message names the option and what to change."""


def report_config_error(prog: str, exc: BaseException | str) -> int:
    """Print ``<prog>: configuration error: <exc>`` to stderr; return :data:`EXIT_CONFIG_ERROR`."""
    print(f"{prog}: configuration error: {exc}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


class FlagParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors (unknown flag, bad choice, missing value)
    are configuration errors: one stderr line in the common form, then exit code 2."""

    def error(self, message: str) -> NoReturn:
        report_config_error(self.prog.split()[0], message)  # the command, not 'memento-data stats'
        sys.exit(EXIT_CONFIG_ERROR)
