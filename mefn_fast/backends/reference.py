"""Plain-PyTorch reference of the cross-attention similarity (``docs/math.md``, section 1).

This is the ground truth every fused backend is tested against. It follows SCAN's recipe
literally: it forms the attended context vector ``a_k = sum_r A_rk c_r`` (d-dimensional) and
takes its cosine with the query, whereas the fused kernels use the Gram form
``R_k = (sum_r A_rk S_rk) / sqrt(A_k^T G A_k)``; the two agreeing is an independent check.

Memory: captions are processed ``chunk_size`` at a time, so the extra memory of a forward pass
is O(B_img * chunk * max(N, M) * d) instead of O(B_img * B_txt * ...). Under autograd the saved
intermediates of every chunk are kept until backward, as in any eager implementation.

Half-precision inputs (float16, bfloat16) are computed in float32 and the scores are returned in
the input dtype; float32 and float64 are computed in their own precision.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..options import XAttnOptions

NORM_EPS = 1e-12  # F.normalize's eps (step 1)
CLIP_EPS = 1e-8  # clipped_l2norm's eps (step 3)
ATTENDED_NORM_SQ_EPS = 1e-16  # the attended cosine's floor, as a squared norm (step 5)
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # budget for the largest per-chunk tensor, in elements


class PairMaps(NamedTuple):
    """Intermediates of the per-pair function, batched over leading dims ``(..., n, m)``."""

    A: torch.Tensor  # attention, context x query, each column sums to 1 over valid rows
    h: torch.Tensor  # cell entropies -A log A
    H: torch.Tensor  # query entropies sum_r h_rk, (..., m)
    H_norm: torch.Tensor  # H / log n (0 for n = 1)
    w: torch.Tensor  # aggregation weights over query positions, (..., m)
    R: torch.Tensor  # attended-context cosine per query position, (..., m)
    score: torch.Tensor  # aggregated score, (...)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for an input dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm over the last dim (kept), with finite derivatives of every order at a zero row.

    ``vector_norm``'s first derivative at 0 is 0 but its second is NaN, which a double backward
    through the padded (all-zero) rows would spread everywhere.
    """
    sq = (x * x).sum(-1, keepdim=True)
    nonzero = sq > 0
    return torch.where(nonzero, torch.sqrt(torch.where(nonzero, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _masked_normalize(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the padded rows, then L2-normalise rows as ``F.normalize`` does (step 1); returns (x_hat, mask).

    Each row is divided by its largest magnitude before squaring, so no finite row overflows (or
    underflows) the dtype: ``x / max(|x|, eps) = y / max(|y|, eps / s)`` with ``y = x / s``. The
    scale s is a constant for autograd: the function does not depend on it.
    """
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    scale = x.detach().abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows (and NaN rows) stay as they are
    y = x / scale
    return y / torch.maximum(_norm(y), NORM_EPS / scale), mask


def pair_function(c_hat, c_mask, q_hat, q_mask, lam: float, opts: XAttnOptions) -> PairMaps:
    """Steps 2-8 of the per-pair function (``docs/math.md``) for broadcastable batches of pairs.

    ``c_hat``: (..., n, d) unit context rows (padded rows zero), ``c_mask``: (..., n) bool;
    ``q_hat``: (..., m, d) unit query rows, ``q_mask``: (..., m) bool. The leading dims broadcast
    (t2i: images x 1 against 1 x captions).
    """
    S = c_hat @ q_hat.transpose(-1, -2)  # (..., n, m) cosine tile
    cm = c_mask.unsqueeze(-1)  # (..., n, 1)
    qm = q_mask.unsqueeze(-2)  # (..., 1, m)
    if opts.attn_norm == "clipped_l2norm":
        P = torch.where(qm, F.leaky_relu(S, 0.1), torch.zeros((), dtype=S.dtype, device=S.device))
        E = P / (_norm(P) + CLIP_EPS)  # padded context rows of P are 0
    else:
        E = S
    logits = torch.where(cm, lam * E, torch.full((), -math.inf, dtype=S.dtype, device=S.device))
    log_A = torch.log_softmax(logits, dim=-2)  # softmax over context rows
    A = log_A.exp()  # exactly 0 on padded context rows
    zero = torch.zeros((), dtype=S.dtype, device=S.device)

    # SCAN: the attended context vector, then its cosine with the query (not the Gram form).
    attended = A.transpose(-1, -2) @ c_hat  # (..., m, d)
    attended_norm = torch.linalg.vector_norm(attended, dim=-1).clamp_min(math.sqrt(ATTENDED_NORM_SQ_EPS))
    R = (q_hat * attended).sum(-1) / attended_norm  # (..., m)
    R = torch.where(q_mask, R, zero)

    h = -A * torch.where(cm, log_A, zero)  # cell entropies, 0 on padded rows
    H = h.sum(-2)  # (..., m)
    n = c_mask.sum(-1, keepdim=True).to(S.dtype)  # (..., 1)
    H_norm = torch.where(n > 1, H / torch.log(n.clamp_min(2.0)), zero)
    H_norm = torch.where(q_mask, H_norm, zero)

    m = q_mask.sum(-1, keepdim=True).to(S.dtype)
    neg_inf = torch.full((), -math.inf, dtype=S.dtype, device=S.device)
    if opts.mfe:
        log_w = torch.log_softmax(torch.where(q_mask, -H_norm / opts.tau, neg_inf), dim=-1)
    else:
        log_w = torch.where(q_mask, -torch.log(m), neg_inf)
    w = log_w.exp()
    if opts.agg == "mean":
        score = (w * R).sum(-1)
    else:  # lse: (1/l) log(m sum_k w_k exp(l R_k)), in log space
        lse = torch.logsumexp(torch.where(q_mask, log_w + opts.lambda_lse * R, neg_inf), dim=-1)
        score = (torch.log(m.squeeze(-1)) + lse) / opts.lambda_lse
    return PairMaps(A=A, h=h, H=H, H_norm=H_norm, w=w, R=R, score=score)


def _auto_chunk(b_img: int, n: int, m: int, d: int) -> int:
    per_caption = max(1, b_img * max(n, m) * max(d, n, m))
    return max(1, DEFAULT_CHUNK_ELEMENTS // per_caption)


def xattn_similarity_reference(
    regions: torch.Tensor,
    region_lengths: torch.Tensor,
    words: torch.Tensor,
    word_lengths: torch.Tensor,
    opts: XAttnOptions,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Scores (B_img, B_txt) of the similarity (``docs/math.md``), computed chunk by chunk over captions.

    Inputs are assumed validated (see :func:`mefn_fast.xattn_similarity`); lengths are int64.
    """
    b_img, n_max, d = regions.shape
    b_txt, m_max, _ = words.shape
    out_dtype = regions.dtype
    cdt = compute_dtype(out_dtype)
    if b_img == 0 or b_txt == 0:
        # keep the graph connected so that backward gives (zero) gradients
        return (regions.sum() + words.sum()).to(out_dtype) * regions.new_zeros(b_img, b_txt)
    if chunk_size is None:
        chunk_size = _auto_chunk(b_img, n_max, m_max, d)
    r_hat, r_mask = _masked_normalize(regions.to(cdt), region_lengths)
    w_hat_all, w_mask_all = _masked_normalize(words.to(cdt), word_lengths)

    trim = not torch.compiler.is_compiling()  # reading the longest caption is a host sync: not under compile
    columns = []
    for start in range(0, b_txt, chunk_size):
        w_hat = w_hat_all[start:start + chunk_size]
        w_mask = w_mask_all[start:start + chunk_size]
        if trim:  # drop the padding beyond the chunk's longest caption
            m_chunk = int(word_lengths[start:start + chunk_size].max())
            w_hat, w_mask = w_hat[:, :m_chunk], w_mask[:, :m_chunk]
        parts = []
        if opts.direction in ("t2i", "both"):
            parts.append(pair_function(r_hat[:, None], r_mask[:, None], w_hat[None], w_mask[None], opts.lambda_t2i, opts).score)
        if opts.direction in ("i2t", "both"):
            parts.append(pair_function(w_hat[None], w_mask[None], r_hat[:, None], r_mask[:, None], opts.lambda_i2t, opts).score)
        columns.append(parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1]))
    return torch.cat(columns, dim=1).to(out_dtype)


def load():
    """The reference backend is always available."""
    return xattn_similarity_reference
