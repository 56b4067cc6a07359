"""Training losses on a (B, B) score matrix whose diagonal holds the positive pairs."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..options import _real


def _check_scores(scores: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The positive mask: the diagonal, plus every pair that shares an image id."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor; got {type(scores).__name__}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor; got {scores.dtype}")
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square (B, B) matrix with positives on the diagonal; got {tuple(scores.shape)}")
    b = scores.shape[0]
    if b == 0:
        raise ValueError("scores is empty (0, 0): a loss needs at least one image-caption pair")
    eye = torch.eye(b, dtype=torch.bool, device=scores.device)
    if ids is None:
        return eye
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.shape != (b,):
        raise ValueError(f"image_ids must have shape ({b},); got {tuple(ids.shape)}")
    ids = ids.to(scores.device)
    return eye | (ids[:, None] == ids[None, :])


class TripletLoss(nn.Module):
    """VSE++'s hinge triplet loss (``docs/math.md``, section 2).

    ``loss = sum_i [alpha - s(i,i) + s(i,j')]_+ + sum_j [alpha - s(j,j) + s(i',j)]_+`` with the
    hardest negatives j', i' when ``max_violation`` (VSE++ "MH"), else summed over all negatives
    ("SH"). Pairs that share an image id are never negatives.

    ``reduction``: ``"sum"`` over the batch, like VSE++ (the default), or ``"mean"``: that sum
    divided by the batch size B, so that the loss's scale does not grow with B.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True, reduction: str = "sum"):
        super().__init__()
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise ValueError(f"margin must be a finite number; got {margin!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction={reduction!r} is not one of ('sum', 'mean')")
        self.margin = float(margin)
        self.max_violation = bool(max_violation)
        self.reduction = reduction

    def forward(self, scores: torch.Tensor, image_ids: Optional[torch.Tensor] = None,
                max_violation: Optional[bool] = None) -> torch.Tensor:
        """``scores[i, j]``: image i against caption j; ``image_ids``: (B,) image id of pair i.

        ``max_violation`` overrides the constructor's choice for this call (a warm-up with the sum).
        """
        positive = _check_scores(scores, image_ids)
        diagonal = scores.diagonal()
        cost_caption = (self.margin + scores - diagonal[:, None]).clamp(min=0)  # image i, wrong caption j
        cost_image = (self.margin + scores - diagonal[None, :]).clamp(min=0)  # caption j, wrong image i
        cost_caption = cost_caption.masked_fill(positive, 0)
        cost_image = cost_image.masked_fill(positive, 0)
        hardest = self.max_violation if max_violation is None else max_violation
        if hardest:
            loss = cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
        else:
            loss = cost_caption.sum() + cost_image.sum()
        return loss / scores.shape[0] if self.reduction == "mean" else loss

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}, reduction={self.reduction!r}"


class InfoNCELoss(nn.Module):
    """CLIP's symmetric InfoNCE with a learnable temperature (logit scale initialised to 1/0.07).

    ``loss = (CE(scale * S, diag) + CE(scale * S^T, diag)) / 2``, averaged over the batch. Pairs that
    share an image id (other than the diagonal) are removed from the negatives.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        init_temperature = _real("init_temperature", init_temperature, positive=True)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_scale = _real("max_scale", max_scale, positive=True)

    def forward(self, scores: torch.Tensor, image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scores[i, j]``: image i against caption j; ``image_ids``: (B,) image id of pair i."""
        positive = _check_scores(scores, image_ids)
        others = positive & ~torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
        scale = self.log_scale.exp().clamp(max=self.max_scale)
        logits = (scale * scores).masked_fill(others, -math.inf)
        target = torch.arange(scores.shape[0], device=scores.device)
        return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.t(), target))
