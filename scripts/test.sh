#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM (own venv, .venv-vllm) for the `vllm` tests. A developer may skip them with TULU_JAX_SKIP_VLLM=1;
# in CI (CI=true) they always run, and fail if the server cannot start.
if [ "${TULU_JAX_SKIP_VLLM:-0}" != 1 ] || [ "${CI:-}" = true ]; then
  bash scripts/setup_vllm.sh
fi
# shellcheck source=/dev/null  # the venv this script made
. .venv/bin/activate
export HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=8"
python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
