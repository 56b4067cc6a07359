"""The op's public functions: :func:`xattn_similarity` and :func:`entropy_map`."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._validate import Lengths, check_features, check_hyperparameters, check_inputs, check_lengths
from .backends import select_backend
from .options import make_options
from .backends.reference import _masked_normalize, compute_dtype, pair_function


def xattn_similarity(
    regions: torch.Tensor,
    region_lengths: Lengths,
    words: torch.Tensor,
    word_lengths: Lengths,
    *,
    direction: str = "t2i",
    lambda_t2i: float = 9.0,
    lambda_i2t: float = 4.0,
    attn_norm: str = "clipped_l2norm",
    mfe: bool = True,
    tau: float = 0.25,
    agg: str = "mean",
    lambda_lse: float = 6.0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Score every image against every caption by cross-attention (``docs/math.md``, section 1).

    Args:
        regions: (B_img, N, d) region or patch features of the images.
        region_lengths: (B_img,) ints in [1, N], the number of valid regions per image
            (``None``: all N). On the features' device or on the CPU.
        words: (B_txt, M, d) word features of the captions.
        word_lengths: (B_txt,) ints in [1, M] (``None``: all M).
        direction: ``"t2i"`` (words attend to regions), ``"i2t"`` (regions attend to words) or
            ``"both"`` (the mean of the two).
        lambda_t2i, lambda_i2t: softmax inverse temperatures of the two directions.
        attn_norm: ``"clipped_l2norm"`` (SCAN's) or ``"none"``.
        mfe: entropy-aware weights over query positions (MEFN) instead of the plain mean (SCAN).
        tau: temperature of the entropy weights (> 0).
        agg: ``"mean"`` or ``"lse"`` (LogSumExp with ``lambda_lse``).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; ``"auto"``
            takes the fastest available one for the inputs' device and dtype and logs its choice
            on the ``mefn_fast`` logger.
        chunk_size: captions per chunk for the reference backend (``None``: sized automatically).

    Returns:
        (B_img, B_txt) scores in the inputs' dtype; differentiable with respect to regions and words.

    Raises:
        TypeError / ValueError naming the argument for bad input.
    """
    opts = make_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse)
    regions, region_lengths, words, word_lengths = check_inputs(regions, region_lengths, words, word_lengths)
    check_hyperparameters(opts, regions.dtype)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    _, impl = select_backend(backend, regions, words, opts)
    return impl(regions, region_lengths, words, word_lengths, opts, chunk_size=chunk_size)


class EntropyMap(NamedTuple):
    """One pair's entropy map (steps 4-7 of ``docs/math.md``, section 1); rows are context items, columns query items."""

    A: torch.Tensor  # (n, m) attention; each column sums to 1
    h: torch.Tensor  # (n, m) cell entropies -A log A (the paper's Figure 2)
    H: torch.Tensor  # (m,) query entropies
    H_norm: torch.Tensor  # (m,) H / log n (0 when n = 1)
    w: torch.Tensor  # (m,) entropy-aware weights (uniform when mfe=False)
    MFE: torch.Tensor  # () sum of H, the paper's eq. 1
    R: torch.Tensor  # (m,) attended-context cosine per query item
    score: torch.Tensor  # () the pair's score with agg="mean"


def entropy_map(
    regions_i: torch.Tensor,
    words_t: torch.Tensor,
    *,
    region_length: Optional[int] = None,
    word_length: Optional[int] = None,
    direction: str = "t2i",
    lambda_t2i: float = 9.0,
    lambda_i2t: float = 4.0,
    attn_norm: str = "clipped_l2norm",
    mfe: bool = True,
    tau: float = 0.25,
) -> EntropyMap:
    """Attention, entropies, weights and MFE of one image-caption pair.

    Args:
        regions_i: (N, d) regions of one image; words_t: (M, d) words of one caption.
        region_length, word_length: valid prefix lengths (``None``: all rows). The returned
            maps cover the valid rows only.
        direction: ``"t2i"`` (context = regions, so A is N x M) or ``"i2t"`` (context = words,
            A is M x N).

    Returns:
        :class:`EntropyMap`, computed in float64 for float64 inputs and float32 otherwise.
    """
    if direction not in ("t2i", "i2t"):
        raise ValueError(f"direction={direction!r}: entropy_map takes 't2i' or 'i2t'")
    opts = make_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau)
    for name, x in (("regions_i", regions_i), ("words_t", words_t)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (length, dim); got {tuple(x.shape)}")
    regions, rl, words, wl = check_inputs(
        regions_i[None], None if region_length is None else [region_length],
        words_t[None], None if word_length is None else [word_length])
    check_hyperparameters(opts, regions.dtype)
    cdt = compute_dtype(regions.dtype)
    r_hat, r_mask = _masked_normalize(regions.to(cdt)[:, : int(rl[0])], rl)
    w_hat, w_mask = _masked_normalize(words.to(cdt)[:, : int(wl[0])], wl)
    if direction == "t2i":
        maps = pair_function(r_hat, r_mask, w_hat, w_mask, opts.lambda_t2i, opts)
    else:
        maps = pair_function(w_hat, w_mask, r_hat, r_mask, opts.lambda_i2t, opts)
    return EntropyMap(A=maps.A[0], h=maps.h[0], H=maps.H[0], H_norm=maps.H_norm[0], w=maps.w[0],
                      MFE=maps.H[0].sum(), R=maps.R[0], score=maps.score[0])


__all__ = ["xattn_similarity", "entropy_map", "EntropyMap", "check_features", "check_lengths"]
