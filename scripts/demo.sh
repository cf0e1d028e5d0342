#!/usr/bin/env bash
# The main job: set up, then encode built-in sentences with a roberta-base-sized random-init model
# (no download), check parity with transformers and print what ran where.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec roberta-fast demo "$@"
