"""Retrieval metrics (``docs/math.md``, section 3) on hand-made score matrices with known ranks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mefn_fast
from mefn_fast.model.metrics import METRIC_KEYS

# 3 images, 2 captions each; ranks worked out by hand (see the comments).
HAND = torch.tensor([
    [0.9, 0.5, 0.9, 0.1, 0.5, 0.95],  # img0: best match 0.9, ties with cap2 and loses to cap5 -> rank 2
    [0.0, 0.0, 0.8, 0.7, 0.1, 0.2],   # img1: rank 0, both matches on top -> AP 1
    [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],   # img2: constant row -> every non-match ties -> rank 4
])


def test_hand_made_matrix():
    m = mefn_fast.retrieval_metrics(HAND, captions_per_image=2)
    # i2t ranks [2, 0, 4]; AP: img0 (1/3 + 2/5)/2 = 11/30, img1 1, img2 (1/5 + 2/6)/2 = 4/15
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == 100 and m["i2t_r10"] == 100
    assert m["i2t_medr"] == 3 and m["i2t_meanr"] == pytest.approx(3.0)
    assert m["i2t_map"] == pytest.approx(100 * (11 / 30 + 1 + 4 / 15) / 3)
    # t2i ranks [0, 0, 1, 0, 1, 1] (ties count against: cap4's 0.3 loses to img0's 0.5)
    assert m["t2i_r1"] == pytest.approx(50) and m["t2i_r5"] == 100
    assert m["t2i_medr"] == 1 and m["t2i_meanr"] == pytest.approx(1.5)
    assert m["t2i_map"] == pytest.approx(100 * (1 + 1 + 0.5 + 1 + 0.5 + 0.5) / 6)
    assert m["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 50 + 100 + 100)
    assert list(m) == list(METRIC_KEYS)


def test_perfect_matrix():
    n = 4
    s = torch.eye(n).repeat_interleave(5, dim=1) + 0.01 * torch.rand(n, 5 * n)
    m = mefn_fast.retrieval_metrics(s)
    for k in ("i2t_r1", "t2i_r1", "i2t_map", "t2i_map"):
        assert m[k] == 100
    assert m["i2t_medr"] == 1 and m["t2i_meanr"] == 1 and m["rsum"] == 600


def test_constant_matrix_scores_at_chance_or_worse():
    n = 20
    m = mefn_fast.retrieval_metrics(torch.full((n, 5 * n), 0.3))
    # every non-matching item ties, so every match ranks last
    assert m["i2t_r1"] == 0 and m["i2t_r10"] == 0 and m["t2i_r1"] == 0 and m["t2i_r10"] == 0
    assert m["i2t_medr"] == 5 * n - 5 + 1 and m["t2i_medr"] == n
    assert m["rsum"] == 0


def test_caption_image_ids_and_numpy_input():
    # captions listed out of order; the same matrix with permuted columns gives the same metrics
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    owner = (torch.arange(6) // 2)[perm]
    a = mefn_fast.retrieval_metrics(HAND.numpy()[:, perm.numpy()], caption_image_ids=owner.numpy())
    b = mefn_fast.retrieval_metrics(HAND, captions_per_image=2)
    assert a == pytest.approx(b)


def test_blocked_computation_matches_unblocked():
    s = torch.randn(30, 150, generator=torch.Generator().manual_seed(0))
    assert mefn_fast.retrieval_metrics(s, block=7) == pytest.approx(mefn_fast.retrieval_metrics(s, block=1000))


def test_coco_1k_5fold_is_the_mean_of_folds():
    s = torch.randn(10, 50, generator=torch.Generator().manual_seed(1))
    out = mefn_fast.coco_1k_5fold(s)
    folds = [mefn_fast.retrieval_metrics(s[2 * f:2 * f + 2, 10 * f:10 * f + 10]) for f in range(5)]
    assert out["folds"] == folds
    assert out["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))


@pytest.mark.parametrize("bad,exc,match", [
    (torch.zeros(3, 7), ValueError, "captions"),
    (torch.zeros(3), ValueError, "n_images"),
    (torch.tensor([[float("nan")] * 5]), ValueError, "NaN"),
    ([[1.0]], TypeError, "scores"),
])
def test_bad_scores(bad, exc, match):
    with pytest.raises(exc, match=match):
        mefn_fast.retrieval_metrics(bad)


def test_bad_fold_count():
    with pytest.raises(ValueError, match="folds"):
        mefn_fast.coco_1k_5fold(torch.zeros(7, 35))
