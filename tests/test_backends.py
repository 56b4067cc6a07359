"""The backend registry and ``python -m mefn_fast.info``."""
from __future__ import annotations

import logging
import subprocess
import sys

import torch

import mefn_fast
from mefn_fast.backends import BACKENDS, select_backend
from mefn_fast.options import XAttnOptions


def test_reference_always_available_and_reasons_for_the_rest():
    status = mefn_fast.backend_status()
    assert set(status) == {"reference", "cpu", "triton", "cuda"}
    assert status["reference"] is None
    assert "reference" in mefn_fast.available_backends()
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason)
    assert mefn_fast.available_backends() == [n for n, r in status.items() if r is None]
    if not torch.cuda.is_available():
        assert status["cuda"] is not None


def test_auto_picks_an_available_backend_and_logs_it(caplog):
    r, w = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with caplog.at_level(logging.INFO, logger="mefn_fast"):
        name, impl = select_backend("auto", r, w, XAttnOptions())
    assert name in mefn_fast.available_backends() and callable(impl)
    assert BACKENDS[name].reasons(r, w, XAttnOptions()) == []
    # fp16 on the CPU: the cpu op (computing in float32) when it is built, else the reference
    name16, _ = select_backend("auto", r.half(), w.half(), XAttnOptions())
    assert name16 == ("cpu" if "cpu" in mefn_fast.available_backends() else "reference")


def test_info_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "mefn_fast.info"], capture_output=True, text=True, check=True).stdout
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in out
    for name, reason in mefn_fast.backend_status().items():
        if reason is not None:
            assert reason in out
