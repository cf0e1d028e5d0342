#!/usr/bin/env bash
# Set up roberta_fast on a fresh machine: torch (the local CPU build where there is no GPU), the
# package (editable; builds csrc/ when nvcc is found) and its test/bench extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"

if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP torch
  else
    # a bare `torch` requirement would pull a multi-GB CUDA build: pin the CPU one first
    $PIP "torch==2.13.0" || $PIP torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP setuptools wheel pybind11 ninja
$PIP --no-build-isolation -e ".[test]"
$PY -c "import roberta_fast, torch; print(f'roberta_fast {roberta_fast.__version__} on torch {torch.__version__}')"
