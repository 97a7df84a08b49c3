"""SLURM: render the sbatch script that runs a driver command on a Ray cluster over the allocation.

The script is a real bash file, ``sbatch.sh`` beside this module, rendered by plain text
substitution (:func:`render_template`): each ``__NAME__`` word and each ``#@NAME`` line is replaced
by an already shell-quoted value, so the template itself is valid bash that shellcheck lints. It
starts a Ray head on the first node and Ray workers on the others with background ``srun`` steps,
waits until every node and GPU has registered (:mod:`memento_train.launch.ray_wait`; deadline
``wait_timeout``, the error names the nodes that never joined), checks that the checkpoint
directory is on storage all nodes share, runs the driver with ``RAY_ADDRESS`` set, and stops Ray
on every node on exit, failure, ``scancel`` or preemption. ``#SBATCH --signal=B:USR1@N`` makes SLURM
warn the script N seconds before the time limit; the script forwards the signal (and SIGTERM) to the
driver, which checkpoints and exits 75, and with ``--requeue`` the script then requeues the job.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field

from memento_train.config.errors import ConfigError
from memento_train.launch import DEFAULT_ENV, driver_override

TEMPLATE = os.path.join(os.path.dirname(__file__), "sbatch.sh")
# A line "#@NAME" (a block of lines) or a word "__NAME__"; one pass, so values are never re-scanned.
_PLACEHOLDER = re.compile(r"^#@([A-Z][A-Z0-9_]*)\n|__([A-Z][A-Z0-9_]*)__", re.MULTILINE)

# sbatch reads "#SBATCH" lines itself, without a shell: values must be single words.
_SBATCH_VALUE = re.compile(r"[^\s'\"\\]+\Z")


@dataclass
class SlurmOptions:
    """What ``memento-launch slurm`` renders into the sbatch script (one attribute per CLI option).

    Attributes:
        nodes: number of nodes (``--nodes``); one Ray node each.
        gpus_per_node: GPUs per node (``--gpus-per-node``); 0 is a CPU cluster (no GPU request).
        cpus_per_node: CPUs per node for SLURM and Ray (``--cpus-per-node``); ``None`` lets Ray count.
        partition, time, account, qos: the usual sbatch options; ``None`` leaves them to the site.
        job_name: ``--job-name``; also names the batch log ``LOG_DIR/NAME-JOBID.out``.
        exclusive: request whole nodes (``#SBATCH --exclusive``).
        requeue: let SLURM requeue the job after preemption or node failure (``#SBATCH --requeue``),
            and requeue it from the script when the driver stopped for the time-limit signal.
        signal_time: seconds before the time limit at which SLURM sends SIGUSR1 to the batch shell
            (``#SBATCH --signal=B:USR1@N``) so the driver can checkpoint and stop; 0 sends none.
        sbatch_args: extra ``#SBATCH`` lines, e.g. ``["--constraint=h100", "--mail-type=END"]``.
        log_dir: where the batch log and the per-job, per-node Ray logs go (shared storage).
        shared_dir: directory checked for visibility from every node before Ray starts; ``None`` takes
            the driver command's ``output_dir=``.
        env: ``--env`` variables, exported after (and overriding) :data:`DEFAULT_ENV`.
        setup: shell lines run first on the batch node (``module load ...``, ``source venv/bin/activate``);
            ``srun`` steps inherit the resulting environment.
        python: the Python with ``ray`` installed, used for the wait and the head's IP address.
        ray_port, dashboard_port: the head's GCS and dashboard (Jobs API) ports.
        ray_temp_dir: Ray's ``--temp-dir`` on every node (default ``/tmp/ray``; keep it short: Unix
            socket paths are limited to ~107 bytes).
        ray_start_args: extra ``ray start`` arguments for every node; ``ray_head_args`` head only.
        wait_timeout: seconds for all nodes to join before the job fails naming the missing nodes.
        stop_grace: seconds between SIGTERM and SIGKILL when tearing Ray down.
    """

    nodes: int
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str = "memento"
    exclusive: bool = True
    requeue: bool = False
    signal_time: int = 120
    sbatch_args: list[str] = field(default_factory=list)
    log_dir: str = "logs/memento-launch"
    shared_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    python: str = "python"
    ray_port: int = 6379
    dashboard_port: int = 8265
    ray_temp_dir: str | None = None
    ray_start_args: list[str] = field(default_factory=list)
    ray_head_args: list[str] = field(default_factory=list)
    wait_timeout: int = 600
    stop_grace: int = 30

    def validate(self) -> SlurmOptions:
        """Raise :class:`ConfigError` naming the first bad option (as its CLI flag); return ``self``."""

        def positive_int(flag: str, value, minimum: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{flag}: expected an integer >= {minimum}, got {value!r}")

        positive_int("--nodes", self.nodes, 1)
        positive_int("--gpus-per-node", self.gpus_per_node, 0)
        if self.cpus_per_node is not None:
            positive_int("--cpus-per-node", self.cpus_per_node, 1)
        for flag, port in (("--ray-port", self.ray_port), ("--dashboard-port", self.dashboard_port)):
            positive_int(flag, port, 1)
            if port > 65535:
                raise ConfigError(f"{flag}: {port} is not a TCP port (1-65535)")
        if self.ray_port == self.dashboard_port:
            raise ConfigError(f"--ray-port and --dashboard-port are both {self.ray_port}; give them different ports")
        positive_int("--wait-timeout", self.wait_timeout, 1)
        positive_int("--signal-time", self.signal_time, 0)
        positive_int("--stop-grace", self.stop_grace, 1)
        for flag, value in (
            ("--partition", self.partition),
            ("--time", self.time),
            ("--account", self.account),
            ("--qos", self.qos),
            ("--job-name", self.job_name),
        ):
            if value is not None and not _SBATCH_VALUE.match(value):
                raise ConfigError(
                    f"{flag}: {value!r} must be one word without spaces or quotes "
                    f"(sbatch reads #SBATCH lines without a shell)"
                )
        for arg in self.sbatch_args:
            if not arg.startswith("-") or not _SBATCH_VALUE.match(arg):
                raise ConfigError(
                    f"--sbatch-arg: {arg!r} must be one sbatch option written as one word, "
                    f"e.g. --sbatch-arg=--constraint=h100"
                )
        for line in self.setup:
            if "\n" in line:
                raise ConfigError(f"--setup: {line!r} spans several lines; pass one --setup per line")
        return self


def _directives(opts: SlurmOptions, log_dir: str) -> str:
    """The ``#SBATCH`` lines."""
    lines = [f"--job-name={opts.job_name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1"]
    if opts.gpus_per_node:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_node:
        lines.append(f"--cpus-per-task={opts.cpus_per_node}")
    for flag, value in (
        ("partition", opts.partition),
        ("time", opts.time),
        ("account", opts.account),
        ("qos", opts.qos),
    ):
        if value is not None:
            lines.append(f"--{flag}={value}")
    if opts.exclusive:
        lines.append("--exclusive")
    if opts.requeue:
        # Requeued jobs keep their job id; "open-append" keeps the first attempt's log.
        lines += ["--requeue", "--open-mode=append"]
    if opts.signal_time:
        # B: only the batch shell gets it (the Ray steps keep running while the driver checkpoints).
        lines.append(f"--signal=B:USR1@{opts.signal_time}")
    # %x = job name, %j = job id; the directory must exist at submission (memento-launch creates it).
    lines.append(f"--output={log_dir}/%x-%j.out")
    lines += opts.sbatch_args
    return "\n".join(f"#SBATCH {line}" for line in lines)


def _quote_words(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def shared_dir_of(opts: SlurmOptions, driver_cmd: list[str]) -> str | None:
    """The directory checked for shared visibility: ``--shared-dir``, else the driver's ``output_dir=``."""
    return opts.shared_dir or driver_override(driver_cmd, "output_dir") or None


def render_sbatch_script(
    opts: SlurmOptions, driver_cmd: list[str], *, command_line: str | None = None, cwd: str | None = None
) -> str:
    """The sbatch script for ``driver_cmd`` on the cluster ``opts`` describes.

    Relative paths (log directory, checked directory, Ray temp dir) are made absolute against
    ``cwd`` (default: the current directory), which is also where sbatch starts the script.

    Raises:
        ConfigError: a bad option (see :meth:`SlurmOptions.validate`) or an empty driver command.
    """
    opts.validate()
    if not driver_cmd:
        raise ConfigError(
            "no driver command: put it after --, e.g. memento-launch slurm --nodes 2 -- memento-train recipe=NAME"
        )
    base = cwd or os.getcwd()

    def absolute(path: str | None) -> str:
        return os.path.normpath(os.path.join(base, path)) if path else ""

    log_dir = absolute(opts.log_dir)
    env_defaults = "\n".join(f'export {k}="${{{k}:-{v}}}"' for k, v in DEFAULT_ENV.items())
    env_overrides = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in opts.env.items()) or "# (none)"
    with open(TEMPLATE) as f:
        template = f.read()
    return render_template(
        template,
        COMMAND_LINE=(command_line or "memento-launch slurm ...").replace("\n", " "),
        SBATCH_DIRECTIVES=_directives(opts, log_dir),
        REQUEUE=int(opts.requeue),
        NUM_NODES=opts.nodes,
        GPUS_PER_NODE=opts.gpus_per_node,
        CPUS_PER_NODE=opts.cpus_per_node or "",
        RAY_PORT=opts.ray_port,
        DASHBOARD_PORT=opts.dashboard_port,
        WAIT_TIMEOUT=opts.wait_timeout,
        STOP_GRACE=opts.stop_grace,
        LOG_DIR=shlex.quote(log_dir),
        SHARED_DIR=shlex.quote(absolute(shared_dir_of(opts, driver_cmd))),
        PYTHON=shlex.quote(opts.python),
        RAY_TEMP_DIR=shlex.quote(absolute(opts.ray_temp_dir)),
        RAY_START_ARGS=_quote_words(opts.ray_start_args),
        RAY_HEAD_ARGS=_quote_words(opts.ray_head_args),
        DRIVER_CMD=_quote_words(driver_cmd),
        ENV_DEFAULTS=env_defaults,
        ENV_OVERRIDES=env_overrides,
        SETUP="\n".join(opts.setup),
    )


def render_template(template: str, **values) -> str:
    """Plain substitution: each ``#@NAME`` line becomes ``values[NAME]`` (several lines, or none when
    empty) and each ``__NAME__`` word ``str(values[NAME])``. Every placeholder must get a value and
    every value must be used, so a renamed placeholder cannot silently render as itself."""
    wanted = {block or word for block, word in _PLACEHOLDER.findall(template)}
    if wanted != set(values):
        raise KeyError(f"template placeholders {sorted(wanted)} != values {sorted(values)}")

    def substitute(m: re.Match) -> str:
        if m.group(1):
            text = str(values[m.group(1)])
            return text + "\n" if text else ""
        return str(values[m.group(2)])

    return _PLACEHOLDER.sub(substitute, template)


def submit(script_path: str, sbatch: str = "sbatch") -> str:
    """Submit ``script_path`` with ``sbatch --parsable``; return the job id.

    Raises:
        RuntimeError: sbatch is missing or rejected the script (its message is included).
    """
    try:
        proc = subprocess.run([sbatch, "--parsable", script_path], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise RuntimeError(
            f"{sbatch!r} was not found on PATH: run memento-launch on a SLURM login node, or "
            f"use --dry-run to print the script and submit it yourself"
        ) from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{sbatch} did not answer within 120 s; is the SLURM controller reachable?") from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"sbatch rejected {script_path} (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id:
        raise RuntimeError(f"sbatch printed no job id for {script_path}: {proc.stdout!r} {proc.stderr!r}")
    return job_id
