#!/usr/bin/env bash
# Set up, lint (ruff), then run the test suite (CPU: Triton kernels under TRITON_INTERPRET=1, CUDA C++ kernels
# through the emulation; `gpu` tests run only where CUDA is available). Extra arguments go to pytest.
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --fast     the inner loop: skips the `slow` tests (the ahead-of-time compile checks)
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [[ "$a" == "--fast" ]]; then args+=(-m "not slow"); else args+=("$a"); fi
done
bash scripts/setup.sh
python3 -m ruff check .
exec python3 -m pytest -q -ra "${args[@]}"
