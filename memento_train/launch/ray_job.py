"""Ray Jobs API: submit a driver command to an existing Ray cluster and stream its logs.

For clusters that already run Ray (KubeRay ``RayCluster``, a cloud VM cluster, a SLURM job started
by hand): ``memento-launch ray --address http://HEAD:8265 -- memento-rl recipe=grpo`` uploads the
working directory, sets environment variables through the job's runtime environment (inherited by
every actor the job starts), and streams the driver's output until the job ends.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlparse

from memento_train.config.errors import ConfigError
from memento_train.launch import DEFAULT_ENV, driver_override

# Never worth uploading: version control, caches and our own launch logs. Ray additionally skips
# whatever the working directory's .gitignore lists.
DEFAULT_EXCLUDES = [".git", "__pycache__", "*.pyc", ".pytest_cache", "logs/memento-launch", "wandb"]

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class RayJobOptions:
    """What ``memento-launch ray`` sends (one attribute per CLI option).

    Attributes:
        address: the cluster's dashboard URL, ``http://HEAD:8265`` (``--address``).
        working_dir: directory uploaded as the job's working directory; ``None`` uploads nothing
            (the image or shared filesystem already has the code).
        excludes: ``runtime_env.excludes`` patterns added to :data:`DEFAULT_EXCLUDES`.
        env: ``--env`` variables, over :data:`~memento_train.launch.DEFAULT_ENV`.
        runtime_env: extra ``runtime_env`` keys (``--runtime-env-json``), e.g. ``{"pip": [...]}``;
            ``env_vars`` in it are merged, the rest overrides.
        submission_id: job id to use (``--submission-id``); ``None`` lets Ray pick one.
        entrypoint_num_cpus, entrypoint_num_gpus: resources reserved for the driver process itself.
        wait: stream logs and wait for the end (``--no-wait`` prints the id and returns).
    """

    address: str
    working_dir: str | None = "."
    excludes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    wait: bool = True

    def validate(self) -> RayJobOptions:
        """Raise :class:`ConfigError` naming the first bad option; return ``self``."""
        url = urlparse(self.address)
        if url.scheme not in ("http", "https") or not url.hostname:
            hint = ""
            if url.scheme == "ray" or self.address.rstrip("/").endswith((":6379", ":10001")):
                hint = " (that looks like the GCS or Ray Client port; the Jobs API is on the dashboard port)"
            raise ConfigError(
                f"--address {self.address!r}: expected the Ray dashboard URL, e.g. http://HEAD:8265{hint}"
            )
        if self.working_dir is not None and not os.path.isdir(self.working_dir):
            raise ConfigError(
                f"--working-dir {self.working_dir!r} is not a directory; pass the project directory or --no-working-dir"
            )
        for flag, value in (
            ("--entrypoint-num-cpus", self.entrypoint_num_cpus),
            ("--entrypoint-num-gpus", self.entrypoint_num_gpus),
        ):
            if value is not None and value < 0:
                raise ConfigError(f"{flag}: expected a number >= 0, got {value!r}")
        if not isinstance(self.runtime_env, dict):
            raise ConfigError(f"--runtime-env-json: expected a JSON object, got {self.runtime_env!r}")
        return self


def build_job_request(opts: RayJobOptions, driver_cmd: list[str]) -> dict[str, Any]:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` for ``driver_cmd``.

    Raises:
        ConfigError: a bad option or an empty driver command.
    """
    opts.validate()
    if not driver_cmd:
        raise ConfigError(
            "no driver command: put it after --, e.g. memento-launch ray --address "
            "http://HEAD:8265 -- memento-rl recipe=grpo"
        )
    runtime_env = {k: v for k, v in opts.runtime_env.items() if k != "env_vars"}
    runtime_env["env_vars"] = {**DEFAULT_ENV, **opts.runtime_env.get("env_vars", {}), **opts.env}
    if opts.working_dir is not None:
        runtime_env.setdefault("working_dir", os.path.abspath(opts.working_dir))
        runtime_env["excludes"] = list(
            dict.fromkeys(DEFAULT_EXCLUDES + list(runtime_env.get("excludes", [])) + opts.excludes)
        )
    request: dict[str, Any] = {
        "entrypoint": shlex.join(driver_cmd),
        "runtime_env": runtime_env,
        # Ties the job to what launched it in `ray job list` and the dashboard.
        "metadata": {"launcher": "memento-launch", "command": shlex.join(driver_cmd)[:512]},
    }
    if opts.submission_id:
        request["submission_id"] = opts.submission_id
    if opts.entrypoint_num_cpus is not None:
        request["entrypoint_num_cpus"] = opts.entrypoint_num_cpus
    if opts.entrypoint_num_gpus is not None:
        request["entrypoint_num_gpus"] = opts.entrypoint_num_gpus
    return request


def output_dir_warning(driver_cmd: list[str]) -> str | None:
    """A warning when checkpoints would land in the job's temporary working-directory copy."""
    out = driver_override(driver_cmd, "output_dir")
    if out is None:
        return (
            "no output_dir= in the driver command: checkpoints go to the trainer's default, relative to the "
            "job's temporary working directory on the head; pass output_dir=/shared/path to keep them"
        )
    if not os.path.isabs(out):
        return (
            f"output_dir={out} is relative: on the cluster it resolves inside the job's temporary working "
            f"directory, which Ray deletes; pass an absolute path on storage every node shares"
        )
    return None


def make_client(address: str):
    """A ``JobSubmissionClient`` for ``address`` (imported lazily: ``ray`` is heavy)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or RuntimeError from the version check
        raise RuntimeError(
            f"cannot reach the Ray Jobs API at {address} ({exc}); check --address (the "
            f"dashboard URL, e.g. http://HEAD:8265 or a port-forward to it) and that the "
            f"dashboard is running"
        ) from exc


def _status_name(status) -> str:
    return getattr(status, "value", str(status))


# A freshly started head answers HTTP 500 "No available agent to submit job" until its job agent is
# up (seconds; over a minute on a loaded small head); that is a wait, not an error.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 180.0  # generous: a loaded 2-core head took over a minute


def _submit_when_agent_ready(client, request: dict[str, Any], wait_s: float = AGENT_WAIT_S) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**request)
        except RuntimeError as exc:
            if AGENT_NOT_READY not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def submit_and_stream(
    client,
    request: dict[str, Any],
    *,
    address: str = "http://HEAD:8265",
    wait: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
    poll_s: float = 2.0,
) -> int:
    """Submit ``request`` through ``client``; with ``wait``, stream logs until the job ends.

    Returns:
        The exit status for the CLI: 0 when the job succeeded (or was only submitted), 1 when it
        failed or was stopped, 130 when interrupted (the job keeps running and can be stopped).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    job_id = _submit_when_agent_ready(client, request)
    print(f"memento-launch: submitted Ray job {job_id}", file=err, flush=True)
    if not wait:
        print(job_id, file=out, flush=True)
        return 0

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        try:
            asyncio.run(stream())
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the log websocket dropped: the job itself may be fine
            print(
                f"memento-launch: log stream ended early ({exc}); waiting for the job to finish", file=err, flush=True
            )
        status = _status_name(client.get_job_status(job_id))
        while status not in TERMINAL_STATES:
            time.sleep(poll_s)
            status = _status_name(client.get_job_status(job_id))
    except KeyboardInterrupt:
        print(
            f"\nmemento-launch: stopped following; job {job_id} keeps running. Stop it with: "
            f"ray job stop --address {address} {job_id}",
            file=err,
            flush=True,
        )
        return 130
    if status == "SUCCEEDED":
        print(f"memento-launch: job {job_id} succeeded", file=err, flush=True)
        return 0
    message = getattr(client.get_job_info(job_id), "message", "") or ""
    print(f"memento-launch: job {job_id} {status.lower()}{': ' + message if message else ''}", file=err, flush=True)
    return 1
