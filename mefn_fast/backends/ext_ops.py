"""Python side of the C++ ops ``mefn_fast::xattn_similarity_fwd`` / ``_bwd`` (csrc/xattn_similarity.cpp).

Importing this module loads ``mefn_fast._C`` (an empty Python module whose shared library
registers the ops with ``TORCH_LIBRARY``) and attaches, device-agnostically, the fake (meta)
kernels and the autograd formula, so the CPU kernels here and the CUDA kernels of
``csrc/cuda/`` share them and both work under ``torch.compile`` and pass
``torch.library.opcheck``. When the build record says that library cannot be used with the
running torch (``build.py``), the import raises ImportError with the reason and loads nothing.

    scores = xattn_similarity(regions, region_lengths, words, word_lengths, opts)

Schemas (options as primitives so that the dispatcher, fake tensors and compile see them)::

    xattn_similarity_fwd(Tensor regions, Tensor region_lengths, Tensor words, Tensor word_lengths,
        str direction, float lambda_t2i, float lambda_i2t, str attn_norm, bool mfe, float tau,
        str agg, float lambda_lse) -> Tensor
    xattn_similarity_bwd(Tensor grad_scores, <the same inputs and options>,
        bool need_grad_regions, bool need_grad_words) -> (Tensor, Tensor)

The backward op returns an empty tensor (shape (0,)) in place of a gradient that is not needed.
Nothing is saved from the forward beyond its inputs: the backward recomputes the cosine tiles.
The backward op itself is not differentiable: a double backward raises (the reference has one).
"""
from __future__ import annotations

import torch

from ..options import XAttnOptions
from .build import extension_problem

# never load a library built for another torch (its C++ ABI may differ): say why instead
_problem = extension_problem()
if _problem is not None:
    raise ImportError(_problem)

from .. import _C  # noqa: E402,F401  (loads the library that registers the ops)

fwd_op = torch.ops.mefn_fast.xattn_similarity_fwd.default
bwd_op = torch.ops.mefn_fast.xattn_similarity_bwd.default
OPS = (fwd_op, bwd_op)

_N_OPTIONS = 8  # direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse


def option_args(opts: XAttnOptions) -> tuple:
    """The options in the ops' schema order."""
    return (opts.direction, float(opts.lambda_t2i), float(opts.lambda_i2t), opts.attn_norm, bool(opts.mfe),
            float(opts.tau), opts.agg, float(opts.lambda_lse))


@torch.library.register_fake("mefn_fast::xattn_similarity_fwd")
def _fwd_fake(regions, region_lengths, words, word_lengths, direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau,
              agg, lambda_lse):
    torch._check(regions.dim() == 3 and words.dim() == 3, lambda: "regions and words must be 3-D")
    torch._check(regions.shape[2] == words.shape[2], lambda: "regions and words must share the feature dimension")
    return regions.new_empty((regions.shape[0], words.shape[0]))


@torch.library.register_fake("mefn_fast::xattn_similarity_bwd")
def _bwd_fake(grad_scores, regions, region_lengths, words, word_lengths, direction, lambda_t2i, lambda_i2t, attn_norm,
              mfe, tau, agg, lambda_lse, need_grad_regions, need_grad_words):
    gr = torch.empty_like(regions, memory_format=torch.contiguous_format) if need_grad_regions else regions.new_empty((0,))
    gw = torch.empty_like(words, memory_format=torch.contiguous_format) if need_grad_words else words.new_empty((0,))
    return gr, gw


def _setup_context(ctx, inputs, output):
    regions, region_lengths, words, word_lengths = inputs[:4]
    ctx.save_for_backward(regions, region_lengths, words, word_lengths)
    ctx.options = tuple(inputs[4:])


def _backward(ctx, grad_scores):
    regions, region_lengths, words, word_lengths = ctx.saved_tensors
    need_r, need_w = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[2])
    if not (need_r or need_w):
        return (None,) * (4 + _N_OPTIONS)
    # a gradient from .sum().backward() is an expanded (stride-0) tensor: the op needs it dense
    gr, gw = bwd_op(grad_scores.contiguous(), regions, region_lengths, words, word_lengths, *ctx.options, need_r, need_w)
    return (gr if need_r else None, None, gw if need_w else None, None) + (None,) * _N_OPTIONS


torch.library.register_autograd("mefn_fast::xattn_similarity_fwd", _backward, setup_context=_setup_context)


# The backward op has no derivative of its own: differentiating a gradient (create_graph=True,
# gradgradcheck) raises instead of silently treating the backward as a constant.
def _bwd_setup_context(ctx, inputs, output):
    ctx.backend = "cpu" if inputs[1].device.type == "cpu" else "cuda"


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f"double backward of xattn_similarity (differentiating its gradient) is not supported by "
                       f"the {ctx.backend!r} backend; use backend='reference' for second derivatives")


torch.library.register_autograd("mefn_fast::xattn_similarity_bwd", _no_double_backward,
                                setup_context=_bwd_setup_context)


def xattn_similarity(regions: torch.Tensor, region_lengths: torch.Tensor, words: torch.Tensor,
                     word_lengths: torch.Tensor, opts: XAttnOptions) -> torch.Tensor:
    """Scores (B_img, B_txt) through the fused op; inputs as validated by ``mefn_fast._validate``."""
    return fwd_op(regions.contiguous(), region_lengths.contiguous(), words.contiguous(), word_lengths.contiguous(),
                  *option_args(opts))
