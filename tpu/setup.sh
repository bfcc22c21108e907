#!/usr/bin/env bash
# Puts the project on every worker of the TPU (or on other hosts) and sets it up there with
# scripts/setup_host.sh (.venv from scripts/setup.sh, jax[tpu] at the same jax version, optionally vLLM and a
# gcsfuse mount).
#   tpu/setup.sh --name NAME --zone ZONE [--git URL [--ref REF]] [--vllm PIP_SPEC] [--bucket BUCKET --mount DIR]
#                [--hosts HOST,...] [--jax tpu|cuda12|cpu] [--remote-dir DIR] [--dry-run]
# The code: by default this checkout's working tree (uncommitted changes included; .git, venvs, runs/ and
# logs/ left out) is copied as a tarball; --git clones URL (or updates an earlier clone) at REF instead.
# --hosts: set up these hosts instead of the TPU, e.g. the vLLM hosts of tpu/launch.sh --vllm-hosts: each is
#   tpu:NAME (another TPU VM, worker 0) or an ssh destination (user@host). Their --jax defaults to cpu (the
#   trainer does not run there), the TPU's to tpu.
# --vllm: also make .venv-vllm with this package: vllm-tpu==0.32.0 on a TPU VM, vllm==0.32.0 on a CUDA host.
# --bucket/--mount: mount gs://BUCKET at DIR on every host: the shared output_dir (same path everywhere).
# Run it again after changing the code: only what changed is reinstalled.
set -euo pipefail
# shellcheck source=tpu/common.sh
. "$(dirname "$0")/common.sh"

GIT_URL="" GIT_REF=HEAD HOSTS="" JAX_EXTRA=""
WORKER_ARGS=()
while [ $# -gt 0 ]; do
  parse_common_flag "$@"
  if [ "$COMMON_SHIFT" -gt 0 ]; then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --git) need_value "$1" $# "${2:-}"; GIT_URL=$2; shift 2 ;;
    --ref) need_value "$1" $# "${2:-}"; GIT_REF=$2; shift 2 ;;
    --hosts) need_value "$1" $# "${2:-}"; HOSTS=$2; shift 2 ;;
    --jax) need_value "$1" $# "${2:-}"; JAX_EXTRA=$2; shift 2 ;;
    --vllm | --bucket | --mount | --python) need_value "$1" $# "${2:-}"; WORKER_ARGS+=("$1" "$2"); shift 2 ;;
    *) usage_error "unknown flag or argument $1" ;;
  esac
done
if [ -z "$HOSTS" ]; then
  require_tpu
  TARGETS=(all)
  JAX_EXTRA=${JAX_EXTRA:-tpu}
else
  # shellcheck disable=SC2207  # host names hold no spaces
  TARGETS=($(split_commas "$HOSTS"))
  [ ${#TARGETS[@]} -gt 0 ] || usage_error "--hosts: no host given"
  JAX_EXTRA=${JAX_EXTRA:-cpu}
  case $HOSTS in
    *tpu:*) [ -n "$TPU_ZONE" ] || usage_error "no zone for the tpu: hosts: pass --zone ZONE or set TPU_ZONE" ;;
  esac
fi
DIR=$(quote "$TPU_REMOTE_DIR")

# remote TARGET COMMAND: COMMAND on every worker of the TPU (TARGET all) or on one host.
remote() {
  if [ "$1" = all ]; then
    worker_ssh all "$2"
  else
    host_ssh "$1" "$2"
  fi
}

if [ -z "$GIT_URL" ]; then
  bundle="${TMPDIR:-/tmp}/tulu_jax-$$.tgz"
  trap 'rm -f "$bundle"' EXIT
  say "packing $TPU_ROOT"
  run tar -czf "$bundle" -C "$TPU_ROOT" --exclude=.git --exclude=.venv --exclude=.venv-vllm --exclude=./runs \
    --exclude=./logs --exclude=__pycache__ --exclude=.pytest_cache .
fi
for target in "${TARGETS[@]}"; do
  say "code -> $target:$TPU_REMOTE_DIR"
  if [ -z "$GIT_URL" ]; then
    host_copy "$target" "$bundle" tulu_jax-code.tgz
    remote "$target" "mkdir -p $DIR && tar -xzf tulu_jax-code.tgz -C $DIR && rm tulu_jax-code.tgz"
  else
    url=$(quote "$GIT_URL") ref=$(quote "$GIT_REF")
    remote "$target" "{ [ -d $DIR/.git ] || git clone -q $url $DIR; } && git -C $DIR fetch -q $url $ref && git -C $DIR checkout -q --detach FETCH_HEAD"
  fi
  say "setting up $target"
  remote "$target" "cd $DIR && bash scripts/setup_host.sh $(quote_all --jax "$JAX_EXTRA" ${WORKER_ARGS[@]+"${WORKER_ARGS[@]}"})"
done
say "done"
