"""``memento-launch``: run a driver command (``memento-train``, ``memento-rl``) on a multi-node cluster.

- :mod:`memento_train.launch.slurm` renders (and submits) an sbatch script that brings up a Ray
  cluster over the SLURM allocation, runs the driver against it and tears it down.
- :mod:`memento_train.launch.ray_job` submits the driver to an existing Ray cluster (e.g. KubeRay)
  through the Ray Jobs API and streams its logs.
- :mod:`memento_train.launch.cli` is the command line; ``docs/multinode.md`` is the guide.
"""

from __future__ import annotations

import re

from memento_train.config.errors import ConfigError

# Environment defaults for every launch. NCCL_DEBUG=WARN prints NCCL's own reason when a collective
# fails; TORCH_NCCL_ASYNC_ERROR_HANDLING=1 turns a timed-out or failed collective into an error
# instead of a hang; PYTHONUNBUFFERED=1 keeps per-node logs current; Ray usage stats are off
# because cluster nodes usually have no internet access. Users override any of them.
DEFAULT_ENV: dict[str, str] = {
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "PYTHONUNBUFFERED": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_env_assignments(items: list[str] | None, option: str = "--env") -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}``; later assignments win.

    Raises:
        ConfigError: an item is not ``KEY=VALUE`` with a valid environment variable name.
    """
    env: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(key):
            raise ConfigError(
                f"{option} {item!r}: expected KEY=VALUE with KEY a valid environment variable "
                f"name (letters, digits, _), e.g. {option} NCCL_DEBUG=INFO"
            )
        env[key] = value
    return env


def check_secrets_not_inline(
    driver_cmd: list[str], env: dict[str, str] | None = None, *, env_option: str | None = "--env"
) -> None:
    """Refuse secret values where they would be written down: a driver override such as
    ``cluster.env.HF_TOKEN=...`` (the script, the batch log and ``ps`` show it) and, when
    ``env_option`` is given, ``--env SECRET=value`` (rendered into the sbatch script).

    Raises:
        ConfigError: naming the variable and what to do instead.
    """
    from memento_train.faults.secrets import is_secret

    for arg in driver_cmd[1:]:
        key, sep, value = arg.partition("=")
        parts = key.split(".")
        if (
            sep
            and value
            and len(parts) == 3
            and parts[0].endswith("cluster")
            and parts[1] == "env"
            and is_secret(parts[2])
        ):
            raise ConfigError(
                f"{key}=... puts a secret on the command line, where the job script, its log and "
                f"`ps` show it: export {parts[2]} in this shell instead and pass "
                f"{parts[0]}.secret_env=[{parts[2]}] to the driver"
            )
    for name, value in (env or {}).items():
        if env_option and value and is_secret(name):
            raise ConfigError(
                f"{env_option} {name}=...: the value of a secret would be written into the job "
                f"script; export {name} in this shell instead (sbatch passes the environment to "
                f"the job) and have the driver forward it with cluster.secret_env=[{name}]"
            )


def driver_override(cmd: list[str], key: str) -> str | None:
    """The value of the last ``key=value`` override in a driver command line, or ``None``.

    Driver CLIs take Hydra-style overrides, and the last one wins, as here.
    """
    value = None
    for arg in cmd[1:]:
        name, sep, rest = arg.partition("=")
        if sep and name == key:
            value = rest
    return value


__all__ = ["DEFAULT_ENV", "check_secrets_not_inline", "driver_override", "parse_env_assignments"]
