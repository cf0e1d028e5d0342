#!/usr/bin/env bash
# The whole GPU check on a fresh machine with torch, triton and nvcc (no network needed), in < 9 min
# on one H100:
#   1. install the checkout editable (builds csrc/ into roberta_fast._C when nvcc is found)
#   2. the `gpu` tests:  pytest -m gpu -q tests/
#   3. the quick benchmarks: roberta-fast bench --quick --out OUTDIR (bounded by what time is left)
#
# usage: benchmarks/gpu_suite.sh OUTDIR
# OUTDIR gets at most 6 files: suite_log.txt (every step's output), results.json, results.md,
# speedup.png, ceiling.png, encoder.png. Exit status: 0 when every step passed, else 1.
# Environment: SUITE_SECONDS (default 540) total budget, INSTALL_SECONDS (default 240) for step 1;
# ROBERTA_FAST_GIT_SHA recorded in the JSON
# when the checkout has no .git; PYTHON (default python3).
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
TOTAL=${SUITE_SECONDS:-540}
INSTALL_LIMIT=${INSTALL_SECONDS:-240}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
LOG="$OUT/suite_log.txt"
START=$(date +%s)
: > "$LOG"
STATUS=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME TIMEOUT_S CMD...: run CMD with a time limit, append its output to the log
step() {
  local name=$1 limit=$2
  shift 2
  if (( limit < 10 )); then
    echo "=== [$name] skipped: no time left ($(elapsed) s used of $TOTAL)" | tee -a "$LOG"
    STATUS+=("$name: skipped (no time left)"); FAILED=1
    return 1
  fi
  echo "=== [$name] $* (limit ${limit}s, at $(elapsed)s)" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  echo "=== [$name] exit $rc after ${dt}s" | tee -a "$LOG"
  STATUS+=("$name: exit $rc (${dt}s)")
  if (( rc != 0 )); then FAILED=1; fi
  return $rc
}

left() { echo $(( TOTAL - $(elapsed) )); }

{
  echo "# roberta_fast GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# checkout: $(pwd)  git: ${ROBERTA_FAST_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not found"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  $PY -c "import transformers; print('transformers', transformers.__version__)" 2>&1 || true
} >> "$LOG" 2>&1

# 1. install + build (a build failure leaves the triton backend; the install itself must work)
step install $(( $(left) < INSTALL_LIMIT ? $(left) : INSTALL_LIMIT )) \
  $PY -m pip install --no-deps --no-build-isolation --disable-pip-version-check -e .
step built 30 $PY -c "from roberta_fast import backends as b; import sys; \
m = b.cuda_module(); print('roberta_fast._C:', m.__file__ if m else 'NOT BUILT'); sys.exit(0 if m else 1)"

# 2. the gpu tests, leaving at least 200 s for the benchmarks
TEST_LIMIT=$(( $(left) - 200 ))
(( TEST_LIMIT > 240 )) && TEST_LIMIT=240
# several workers when pytest-xdist is there: most of this step is Triton JIT-compiling kernels on the CPU
XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step gpu-tests $TEST_LIMIT $PY -m pytest -m gpu -q -ra -p no:cacheprovider "${XDIST[@]}" tests/

# 3. quick benchmarks within what is left (the harness skips, and says so, what would not fit)
BENCH_LIMIT=$(( $(left) - 10 ))
step bench $BENCH_LIMIT $PY -m roberta_fast.cli bench --quick --out "$OUT" --no-progress \
  --time-budget $(( BENCH_LIMIT > 40 ? BENCH_LIMIT - 30 : 10 ))

{
  echo "=== summary ($(elapsed) s)"
  for s in "${STATUS[@]}"; do echo "  $s"; done
  echo "files: $(ls "$OUT" | tr '\n' ' ')"
} | tee -a "$LOG"
exit $FAILED
