#!/usr/bin/env bash
# Creates .venv (if missing) and installs tulu_jax with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck source=/dev/null  # the venv this script made
. .venv/bin/activate
python -m pip install -q --upgrade pip
echo "[setup] installing tulu_jax and its dependencies (first time: ~2 min)"
# torch==2.13.0 (CPU) comes from the test extra; other torch versions pull multi-GB CUDA builds.
# TULU_JAX_EXTRAS picks the extras (default: test); empty on training hosts, which need no torch (tpu/setup.sh).
EXTRAS=${TULU_JAX_EXTRAS-test}
python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
