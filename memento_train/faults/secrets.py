"""Secrets in run configurations: which values they are, and keeping them out of files and logs.

Workers often need credentials (``WANDB_API_KEY``, ``HF_TOKEN``, an S3 key) in their environment,
which the config passes as ``cluster.env``. A value there is a *secret* when its name is listed in
``cluster.secret_env`` or looks like one (:data:`SECRET_NAME`: ``*API_KEY*``, ``*TOKEN*``,
``*SECRET*``, ``*PASSWORD*``, ``*CREDENTIAL*``). Names in ``cluster.secret_env`` that ``cluster.env``
does not set are copied from the driver's environment into the workers' (so the value need not be
in the config at all). Secret values are replaced by :data:`REDACTED` in ``config.yaml``, the wandb
config and the config sent to the workers (:func:`redact_config`), and :func:`secret_values` lists
what the run logger scrubs from every line and metric it writes (with ``WANDB_API_KEY``).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any

SECRET_NAME = re.compile(r"api[_-]?key|token|secret|passw(?:or)?d|credential|private[_-]?key", re.IGNORECASE)
REDACTED = "<redacted>"
ALWAYS_SECRET = ("WANDB_API_KEY",)
_MIN_SCRUB_LEN = 6  # shorter values ("1", "true") would scrub ordinary text


def is_secret(name: str, marked: list[str] | tuple[str, ...] = ()) -> bool:
    """Whether environment variable ``name`` holds a secret (listed in ``marked``, or by its name)."""
    return name in marked or name in ALWAYS_SECRET or bool(SECRET_NAME.search(name))


def redact_env(env: Mapping[str, str], marked: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """``env`` with the values of secret names replaced by :data:`REDACTED`."""
    return {k: (REDACTED if is_secret(k, marked) else v) for k, v in env.items()}


def _cluster_sections(tree: Mapping[str, Any]):
    for key, section in tree.items():
        if isinstance(section, Mapping) and isinstance(section.get("env"), Mapping) and key.endswith("cluster"):
            yield section


def redact_config(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a plain config tree whose secret ``*cluster.env`` values read :data:`REDACTED`."""
    out = copy.deepcopy(dict(tree))
    for section in _cluster_sections(out):
        section["env"] = redact_env(section["env"], list(section.get("secret_env") or []))
    return out


def secret_values(tree: Mapping[str, Any]) -> list[str]:
    """Every secret value the run knows: secret ``cluster.env`` values, the driver environment's values
    of ``cluster.secret_env`` names, and ``WANDB_API_KEY``."""
    values = []
    for section in _cluster_sections(tree):
        marked = list(section.get("secret_env") or [])
        values += [str(v) for k, v in section["env"].items() if is_secret(k, marked)]
        values += [os.environ[k] for k in marked if k in os.environ]
    values += [os.environ[k] for k in ALWAYS_SECRET if k in os.environ]
    return sorted({v for v in values if len(v) >= _MIN_SCRUB_LEN and v != REDACTED}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every occurrence of each secret replaced by :data:`REDACTED`."""
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    return text
