"""The reference backend against the math of docs/math.md (independent loops), SCAN, and itself."""
from __future__ import annotations

import pytest
import torch

import mefn_fast
from conftest import OPTION_GRID, make_inputs, option_id
from spec_loops import spec_scores

# (b_img, b_txt, n, m, d): length-1 items, primes, non-powers of two.
SHAPES = [(3, 4, 7, 5, 11), (1, 1, 1, 1, 3), (2, 5, 13, 3, 8), (4, 2, 3, 17, 5)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _ref(regions, rl, words, wl, **opts):
    return mefn_fast.xattn_similarity(regions, rl, words, wl, backend="reference", **opts)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_forward_matches_spec_loops(shape, opts):
    regions, rl, words, wl = make_inputs(*shape, seed=hash(shape) % 1000)
    got = _ref(regions, rl, words, wl, **opts)
    want = spec_scores(regions, rl, words, wl, **opts)
    assert got.dtype == torch.float64 and got.shape == (shape[0], shape[1])
    assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("opts", OPTION_GRID, ids=option_id)
def test_gradients_match_spec_loops(opts):
    regions, rl, words, wl = make_inputs(3, 4, 7, 5, 6, seed=3, requires_grad=True)
    weight = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_ref = torch.autograd.grad((_ref(regions, rl, words, wl, **opts) * weight).sum(), (regions, words))
    g_spec = torch.autograd.grad((spec_scores(regions, rl, words, wl, **opts) * weight).sum(), (regions, words))
    for a, b in zip(g_ref, g_spec):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("opts", [OPTION_GRID[i] for i in (0, 7, 10, 13, 22)], ids=option_id)
def test_gradcheck(opts):
    regions, rl, words, wl = make_inputs(2, 3, 4, 3, 5, seed=5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, w: _ref(r, rl, w, wl, **opts), (regions, words))


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_padding_is_inert(direction):
    regions, rl, words, wl = make_inputs(3, 4, 6, 5, 7, seed=11)
    r2, w2 = regions.clone(), words.clone()
    for i, n in enumerate(rl.tolist()):
        r2[i, n:] = 1e3 * torch.randn_like(r2[i, n:])
    for t, m in enumerate(wl.tolist()):
        w2[t, m:] = float("nan") if t % 2 else -7.0
    outs = []
    for r, w in ((regions, words), (r2, w2)):
        r = r.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        s = _ref(r, rl, w, wl, direction=direction)
        s.sum().backward()
        outs.append((s.detach(), r.grad, w.grad))
    (s1, gr1, gw1), (s2, gr2, gw2) = outs
    assert torch.equal(s1, s2)
    assert torch.equal(gr1, gr2) and torch.equal(gw1, gw2)
    for i, n in enumerate(rl.tolist()):
        assert torch.count_nonzero(gr2[i, n:]) == 0
    for t, m in enumerate(wl.tolist()):
        assert torch.count_nonzero(gw2[t, m:]) == 0
    assert torch.isfinite(gr2).all() and torch.isfinite(gw2).all()


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_chunking_does_not_change_scores(direction):
    regions, rl, words, wl = make_inputs(3, 11, 6, 5, 7, seed=2)
    full = _ref(regions, rl, words, wl, direction=direction, chunk_size=11)
    for chunk in (1, 3, 4):
        assert rel_err(_ref(regions, rl, words, wl, direction=direction, chunk_size=chunk), full) <= 1e-14


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    regions, rl, words, wl = make_inputs(3, 4, 9, 6, 16, seed=7)
    want = _ref(regions, rl, words, wl, direction="both")
    r, w = regions.to(dtype).requires_grad_(True), words.to(dtype).requires_grad_(True)
    got = _ref(r, rl, w, wl, direction="both")
    assert got.dtype == dtype
    # the inputs' own rounding dominates: compare against float64 on the rounded inputs
    want_rounded = _ref(r.detach().double(), rl, w.detach().double(), wl, direction="both")
    assert (got.double() - want_rounded).abs().max() <= tol
    assert (got.double() - want).abs().max() <= 10 * tol
    got.sum().backward()
    assert r.grad.dtype == dtype and torch.isfinite(r.grad.float()).all()


def test_empty_batches():
    regions, rl, words, wl = make_inputs(2, 3, 4, 3, 5)
    assert _ref(regions[:0], rl[:0], words, wl).shape == (0, 3)
    assert _ref(regions, rl, words[:0], wl[:0]).shape == (2, 0)


def test_zero_vectors_give_finite_scores_and_gradients():
    regions, rl, words, wl = make_inputs(2, 2, 4, 3, 5, seed=1)
    regions[0, 1] = 0.0
    words[1, 0] = 0.0
    regions.requires_grad_(True)
    s = _ref(regions, rl, words, wl, direction="both")
    s.sum().backward()
    assert torch.isfinite(s).all() and torch.isfinite(regions.grad).all()


# ----------------------------------------------------------------------------- SCAN
# SCAN (kuanghuei/SCAN, model.py), transcribed: its features are l2-normalised by the encoders,
# images have no padding, captions are sliced to their length.
def _scan_l2norm(x, dim, eps=1e-8):
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _scan_cosine(x1, x2, dim=1, eps=1e-8):
    w12 = torch.sum(x1 * x2, dim)
    w1, w2 = torch.norm(x1, 2, dim), torch.norm(x2, 2, dim)
    return (w12 / (w1 * w2).clamp(min=eps)).squeeze()


def _scan_func_attention(query, context, raw_feature_norm, smooth):
    batch_size_q, queryL = query.size(0), query.size(1)
    batch_size, sourceL = context.size(0), context.size(1)
    attn = torch.bmm(context, torch.transpose(query, 1, 2))
    if raw_feature_norm == "clipped_l2norm":
        attn = torch.nn.LeakyReLU(0.1)(attn)
        attn = _scan_l2norm(attn, 2)
    elif raw_feature_norm != "no_norm":
        raise ValueError(raw_feature_norm)
    attn = torch.transpose(attn, 1, 2).contiguous().view(batch_size * queryL, sourceL)
    attn = torch.softmax(attn * smooth, dim=1).view(batch_size, queryL, sourceL)
    attnT = torch.transpose(attn, 1, 2).contiguous()
    weightedContext = torch.bmm(torch.transpose(context, 1, 2), attnT)
    return torch.transpose(weightedContext, 1, 2)


def _scan_agg(row_sim, agg_func, lambda_lse):
    if agg_func == "LogSumExp":
        return torch.log(row_sim.mul(lambda_lse).exp().sum(dim=1, keepdim=True)) / lambda_lse
    return row_sim.mean(dim=1, keepdim=True)


def _scan_xattn_score(images, captions, cap_lens, direction, raw_feature_norm, agg_func, lam, lambda_lse):
    similarities = []
    for i in range(captions.size(0)):
        cap_i = captions[i, : cap_lens[i], :].unsqueeze(0).contiguous()
        cap_i_expand = cap_i.repeat(images.size(0), 1, 1)
        if direction == "t2i":
            wei = _scan_func_attention(cap_i_expand, images, raw_feature_norm, lam)
            row_sim = _scan_cosine(cap_i_expand, wei, dim=2).view(images.size(0), -1)
        else:
            wei = _scan_func_attention(images, cap_i_expand, raw_feature_norm, lam)
            row_sim = _scan_cosine(images, wei, dim=2).view(images.size(0), -1)
        similarities.append(_scan_agg(row_sim, agg_func, lambda_lse))
    return torch.cat(similarities, 1)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("attn_norm", ["clipped_l2norm", "none"])
@pytest.mark.parametrize("agg", ["mean", "lse"])
def test_mfe_off_equals_scan(direction, attn_norm, agg):
    regions, _, words, wl = make_inputs(4, 5, 6, 7, 12, seed=21)
    rl = torch.full((4,), 6)
    images = torch.nn.functional.normalize(regions, dim=-1)
    captions = torch.nn.functional.normalize(words, dim=-1)
    lam = 9.0 if direction == "t2i" else 4.0
    scan = _scan_xattn_score(images, captions, wl.tolist(), direction,
                             "clipped_l2norm" if attn_norm == "clipped_l2norm" else "no_norm",
                             "LogSumExp" if agg == "lse" else "Mean", lam, 6.0)
    ours = _ref(regions, rl, words, wl, direction=direction, attn_norm=attn_norm, agg=agg, mfe=False)
    assert rel_err(ours, scan) <= 1e-12


# ----------------------------------------------------------------------------- entropy_map
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_entropy_map_is_consistent(direction):
    regions, rl, words, wl = make_inputs(3, 4, 7, 5, 11, seed=4)
    i, t = 2, 3
    maps = mefn_fast.entropy_map(regions[i], words[t], region_length=int(rl[i]), word_length=int(wl[t]),
                                 direction=direction)
    n, m = (int(rl[i]), int(wl[t])) if direction == "t2i" else (int(wl[t]), int(rl[i]))
    assert maps.A.shape == (n, m) and maps.h.shape == (n, m) and maps.w.shape == (m,)
    torch.testing.assert_close(maps.A.sum(0), torch.ones(m, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(maps.h, -maps.A * maps.A.log(), rtol=0, atol=1e-14)
    torch.testing.assert_close(maps.H, maps.h.sum(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(maps.MFE, maps.H.sum(), rtol=0, atol=1e-13)
    torch.testing.assert_close(maps.w.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-14)
    # sharper attention (lower entropy) weighs more
    order_h = torch.argsort(maps.H)
    assert bool((maps.w[order_h][:-1] >= maps.w[order_h][1:] - 1e-15).all())
    score = mefn_fast.xattn_similarity(regions, rl, words, wl, direction=direction, backend="reference")[i, t]
    assert abs(float(maps.score - score)) <= 1e-12


def test_entropy_map_single_context_row_has_zero_normalised_entropy():
    maps = mefn_fast.entropy_map(torch.randn(1, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    assert torch.equal(maps.H_norm, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(maps.w, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_entropy_map_mfe_off_is_uniform():
    maps = mefn_fast.entropy_map(torch.randn(5, 4), torch.randn(3, 4), mfe=False)
    torch.testing.assert_close(maps.w, torch.full((3,), 1 / 3))
