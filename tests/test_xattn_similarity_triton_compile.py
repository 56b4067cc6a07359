"""Offline compile of the Triton ``xattn_similarity`` kernels for Hopper, with no GPU.

What it does. For each GPU workload of ``docs/math.md`` (eval-f30k-gpu, eval-coco5k-gpu,
train-gpu, vit-patches) in fp16 and bf16, the launchers of :mod:`mefn_fast.kernels.xattn_similarity`
run on small stand-in inputs with the workload's N, M and d under ``record_launches()``, so every
kernel the launcher would start is recorded with its arguments, constexprs and options (one
heuristic configuration, as ``MEFN_TRITON_SINGLE_CONFIG=1`` and ``benchmarks/gpu_check.sh`` run;
the autotuning candidates of the eval forward are compiled too). Batch sizes, block counts and
output strides are not specialised on, so these are the kernels of the full-size workloads.
Each distinct kernel is compiled once (eval-f30k-gpu and eval-coco5k-gpu share theirs) with
``triton.compile`` for ``GPUTarget("cuda", 90, 64)``, in a subprocess (other test modules set
``TRITON_INTERPRET``), and ptxas ``-v`` reports its registers and spills. The test prints a table
and asserts: wgmma in every forward's PTX, shared memory <= 227 KiB everywhere, no spills in any
forward, and spills within the bounds below in the backward tile kernel, none elsewhere. The
compiles run in ``MEFN_COMPILE_PROCS`` processes (default: the CPU count); about 80 s on 2 cores
with an empty Triton cache, seconds with a warm one.

Measured (ptxas of the Triton wheels, sm_90a; bytes of spill stores a thread with Triton 3.8 /
3.6, the GPU machine's; fp16 and bf16 alike; the test prints the current numbers):

========================  ==================  =========  =====  =======  ===========  ========
kernel                    workload            tile       warps  regs     spills (B)   smem KiB
========================  ==================  =========  =====  =======  ===========  ========
forward (t2i, i2t)        eval-f30k, coco5k,  128 x 128  8      255      0 / 0        96
                          train-gpu
forward, autotuning       eval-f30k fp16      128 x 128  8      255      0 / 0        68-128
forward (t2i)             vit-patches         64 x 256   8      254      0 / 0        170
backward tile (t2i, i2t)  train-gpu           128 x 64   8      255      476 / 352    72
backward tile (t2i)       vit-patches         32 x 256   8      255      724 / 636    145-146
gradient GEMMs            train-gpu, vit      -          8      80-209   0 / 0        64-96
Gram-gradient GEMM        train-gpu, vit      -          4      139-186  0 / 0        24-96
row norms, Gram blocks    all                 -          4-8    48-202   0 / 0        <= 80
========================  ==================  =========  =====  =======  ===========  ========

Bounds: forward spills 0 at every workload; the backward tile kernel the measurements with a
margin (ptxas's allocation moves by a hundred bytes between Triton versions): 640 at train-gpu
and 832 at vit-patches; 0 in every other kernel. What got the forwards to zero: one direction a
pass (``both`` is two passes, each on tiles of 128 rows), context sums with N >= 16 (Triton 3.6
made N = 8 products mma.sync instructions whose operand fragments spilled), 16 context segments
a block in the forward, and, for the ViT tile of 64 rows, the broadcasts and ``G A`` passed
through a runtime branch: Triton gives a product whose result reaches another product all 8
warps on M, which at 64 rows holds every tile value in both warp groups (3.6 KB of spills).
The backward tile kernel recomputes the forward and back-propagates in one program; at
vit-patches its 32-row tile is below a warp group's 64 rows. The next steps are in
``docs/design.md``.

Estimated ratio to the packed floor (one cuBLAS product over the valid rows, three with the
backward), counted per program on an H100 SXM (2048 fp16 MAC / clock / SM on tensor cores, 128
CUDA-core instructions / clock / SM, 64 B / clock / SM from L2; one program an SM: 255 registers
at 8 warps, so the epilogue does not overlap the next tile's product):

* eval-f30k-gpu fp16, eval-coco5k-gpu bf16 (128 x 128 tiles, d = 1024): the product is 8192
  clocks at peak, of which 0.77 is useful (108 of 128 columns, about 117 of 128 rows); its 512
  KiB of gathered rows (no TMA) hold it near 70 % of peak (11700 clocks); the epilogue adds about
  5100 clocks of CUDA-core work (some 40 instructions a cell) and 3500 of small tensor-core
  products. About 20300 clocks a tile against 8900 for the floor's share: about 2.3x (target
  1.5x: it needs the epilogue to overlap the next tile's product, as FlashAttention 3's
  ping-ponged warp groups do). Bounded memory at coco5k: scores (0.5 GiB), Gram blocks (55 MiB).
* train-gpu bf16 forward + backward, per 128 x 128 cells of pairs: two forward passes (40600
  clocks); per direction two 128 x 64 backward tiles, load-bound (12000 clocks for the
  products), with about 100 instructions a cell (12800), small products (7000) and their spill
  traffic (3000), so 70000 for both directions; four gradient GEMMs at about 60 % of peak
  (54000) and the Gram-gradient GEMM (500). About 165000 clocks against 26700 for the floor's
  three products, plus some 14 launches against a 0.1 ms floor: about 6-7x (target 2x). A fused
  ``both`` (one product, one recomputation, two GEMMs: 4.3-4.9 KB of spills a thread) would
  count about 4-5x if its spills were free, which they are not (1.1 MB of local-memory traffic a
  tile, three times its inputs).
* vit-patches bf16 forward + backward (t2i, 64 x 256 forward tiles, 0.72 useful, d = 512):
  forward about 16500 clocks a tile, no longer paying for spills: the product near 70 % of peak
  (5900), the epilogue's CUDA-core work (5100, some 40 instructions a cell, the branches on the
  broadcasts included), its small products (3500) and ``G A`` (2000), against 4200 (about 4x);
  backward two 32 x 256 tiles on mma.sync (17000 for the products), their epilogues and spills
  (about 17000), two gradient GEMMs (13600) and the Gram-gradient GEMM (2000): about 5x overall.

Tested on: no GPU was available; these are compiles for sm_90 only. Known risks (as
FlashAttention's Triton module lists them): register pressure as above (the forward sits at
255 registers: a change to its epilogue can bring spills back, and this test catches it);
shared memory of the ViT configurations; the TF32 and bf16 numerics are exercised only on a GPU;
performance unmeasured until ``benchmarks/gpu_check.sh`` runs on a lent H100 / H200.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

# (name, b_img, b_txt, n, m, d, direction, backward): the GPU rows of docs/math.md, at a small
# batch (the batch sizes are not specialised on).
WORKLOADS = [
    ("eval-f30k-gpu", 7, 11, 36, 32, 1024, "t2i", False),
    ("eval-coco5k-gpu", 7, 11, 36, 32, 1024, "t2i", False),
    ("train-gpu", 7, 11, 36, 32, 1024, "both", True),
    ("vit-patches", 3, 11, 197, 32, 512, "t2i", True),
]
DTYPES = ("fp16", "bf16")
SMEM_MAX = 227 * 1024  # an H100's / H200's shared memory per block
# Bytes of spill stores a thread: none in any forward; the backward tile kernel's bounds are the
# measurements of the docstring with a margin (ptxas's allocation moves by a hundred bytes between
# Triton 3.6 and 3.8).
FWD_SPILL_MAX = 0
BWD_SPILL_MAX = {"train-gpu": 640, "vit-patches": 832}
OTHER_SPILL_MAX = 0  # prologue, gradient-GEMM and Gram-gradient kernels


def _record(workload, dtype_name):
    """The launches of one workload's forward (and backward), recorded on stand-in inputs."""
    import torch

    from mefn_fast.kernels import xattn_similarity as k
    name, b_img, b_txt, n, m, d, direction, backward = workload
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(b_img, n, d, generator=g).to(dtype)
    words = torch.randn(b_txt, m, d, generator=g).to(dtype)
    rl = torch.full((b_img,), n)
    wl = torch.randint(min(8, m), m + 1, (b_txt,), generator=g)
    opts = dict(direction=direction, lambda_t2i=9.0, lambda_i2t=4.0, attn_norm="clipped_l2norm", mfe=True, tau=0.25,
                agg="mean", lambda_lse=6.0)
    with k.record_launches() as launches:
        k.xattn_similarity_forward(regions, rl, words, wl, opts)
        if backward:
            k.xattn_similarity_backward(torch.ones(b_img, b_txt), regions, rl, words, wl, opts)
    return launches


def _source(launch):
    """An ASTSource with the specialisation a launch with these arguments would get."""
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource
    from triton._C.libtriton import native_specialize_impl

    fn = launch["kernel"]
    given = dict(zip(fn.arg_names, launch["args"]))
    given.update({k: v for k, v in launch["meta"].items() if k in fn.arg_names})
    options = {k: v for k, v in launch["meta"].items() if k not in fn.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
        value = given[name]
        if p.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
            continue
        signature[name] = ty
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), options


def _ptxas_stats(ptx: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    num = lambda pat: int(re.search(pat, log).group(1))  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"))


def _jobs():
    """Every distinct kernel: (key, workload index, dtype, launch index, autotune config or None)."""
    from mefn_fast.kernels import xattn_similarity as k
    jobs, seen = [], {}
    for wi, w in enumerate(WORKLOADS):
        for dt in DTYPES:
            for li, launch in enumerate(_record(w, dt)):
                variants = [None]
                if w[0] == "eval-f30k-gpu" and dt == "fp16" and launch["kernel"].__name__ == "_fwd_kernel":
                    variants += list(range(len(k._fwd_configs(launch["meta"]))))
                for v in variants:
                    src, options = _source(_with_config(launch, v))
                    key = src.hash() + json.dumps(options, sort_keys=True)
                    users = seen.setdefault(key, [])
                    if not users:
                        jobs.append((key, wi, dt, li, v))
                    users.append(f"{w[0]} {dt}" + ("" if v is None else f" autotune#{v}"))
    return jobs, seen


def _with_config(launch, variant):
    if variant is None:
        return launch
    from mefn_fast.kernels import xattn_similarity as k
    cfg = k._fwd_configs(launch["meta"])[variant]
    meta = dict(launch["meta"], **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dict(launch, meta=meta)


def _compile_job(job):
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    key, wi, dt, li, variant = job
    launch = _with_config(_record(WORKLOADS[wi], dt)[li], variant)
    src, options = _source(launch)
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 64), options=options)
    ptx = ck.asm["ptx"]
    meta = launch["meta"]
    return dict(key=key, kernel=launch["kernel"].__name__, workload=WORKLOADS[wi][0], dtype=dt, variant=variant,
                tile=f"{meta.get('BM', meta.get('BO', meta.get('BLK', meta.get('BR', ''))))}x"
                     f"{meta.get('BN', meta.get('BD', meta.get('BK', '')))}",
                warps=options.get("num_warps"), stages=options.get("num_stages"), smem=ck.metadata.shared,
                wgmma=ptx.count("wgmma.mma_async"), compile_s=round(time.time() - t0, 1), **_ptxas_stats(ptx))


def _worker(out_path: str) -> None:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    jobs, users = _jobs()
    procs = max(1, min(len(jobs), int(os.environ.get("MEFN_COMPILE_PROCS", os.cpu_count() or 1))))
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as ex:
        results = list(ex.map(_compile_job, jobs))
    for r in results:
        r["used_by"] = users[r["key"]]
    import triton
    with open(out_path, "w") as f:
        json.dump(dict(triton=triton.__version__, results=results), f, indent=1)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton-compile") / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MEFN_TRITON_SINGLE_CONFIG"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__))] +
                                        [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(out)], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    data = json.loads(out.read_text())
    _print_table(data)
    return data["results"]


def _print_table(data) -> None:
    rows = sorted(data["results"], key=lambda r: (r["kernel"], r["workload"], r["dtype"], str(r["variant"])))
    print(f"\nTriton {data['triton']}, GPUTarget('cuda', 90, 64):")
    print(f"{'kernel':18s} {'dtype':5s} {'tile':9s} {'warps':>5s} {'stg':>3s} {'regs':>4s} {'spill st/ld B':>13s} "
          f"{'smem KiB':>8s} {'wgmma':>5s} {'compile s':>9s}  used by")
    for r in rows:
        print(f"{r['kernel']:18s} {r['dtype']:5s} {r['tile']:9s} {r['warps'] or 4:5d} {r['stages'] or 3:3d} {r['regs']:4d} "
              f"{r['spill_stores']:6d}/{r['spill_loads']:<6d} {r['smem'] / 1024:8.1f} {r['wgmma']:5d} "
              f"{r['compile_s']:9.1f}  {', '.join(r['used_by'])}")


def test_every_forward_uses_wgmma(compiled):
    fwd = [r for r in compiled if r["kernel"] == "_fwd_kernel"]
    assert len(fwd) >= 6  # three tile classes x two dtypes, and the autotuning candidates
    for r in fwd:
        assert r["wgmma"] > 0, r


def test_shared_memory_fits_hopper(compiled):
    for r in compiled:
        assert r["smem"] <= SMEM_MAX, r


def test_spills_within_bounds(compiled):
    for r in compiled:
        if r["kernel"] == "_fwd_kernel":
            assert r["spill_stores"] <= FWD_SPILL_MAX, r
        elif r["kernel"] == "_bwd_tile_kernel":
            assert r["spill_stores"] <= BWD_SPILL_MAX[r["workload"]], r
        else:
            assert r["spill_stores"] <= OTHER_SPILL_MAX, r


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
