#!/usr/bin/env bash
# Runs on the host that serves: starts, waits for, and stops one `tulu-jax vllm` server in the background.
# scripts/run_gpu.sh calls it locally; tpu/launch.sh --vllm-hosts calls it on each vLLM host over ssh.
#   scripts/vllm_serve.sh start --port P --model DIR [--dtype bfloat16] [--max-model-len N] [-- vLLM flags]
#   scripts/vllm_serve.sh wait  --port P [--timeout SECONDS]   # until http://127.0.0.1:P/health answers
#   scripts/vllm_serve.sh stop  --port P                       # Ctrl-C to the launcher: it stops vLLM
# State lives in logs/vllm-P.pid and logs/vllm-P.log under the repository ($VLLM_SERVE_DIR instead of logs/). The server listens on 0.0.0.0
# (the trainer is on another host): run it only on a trusted network (its dev routes can swap the model).
# CUDA_VISIBLE_DEVICES and TULU_JAX_VLLM_PYTHON pass through to the server.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

[ $# -ge 1 ] || usage_error "usage: vllm_serve.sh start|wait|stop --port P [...]"
ACTION=$1
shift
PORT="" MODEL="" DTYPE=bfloat16 TIMEOUT=900 HOST=0.0.0.0 MAX_LEN=""
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --port) need_value "$1" $# "${2:-}"; PORT=$2; shift 2 ;;
    --model) need_value "$1" $# "${2:-}"; MODEL=$2; shift 2 ;;
    --dtype) need_value "$1" $# "${2:-}"; DTYPE=$2; shift 2 ;;
    --host) need_value "$1" $# "${2:-}"; HOST=$2; shift 2 ;;
    --timeout) need_value "$1" $# "${2:-}"; TIMEOUT=$2; shift 2 ;;
    --max-model-len) need_value "$1" $# "${2:-}"; MAX_LEN=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage_error "unknown flag $1" ;;
  esac
done
case $PORT in
  '' | *[!0-9]*) usage_error "--port: give the server's port (a number)" ;;
esac
STATE=${VLLM_SERVE_DIR:-logs}
PID_FILE=$STATE/vllm-$PORT.pid
LOG=$STATE/vllm-$PORT.log
TULU_JAX=${TULU_JAX:-.venv/bin/tulu-jax}

# healthy URL: whether URL answers 200 (curl, else the project's Python).
healthy() {
  if command -v curl >/dev/null; then
    curl -sf -o /dev/null --max-time 5 "$1"
  else
    .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" 2>/dev/null
  fi
}

alive() {
  [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null
}

case $ACTION in
  start)
    [ -n "$MODEL" ] || usage_error "start: --model DIR is required"
    if alive; then
      say "a server is already running on port $PORT (pid $(cat "$PID_FILE")); stop it first"
      exit 1
    fi
    mkdir -p "$STATE"
    # Job control: the background server keeps SIGINT, which `stop` uses so that tulu-jax vllm shuts vLLM
    # down itself (a non-interactive shell's background jobs would otherwise ignore it).
    set -m
    cmd=("$TULU_JAX" vllm --model "$MODEL" --host "$HOST" --port "$PORT" --dtype "$DTYPE")
    # tulu-jax vllm's default is 2048 tokens; Tulu 3's RLVR needs prompt (2048) + response (2048).
    [ -z "$MAX_LEN" ] || cmd+=(--max-model-len "$MAX_LEN")
    # On a GPU host keep vLLM's CUDA graphs (tulu-jax vllm defaults to eager mode, which the CPU build needs).
    if command -v nvidia-smi >/dev/null; then cmd+=(--cuda-graphs); fi
    if [ ${#EXTRA[@]} -gt 0 ]; then
      cmd+=(-- "${EXTRA[@]}")
    fi
    echo "=== $(date -u '+%F %T') $(quote_all "${cmd[@]}")" >>"$LOG"
    # </dev/null: over ssh the server must not hold the session's stdin, or ssh would never return.
    nohup "${cmd[@]}" </dev/null >>"$LOG" 2>&1 &
    echo $! >"$PID_FILE"
    say "started tulu-jax vllm on port $PORT (pid $!, log $LOG)"
    ;;
  wait)
    PROBE=$HOST
    [ "$PROBE" != 0.0.0.0 ] || PROBE=127.0.0.1
    deadline=$(($(date +%s) + TIMEOUT))
    while :; do
      if healthy "http://$PROBE:$PORT/health"; then
        say "vLLM on port $PORT is ready"
        exit 0
      fi
      if ! alive; then
        say "the vLLM server on port $PORT exited; the end of $LOG:"
        tail -n 40 "$LOG" >&2 || true
        exit 1
      fi
      if [ "$(date +%s)" -ge "$deadline" ]; then
        say "vLLM on port $PORT not ready after $TIMEOUT s; the end of $LOG:"
        tail -n 40 "$LOG" >&2 || true
        exit 1
      fi
      sleep 2
    done
    ;;
  stop)
    if ! alive; then
      rm -f "$PID_FILE"
      exit 0
    fi
    pid=$(cat "$PID_FILE")
    kill -INT "$pid" 2>/dev/null || true
    # tulu-jax vllm gives vLLM 30 s to stop after SIGTERM, then kills its process group.
    for _ in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "server pid $pid still running after 60 s: SIGKILL"
      kill -KILL -- -"$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true # its group (set -m): vLLM too
    fi
    rm -f "$PID_FILE"
    say "stopped the vLLM server on port $PORT"
    ;;
  *) usage_error "unknown action $ACTION (start, wait or stop)" ;;
esac
