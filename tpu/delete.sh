#!/usr/bin/env bash
# Deletes the TPU VM or pod slice (with --queued: the queued resource and the TPU it holds). Everything on
# the workers' disks goes; the shared output_dir (bucket or Filestore) stays.
#   tpu/delete.sh --name NAME --zone ZONE [--queued] [--yes] [--project PROJECT] [--dry-run]
# gcloud asks for confirmation unless --yes is given.
set -euo pipefail
# shellcheck source=tpu/common.sh
. "$(dirname "$0")/common.sh"

YES=()
while [ $# -gt 0 ]; do
  parse_common_flag "$@"
  if [ "$COMMON_SHIFT" -gt 0 ]; then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --yes) YES=(--quiet); shift ;;
    *) usage_error "unknown flag or argument $1" ;;
  esac
done
require_tpu

if [ "$TPU_QUEUED" = 1 ]; then
  # --force: delete the TPU the request holds along with the request.
  queued delete --force ${YES[@]+"${YES[@]}"}
else
  tpu_vm delete ${YES[@]+"${YES[@]}"}
fi
