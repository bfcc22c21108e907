#!/usr/bin/env bash
# One command for the GPU benchmark (scripts/bench_gpu.py): ~6-10 minutes on one H100/H200.
#   scripts/bench_gpu.sh [bench_gpu.py flags, e.g. --peak-flops 989e12 --json out.json]
# Wheels the machine lacks go in the git-ignored wheels/ folder beforehand (<= 64 MiB in all), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 PACKAGE==VERSION -d wheels/
# They are installed here without an index and without dependencies, only if `wheels/` holds any.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if compgen -G "wheels/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps wheels/*.whl
fi
# Let XLA take what it needs rather than preallocating 75% of the GPU (the sampler rows build their own
# models after the train steps have run).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/bench_gpu.py "$@"
