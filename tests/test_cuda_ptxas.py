"""The CUDA kernels (csrc/cuda/xattn_kernels.cu) assembled for sm_90 with ``ptxas -v``: every kernel
is found, none spills registers to local memory, and each fits the per-block limits (registers for
its 256 threads, shared memory). Runs without a GPU; skipped only where there is no CUDA toolkit
or torch has no CUDA headers. The kernels file includes no ATen, so this takes seconds.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "xattn_kernels.cu")
THREADS = 256                    # kThreads of xattn_kernels.cuh
REGISTERS_PER_SM = 65536         # sm_80 and sm_90
SHARED_PER_BLOCK = 227 * 1024    # sm_90 opt-in maximum
# one kernel per thread functor of csrc/xattn_simt.h (PackRows and UnpackRows for three dtypes)
FUNCTORS = ["ClipRows", "SoftmaxColumns", "AttendColumns", "ScoreItems", "BackwardItems", "BackwardColumns",
            "ClipBackwardRows"] + [f"{f}<{t}>" for f in ("PackRows", "UnpackRows")
                                    for t in ("float", "c10::Half", "c10::BFloat16")]


def _nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    exe = os.path.join(home, "bin", "nvcc")
    return exe if os.path.exists(exe) else shutil.which("nvcc")


def _assemble(tmp_path, arch: str) -> str:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolkit (nvcc) here")
    from torch.utils.cpp_extension import include_paths

    includes = [p for p in include_paths() if os.path.isdir(p)]
    cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "-c", SOURCE, "-o", str(tmp_path / f"kernels_{arch}.o")]
    for p in includes:
        cmd += ["-I", p]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stderr


def _parse(log: str) -> dict:
    """{mangled kernel name: {registers, spill_stores, spill_loads, stack, smem}} from ptxas -v."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            kernels[current]["smem"] = int(s.group(1)) if s else 0
    return kernels


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build (no CUDA headers)")
def test_kernels_assemble_for_sm90_without_spills(tmp_path):
    kernels = _parse(_assemble(tmp_path, "90"))
    names = _demangle(list(kernels))
    for functor in FUNCTORS:
        assert any(f"mefn::simt::{functor}" in names[k] for k in kernels), f"no kernel for {functor}: {list(names.values())}"
    for mangled, info in kernels.items():
        name = names[mangled]
        assert info.get("spill_stores") == 0 and info.get("spill_loads") == 0, f"{name} spills: {info}"
        assert info["registers"] * THREADS <= REGISTERS_PER_SM, f"{name}: {info['registers']} registers x {THREADS}"
        assert info["smem"] <= SHARED_PER_BLOCK, f"{name}: {info['smem']} bytes of shared memory"
