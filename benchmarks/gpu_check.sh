#!/usr/bin/env bash
# GPU check of mefn_fast for a lent H100/H200 with no network.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # from the repository root
#
# Uses the machine's own python3 (torch, triton, nvcc, ninja already installed; nothing is
# downloaded). Within about 8 minutes in all, it:
#   1. records the machine (nvidia-smi, versions)                         -> $OUT/env.txt
#   2. builds and installs the package from this tree with
#      pip install --no-build-isolation --no-deps -e . (C++/CUDA extension for sm_90), falling
#      back to an in-place build, then to the pure-Python package on PYTHONPATH  -> $OUT/install.log
#   3. runs every GPU test: pytest -m gpu on tests/test_xattn_similarity_triton.py and, when it
#      exists, tests/test_xattn_similarity_cuda.py                  -> $OUT/gpu-tests.log, .xml
#   4. runs the GPU workloads of docs/math.md (floor, reference, triton, cuda when available;
#      CUDA-event timing)      -> $OUT/xattn_similarity_gpu.md, $OUT/xattn_similarity_gpu.csv
#   5. writes $OUT/summary.md (stage results and the benchmark table).
# The reference is not run on eval-coco5k-gpu (hours); on eval-f30k-gpu it is timed on 500 of
# the 5000 captions and scaled linearly (it is a Python loop over caption chunks), and the rows
# say so. Triton runs one heuristic configuration (MEFN_TRITON_SINGLE_CONFIG=1) so that
# compilation time stays predictable; autotuning is what a normal run does.
#
# If the machine's python3 has no pytest, the script looks for pytest's pure-Python packages in
# .venv/lib/python3*/site-packages (carry .venv/lib/python3.11/site-packages/{pytest,_pytest,
# pluggy,iniconfig,packaging} with the tree).
# Environment: OUT (default ./gpu-check-out), GPU_CHECK_BUDGET_S (default 470), PYTHON (python3),
# GPU_CHECK_SKIP_INSTALL=1 (use the tree as it is). Without a GPU (a check of the script itself)
# the tests are all skipped and the benchmark runs its --dry-run.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
clamp() { local v=$1 lo=$2 hi=$3; (( v < lo )) && v=$lo; (( v > hi )) && v=$hi; echo "$v"; }
SUMMARY=$OUT/summary.md
echo "# mefn_fast GPU check" > "$SUMMARY"
stage() { echo "- $1" | tee -a "$SUMMARY"; }

# 1. the machine
{
  date -u; echo
  nvidia-smi 2>&1 | head -20; echo
  "$PY" - <<'PY' 2>&1
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
PY
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v ninja >/dev/null && echo "ninja $(ninja --version)"
} > "$OUT/env.txt" 2>&1
stage "machine: $(grep -m1 '^python' "$OUT/env.txt" || echo unknown)"

# 2. build and install (no network, no dependency resolution)
export MAX_JOBS=${MAX_JOBS:-16} MEFN_CUDA_ARCHS=${MEFN_CUDA_ARCHS:-9.0}
unset TRITON_INTERPRET
T=$(clamp $(( $(left) - 300 )) 60 200)
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
  stage "install: skipped (GPU_CHECK_SKIP_INSTALL=1)"
elif timeout "$T" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/install.log" 2>&1; then
  stage "install: pip install -e . ok"
elif [ $? -eq 124 ]; then
  stage "install: pip install timed out after ${T}s (see install.log); using the pure-Python package from the tree"
else
  echo "pip install failed or timed out (${T}s); trying an in-place build" >> "$OUT/install.log"
  T=$(clamp $(( $(left) - 300 )) 30 150)
  if timeout "$T" "$PY" setup.py build_ext --inplace >> "$OUT/install.log" 2>&1; then
    stage "install: pip failed, in-place build ok (see install.log)"
  else
    stage "install: FAILED (see install.log); using the pure-Python package from the tree"
  fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
"$PY" -m mefn_fast.info > "$OUT/info.txt" 2>&1 || true
stage "backends: $(grep -E '^\s+(cuda|triton) ' "$OUT/info.txt" | sed 's/  */ /g' | tr '\n' ';')"

# pytest from the tree's virtual environment when the machine has none (pure Python packages)
if ! "$PY" -c "import pytest" 2>/dev/null; then
  DEPS=$(mktemp -d)
  for sp in "$REPO"/.venv/lib/python3*/site-packages; do
    for pkg in pytest _pytest pluggy iniconfig packaging py.py; do
      [ -e "$sp/$pkg" ] && [ ! -e "$DEPS/$pkg" ] && ln -s "$sp/$pkg" "$DEPS/$pkg"
    done
  done
  export PYTHONPATH=$PYTHONPATH:$DEPS
fi

# 3. GPU tests, after compiling their Triton kernels (and the benchmark's) in parallel processes:
#    compilation, not running, is what takes the time (up to ~30 s for one 256-row kernel).
export MEFN_TRITON_SINGLE_CONFIG=1
T=$(clamp $(( $(left) - 280 )) 30 150)
timeout $(( T + 15 )) "$PY" benchmarks/bench_xattn_similarity_gpu.py --precompile "$T" > "$OUT/precompile.log" 2>&1
stage "precompile: rc=$? $(tail -1 "$OUT/precompile.log")"
TESTS=(tests/test_xattn_similarity_triton.py)
[ -f tests/test_xattn_similarity_cuda.py ] && TESTS+=(tests/test_xattn_similarity_cuda.py)
T=$(clamp $(( $(left) - 170 )) 60 200)
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout "$T" "$PY" -m pytest -o addopts="" -p no:cacheprovider -m gpu -v -rA --durations=15 \
      --junitxml="$OUT/gpu-tests.xml" "${TESTS[@]}" > "$OUT/gpu-tests.log" 2>&1
  rc=$?
  res=$(grep -E '^=+ .* in [0-9.]+s.*=+$' "$OUT/gpu-tests.log" | tail -1)
  [ $rc -eq 124 ] && res="TIMED OUT after ${T}s; $(grep -cE ' PASSED| FAILED' "$OUT/gpu-tests.log") tests finished"
  stage "gpu tests (${TESTS[*]}): rc=$rc $res"
else
  stage "gpu tests: SKIPPED, no pytest for $PY (see the header of this script)"
fi

# 4. benchmark
T=$(clamp $(( $(left) - 10 )) 30 400)
B=$(clamp $(( T - 60 )) 20 400)
DRY=()
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DRY=(--dry-run)  # CPU: smoke test
timeout "$T" "$PY" benchmarks/bench_xattn_similarity_gpu.py ${DRY[@]+"${DRY[@]}"} --out "$OUT" --budget-s "$B" > "$OUT/bench.log" 2>&1
rc=$?
stage "benchmark: rc=$rc$([ $rc -eq 124 ] && echo " (timed out after ${T}s; rows measured so far are kept)")"

# 5. summary
{
  echo; echo "elapsed: $(( $(date +%s) - START )) s of a ${BUDGET} s budget"; echo
  [ -f "$OUT/xattn_similarity_gpu.md" ] && cat "$OUT/xattn_similarity_gpu.md"
  echo; echo "## failing tests"; grep -E 'FAILED|ERROR' "$OUT/gpu-tests.log" 2>/dev/null | head -30
} >> "$SUMMARY"
cat "$SUMMARY"
