#!/usr/bin/env bash
# The one-shot GPU check of mefn_fast, for a lent GPU machine with no network.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine (about 400 s; 420 s at most)
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/x   # the same stages here, without a GPU
#
# Seven stages, each under its own time limit (a failed or timed-out stage is recorded and the next
# still runs): environment, build, CUDA GPU tests, Triton GPU tests, benchmarks, compute-sanitizer,
# summary. Seven files land in $OUT: summary.md (every verdict and table), results.csv,
# results.json, tests.xml and three logs. benchmarks/gpu_check.py says what each stage does;
# `bash benchmarks/gpu_check.sh --help` lists the flags (--budget-s, --skip-build, --python).
# The machine's python3 runs it (PYTHON=... to choose another); nothing is downloaded.
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
