#!/usr/bin/env bash
# Sets up the environment and runs the embedded default: SFT of a tiny Llama-style model on the bundled
# chat set, on the CPU (~1-2 min). Extra arguments are config overrides, e.g. train.max_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
tulu-jax sft --config configs/sft/tiny.yaml "$@"
