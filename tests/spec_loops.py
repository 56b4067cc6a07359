"""An independent float64 implementation of the similarity, written straight from docs/math.md.

Plain loops over image x caption pairs; inside a pair, the Gram form of step 5 (the reference
forms the attended vector instead), an explicit max-subtracted softmax and -A log A with the
0 log 0 = 0 convention. Differentiable with autograd, so gradients can be compared too.
Used only by tests.
"""
from __future__ import annotations

import math

import torch


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = torch.exp(x - x.max(dim=dim, keepdim=True).values)
    return e / e.sum(dim=dim, keepdim=True)


def spec_pair(c: torch.Tensor, q: torch.Tensor, lam: float, o: dict) -> torch.Tensor:
    """Score of one pair; c: (n, d) valid context rows, q: (m, d) valid query rows."""
    n, m = c.shape[0], q.shape[0]
    c_hat = c / torch.clamp(torch.sqrt((c * c).sum(1, keepdim=True)), min=1e-12)
    q_hat = q / torch.clamp(torch.sqrt((q * q).sum(1, keepdim=True)), min=1e-12)
    S = c_hat @ q_hat.T  # n x m
    if o["attn_norm"] == "clipped_l2norm":
        P = torch.where(S > 0, S, 0.1 * S)
        E = P / (torch.sqrt((P * P).sum(1, keepdim=True)) + 1e-8)
    else:
        E = S
    A = _softmax(lam * E, dim=0)  # over context rows
    G = c_hat @ c_hat.T
    num = (A * S).sum(0)
    den = torch.sqrt(torch.clamp(torch.einsum("rk,rs,sk->k", A, G, A), min=1e-16))
    R = num / den
    h = torch.where(A > 0, -A * torch.log(torch.where(A > 0, A, torch.ones_like(A))), torch.zeros_like(A))
    H = h.sum(0)
    H_norm = H / math.log(n) if n > 1 else torch.zeros_like(H)
    if o["mfe"]:
        w = _softmax(-H_norm / o["tau"], dim=0)
    else:
        w = torch.full((m,), 1.0 / m, dtype=c.dtype)
    if o["agg"] == "mean":
        return (w * R).sum()
    lam_lse = o["lambda_lse"]
    return torch.log(m * (w * torch.exp(lam_lse * R)).sum()) / lam_lse


def spec_scores(regions, region_lengths, words, word_lengths, **opts) -> torch.Tensor:
    """(B_img, B_txt) scores by loops over pairs, with the documented defaults for missing options."""
    o = dict(direction="t2i", lambda_t2i=9.0, lambda_i2t=4.0, attn_norm="clipped_l2norm", mfe=True,
             tau=0.25, agg="mean", lambda_lse=6.0)
    o.update(opts)
    rows = []
    for i in range(regions.shape[0]):
        img = regions[i, : int(region_lengths[i])]
        row = []
        for t in range(words.shape[0]):
            cap = words[t, : int(word_lengths[t])]
            parts = []
            if o["direction"] in ("t2i", "both"):
                parts.append(spec_pair(img, cap, o["lambda_t2i"], o))
            if o["direction"] in ("i2t", "both"):
                parts.append(spec_pair(cap, img, o["lambda_i2t"], o))
            row.append(sum(parts) / len(parts))
        rows.append(torch.stack(row))
    return torch.stack(rows)
