"""Python side of the C++ ops ``mefn_fast::xattn_similarity_*`` (csrc/xattn_similarity.cpp).

Importing this module loads ``mefn_fast._C`` (an empty Python module whose shared library
registers the ops with ``TORCH_LIBRARY``) and attaches, device-agnostically, the fake (meta)
kernels and the autograd formulas, so the CPU kernels and the CUDA kernels of ``csrc/cuda/``
share them and both work under ``torch.compile`` and pass ``torch.library.opcheck``. When the
build record says that library cannot be used with the running torch (``build.py``), the import
raises ImportError with the reason and loads nothing.

    scores = xattn_similarity(regions, region_lengths, words, word_lengths, opts)

Schemas (options as primitives so that the dispatcher, fake tensors and compile see them)::

    xattn_similarity_fwd(Tensor regions, Tensor region_lengths, Tensor words, Tensor word_lengths,
        str direction, float lambda_t2i, float lambda_i2t, str attn_norm, bool mfe, float tau,
        str agg, float lambda_lse) -> Tensor
    xattn_similarity_bwd(Tensor grad_scores, <the same inputs and options>,
        bool need_grad_regions, bool need_grad_words) -> (Tensor, Tensor)
    xattn_similarity_fwd_saved(<the forward's arguments>, int budget) -> (Tensor scores, Tensor saved)
    xattn_similarity_bwd_saved(Tensor grad_scores, <inputs>, Tensor saved, <options>, int budget,
        bool need_grad_regions, bool need_grad_words) -> (Tensor, Tensor)

The backward ops return an empty tensor (shape (0,)) in place of a gradient that is not needed.

Saved-tile mode (docs/design.md): when a gradient is needed, :func:`xattn_similarity` takes the
``_saved`` pair. If the cosine tiles S of the whole batch take at most three quarters of the tile
budget, the forward returns them in ``saved`` and the backward starts from them, its dS in
super-blocks within the rest; otherwise ``saved`` is empty and the backward recomputes the tiles,
one super-block of S and dS within the budget at a time. The budget is 512 MiB by default, ``MEFN_TILE_BUDGET_MB`` in the
environment or :func:`set_tile_budget` change it (0 always recomputes).
The backward ops themselves are not differentiable: a double backward raises (the reference has one).
"""
from __future__ import annotations

import os

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
fwd_saved_op = torch.ops.mefn_fast.xattn_similarity_fwd_saved.default
bwd_saved_op = torch.ops.mefn_fast.xattn_similarity_bwd_saved.default
OPS = (fwd_op, bwd_op, fwd_saved_op, bwd_saved_op)

_N_OPTIONS = 8  # direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse
DEFAULT_TILE_BUDGET = 512 * 2 ** 20


def _budget_from_env() -> int:
    value = os.environ.get("MEFN_TILE_BUDGET_MB")
    if value is None:
        return DEFAULT_TILE_BUDGET
    try:
        mib = float(value)
    except ValueError:
        raise ValueError(f"MEFN_TILE_BUDGET_MB must be a number of MiB; got {value!r}") from None
    if not mib >= 0:
        raise ValueError(f"MEFN_TILE_BUDGET_MB must be >= 0; got {value!r}")
    return int(mib * 2 ** 20)


_tile_budget = _budget_from_env()


def set_tile_budget(nbytes: int) -> None:
    """Bytes of cosine tiles a training step may keep between forward and backward (and hold at
    once in the backward); 0 makes the backward always recompute them."""
    global _tile_budget
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"the tile budget must be an int >= 0 (bytes); got {nbytes!r}")
    _tile_budget = nbytes


def tile_budget() -> int:
    """The current tile budget in bytes (see :func:`set_tile_budget`)."""
    return _tile_budget


def option_args(opts: XAttnOptions) -> tuple:
    """The options in the ops' schema order."""
    return (opts.direction, float(opts.lambda_t2i), float(opts.lambda_i2t), opts.attn_norm, bool(opts.mfe),
            float(opts.tau), opts.agg, float(opts.lambda_lse))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@torch.library.register_fake("mefn_fast::xattn_similarity_fwd")
def _fwd_fake(regions, region_lengths, words, word_lengths, direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau,
              agg, lambda_lse):
    torch._check(regions.dim() == 3 and words.dim() == 3, lambda: "regions and words must be 3-D")
    torch._check(regions.shape[2] == words.shape[2], lambda: "regions and words must share the feature dimension")
    return regions.new_empty((regions.shape[0], words.shape[0]))


@torch.library.register_fake("mefn_fast::xattn_similarity_fwd_saved")
def _fwd_saved_fake(regions, region_lengths, words, word_lengths, direction, lambda_t2i, lambda_i2t, attn_norm, mfe,
                    tau, agg, lambda_lse, budget):
    scores = _fwd_fake(regions, region_lengths, words, word_lengths, direction, lambda_t2i, lambda_i2t, attn_norm, mfe,
                       tau, agg, lambda_lse)
    # the saved tiles' size depends on the lengths' values (packed rows)
    n = torch.library.get_ctx().new_dynamic_size()
    return scores, regions.new_empty((n,), dtype=_compute_dtype(regions.dtype))


def _grads_fake(regions, words, need_grad_regions, need_grad_words):
    gr = torch.empty_like(regions, memory_format=torch.contiguous_format) if need_grad_regions else regions.new_empty((0,))
    gw = torch.empty_like(words, memory_format=torch.contiguous_format) if need_grad_words else words.new_empty((0,))
    return gr, gw


@torch.library.register_fake("mefn_fast::xattn_similarity_bwd")
def _bwd_fake(grad_scores, regions, region_lengths, words, word_lengths, direction, lambda_t2i, lambda_i2t, attn_norm,
              mfe, tau, agg, lambda_lse, need_grad_regions, need_grad_words):
    return _grads_fake(regions, words, need_grad_regions, need_grad_words)


@torch.library.register_fake("mefn_fast::xattn_similarity_bwd_saved")
def _bwd_saved_fake(grad_scores, regions, region_lengths, words, word_lengths, saved, direction, lambda_t2i,
                    lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse, budget, need_grad_regions, need_grad_words):
    return _grads_fake(regions, words, need_grad_regions, need_grad_words)


def _setup_context(ctx, inputs, output):
    regions, region_lengths, words, word_lengths = inputs[:4]
    ctx.save_for_backward(regions, region_lengths, words, word_lengths)
    ctx.options = tuple(inputs[4:4 + _N_OPTIONS])


def _needs(ctx):
    return bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[2])


def _grads(ctx, gr, gw, n_args):
    need_r, need_w = _needs(ctx)
    return (gr if need_r else None, None, gw if need_w else None) + (None,) * (n_args - 3)


def _backward(ctx, grad_scores):
    regions, region_lengths, words, word_lengths = ctx.saved_tensors
    need_r, need_w = _needs(ctx)
    if not (need_r or need_w):
        return (None,) * (4 + _N_OPTIONS)
    # a gradient from .sum().backward() is an expanded (stride-0) tensor: the op needs it dense
    gr, gw = bwd_op(grad_scores.contiguous(), regions, region_lengths, words, word_lengths, *ctx.options, need_r, need_w)
    return _grads(ctx, gr, gw, 4 + _N_OPTIONS)


def _setup_context_saved(ctx, inputs, output):
    regions, region_lengths, words, word_lengths = inputs[:4]
    ctx.save_for_backward(regions, region_lengths, words, word_lengths, output[1])
    ctx.options = tuple(inputs[4:4 + _N_OPTIONS])
    ctx.budget = inputs[4 + _N_OPTIONS]
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient the size of `saved`


def _backward_saved(ctx, grad_scores, grad_saved):
    regions, region_lengths, words, word_lengths, saved = ctx.saved_tensors
    need_r, need_w = _needs(ctx)
    if grad_scores is None or not (need_r or need_w):
        return (None,) * (5 + _N_OPTIONS)
    gr, gw = bwd_saved_op(grad_scores.contiguous(), regions, region_lengths, words, word_lengths, saved, *ctx.options,
                          ctx.budget, need_r, need_w)
    return _grads(ctx, gr, gw, 5 + _N_OPTIONS)


torch.library.register_autograd("mefn_fast::xattn_similarity_fwd", _backward, setup_context=_setup_context)
torch.library.register_autograd("mefn_fast::xattn_similarity_fwd_saved", _backward_saved,
                                setup_context=_setup_context_saved)


# The backward ops have no derivative of their own: differentiating a gradient (create_graph=True,
# gradgradcheck) raises instead of silently treating the backward as a constant.
def _bwd_setup_context(ctx, inputs, output):
    ctx.backend = "cpu" if inputs[1].device.type == "cpu" else "cuda"


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f"double backward of xattn_similarity (differentiating its gradient) is not supported by "
                       f"the {ctx.backend!r} backend; use backend='reference' for second derivatives")


for _name in ("mefn_fast::xattn_similarity_bwd", "mefn_fast::xattn_similarity_bwd_saved"):
    torch.library.register_autograd(_name, _no_double_backward, setup_context=_bwd_setup_context)


def xattn_similarity(regions: torch.Tensor, region_lengths: torch.Tensor, words: torch.Tensor,
                     word_lengths: torch.Tensor, opts: XAttnOptions) -> torch.Tensor:
    """Scores (B_img, B_txt) through the fused op; inputs as validated by ``mefn_fast._validate``.

    Under autograd (a gradient needed for regions or words) this is the saved-tile forward."""
    args = (regions.contiguous(), region_lengths.contiguous(), words.contiguous(), word_lengths.contiguous(),
            *option_args(opts))
    if torch.is_grad_enabled() and (regions.requires_grad or words.requires_grad):
        scores, _ = fwd_saved_op(*args, _tile_budget)
        return scores
    return fwd_op(*args)
