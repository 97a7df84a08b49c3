"""Getting Ray resources for a worker group: connect to (or start) Ray, reserve a placement group.

:class:`RaySession` remembers whether *this* group started Ray, so that shutting the group down stops
a local Ray it started but never a cluster it joined (``address="auto"`` under the SLURM launcher, or
a Ray the caller had already initialised).
"""

from __future__ import annotations

import logging
import os
import site
import sys
import sysconfig

from memento_train.cluster.config import ClusterConfig

log = logging.getLogger(__name__)

# The env vars a RaySession of this process gave the Ray job it initialised (None: not ours), so that
# a group started inside a driver-owned Ray can still use the job's prestarted worker processes.
_JOB_ENV: dict[str, str] | None = None


class RaySession:
    """Ray for one worker group. Use :meth:`open`; :meth:`close` is idempotent."""

    def __init__(self, started: bool, job_env: dict[str, str] | None):
        self.started = started
        # The env vars this session gave the whole Ray job (None: Ray was initialised by someone else).
        self.job_env = job_env
        self._closed = False

    @classmethod
    def open(cls, cfg: ClusterConfig, needed_cpus: int, worker_env: dict[str, str]) -> RaySession:
        """Use the Ray already initialised in this process, else join ``cfg.address``, else start a
        local Ray with at least ``needed_cpus`` CPUs.

        When this session initialises Ray, ``worker_env`` becomes the job's runtime environment: Ray
        then prestarts worker processes with it, which the group's actors can take over at once.
        """
        import ray

        global _JOB_ENV
        if ray.is_initialized():
            # Someone else (the caller, another group) owns this Ray: use it and never shut it down.
            log.info("cluster: using the Ray instance already initialised in this process")
            return cls(started=False, job_env=_JOB_ENV)
        runtime_env = {"env_vars": dict(worker_env)}
        if cfg.address is not None:
            # Keep Ray's default node IP: forcing 127.0.0.1 makes joining retry the GCS forever.
            ray.init(address=cfg.address, runtime_env=runtime_env)
            _JOB_ENV = dict(worker_env)
            return cls(started=False, job_env=dict(worker_env))
        # address="local" starts a new cluster even when RAY_ADDRESS is set in the environment;
        # more CPUs than cores lets a 2-core CI machine host workers that reserve more than it has.
        ray.init(
            address="local",
            num_cpus=max(needed_cpus, os.cpu_count() or 1),
            include_dashboard=False,
            runtime_env=runtime_env,
        )
        _JOB_ENV = dict(worker_env)
        return cls(started=True, job_env=dict(worker_env))

    def close(self) -> None:
        """Shut Ray down if this session started it."""
        if self._closed:
            return
        self._closed = True
        if self.started:
            import ray

            global _JOB_ENV
            _JOB_ENV = None
            ray.shutdown()


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (0 when it has none)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def reserve_placement_group(bundles: list[dict[str, float]], strategy: str, name: str, timeout_s: float):
    """Create a placement group and wait until Ray has placed all ``bundles``.

    Raises ``TimeoutError`` listing what was asked for and what the cluster has, and removes the
    half-made group so that it does not hold resources afterwards.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy, name=name)
    if pg.wait(timeout_seconds=timeout_s):
        return pg
    remove_placement_group(pg)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = "; ".join(
        f"{n.get('NodeManagerAddress')}: {_fmt(_ray_resources(n.get('Resources', {})))}" for n in nodes
    )
    raise TimeoutError(
        f"cluster: Ray could not place the worker group {name!r} within init_timeout_s={timeout_s:g} s.\n"
        f"  asked: {len(bundles)} bundle(s) of {_fmt(bundles[0])} with placement_strategy={strategy}\n"
        f"  cluster total: {_fmt(_ray_resources(ray.cluster_resources()))}\n"
        f"  available now: {_fmt(_ray_resources(ray.available_resources()))}\n"
        f"  alive nodes ({len(nodes)}): {per_node}\n"
        "Lower cluster.num_workers / cpus_per_worker / gpus_per_worker, relax placement_strategy "
        "(STRICT_SPREAD needs one node per worker, STRICT_PACK one node for all), add nodes, or raise "
        "cluster.init_timeout_s if nodes are still joining."
    )


def worker_code_paths() -> list[str]:
    """The driver's ``sys.path`` entries outside the Python installation, for the workers' PYTHONPATH.

    Ray only gives workers the driver's script directory and working directory, so worker classes
    defined elsewhere (a test module, a script's sibling package) would not import. Installation
    directories (stdlib, site-packages) are left out: workers have their own, and on another node the
    driver's could be the wrong ones. Editable installs work through the workers' own ``.pth`` files.
    """
    install_dirs = {
        os.path.realpath(p)
        for p in (
            *site.getsitepackages(),
            site.getusersitepackages(),
            *(sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib")),
        )
        if p
    }
    paths = []
    for entry in sys.path:
        real = os.path.realpath(entry or os.getcwd())
        if not os.path.isdir(real) or real in paths:
            continue
        if any(real == d or real.startswith(d + os.sep) for d in install_dirs):
            continue
        paths.append(real)
    return paths


def _ray_resources(resources: dict) -> dict:
    # Ray also lists memory, object store and per-node marker resources; CPU/GPU are what we ask for.
    return {k: resources[k] for k in ("CPU", "GPU") if k in resources}


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}" if resources else "{}"
