"""Script templates of ``memento-launch``.

Kept as Python strings rather than ``.sh`` files so that they ship with the package without extra
package-data configuration. Placeholders are ``@@{NAME}`` (see :class:`ScriptTemplate`), which cannot
clash with bash's own ``$name`` / ``${name}`` syntax.
"""

from __future__ import annotations

import string


class ScriptTemplate(string.Template):
    """``string.Template`` with ``@@{NAME}`` placeholders (upper case, case-sensitive).

    Bash uses ``$`` everywhere, so the standard delimiter would force escaping half the script;
    ``@@`` never occurs in the scripts we render, and a stray one is an error, not a silent gap.
    """

    delimiter = "@@"
    idpattern = r"[A-Z][A-Z0-9_]*"
    flags = 0  # case-sensitive: only upper-case names are placeholders


# The sbatch script: a Ray cluster over the SLURM allocation, then the driver command against it.
# Values substituted here are already shell-quoted by memento_train.launch.slurm.
SBATCH_TEMPLATE = ScriptTemplate(r"""#!/usr/bin/env bash
# Rendered by memento-launch: a Ray cluster over this SLURM allocation, then the driver command.
#   @@{COMMAND_LINE}
@@{SBATCH_DIRECTIVES}

# Bring-up: a Ray head on the first node and a Ray worker on every other node (one background
# `srun` step per node), a wait until every node (and its GPUs) has registered, the driver command
# against that cluster, and teardown of Ray on every node on exit, failure, cancellation or
# preemption (trap).
set -euo pipefail

NUM_NODES=@@{NUM_NODES}
GPUS_PER_NODE=@@{GPUS_PER_NODE}
CPUS_PER_NODE=@@{CPUS_PER_NODE}  # empty: Ray counts the CPUs of the step itself
RAY_PORT=@@{RAY_PORT}
DASHBOARD_PORT=@@{DASHBOARD_PORT}
WAIT_TIMEOUT=@@{WAIT_TIMEOUT}  # seconds for every node to join (--wait-timeout)
STOP_GRACE=@@{STOP_GRACE}  # seconds between SIGTERM and SIGKILL at teardown
LOG_ROOT=@@{LOG_DIR}
SHARED_DIR=@@{SHARED_DIR}  # the driver's output_dir: must be visible from every node
PYTHON=@@{PYTHON}
RAY_TEMP_DIR=@@{RAY_TEMP_DIR}
RAY_START_ARGS=(@@{RAY_START_ARGS})
RAY_HEAD_ARGS=(@@{RAY_HEAD_ARGS})
DRIVER_CMD=(@@{DRIVER_CMD})
# Each node is labelled with its SLURM name, so a node that never joins can be named.
NODE_LABEL=memento.slurm-node

# NCCL / network defaults. A value already in the environment wins (sbatch exports the submitting
# shell's environment), so `NCCL_DEBUG=INFO memento-launch slurm ...` needs no re-rendering.
@@{ENV_DEFAULTS}
# --env KEY=VALUE: always wins.
@@{ENV_OVERRIDES}

# Ray authentication: one mode for every process of the job. Recent Ray turns token auth on for a
# head that finds ~/.ray/auth_token, but not for nodes or drivers joining by explicit address, which
# then cannot connect. Token mode with no token given gets a fresh token for this job; srun steps and
# the driver inherit it through the environment. RAY_AUTH_MODE=disabled turns auth off.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  RAY_AUTH_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  export RAY_AUTH_TOKEN
fi

# --setup commands (modules, virtualenv): before anything needs python or ray. They are the user's
# own lines, so shellcheck does not follow the files they source.
# shellcheck disable=SC1090,SC1091
{
@@{SETUP}
}

log() { printf '[memento-launch %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'memento-launch: error: %s\n' "$*" >&2; exit 1; }

: "${SLURM_JOB_ID:?run this script with sbatch (SLURM_JOB_ID is not set)}"
: "${SLURM_JOB_NODELIST:?run this script with sbatch (SLURM_JOB_NODELIST is not set)}"

JOB_LOG_DIR="$LOG_ROOT/$SLURM_JOB_ID"
mkdir -p "$JOB_LOG_DIR"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if (( ${#NODES[@]} != NUM_NODES )); then
  die "the allocation has ${#NODES[@]} node(s) (${NODES[*]:-none}), expected $NUM_NODES (--nodes)"
fi
# The batch script runs on the first node of the allocation: the head lives there, so the driver
# started below has a local raylet to attach to.
HEAD_NODE=${NODES[0]}
WORKER_NODES=("${NODES[@]:1}")

if [[ -n "$RAY_TEMP_DIR" ]]; then RAY_START_ARGS+=("--temp-dir=$RAY_TEMP_DIR"); fi
if [[ -n "$CPUS_PER_NODE" ]]; then RAY_START_ARGS+=("--num-cpus=$CPUS_PER_NODE"); fi

# ---------------------------------------------------------------------------------------------
# Teardown. Every Ray node is a background `srun ... ray start --block`; SIGTERM to that srun is
# forwarded to `ray start`, which stops its raylet and workers. `ray stop` is deliberately not
# used: it kills every Ray process of the user on a node, including unrelated ones.
# ---------------------------------------------------------------------------------------------
declare -A RAY_PID=()  # node -> pid of its background srun
DRIVER_PID=""

# shellcheck disable=SC2317  # invoked from a trap
stop_pids() {
  # SIGTERM, then SIGKILL whatever is left after STOP_GRACE seconds: teardown itself never hangs.
  local pid deadline=$((SECONDS + STOP_GRACE))
  kill -TERM "$@" 2>/dev/null || true
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# shellcheck disable=SC2317  # invoked from a trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$DRIVER_PID" ]]; then
    log "stopping the driver (pid $DRIVER_PID)"
    stop_pids "$DRIVER_PID"
  fi
  if (( ${#RAY_PID[@]} > 0 )); then
    log "stopping Ray on ${!RAY_PID[*]}"
    stop_pids "${RAY_PID[@]}"
  fi
  log "exit status $rc; logs in $JOB_LOG_DIR"
  exit "$rc"
}

# shellcheck disable=SC2317  # invoked from a trap
on_signal() {
  # scancel, preemption and the time limit send SIGTERM to the batch shell. The driver runs in
  # the background and is waited for with `wait`, so this handler runs at once, not after it.
  log "received SIG$1: tearing down"
  exit $((128 + $2))
}

trap cleanup EXIT
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT

# ---------------------------------------------------------------------------------------------
# Shared storage: checkpoints must be written where every node (and a requeued job on other
# nodes) can read them. Write a marker from here and look for it from every node.
# ---------------------------------------------------------------------------------------------
check_shared_dir() {
  local marker missing
  if [[ -z "$SHARED_DIR" ]]; then
    log "no output_dir to check (set output_dir= in the driver command or --shared-dir)"
    return 0
  fi
  mkdir -p "$SHARED_DIR" || die "cannot create output_dir $SHARED_DIR on $HEAD_NODE; choose a writable directory on shared storage"
  marker="$SHARED_DIR/.memento-launch-check-$SLURM_JOB_ID"
  echo "$SLURM_JOB_ID" > "$marker"
  # shellcheck disable=SC2016  # $1 and SLURMD_NODENAME expand on each node, not here
  if ! missing=$(timeout 300 srun --overlap --nodes="$NUM_NODES" --ntasks="$NUM_NODES" --ntasks-per-node=1 \
      bash -c 'test -f "$1" || echo "${SLURMD_NODENAME:-$(hostname)}"' _ "$marker" \
      2>>"$JOB_LOG_DIR/shared-check.log"); then
    rm -f "$marker"
    die "could not run the shared-storage check on every node (srun failed or took over 300 s); see $JOB_LOG_DIR/shared-check.log"
  fi
  rm -f "$marker"
  if [[ -n "$missing" ]]; then
    die "output_dir $SHARED_DIR is not on storage shared by all nodes: not visible from $(echo "$missing" | tr '\n' ' ')- put output_dir= on a shared filesystem (Lustre, GPFS, NFS), not node-local /tmp or scratch"
  fi
  log "output_dir $SHARED_DIR is visible from all $NUM_NODES node(s)"
}

# ---------------------------------------------------------------------------------------------
# Waiting for the cluster: phase "head" waits until the head's GCS port accepts connections;
# phase "all" until every node has registered with its GPUs. Both fail fast when a node's
# `ray start` exits, and fail with the names of the missing nodes at the deadline.
# ---------------------------------------------------------------------------------------------
wait_for_cluster() {
  local rc=0 pids="" node
  for node in "${!RAY_PID[@]}"; do pids+="$node=${RAY_PID[$node]} "; done
  MEMENTO_WAIT_PHASE=$1 MEMENTO_EXPECTED_NODES="${NODES[*]}" MEMENTO_RAY_PIDS="$pids" \
  MEMENTO_GPUS_PER_NODE=$GPUS_PER_NODE MEMENTO_DEADLINE=$DEADLINE MEMENTO_WAIT_TIMEOUT=$WAIT_TIMEOUT \
  MEMENTO_JOB_LOG_DIR=$JOB_LOG_DIR MEMENTO_NODE_LABEL=$NODE_LABEL \
    timeout $((WAIT_TIMEOUT + 60)) "$PYTHON" - <<'PY' || rc=$?
import os, socket, sys, time

env = os.environ
phase, address = env["MEMENTO_WAIT_PHASE"], env["RAY_ADDRESS"]
host, port = address.rsplit(":", 1)
expected = env["MEMENTO_EXPECTED_NODES"].split()
gpus = float(env["MEMENTO_GPUS_PER_NODE"])
deadline, timeout = float(env["MEMENTO_DEADLINE"]), env["MEMENTO_WAIT_TIMEOUT"]
pids = dict(item.split("=", 1) for item in env["MEMENTO_RAY_PIDS"].split())
label = env["MEMENTO_NODE_LABEL"]


def log_of(node):
    role = "head" if node == expected[0] else "worker"
    return os.path.join(env["MEMENTO_JOB_LOG_DIR"], f"ray-{role}-{node}.log")


def fail(msg):
    print("memento-launch: error: " + msg, file=sys.stderr, flush=True)
    sys.exit(1)


def exited(pid):
    # The srun is a child of the batch shell, so an exited one can linger as a zombie.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return False


def fail_if_exited(nodes):
    dead = [n for n in nodes if n in pids and exited(int(pids[n]))]
    if dead:
        fail("`ray start` exited on " + ", ".join(dead) + " before the node joined the Ray cluster; see "
             + ", ".join(log_of(n) for n in dead))


if phase == "head":
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            sys.exit(0)
        except OSError:
            pass
        fail_if_exited(expected[:1])
        if time.time() > deadline:
            fail(f"the Ray head on {expected[0]} did not accept connections on {address} within {timeout} s "
                 f"(--wait-timeout); never joined: {', '.join(expected)}; see {log_of(expected[0])}")
        time.sleep(1)

import ray  # noqa: E402  (only the second phase needs Ray; the GCS is up by now)

ray.init(address=address, logging_level="ERROR", log_to_driver=False)
try:
    last = None
    while True:
        joined = {}
        for node in ray.nodes():
            name = (node.get("Labels") or {}).get(label)
            if node.get("Alive") and name:
                joined[name] = joined.get(name, 0.0) + node.get("Resources", {}).get("GPU", 0.0)
        missing = [n for n in expected if n not in joined]
        short = [f"{n} ({joined[n]:g} of {gpus:g} GPUs)" for n in expected if n in joined and joined[n] < gpus]
        ready = len(expected) - len(missing) - len(short)
        if ready == len(expected):
            print(f"[memento-launch] all {len(expected)} node(s) joined with {gpus:g} GPU(s) each", flush=True)
            sys.exit(0)
        if ready != last:
            print(f"[memento-launch] {ready}/{len(expected)} node(s) ready; waiting for "
                  + ", ".join(missing + short), flush=True)
            last = ready
        fail_if_exited(missing)
        if time.time() > deadline:
            parts = (["never joined: " + ", ".join(missing)] if missing else []) + (
                ["joined without all their GPUs: " + ", ".join(short)] if short else [])
            fail(f"only {ready} of {len(expected)} node(s) registered with the Ray cluster at {address} within "
                 f"{timeout} s (--wait-timeout); " + "; ".join(parts) + ". Their Ray logs: "
                 + ", ".join(log_of(n.split()[0]) for n in missing + short)
                 + f". Check those nodes (ray start errors, firewall between nodes on port {port}, GPUs "
                 "visible to the job), or raise --wait-timeout.")
        time.sleep(2)
finally:
    ray.shutdown()
PY
  if (( rc == 124 )); then
    die "waiting for the Ray cluster did not finish within $((WAIT_TIMEOUT + 60)) s; see the logs in $JOB_LOG_DIR"
  elif (( rc != 0 )); then
    exit "$rc"
  fi
}

check_shared_dir

# The address the head registers with: Ray's own default on the head node (forcing 127.0.0.1 or
# another interface makes joining nodes and drivers retry forever). MEMENTO_HEAD_IP overrides it,
# e.g. to put Ray traffic on an InfiniBand interface.
if [[ -n "${MEMENTO_HEAD_IP:-}" ]]; then
  HEAD_IP=$MEMENTO_HEAD_IP
elif ! HEAD_IP=$(timeout 120 srun --overlap --nodes=1 --ntasks=1 -w "$HEAD_NODE" \
    "$PYTHON" -c 'import ray.util; print(ray.util.get_node_ip_address())'); then
  die "could not determine the IP address of $HEAD_NODE with $PYTHON (is ray installed there? see --setup), or set MEMENTO_HEAD_IP"
fi
export RAY_ADDRESS="$HEAD_IP:$RAY_PORT"
DEADLINE=$(( $(date +%s) + WAIT_TIMEOUT ))

log "starting the Ray head on $HEAD_NODE ($RAY_ADDRESS); log: $JOB_LOG_DIR/ray-head-$HEAD_NODE.log"
srun --overlap --nodes=1 --ntasks=1 -w "$HEAD_NODE" --output="$JOB_LOG_DIR/ray-head-$HEAD_NODE.log" \
  ray start --head --block --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \
    --dashboard-host=0.0.0.0 --dashboard-port="$DASHBOARD_PORT" --num-gpus="$GPUS_PER_NODE" \
    --labels="$NODE_LABEL=$HEAD_NODE" "${RAY_START_ARGS[@]}" "${RAY_HEAD_ARGS[@]}" &
RAY_PID[$HEAD_NODE]=$!
wait_for_cluster head

for node in "${WORKER_NODES[@]}"; do
  log "starting a Ray worker on $node; log: $JOB_LOG_DIR/ray-worker-$node.log"
  srun --overlap --nodes=1 --ntasks=1 -w "$node" --output="$JOB_LOG_DIR/ray-worker-$node.log" \
    ray start --block --address="$RAY_ADDRESS" --num-gpus="$GPUS_PER_NODE" \
      --labels="$NODE_LABEL=$node" "${RAY_START_ARGS[@]}" &
  RAY_PID[$node]=$!
done
wait_for_cluster all

log "Ray cluster ready at $RAY_ADDRESS (dashboard http://$HEAD_IP:$DASHBOARD_PORT)"
log "driver: ${DRIVER_CMD[*]}"
"${DRIVER_CMD[@]}" &
DRIVER_PID=$!
rc=0
wait "$DRIVER_PID" || rc=$?
DRIVER_PID=""
log "driver exited with status $rc"
exit "$rc"
""")
