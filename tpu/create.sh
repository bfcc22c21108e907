#!/usr/bin/env bash
# Creates a TPU VM or pod slice (a pod slice is one VM per worker, created together).
#   tpu/create.sh --name NAME --zone ZONE --accelerator TYPE [--spot | --preemptible] [--queued [--wait]]
#                 [--runtime VERSION] [--project PROJECT] [--dry-run] [-- more gcloud flags]
# --queued asks through a queued resource (gcloud compute tpus queued-resources create): the request waits
# in the zone's queue until capacity frees up; --wait polls it until it is ACTIVE (or FAILED). Without it
# the VM is created at once or the command fails (no capacity, no quota).
# --spot: Spot VMs (cheapest, preemptible at any time); --preemptible: the older preemptible TPUs (not with
# --queued). A preempted TPU must be deleted and created again; the job then resumes from its checkpoint.
# The runtime (TPU software) version defaults to the one Google documents for JAX on the generation.
# Settings also come from TPU_NAME, TPU_ZONE, TPU_PROJECT, TPU_ACCELERATOR, TPU_RUNTIME (tpu/common.sh).
set -euo pipefail
# shellcheck source=tpu/common.sh
. "$(dirname "$0")/common.sh"

SPOT=0 PREEMPTIBLE=0 WAIT=0
EXTRA=()
while [ $# -gt 0 ]; do
  parse_common_flag "$@"
  if [ "$COMMON_SHIFT" -gt 0 ]; then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --wait) WAIT=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage_error "unknown flag or argument $1" ;;
  esac
done
require_tpu
[ "$SPOT$PREEMPTIBLE" != 11 ] || usage_error "--spot and --preemptible: choose one"
[ -n "$TPU_RUNTIME" ] || TPU_RUNTIME=$(default_runtime "$TPU_ACCELERATOR")

if [ "$TPU_QUEUED" = 1 ]; then
  [ "$PREEMPTIBLE" = 0 ] || usage_error "--preemptible does not apply to queued resources; use --spot"
  flags=("--node-id=$TPU_NAME" "--accelerator-type=$TPU_ACCELERATOR" "--runtime-version=$TPU_RUNTIME")
  [ "$SPOT" = 0 ] || flags+=(--spot)
  queued create "${flags[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
  if [ "$WAIT" = 1 ]; then
    where_flags
    while :; do
      # A transient gcloud failure is one more wait, not the end of the script (set -e).
      state=$(capture ACTIVE gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
        "--format=value(state.state)") || state=UNKNOWN
      case $state in
        ACTIVE) [ "$DRY_RUN" = 1 ] || say "queued resource $TPU_NAME is ACTIVE"; break ;;
        FAILED | SUSPENDED) say "queued resource $TPU_NAME is $state"; exit 1 ;;
        *) say "queued resource $TPU_NAME: ${state:-unknown}; checking again in 60 s"; sleep 60 ;;
      esac
    done
  else
    say "queued; watch it with: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$TPU_ZONE"
  fi
else
  [ "$WAIT" = 0 ] || usage_error "--wait goes with --queued (a plain create already waits)"
  flags=("--accelerator-type=$TPU_ACCELERATOR" "--version=$TPU_RUNTIME")
  [ "$SPOT" = 0 ] || flags+=(--spot)
  [ "$PREEMPTIBLE" = 0 ] || flags+=(--preemptible)
  tpu_vm create "${flags[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
fi
