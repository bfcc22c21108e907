#!/usr/bin/env bash
# Sets up the environment and runs the embedded default on the CPU (~4 min on 2 cores): SFT of a tiny
# Llama-style model on the bundled chat set, then length-normalized DPO of that SFT export on the bundled
# preference pairs. Extra arguments are config overrides for both stages, e.g. train.max_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
tulu-jax sft --config configs/sft/tiny.yaml "$@"
tulu-jax dpo --config configs/dpo/tiny.yaml "$@"
