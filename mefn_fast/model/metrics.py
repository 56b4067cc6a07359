"""Retrieval metrics (docs/math.md, section 3), with ties counted against the model."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

Scores = Union[torch.Tensor, np.ndarray]

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "i2t_map",
               "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "t2i_map", "rsum")


def _as_tensor(scores: Scores) -> torch.Tensor:
    if isinstance(scores, np.ndarray):
        scores = torch.from_numpy(scores)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor or numpy array; got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (n_images, n_captions); got shape {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        scores = scores.double()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contains NaN or infinite values")
    return scores.detach().to("cpu", torch.float64)


def _caption_owner(n_img: int, n_cap: int, captions_per_image: int, caption_image_ids) -> torch.Tensor:
    if caption_image_ids is not None:
        owner = torch.as_tensor(caption_image_ids, dtype=torch.int64).cpu()
        if owner.shape != (n_cap,):
            raise ValueError(f"caption_image_ids must have shape ({n_cap},); got {tuple(owner.shape)}")
        if n_cap and (int(owner.min()) < 0 or int(owner.max()) >= n_img):
            raise ValueError(f"caption_image_ids must lie in [0, {n_img})")
    else:
        if not isinstance(captions_per_image, int) or captions_per_image < 1:
            raise ValueError(f"captions_per_image must be a positive int; got {captions_per_image!r}")
        if n_cap != n_img * captions_per_image:
            raise ValueError(f"scores has {n_img} images and {n_cap} captions, not {captions_per_image} captions per "
                             "image; pass caption_image_ids")
        owner = torch.arange(n_cap) // captions_per_image
    if n_img and bool((torch.bincount(owner, minlength=n_img) == 0).any()):
        raise ValueError("every image needs at least one matching caption")
    return owner


def _summary(prefix: str, ranks: torch.Tensor, ap: torch.Tensor) -> dict:
    r = ranks.double()
    out = {f"{prefix}_r{k}": 100.0 * float((r < k).double().mean()) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(np.floor(np.median(r.numpy())) + 1)
    out[f"{prefix}_meanr"] = float(r.mean() + 1)
    out[f"{prefix}_map"] = 100.0 * float(ap.double().mean())
    return out


def retrieval_metrics(scores: Scores, captions_per_image: int = 5,
                      caption_image_ids: Optional[Union[torch.Tensor, np.ndarray, Sequence[int]]] = None,
                      block: int = 1024) -> dict[str, float]:
    """R@1/5/10, medr, meanr and mAP in both directions, and rsum (``docs/math.md``, section 3).

    Args:
        scores: (n_images, n_captions) similarity matrix (torch or numpy), higher is better.
        captions_per_image: caption j belongs to image j // captions_per_image ...
        caption_image_ids: ... unless this (n_captions,) array names each caption's image.
        block: rows processed at a time (memory O(block * n_captions)).

    Ranks count every non-matching item scoring >= the match, so ties go against the model and a
    constant score matrix ranks every match last. R@K and mAP are percentages.
    """
    s = _as_tensor(scores)
    n_img, n_cap = s.shape
    if n_img == 0 or n_cap == 0:
        raise ValueError("scores must have at least one image and one caption")
    owner = _caption_owner(n_img, n_cap, captions_per_image, caption_image_ids)

    # i2t: for image i, the matching captions sorted best first; negatives sorted ascending.
    i2t_rank = torch.empty(n_img, dtype=torch.int64)
    i2t_ap = torch.empty(n_img, dtype=torch.float64)
    match = torch.zeros(n_img, n_cap, dtype=torch.bool)
    match[owner, torch.arange(n_cap)] = True
    for lo in range(0, n_img, block):
        rows, m = s[lo:lo + block], match[lo:lo + block]
        neg_sorted = rows.masked_fill(m, -np.inf).sort(dim=1).values  # positives sink to the front
        for i in range(rows.shape[0]):
            pos = rows[i][m[i]].sort(descending=True).values  # (P,)
            # non-matching captions scoring >= each positive
            n_ge = n_cap - torch.searchsorted(neg_sorted[i], pos, right=False)
            j = torch.arange(1, pos.numel() + 1, dtype=torch.float64)
            i2t_rank[lo + i] = n_ge[0]
            i2t_ap[lo + i] = (j / (j + n_ge.double())).mean()

    # t2i: for caption j, the other images scoring >= its own image.
    pos_score = s[owner, torch.arange(n_cap)]
    t2i_rank = torch.empty(n_cap, dtype=torch.int64)
    for lo in range(0, n_cap, block):
        cols = s[:, lo:lo + block]
        t2i_rank[lo:lo + block] = (cols >= pos_score[None, lo:lo + block]).sum(0) - 1
    out = {}
    out.update(_summary("i2t", i2t_rank, i2t_ap))
    out.update(_summary("t2i", t2i_rank, 1.0 / (t2i_rank.double() + 1)))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {k: out[k] for k in METRIC_KEYS}


def coco_1k_5fold(scores: Scores, captions_per_image: int = 5, folds: int = 5) -> dict[str, Any]:
    """COCO's 1K protocol: the mean of :func:`retrieval_metrics` over ``folds`` disjoint blocks.

    ``scores`` is the full (5000, 25000) matrix of the 5K test set; fold f takes images
    [f*1000, (f+1)*1000) and their captions. Returns the mean metrics plus ``"folds"``, the list of
    per-fold dicts.
    """
    s = _as_tensor(scores)
    n_img = s.shape[0]
    if n_img % folds:
        raise ValueError(f"{n_img} images do not split into {folds} equal folds")
    size = n_img // folds
    per_fold = [retrieval_metrics(s[f * size:(f + 1) * size,
                                    f * size * captions_per_image:(f + 1) * size * captions_per_image],
                                  captions_per_image) for f in range(folds)]
    mean = {k: float(np.mean([m[k] for m in per_fold])) for k in METRIC_KEYS}
    mean["folds"] = per_fold
    return mean
