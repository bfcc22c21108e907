#!/usr/bin/env bash
# Sets up the environment and runs the embedded default on the CPU (~10 min on 2 cores): SFT of a tiny
# Llama-style model on the bundled chat set, then length-normalized DPO of that SFT export on the bundled
# preference pairs, then the verifiable-task accuracy of both exports (tiny_arith, tiny_if). Extra
# arguments are config overrides for both training stages, e.g. train.max_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
tulu-jax sft --config configs/sft/tiny.yaml "$@"
tulu-jax dpo --config configs/dpo/tiny.yaml "$@"
# Each export answers the held-out tiny tasks greedily, scored by the RLVR verifiers (--overwrite: the
# exports may have been retrained since an earlier quickstart).
for stage in sft dpo; do
  echo "[quickstart] $stage export on the held-out verifiable tasks"
  tulu-jax eval --model "runs/$stage-tiny/hf" --tasks tiny_arith,tiny_if --out "runs/eval/$stage-tiny" --overwrite
done
