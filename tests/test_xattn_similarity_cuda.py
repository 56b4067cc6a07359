"""The CUDA kernels of the C++ ops (``csrc/cuda/``, backend "cuda") against the reference.

Without a GPU (as in CI) this checks what can be checked: the extension was built with CUDA when a
toolkit and a CUDA build of torch are present (so a compile error in ``csrc/cuda`` fails CI), the
CUDA kernels are registered for every op, ``python -m mefn_fast.info`` reports the cuda backend as
built but unavailable, and the CUDA op's logic (its plan, products, dtype handling and kernel
functors, csrc/xattn_simt_dev.h and csrc/xattn_simt.h) runs on the CPU through the emulation ops
of csrc/xattn_simt_emulation.cpp against the reference. tests/test_cuda_ptxas.py assembles the
kernels for sm_90. The tests marked ``gpu`` run on a CUDA GPU (``benchmarks/gpu_check.sh``) and
are skipped here with the reason.

Tolerance (flash-attention's rule, as for Triton): the CUDA result's error against a float64
reference is at most a small multiple of the error the reference itself makes in the same dtype,
plus a floor of a few units in the last place of that dtype.
"""
from __future__ import annotations

import os
import subprocess
import sys
import shutil
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
OPS = ("mefn_fast::xattn_similarity_fwd", "mefn_fast::xattn_similarity_bwd", "mefn_fast::xattn_similarity_fwd_saved",
       "mefn_fast::xattn_similarity_bwd_saved")


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


# ------------------------------------------------------------------------------------------------
# The CUDA op's logic on the CPU: the emulation ops (csrc/xattn_simt_emulation.cpp) run the CUDA
# op's plan, products and kernel functors one thread at a time on CPU tensors.

def emulated(regions, rl, words, wl, weight, opts, budget=-1, block_cap=0, grad=True, backward_budget=None):
    """Scores and gradients of (scores * weight).sum() from the emulated CUDA op; budget < 0: the
    inference forward (and the backward recomputes, in super-blocks of backward_budget bytes),
    else the saved-tile forward with that budget."""
    from mefn_fast.backends import ext_ops

    args = ext_ops.option_args(make_options(**opts))
    s, saved = torch.ops.mefn_fast.xattn_similarity_emulated_cuda_fwd(regions, rl, words, wl, *args, budget, block_cap)
    if not grad:
        return s, None, None, saved
    g = weight.to(torch.float32)
    if backward_budget is None:
        backward_budget = max(budget, 0)
    dr, dw = torch.ops.mefn_fast.xattn_similarity_emulated_cuda_bwd(g, regions, rl, words, wl, saved, *args,
                                                                      backward_budget, block_cap, True, True)
    return s, dr, dw, saved


def check_emulated(shape, opts, dtype=torch.float32, seed=0, factor=4.0, ulps=16.0, **kw):
    """The emulated CUDA op in dtype against the float64 reference, with the reference's own
    error in dtype as the yardstick (as for the GPU tests below)."""
    regions, rl, words, wl = make_inputs(*shape, dtype=torch.float64, seed=seed)
    weight = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = emulated(regions.to(dtype), rl, words.to(dtype), wl, weight, opts, **kw)
    want = scores_with_grads(ref_scores, regions, rl, words, wl, weight, opts)
    same = scores_with_grads(ref_scores, regions.to(dtype), rl, words.to(dtype), wl, weight, opts)
    for name, g, s, w in zip(("scores", "d_regions", "d_words"), got[:3], same, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        err, base = max_abs_err(g, w), max_abs_err(s, w)
        floor = ulps * EPS[dtype] * max(float(w.abs().max()), 1e-3)
        assert err <= factor * base + floor, f"{name}: emulated cuda err {err:.3g} vs reference err {base:.3g}"
    for i, n in enumerate(rl.tolist()):
        assert (got[1][i, n:] == 0).all()
    for t, m in enumerate(wl.tolist()):
        assert (got[2][t, m:] == 0).all()
    return got


@needs_build
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_emulated_every_option(opts):
    check_emulated((3, 4, 6, 5, 20), opts, seed=1)


# (shape, opts, knobs): many blocks on each side (small block caps), saved tiles, several
# super-blocks (a small budget), N and M above 32, length-1 items, ViT-like contexts. (Seeds matter
# a little: with clipped_l2norm, a caption of one word and a cosine near 0, E = P / (|P| + 1e-8)
# makes the gradient very sensitive to the rounding of S, and any fp32 implementation, the
# reference included, can be 10x off there.) The length-1 case has d = 3: with d = 1 every unit
# row is +-1, the gradients are identically 0, the reference's are exactly 0, and only the
# kernels' rounding noise would be compared with a zero yardstick.
EMULATED_CASES = [
    ((11, 13, 7, 5, 40), dict(direction="both", agg="lse"), dict(block_cap=8)),
    ((11, 13, 7, 5, 40), dict(direction="both", agg="lse"), dict(block_cap=8, budget=1 << 20)),
    ((9, 10, 7, 6, 33), dict(direction="both", mfe=False), dict(block_cap=10, budget=3000)),
    ((3, 4, 40, 35, 20), dict(direction="both"), dict(block_cap=48)),
    ((2, 3, 37, 33, 70), dict(direction="t2i", attn_norm="none"), {}),
    ((2, 3, 2, 33, 7), dict(direction="i2t"), dict(budget=1 << 20)),
    ((1, 1, 1, 1, 3), dict(direction="both"), {}),
    ((2, 3, 61, 9, 16), dict(direction="t2i"), dict(block_cap=64, budget=1 << 20)),
]


@needs_build
@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + "-".join(
    f"{k}{v}" for k, v in c[2].items()))
def test_emulated_plans_and_shapes(case):
    shape, opts, knobs = case
    check_emulated(shape, opts, seed=sum(shape) + 1, **knobs)


@needs_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("opts", [OPTION_GRID[i] for i in (0, 11, 21)], ids=option_id)
def test_emulated_half_precision(opts, dtype):
    # the packed rows and the tile GEMMs in the input dtype (float32 accumulation), as on a GPU
    check_emulated((4, 5, 7, 6, 64), opts, dtype=dtype, seed=3, block_cap=16, budget=1 << 20)


@needs_build
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_emulated_saved_and_recomputed_agree(direction):
    regions, rl, words, wl = make_inputs(9, 11, 7, 6, 24, dtype=torch.float32, seed=5)
    weight = torch.randn(9, 11, generator=torch.Generator().manual_seed(5))
    opts = dict(direction=direction)
    # the training forward with the tiles kept (budget 4 MiB) and with nothing kept (budget 0): the
    # same products (one a block pair), so the same scores; the backward recomputes the tiles in one
    # super-block or in several
    saved = emulated(regions, rl, words, wl, weight, opts, budget=1 << 22, block_cap=12)
    again = emulated(regions, rl, words, wl, weight, opts, budget=0, block_cap=12, backward_budget=1 << 22)
    split = emulated(regions, rl, words, wl, weight, opts, budget=0, block_cap=12, backward_budget=2000)
    assert saved[3].numel() > 0 and again[3].numel() == 0
    for a, b, c in zip(saved[:3], again[:3], split[:3]):
        assert torch.equal(a, b)  # one super-block: the same products in the same order
        assert float((c - a).abs().max()) <= 1e-6 * float(a.abs().max())  # several: the same to rounding


@needs_build
def test_emulated_padding_is_inert():
    regions, rl, words, wl = make_inputs(3, 4, 6, 5, 7, dtype=torch.float32, seed=11)
    r2, w2 = regions.clone(), words.clone()
    for i, n in enumerate(rl.tolist()):
        r2[i, n:] = float("nan") if i % 2 else 1e3
    for t, m in enumerate(wl.tolist()):
        w2[t, m:] = float("inf") if t % 2 else -7.0
    weight = torch.randn(3, 4)
    a = emulated(regions, rl, words, wl, weight, dict(direction="both"), block_cap=6)
    b = emulated(r2, rl, w2, wl, weight, dict(direction="both"), block_cap=6)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


@needs_build
def test_emulated_bad_input():
    from mefn_fast.backends import ext_ops

    regions, rl, words, wl = make_inputs(2, 3, 5, 4, 9, dtype=torch.float32, seed=5)
    args = ext_ops.option_args(make_options())
    fwd = torch.ops.mefn_fast.xattn_similarity_emulated_cuda_fwd
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        fwd(regions.double(), rl, words.double(), wl, *args, -1, 0)
    with pytest.raises(RuntimeError, match="region_lengths"):
        fwd(regions, rl + 10, words, wl, *args, -1, 0)
    with pytest.raises(RuntimeError, match="word_lengths"):
        fwd(regions, rl, words, wl * 0, *args, -1, 0)


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
    # extra memory is the blocks in flight (a few tiles of at most 128 MiB, csrc/xattn_simt_dev.h)
    # and the packed inputs, whatever the number of captions;
    # a B_img x B_txt x N x M tensor of the larger problem would be 256 * 8192 * 36 * 32 * 4 B = 9.7 GB
    extra = {}
    for b_txt in (2048, 8192):
        regions, rl, words, wl = make_inputs(256, b_txt, 36, 32, 256, dtype=torch.float64, seed=2)
        regions, words = regions.to("cuda", torch.bfloat16), words.to("cuda", torch.bfloat16)
        rl, wl = rl.cuda(), wl.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        s = cuda_scores(regions, rl, words, wl, direction="both")
        torch.cuda.synchronize()
        extra[b_txt] = torch.cuda.max_memory_allocated() - base
        assert torch.isfinite(s.float()).all()
        del regions, words, s
    assert extra[2048] < 1024 * 2 ** 20, f"forward used {extra[2048] / 2**20:.1f} MiB beyond its inputs"
    grown = extra[8192] - extra[2048]
    assert grown < 32 * 2 ** 20, f"4x the captions took {grown / 2**20:.1f} MiB more (the scores: 3 MiB)"


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
