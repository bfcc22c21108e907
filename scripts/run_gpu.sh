#!/usr/bin/env bash
# Trains on one multi-GPU host: one process that sees every GPU (the shipped configs' mesh takes all of
# them: fsdp or data = -1). For RLVR, --vllm-gpu K serves the policy with vLLM on GPU K instead: the server
# starts first (CUDA_VISIBLE_DEVICES=K), the trainer gets the other GPUs and
# rollout.backend=vllm rollout.servers=[http://127.0.0.1:PORT], and the server is stopped when the run ends,
# fails or is interrupted.
#   scripts/run_gpu.sh [flags] [STAGE] CONFIG [key=value ...]
# STAGE (sft, dpo, rm, rlvr) may be left out for a config under configs/STAGE/.
# Flags:
#   --gpus 0,1,...       the GPUs to use (default: $CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists)
#   --vllm-gpu K         RLVR: run a vLLM server on GPU K (one of --gpus) for the rollouts
#   --vllm-model DIR     the model it serves (default: the model.path=... override)
#   --vllm-port P (8000) --vllm-timeout SECONDS (900) --vllm-arg ARG (a vLLM flag; repeatable)
#   --vllm-max-model-len N  prompt + response tokens a server holds (tulu-jax vllm's default: 2048; the
#                        Tulu 3 RLVR configs need 4096)
#   --setup              first set up .venv with jax[cuda12] (scripts/setup_host.sh) and, with --vllm-gpu,
#                        .venv-vllm with vllm==0.32.0 (TULU_JAX_VLLM_SPEC overrides the package)
#   --dry-run            print the commands, run nothing
# A killed run resumes from its last checkpoint when the same command is run again.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

GPUS=${CUDA_VISIBLE_DEVICES:-} VLLM_GPU="" VLLM_MODEL="" VLLM_PORT=8000 VLLM_TIMEOUT=900 VLLM_MAX_LEN="" SETUP=0
VLLM_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --gpus) need_value "$1" $# "${2:-}"; GPUS=$2; shift 2 ;;
    --vllm-gpu) need_value "$1" $# "${2:-}"; VLLM_GPU=$2; shift 2 ;;
    --vllm-model) need_value "$1" $# "${2:-}"; VLLM_MODEL=$2; shift 2 ;;
    --vllm-port) need_value "$1" $# "${2:-}"; VLLM_PORT=$2; shift 2 ;;
    --vllm-timeout) need_value "$1" $# "${2:-}"; VLLM_TIMEOUT=$2; shift 2 ;;
    --vllm-max-model-len) need_value "$1" $# "${2:-}"; VLLM_MAX_LEN=$2; shift 2 ;;
    --vllm-arg) need_value "$1" $#; VLLM_ARGS+=("$2"); shift 2 ;;
    --setup) SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 0 ;;
    -*) usage_error "unknown flag $1" ;;
    *) break ;;
  esac
done
parse_stage_config "$@"

if [ -z "$GPUS" ]; then
  command -v nvidia-smi >/dev/null || usage_error "no GPUs found (no nvidia-smi): pass --gpus 0,1,..."
  GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | tr -d ' ' | paste -sd, -)
fi
case ,$GPUS, in
  ,, | *[!0-9,]* | *,,*) usage_error "--gpus $GPUS: expected GPU indices like 0,1,2,3" ;;
esac

TRAIN_GPUS=$GPUS
if [ -n "$VLLM_GPU" ]; then
  check_vllm_flags --vllm-gpu
  case ,$GPUS, in
    *,"$VLLM_GPU",*) ;;
    *) usage_error "--vllm-gpu $VLLM_GPU: not one of the GPUs ($GPUS)" ;;
  esac
  TRAIN_GPUS=$(printf '%s\n' "$GPUS" | tr ',' '\n' | grep -vx "$VLLM_GPU" | paste -sd, - || true)
  [ -n "$TRAIN_GPUS" ] || usage_error "--vllm-gpu $VLLM_GPU leaves no GPU for the trainer"
fi
n_train=$(printf '%s\n' "$TRAIN_GPUS" | tr ',' '\n' | grep -c .)
if [ $((n_train & (n_train - 1))) -ne 0 ]; then # model widths split over a mesh axis evenly only by powers of 2
  say "warning: the trainer gets $n_train GPUs ($TRAIN_GPUS); a mesh axis of $n_train rarely divides a model's" \
    "widths: pick 2, 4 or 8 with --gpus, or set mesh.data/mesh.fsdp so that fsdp is a power of two"
fi

if [ "$SETUP" = 1 ]; then
  setup=(bash "$ROOT/scripts/setup_host.sh" --jax cuda12)
  [ -z "$VLLM_GPU" ] || setup+=(--vllm "${TULU_JAX_VLLM_SPEC:-vllm==0.32.0}")
  run "${setup[@]}"
fi

SERVE=(bash "$ROOT/scripts/vllm_serve.sh")
stop_vllm() {
  run "${SERVE[@]}" stop --port "$VLLM_PORT" || true
}
if [ -n "$VLLM_GPU" ]; then
  start=(start --port "$VLLM_PORT" --host 127.0.0.1 --model "$VLLM_MODEL")
  [ -z "$VLLM_MAX_LEN" ] || start+=(--max-model-len "$VLLM_MAX_LEN")
  [ ${#VLLM_ARGS[@]} -eq 0 ] || start+=(-- "${VLLM_ARGS[@]}")
  trap 'exit 130' INT TERM
  run env CUDA_VISIBLE_DEVICES="$VLLM_GPU" "${SERVE[@]}" "${start[@]}"
  trap stop_vllm EXIT # only once started: a server already on the port is not ours to stop
  run "${SERVE[@]}" wait --port "$VLLM_PORT" --host 127.0.0.1 --timeout "$VLLM_TIMEOUT"
  OVERRIDES+=(rollout.backend=vllm "rollout.servers=[http://127.0.0.1:$VLLM_PORT]")
fi

say "training $STAGE on GPUs $TRAIN_GPUS"
run env CUDA_VISIBLE_DEVICES="$TRAIN_GPUS" "${TULU_JAX:-$ROOT/.venv/bin/tulu-jax}" "$STAGE" --config "$CONFIG" \
  ${OVERRIDES[@]+"${OVERRIDES[@]}"}
