"""mefn_fast.compat.scan: SCAN's xattn_score_t2i / xattn_score_i2t backed by the fused op."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mefn_fast
from conftest import make_inputs
from mefn_fast.compat import scan
from test_reference import _scan_xattn_score

_NORMS = {"clipped_l2norm": "clipped_l2norm", "no_norm": "none"}


def opt(raw_feature_norm="clipped_l2norm", agg_func="Mean", lambda_softmax=9.0, lambda_lse=6.0):
    return SimpleNamespace(raw_feature_norm=raw_feature_norm, agg_func=agg_func, lambda_softmax=lambda_softmax,
                           lambda_lse=lambda_lse)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("norm", ["clipped_l2norm", "no_norm"])
@pytest.mark.parametrize("agg", ["Mean", "LogSumExp", "Sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_reference_with_mfe_off(direction, norm, agg, dtype):
    images, _, captions, cap_lens = make_inputs(4, 5, 6, 7, 12, seed=21, dtype=dtype)
    o = opt(norm, agg, lambda_softmax=5.0, lambda_lse=4.0)
    fn = scan.xattn_score_t2i if direction == "t2i" else scan.xattn_score_i2t
    got = fn(images, captions, cap_lens.tolist(), o)
    lam = "lambda_t2i" if direction == "t2i" else "lambda_i2t"
    want = mefn_fast.xattn_similarity(images.double(), None, captions.double(), cap_lens, direction=direction,
                                      attn_norm=_NORMS[norm], mfe=False, agg="lse" if agg == "LogSumExp" else "mean",
                                      lambda_lse=4.0, backend="reference", **{lam: 5.0})
    if agg == "Sum":
        want = want * (cap_lens.double()[None, :] if direction == "t2i" else images.shape[1])
    assert got.shape == (4, 5) and got.dtype == dtype
    assert rel_err(got.double(), want) <= (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("agg", ["Mean", "LogSumExp"])
def test_equals_scan_transcription(direction, agg):
    images, _, captions, cap_lens = make_inputs(3, 4, 6, 5, 10, seed=2)
    images = torch.nn.functional.normalize(images, dim=-1)  # SCAN's encoders emit unit vectors
    captions = torch.nn.functional.normalize(captions, dim=-1)
    o = opt("clipped_l2norm", agg, lambda_softmax=9.0 if direction == "t2i" else 4.0)
    fn = scan.xattn_score_t2i if direction == "t2i" else scan.xattn_score_i2t
    want = _scan_xattn_score(images, captions, cap_lens.tolist(), direction, "clipped_l2norm", agg,
                             o.lambda_softmax, o.lambda_lse)
    assert rel_err(fn(images, captions, cap_lens, o), want) <= 1e-12


def test_gradients_flow():
    images, _, captions, cap_lens = make_inputs(2, 3, 4, 5, 6, seed=3, requires_grad=True)
    scan.xattn_score_t2i(images, captions, cap_lens, opt()).sum().backward()
    assert images.grad is not None and captions.grad is not None
    assert torch.isfinite(images.grad).all()


@pytest.mark.parametrize("field,value", [("raw_feature_norm", "softmax"), ("raw_feature_norm", "l2norm"),
                                         ("agg_func", "Max")])
def test_unsupported_options_raise(field, value):
    images, _, captions, cap_lens = make_inputs(2, 3, 4, 5, 6)
    o = opt()
    setattr(o, field, value)
    with pytest.raises(ValueError, match=field):
        scan.xattn_score_t2i(images, captions, cap_lens, o)
    with pytest.raises(ValueError, match="lambda_softmax"):
        scan.xattn_score_i2t(images, captions, cap_lens, SimpleNamespace(agg_func="Mean", raw_feature_norm="no_norm"))
