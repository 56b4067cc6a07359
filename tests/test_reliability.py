"""Hostile input to the op and the losses: either a correct result documented in docs/math.md
("Edge cases and errors") or a ValueError / TypeError naming the argument; never a silent wrong
number. Every case runs on each backend that can take CPU tensors here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mefn_fast
from conftest import OPTION_GRID, make_inputs, option_id

BACKENDS = [b for b in mefn_fast.available_backends() if b in ("reference", "cpu")]
F64_RTOL = 1e-10


def call(backend, regions, rl, words, wl, **kw):
    return mefn_fast.xattn_similarity(regions, rl, words, wl, backend=backend, **kw)


def rel_err(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ----------------------------------------------------------------------------- items with no rows
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["regions", "words"])
@pytest.mark.parametrize("lengths", ["None", "zeros", "ones"])
def test_items_without_rows_are_an_error(backend, side, lengths):
    regions, words = torch.randn(2, 3, 8), torch.randn(3, 4, 8)
    if side == "regions":
        regions = regions[:, :0]
    else:
        words = words[:, :0]
    empty = regions if side == "regions" else words
    given = {"None": None, "zeros": [0] * empty.shape[0], "ones": [1] * empty.shape[0]}[lengths]
    rl, wl = (given, None) if side == "regions" else (None, given)
    name = "region_lengths" if side == "regions" else "word_lengths"
    with pytest.raises(ValueError, match=name):
        call(backend, regions, rl, words, wl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_of_empty_items_is_an_empty_matrix(backend):
    # no item at all, so no empty item: the (0, B_txt) result of an empty batch
    s = call(backend, torch.randn(0, 0, 8), None, torch.randn(3, 4, 8), None)
    assert s.shape == (0, 3)


# ----------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,exc", [
    ([2 ** 63, 1], ValueError),          # one past int64
    ([1, 2 ** 70], ValueError),
    ([-2 ** 70, 1], ValueError),
    ([2 ** 64 + 3, 3], ValueError),      # wraps to 3 in 64 bits
    ([1.0, 2.0], TypeError),
    ([1, None], TypeError),
    ([True, 1], TypeError),
    ([1, "2"], TypeError),
    ([[1], [2]], TypeError),
    (np.array([1.5, 2.0]), TypeError),
    (np.array([[1, 2]]), TypeError),
    (torch.tensor([2 ** 62, 1]), ValueError),
    (torch.tensor([2 ** 64 - 2, 3], dtype=torch.uint64), ValueError),
])
def test_lengths_no_int64_holds_name_the_argument(backend, lengths, exc):
    regions, rl, words, wl = make_inputs(2, 3, 4, 5, 6, dtype=torch.float32)
    with pytest.raises(exc, match="region_lengths"):
        call(backend, regions, lengths, words, wl)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convert", [
    lambda x: np.asarray(x), lambda x: np.asarray(x, dtype=np.int32), lambda x: [np.int64(v) for v in x],
    lambda x: torch.tensor(x, dtype=torch.uint16), lambda x: torch.tensor(x, dtype=torch.uint32),
    lambda x: torch.tensor(x, dtype=torch.uint64), lambda x: tuple(x), lambda x: iter(x)],
    ids=["numpy", "numpy-int32", "numpy-scalars", "uint16", "uint32", "uint64", "tuple", "iterator"])
def test_integer_lengths_of_any_kind_are_taken(backend, convert):
    regions, rl, words, wl = make_inputs(2, 3, 4, 5, 6, dtype=torch.float64)
    want = call(backend, regions, rl, words, wl)
    got = call(backend, regions, convert(rl.tolist()), words, convert(wl.tolist()))
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def tiny_model():
    from mefn_fast.model.text import tiny_text_config

    return mefn_fast.MEFN(text_encoder=tiny_text_config(30, 16, 1, 2), region_dim=8, embed_dim=8)


@pytest.mark.parametrize("lengths,exc", [([3.5, 2], TypeError), (torch.tensor([1.9, 2.0]), TypeError),
                                         ([True, 2], TypeError), ([2 ** 70, 1], ValueError), ([0, 1], ValueError),
                                         ([5, 1], ValueError), ([1, 2, 3], ValueError)])
def test_model_region_lengths_are_checked_like_the_op(tiny_model, lengths, exc):
    """MEFN.encode_images once truncated float lengths (3.5 -> 3) in silence."""
    model = tiny_model
    with pytest.raises(exc, match="region_lengths"):
        model.encode_images(torch.randn(2, 4, 8), lengths)
    assert model.encode_images(torch.randn(2, 4, 8), np.array([4, 1])).lengths.tolist() == [4, 1]


@pytest.mark.parametrize("side", ["regions_i", "words_t"])
def test_entropy_map_of_an_empty_item(side):
    x, empty = torch.randn(3, 4), torch.randn(0, 4)
    args = (empty, x) if side == "regions_i" else (x, empty)
    with pytest.raises(ValueError, match="region_lengths" if side == "regions_i" else "word_lengths"):
        mefn_fast.entropy_map(*args)


# ----------------------------------------------------------------------------- features
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,exc,name", [
    (lambda r: r.to_sparse(), TypeError, "regions"),
    (lambda r: np.asarray(r), TypeError, "regions"),
    (lambda r: r.bool(), TypeError, "regions"),
    (lambda r: r.to(torch.complex64), TypeError, "regions"),
    (lambda r: r[None], ValueError, "regions"),
])
def test_feature_tensors_of_the_wrong_kind(backend, make, exc, name):
    regions, rl, words, wl = make_inputs(2, 3, 4, 5, 6, dtype=torch.float32)
    with pytest.raises(exc, match=name):
        call(backend, make(regions), rl, words, wl)


# ----------------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kw,name", [
    (dict(lambda_t2i=1e39), "lambda_t2i"),
    (dict(lambda_i2t=1e300, direction="i2t"), "lambda_i2t"),
    (dict(lambda_t2i=4e38, attn_norm="none"), "lambda_t2i"),
    (dict(tau=1e-40), "tau"),              # -H/tau overflows float32
    (dict(tau=1e-46), "tau"),              # rounds to 0 in float32
    (dict(lambda_lse=1e39, agg="lse"), "lambda_lse"),
    (dict(lambda_lse=1e-46, agg="lse"), "lambda_lse"),
])
def test_hyperparameters_beyond_the_compute_dtype(backend, dtype, kw, name):
    """float32 and half inputs are computed in float32: a temperature it cannot hold would give NaN."""
    regions, rl, words, wl = make_inputs(2, 3, 4, 5, 6, dtype=dtype, ragged=False)
    with pytest.raises(ValueError, match=name):
        call(backend, regions, rl, words, wl, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,kw", [
    (torch.float32, dict(lambda_t2i=1e38)), (torch.float32, dict(tau=1e-38)),
    (torch.float32, dict(lambda_lse=1e38, agg="lse")), (torch.float32, dict(lambda_lse=1e-38, agg="lse")),
    (torch.float64, dict(lambda_t2i=1e39)), (torch.float64, dict(tau=1e-300)),
    (torch.float64, dict(lambda_lse=1e300, agg="lse")), (torch.float64, dict(lambda_lse=1e-300, agg="lse")),
])
def test_extreme_hyperparameters_the_dtype_holds_give_finite_scores(backend, dtype, kw):
    regions, rl, words, wl = make_inputs(2, 3, 4, 5, 6, dtype=dtype, ragged=False)
    assert torch.isfinite(call(backend, regions, rl, words, wl, **kw)).all()


def test_entropy_map_checks_hyperparameters_against_its_dtype():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="lambda_t2i"):
        mefn_fast.entropy_map(x, x, lambda_t2i=1e39)
    assert torch.isfinite(mefn_fast.entropy_map(x.double(), x.double(), lambda_t2i=1e39).score)


# ----------------------------------------------------------------------------- huge and tiny norms
@pytest.mark.parametrize("scale", [1e20, 1e30, "max"])
@pytest.mark.parametrize("direction", ["t2i", "both"])
def test_float32_features_of_huge_norm(scale, direction):
    """Unit rows do not depend on the scale of a row, so the scores of scaled features are the
    scores of the originals; the float32 error stays that of unscaled float32 inputs."""
    regions, rl, words, wl = make_inputs(3, 4, 5, 6, 7, dtype=torch.float64, seed=4)
    if scale == "max":  # the largest entry of each side at 3e38: the norm itself is beyond float32
        regions = regions / regions.abs().max() * 3e38
        words = words / words.abs().max() * 3e38
    else:
        regions, words = regions * scale, words * scale
    r32, w32 = regions.float(), words.float()
    want = call("reference", r32.double(), rl, w32.double(), wl, direction=direction)
    got = call("reference", r32, rl, w32, wl, direction=direction)
    small = call("reference", (r32.double() / r32.double().abs().max()).float(), rl,
                 (w32.double() / w32.double().abs().max()).float(), wl, direction=direction)
    assert torch.isfinite(got).all()
    own_error = float((small.double() - want).abs().max())
    assert float((got.double() - want).abs().max()) <= 4 * own_error + 8 * 2.0 ** -24


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_float64_features_of_huge_norm_scores_and_gradients(direction):
    regions, rl, words, wl = make_inputs(3, 4, 5, 6, 7, seed=6)
    scale = 1e200  # squares overflow float64
    r1, w1 = regions.clone().requires_grad_(True), words.clone().requires_grad_(True)
    r2, w2 = (regions * scale).requires_grad_(True), (words * scale).requires_grad_(True)
    s1 = call("reference", r1, rl, w1, wl, direction=direction)
    s2 = call("reference", r2, rl, w2, wl, direction=direction)
    assert rel_err(s2, s1) <= F64_RTOL
    g1 = torch.autograd.grad(s1.sum(), (r1, w1))
    g2 = torch.autograd.grad(s2.sum(), (r2, w2))
    for a, b in zip(g2, g1):  # d/dx f(x / c) = f'(x / c) / c
        assert rel_err(a * scale, b) <= F64_RTOL


def test_normalisation_of_ordinary_rows_is_unchanged():
    from mefn_fast.backends.reference import _masked_normalize

    x = torch.randn(4, 9, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([9, 1, 5, 9])
    x[2, 1] = 0.0
    x[3, 2] = 1e-13  # below F.normalize's eps: x / eps
    got, mask = _masked_normalize(x, lengths)
    want = torch.nn.functional.normalize(torch.where(mask[..., None], x, 0.0), dim=-1, eps=1e-12)
    assert float((got - want).abs().max()) <= 4 * 2.0 ** -52


# ----------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_valid_row_spoils_exactly_its_row_and_column(backend, direction, value):
    """docs/math.md: a NaN or infinity in a valid row of image i (caption t) makes the scores of
    image i (caption t) NaN and leaves every other score bit for bit unchanged."""
    regions, rl, words, wl = make_inputs(3, 4, 5, 6, 7, seed=3, dtype=torch.float32)
    want = call(backend, regions, rl, words, wl, direction=direction)
    r2, w2 = regions.clone(), words.clone()
    r2[2, int(rl[2]) - 1, 3] = value
    w2[1, 0, 2] = value
    got = call(backend, r2, rl, w2, wl, direction=direction)
    spoilt = torch.zeros(3, 4, dtype=torch.bool)
    spoilt[2, :] = True
    spoilt[:, 1] = True
    assert torch.isnan(got[spoilt]).all()
    assert torch.equal(got[~spoilt], want[~spoilt])


# ----------------------------------------------------------------------------- double backward
GG_OPTIONS = [OPTION_GRID[i] for i in (0, 3, 5, 9, 14, 19, 22)]


@pytest.mark.parametrize("opts", GG_OPTIONS, ids=option_id)
def test_reference_double_backward_with_ragged_lengths(opts):
    regions, rl, words, wl = make_inputs(2, 3, 4, 3, 5, seed=5, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda r, w: call("reference", r, rl, w, wl, **opts), (regions, words),
                                        fast_mode=True)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_reference_double_backward_through_zero_rows_and_padding(direction):
    """A zero valid row (its unit row is 0) and non-finite padding: second derivatives are
    finite, and exactly 0 for the padded rows. (No finite differences here: x / max(|x|, eps)
    has a kink at |x| = eps, next to a zero row.)"""
    regions, rl, words, wl = make_inputs(3, 3, 4, 3, 5, seed=8)
    regions[0, 1] = 0.0
    words[2, 0] = 0.0
    r, w = regions.clone(), words.clone()
    for i, n in enumerate(rl.tolist()):
        r[i, n:] = float("nan")
    for t, m in enumerate(wl.tolist()):
        w[t, m:] = float("inf")
    r.requires_grad_(True)
    w.requires_grad_(True)
    s = call("reference", r, rl, w, wl, direction=direction)
    gr, gw = torch.autograd.grad((s * torch.arange(1.0, 10.0, dtype=s.dtype).view(3, 3)).sum(), (r, w),
                                 create_graph=True)
    ggr, ggw = torch.autograd.grad((gr.square().sum() + gw.sin().sum()), (r, w))
    assert torch.isfinite(ggr).all() and torch.isfinite(ggw).all()
    for i, n in enumerate(rl.tolist()):
        assert torch.count_nonzero(ggr[i, n:]) == 0
    for t, m in enumerate(wl.tolist()):
        assert torch.count_nonzero(ggw[t, m:]) == 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("direction", ["t2i", "both"])
def test_cpu_double_backward_is_refused_not_wrong(direction):
    regions, rl, words, wl = make_inputs(2, 3, 4, 3, 5, seed=5, requires_grad=True)
    f = lambda r, w: call("cpu", r, rl, w, wl, direction=direction)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"double backward.*not supported.*backend='reference'"):
        torch.autograd.gradgradcheck(f, (regions, words), fast_mode=True)
    # create_graph=True still gives the first derivatives (a gradient penalty fails only when
    # it is differentiated)
    gr, gw = torch.autograd.grad(f(regions, words).sum(), (regions, words), create_graph=True)
    want = torch.autograd.grad(f(regions, words).sum(), (regions, words))
    assert torch.equal(gr, want[0]) and torch.equal(gw, want[1])
    with pytest.raises(RuntimeError, match=r"double backward.*not supported.*backend='reference'"):
        (gr.square().sum() + gw.square().sum()).backward()
    regions.grad = None
    s = f(regions, words)
    (g,) = torch.autograd.grad(s.sum(), (regions,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), (words,))


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("loss", [lambda: mefn_fast.TripletLoss(), lambda: mefn_fast.TripletLoss(max_violation=False),
                                  lambda: mefn_fast.InfoNCELoss()], ids=["triplet-mh", "triplet-sh", "infonce"])
@pytest.mark.parametrize("scores,ids,exc,match", [
    (torch.zeros(0, 0), None, ValueError, "scores.*empty"),
    (torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), ValueError, "scores.*empty"),
    (torch.ones(3, 3, dtype=torch.long), None, TypeError, "scores.*floating"),
    (torch.ones(3, 3, dtype=torch.bool), None, TypeError, "scores.*floating"),
    (torch.zeros(2, 3), None, ValueError, "scores"),
    (torch.zeros(2, 2), torch.zeros(3), ValueError, "image_ids"),
])
def test_losses_reject_bad_score_matrices(loss, scores, ids, exc, match):
    with pytest.raises(exc, match=match):
        loss()(scores, ids)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(init_temperature="0.07"), TypeError, "init_temperature"), (dict(init_temperature=0.0), ValueError, "init_temperature"),
    (dict(max_scale=float("nan")), ValueError, "max_scale"), (dict(max_scale=0.0), ValueError, "max_scale"),
    (dict(max_scale=-1.0), ValueError, "max_scale"), (dict(max_scale="100"), TypeError, "max_scale"),
])
def test_infonce_arguments(kw, exc, name):
    with pytest.raises(exc, match=name):
        mefn_fast.InfoNCELoss(**kw)


def test_losses_of_a_single_pair_are_zero():
    s = torch.tensor([[0.3]], requires_grad=True)
    assert mefn_fast.TripletLoss()(s).item() == 0.0
    assert mefn_fast.InfoNCELoss()(s).item() == 0.0
    assert math.isfinite(mefn_fast.TripletLoss(max_violation=False)(s).item())
