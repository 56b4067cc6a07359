"""The "triton" backend: the Triton kernels of :mod:`mefn_fast.kernels.xattn_similarity` as
``torch.library`` custom ops.

Ops (namespace ``mefn_fast_triton``, so that they never clash with the C++ ops that csrc/ declares in ``TORCH_LIBRARY(mefn_fast, ...)``; the op keeps its one name ``xattn_similarity``):

* ``mefn_fast_triton::xattn_similarity(regions, region_lengths, words, word_lengths, direction,
  lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse) -> scores`` (B_img, B_txt) in the
  inputs' dtype;
* ``mefn_fast_triton::xattn_similarity_backward(grad, ..., need_regions, need_words)
  -> (d_regions, d_words)``, attached with ``register_autograd``; it honours
  ``ctx.needs_input_grad`` (a gradient nobody asked for is not computed).

Both have ``register_fake`` implementations, so they trace under ``torch.compile`` and pass
``torch.library.opcheck``. Inputs are made contiguous at the op boundary (the kernels take any
strides, contiguity is only for speed).

Devices: the registry entry takes CUDA tensors only, so ``backend="auto"`` never picks Triton for
CPU tensors. Under ``TRITON_INTERPRET=1`` the ops also run on CPU tensors (one program at a time,
about a millisecond each): that is how the tests check the kernels without a GPU, by calling
:func:`xattn_similarity_triton` (or the op) directly rather than through the registry.
:func:`load` reports the backend unavailable when Triton is missing or there is no CUDA GPU.

Importing this module does not import Triton, touch ``torch.cuda`` or the Triton driver; the
kernel module is imported on the first call, and its autotuning configurations are built on the
first launch of each tile shape (``MEFN_TRITON_SINGLE_CONFIG=1`` forces one heuristic
configuration; the interpreter always uses it).
"""
from __future__ import annotations

import os

import torch

from . import BackendUnavailable
from ..options import XAttnOptions

MAX_N = 256  # regions per image (ViT-B/16 has 197 patch tokens)
MAX_M = 128  # words per caption


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernels():
    from ..kernels import xattn_similarity as k  # imports triton; only on the first call
    return k


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(f"the Triton xattn_similarity op takes CUDA tensors (got {t.device}); "
                           "set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors")


def _check_lengths(name: str, lengths: torch.Tensor, max_len: int) -> None:
    """The lengths' range, read when the op runs: under torch.compile the caller's Python check is
    skipped, and a length beyond the tile would make the kernels read past the item."""
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
        raise ValueError(f"{name} must lie in [1, {max_len}]")


def _opts(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse) -> dict:
    return dict(direction=direction, lambda_t2i=lambda_t2i, lambda_i2t=lambda_i2t, attn_norm=attn_norm,
                mfe=mfe, tau=tau, agg=agg, lambda_lse=lambda_lse)


@torch.library.custom_op("mefn_fast_triton::xattn_similarity", mutates_args=())
def xattn_similarity_op(regions: torch.Tensor, region_lengths: torch.Tensor, words: torch.Tensor,
                        word_lengths: torch.Tensor, direction: str, lambda_t2i: float, lambda_i2t: float,
                        attn_norm: str, mfe: bool, tau: float, agg: str, lambda_lse: float) -> torch.Tensor:
    _check_device(regions)
    _check_lengths("region_lengths", region_lengths, regions.shape[1])
    _check_lengths("word_lengths", word_lengths, words.shape[1])
    scores = _kernels().xattn_similarity_forward(
        regions.contiguous(), region_lengths.contiguous(), words.contiguous(), word_lengths.contiguous(),
        _opts(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse))
    return scores.to(regions.dtype)


@xattn_similarity_op.register_fake
def _(regions, region_lengths, words, word_lengths, direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau,
      agg, lambda_lse):
    return regions.new_empty((regions.shape[0], words.shape[0]))


@torch.library.custom_op("mefn_fast_triton::xattn_similarity_backward", mutates_args=())
def xattn_similarity_backward_op(grad: torch.Tensor, regions: torch.Tensor, region_lengths: torch.Tensor,
                                 words: torch.Tensor, word_lengths: torch.Tensor, direction: str,
                                 lambda_t2i: float, lambda_i2t: float, attn_norm: str, mfe: bool, tau: float,
                                 agg: str, lambda_lse: float, need_regions: bool,
                                 need_words: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(regions)
    return _kernels().xattn_similarity_backward(
        grad, regions.contiguous(), region_lengths.contiguous(), words.contiguous(), word_lengths.contiguous(),
        _opts(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse), need_regions, need_words)


@xattn_similarity_backward_op.register_fake
def _(grad, regions, region_lengths, words, word_lengths, direction, lambda_t2i, lambda_i2t, attn_norm, mfe,
      tau, agg, lambda_lse, need_regions, need_words):
    return torch.empty_like(regions), torch.empty_like(words)


def _setup_context(ctx, inputs, output):
    regions, region_lengths, words, word_lengths, *opts = inputs
    ctx.save_for_backward(regions, region_lengths, words, word_lengths)
    ctx.opts = opts


def _backward(ctx, grad):
    regions, region_lengths, words, word_lengths = ctx.saved_tensors
    need_r, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dr = dw = None
    if need_r or need_w:
        dr, dw = xattn_similarity_backward_op(grad, regions, region_lengths, words, word_lengths, *ctx.opts,
                                              need_r, need_w)
    return (dr if need_r else None, None, dw if need_w else None, None) + (None,) * len(ctx.opts)


xattn_similarity_op.register_autograd(_backward, setup_context=_setup_context)


def _double_backward(ctx, grad_dr, grad_dw):
    raise RuntimeError("double backward is not supported by the triton backend (the gradient of "
                       "mefn_fast_triton::xattn_similarity has no derivative); use backend='reference' for "
                       "second derivatives")


def _setup_double(ctx, inputs, output):
    pass


# A gradient taken with create_graph=True is fine; differentiating it again raises rather than
# returning silently wrong second derivatives.
xattn_similarity_backward_op.register_autograd(_double_backward, setup_context=_setup_double)


def xattn_similarity_triton(regions, region_lengths, words, word_lengths, opts: XAttnOptions, chunk_size=None):
    """The backend implementation: scores (B_img, B_txt); ``chunk_size`` is ignored (nothing is chunked)."""
    return xattn_similarity_op(regions, region_lengths, words, word_lengths, opts.direction,
                               float(opts.lambda_t2i), float(opts.lambda_i2t), opts.attn_norm, bool(opts.mfe),
                               float(opts.tau), opts.agg, float(opts.lambda_lse))


MAX_N_FP32 = 128  # float32 context Gram blocks of 256 rows would need 256 KiB of shared memory
MAX_N_GRAD = 128  # the backward of 256-row context blocks: a 256 x 256 Gram gradient a tile


def input_limits(regions: torch.Tensor, words: torch.Tensor, opts: XAttnOptions) -> list[str]:
    """Sizes the kernels do not take (they hold whole tiles of packed items in registers)."""
    out = []
    n, m = regions.shape[1], words.shape[1]
    if n > MAX_N:
        out.append(f"N={n} regions per image > {MAX_N} (a block holds whole items); use backend='reference'")
    elif n > MAX_N_FP32 and regions.dtype == torch.float32:
        out.append(f"float32 with N={n} regions per image > {MAX_N_FP32} (the 256-row float32 Gram blocks need "
                   "more shared memory than an H100 has); use float16 / bfloat16 or another backend")
    if m > MAX_M:
        out.append(f"M={m} words per caption > {MAX_M}; use backend='reference'")
    if not out:
        k = _kernels()
        l_r, l_c = (n, m) if opts.direction == "i2t" else (m, n)
        if k.tile_config(l_r, l_c, regions.dtype, backward=True, interpret=False,
                         both=opts.direction == "both") is None:
            cells = 8192 if regions.dtype == torch.float32 else 16384
            out.append(f"N={n} regions per image together with M={m} words per caption: no tile of at most "
                       f"{cells} cells ({str(regions.dtype).replace('torch.', '')}) holds a block of each; use "
                       "another backend")
        elif (n > MAX_N_GRAD and opts.direction != "i2t" and torch.is_grad_enabled()
              and (regions.requires_grad or words.requires_grad)):
            out.append(f"gradients with N={n} regions per image > {MAX_N_GRAD} as the context (direction "
                       f"{opts.direction!r}): the backward's 256-row Gram blocks need more shared memory than an "
                       "H100 has (the forward alone is supported); use another backend")
    return out


def load():
    """The implementation, or :class:`BackendUnavailable` with the reason."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"triton is not installed ({e})") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA GPU (the Triton kernels take CUDA tensors; the tests run them on CPU "
                                 "tensors under TRITON_INTERPRET=1)")
    return xattn_similarity_triton
