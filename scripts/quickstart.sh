#!/usr/bin/env bash
# Sets up the environment and runs the whole Tülu 3 recipe on the embedded default, on the CPU (~15 min on
# 2 cores): SFT of a tiny Llama-style model on the bundled chat set -> length-normalized DPO on the bundled
# preference pairs -> a reward model -> RLVR (PPO, value model from the reward model, verifiable rewards,
# local sampler) on the bundled tiny_arith/tiny_if prompts -> greedy accuracy of each stage's export on the
# held-out tiny tasks, as one table (also runs/report/accuracy.json). Extra arguments are config overrides
# for the SFT and DPO stages, e.g. train.max_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=/dev/null  # the venv this script made
. .venv/bin/activate
export HF_HUB_OFFLINE=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
tulu-jax sft --config configs/sft/tiny.yaml "$@"
tulu-jax dpo --config configs/dpo/tiny.yaml "$@"
tulu-jax rm --config configs/rm/tiny.yaml
tulu-jax rlvr --config configs/rlvr/tiny.yaml
# Each export answers the held-out tiny tasks greedily, scored by the RLVR verifiers (--overwrite: the
# exports may have been retrained since an earlier quickstart).
for stage in sft dpo rlvr; do
  echo "[quickstart] $stage export on the held-out verifiable tasks"
  tulu-jax eval --model "runs/$stage-tiny/hf" --tasks tiny_arith,tiny_if --out "runs/eval/$stage-tiny" --overwrite
done
python -m tulu_jax.evaluation.report sft=runs/eval/sft-tiny dpo=runs/eval/dpo-tiny rlvr=runs/eval/rlvr-tiny \
  --out runs/report/accuracy.json
