"""The one error type for bad configuration, shared by every config dataclass and the CLIs."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config option has a value that cannot be used; the message names the option and what to change."""
