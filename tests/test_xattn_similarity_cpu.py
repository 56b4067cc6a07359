"""The "cpu" backend (C++ op mefn_fast::xattn_similarity_fwd/_bwd) against the reference.

Skipped, with the reason, only when the extension was genuinely not built (see
``python -m mefn_fast.info``); when the build record says it was built, everything here must run.
"""
from __future__ import annotations

import pytest
import torch

import mefn_fast
from conftest import OPTION_GRID, make_inputs, option_id
from mefn_fast.backends import get_backend
from mefn_fast.backends.build import build_info

_BUILD = build_info()
pytestmark = pytest.mark.skipif(not _BUILD.get("built"),
                                reason=f"C++ extension not built: {_BUILD.get('reason')}")

# (b_img, b_txt, n, m, d): length-1 items, primes, non-powers of two, n < m and n > m.
SHAPES = [(3, 4, 7, 5, 11), (1, 1, 1, 1, 3), (2, 5, 13, 3, 8), (4, 2, 3, 17, 5), (5, 7, 6, 2, 33)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def cpu(regions, rl, words, wl, **opts):
    return mefn_fast.xattn_similarity(regions, rl, words, wl, backend="cpu", **opts)


def ref(regions, rl, words, wl, **opts):
    return mefn_fast.xattn_similarity(regions, rl, words, wl, backend="reference", **opts)


def scores_and_grads(fn, regions, rl, words, wl, upstream=None, **opts):
    """fn's scores and the gradients of sum(scores * upstream) (upstream: seeded random by default)."""
    regions = regions.detach().clone().requires_grad_(True)
    words = words.detach().clone().requires_grad_(True)
    s = fn(regions, rl, words, wl, **opts)
    if upstream is None:
        upstream = torch.randn(s.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(s.dtype)
    gr, gw = torch.autograd.grad(s, (regions, words), upstream)
    return s.detach(), gr, gw


def test_backend_is_available_when_built():
    assert get_backend("cpu").unavailable_reason() is None
    assert "cpu" in mefn_fast.available_backends()


def test_auto_picks_cpu_for_cpu_float_tensors():
    from mefn_fast.backends import select_backend
    from mefn_fast.options import XAttnOptions

    r, w = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert select_backend("auto", r, w, XAttnOptions())[0] == "cpu"
    assert select_backend("auto", r.double(), w.double(), XAttnOptions())[0] == "cpu"
    assert select_backend("auto", r.half(), w.half(), XAttnOptions())[0] == "cpu"
    assert select_backend("auto", r.bfloat16(), w.bfloat16(), XAttnOptions())[0] == "cpu"


# ----------------------------------------------------------------------------- float64: exact
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_float64_forward_and_gradients_match_reference(shape, opts):
    regions, rl, words, wl = make_inputs(*shape, seed=sum(shape))
    s, gr, gw = scores_and_grads(cpu, regions, rl, words, wl, **opts)
    s_ref, gr_ref, gw_ref = scores_and_grads(ref, regions, rl, words, wl, **opts)
    assert s.dtype == torch.float64 and s.shape == (shape[0], shape[1])
    assert rel_err(s, s_ref) <= 1e-10
    assert rel_err(gr, gr_ref) <= 1e-10
    assert rel_err(gw, gw_ref) <= 1e-10


# ----------------------------------------------------------------------------- float32
# flash-attention's rule: the error against the float64 reference is at most a small multiple of
# what the reference itself makes in float32 (plus a few ulps of the result's scale).
def _assert_fp32_close(got, ref32, ref64, what):
    ref64 = ref64.double()
    scale = float(ref64.abs().max())
    err = float((got.double() - ref64).abs().max())
    err_ref = float((ref32.double() - ref64).abs().max())
    bound = 3.0 * err_ref + 8 * torch.finfo(torch.float32).eps * scale
    assert err <= bound, f"{what}: error {err:.3g} vs the reference's own fp32 error {err_ref:.3g} (bound {bound:.3g})"


@pytest.mark.parametrize("shape", [(3, 4, 7, 5, 11), (4, 6, 36, 32, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_float32_forward_and_gradients_within_reference_error(shape, opts):
    regions, rl, words, wl = make_inputs(*shape, seed=3)
    upstream = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s64, gr64, gw64 = scores_and_grads(ref, regions, rl, words, wl, upstream, **opts)
    r32, w32, up32 = regions.float(), words.float(), upstream.float()
    s_ref, gr_ref, gw_ref = scores_and_grads(ref, r32, rl, w32, wl, up32, **opts)
    s, gr, gw = scores_and_grads(cpu, r32, rl, w32, wl, up32, **opts)
    assert s.dtype == torch.float32 and gr.dtype == torch.float32
    _assert_fp32_close(s, s_ref, s64, "scores")
    _assert_fp32_close(gr, gr_ref, gr64, "grad regions")
    _assert_fp32_close(gw, gw_ref, gw64, "grad words")


# ----------------------------------------------------------------------------- dense image side
# Inference with images of equal length (no padding) takes the cosine tile from the caller's rows
# and scales its rows by the inverse norms, with no normalised copy; rows of extreme norm, and any
# padded or ragged side, take the packed path. 40 images of 7 regions: several image blocks.
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_dense_images_inference_matches_reference(opts):
    regions, _, words, wl = make_inputs(40, 6, 7, 5, 11, seed=21)
    rl = torch.full((40,), 7)
    regions[3, 2] = 0.0  # a zero row: norm 0, scaled like the packed path (x / 1e-12 = 0)
    assert rel_err(cpu(regions, rl, words, wl, **opts), ref(regions, rl, words, wl, **opts)) <= 1e-10
    r32, w32 = regions.float(), words.float()
    _assert_fp32_close(cpu(r32, rl, w32, wl, **opts), ref(r32, rl, w32, wl, **opts),
                       ref(regions, rl, words, wl, **opts), "scores")


@pytest.mark.parametrize("scale", [1e25, 1e-25, 1.0])
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_dense_images_inference_any_row_scale(scale, direction):
    # rows beyond 1e18 or below 1e-18 in norm take the packed path, the others stay direct: either
    # way the reference's scores (a row below the eps of 1e-12 is x / 1e-12, by definition)
    regions, _, words, wl = make_inputs(12, 5, 6, 4, 9, seed=22)
    rl = torch.full((12,), 6)
    regions[5] *= scale
    want = ref(regions, rl, words, wl, direction=direction)
    assert rel_err(cpu(regions, rl, words, wl, direction=direction), want) <= 1e-10
    r32, w32 = regions.float(), words.float()
    got32 = cpu(r32, rl, w32, wl, direction=direction)
    assert torch.isfinite(got32).all()
    _assert_fp32_close(got32, ref(r32, rl, w32, wl, direction=direction),
                       ref(r32.double(), rl, w32.double(), wl, direction=direction), "scores")


# ----------------------------------------------------------------------------- "both" backward paths
# direction="both" back-propagates both directions in one pass over groups of image blocks (here
# five, or one), with a partial of the captions' Gram gradients per group summed in group order.
@pytest.mark.parametrize("b_img,n,b_txt,m", [(40, 7, 6, 5), (3, 4, 64, 32)], ids=["groups", "one-group"])
def test_both_backward_paths_match_reference(b_img, n, b_txt, m):
    regions, rl, words, wl = make_inputs(b_img, b_txt, n, m, 6, seed=23)
    s, gr, gw = scores_and_grads(cpu, regions, rl, words, wl, direction="both")
    s_ref, gr_ref, gw_ref = scores_and_grads(ref, regions, rl, words, wl, direction="both")
    assert rel_err(s, s_ref) <= 1e-10 and rel_err(gr, gr_ref) <= 1e-10 and rel_err(gw, gw_ref) <= 1e-10


@pytest.mark.parametrize("wrt", ["regions", "words"])
@pytest.mark.parametrize("b_img,n,b_txt,m", [(40, 7, 6, 5), (3, 4, 64, 32)], ids=["groups", "one-group"])
def test_both_backward_of_one_side_matches_reference(b_img, n, b_txt, m, wrt):
    # the gradient of one side only (a frozen encoder on the other): no Gram gradients of the other
    regions, rl, words, wl = make_inputs(b_img, b_txt, n, m, 6, seed=24)
    grads = []
    for fn in (cpu, ref):
        r, w = regions.clone().requires_grad_(wrt == "regions"), words.clone().requires_grad_(wrt == "words")
        s = fn(r, rl, w, wl, direction="both")
        grads.append(torch.autograd.grad(s.sum(), r if wrt == "regions" else w)[0])
    assert rel_err(*grads) <= 1e-10


# ----------------------------------------------------------------------------- autograd, opcheck
@pytest.mark.parametrize("opts", [OPTION_GRID[i] for i in (0, 3, 5, 10, 13, 16, 19, 22)], ids=option_id)
def test_gradcheck(opts):
    regions, rl, words, wl = make_inputs(3, 2, 4, 3, 5, seed=11, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, w: cpu(r, rl, w, wl, **opts), (regions, words), eps=1e-6, atol=1e-8)


def _op_samples():
    from mefn_fast.backends.ext_ops import option_args
    from mefn_fast.options import make_options

    out = []
    for i, opts in enumerate([OPTION_GRID[0], OPTION_GRID[7], OPTION_GRID[17]]):
        for dtype in (torch.float32, torch.float64):
            r, rl, w, wl = make_inputs(3, 4, 5, 6, 7, dtype=dtype, seed=i, requires_grad=True)
            out.append(((r, rl, w, wl), option_args(make_options(**opts))))
    return out


def test_opcheck_forward_op():
    from mefn_fast.backends.ext_ops import fwd_op

    for (r, rl, w, wl), args in _op_samples():
        torch.library.opcheck(fwd_op, (r, rl, w, wl, *args))


def test_opcheck_backward_op():
    from mefn_fast.backends.ext_ops import bwd_op

    for (r, rl, w, wl), args in _op_samples():
        g = torch.randn(r.shape[0], w.shape[0], dtype=r.dtype)
        for need in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(bwd_op, (g, r.detach(), rl, w.detach(), wl, *args, *need))


def test_backward_honours_needs_input_grad():
    regions, rl, words, wl = make_inputs(3, 4, 5, 6, 7, seed=2)
    words.requires_grad_(True)
    s = cpu(regions, rl, words, wl, direction="both")
    (gw,) = torch.autograd.grad(s.sum(), (words,))
    _, _, gw_ref = scores_and_grads(ref, regions, rl, words, wl, torch.ones_like(s), direction="both")
    assert regions.grad is None and rel_err(gw, gw_ref) <= 1e-10


# ----------------------------------------------------------------------------- layouts and sizes
def test_non_contiguous_inputs():
    regions, rl, words, wl = make_inputs(4, 5, 6, 7, 9, seed=4)
    r_nc = regions.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    w_nc = torch.stack([words, words], dim=-1)[..., 0]  # same values, strided last dim
    rl_nc = torch.stack([rl, rl], 1)[:, 0]
    assert not r_nc.is_contiguous() and not w_nc.is_contiguous() and not rl_nc.is_contiguous()
    for direction in ("t2i", "i2t", "both"):
        s, gr, gw = scores_and_grads(cpu, r_nc, rl_nc, w_nc, wl, direction=direction)
        s2, gr2, gw2 = scores_and_grads(ref, regions, rl, words, wl, direction=direction)
        assert rel_err(s, s2) <= 1e-10 and rel_err(gr, gr2) <= 1e-10 and rel_err(gw, gw2) <= 1e-10


def test_stride_zero_upstream_gradient():
    regions, rl, words, wl = make_inputs(3, 4, 5, 6, 7, seed=5, requires_grad=True)
    cpu(regions, rl, words, wl, direction="both").sum().backward()  # grad is an expanded scalar
    _, gr, gw = scores_and_grads(ref, regions, rl, words, wl, torch.ones(3, 4, dtype=torch.float64), direction="both")
    assert rel_err(regions.grad, gr) <= 1e-10 and rel_err(words.grad, gw) <= 1e-10


@pytest.mark.parametrize("b_img,b_txt", [(1, 6), (5, 1), (1, 1)])
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_single_image_or_caption(b_img, b_txt, direction):
    regions, rl, words, wl = make_inputs(b_img, b_txt, 6, 4, 10, seed=6)
    s, gr, gw = scores_and_grads(cpu, regions, rl, words, wl, direction=direction)
    s2, gr2, gw2 = scores_and_grads(ref, regions, rl, words, wl, direction=direction)
    assert s.shape == (b_img, b_txt)
    assert rel_err(s, s2) <= 1e-10 and rel_err(gr, gr2) <= 1e-10 and rel_err(gw, gw2) <= 1e-10


@pytest.mark.parametrize("opts", [OPTION_GRID[0], OPTION_GRID[21]], ids=option_id)
def test_many_blocks(opts):
    # block sizes are about 256 / N images and 512 / M captions, at most a batch's eighth: here
    # 8+ blocks per side, a ragged last block, every length from 1 to the maximum.
    regions, rl, words, wl = make_inputs(67, 150, 5, 4, 8, seed=8)
    s, gr, gw = scores_and_grads(cpu, regions, rl, words, wl, **opts)
    s2, gr2, gw2 = scores_and_grads(ref, regions, rl, words, wl, **opts)
    assert rel_err(s, s2) <= 1e-10 and rel_err(gr, gr2) <= 1e-10 and rel_err(gw, gw2) <= 1e-10


def test_empty_batches():
    regions, rl, words, wl = make_inputs(2, 3, 4, 3, 5, requires_grad=True)
    s = cpu(regions[:0], rl[:0], words, wl)
    assert s.shape == (0, 3)
    s = cpu(regions, rl, words[:0], wl[:0])
    assert s.shape == (2, 0)
    s.sum().backward()
    assert regions.grad is not None and (regions.grad == 0).all()


def test_padding_is_inert_and_gets_zero_gradient():
    regions, rl, words, wl = make_inputs(3, 4, 6, 5, 7, seed=9)
    r_pad, w_pad = regions.clone(), words.clone()
    for i, n in enumerate(rl.tolist()):
        r_pad[i, n:] = float("nan")
    for t, m in enumerate(wl.tolist()):
        w_pad[t, m:] = 1e30
    for direction in ("t2i", "i2t", "both"):
        s, gr, gw = scores_and_grads(cpu, r_pad, rl, w_pad, wl, direction=direction)
        s2, gr2, gw2 = scores_and_grads(ref, regions, rl, words, wl, direction=direction)
        assert rel_err(s, s2) <= 1e-10 and rel_err(gr, gr2) <= 1e-10 and rel_err(gw, gw2) <= 1e-10
        for i, n in enumerate(rl.tolist()):
            assert (gr[i, n:] == 0).all()
        for t, m in enumerate(wl.tolist()):
            assert (gw[t, m:] == 0).all()


def test_zero_vectors_match_reference():
    regions, rl, words, wl = make_inputs(2, 3, 4, 3, 5, seed=1)
    regions[0, 1] = 0.0
    words[1, 0] = 0.0
    s, gr, gw = scores_and_grads(cpu, regions, rl, words, wl, direction="both")
    s2, gr2, gw2 = scores_and_grads(ref, regions, rl, words, wl, direction="both")
    assert torch.isfinite(s).all() and torch.isfinite(gr).all() and torch.isfinite(gw).all()
    assert rel_err(s, s2) <= 1e-10 and rel_err(gr, gr2) <= 1e-10 and rel_err(gw, gw2) <= 1e-10


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_for_any_thread_count_and_across_runs(dtype):
    regions, rl, words, wl = make_inputs(37, 45, 9, 7, 40, dtype=dtype, seed=10)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            results.append(scores_and_grads(cpu, regions, rl, words, wl, direction="both"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# At MKL's sizes (d = 1024, blocks of hundreds of rows) the same bits from run to run and for one
# thread or two: inference (dense and ragged images) and training. (Every product runs on one
# thread: outside a parallel region MKL threads a product itself, and its last bits then change
# with the thread count.)
@pytest.mark.parametrize("direction", ["t2i", "both"])
def test_same_bits_for_any_thread_count_at_blas_sizes(direction):
    g = torch.Generator().manual_seed(0)
    regions, words = torch.randn(12, 36, 1024, generator=g), torch.randn(16, 20, 1024, generator=g)
    ragged, dense = torch.randint(1, 37, (12,), generator=g), torch.full((12,), 36)
    wl = torch.randint(1, 21, (16,), generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            out = [cpu(regions, rl, words, wl, direction=direction) for rl in (ragged, dense)]
            results.append(out + list(scores_and_grads(cpu, regions, ragged, words, wl, direction=direction)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- errors
def test_bad_input_through_the_cpu_backend():
    regions, rl, words, wl = make_inputs(2, 3, 4, 5, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="region_lengths"):
        cpu(regions, torch.tensor([0, 4]), words, wl)
    with pytest.raises(ValueError, match="word_lengths"):
        cpu(regions, rl, words, torch.tensor([1, 6, 2]))
    with pytest.raises(ValueError, match="feature dimension"):
        cpu(regions, rl, words[..., :5], wl)
    with pytest.raises(TypeError, match="dtype"):
        cpu(regions, rl, words.double(), wl)
    with pytest.raises(ValueError, match="tau"):
        cpu(regions, rl, words, wl, tau=0.0)
    with pytest.raises(TypeError, match=r"regions \(torch.bfloat16\) and words \(torch.float32\)"):
        cpu(regions.bfloat16(), rl, words, wl)  # mixed dtypes: both named


def test_the_raw_op_checks_its_arguments():
    from mefn_fast.backends.ext_ops import fwd_op

    regions, rl, words, wl = make_inputs(2, 3, 4, 5, 6, dtype=torch.float32)
    args = ("t2i", 9.0, 4.0, "clipped_l2norm", True, 0.25, "mean", 6.0)
    with pytest.raises(RuntimeError, match="region_lengths"):
        fwd_op(regions, torch.tensor([0, 4]), words, wl, *args)
    with pytest.raises(RuntimeError, match="word_lengths"):
        fwd_op(regions, rl, words, wl[:2], *args)
    with pytest.raises(RuntimeError, match="direction"):
        fwd_op(regions, rl, words, wl, "x2y", *args[1:])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        fwd_op(regions.half(), rl, words.half(), wl, *args)
    with pytest.raises(RuntimeError, match="tau"):
        fwd_op(regions, rl, words, wl, *args[:5], -1.0, *args[6:])


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_torch_compile_small_mefn_forward_and_backward():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = mefn_fast.MEFN(embed_dim=8, region_dim=12, text_encoder=config, text_pretrained=False, backend="cpu",
                           direction="both")
    feats = torch.randn(3, 5, 12)
    region_lengths = torch.tensor([5, 3, 1])
    ids = torch.randint(5, 50, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    eager = model(feats, ids, mask, region_lengths=region_lengths)
    eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(feats, ids, mask, region_lengths=region_lengths)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- both per-pair builds
_GENERIC_CHECK = r"""
import sys, torch, mefn_fast
import mefn_fast.backends.ext_ops  # loads the extension
sys.path.insert(0, sys.argv[1])
from conftest import OPTION_GRID, make_inputs
assert torch.ops.mefn_fast.cpu_isa() == sys.argv[2], torch.ops.mefn_fast.cpu_isa()
for opts in OPTION_GRID:
    r, rl, w, wl = make_inputs(23, 30, 7, 5, 11, seed=5)
    out = []
    for backend in ("cpu", "reference"):
        r1, w1 = r.clone().requires_grad_(True), w.clone().requires_grad_(True)
        s = mefn_fast.xattn_similarity(r1, rl, w1, wl, backend=backend, **opts)
        s.backward(torch.linspace(-1, 1, s.numel(), dtype=s.dtype).reshape(s.shape))
        out.append((s.detach(), r1.grad, w1.grad))
    for a, b in zip(*out):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-10, opts
print("ok")
"""


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_other_instruction_set_builds_match_reference(isa):
    # The op picks the AVX-512 copy of the epilogue when the CPU has it; MEFN_CPU_ISA=generic or
    # avx2 forces the default (SSE2) copy or the AVX2+FMA one, which other x86-64 CPUs run.
    import os
    import subprocess
    import sys

    env = dict(os.environ, MEFN_CPU_ISA=isa)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _GENERIC_CHECK, tests_dir, isa], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------- packing by length
def _permuted(x, perm):
    return x[perm].clone()


@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_packed_orderings_give_the_same_scores(opts):
    # the op sorts items by length into blocks: any order of the items (and of their lengths)
    # gives the same scores, permuted, to rounding; the unpacked reference agrees
    regions, rl, words, wl = make_inputs(9, 13, 7, 6, 10, seed=21)
    weight = torch.randn(9, 13, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s, gr, gw = scores_and_grads(cpu, regions, rl, words, wl, weight, **opts)
    s_ref, gr_ref, gw_ref = scores_and_grads(ref, regions, rl, words, wl, weight, **opts)
    assert rel_err(s, s_ref) <= 1e-10 and rel_err(gr, gr_ref) <= 1e-10 and rel_err(gw, gw_ref) <= 1e-10
    g = torch.Generator().manual_seed(5)
    orders = [(torch.argsort(rl), torch.argsort(wl)), (torch.argsort(-rl), torch.argsort(-wl)),
              (torch.randperm(9, generator=g), torch.randperm(13, generator=g))]
    for pi, pt in orders:
        s2, gr2, gw2 = scores_and_grads(cpu, _permuted(regions, pi), rl[pi], _permuted(words, pt), wl[pt],
                                        weight[pi][:, pt], **opts)
        assert rel_err(s2, s[pi][:, pt]) <= 1e-13
        assert rel_err(gr2, gr[pi]) <= 1e-12 and rel_err(gw2, gw[pt]) <= 1e-12


def test_packing_many_lengths_float32():
    # every caption length from 1 to 32 and a few image lengths, in a shuffled order: float32
    # within the reference's own error
    g = torch.Generator().manual_seed(6)
    regions = torch.randn(12, 36, 64, generator=g, dtype=torch.float64)
    words = torch.randn(70, 32, 64, generator=g, dtype=torch.float64)
    rl = torch.tensor([36, 36, 20, 36, 1, 36, 7, 36, 36, 30, 36, 36])
    wl = torch.randperm(70, generator=g) % 32 + 1
    upstream = torch.randn(12, 70, generator=g, dtype=torch.float64)
    for opts in (OPTION_GRID[0], OPTION_GRID[21]):
        s64, gr64, gw64 = scores_and_grads(ref, regions, rl, words, wl, upstream, **opts)
        s_ref, gr_ref, gw_ref = scores_and_grads(ref, regions.float(), rl, words.float(), wl, upstream.float(), **opts)
        s, gr, gw = scores_and_grads(cpu, regions.float(), rl, words.float(), wl, upstream.float(), **opts)
        _assert_fp32_close(s, s_ref, s64, "scores")
        _assert_fp32_close(gr, gr_ref, gr64, "grad regions")
        _assert_fp32_close(gw, gw_ref, gw64, "grad words")


# ----------------------------------------------------------------------------- saved tiles
@pytest.fixture
def tile_budget():
    from mefn_fast.backends import ext_ops

    before = ext_ops.tile_budget()
    yield ext_ops.set_tile_budget
    ext_ops.set_tile_budget(before)


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("opts", [OPTION_GRID[i] for i in (0, 7, 11, 17, 20)], ids=option_id)
def test_saved_tiles_and_recomputation_agree(opts, dtype, ragged, tile_budget):
    # saved (the default budget holds this batch), recomputed in one super-block (budget 0 saves
    # nothing), recomputed in many small super-blocks, and saved with dS in several super-blocks:
    # the same scores, bit for bit (dense images included: the training forward packs them even
    # when it saves nothing)
    from mefn_fast.backends import ext_ops

    regions, rl, words, wl = make_inputs(23, 29, 7, 6, 16, dtype=dtype, seed=12, ragged=ragged)
    upstream = torch.randn(23, 29, generator=torch.Generator().manual_seed(3), dtype=dtype)
    args = ext_ops.option_args(mefn_fast.options.make_options(**opts))
    _, saved = ext_ops.fwd_saved_op(regions, rl, words, wl, *args, ext_ops.DEFAULT_TILE_BUDGET)
    assert saved.numel() > 0
    _, nothing = ext_ops.fwd_saved_op(regions, rl, words, wl, *args, 0)
    assert nothing.numel() == 0
    results = []
    for budget in (ext_ops.DEFAULT_TILE_BUDGET, 0):
        tile_budget(budget)
        results.append(scores_and_grads(cpu, regions, rl, words, wl, upstream, **opts))
    results.append((results[0][0],) + ext_ops.bwd_saved_op(upstream, regions, rl, words, wl, nothing, *args, 4096,
                                                           True, True))
    # S saved (at most 3/4 of the budget) and dS in several super-blocks within the rest
    tight = int(saved.numel() * saved.element_size() / 0.75) + 8
    scores, kept = ext_ops.fwd_saved_op(regions, rl, words, wl, *args, tight)
    assert kept.numel() == saved.numel()
    results.append((scores,) + ext_ops.bwd_saved_op(upstream, regions, rl, words, wl, kept, *args, tight, True, True))
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0])
        for a, b in zip(other[1:], results[0][1:]):
            assert rel_err(a, b) <= (1e-13 if dtype == torch.float64 else 1e-5)


def test_saved_tiles_are_checked():
    from mefn_fast.backends import ext_ops

    regions, rl, words, wl = make_inputs(3, 4, 5, 6, 7, seed=2)
    args = ext_ops.option_args(mefn_fast.options.make_options())
    _, saved = ext_ops.fwd_saved_op(regions, rl, words, wl, *args, 1 << 20)
    with pytest.raises(RuntimeError, match="saved"):
        ext_ops.bwd_saved_op(torch.ones(3, 4, dtype=torch.float64), regions, rl, words, wl, saved[:-1], *args, 1 << 20,
                             True, True)
    with pytest.raises(ValueError, match="tile budget"):
        ext_ops.set_tile_budget(-1)


def test_opcheck_saved_ops():
    from mefn_fast.backends.ext_ops import bwd_saved_op, fwd_saved_op

    for (r, rl, w, wl), args in _op_samples():
        torch.library.opcheck(fwd_saved_op, (r, rl, w, wl, *args, 1 << 20))
        _, saved = fwd_saved_op(r.detach(), rl, w.detach(), wl, *args, 1 << 20)
        g = torch.randn(r.shape[0], w.shape[0], dtype=r.dtype)
        for s in (saved, saved[:0]):
            torch.library.opcheck(bwd_saved_op, (g, r.detach(), rl, w.detach(), wl, s, *args, 1 << 20, True, True))


@pytest.mark.parametrize("budget", [0, 20000])
def test_recomputing_backward_same_bits_for_any_thread_count(budget, tile_budget):
    tile_budget(budget)
    regions, rl, words, wl = make_inputs(37, 45, 9, 7, 40, dtype=torch.float32, seed=10)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(scores_and_grads(cpu, regions, rl, words, wl, direction="both", agg="lse"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- extreme inputs
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.float32, 3e37), (torch.float64, 1e300)])
def test_normalisation_cannot_overflow(dtype, scale):
    # row norms are taken without squaring the raw features in their own precision: features of
    # any finite size give the scores of the unit rows, and gradients scaled by 1 / size (rows
    # far below the normalisation's eps of 1e-12 are a different matter: x / 1e-12, as defined)
    regions, rl, words, wl = make_inputs(3, 4, 7, 5, 11, dtype=dtype, seed=13)
    upstream = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=dtype)
    for direction in ("t2i", "both"):
        s, gr, gw = scores_and_grads(cpu, regions, rl, words, wl, upstream, direction=direction)
        s2, gr2, gw2 = scores_and_grads(cpu, regions * scale, rl, words * scale, wl, upstream, direction=direction)
        assert torch.isfinite(s2).all() and torch.isfinite(gr2).all() and torch.isfinite(gw2).all()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert rel_err(s2, s) <= tol
        assert rel_err(gr2 * scale, gr) <= tol and rel_err(gw2 * scale, gw) <= tol


def _richardson_gradient(fn, x, index, h):
    def central(step):
        xp, xm = x.clone(), x.clone()
        xp.view(-1)[index] += step
        xm.view(-1)[index] -= step
        return float((fn(xp) - fn(xm)) / (2 * step))
    return (4 * central(h / 2) - central(h)) / 3


@pytest.mark.parametrize("seed", [0, 2])
def test_extreme_hyperparameters_match_reference(seed):
    # lambda = 1e4 and tau = 1e-8: attention nearly one-hot, weights nearly one-hot; the log
    # softmax is taken as (L - max) - log sum, the weights' backward around the heaviest weight
    opts = dict(lambda_t2i=1e4, tau=1e-8)
    regions, rl, words, wl = make_inputs(3, 4, 7, 5, 11, seed=seed)
    upstream = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    s, gr, gw = scores_and_grads(cpu, regions, rl, words, wl, upstream, **opts)
    s2, gr2, gw2 = scores_and_grads(ref, regions, rl, words, wl, upstream, **opts)
    assert rel_err(s, s2) <= 1e-10 and rel_err(gr, gr2) <= 1e-10 and rel_err(gw, gw2) <= 1e-10


@pytest.mark.parametrize("opts", [dict(lambda_t2i=1e4, tau=1e-8), dict(lambda_i2t=1e4, tau=1e-8, direction="i2t"),
                                  dict(lambda_t2i=1e4, lambda_i2t=1e4, tau=1e-8, direction="both", agg="lse")],
                         ids=["t2i", "i2t", "both-lse"])
def test_extreme_hyperparameters_match_finite_differences(opts):
    regions, rl, words, wl = make_inputs(3, 4, 7, 5, 11, seed=0)
    upstream = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    _, gr, gw = scores_and_grads(cpu, regions, rl, words, wl, upstream, **opts)
    for x, grad, which in ((regions, gr, 0), (words, gw, 1)):
        def f(z):
            args = (z, rl, words, wl) if which == 0 else (regions, rl, z, wl)
            return (cpu(*args, **opts) * upstream).sum()
        for index in torch.topk(grad.abs().flatten(), 3).indices.tolist():
            fd = _richardson_gradient(f, x, index, 1e-5)
            assert abs(fd - float(grad.view(-1)[index])) <= 1e-6 * float(grad.abs().max())
