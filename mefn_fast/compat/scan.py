"""SCAN's cross-attention scores (kuanghuei/SCAN, ``model.py``) backed by mefn_fast's fused op.

SCAN-family code swaps one import::

    # from model import xattn_score_t2i, xattn_score_i2t
    from mefn_fast.compat.scan import xattn_score_t2i, xattn_score_i2t

Same signatures and semantics: ``images`` (n_image, n_regions, d), ``captions``
(n_caption, max_n_word, d), ``cap_lens`` the caption lengths (a list of ints or a 1-D tensor),
``opt`` any object with SCAN's attributes ``lambda_softmax``, ``agg_func``, ``lambda_lse`` and
``raw_feature_norm``; the result is the (n_image, n_caption) similarity matrix, differentiable
with respect to both feature tensors. These are the similarity of ``docs/math.md`` with ``mfe=False``.

Supported: ``raw_feature_norm`` in {"clipped_l2norm", "no_norm"} and ``agg_func`` in
{"Mean", "LogSumExp", "Sum"} ("Sum" is m times "Mean", m the number of query items). Anything
else (SCAN's "softmax", "l2norm", "l1norm", "clipped_l1norm", "clipped" feature norms, the "Max"
aggregation) raises ``ValueError``: use SCAN's own function for those.

Differences from SCAN, all at rounding level: features are L2-normalised inside (SCAN's
encoders already emit unit vectors, so this is a no-op up to rounding), and the attended cosine
uses eps 1e-8 on the attended vector's norm where SCAN's ``cosine_similarity`` uses it on the
product of norms.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from ..api import xattn_similarity

_NORMS = {"clipped_l2norm": "clipped_l2norm", "no_norm": "none"}
_AGGS = {"Mean": "mean", "LogSumExp": "lse", "Sum": "mean"}


def _options(opt, lam_name: str) -> dict:
    for attr in ("lambda_softmax", "agg_func", "raw_feature_norm"):
        if not hasattr(opt, attr):
            raise ValueError(f"opt has no attribute {attr!r} (SCAN's options: lambda_softmax, agg_func, lambda_lse, "
                             "raw_feature_norm)")
    norm, agg = opt.raw_feature_norm, opt.agg_func
    if norm not in _NORMS:
        raise ValueError(f"opt.raw_feature_norm={norm!r} is not supported by mefn_fast.compat.scan "
                         f"(supported: {sorted(_NORMS)}); use SCAN's own implementation for it")
    if agg not in _AGGS:
        raise ValueError(f"opt.agg_func={agg!r} is not supported by mefn_fast.compat.scan "
                         f"(supported: {sorted(_AGGS)}); use SCAN's own implementation for it")
    kwargs = dict(attn_norm=_NORMS[norm], mfe=False, agg=_AGGS[agg])
    kwargs[lam_name] = float(opt.lambda_softmax)
    if agg == "LogSumExp":
        if not hasattr(opt, "lambda_lse"):
            raise ValueError("opt.agg_func='LogSumExp' needs opt.lambda_lse")
        kwargs["lambda_lse"] = float(opt.lambda_lse)
    return kwargs


def _cap_lens(cap_lens: Union[Sequence[int], torch.Tensor], n_caption: int) -> torch.Tensor:
    if isinstance(cap_lens, torch.Tensor):
        return cap_lens.reshape(-1).to(torch.int64)
    return torch.tensor([int(v) for v in cap_lens], dtype=torch.int64)


def xattn_score_t2i(images: torch.Tensor, captions: torch.Tensor, cap_lens, opt, *, backend: str = "auto") -> torch.Tensor:
    """SCAN's text-to-image score: each word attends to the image's regions. (n_image, n_caption)."""
    kwargs = _options(opt, "lambda_t2i")
    lens = _cap_lens(cap_lens, captions.shape[0])
    scores = xattn_similarity(images, None, captions, lens, direction="t2i", backend=backend, **kwargs)
    if opt.agg_func == "Sum":
        scores = scores * lens.to(device=scores.device, dtype=scores.dtype)[None, :]
    return scores


def xattn_score_i2t(images: torch.Tensor, captions: torch.Tensor, cap_lens, opt, *, backend: str = "auto") -> torch.Tensor:
    """SCAN's image-to-text score: each region attends to the caption's words. (n_image, n_caption)."""
    kwargs = _options(opt, "lambda_i2t")
    lens = _cap_lens(cap_lens, captions.shape[0])
    scores = xattn_similarity(images, None, captions, lens, direction="i2t", backend=backend, **kwargs)
    if opt.agg_func == "Sum":
        scores = scores * float(images.shape[1])
    return scores


__all__ = ["xattn_score_t2i", "xattn_score_i2t"]
