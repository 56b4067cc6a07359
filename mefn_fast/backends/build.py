"""The build record of the C++/CUDA extension ``mefn_fast._C``, and whether that build may be loaded
into the running torch.

``setup.py`` writes the record, ``_build_info.json``, into the built package itself (the wheel, the
installed package, or the source package of an editable install) before anything is copied from
there, so every install reports its own build. It holds what was built (``built``, ``cuda``, and
``reason`` for anything that was not), against which torch (``torch``, ``torch_cuda``,
``cxx11_abi``), and with which CUDA toolkit, architectures, compiler, Python and platform.

The extension is written against torch's C++ API (ATen, ``TORCH_LIBRARY``), whose ABI is not kept
from one torch release to the next (2.13 to 2.14); the patch releases of one series (2.14.0,
2.14.1) keep it. A library built for another series may fail to resolve its symbols, or resolve
them and crash. So :func:`extension_problem` refuses a build for another release series, another
C++ ABI setting or another CUDA major version: the cpu and cuda backends report that reason
(``python -m mefn_fast.info``, and ``backend="auto"`` warns when it falls back to the reference)
and ``mefn_fast._C`` is never loaded.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

RECORD_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")
BUILD_FIX = "install torch, then from a checkout or sdist of mefn_fast: pip install --no-build-isolation ."
REBUILD_FIX = ("rebuild it against the running torch: from a checkout or sdist of mefn_fast, "
               "pip install --no-build-isolation --no-deps --force-reinstall .")


def build_info() -> dict:
    """What ``setup.py`` recorded about the C++/CUDA extension build."""
    try:
        with open(RECORD_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"built": False, "cuda": False,
                "reason": "no build record: this copy of mefn_fast was not installed by its setup.py"}


def _series(version: Optional[str]) -> Optional[tuple]:
    """(major, minor) of a torch or CUDA version string such as ``2.14.1+cu130`` or ``13.0``."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def extension_problem(info: Optional[dict] = None) -> Optional[str]:
    """Why ``mefn_fast._C`` cannot be used in this process, and what to do; None when it can.

    ``info`` is a build record (default: this package's own, :func:`build_info`).
    """
    info = build_info() if info is None else info
    if not info.get("built"):
        return f"C++ extension not built: {info.get('reason') or 'unknown reason'}; to build it, {BUILD_FIX}"
    built = info.get("torch")
    if _series(built) != _series(torch.__version__):
        pin = re.match(r"[\d.]+", built or "")
        return (f"mefn_fast._C was built against torch {built} but torch {torch.__version__} is running, and "
                f"torch's C++ ABI changes between releases, so the compiled ops are disabled; {REBUILD_FIX}"
                + (f" (or install torch=={pin.group(0).rstrip('.')})" if pin else ""))
    abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    if "cxx11_abi" in info and bool(info["cxx11_abi"]) != abi:
        return (f"mefn_fast._C was built with _GLIBCXX_USE_CXX11_ABI={int(bool(info['cxx11_abi']))} but the running "
                f"torch uses {int(abi)}, so the compiled ops are disabled; {REBUILD_FIX}")
    built_cuda = _series(info.get("torch_cuda"))
    if info.get("cuda") and (built_cuda is None or built_cuda[0] != (_series(torch.version.cuda) or (None,))[0]):
        return (f"mefn_fast._C holds CUDA ops built for torch's CUDA {info.get('torch_cuda')} but the running torch "
                f"has CUDA {torch.version.cuda or 'none'}, so the compiled ops are disabled; {REBUILD_FIX}")
    return None
