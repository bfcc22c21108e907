# shellcheck shell=bash
# shellcheck disable=SC2034  # the settings are read by the scripts that source this file
# Shared by tpu/{create,setup,launch,stop,delete}.sh: the TPU's settings (flags override environment
# variables), their checks, and the gcloud/ssh wrappers, all of which go through `run` (scripts/lib.sh), so
# `--dry-run` prints every command instead of running it. Sourced, not run.
#
# Settings (environment variable / flag):
#   TPU_NAME        --name NAME          the TPU VM or pod slice (also the queued resource's id)
#   TPU_ZONE        --zone ZONE          e.g. us-central2-b (default: $CLOUDSDK_COMPUTE_ZONE)
#   TPU_PROJECT     --project PROJECT    default: gcloud's configured project
#   TPU_ACCELERATOR --accelerator TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-64, v6e-16 (default v4-8)
#   TPU_RUNTIME     --runtime VERSION    default: the JAX software version for the accelerator's generation
#   TPU_QUEUED=1    --queued             the TPU is (to be) a queued resource
#   TPU_REMOTE_DIR  --remote-dir DIR     the project on every worker, relative to the home folder (tulu_jax)
#                   --dry-run            print the commands, run nothing

TPU_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# shellcheck source=scripts/lib.sh
. "$TPU_ROOT/scripts/lib.sh"

TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
TPU_PROJECT=${TPU_PROJECT:-}
TPU_ACCELERATOR=${TPU_ACCELERATOR:-v4-8}
TPU_RUNTIME=${TPU_RUNTIME:-}
TPU_QUEUED=${TPU_QUEUED:-0}
TPU_REMOTE_DIR=${TPU_REMOTE_DIR:-tulu_jax}

# show_help: the script's header comment (its usage) on stdout.
show_help() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
  exit 0
}

# parse_common_flag ARG...: consumes one common flag (and its value) -> COMMON_SHIFT = words used; 0 when
# $1 is not a common flag (the caller handles it). `--flag=value` is accepted as well as `--flag value`.
parse_common_flag() {
  COMMON_SHIFT=0
  local flag=$1 value="" n=2
  case $flag in
    --*=*) value=${flag#*=}; flag=${flag%%=*}; n=1 ;;
    *) [ $# -lt 2 ] || value=$2 ;;
  esac
  case $flag in
    --name | --zone | --project | --accelerator | --runtime | --remote-dir)
      [ "$n" = 1 ] || need_value "$flag" $# "$value"
      [ -n "$value" ] || usage_error "$flag needs a value"
      case $flag in
        --name) TPU_NAME=$value ;;
        --zone) TPU_ZONE=$value ;;
        --project) TPU_PROJECT=$value ;;
        --accelerator) TPU_ACCELERATOR=$value ;;
        --runtime) TPU_RUNTIME=$value ;;
        --remote-dir) TPU_REMOTE_DIR=$value ;;
      esac
      COMMON_SHIFT=$n
      ;;
    --queued) TPU_QUEUED=1; COMMON_SHIFT=1 ;;
    --dry-run) DRY_RUN=1; COMMON_SHIFT=1 ;;
    -h | --help) show_help ;;
  esac
}

# require_tpu: a TPU name and zone are known.
require_tpu() {
  [ -n "$TPU_NAME" ] || usage_error "no TPU name: pass --name NAME or set TPU_NAME"
  [ -n "$TPU_ZONE" ] || usage_error "no zone: pass --zone ZONE or set TPU_ZONE"
}

# default_runtime ACCELERATOR: the TPU software version Google documents for JAX on that generation.
default_runtime() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) usage_error "--accelerator $1: unknown TPU type; pass --runtime VERSION as well" ;;
  esac
}

# The --zone/--project flags every gcloud TPU command takes.
where_flags() {
  WHERE=("--zone=$TPU_ZONE")
  [ -z "$TPU_PROJECT" ] || WHERE+=("--project=$TPU_PROJECT")
}

# tpu_vm SUBCOMMAND [ARG...]: `gcloud compute tpus tpu-vm SUBCOMMAND $TPU_NAME --zone .. ARG...`.
tpu_vm() {
  local sub=$1
  shift
  where_flags
  run gcloud compute tpus tpu-vm "$sub" "$TPU_NAME" "${WHERE[@]}" "$@"
}

# queued SUBCOMMAND [ARG...]: the same for `gcloud compute tpus queued-resources`.
queued() {
  local sub=$1
  shift
  where_flags
  run gcloud compute tpus queued-resources "$sub" "$TPU_NAME" "${WHERE[@]}" "$@"
}

# worker_ssh WORKER COMMAND: COMMAND (a shell string) on one worker (a number) or on all of them (all).
worker_ssh() {
  tpu_vm ssh "--worker=$1" "--command=$2"
}

# host_ssh HOST COMMAND: COMMAND on HOST: `tpu:NAME` (worker 0 of another TPU VM, through gcloud) or an ssh
# destination (user@host; e.g. a GPU VM after `gcloud compute config-ssh`).
host_ssh() {
  case $1 in
    tpu:*) TPU_NAME=${1#tpu:} worker_ssh 0 "$2" ;;
    *) run ssh -o BatchMode=yes "$1" "$2" ;;
  esac
}

# host_copy HOST LOCAL REMOTE: copies the file LOCAL to REMOTE (relative to the home folder) on HOST; the
# TPU itself (HOST "all") gets it on every worker.
host_copy() {
  where_flags
  case $1 in
    all) run gcloud compute tpus tpu-vm scp "$2" "$TPU_NAME:$3" "${WHERE[@]}" --worker=all ;;
    tpu:*) run gcloud compute tpus tpu-vm scp "$2" "${1#tpu:}:$3" "${WHERE[@]}" --worker=0 ;;
    *) run scp -o BatchMode=yes "$2" "$1:$3" ;;
  esac
}

# host_address HOST: the address other hosts reach HOST at (a TPU VM's internal IP; an ssh host's name).
host_address() {
  case $1 in
    tpu:*)
      local name=${1#tpu:}
      where_flags
      capture "IP-OF-$name" gcloud compute tpus tpu-vm describe "$name" "${WHERE[@]}" \
        "--format=value(networkEndpoints[0].ipAddress)"
      ;;
    *) printf '%s' "${1#*@}" ;;
  esac
}

# split_commas LIST: the comma-separated items, one per line.
split_commas() {
  printf '%s\n' "$1" | tr ',' '\n' | sed '/^$/d'
}

# kill_jobs_command RUN: a shell string that stops the training job RUN on a worker (RUN "*": every job
# tpu/launch.sh started there). The job's shell wrote its pid, which is its process group (ssh made it a
# session leader), so SIGTERM reaches the trainer's helper processes too.
kill_jobs_command() {
  printf '%s' "for f in /tmp/tulu_jax-$1.pid; do [ -f \"\$f\" ] && kill -TERM -- -\"\$(cat \"\$f\")\" 2>/dev/null; rm -f \"\$f\"; done; true"
}
