#!/usr/bin/env bash
# Rendered by memento-launch: a Ray cluster over this SLURM allocation, then the driver command.
#   __COMMAND_LINE__
#@SBATCH_DIRECTIVES

# This file is the template of memento_train/launch/slurm.py: each placeholder word (a name in
# capitals between double underscores) and each line "#@NAME" (at the start of a line) is replaced by plain text
# substitution (values already shell-quoted); nothing else changes. The template itself is valid
# bash and is linted by shellcheck as it is.
#
# Bring-up: a Ray head on the first node and a Ray worker on every other node (one background
# `srun` step per node), a wait until every node (and its GPUs) has registered, the driver command
# against that cluster, and teardown of Ray on every node on exit, failure, cancellation or
# preemption (trap). Preemption: SIGUSR1 (sbatch --signal=B:USR1@N, before the time limit) and
# SIGTERM (scancel, preemption) are forwarded to the driver, which checkpoints at its next step
# boundary and exits 75; after SIGUSR1 the job requeues itself when it was submitted with --requeue.
set -euo pipefail

NUM_NODES=__NUM_NODES__
GPUS_PER_NODE=__GPUS_PER_NODE__
CPUS_PER_NODE=__CPUS_PER_NODE__  # empty: Ray counts the CPUs of the step itself
RAY_PORT=__RAY_PORT__
DASHBOARD_PORT=__DASHBOARD_PORT__
WAIT_TIMEOUT=__WAIT_TIMEOUT__  # seconds for every node to join (--wait-timeout)
STOP_GRACE=__STOP_GRACE__  # seconds between SIGTERM and SIGKILL at teardown
REQUEUE=__REQUEUE__  # 1: requeue the job when the driver stopped for the time-limit signal
LOG_ROOT=__LOG_DIR__
SHARED_DIR=__SHARED_DIR__  # the driver's output_dir: must be visible from every node
PYTHON=__PYTHON__
RAY_TEMP_DIR=__RAY_TEMP_DIR__
RAY_START_ARGS=(__RAY_START_ARGS__)
RAY_HEAD_ARGS=(__RAY_HEAD_ARGS__)
DRIVER_CMD=(__DRIVER_CMD__)
# Each node is labelled with its SLURM name, so a node that never joins can be named.
NODE_LABEL=memento.slurm-node
# The driver's "checkpointed and stopped on a preemption signal" status (memento_train.faults).
EXIT_PREEMPTED=75

# NCCL / network defaults. A value already in the environment wins (sbatch exports the submitting
# shell's environment), so `NCCL_DEBUG=INFO memento-launch slurm ...` needs no re-rendering.
#@ENV_DEFAULTS
# --env KEY=VALUE: always wins.
#@ENV_OVERRIDES

# Ray authentication: one mode for every process of the job. Recent Ray turns token auth on for a
# head that finds ~/.ray/auth_token, but not for nodes or drivers joining by explicit address, which
# then cannot connect. Token mode with no token given gets a fresh token for this job; srun steps and
# the driver inherit it through the environment. RAY_AUTH_MODE=disabled turns auth off, and then
# the dashboard (Jobs API: it runs any command) listens on the head's loopback address only.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
GENERATED_TOKEN=0
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  RAY_AUTH_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  export RAY_AUTH_TOKEN
  GENERATED_TOKEN=1
fi
DASHBOARD_HOST=0.0.0.0
if [[ "$RAY_AUTH_MODE" != token ]]; then DASHBOARD_HOST=127.0.0.1; fi

# --setup commands (modules, virtualenv): before anything needs python or ray. They are the user's
# own lines, so shellcheck does not follow the files they source.
# shellcheck disable=SC1090,SC1091
{
  :  # (keeps the block valid without --setup lines)
#@SETUP
}

log() { printf '[memento-launch %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'memento-launch: error: %s\n' "$*" >&2; exit 1; }

: "${SLURM_JOB_ID:?run this script with sbatch (SLURM_JOB_ID is not set)}"
: "${SLURM_JOB_NODELIST:?run this script with sbatch (SLURM_JOB_NODELIST is not set)}"

JOB_LOG_DIR="$LOG_ROOT/$SLURM_JOB_ID"
mkdir -p "$JOB_LOG_DIR"
if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then
  log "requeued job: attempt $((SLURM_RESTART_COUNT + 1)); the driver resumes from its last checkpoint"
fi
if [[ "$RAY_AUTH_MODE" != token ]]; then
  log "WARNING: RAY_AUTH_MODE=$RAY_AUTH_MODE: Ray runs without authentication; anyone who can reach the nodes' Ray ports can run code as you"
elif (( GENERATED_TOKEN )); then
  # Readable by you only: RAY_AUTH_TOKEN_PATH=<this file> lets you reach the dashboard of this job.
  (umask 077 && printf '%s' "$RAY_AUTH_TOKEN" > "$JOB_LOG_DIR/ray_auth_token")
fi

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
REQUEUE_NOW=0
STOP_SIGNAL=""  # the signal forwarded to the driver, if any

# shellcheck disable=SC2317,SC2329  # invoked from a trap
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

# shellcheck disable=SC2317,SC2329  # invoked from a trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM USR1
  if [[ -n "$DRIVER_PID" ]]; then
    log "stopping the driver (pid $DRIVER_PID)"
    stop_pids "$DRIVER_PID"
  fi
  if (( ${#RAY_PID[@]} > 0 )); then
    log "stopping Ray on ${!RAY_PID[*]}"
    stop_pids "${RAY_PID[@]}"
  fi
  if (( REQUEUE_NOW )); then
    # Last: requeueing ends this attempt. The next one runs this script again from the top.
    if scontrol requeue "$SLURM_JOB_ID"; then
      log "requeued job $SLURM_JOB_ID"
    else
      log "could not requeue job $SLURM_JOB_ID: resubmit the same command to continue"
    fi
  fi
  log "exit status $rc; logs in $JOB_LOG_DIR"
  exit "$rc"
}

# shellcheck disable=SC2317,SC2329  # invoked from a trap
on_signal() {
  # scancel, preemption and the time-limit signal (--signal=B:USR1@N) reach the batch shell. With
  # the driver running, it gets the signal too and checkpoints at its next step boundary; the main
  # flow keeps waiting for it. Before the driver runs there is nothing to save: tear down now.
  if [[ -n "$DRIVER_PID" ]]; then
    log "received SIG$1: asking the driver to checkpoint and stop"
    STOP_SIGNAL=$1
    kill "-$1" "$DRIVER_PID" 2>/dev/null || true
    return 0
  fi
  log "received SIG$1: tearing down"
  exit $((128 + $2))
}

trap cleanup EXIT
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT
trap 'on_signal USR1 10' USR1

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
# Waiting for the cluster (memento_train/launch/ray_wait.py): phase "head" until the head's GCS
# port accepts connections, phase "all" until every node has registered with its GPUs. Both fail
# fast when a node's `ray start` exits, and with the names of the missing nodes at the deadline.
# ---------------------------------------------------------------------------------------------
wait_for_cluster() {
  local rc=0 pids="" node
  for node in "${!RAY_PID[@]}"; do pids+="$node=${RAY_PID[$node]} "; done
  MEMENTO_EXPECTED_NODES="${NODES[*]}" MEMENTO_RAY_PIDS="$pids" MEMENTO_GPUS_PER_NODE=$GPUS_PER_NODE \
  MEMENTO_DEADLINE=$DEADLINE MEMENTO_WAIT_TIMEOUT=$WAIT_TIMEOUT MEMENTO_JOB_LOG_DIR=$JOB_LOG_DIR \
  MEMENTO_NODE_LABEL=$NODE_LABEL \
    timeout $((WAIT_TIMEOUT + 60)) "$PYTHON" -m memento_train.launch.ray_wait "$1" || rc=$?
  if (( rc == 124 )); then
    die "waiting for the Ray cluster did not finish within $((WAIT_TIMEOUT + 60)) s; see the logs in $JOB_LOG_DIR"
  elif (( rc != 0 )); then
    exit "$rc"
  fi
}

"$PYTHON" -c 'import memento_train.launch.ray_wait' 2>/dev/null \
  || die "$PYTHON cannot import memento_train (needed to wait for the Ray cluster); activate the environment with --setup or point --python at it"
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
    --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT" --num-gpus="$GPUS_PER_NODE" \
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

log "Ray cluster ready at $RAY_ADDRESS (dashboard http://$DASHBOARD_HOST:$DASHBOARD_PORT, auth: $RAY_AUTH_MODE)"
log "driver: ${DRIVER_CMD[*]}"
"${DRIVER_CMD[@]}" &
DRIVER_PID=$!
rc=0
# A trapped signal interrupts `wait`; wait again until the driver has really exited.
while true; do
  rc=0
  wait "$DRIVER_PID" || rc=$?
  kill -0 "$DRIVER_PID" 2>/dev/null || break
done
DRIVER_PID=""
if (( rc == EXIT_PREEMPTED )); then
  log "driver checkpointed and stopped on SIG${STOP_SIGNAL:-?} (status $rc)"
  if [[ "$STOP_SIGNAL" == USR1 ]] && (( REQUEUE )); then REQUEUE_NOW=1; fi
else
  log "driver exited with status $rc"
fi
exit "$rc"
