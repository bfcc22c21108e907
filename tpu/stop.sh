#!/usr/bin/env bash
# Stops the training jobs tpu/launch.sh started on the TPU's workers, then stops the TPU VM (billing for the
# TPU stops; its disk stays, and tpu/launch.sh can run on it again after `gcloud compute tpus tpu-vm start`).
#   tpu/stop.sh --name NAME --zone ZONE [--job-only] [--queued] [--project PROJECT] [--dry-run]
# --job-only: stop the jobs and leave the VM running.
# A queued resource (--queued) cannot be stopped, only deleted (tpu/delete.sh --queued): its jobs are
# stopped and the VM is left as it is.
set -euo pipefail
# shellcheck source=tpu/common.sh
. "$(dirname "$0")/common.sh"

JOB_ONLY=0
while [ $# -gt 0 ]; do
  parse_common_flag "$@"
  if [ "$COMMON_SHIFT" -gt 0 ]; then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --job-only) JOB_ONLY=1; shift ;;
    *) usage_error "unknown flag or argument $1" ;;
  esac
done
require_tpu

say "stopping the tulu-jax jobs on every worker of $TPU_NAME"
worker_ssh all "$(kill_jobs_command '*')" || say "could not reach every worker (a stopped or preempted TPU has no jobs)"
[ "$JOB_ONLY" = 0 ] || exit 0
if [ "$TPU_QUEUED" = 1 ]; then
  say "a queued resource cannot be stopped; release it with tpu/delete.sh --queued --name $TPU_NAME"
  exit 0
fi
tpu_vm stop
