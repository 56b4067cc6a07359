"""The triplet (VSE++) and InfoNCE losses on hand-made score matrices."""
from __future__ import annotations

import math

import pytest
import torch

import mefn_fast

S = torch.tensor([[0.5, 0.6, 0.45],
                  [0.2, 0.4, 0.3],
                  [0.55, 0.1, 0.7]])
# With margin 0.2 (diagonal 0.5, 0.4, 0.7):
#   caption-retrieval violations: (0,1) 0.3, (0,2) 0.15, (1,2) 0.1, (2,0) 0.05
#   image-retrieval violations:   (2,0) 0.25, (0,1) 0.4


def test_triplet_max_violation():
    loss = mefn_fast.TripletLoss(margin=0.2, max_violation=True)(S)
    assert float(loss) == pytest.approx((0.3 + 0.1 + 0.05) + (0.25 + 0.4))


def test_triplet_sum_of_negatives_and_per_call_override():
    crit = mefn_fast.TripletLoss(margin=0.2, max_violation=False)
    assert float(crit(S)) == pytest.approx((0.3 + 0.15 + 0.1 + 0.05) + (0.25 + 0.4))
    assert float(crit(S, max_violation=True)) == pytest.approx(1.10)


def test_triplet_same_image_is_never_a_negative():
    loss = mefn_fast.TripletLoss(0.2, True)(S, image_ids=torch.tensor([7, 7, 9]))
    # (0,1) and (1,0) are positives now: caption 0.15 + 0.1 + 0.05, image 0.25 + 0 + 0
    assert float(loss) == pytest.approx(0.55)


def test_triplet_gradient_and_zero_loss():
    s = S.clone().requires_grad_(True)
    mefn_fast.TripletLoss(0.2, True)(s).backward()
    assert s.grad[0, 1] == 2 and s.grad[0, 0] == -2  # hardest for both row 0 and column 1
    assert float(mefn_fast.TripletLoss(0.2)(torch.eye(3))) == 0


def test_infonce_matches_manual_cross_entropy():
    crit = mefn_fast.InfoNCELoss(init_temperature=0.07)
    logits = S / 0.07
    want = 0.5 * (-torch.log_softmax(logits, 1).diagonal().mean() - torch.log_softmax(logits, 0).diagonal().mean())
    loss = crit(S)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)
    loss.backward()
    assert crit.log_scale.grad is not None and math.isfinite(float(crit.log_scale.grad))


def test_infonce_masks_other_positives():
    crit = mefn_fast.InfoNCELoss()
    ids = torch.tensor([0, 0, 1])
    logits = (S / 0.07).masked_fill(torch.tensor([[False, True, False], [True, False, False], [False] * 3]), -math.inf)
    want = 0.5 * (-torch.log_softmax(logits, 1).diagonal().mean() - torch.log_softmax(logits, 0).diagonal().mean())
    assert float(crit(S, ids).detach()) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3), torch.zeros(3)])
def test_losses_reject_non_square(bad):
    for crit in (mefn_fast.TripletLoss(), mefn_fast.InfoNCELoss()):
        with pytest.raises(ValueError, match="square"):
            crit(bad)


def test_loss_rejects_bad_ids():
    with pytest.raises(ValueError, match="image_ids"):
        mefn_fast.TripletLoss()(S, image_ids=torch.tensor([1, 2]))
