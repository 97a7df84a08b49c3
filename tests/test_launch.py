"""memento-launch: the sbatch script (rendering, shellcheck, bring-up on a stand-in SLURM) and Ray Jobs.

The end-to-end tests run the rendered script with the stand-in ``srun``/``scontrol`` of
``tests/fake_slurm``: every "node" is a local ``ray start`` (same IP, its own ports, a private
``--temp-dir``), so a 2-node Ray cluster forms on this machine. Each test kills exactly the processes
it started (its session, or a command line naming its private temp dir): never ``ray stop``, which
would also stop other people's Ray on a shared machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from memento_train.config.errors import ConfigError
from memento_train.launch import DEFAULT_ENV, parse_env_assignments
from memento_train.launch.cli import main, prepare_driver_command
from memento_train.launch.ray_job import RayJobOptions, build_job_request, submit_and_stream
from memento_train.launch.slurm import TEMPLATE, SlurmOptions, render_sbatch_script, render_template

FAKE_SLURM = Path(__file__).parent / "fake_slurm"
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _procs_of(session: int | None, marker: str) -> list[int]:
    """Pids in ``session`` or whose command line mentions ``marker`` (never this process)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        if (session is not None and int(fields[3]) == session) or marker in cmdline:
            found.append(int(entry))
    return found


def _wait_gone(session: int | None, marker: str, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while (left := _procs_of(session, marker)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def _kill_all(session: int | None, marker: str) -> None:
    for pid in _procs_of(session, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def short_tmp():
    """A private temp dir with a short path (Ray's Unix sockets live under --temp-dir)."""
    path = tempfile.mkdtemp(prefix="mlt-", dir="/tmp")
    yield Path(path)
    _kill_all(None, path)
    shutil.rmtree(path, ignore_errors=True)


def signal_once_running(command_line: str, sig: int):
    """An ``on_start`` for :func:`run_stand_in_job`: send ``sig`` to the batch shell once a process
    whose command line contains ``command_line`` (the driver) runs."""

    def send(proc):
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if _procs_of(None, command_line):
                time.sleep(1)
                proc.send_signal(sig)
                return
            time.sleep(0.5)

    return send


def stand_in_options(tmp: Path, **overrides) -> SlurmOptions:
    """Options for a 2-node stand-in cluster on this machine: free ports, private temp dir."""
    kw = dict(
        nodes=2,
        cpus_per_node=2,
        python=sys.executable,
        ray_port=free_port(),
        dashboard_port=free_port(),
        ray_head_args=[f"--ray-client-server-port={free_port()}"],
        ray_temp_dir=str(tmp / "ray"),
        log_dir=str(tmp / "logs"),
        shared_dir=str(tmp / "out"),
        wait_timeout=90,
        stop_grace=10,
    )
    kw.update(overrides)
    return SlurmOptions(**kw)


def run_stand_in_job(
    tmp: Path, opts: SlurmOptions, driver: list[str], *, env: dict | None = None, timeout: float = 240, on_start=None
) -> tuple[subprocess.CompletedProcess, float]:
    """Render the script and run it as SLURM would on nodes node-0,node-1 (stand-in srun/scontrol).

    Returns the completed process and its duration; asserts that teardown left no process behind.
    """
    script = tmp / "job.sbatch"
    script.write_text(render_sbatch_script(opts, driver))
    job_env = {
        **os.environ,
        "PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "1001",
        "SLURM_JOB_NODELIST": "node-0,node-1",
        "RAY_USAGE_STATS_ENABLED": "0",
        **(env or {}),
    }
    # Neither an outer RAY_ADDRESS nor another auth setup of this machine may leak into the job.
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        if key not in (env or {}):
            job_env.pop(key, None)
    start = time.time()
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=tmp,
        env=job_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        if on_start:
            on_start(proc)
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_all(proc.pid, str(tmp))
        out, err = proc.communicate()
        raise AssertionError(f"the job hung for {timeout} s:\n{out[-3000:]}\n{err[-3000:]}") from None
    finally:
        leftovers = _wait_gone(proc.pid, str(tmp), timeout=20)
        _kill_all(proc.pid, str(tmp))
    duration = time.time() - start
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert not leftovers, f"teardown left processes {leftovers}:\n{out[-2000:]}\n{err[-2000:]}"
    return result, duration


STAND_IN_DRIVER = r"""
import sys, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init(address="auto", logging_level="ERROR")  # RAY_ADDRESS, set by the script
alive = [n for n in ray.nodes() if n["Alive"]]
pg = placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=60)

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

ids = ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
               .remote() for i in range(2)], timeout=60)
print(f"STAND-IN nodes={len(alive)} distinct_task_nodes={len(set(ids))}", flush=True)

import os, time, urllib.error, urllib.request
port = os.environ.get("PROBE_DASHBOARD_PORT")
if port:  # the Jobs API of the job's cluster, without, with a wrong and with the job's token
    def status(token):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/jobs/", headers=headers)
        for _ in range(120):
            try:
                return urllib.request.urlopen(req, timeout=10).status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:  # the dashboard is still starting
                time.sleep(0.5)
    print(f"DASHBOARD no-token={status(None)} wrong-token={status('0' * 64)} "
          f"job-token={status(os.environ['RAY_AUTH_TOKEN'])}", flush=True)
if len(sys.argv) > 1:  # "sleep": keep running until the job is cancelled
    import time
    time.sleep(600)
"""


# ------------------------------------------------------------------------------------------------
# the rendered script
# ------------------------------------------------------------------------------------------------

GPU_OPTS = dict(
    nodes=4,
    gpus_per_node=8,
    partition="gpu",
    time="24:00:00",
    account="proj",
    qos="high",
    requeue=True,
    sbatch_args=["--constraint=h100"],
    env={"NCCL_SOCKET_IFNAME": "ib0", "X": "a b"},
    setup=["module load cuda/12.4", "source .venv/bin/activate"],
    ray_temp_dir="/scratch/ray",
)
DRIVER = ["memento-train", "recipe=qwen3_8b_stage2", "output_dir=/shared/run1", "resume=auto"]


@pytest.mark.parametrize("opts", [SlurmOptions(**GPU_OPTS), SlurmOptions(nodes=1)], ids=["gpu-full", "cpu-minimal"])
def test_rendered_script_is_valid_bash(opts):
    script = render_sbatch_script(opts, DRIVER)
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


NO_SHELLCHECK = pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (Debian: apt-get install -y shellcheck)"
)


@NO_SHELLCHECK
def test_the_script_template_is_a_bash_file_that_passes_shellcheck_as_it_is():
    proc = subprocess.run(["shellcheck", "--shell=bash", TEMPLATE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@NO_SHELLCHECK
@pytest.mark.parametrize("opts", [SlurmOptions(**GPU_OPTS), SlurmOptions(nodes=1)], ids=["gpu-full", "cpu-minimal"])
def test_rendered_script_passes_shellcheck(opts, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(render_sbatch_script(opts, DRIVER))
    proc = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rendering_is_plain_substitution_of_every_placeholder_and_nothing_else():
    template = "#!/bin/bash\nA=__A__\n#@B\nC=(__C__)  # __A__ again\n#@D\nend\n"
    out = render_template(template, A="1", B="line 1\nline 2", C="'x y' __A__", D="")
    assert out == "#!/bin/bash\nA=1\nline 1\nline 2\nC=('x y' __A__)  # 1 again\nend\n"  # values not re-scanned
    with pytest.raises(KeyError, match="placeholders"):
        render_template(template, A="1", B="", C="")
    script = render_sbatch_script(SlurmOptions(**GPU_OPTS), DRIVER)
    assert not re.search(r"__[A-Z_]+__|^#@", script, re.MULTILINE)
    # Outside the placeholders the rendered script is the template, line for line.
    template_lines = set(Path(TEMPLATE).read_text().splitlines())
    rendered = [line for line in script.splitlines() if line in template_lines]
    assert len(rendered) > 0.8 * len(template_lines)


def test_script_requests_the_allocation_and_site_options():
    script = render_sbatch_script(SlurmOptions(**GPU_OPTS), DRIVER, cwd="/home/u/proj")
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    for expected in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=24:00:00",
        "--account=proj",
        "--qos=high",
        "--exclusive",
        "--requeue",
        "--constraint=h100",
        "--output=/home/u/proj/logs/memento-launch/%x-%j.out",
    ):
        assert f"#SBATCH {expected}" in directives, expected
    assert "SHARED_DIR=/shared/run1" in script
    cpu = render_sbatch_script(SlurmOptions(nodes=2), ["python", "x.py"])
    assert "--gpus-per-node" not in "".join(line for line in cpu.splitlines() if line.startswith("#SBATCH"))


def _bash_eval(script: str, snippet: str, env: dict | None = None) -> str:
    """Run the script's configuration block (everything before the SLURM checks) plus ``snippet``."""
    head = script.split("log() {")[0]
    proc = subprocess.run(
        ["bash", "-c", head + "\n" + snippet],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_driver_command_survives_the_shell_word_for_word():
    driver = ["python", "-c", "print('a b')", "key=$HOME", 'q="x"', "semi;colon", ""]
    script = render_sbatch_script(SlurmOptions(nodes=2), driver)
    out = _bash_eval(script, 'printf "%s\\0" "${DRIVER_CMD[@]}"')
    assert out.split("\0")[:-1] == driver


def test_nccl_defaults_yield_to_the_environment_and_env_option_wins():
    script = render_sbatch_script(SlurmOptions(nodes=2, env={"NCCL_DEBUG": "TRACE", "X": "a b"}), ["true"])
    show = 'echo "$NCCL_DEBUG|$TORCH_NCCL_ASYNC_ERROR_HANDLING|${X:-}|$PYTHONUNBUFFERED"'
    assert _bash_eval(script, show).strip() == "TRACE|1|a b|1"  # --env beats the default
    plain = render_sbatch_script(SlurmOptions(nodes=2), ["true"])
    assert _bash_eval(plain, show).strip() == f"{DEFAULT_ENV['NCCL_DEBUG']}|1||1"
    assert _bash_eval(plain, show, env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}).strip() == "WARN|0||1"


def test_every_job_gets_one_ray_auth_mode_and_a_token():
    script = render_sbatch_script(SlurmOptions(nodes=2), ["true"])
    out = _bash_eval(script, 'echo "$RAY_AUTH_MODE ${#RAY_AUTH_TOKEN} $DASHBOARD_HOST"').split()
    assert out == ["token", "64", "0.0.0.0"]
    # Without authentication the Jobs API (which runs any command) is not offered to the network.
    assert _bash_eval(
        script, 'echo "$RAY_AUTH_MODE ${RAY_AUTH_TOKEN:-none} $DASHBOARD_HOST"', env={"RAY_AUTH_MODE": "disabled"}
    ).split() == ["disabled", "none", "127.0.0.1"]


def test_the_job_gets_the_time_limit_signal_and_requeue_is_explicit():
    directives = lambda script: [line for line in script.splitlines() if line.startswith("#SBATCH ")]  # noqa: E731
    plain = render_sbatch_script(SlurmOptions(nodes=2), ["true"])
    assert "#SBATCH --signal=B:USR1@120" in directives(plain) and "#SBATCH --requeue" not in directives(plain)
    assert _bash_eval(plain, 'echo "$REQUEUE"').strip() == "0"
    requeue = render_sbatch_script(SlurmOptions(nodes=2, requeue=True, signal_time=300), ["true"])
    assert {"#SBATCH --signal=B:USR1@300", "#SBATCH --requeue"} <= set(directives(requeue))
    assert _bash_eval(requeue, 'echo "$REQUEUE"').strip() == "1"
    assert not any(
        "--signal" in d for d in directives(render_sbatch_script(SlurmOptions(nodes=2, signal_time=0), ["true"]))
    )


def test_secrets_are_refused_where_the_script_or_its_log_would_show_them(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(["slurm", "--nodes", "2", "--dry-run", "--env", "WANDB_API_KEY=abc123secret", "--", "memento-train"]) == 2
    )
    assert "export WANDB_API_KEY in this shell" in capsys.readouterr().err
    assert main(["slurm", "--nodes", "2", "--dry-run", "--", "memento-train", "cluster.env.HF_TOKEN=hf_abc123"]) == 2
    err = capsys.readouterr().err
    assert "cluster.secret_env=[HF_TOKEN]" in err and "hf_abc123" not in err
    assert (
        main(
            [
                "ray",
                "--address",
                "http://h:8265",
                "--no-working-dir",
                "--dry-run",
                "--env",
                "WANDB_API_KEY=abc123secret",
                "--",
                "memento-rl",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "abc123secret" not in out and json.loads(out)["runtime_env"]["env_vars"]["WANDB_API_KEY"] == "<redacted>"
    assert "WANDB_API_KEY travel in the job's runtime_env" in err


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--nodes", "0"], "--nodes"),
        (["--nodes", "2", "--partition", "a b"], "--partition"),
        (["--nodes", "2", "--ray-port", "7000", "--dashboard-port", "7000"], "--dashboard-port"),
        (["--nodes", "2", "--sbatch-arg", "constraint=h100"], "--sbatch-arg"),
        (["--nodes", "2", "--env", "1BAD=x"], "--env"),
        (["--nodes", "2", "--wait-timeout", "0"], "--wait-timeout"),
    ],
)
def test_bad_slurm_option_is_an_error_naming_it(argv, flag, capsys):
    assert main(["slurm", *argv, "--dry-run", "--", "memento-train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memento-launch: configuration error:") and flag in err


def test_missing_driver_command_says_where_to_put_it(capsys):
    assert main(["slurm", "--nodes", "2", "--dry-run"]) == 2
    assert "after --" in capsys.readouterr().err


def test_memento_driver_joins_the_cluster_with_one_worker_per_gpu_and_absolute_output_dir():
    cmd, notes = prepare_driver_command(
        ["memento-train", "recipe=x", "output_dir=runs/a"], num_workers=16, cwd="/home/u/proj"
    )
    assert cmd == [
        "memento-train",
        "recipe=x",
        "output_dir=/home/u/proj/runs/a",
        "cluster.address=auto",
        "cluster.num_workers=16",
    ]
    assert len(notes) == 3


def test_driver_values_given_by_the_user_are_kept():
    given = ["memento-rl", "cluster.address=ray://h:10001", "cluster.num_workers=3", "output_dir=/abs"]
    assert prepare_driver_command(given, num_workers=16) == (given, [])
    other = ["python", "train.py", "output_dir=rel"]
    assert prepare_driver_command(other, num_workers=16) == (other, [])


def test_submit_writes_the_script_and_prints_the_job_id(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE_DIR", str(tmp_path / "slurm"))
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "--nodes", "2", "--gpus-per-node", "4", "--", "memento-train", "output_dir=/s/r"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "4242"
    submitted = (tmp_path / "slurm" / "job-4242.sh").read_text()
    assert "#SBATCH --gpus-per-node=4" in submitted and "cluster.num_workers=8" in submitted
    assert (tmp_path / "logs" / "memento-launch").is_dir()  # sbatch needs the --output directory
    assert "logs/memento-launch/4242/" in err


def test_without_sbatch_the_error_suggests_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "--nodes", "2", "--", "python", "x.py"]) == 1
    assert "--dry-run" in capsys.readouterr().err


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "--nodes", "2", "--dry-run", "--", "python", "x.py"]) == 0
    assert capsys.readouterr().out.startswith("#!/usr/bin/env bash")
    assert not (tmp_path / "logs").exists()


# ------------------------------------------------------------------------------------------------
# bring-up on the stand-in SLURM (2 local "nodes")
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bringup_forms_a_two_node_cluster_runs_the_driver_and_tears_down(short_tmp):
    driver = short_tmp / "driver.py"
    driver.write_text(STAND_IN_DRIVER)
    opts = stand_in_options(short_tmp)
    proc, seconds = run_stand_in_job(
        short_tmp, opts, [sys.executable, str(driver)], env={"PROBE_DASHBOARD_PORT": str(opts.dashboard_port)}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "STAND-IN nodes=2 distinct_task_nodes=2" in proc.stdout
    # The Jobs API (it runs any command on the cluster) answers only with the job's token.
    assert "DASHBOARD no-token=401 wrong-token=403 job-token=200" in proc.stdout
    token_file = short_tmp / "logs" / "1001" / "ray_auth_token"
    assert token_file.stat().st_mode & 0o077 == 0 and len(token_file.read_text()) == 64
    assert "all 2 node(s) joined" in proc.stdout
    logs = short_tmp / "logs" / "1001"
    assert (logs / "ray-head-node-0.log").stat().st_size > 0
    assert (logs / "ray-worker-node-1.log").stat().st_size > 0
    assert "visible from all 2 node(s)" in proc.stdout
    print(f"bring-up + driver + teardown: {seconds:.1f} s")


@pytest.mark.slow
def test_node_that_never_joins_fails_at_the_deadline_naming_it(short_tmp):
    marker = short_tmp / "driver-ran"
    opts = stand_in_options(short_tmp, wait_timeout=15)
    proc, seconds = run_stand_in_job(
        short_tmp, opts, ["touch", str(marker)], env={"FAKE_SLURM_RAY_HANGS_ON": "node-1"}, timeout=150
    )
    assert proc.returncode == 1
    assert "never joined: node-1" in proc.stderr and "--wait-timeout" in proc.stderr
    assert "ray-worker-node-1.log" in proc.stderr
    assert not marker.exists(), "the driver must not run on an incomplete cluster"
    assert seconds < 15 + 60, f"took {seconds:.0f} s"


@pytest.mark.slow
def test_node_whose_ray_start_fails_is_reported_before_the_deadline(short_tmp):
    opts = stand_in_options(short_tmp, wait_timeout=300)
    proc, seconds = run_stand_in_job(short_tmp, opts, ["true"], env={"FAKE_SLURM_RAY_FAILS_ON": "node-1"})
    assert proc.returncode == 1
    assert "`ray start` exited on node-1" in proc.stderr
    assert seconds < 120, f"took {seconds:.0f} s: it waited for the deadline"


@pytest.mark.slow
def test_cancelled_job_stops_the_driver_and_ray(short_tmp):
    driver = short_tmp / "driver.py"
    driver.write_text(STAND_IN_DRIVER)

    # Like scancel or preemption: SIGTERM to the batch shell while the driver is running.
    proc, _ = run_stand_in_job(
        short_tmp,
        stand_in_options(short_tmp),
        [sys.executable, str(driver), "sleep"],
        on_start=signal_once_running(f"{driver} sleep", signal.SIGTERM),
    )
    # The driver gets the SIGTERM (a memento driver would checkpoint); this one, a plain Ray driver, exits
    # through Ray's SIGTERM handler (status 1 or 15, depending on where it was) and the job with it.
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "received SIGTERM: asking the driver to checkpoint and stop" in proc.stdout
    assert f"driver exited with status {proc.returncode}" in proc.stdout
    assert "stopping Ray on" in proc.stdout  # and run_stand_in_job found no process left behind


PREEMPTIBLE_DRIVER = r"""
import signal, sys, time
from pathlib import Path

def stop(signum, frame):  # what memento-train / memento-rl do: checkpoint, then exit 75
    Path(sys.argv[1]).write_text(signal.Signals(signum).name)
    sys.exit(75)

signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
print("PREEMPTIBLE running", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)], ids=["USR1", "TERM"])
def test_the_time_limit_signal_reaches_the_driver_and_a_requeue_job_requeues_itself(short_tmp, sig, requeued):
    driver, marker = short_tmp / "driver.py", short_tmp / "driver-got"
    driver.write_text(PREEMPTIBLE_DRIVER)

    # SLURM: --signal=B:USR1@N before the time limit; SIGTERM: scancel.
    opts = stand_in_options(short_tmp, requeue=True)
    proc, _ = run_stand_in_job(
        short_tmp,
        opts,
        [sys.executable, str(driver), str(marker)],
        env={"FAKE_SLURM_STATE_DIR": str(short_tmp / "slurm")},
        on_start=signal_once_running(f"{driver} {marker}", sig),
    )
    assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert marker.read_text() == sig.name  # the batch shell forwarded the signal to the driver
    assert f"driver checkpointed and stopped on {sig.name}" in proc.stdout
    requeue_file = short_tmp / "slurm" / "requeued"
    # Only the time-limit signal requeues: a cancelled job (SIGTERM) must stay cancelled.
    assert (requeue_file.read_text().split() == ["1001"]) if requeued else not requeue_file.exists()
    assert ("requeued job 1001" in proc.stdout) == requeued


def _sft_cli_missing() -> str | None:
    try:
        import memento_train.sft.cli  # noqa: F401
    except ImportError as exc:
        return f"memento_train.sft.cli is not available yet ({exc}): the SFT trainer CLI is still being written"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_sft_cli_missing() is not None, reason=str(_sft_cli_missing()))
def test_memento_train_runs_with_one_worker_per_node_on_the_two_node_cluster(short_tmp):
    from sft_runs import SMALL  # the trainer tests' tiny model and data

    exe = shutil.which("memento-train")
    train = [exe] if exe else [sys.executable, "-m", "memento_train.sft.cli"]
    out = short_tmp / "out"
    # One stage of the tiny recipe (the embedded default runs two: ~2 min more on 2 cores).
    small = [a for a in SMALL if not a.startswith("cluster.")]
    driver = [
        *train,
        "recipe=tiny_stage1",
        *small,
        "cluster.address=auto",
        "cluster.num_workers=2",
        "cluster.placement_strategy=STRICT_SPREAD",
        "train.max_steps=2",
        "logger=none",
        f"output_dir={out}",
    ]
    proc, seconds = run_stand_in_job(short_tmp, stand_in_options(short_tmp), driver, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "on 2 worker(s)" in proc.stdout + proc.stderr
    assert list(out.rglob("checkpoints/step_00000002")), f"no step-2 checkpoint under {out}"
    print(f"memento-train on the 2-node stand-in cluster: {seconds:.1f} s")


# ------------------------------------------------------------------------------------------------
# Ray Jobs API
# ------------------------------------------------------------------------------------------------


def test_job_request_carries_entrypoint_working_dir_and_env(tmp_path):
    opts = RayJobOptions(
        address="http://head:8265",
        working_dir=str(tmp_path),
        excludes=["data/"],
        env={"NCCL_DEBUG": "INFO", "WANDB_MODE": "offline"},
        runtime_env={"pip": ["x"], "env_vars": {"A": "1", "NCCL_DEBUG": "TRACE"}},
        submission_id="run-1",
        entrypoint_num_gpus=0,
    )
    req = build_job_request(opts, ["memento-rl", "recipe=grpo", "note=a b"])
    assert req["entrypoint"] == "memento-rl recipe=grpo 'note=a b'"
    env = req["runtime_env"]["env_vars"]
    assert env["NCCL_DEBUG"] == "INFO" and env["WANDB_MODE"] == "offline" and env["A"] == "1"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert req["runtime_env"]["working_dir"] == str(tmp_path) and req["runtime_env"]["pip"] == ["x"]
    assert ".git" in req["runtime_env"]["excludes"] and "data/" in req["runtime_env"]["excludes"]
    assert req["submission_id"] == "run-1" and req["entrypoint_num_gpus"] == 0
    no_upload = build_job_request(RayJobOptions(address="https://h", working_dir=None), ["x"])
    assert "working_dir" not in no_upload["runtime_env"] and "excludes" not in no_upload["runtime_env"]


@pytest.mark.parametrize("address", ["head:8265", "ray://head:10001", "http://", "head:6379"])
def test_ray_address_must_be_the_dashboard_url(address):
    with pytest.raises(ConfigError, match="--address"):
        RayJobOptions(address=address, working_dir=None).validate()


def test_ray_dry_run_prints_the_request_and_warns_about_relative_output_dir(capsys, tmp_path):
    rc = main(
        [
            "ray",
            "--address",
            "http://h:8265",
            "--working-dir",
            str(tmp_path),
            "--dry-run",
            "--",
            "memento-rl",
            "recipe=grpo",
            "output_dir=runs/x",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    assert json.loads(out)["entrypoint"] == "memento-rl recipe=grpo output_dir=runs/x cluster.address=auto"
    assert "output_dir=runs/x is relative" in err


class FakeJobClient:
    """Records submit_job and plays back logs and a final status, like JobSubmissionClient."""

    def __init__(self, status="SUCCEEDED", chunks=("line 1\n", "line 2\n"), stream_error=None, message=""):
        self.status, self.chunks, self.stream_error, self.message = status, chunks, stream_error, message
        self.submitted, self.polls = None, 0

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return "raysubmit_1"

    async def tail_job_logs(self, job_id):
        for chunk in self.chunks:
            await asyncio.sleep(0)
            yield chunk
        if self.stream_error:
            raise self.stream_error

    def get_job_status(self, job_id):
        self.polls += 1
        return "RUNNING" if self.stream_error and self.polls < 3 else self.status

    def get_job_info(self, job_id):
        return type("Info", (), {"message": self.message})()


def test_streams_logs_then_returns_zero_on_success(capsys):
    client = FakeJobClient()
    assert submit_and_stream(client, {"entrypoint": "x"}) == 0
    out, err = capsys.readouterr()
    assert out == "line 1\nline 2\n" and "succeeded" in err and client.submitted == {"entrypoint": "x"}


def test_failed_job_returns_one_with_rays_message(capsys):
    assert submit_and_stream(FakeJobClient(status="FAILED", message="exit code 3"), {"entrypoint": "x"}) == 1
    assert "failed: exit code 3" in capsys.readouterr().err


def test_dropped_log_stream_falls_back_to_polling_the_status(capsys):
    client = FakeJobClient(stream_error=ConnectionError("websocket closed"))
    assert submit_and_stream(client, {"entrypoint": "x"}, poll_s=0.01) == 0
    assert client.polls >= 3 and "log stream ended early" in capsys.readouterr().err


def test_no_wait_prints_the_job_id_only(capsys):
    client = FakeJobClient()
    assert submit_and_stream(client, {"entrypoint": "x"}, wait=False) == 0
    assert capsys.readouterr().out == "raysubmit_1\n" and client.polls == 0


def test_env_assignments_need_a_valid_name():
    assert parse_env_assignments(["A=1", "B=x=y", "A=2"]) == {"A": "2", "B": "x=y"}
    with pytest.raises(ConfigError, match="--env"):
        parse_env_assignments(["NOEQUALS"])


@pytest.fixture(scope="module")
def local_ray_dashboard():
    """A local one-node Ray head with the dashboard (Jobs API) on free ports and a private temp dir."""
    tmp = tempfile.mkdtemp(prefix="mlj-", dir="/tmp")
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "ab" * 32}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=1",
            "--num-gpus=0",
            f"--temp-dir={tmp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # it answered (401 without the auth token): it is up
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    pytest.fail(f"local Ray head with dashboard did not come up (exit {head.poll()})")
                time.sleep(0.5)
        yield url, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _kill_all(head.pid, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_runs_with_working_dir_and_env_and_streams_its_output(local_ray_dashboard, tmp_path):
    url, env = local_ray_dashboard
    (tmp_path / "job.py").write_text("import os\nprint('JOB', os.environ['GREETING'], open('data.txt').read())\n")
    (tmp_path / "data.txt").write_text("from-working-dir")
    cmd = [
        sys.executable,
        "-m",
        "memento_train.launch.cli",
        "ray",
        "--address",
        url,
        "--working-dir",
        str(tmp_path),
        "--env",
        "GREETING=hello",
        "--",
        "python",
        "job.py",
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "JOB hello from-working-dir" in proc.stdout
    assert "succeeded" in proc.stderr


@pytest.mark.slow
def test_failing_ray_job_exits_one(local_ray_dashboard, tmp_path):
    url, env = local_ray_dashboard
    cmd = [
        sys.executable,
        "-m",
        "memento_train.launch.cli",
        "ray",
        "--address",
        url,
        "--no-working-dir",
        "--",
        "python",
        "-c",
        "import sys; print('about to fail'); sys.exit(3)",
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "about to fail" in proc.stdout and "failed" in proc.stderr


def test_submission_waits_while_the_head_has_no_job_agent_yet(monkeypatch):
    from memento_train.launch import ray_job

    class Client:
        calls = 0

        def submit_job(self, **request):
            Client.calls += 1
            if Client.calls < 3:
                raise RuntimeError(
                    "Request failed with status code 500: No available agent to submit job, please try again later.."
                )
            return "raysubmit_1"

    monkeypatch.setattr(ray_job.time, "sleep", lambda s: None)
    assert ray_job._submit_when_agent_ready(Client(), {}) == "raysubmit_1" and Client.calls == 3

    class Broken:
        def submit_job(self, **request):
            raise RuntimeError("Request failed with status code 400: bad entrypoint")

    with pytest.raises(RuntimeError, match="bad entrypoint"):
        ray_job._submit_when_agent_ready(Broken(), {})
