"""The CUDA kernels of the C++ ops (``csrc/cuda/``, backend "cuda") against the reference.

Without a GPU (as in CI) this checks what can be checked: the extension was built with CUDA when a
toolkit and a CUDA build of torch are present (so a compile error in ``csrc/cuda`` fails CI), the
CUDA kernels are registered for both ops, and ``python -m mefn_fast.info`` reports the cuda
backend as built but unavailable. The tests marked ``gpu`` run on a CUDA GPU
(``benchmarks/gpu_check.sh``) and are skipped here with the reason.

Tolerance (flash-attention's rule, as for Triton): the CUDA result's error against a float64
reference is at most a small multiple of the error the reference itself makes in the same dtype,
plus a floor of a few units in the last place of that dtype.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import mefn_fast
from conftest import OPTION_GRID, make_inputs, max_abs_err, option_id, ref_scores, scores_with_grads
from mefn_fast.backends.build import build_info
from mefn_fast.options import make_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = build_info()
CUDA_BUILT = bool(BUILD.get("built") and BUILD.get("cuda"))
ON_GPU = torch.cuda.is_available() and CUDA_BUILT and torch.cuda.get_device_capability()[0] >= 8

needs_build = pytest.mark.skipif(not CUDA_BUILT, reason=str(BUILD.get("reason") or "the extension is not built with CUDA"))
needs_gpu = pytest.mark.skipif(
    not ON_GPU, reason="needs a CUDA GPU of compute capability >= 8.0 and the extension built with CUDA "
    "(run by benchmarks/gpu_check.sh)")
gpu = [pytest.mark.gpu, needs_gpu]

EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ("mefn_fast::xattn_similarity_fwd", "mefn_fast::xattn_similarity_bwd")


def _toolkit_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return torch.version.cuda is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


# ------------------------------------------------------------------------------------------------
# Without a GPU


def test_extension_built_with_cuda_when_toolkit_present():
    if not _toolkit_present():
        pytest.skip(f"no CUDA toolkit / CUDA build of torch here (torch.version.cuda={torch.version.cuda})")
    reason = str(BUILD.get("reason") or "")
    if "MEFN_SKIP_CUDA" in reason or "MEFN_SKIP_EXT" in reason:
        pytest.skip(f"the CUDA build was switched off at install time: {reason}")
    assert BUILD.get("built"), f"the extension failed to build: {reason}"
    assert BUILD.get("cuda"), f"the extension was built without its CUDA ops: {reason}"


@needs_build
def test_cuda_kernels_registered():
    from mefn_fast.backends import cuda as cuda_backend, ext_ops  # noqa: F401  (loads mefn_fast._C)

    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    assert cuda_backend.cuda_ops_registered()


@needs_build
def test_info_reports_cuda_built():
    out = subprocess.run([sys.executable, "-m", "mefn_fast.info"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "extension: built with CUDA" in out.stdout, out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("cuda "))
    if ON_GPU:
        assert "unavailable" not in line, line
    else:
        assert "unavailable: extension built with CUDA, but no CUDA GPU is visible" in line or \
            "compute capability" in line, line


def test_backend_reason_is_true():
    reason = mefn_fast.backends.get_backend("cuda").unavailable_reason()
    if ON_GPU:
        assert reason is None
    elif CUDA_BUILT:
        assert reason is not None and ("no CUDA GPU is visible" in reason or "compute capability" in reason), reason
    else:
        assert reason is not None and ("not built" in reason), reason
    assert "not implemented" not in str(reason)


def test_input_limits_are_readable():
    from mefn_fast.backends import cuda as cuda_backend

    r = torch.zeros(1, 36, 8)
    w = torch.zeros(1, 32, 8)
    msgs = cuda_backend.input_limits(r, w, make_options())
    assert any("CUDA tensors" in m for m in msgs)
    big = cuda_backend.input_limits(torch.zeros(1, 600, 8), torch.zeros(1, 600, 8), make_options())
    assert any("too large" in m for m in big)
    assert cuda_backend.tile_smem_bytes(197, 32, 2) < cuda_backend._SMEM_LIMIT


def test_warp_epilogue_matches_shared_header_emulated(tmp_path):
    """The CUDA per-pair epilogue (one warp per pair), run on the host with the warp emulated by 32
    threads, against the shared header's sequential pair_forward / pair_backward (every option,
    both tile layouts, n and m around the warp width): see tests/cuda_emulation/."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the emulation")
    src = os.path.join(ROOT, "tests", "cuda_emulation", "warp_epilogue_check.cpp")
    exe = str(tmp_path / "warp_epilogue_check")
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", src, "-o", exe], capture_output=True, text=True,
                           timeout=600)
    if build.returncode != 0 and "barrier" in build.stderr:
        pytest.skip(f"the compiler lacks C++20 <barrier>: {build.stderr[-500:]}")
    assert build.returncode == 0, build.stderr[-4000:]
    out = subprocess.run([exe], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-4000:] + out.stderr[-2000:]


@pytest.fixture(scope="module")
def block_emulator(tmp_path_factory):
    """tests/cuda_emulation/block_emulator.cpp built with the host compiler (the kernel bodies of
    csrc/cuda/xattn_blocks.cuh, float32 path, blocks emulated by 128 threads)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the emulator")
    src = os.path.join(ROOT, "tests", "cuda_emulation", "block_emulator.cpp")
    exe = str(tmp_path_factory.mktemp("emu") / "block_emulator")
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", src, "-o", exe], capture_output=True, text=True,
                           timeout=600)
    if build.returncode != 0 and "barrier" in build.stderr:
        pytest.skip(f"the compiler lacks C++20 <barrier>: {build.stderr[-500:]}")
    assert build.returncode == 0, build.stderr[-4000:]
    return exe


def emulate(exe, tmp_path, regions, rl, words, wl, weight, opts, smem_limit=227 * 1024, grid_cap=1 << 30):
    """Scores and gradients of (scores * weight).sum() from the emulated CUDA kernels (float32)."""
    import numpy as np

    o = make_options(**opts)
    b_img, n, d = regions.shape
    b_txt, m, _ = words.shape
    hdr = np.array([b_img, n, b_txt, m, d, ("t2i", "i2t", "both").index(o.direction), o.attn_norm == "clipped_l2norm",
                    o.mfe, o.agg == "lse", smem_limit, grid_cap, 1], dtype=np.int64)
    prm = np.array([o.lambda_t2i, o.lambda_i2t, o.tau, o.lambda_lse], dtype=np.float64)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        for a in (hdr, prm, rl.numpy().astype(np.int64), wl.numpy().astype(np.int64), regions.float().numpy(),
                  words.float().numpy(), weight.float().numpy()):
            f.write(np.ascontiguousarray(a).tobytes())
    out = subprocess.run([exe, str(src), str(dst)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-2000:]
    raw = torch.from_numpy(np.fromfile(dst, dtype=np.float32))
    s, raw = raw[:b_img * b_txt].view(b_img, b_txt), raw[b_img * b_txt:]
    dr, dw = raw[:b_img * n * d].view(b_img, n, d), raw[b_img * n * d:].view(b_txt, m, d)
    return s, dr, dw, out.stdout


def check_emulated(exe, tmp_path, shape, opts, seed=0, **kw):
    regions, rl, words, wl = make_inputs(*shape, dtype=torch.float64, seed=seed)
    weight = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = emulate(exe, tmp_path, regions, rl, words, wl, weight, opts, **kw)
    want = scores_with_grads(ref_scores, regions, rl, words, wl, weight, opts)
    same = scores_with_grads(ref_scores, regions.float(), rl, words.float(), wl, weight, opts)
    for name, g, s, w in zip(("scores", "d_regions", "d_words"), got[:3], same, want):
        assert torch.isfinite(g).all(), (name, got[3])
        err, base = max_abs_err(g, w), max_abs_err(s, w)
        floor = 16.0 * EPS[torch.float32] * max(float(w.abs().max()), 1e-3)
        assert err <= 4.0 * base + floor, f"{name}: emulated cuda err {err:.3g} vs reference err {base:.3g} ({got[3]})"
    for i, n in enumerate(rl.tolist()):
        assert (got[1][i, n:] == 0).all()
    for t, m in enumerate(wl.tolist()):
        assert (got[2][t, m:] == 0).all()


@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_emulated_kernels_every_option(block_emulator, tmp_path, opts):
    """The whole CUDA pipeline (norms, Grams, forward, both backward passes, finalize), float32 path,
    run on the host by tests/cuda_emulation/block_emulator.cpp, against the float64 reference."""
    check_emulated(block_emulator, tmp_path, (3, 4, 6, 5, 20), opts, seed=1)


# (shape, opts, plan knobs): several tiles and a persistent grid smaller than the tile count; a small
# shared-memory limit (blocks shrink); a tiny one (per-warp scratch in global memory); N and M above
# the warp width; length-1 items. (Seeds matter a little: with clipped_l2norm, a caption of one word
# and a cosine near 0, E = P / (|P| + 1e-8) makes the gradient very sensitive to the rounding of S,
# and any fp32 implementation, the reference included, can be 10x off there.) The length-1 case has
# d = 3: with d = 1 every unit row is +-1, the gradients are identically 0, the reference's are
# exactly 0, and only the kernels' rounding noise would be compared with a zero yardstick.
EMULATED_CASES = [
    ((11, 13, 7, 5, 40), dict(direction="both", agg="lse"), dict(grid_cap=2)),
    ((5, 6, 7, 5, 33), dict(direction="both", mfe=False), dict(smem_limit=16 * 1024)),
    ((3, 4, 40, 35, 20), dict(direction="both"), dict(smem_limit=40 * 1024)),
    ((2, 3, 37, 33, 70), dict(direction="t2i", attn_norm="none"), {}),
    ((2, 3, 2, 33, 7), dict(direction="i2t"), {}),
    ((1, 1, 1, 1, 3), dict(direction="both"), {}),
]


@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + "-".join(
    f"{k}{v}" for k, v in c[2].items()))
def test_emulated_kernels_plans_and_shapes(block_emulator, tmp_path, case):
    shape, opts, knobs = case
    check_emulated(block_emulator, tmp_path, shape, opts, seed=sum(shape) + 1, **knobs)


# ------------------------------------------------------------------------------------------------
# On a GPU


def cuda_scores(regions, rl, words, wl, **opts):
    return mefn_fast.xattn_similarity(regions, rl, words, wl, backend="cuda", **opts)





def check_against_reference(regions, rl, words, wl, opts, dtype=torch.float32, grad=True, factor=4.0, ulps=16.0,
                            seed=0):
    """CUDA in ``dtype`` vs the float64 reference, with the reference in ``dtype`` as the yardstick."""
    weight = torch.randn(regions.shape[0], words.shape[0], generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    r64, w64 = regions.double().cpu(), words.double().cpu()
    want = scores_with_grads(ref_scores, r64, rl.cpu(), w64, wl.cpu(), weight, opts, grad)
    same = scores_with_grads(ref_scores, r64.to(dtype), rl.cpu(), w64.to(dtype), wl.cpu(), weight, opts, grad)
    got = scores_with_grads(cuda_scores, regions.to(device="cuda", dtype=dtype), rl.cuda(), words.to(device="cuda", dtype=dtype),
               wl.cuda(), weight, opts, grad)
    assert got[0].dtype == dtype and got[0].shape == want[0].shape and got[0].is_cuda
    out = {}
    for name, g, s, w in zip(("scores", "d_regions", "d_words"), got, same, want):
        if w is None:
            continue
        assert g.dtype == dtype and g.shape == w.shape and g.is_cuda, name
        assert torch.isfinite(g).all(), name
        err, base = max_abs_err(g, w), max_abs_err(s, w)
        floor = ulps * EPS[dtype] * max(float(w.abs().max()), 1e-3)
        assert err <= factor * base + floor, f"{name}: cuda err {err:.3g} vs reference err {base:.3g} (floor {floor:.3g})"
        out[name] = (err, base)
    return out


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_every_option(opts, dtype):
    regions, rl, words, wl = make_inputs(3, 5, 7, 5, 40, dtype=torch.float64, seed=1)
    check_against_reference(regions, rl, words, wl, opts, dtype=dtype)


# (b_img, b_txt, n, m, d): length-1 items, primes, d not a multiple of the feature chunk, N and M
# above 32 (several query positions per lane), ViT's 197 patches, batches over several tiles.
WEIRD_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 17, 3, 40), (5, 2, 3, 9, 33), (2, 7, 37, 2, 20), (3, 2, 2, 33, 7),
                (2, 3, 197, 32, 72), (3, 4, 36, 70, 65), (37, 41, 6, 5, 130), (4, 67, 36, 32, 257)]
WEIRD_OPTS = [OPTION_GRID[i] for i in (0, 11, 21)]  # t2i clip mfe mean; i2t none nomfe lse; both clip nomfe lse


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", WEIRD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", WEIRD_OPTS, ids=option_id)
def test_weird_shapes(shape, opts, dtype):
    regions, rl, words, wl = make_inputs(*shape, dtype=torch.float64, seed=sum(shape))
    check_against_reference(regions, rl, words, wl, opts, dtype=dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_full_lengths_and_defaults(direction):
    regions, rl, words, wl = make_inputs(4, 6, 36, 32, 256, dtype=torch.float64, seed=4, ragged=False)
    check_against_reference(regions, rl, words, wl, dict(direction=direction))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_padding_is_inert_and_gets_zero_gradient(direction):
    regions, rl, words, wl = make_inputs(3, 4, 6, 5, 7, dtype=torch.float32, seed=11, device="cuda")
    r2, w2 = regions.clone(), words.clone()
    for i, n in enumerate(rl.tolist()):
        r2[i, n:] = float("nan") if i % 2 else 1e3
    for t, m in enumerate(wl.tolist()):
        w2[t, m:] = float("inf") if t % 2 else -7.0
    weight = torch.randn(3, 4, device="cuda")
    s1, dr1, dw1 = scores_with_grads(cuda_scores, regions, rl, words, wl, weight, dict(direction=direction))
    s2, dr2, dw2 = scores_with_grads(cuda_scores, r2, rl, w2, wl, weight, dict(direction=direction))
    assert torch.equal(s1, s2) and torch.equal(dr1, dr2) and torch.equal(dw1, dw2)
    for i, n in enumerate(rl.tolist()):
        assert (dr2[i, n:] == 0).all()
    for t, m in enumerate(wl.tolist()):
        assert (dw2[t, m:] == 0).all()


@pytest.mark.gpu
@needs_gpu
def test_non_contiguous_and_stride0_gradient():
    regions, rl, words, wl = make_inputs(3, 4, 7, 5, 11, dtype=torch.float32, seed=6, device="cuda")
    opts = dict(direction="both", agg="lse")
    r_nc = regions.transpose(1, 2).contiguous().transpose(1, 2)
    w_nc = torch.stack([words, -words], dim=-1)[..., 0]
    assert not r_nc.is_contiguous() and not w_nc.is_contiguous()
    ones = torch.ones(3, 4, device="cuda")
    a = scores_with_grads(cuda_scores, regions, rl, words, wl, ones, opts)
    b = scores_with_grads(cuda_scores, r_nc, rl, w_nc, wl, ones, opts)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    r = regions.clone().requires_grad_(True)
    w = words.clone().requires_grad_(True)
    cuda_scores(r, rl, w, wl, **opts).sum().backward()  # upstream gradient with stride (0, 0)
    assert torch.equal(r.grad, a[1]) and torch.equal(w.grad, a[2])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("which", ["regions", "words"])
def test_only_one_input_requires_grad(which):
    regions, rl, words, wl = make_inputs(2, 3, 5, 4, 9, dtype=torch.float32, seed=8, device="cuda")
    opts = dict(direction="both")
    _, dr, dw = scores_with_grads(cuda_scores, regions, rl, words, wl, torch.ones(2, 3, device="cuda"), opts)
    r = regions.clone().requires_grad_(which == "regions")
    w = words.clone().requires_grad_(which == "words")
    cuda_scores(r, rl, w, wl, **opts).sum().backward()
    if which == "regions":
        assert w.grad is None and torch.equal(r.grad, dr)
    else:
        assert r.grad is None and torch.equal(w.grad, dw)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_run_to_run_determinism(dtype):
    regions, rl, words, wl = make_inputs(40, 70, 36, 32, 128, dtype=dtype, seed=9, device="cuda")
    weight = torch.randn(40, 70, device="cuda")
    for opts in (dict(direction="both"), dict(direction="t2i", agg="lse", mfe=False)):
        a = scores_with_grads(cuda_scores, regions, rl, words, wl, weight, opts)
        b = scores_with_grads(cuda_scores, regions, rl, words, wl, weight, opts)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_opcheck(dtype):
    from mefn_fast.backends import ext_ops

    regions, rl, words, wl = make_inputs(3, 4, 6, 5, 16, dtype=dtype, seed=3, device="cuda")
    args = ext_ops.option_args(make_options(direction="both"))
    torch.library.opcheck(ext_ops.fwd_op, (regions.requires_grad_(True), rl, words.requires_grad_(True), wl, *args))
    grad = torch.randn(3, 4, device="cuda", dtype=dtype)
    torch.library.opcheck(ext_ops.bwd_op, (grad, regions.detach(), rl, words.detach(), wl, *args, True, True))
    torch.library.opcheck(ext_ops.bwd_op, (grad, regions.detach(), rl, words.detach(), wl, *args, False, True))


@pytest.mark.gpu
@needs_gpu
def test_auto_picks_cuda_and_bad_input():
    regions, rl, words, wl = make_inputs(2, 3, 5, 4, 9, dtype=torch.float16, seed=5, device="cuda")
    name, _ = mefn_fast.backends.select_backend("auto", regions, words, make_options())
    assert name == "cuda"
    from mefn_fast.backends import ext_ops

    args = ext_ops.option_args(make_options())
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ext_ops.fwd_op(regions.double(), rl, words.double(), wl, *args)
    with pytest.raises(RuntimeError, match="region_lengths"):
        ext_ops.fwd_op(regions, rl + 10, words, wl, *args)
    with pytest.raises(RuntimeError, match="word_lengths"):
        ext_ops.fwd_op(regions, rl, words, wl * 0, *args)
    with pytest.raises(RuntimeError, match="direction"):
        ext_ops.fwd_op(regions, rl, words, wl, "sideways", *args[1:])


@pytest.mark.gpu
@needs_gpu
def test_memory_is_bounded():
    # a B_img x B_txt x N x M tensor of this problem would be 256 * 2048 * 36 * 32 * 4 B = 2.4 GB
    regions, rl, words, wl = make_inputs(256, 2048, 36, 32, 256, dtype=torch.float64, seed=2)
    regions, words = regions.to("cuda", torch.bfloat16), words.to("cuda", torch.bfloat16)
    rl, wl = rl.cuda(), wl.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    s = cuda_scores(regions, rl, words, wl, direction="both")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(s.float()).all()
    assert extra < 64 * 2 ** 20, f"forward used {extra / 2**20:.1f} MiB beyond its inputs"


_SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, mefn_fast
    from conftest import make_inputs
    for dtype in (torch.float32, torch.bfloat16):
        r, rl, w, wl = make_inputs(3, 4, 7, 5, 40, dtype=dtype, seed=1, device="cuda")
        r.requires_grad_(True); w.requires_grad_(True)
        s = mefn_fast.xattn_similarity(r, rl, w, wl, direction="both", backend="cuda")
        s.sum().backward()
    torch.cuda.synchronize()
    print("ok")
""")


def _sanitizer():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("compute-sanitizer") or next(
        (p for p in (os.path.join(home, "bin", "compute-sanitizer"),
                     os.path.join(home, "compute-sanitizer", "compute-sanitizer")) if os.path.exists(p)), None)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found (CUDA_HOME/bin or PATH)")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [exe, f"--tool={tool}", "--error-exitcode=99"]
    if tool == "memcheck":
        args.append("--leak-check=no")
    try:
        out = subprocess.run(args + [sys.executable, "-c", _SANITIZER_SCRIPT], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=int(os.environ.get("MEFN_SANITIZER_TIMEOUT_S", "420")))
    except subprocess.TimeoutExpired:
        pytest.skip(f"compute-sanitizer --tool={tool} did not finish in time (MEFN_SANITIZER_TIMEOUT_S); "
                    "no verdict")
    assert out.returncode == 0 and "ok" in out.stdout, (out.stdout[-4000:], out.stderr[-4000:])
