#!/usr/bin/env bash
# The GPU check (issue 19) without `make setup`: for a GPU machine whose python already has a CUDA
# build of torch (and Triton), e.g. the device tool's machine, which cannot reach PyPI.
#
#   GPU_CHECK_PYTHON=python3 bash scripts/gpu-check.sh "$OUT"        # output folder, default outputs/gpu_check
#
# Python packages the check needs and that python lacks travel as wheels in .whl/ (made here by
# `make gpu-check-wheels`; the device tool carries the ignored folder with carry: [".whl"]); they are
# installed into a temporary folder, never into that python. The repository itself is used from src/.
# Without an NVIDIA GPU: one line, exit 0. Exit status otherwise: the check's (0 all passed, 1 failures).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_check}
PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi -L finds none): nothing to check"
  exit 0
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=$(mktemp -d /tmp/vidistill-gpu-site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m vidistill.gpu_check --out "$OUT"
