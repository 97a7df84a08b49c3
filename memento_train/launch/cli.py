"""``memento-launch``: run ``memento-train`` / ``memento-rl`` on a multi-node cluster.

Usage::

    memento-launch slurm --nodes N [--gpus-per-node G] [--partition P --time T --account A ...] \\
        [--dry-run] -- memento-train recipe=NAME output_dir=/shared/run1
    memento-launch ray --address http://HEAD:8265 [--working-dir .] [--env K=V ...] \\
        -- memento-rl recipe=grpo output_dir=/shared/run1

``slurm`` renders an sbatch script (Ray head + workers over the allocation, wait for every node,
driver, teardown) and submits it with ``sbatch`` (``--dry-run`` prints it instead). ``ray`` submits
through the Ray Jobs API of an existing cluster and streams the logs. See ``docs/multinode.md``.

Before anything is submitted, a ``memento-train`` / ``memento-rl`` driver's ``recipe=`` and
``key=value`` options are built into its config tree with the rules of every memento CLI (unknown
keys, choices, types; :func:`check_driver_options`), so a typo fails here, not after the queue wait.

Exit codes: 0 success, 2 bad options (``memento-launch: configuration error: ...`` on stderr, the form
of every memento CLI), 1 a failure (sbatch rejected the script, the Ray job failed), 130 interrupted
while following a Ray job.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from memento_train.config.errors import ConfigError, FlagParser, report_config_error
from memento_train.faults.secrets import is_secret, redact_env
from memento_train.launch import check_secrets_not_inline, driver_override, parse_env_assignments

PROG = "memento-launch"

# Driver CLIs of this project: they take key=value overrides, so the launcher can fill in how to
# reach the cluster. Other commands are run exactly as given.
MEMENTO_DRIVERS = ("memento-train", "memento-rl")


def _parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog=PROG,
        description="Run memento-train / memento-rl on a multi-node SLURM or Ray cluster. "
        "The driver command goes after --. Guide: docs/multinode.md",
    )
    sub = parser.add_subparsers(dest="backend", required=True, metavar="{slurm,ray}")

    s = sub.add_parser(
        "slurm",
        help="render (and submit) an sbatch script: Ray cluster + driver",
        description="Render an sbatch script that starts a Ray head on the first node and Ray "
        "workers on the others, waits for all of them, runs the driver command "
        "and tears Ray down; submit it with sbatch (or print it with --dry-run).",
    )
    s.add_argument("--nodes", "-N", type=int, required=True, help="number of nodes")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU-only nodes; default 0)")
    s.add_argument("--cpus-per-node", type=int, help="CPUs per node for SLURM and Ray (default: what SLURM gives)")
    s.add_argument("--partition", "-p", help="SLURM partition")
    s.add_argument("--time", "-t", help="time limit, e.g. 24:00:00")
    s.add_argument("--account", "-A", help="SLURM account")
    s.add_argument("--qos", help="SLURM QOS")
    s.add_argument("--job-name", "-J", default="memento", help="job name (default memento)")
    s.add_argument(
        "--exclusive", action=argparse.BooleanOptionalAction, default=True, help="request whole nodes (default on)"
    )
    s.add_argument(
        "--requeue",
        action="store_true",
        help="let SLURM requeue the job after preemption or node failure, and requeue it when the "
        "driver stopped for the time-limit signal (the driver resumes with resume=auto)",
    )
    s.add_argument(
        "--signal-time",
        type=int,
        default=120,
        metavar="SECONDS",
        help="SLURM sends SIGUSR1 this long before the time limit (#SBATCH --signal=B:USR1@N); the "
        "driver checkpoints and stops (exit 75); 0 = no signal (default 120)",
    )
    s.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH line, e.g. --sbatch-arg=--constraint=h100 (repeatable)",
    )
    s.add_argument(
        "--log-dir",
        default="logs/memento-launch",
        help="batch log and per-node Ray logs, on shared storage (default logs/memento-launch)",
    )
    s.add_argument(
        "--shared-dir", help="directory that must be visible from every node (default: the driver's output_dir=)"
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the driver and every Ray node (repeatable; overrides the NCCL defaults)",
    )
    s.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run first, e.g. 'source .venv/bin/activate' (repeatable)",
    )
    s.add_argument("--python", default="python", help="Python with ray installed on the nodes (default python)")
    s.add_argument("--ray-port", type=int, default=6379, help="GCS port of the head (default 6379)")
    s.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / Jobs API port (default 8265)")
    s.add_argument("--ray-temp-dir", help="Ray --temp-dir on every node (default Ray's /tmp/ray)")
    s.add_argument(
        "--ray-start-args",
        default="",
        metavar="ARGS",
        help="extra `ray start` arguments for every node, one shell-quoted string",
    )
    s.add_argument("--ray-head-args", default="", metavar="ARGS", help="extra `ray start` arguments for the head")
    s.add_argument(
        "--wait-timeout",
        type=int,
        default=600,
        help="seconds for every node to join before the job fails naming the missing ones (default 600)",
    )
    s.add_argument(
        "--stop-grace", type=int, default=30, help="seconds between SIGTERM and SIGKILL when stopping Ray (default 30)"
    )
    s.add_argument(
        "--script", metavar="PATH", help="where to write the script (default LOG_DIR/JOB_NAME-TIMESTAMP.sbatch)"
    )
    s.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")

    r = sub.add_parser(
        "ray",
        help="submit to an existing Ray cluster through the Jobs API",
        description="Submit the driver command to an existing Ray cluster (KubeRay, VMs, a "
        "hand-started cluster) through the Ray Jobs API and stream its logs.",
    )
    r.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        help="the cluster's dashboard URL, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)",
    )
    r.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir (default .)")
    r.add_argument(
        "--no-working-dir",
        action="store_true",
        help="upload nothing: the image or a shared filesystem already has the code",
    )
    r.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="extra runtime_env excludes pattern (repeatable)",
    )
    r.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the driver and all its actors (repeatable)",
    )
    r.add_argument(
        "--runtime-env-json",
        default="{}",
        metavar="JSON",
        help='extra runtime_env keys, e.g. \'{"pip": ["some-package"]}\'',
    )
    r.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    r.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver process")
    r.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver process")
    r.add_argument("--no-wait", action="store_true", help="print the job id and return instead of streaming logs")
    r.add_argument("--dry-run", action="store_true", help="print the submission request as JSON and exit")
    return parser


def split_driver_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[launcher options..., "--", driver...]`` -> (launcher options, driver command)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def prepare_driver_command(
    cmd: list[str], *, num_workers: int | None = None, cwd: str | None = None, absolute_output_dir: bool = True
) -> tuple[list[str], list[str]]:
    """Fill in what a memento driver needs to use the launched cluster; return (command, notes).

    For ``memento-train`` / ``memento-rl`` only, and never over a value the user gave:
    ``cluster.address=auto`` (without it the driver would start a private one-node Ray),
    ``cluster.num_workers=num_workers`` (one worker per GPU of the allocation) and an absolute
    ``output_dir`` (Ray workers do not share the submitting shell's working directory).
    """
    cmd = list(cmd)
    notes: list[str] = []
    if not cmd or os.path.basename(cmd[0]) not in MEMENTO_DRIVERS:
        return cmd, notes
    if driver_override(cmd, "cluster.address") is None:
        cmd.append("cluster.address=auto")
        notes.append("added cluster.address=auto (the driver joins the launched Ray cluster)")
    if num_workers and driver_override(cmd, "cluster.num_workers") is None:
        cmd.append(f"cluster.num_workers={num_workers}")
        notes.append(f"added cluster.num_workers={num_workers} (one worker per GPU)")
    out = driver_override(cmd, "output_dir")
    if absolute_output_dir and out and not os.path.isabs(out):
        absolute = os.path.normpath(os.path.join(cwd or os.getcwd(), out))
        cmd = [f"output_dir={absolute}" if arg.startswith("output_dir=") else arg for arg in cmd]
        notes.append(f"output_dir={out} made absolute: output_dir={absolute}")
    return cmd, notes


def check_driver_options(cmd: list[str]) -> None:
    """Build a memento driver's config tree from its ``recipe=`` and ``key=value`` arguments (each
    stage's, for a pipeline recipe): :class:`ConfigError` on an unknown key, a bad choice or a value
    of the wrong type. Nothing that depends on the cluster (paths, checkpoints, GPUs) is checked:
    the driver validates that when it starts. Other commands and driver subcommands pass unchecked."""
    if not cmd or os.path.basename(cmd[0]) not in MEMENTO_DRIVERS:
        return
    args = cmd[1:]
    if args and "=" not in args[0] and args[0] != "show":  # export, plan, recipes, help...
        return
    from memento_train.config.tree import build
    from memento_train.recipes import split_recipe_arg

    recipe, overrides = split_recipe_arg(args[1:] if args and args[0] == "show" else args)
    if os.path.basename(cmd[0]) == "memento-rl":
        from memento_train.rl.config import RLConfig, config_tree

        build(RLConfig, config_tree(recipe, overrides))
        return
    from memento_train.sft.config import SFTConfig, config_tree

    tree = config_tree(recipe, overrides)
    stages = tree.pop("stages", None)
    for stage_tree in [config_tree(name, overrides) for name in stages] if stages else [tree]:
        build(SFTConfig, stage_tree)


def _run_slurm(args: argparse.Namespace, driver: list[str], argv: list[str]) -> int:
    from memento_train.launch.slurm import SlurmOptions, render_sbatch_script, submit

    opts = SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_node=args.cpus_per_node,
        partition=args.partition,
        time=args.time,
        account=args.account,
        qos=args.qos,
        job_name=args.job_name,
        exclusive=args.exclusive,
        requeue=args.requeue,
        signal_time=args.signal_time,
        sbatch_args=args.sbatch_arg,
        log_dir=args.log_dir,
        shared_dir=args.shared_dir,
        env=parse_env_assignments(args.env),
        setup=args.setup,
        python=args.python,
        ray_port=args.ray_port,
        dashboard_port=args.dashboard_port,
        ray_temp_dir=args.ray_temp_dir,
        ray_start_args=shlex.split(args.ray_start_args),
        ray_head_args=shlex.split(args.ray_head_args),
        wait_timeout=args.wait_timeout,
        stop_grace=args.stop_grace,
    ).validate()
    check_secrets_not_inline(driver, opts.env)
    workers = args.nodes * args.gpus_per_node if args.gpus_per_node else None
    driver, notes = prepare_driver_command(driver, num_workers=workers)
    check_driver_options(driver)
    if args.requeue and driver_override(driver, "resume") == "never":
        notes.append("--requeue with resume=never: a requeued job starts from scratch; use resume=auto")
    if driver_override(driver, "output_dir") is None and not args.shared_dir:
        notes.append(
            "no output_dir= in the driver: checkpoints go to the trainer's default and shared storage is not checked"
        )
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    script = render_sbatch_script(opts, driver, command_line=shlex.join([PROG, *argv]))
    if args.dry_run and not args.script:
        sys.stdout.write(script)
        return 0
    log_dir = os.path.abspath(args.log_dir)
    path = args.script or os.path.join(log_dir, f"{args.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o700)  # the job's own script: readable by you only
    if args.dry_run:
        sys.stdout.write(script)
        print(f"{PROG}: wrote {path}", file=sys.stderr)
        return 0
    # sbatch opens --output before the job starts: the log directory must exist now.
    os.makedirs(log_dir, exist_ok=True)
    job_id = submit(path)
    print(job_id)
    print(
        f"{PROG}: submitted {path} as job {job_id}; batch log {log_dir}/{args.job_name}-{job_id}.out, "
        f"Ray logs per node in {log_dir}/{job_id}/",
        file=sys.stderr,
    )
    return 0


def _run_ray(args: argparse.Namespace, driver: list[str]) -> int:
    from memento_train.launch.ray_job import (
        RayJobOptions,
        build_job_request,
        make_client,
        output_dir_warning,
        submit_and_stream,
    )

    if not args.address:
        raise ConfigError(
            "--address is required: the cluster's dashboard URL, e.g. --address http://HEAD:8265 "
            "(or set RAY_API_SERVER_ADDRESS)"
        )
    try:
        extra = json.loads(args.runtime_env_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f'--runtime-env-json is not valid JSON ({exc}); e.g. \'{{"pip": ["pkg"]}}\'') from None
    opts = RayJobOptions(
        address=args.address,
        working_dir=None if args.no_working_dir else args.working_dir,
        excludes=args.exclude,
        env=parse_env_assignments(args.env),
        runtime_env=extra,
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        wait=not args.no_wait,
    )
    check_secrets_not_inline(driver, env_option=None)
    # On a Ray cluster the job's cwd is a temporary copy of the working dir: leave output_dir alone
    # (making it absolute here would name a path on this machine) and warn instead.
    driver, notes = prepare_driver_command(driver, absolute_output_dir=False)
    check_driver_options(driver)
    warning = output_dir_warning(driver)
    if warning and driver and os.path.basename(driver[0]) in MEMENTO_DRIVERS:
        notes.append(warning)
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    request = build_job_request(opts, driver)
    secret = sorted(k for k in request["runtime_env"].get("env_vars", {}) if is_secret(k))
    if secret:
        print(
            f"{PROG}: note: {', '.join(secret)} travel in the job's runtime_env: anyone holding the cluster's "
            f"Ray token can read them in the dashboard",
            file=sys.stderr,
        )
    if args.dry_run:
        env_vars = redact_env(request["runtime_env"].get("env_vars", {}))
        shown = {**request, "runtime_env": {**request["runtime_env"], "env_vars": env_vars}}
        print(json.dumps({"address": args.address, **shown}, indent=2))
        return 0
    return submit_and_stream(make_client(args.address), request, address=args.address, wait=opts.wait)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, driver = split_driver_command(argv)
    parser = _parser()
    args = parser.parse_args(options)  # exits 2 with usage on unknown options
    try:
        if not driver:
            raise ConfigError(
                f"no driver command: put it after --, e.g. {PROG} {args.backend} ... -- memento-train recipe=NAME"
            )
        if args.backend == "slurm":
            return _run_slurm(args, driver, argv)
        return _run_ray(args, driver)
    except ConfigError as exc:
        return report_config_error(PROG, exc)
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
