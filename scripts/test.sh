#!/usr/bin/env bash
# Set up, lint (ruff), then run the test suite (CPU: Triton kernels under TRITON_INTERPRET=1; `gpu` tests run
# only where CUDA is available).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check .
exec python3 -m pytest -q -ra "$@"
