"""The peers: what a user would run instead of a fused backend, timed beside it by the runner.

A fused backend earns its place only by beating the strongest of these (and the reference) in the
same run. Each peer computes the similarity of docs/math.md, section 1, with every option, and is
checked against the reference before it is timed, like the backends are.

- ``scan-loop``: SCAN's own loop (``xattn_score_t2i`` / ``xattn_score_i2t`` of kuanghuei/SCAN):
  for each caption, slice it to its length, repeat it over the batch of images, one ``bmm`` for the
  attention and one for the attended context, then the cosine. MEFN's entropy weights come from the
  same attention. Eager PyTorch, one caption at a time.
- ``sorted-eager``: what a skilled user writes in an afternoon. Captions sorted by length, scored
  in chunks of 16 trimmed to the chunk's longest caption; the cosine tile of all images by the
  chunk is one matrix product; the attended cosine takes the Gram form (docs/math.md, step 5) with
  G·A as one batched product per chunk, so no d-dimensional attended vector is formed.
- ``sorted-compiled``: the same code with its per-chunk function under ``torch.compile``
  (dynamic shapes, so one compilation serves every chunk length). The runner excludes the
  compilation from the timing and reports it.

Precision: the cosine tile is computed in the input dtype (tensor cores for fp16/bf16, as a user
would), everything after it in float32 (float64 for float64 inputs); scores come back in the input
dtype, as the reference returns them. Padded rows never influence a score.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mefn_fast.options import XAttnOptions

CHUNK = 16  # captions per chunk of the sorted peers
NORM_EPS = 1e-12  # F.normalize, docs/math.md step 1
CLIP_EPS = 1e-8  # SCAN's l2norm, step 3
COS_EPS = 1e-8  # SCAN's cosine_similarity clamp; equals sqrt of the Gram form's 1e-16 floor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_rows(x: torch.Tensor, lengths: torch.Tensor, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows beyond each item's length zeroed, then L2-normalised; returns (unit rows in cdt, valid mask)."""
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    x = torch.where(mask[..., None], x.to(cdt), torch.zeros((), dtype=cdt, device=x.device))
    return F.normalize(x, dim=-1, eps=NORM_EPS), mask


def _entropy(A: torch.Tensor, log_A: torch.Tensor, ctx_mask: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """Step 6: H = -sum over the context rows (``dim``) of A log A; masked rows (A = 0) add nothing."""
    if ctx_mask is not None:
        log_A = torch.where(ctx_mask, log_A, torch.zeros((), dtype=A.dtype, device=A.device))
    return -(A * log_A).sum(dim)


def _aggregate(H: torch.Tensor, R: torch.Tensor, q_mask: torch.Tensor, ctx_len: torch.Tensor, opts: XAttnOptions,
               dim: int = -1) -> torch.Tensor:
    """Steps 6-8 of docs/math.md from the query entropies H and cosines R, query items along ``dim``.

    ``q_mask`` (the valid query items) and ``ctx_len`` (the valid context rows) broadcast against H;
    padded query items get weight 0.
    """
    zero = torch.zeros((), dtype=H.dtype, device=H.device)
    H = torch.where(ctx_len > 1, H / torch.log(ctx_len.clamp_min(2.0)), zero)
    m = q_mask.sum(dim, keepdim=True).to(H.dtype)
    neg_inf = torch.full((), -math.inf, dtype=H.dtype, device=H.device)
    if opts.mfe:
        log_w = torch.log_softmax(torch.where(q_mask, -H / opts.tau, neg_inf), dim=dim)
    else:
        log_w = torch.where(q_mask, -torch.log(m), neg_inf)
    if opts.agg == "mean":
        return (log_w.exp() * torch.where(q_mask, R, zero)).sum(dim)
    lse = torch.logsumexp(torch.where(q_mask, log_w + opts.lambda_lse * R, neg_inf), dim=dim)
    return (torch.log(m).squeeze(dim) + lse) / opts.lambda_lse


def _logits(S: torch.Tensor, lam: float, opts: XAttnOptions, query_dim: int) -> torch.Tensor:
    """Steps 3-4's logits lam * E. Padded rows are zero vectors, so their cosines are 0 and drop out
    of clipped_l2norm's norm over the query items (``query_dim``) by themselves."""
    if opts.attn_norm == "none":
        return lam * S
    P = F.leaky_relu(S, 0.1)
    return P * (lam / (torch.linalg.vector_norm(P, dim=query_dim, keepdim=True) + CLIP_EPS))


def _masked(logits: torch.Tensor, ctx_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if ctx_mask is None:
        return logits
    return torch.where(ctx_mask, logits, torch.full((), -math.inf, dtype=logits.dtype, device=logits.device))


# ----------------------------------------------------------------------------------- SCAN's loop
def _scan_attention(query, context, ctx_mask, lam: float, opts: XAttnOptions):
    """SCAN's ``func_attention``: (B, Lq, d) queries over (B, Lc, d) contexts; returns the attention
    (B, Lc, Lq), its log and the weighted context (B, Lq, d); padded context rows masked out."""
    attn = torch.bmm(context, query.transpose(1, 2))  # (B, Lc, Lq)
    log_attn = torch.log_softmax(_masked(_logits(attn, lam, opts, query_dim=2), ctx_mask[:, :, None]), dim=1)
    attn = log_attn.exp()
    weighted = torch.bmm(attn.transpose(1, 2), context)  # (B, Lq, d)
    return attn, log_attn, weighted


def _scan_cosine(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """SCAN's ``cosine_similarity`` along the feature dim."""
    return (x1 * x2).sum(-1) / (torch.linalg.vector_norm(x1, dim=-1) * torch.linalg.vector_norm(x2, dim=-1)).clamp_min(COS_EPS)


def scan_loop(regions: torch.Tensor, region_lengths: torch.Tensor, words: torch.Tensor, word_lengths: torch.Tensor,
              opts: XAttnOptions) -> torch.Tensor:
    """SCAN's per-caption loop with MEFN's entropy weights: (B_img, B_txt) scores."""
    cdt = _compute_dtype(regions.dtype)
    images, img_mask = _unit_rows(regions, region_lengths, cdt)
    caps, _ = _unit_rows(words, word_lengths, cdt)
    img_len = region_lengths.to(cdt)[:, None]
    n_image = images.shape[0]
    columns = []
    for i, length in enumerate(word_lengths.tolist()):
        cap_i = caps[i, :length].unsqueeze(0).contiguous()
        cap_i_expand = cap_i.repeat(n_image, 1, 1)  # as SCAN does
        cap_mask = torch.ones(n_image, length, dtype=torch.bool, device=caps.device)
        parts = []
        if opts.direction in ("t2i", "both"):  # words attend to regions
            A, log_A, weighted = _scan_attention(cap_i_expand, images, img_mask, opts.lambda_t2i, opts)
            R = _scan_cosine(cap_i_expand, weighted)  # (B_img, length)
            H = _entropy(A, log_A, img_mask[:, :, None], dim=1)
            parts.append(_aggregate(H, R, cap_mask, img_len, opts))
        if opts.direction in ("i2t", "both"):  # regions attend to words
            A, log_A, weighted = _scan_attention(images, cap_i_expand, cap_mask, opts.lambda_i2t, opts)
            R = _scan_cosine(images, weighted)  # (B_img, N)
            ctx_len = torch.full((n_image, 1), float(length), dtype=cdt, device=caps.device)
            parts.append(_aggregate(_entropy(A, log_A, None, dim=1), R, img_mask, ctx_len, opts))
        columns.append(parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1]))
    if not columns:
        return regions.new_zeros(n_image, 0)
    return torch.stack(columns, dim=1).to(regions.dtype)


# ----------------------------------------------------------------------------- the sorted chunks
def _chunk_scores(r_hat, r_mask, r_gram, r_len, q_hat, q_mask, q_len, opts: XAttnOptions, product_dtype: torch.dtype,
                  ragged_regions: bool):
    """Scores of every image against one chunk of captions: (B_img, chunk).

    The tile S stays in the layout its product gives, (B_img, N, chunk, m): regions on dim 1,
    the chunk's captions and their words on dims 2 and 3, so that no step copies it to another
    layout. ``ragged_regions=False`` (every image full) leaves out the region masks.
    """
    b_img, n, d = r_hat.shape
    c, m, _ = q_hat.shape
    S = torch.mm(r_hat.reshape(b_img * n, d).to(product_dtype), q_hat.reshape(c * m, d).to(product_dtype).t())
    S = S.to(r_hat.dtype).view(b_img, n, c, m)
    region_mask = r_mask[:, :, None, None] if ragged_regions else None
    parts = []
    if opts.direction in ("t2i", "both"):  # words attend over the regions (dim 1)
        log_A = torch.log_softmax(_masked(_logits(S, opts.lambda_t2i, opts, query_dim=3), region_mask), dim=1)
        A = log_A.exp()
        GA = torch.bmm(r_gram, A.view(b_img, n, c * m)).view(b_img, n, c, m)  # G·A: one batched product
        R = (A * S).sum(1) / (A * GA).sum(1).clamp_min(COS_EPS * COS_EPS).sqrt()  # (B_img, chunk, m)
        H = _entropy(A, log_A, region_mask, dim=1)
        parts.append(_aggregate(H, R, q_mask[None], r_len[:, None, None], opts))
    if opts.direction in ("i2t", "both"):  # regions attend over each caption's words (dim 3)
        word_mask = q_mask[None, None]
        log_A = torch.log_softmax(_masked(_logits(S, opts.lambda_i2t, opts, query_dim=1), word_mask), dim=3)
        A = log_A.exp()
        q_gram = torch.bmm(q_hat, q_hat.transpose(1, 2))  # (chunk, m, m)
        GA = torch.einsum("icnm,cmk->icnk", A.permute(0, 2, 1, 3), q_gram).permute(0, 2, 1, 3)
        R = (A * S).sum(3) / (A * GA).sum(3).clamp_min(COS_EPS * COS_EPS).sqrt()  # (B_img, N, chunk)
        H = _entropy(A, log_A, word_mask, dim=3)
        parts.append(_aggregate(H, R, r_mask[:, :, None], q_len[None, None], opts, dim=1))
    return parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1])


class SortedChunks:
    """The skilled user's eager code: captions sorted by length, chunks of ``chunk`` captions trimmed
    to the chunk's longest, the Gram form with G·A batched per chunk; ``compile=True`` runs the
    per-chunk function under ``torch.compile(dynamic=True)``."""

    def __init__(self, chunk: int = CHUNK, compile: bool = False):
        self.chunk = chunk
        self.compiled = compile
        self._fn: Optional[Callable] = None

    def _chunk_fn(self) -> Callable:
        if self._fn is None:
            self._fn = torch.compile(_chunk_scores, dynamic=True) if self.compiled else _chunk_scores
        return self._fn

    def __call__(self, regions: torch.Tensor, region_lengths: torch.Tensor, words: torch.Tensor,
                 word_lengths: torch.Tensor, opts: XAttnOptions) -> torch.Tensor:
        cdt = _compute_dtype(regions.dtype)
        r_hat, r_mask = _unit_rows(regions, region_lengths, cdt)
        w_hat, w_mask = _unit_rows(words, word_lengths, cdt)
        r_gram = torch.bmm(r_hat, r_hat.transpose(1, 2)) if opts.direction != "i2t" else None
        r_len, w_len = region_lengths.to(cdt), word_lengths.to(cdt)
        ragged_regions = not bool(r_mask.all())
        order = torch.argsort(word_lengths, stable=True)
        lengths = word_lengths[order].tolist()
        fn = self._chunk_fn()
        blocks = []
        for start in range(0, len(lengths), self.chunk):
            idx = order[start:start + self.chunk]
            m = lengths[min(start + self.chunk, len(lengths)) - 1]  # sorted: the chunk's longest is its last
            blocks.append(fn(r_hat, r_mask, r_gram, r_len, w_hat[idx, :m], w_mask[idx, :m], w_len[idx], opts,
                             regions.dtype, ragged_regions))
        if not blocks:
            return regions.new_zeros(regions.shape[0], 0)
        scores = torch.cat(blocks, dim=1)
        return scores[:, torch.argsort(order)].to(regions.dtype)  # back to the caller's caption order


def make_peers() -> dict[str, Callable]:
    """Fresh instances of every peer, name -> fn(regions, region_lengths, words, word_lengths, opts)."""
    return {"scan-loop": scan_loop, "sorted-eager": SortedChunks(), "sorted-compiled": SortedChunks(compile=True)}


PEER_NAMES = ("scan-loop", "sorted-eager", "sorted-compiled")
