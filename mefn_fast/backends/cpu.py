"""The "cpu" backend: the fused C++ op ``mefn_fast::xattn_similarity_fwd`` (csrc/xattn_similarity.cpp)
with its backward, for CPU tensors.

The op computes float32 and float64 in their own precision. Half-precision inputs (float16,
bfloat16) are cast to float32 here, before the op, and the scores cast back to the input dtype (as
the reference computes them); the gradients flow back through the casts in the input dtype. The op's
own dtype contract stays float32 / float64.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import BackendUnavailable
from ..options import XAttnOptions


_HALF = (torch.float16, torch.bfloat16)


def load():
    from .build import extension_problem

    problem = extension_problem()
    if problem is not None:
        raise BackendUnavailable(problem)
    try:
        from . import ext_ops
    except ImportError as e:
        raise BackendUnavailable(f"the extension was built but mefn_fast._C does not import "
                                 f"({type(e).__name__}: {e})") from None
    if not hasattr(torch.ops.mefn_fast, "xattn_similarity_fwd"):
        raise BackendUnavailable("mefn_fast._C loaded but did not register mefn_fast::xattn_similarity_fwd")

    def impl(regions: torch.Tensor, region_lengths: torch.Tensor, words: torch.Tensor, word_lengths: torch.Tensor,
             opts: XAttnOptions, chunk_size: Optional[int] = None) -> torch.Tensor:
        # chunk_size is the reference's knob; the fused op's memory is bounded by its block sizes.
        if regions.dtype in _HALF:  # computed in float32, returned in the input dtype
            return ext_ops.xattn_similarity(regions.float(), region_lengths, words.float(), word_lengths,
                                            opts).to(regions.dtype)
        return ext_ops.xattn_similarity(regions, region_lengths, words, word_lengths, opts)

    return impl


def input_limits(regions: torch.Tensor, words: torch.Tensor, opts: XAttnOptions) -> list:
    """Why the cpu backend cannot take these inputs (devices and dtypes are checked by the registry)."""
    out = []
    if regions.device.type != "cpu" or words.device.type != "cpu":
        out.append("regions and words must be CPU tensors")
    return out
