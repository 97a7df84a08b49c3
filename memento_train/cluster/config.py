"""Where and how the training workers run: :class:`ClusterConfig`.

One config describes a *worker group*: ``num_workers`` processes, one per GPU (or a few CPU cores),
forming one ``torch.distributed`` group. With ``use_ray=True`` (the default) they are Ray actors on a
local or existing Ray cluster; with ``use_ray=False`` a single worker runs inside the driver process
(debugging, fast tests) behind the same :class:`~memento_train.cluster.worker_group.WorkerGroup`
interface.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Literal

from memento_train.config.errors import ConfigError
from memento_train.config.tree import check_types


@dataclass
class ClusterConfig:
    """Resources and Ray placement of one worker group.

    Attributes:
        address: ``None`` starts a local Ray cluster for this group (and shuts it down with the group);
            ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` joins an existing cluster (e.g. one
            started by the SLURM launcher), which is never shut down by the group.
        use_ray: ``False`` runs one worker inline in the driver process (``num_workers`` must be 1).
        num_workers: number of worker processes (= torch.distributed world size).
        gpus_per_worker: GPUs reserved per worker; ``None`` means 1 when the Ray cluster has GPUs
            (inline: when CUDA is available), else 0.
        cpus_per_worker: CPUs reserved per worker; also the worker's ``torch.set_num_threads`` and
            ``OMP_NUM_THREADS``.
        placement_strategy: Ray placement-group strategy for the workers' bundles.
        backend: torch.distributed backend; ``"auto"`` is ``"nccl"`` when workers have GPUs, else
            ``"gloo"``.
        init_timeout_s: how long to wait for the placement group and for the rendezvous.
        collective_timeout_s: timeout of torch.distributed collectives.
        env: extra environment variables for the workers (Ray ``runtime_env``; inline mode sets them
            in the driver process for the group's lifetime).
        secret_env: names of environment variables that hold secrets: their ``env`` values never reach
            ``config.yaml``, logs or metrics, and names that ``env`` does not set are copied from the
            driver's environment (so the secret need not be in the config at all). Names that look
            like secrets (``*API_KEY*``, ``*TOKEN*``, ...) are treated as secret anyway
            (:mod:`memento_train.faults.secrets`).
        python: the Python interpreter of the workers (Ray ``runtime_env`` ``py_executable``), e.g. the
            separate vLLM 0.13 environment of rollout workers (``docs/vllm.md``); same Python minor
            version and Ray version as the driver. ``None``: the driver's. Rollout workers only.
    """

    address: str | None = None
    use_ray: bool = True
    num_workers: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: int = 1
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    init_timeout_s: float = 300.0
    collective_timeout_s: float = 1800.0
    env: dict[str, str] = field(default_factory=dict)
    secret_env: list[str] = field(default_factory=list)
    python: str | None = None

    def validate(self, prefix: str = "cluster") -> ClusterConfig:
        """Check every option; raise :class:`ConfigError` naming the first bad one (``prefix.option``).

        Returns ``self`` so that ``cfg = ClusterConfig(...).validate()`` reads naturally.
        """

        def bad(option: str, msg: str) -> ConfigError:
            return ConfigError(f"{prefix}.{option}: {msg}")

        check_types(self, prefix)
        if self.address is not None:
            if not isinstance(self.address, str) or not self.address.strip():
                raise bad(
                    "address",
                    f"expected null (start a local Ray cluster), 'auto', 'HOST:PORT' or "
                    f"'ray://HOST:PORT', got {self.address!r}",
                )
            if not self.use_ray:
                raise bad("address", "is only used with use_ray=true; remove it or set use_ray=true")
        if not _is_int(self.num_workers) or self.num_workers < 1:
            raise bad("num_workers", f"expected an integer >= 1, got {self.num_workers!r}")
        if not self.use_ray and self.num_workers != 1:
            raise bad(
                "num_workers",
                f"inline mode (use_ray=false) runs exactly one worker, got "
                f"{self.num_workers}; set num_workers=1 or use_ray=true",
            )
        if self.gpus_per_worker is not None:
            g = self.gpus_per_worker
            if isinstance(g, bool) or not isinstance(g, numbers.Real) or g < 0:
                raise bad("gpus_per_worker", f"expected null (auto) or a number >= 0, got {g!r}")
            if g > 1 and g != int(g):
                raise bad("gpus_per_worker", f"fractions are only allowed below 1 (GPU sharing), got {g!r}")
        if not _is_int(self.cpus_per_worker) or self.cpus_per_worker < 1:
            raise bad("cpus_per_worker", f"expected an integer >= 1, got {self.cpus_per_worker!r}")
        if self.backend == "nccl" and self.gpus_per_worker == 0:
            raise bad(
                "backend", "nccl needs GPUs but gpus_per_worker=0; use backend=gloo (or auto) or give workers GPUs"
            )
        for option in ("init_timeout_s", "collective_timeout_s"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise bad(option, f"expected a number of seconds > 0, got {value!r}")
        if not isinstance(self.env, dict):
            raise bad("env", f"expected a mapping of variable names to strings, got {type(self.env).__name__}")
        for key, value in self.env.items():
            if not isinstance(key, str) or not key or "=" in key:
                raise bad("env", f"invalid environment variable name {key!r}")
            if not isinstance(value, str):
                raise bad(f"env.{key}", "expected a string; quote the value")  # never echo a possible secret
        if not isinstance(self.secret_env, list) or not all(
            isinstance(k, str) and k and "=" not in k for k in self.secret_env
        ):
            raise bad("secret_env", f"expected a list of environment variable names, got {self.secret_env!r}")
        if self.python is not None:
            if prefix != "rollout_cluster":
                raise bad(
                    "python",
                    "a second interpreter is supported for rollout workers only (rollout_cluster.python, docs/vllm.md)",
                )
            if not self.use_ray:
                raise bad("python", "needs use_ray=true (inline workers run in the driver's interpreter)")
            if not (os.path.isfile(self.python) and os.access(self.python, os.X_OK)):
                raise bad(
                    "python",
                    f"{self.python!r} is not an executable file (e.g. VENV/bin/python of "
                    "scripts/install_vllm_overlay.sh)",
                )
        return self

    def worker_env(self) -> dict[str, str]:
        """``env`` plus the driver environment's values of the ``secret_env`` names it does not set."""
        return {**{k: os.environ[k] for k in self.secret_env if k in os.environ}, **self.env}


def _is_int(value: object) -> bool:
    # bool is an int subclass; ``num_workers: true`` in a recipe is a mistake, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
