#!/usr/bin/env bash
# Sets up a training or serving host: .venv from scripts/setup.sh (without the test extra), the
# accelerator's JAX build at the jax version setup.sh installed, optionally vLLM and a gcsfuse mount of the
# shared bucket. tpu/setup.sh runs it on every TPU worker or vLLM host; scripts/run_gpu.sh --setup on a
# GPU host. Idempotent: run it again after pulling new code.
#   bash scripts/setup_host.sh [--jax tpu|cuda12|cuda13|cpu] [--vllm PIP_SPEC] [--bucket BUCKET --mount DIR]
#                              [--python PYTHON] [--dry-run]
# --jax: the pip extra of jax to add (default tpu: jax[tpu]==<jax version setup.sh installed>, with libtpu);
#        cpu keeps the CPU build (a vLLM host, whose .venv only launches the server).
# --vllm: make .venv-vllm with this package (vllm-tpu==0.32.0 on a TPU VM, vllm==0.32.0 on a CUDA host).
# --bucket/--mount: mount gs://BUCKET at DIR with gcsfuse (installed from Google's apt repository).
# --python: the interpreter for the venvs (default: python3.12 or python3.11, installed with apt if missing;
#        tulu_jax needs Python >= 3.11 and the TPU images ship 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

JAX_EXTRA=tpu VLLM_SPEC="" BUCKET="" MOUNT="" PY=""
while [ $# -gt 0 ]; do
  case $1 in
    --jax) need_value "$1" $# "${2:-}"; JAX_EXTRA=$2; shift 2 ;;
    --vllm) need_value "$1" $# "${2:-}"; VLLM_SPEC=$2; shift 2 ;;
    --bucket) need_value "$1" $# "${2:-}"; BUCKET=${2#gs://}; shift 2 ;;
    --mount) need_value "$1" $# "${2:-}"; MOUNT=$2; shift 2 ;;
    --python) need_value "$1" $# "${2:-}"; PY=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) usage_error "unknown flag $1" ;;
  esac
done
case $JAX_EXTRA in
  tpu | cuda12 | cuda13 | cpu) ;;
  *) usage_error "--jax $JAX_EXTRA: expected tpu, cuda12, cuda13 or cpu" ;;
esac
[ -z "$BUCKET" ] || [ -n "$MOUNT" ] || usage_error "--bucket needs --mount DIR"
APT=(sudo env DEBIAN_FRONTEND=noninteractive apt-get)

# python_ok PYTHON: Python >= 3.11 that can make venvs (Ubuntu ships venv support in a separate package).
python_ok() {
  "$1" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if [ -z "$PY" ]; then
  for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null && python_ok "$candidate"; then
      PY=$candidate
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  say "no Python >= 3.11 with venv: installing python3.11 with apt"
  run "${APT[@]}" update -q
  run "${APT[@]}" install -y -q python3.11 python3.11-venv
  PY=python3.11
elif ! python_ok "$PY"; then
  usage_error "--python $PY: Python >= 3.11 with the venv module required"
fi

run env PYTHON="$PY" TULU_JAX_EXTRAS= bash scripts/setup.sh
if [ "$JAX_EXTRA" != cpu ]; then
  # The accelerator build of the very jax version setup.sh resolved, so nothing else moves.
  jax_version=$(capture JAX_VERSION .venv/bin/python -c 'import importlib.metadata as m; print(m.version("jax"))')
  run .venv/bin/python -m pip install -q "jax[$JAX_EXTRA]==$jax_version"
fi
if [ -n "$VLLM_SPEC" ]; then
  run env PYTHON="$PY" TULU_JAX_VLLM_SPEC="$VLLM_SPEC" bash scripts/setup_vllm.sh
fi

if [ -n "$BUCKET" ]; then
  if ! command -v gcsfuse >/dev/null; then
    say "installing gcsfuse from Google's apt repository"
    key=/usr/share/keyrings/cloud.google.asc
    line="deb [signed-by=$key] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s 2>/dev/null || echo jammy) main"
    run sudo curl -fsSL -o "$key" https://packages.cloud.google.com/apt/doc/apt-key.gpg
    run sudo sh -c "echo '$line' > /etc/apt/sources.list.d/gcsfuse.list"
    run "${APT[@]}" update -q
    run "${APT[@]}" install -y -q gcsfuse
  fi
  if mountpoint -q "$MOUNT" 2>/dev/null; then
    say "$MOUNT is already mounted"
  else
    run sudo mkdir -p "$MOUNT"
    run sudo chown "$(id -u):$(id -g)" "$MOUNT"
    # --implicit-dirs: folders other hosts made by writing files below them are visible here too.
    # Exports and weight pushes appear by renaming a finished folder; gcsfuse refuses directory renames on
    # flat buckets unless allowed (hierarchical-namespace buckets rename natively).
    run gcsfuse --implicit-dirs --rename-dir-limit=200000 "$BUCKET" "$MOUNT"
  fi
fi
[ "$DRY_RUN" = 0 ] || exit 0
# Versions only: touching the devices here would hold the TPU (vLLM's) or wait for the pod's other workers.
.venv/bin/python -m pip list 2>/dev/null | grep -E '^(jax|jaxlib|libtpu|jax-cuda[0-9]+-plugin|tulu_jax) ' >&2 || true
