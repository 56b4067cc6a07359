"""pytest-benchmark suite: every named workload (docs/math.md), every backend and peer, forward and
forward+backward, plus the two matrix-product floors.

    .venv/bin/python -m pytest benchmarks --benchmark-enable        # timed, full sizes
    .venv/bin/python -m pytest benchmarks                           # smoke: once each, reduced sizes

pytest.ini disables timing by default, so the test command (and CI) runs every case once as a
smoke test, on a reduced size (the compiled peer only when timing: its compilation takes a minute
per case). Every case first checks the backend or peer against the reference on a small version
of the workload. For ratios measured in one run, interleaved, with memory and plots,
use the runner: ``python -m mefn_fast.bench``.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import mefn_fast
from mefn_fast.bench.runner import (DTYPES, FLOORS, PEERS, TOLERANCE, WORKLOADS, check_against_reference,
                                    make_inputs, make_step)

SMOKE_FACTOR = 0.05
BACKENDS = [*FLOORS, *mefn_fast.backends.BACKENDS, *PEERS]


def _cases():
    for w in WORKLOADS.values():
        for dtype in w.dtypes:
            for backward in (False, True):
                for backend in BACKENDS:
                    yield pytest.param(w, dtype, backward, backend,
                                       id=f"{w.name}-{dtype}-{'fwd+bwd' if backward else 'fwd'}-{backend}")


def _device(w) -> str:
    if w.device == "both":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return w.device


@pytest.mark.parametrize("workload,dtype_name,backward,backend", list(_cases()))
def test_bench(benchmark, workload, dtype_name, backward, backend):
    device = _device(workload)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU workload: no CUDA GPU visible (benchmarks/gpu_check.sh runs these on a lent GPU)")
    dtype = DTYPES[dtype_name]
    if device == "cpu" and dtype_name in ("fp16", "bf16") and backend not in FLOORS:
        pytest.skip(f"{dtype_name} is a GPU dtype for this workload")
    if backend == "sorted-compiled" and benchmark.disabled:
        pytest.skip("the compiled peer compiles for a minute per case: timed runs only (tests/test_bench_runner.py checks it)")
    w = replace(workload, backward=backward)
    if backend in PEERS:
        err = check_against_reference(w, backend, device, dtype)
        assert err <= TOLERANCE[dtype_name], f"{backend} differs from the reference by {err}"
    elif backend not in FLOORS:
        probe = torch.empty(1, 1, 1, device=device, dtype=dtype)
        reasons = mefn_fast.backends.BACKENDS[backend].reasons(probe, probe, mefn_fast.make_options(direction=w.direction))
        if reasons:
            pytest.skip(f"{backend}: {'; '.join(reasons)}")
        if backend != "reference":
            err = check_against_reference(w, backend, device, dtype)
            assert err <= TOLERANCE[dtype_name], f"{backend} differs from the reference by {err}"
    if benchmark.disabled:
        w = w.scaled(SMOKE_FACTOR)
    step = make_step(w, backend, make_inputs(w, device, dtype, requires_grad=backward))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        out = step()
        sync()
        return out

    out = benchmark.pedantic(run, rounds=5, warmup_rounds=1) if not benchmark.disabled else benchmark(run)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    assert all(torch.isfinite(o).all() for o in outs)
    benchmark.extra_info.update(workload=w.name, device=device, dtype=dtype_name, backend=backend,
                                floor_gflop=w.flops() / 1e9)
