#!/usr/bin/env bash
# Runs one training stage on every worker of the TPU at once: `tulu-jax STAGE --distributed --config CONFIG
# key=value...` (JAX finds the pod's coordinator itself), one ssh per worker, each worker's output in
# logs/RUN/worker-I.log here and all of them live on this terminal, prefixed [wI]. Exits non-zero if any
# worker fails (and then stops the others: a pod job cannot go on without one of its hosts).
#   tpu/launch.sh --name NAME --zone ZONE [flags] [STAGE] CONFIG [key=value ...]
# STAGE (sft, dpo, rm, rlvr) may be left out for a config under configs/STAGE/. The config is copied to
# every worker first (the same path under the project for a config inside it), so local edits are used.
# output_dir must be a path every worker sees (a gcsfuse mount or NFS, see tpu/README.md).
# Preemption or a kill: run the same command again (same output_dir): the job resumes from its last
# checkpoint. Ctrl-C here stops the job on every worker.
# Flags:
#   --workers N          the TPU's worker count (default: asked from gcloud; required with --dry-run)
#   --run NAME           names logs/NAME/ (default STAGE-CONFIGNAME; a relaunch appends to the same logs)
#   --env KEY=VALUE      set on every worker (repeatable), e.g. --env HF_HUB_OFFLINE=1
# RLVR with vLLM servers on other hosts (set up with tpu/setup.sh --hosts ... --vllm ...):
#   --vllm-hosts H,...   start `tulu-jax vllm` on each host (tpu:NAME or user@host), wait for /health, run
#                        RLVR with rollout.backend=vllm rollout.servers=[http://H:PORT,...], stop them after
#   --vllm-model DIR     the model they serve (default: the model.path=... override); a path on the hosts
#   --vllm-port P (8000) --vllm-timeout SECONDS (900) --vllm-arg ARG (a vLLM flag; repeatable)
#   --vllm-max-model-len N  prompt + response tokens a server holds (tulu-jax vllm's default: 2048; the
#                        Tulu 3 RLVR configs need 4096)
# Common: --project PROJECT, --remote-dir DIR (tulu_jax), --dry-run (print the gcloud/ssh commands only).
set -euo pipefail
# shellcheck source=tpu/common.sh
. "$(dirname "$0")/common.sh"

ARGV=("$0" "$@") # the command as typed, for the log headers
WORKERS="" RUN="" VLLM_HOSTS="" VLLM_MODEL="" VLLM_PORT=8000 VLLM_TIMEOUT=900 VLLM_MAX_LEN=""
ENV_VARS=() VLLM_ARGS=()
while [ $# -gt 0 ]; do
  parse_common_flag "$@"
  if [ "$COMMON_SHIFT" -gt 0 ]; then
    shift "$COMMON_SHIFT"
    continue
  fi
  case $1 in
    --workers) need_value "$1" $# "${2:-}"; WORKERS=$2; shift 2 ;;
    --run) need_value "$1" $# "${2:-}"; RUN=$2; shift 2 ;;
    --env) need_value "$1" $# "${2:-}"; ENV_VARS+=("$2"); shift 2 ;;
    --vllm-hosts) need_value "$1" $# "${2:-}"; VLLM_HOSTS=$2; shift 2 ;;
    --vllm-model) need_value "$1" $# "${2:-}"; VLLM_MODEL=$2; shift 2 ;;
    --vllm-port) need_value "$1" $# "${2:-}"; VLLM_PORT=$2; shift 2 ;;
    --vllm-timeout) need_value "$1" $# "${2:-}"; VLLM_TIMEOUT=$2; shift 2 ;;
    --vllm-max-model-len) need_value "$1" $# "${2:-}"; VLLM_MAX_LEN=$2; shift 2 ;;
    --vllm-arg) need_value "$1" $#; VLLM_ARGS+=("$2"); shift 2 ;;
    -*) usage_error "unknown flag $1" ;;
    *) break ;;
  esac
done
parse_stage_config "$@"
require_tpu
case $WORKERS in
  '') [ "$DRY_RUN" = 0 ] || usage_error "--dry-run needs --workers N (the count is otherwise asked from gcloud)" ;;
  *[!0-9]* | 0) usage_error "--workers $WORKERS: expected a positive number" ;;
esac
if [ -z "$RUN" ]; then # STAGE-CONFIGNAME, any other character of the file name made a '-'
  RUN=$STAGE-$(basename "${CONFIG%.*}" | tr -c 'A-Za-z0-9_.\n-' '-')
fi
case $RUN in
  *[!A-Za-z0-9_.-]*) usage_error "--run $RUN: use letters, digits, '.', '_' and '-' only" ;;
esac
for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
  case $kv in
    [A-Za-z_]*=*) ;;
    *) usage_error "--env $(quote "$kv"): expected KEY=VALUE" ;;
  esac
done

if [ -n "$VLLM_HOSTS" ]; then
  check_vllm_flags --vllm-hosts
  # shellcheck disable=SC2207  # host names hold no spaces
  VLLM_HOST_LIST=($(split_commas "$VLLM_HOSTS"))
  [ ${#VLLM_HOST_LIST[@]} -gt 0 ] || usage_error "--vllm-hosts: no host given"
fi

if [ -z "$WORKERS" ]; then
  where_flags
  ips=$(capture "" gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" \
    "--format=value(networkEndpoints[].ipAddress)")
  WORKERS=$(printf '%s\n' "$ips" | tr ';' '\n' | sed '/^$/d' | wc -l | tr -d ' ')
  [ "$WORKERS" -gt 0 ] || { say "cannot count the workers of $TPU_NAME (gcloud said: $ips)"; exit 1; }
fi

# The config on the workers: the same path for one inside the project, else configs/launched-NAME.
cfg_abs=$(cd "$(dirname "$CONFIG")" && pwd -P)/$(basename "$CONFIG")
case $cfg_abs in
  "$TPU_ROOT"/*) REMOTE_CONFIG=${cfg_abs#"$TPU_ROOT"/} ;;
  *) REMOTE_CONFIG=configs/launched-$RUN.yaml ;; # one file per run name (safe characters only)
esac
case $(override_value output_dir ${OVERRIDES[@]+"${OVERRIDES[@]}"}) in
  /*) ;;
  *) say "note: output_dir must be a path every worker sees (e.g. output_dir=/mnt/shared/runs/$RUN)" ;;
esac

LOG_DIR=${TPU_LOG_ROOT:-$TPU_ROOT/logs}/$RUN
DIR=$(quote "$TPU_REMOTE_DIR")
PID_FILE=/tmp/tulu_jax-$RUN.pid
PIDS=()
STARTED=() # vLLM hosts whose server this launch started (and so stops)

stop_vllm() {
  local h
  for h in ${STARTED[@]+"${STARTED[@]}"}; do
    host_ssh "$h" "cd $DIR && bash scripts/vllm_serve.sh stop --port $VLLM_PORT" || say "could not stop vLLM on $h"
  done
  STARTED=()
}

stop_job() {
  say "stopping $RUN on every worker"
  worker_ssh all "$(kill_jobs_command "$RUN")" || true
}

on_interrupt() {
  trap - INT TERM
  say "interrupted"
  stop_job
  local p
  for p in ${PIDS[@]+"${PIDS[@]}"}; do
    kill "$p" 2>/dev/null || true
  done
  exit 130
}
trap stop_vllm EXIT
trap on_interrupt INT TERM

run mkdir -p "$LOG_DIR"
host_copy all "$CONFIG" "$TPU_REMOTE_DIR/$REMOTE_CONFIG"

if [ -n "$VLLM_HOSTS" ]; then
  serve_flags="--port $VLLM_PORT --model $(quote "$VLLM_MODEL")"
  [ -z "$VLLM_MAX_LEN" ] || serve_flags="$serve_flags --max-model-len $(quote "$VLLM_MAX_LEN")"
  [ ${#VLLM_ARGS[@]} -eq 0 ] || serve_flags="$serve_flags -- $(quote_all "${VLLM_ARGS[@]}")"
  for h in "${VLLM_HOST_LIST[@]}"; do
    say "starting vLLM on $h"
    host_ssh "$h" "cd $DIR && bash scripts/vllm_serve.sh start $serve_flags"
    STARTED+=("$h")
  done
  servers=""
  for h in "${VLLM_HOST_LIST[@]}"; do
    host_ssh "$h" "cd $DIR && bash scripts/vllm_serve.sh wait --port $VLLM_PORT --timeout $VLLM_TIMEOUT" ||
      { say "vLLM on $h did not come up"; exit 1; }
    servers="$servers${servers:+,}http://$(host_address "$h"):$VLLM_PORT"
  done
  OVERRIDES+=(rollout.backend=vllm "rollout.servers=[$servers]")
fi

env_words=""
[ ${#ENV_VARS[@]} -eq 0 ] || env_words="env $(quote_all "${ENV_VARS[@]}") "
trainer=$(quote_all .venv/bin/tulu-jax "$STAGE" --distributed --config "$REMOTE_CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
# The worker's shell records its pid (= its process group) for stop_job and tpu/stop.sh, then runs the stage.
REMOTE_CMD="cd $DIR && echo \$\$ > $PID_FILE && $env_words$trainer ; rc=\$?; rm -f $PID_FILE; exit \$rc"

# prefix TEXT: each input line with TEXT in front.
prefix() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    printf '%s%s\n' "$1" "$line"
  done
}

say "launching $RUN on $WORKERS workers of $TPU_NAME; logs in $LOG_DIR"
for i in $(seq 0 $((WORKERS - 1))); do
  if [ "$DRY_RUN" = 1 ]; then
    worker_ssh "$i" "$REMOTE_CMD"
    continue
  fi
  log=$LOG_DIR/worker-$i.log
  echo "=== $(date -u '+%F %T') UTC: $(quote_all "${ARGV[@]}")" >>"$log"
  (worker_ssh "$i" "$REMOTE_CMD" 2>&1 | tee -a "$log" | prefix "[w$i] ") &
  PIDS+=($!)
done
[ "$DRY_RUN" = 0 ] || exit 0

# Wait for every worker; the first failure stops the rest (they would hang in their next collective).
STATUS=()
for i in $(seq 0 $((WORKERS - 1))); do STATUS[i]=running; done
left=$WORKERS failed=0
while [ "$left" -gt 0 ]; do
  for i in $(seq 0 $((WORKERS - 1))); do
    if [ "${STATUS[i]}" != running ] || kill -0 "${PIDS[i]}" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "${PIDS[i]}" || rc=$?
    left=$((left - 1))
    if [ "$rc" = 0 ]; then
      STATUS[i]=ok
    else
      STATUS[i]="failed (exit $rc)"
      if [ "$failed" = 0 ] && [ "$left" -gt 0 ]; then
        say "worker $i failed (exit $rc, see $LOG_DIR/worker-$i.log)"
        stop_job
      fi
      failed=1
    fi
  done
  [ "$left" = 0 ] || sleep 2
done
for i in $(seq 0 $((WORKERS - 1))); do
  say "worker $i: ${STATUS[i]}"
done
if [ "$failed" = 1 ]; then
  say "$RUN failed; after fixing the cause (or recreating a preempted TPU) the same command resumes it"
  exit 1
fi
say "$RUN finished"
