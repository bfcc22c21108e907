# shellcheck shell=bash
# Shared by the launchers (scripts/run_gpu.sh, tpu/*.sh): usage errors, shell quoting, and the one function
# every external command goes through, so that `--dry-run` prints exactly what would run. Sourced, not run.
# Bash 3.2 compatible (macOS laptops launch pods too).

DRY_RUN=${DRY_RUN:-0}
# Dry-run lines go to fd 3 (the real stdout), so a command printed inside $(...) is still seen.
exec 3>&1

# usage_error MESSAGE: one line on stderr, exit code 2 (bad flags, missing files), as the tulu-jax CLI does.
usage_error() {
  echo "${0##*/}: error: $*" >&2
  exit 2
}

# say MESSAGE: progress for the user, on stderr (stdout carries only the commands in --dry-run).
say() {
  echo "[${0##*/}] $*" >&2
}

# quote WORD: WORD as one shell word: as it is when it holds only safe characters, else single-quoted.
quote() {
  case $1 in
    '' | *[!A-Za-z0-9_./:=,@%+-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

# quote_all WORD...: the words quoted and joined by spaces (a command line that re-parses to the same words).
quote_all() {
  local out="" w
  for w in "$@"; do
    out="$out${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

# run CMD...: runs CMD; with --dry-run prints it (one line, shell-quoted) instead.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$(quote_all "$@")" >&3
    return 0
  fi
  "$@"
}

# capture PLACEHOLDER CMD...: CMD's stdout; with --dry-run prints CMD and yields PLACEHOLDER.
capture() {
  local placeholder=$1
  shift
  if [ "$DRY_RUN" = 1 ]; then
    run "$@"
    printf '%s' "$placeholder"
    return 0
  fi
  "$@"
}

# need_value FLAG NEXT_ARG_COUNT [VALUE]: a flag that takes a value must have one (and, when VALUE is given, not
# another flag in its place: `--name --dry-run` must not name the TPU "--dry-run").
need_value() {
  [ "$2" -ge 2 ] || usage_error "$1 needs a value"
  case ${3:-} in
    --*) usage_error "$1 needs a value (got the flag $3)" ;;
  esac
}

# check_overrides ARG...: every trainer override is dotted.key=value.
check_overrides() {
  local o
  for o in "$@"; do
    case $o in
      -*) usage_error "unknown flag $o (flags go before the stage and config)" ;;
      *=*) ;;
      *) usage_error "override $(quote "$o") is not dotted.key=value" ;;
    esac
  done
}

# stage_of CONFIG: the trainer stage of configs/STAGE/NAME.yaml, else "".
stage_of() {
  local dir
  dir=$(basename "$(dirname "$1")")
  case $dir in
    sft | dpo | rm | rlvr) printf '%s' "$dir" ;;
    *) printf '' ;;
  esac
}

# parse_stage_config ARG...: sets STAGE, CONFIG and OVERRIDES (an array) from `[STAGE] CONFIG [key=value ...]`.
# A config under configs/STAGE/ names its stage; any other config needs the stage first.
parse_stage_config() {
  STAGE=""
  case ${1:-} in
    sft | dpo | rm | rlvr) STAGE=$1; shift ;;
  esac
  [ $# -ge 1 ] || usage_error "missing the config (usage: [STAGE] CONFIG [key=value ...])"
  CONFIG=$1
  shift
  if [ ! -f "$CONFIG" ]; then
    case $CONFIG in
      */* | *.yaml | *.yml) usage_error "config $CONFIG: no such file" ;;
      *) usage_error "unknown stage $CONFIG (sft, dpo, rm or rlvr), or a config path that does not exist" ;;
    esac
  fi
  local dir_stage
  dir_stage=$(stage_of "$CONFIG")
  if [ -z "$STAGE" ]; then
    STAGE=$dir_stage
    [ -n "$STAGE" ] || usage_error "config $CONFIG: not under configs/{sft,dpo,rm,rlvr}/; give the stage first"
  elif [ -n "$dir_stage" ] && [ "$dir_stage" != "$STAGE" ]; then
    usage_error "config $CONFIG is a $dir_stage config, not $STAGE"
  fi
  OVERRIDES=("$@")
  if [ ${#OVERRIDES[@]} -gt 0 ]; then
    check_overrides "${OVERRIDES[@]}"
  fi
}

# override_value KEY OVERRIDE...: the value of the last KEY=value among the overrides ("" if none).
override_value() {
  local key=$1 o value=""
  shift
  for o in "$@"; do
    case $o in
      "$key="*) value=${o#"$key="} ;;
    esac
  done
  printf '%s' "$value"
}

# check_vllm_flags FLAG: the checks of FLAG (--vllm-hosts, --vllm-gpu), which makes the run use vLLM servers
# it starts: RLVR only, no rollout.backend/servers of the user's, a model to serve (VLLM_MODEL, else the
# model.path override), a numeric VLLM_PORT and VLLM_TIMEOUT. Reads STAGE and OVERRIDES; sets VLLM_MODEL.
check_vllm_flags() {
  local key
  [ "$STAGE" = rlvr ] || usage_error "$1 is for the rlvr stage, not $STAGE"
  for key in rollout.backend rollout.servers; do
    [ -z "$(override_value "$key" ${OVERRIDES[@]+"${OVERRIDES[@]}"})" ] || usage_error "$key: set by $1; drop the override"
  done
  VLLM_MODEL=${VLLM_MODEL:-$(override_value model.path ${OVERRIDES[@]+"${OVERRIDES[@]}"})}
  [ -n "$VLLM_MODEL" ] || usage_error "$1: give --vllm-model DIR or a model.path=DIR override"
  case $VLLM_PORT in
    '' | *[!0-9]*) usage_error "--vllm-port $VLLM_PORT: expected a number" ;;
  esac
  case ${VLLM_TIMEOUT:-x} in
    *[!0-9]*) usage_error "--vllm-timeout ${VLLM_TIMEOUT:-}: expected seconds (a number)" ;;
  esac
}
