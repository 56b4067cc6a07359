"""The "cuda" backend: the CUDA kernels of the C++ ops ``mefn_fast::xattn_similarity_fwd`` / ``_bwd``
(``csrc/cuda/*.cu``, registered for the CUDA dispatch key; schema in ``csrc/xattn_similarity.cpp``),
for float16, bfloat16 and float32 CUDA tensors.

The Python side (fake kernels, autograd) is :mod:`mefn_fast.backends.ext_ops`, shared with the cpu backend:
the dispatcher sends CUDA tensors to the CUDA kernels.

Kernels (see the comments at the top of each file under ``csrc/cuda/``):

* the cosine tile of a block of images x a block of captions on tensor cores (WMMA 16x16x16,
  fp32 accumulation) for float16/bfloat16, with fp32 CUDA-core FMA for float32 (exact fp32, no
  TF32); the raw inputs are multiplied and the inverse row norms applied in fp32;
* the per-pair epilogue of ``csrc/xattn_pair.h`` with one warp per pair (lanes over the query
  positions), in shared memory; every intermediate in fp32;
* a backward that recomputes the tiles (nothing saved), in two passes owned by image blocks and
  by caption blocks, with no atomics: bitwise identical results from run to run.

Memory: inputs-sized buffers (inverse norms, Gram matrices, fp32 gradient accumulators), never a
B_img x B_txt x N x M tensor. Needs sm_80 or newer (the build's MEFN_CUDA_ARCHS, default 8.0;9.0).
Without a GPU the backend reports itself unavailable (the extension may still be built with CUDA,
as in CI).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import BackendUnavailable
from ..options import XAttnOptions

OPS = ("mefn_fast::xattn_similarity_fwd", "mefn_fast::xattn_similarity_bwd")

# Shared-memory feasibility of one tile (mirrors make_plan in csrc/cuda/xattn_prep.cu with one image
# x one caption per block and the per-warp scratch in global memory): the smallest opt-in limit of
# the supported GPUs (sm_80: 163 KiB; sm_90: 227 KiB).
_SMEM_LIMIT = 163 * 1024


def cuda_ops_registered() -> bool:
    """Whether the loaded extension has CUDA kernels for both ops."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in OPS)


def load():
    from .build import build_info, extension_problem

    problem = extension_problem()
    if problem is not None:
        raise BackendUnavailable(problem)
    info = build_info()
    if not info.get("cuda"):
        reason = info.get("reason") or "unknown reason"
        prefix = "CUDA ops not built: "
        raise BackendUnavailable(reason if reason.startswith(prefix) else prefix + reason)
    try:
        from . import ext_ops
    except ImportError as e:
        raise BackendUnavailable(f"the extension was built with CUDA but mefn_fast._C does not import "
                                 f"({type(e).__name__}: {e})") from None
    if not cuda_ops_registered():
        raise BackendUnavailable("mefn_fast._C loaded but registered no CUDA kernels for " + ", ".join(OPS))
    if not torch.cuda.is_available():
        raise BackendUnavailable("extension built with CUDA, but no CUDA GPU is visible")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise BackendUnavailable(f"the CUDA kernels need compute capability 8.0 or newer; "
                                 f"GPU 0 is {major}.{minor}")

    def impl(regions: torch.Tensor, region_lengths: torch.Tensor, words: torch.Tensor, word_lengths: torch.Tensor,
             opts: XAttnOptions, chunk_size: Optional[int] = None) -> torch.Tensor:
        # chunk_size is the reference's knob; the fused op's memory is bounded by its tiles.
        return ext_ops.xattn_similarity(regions, region_lengths, words, word_lengths, opts)

    return impl


def _round16(x: int) -> int:
    return (x + 15) // 16 * 16


def tile_smem_bytes(n: int, m: int, elem_size: int, backward: bool = True) -> int:
    """Shared memory of the smallest tile (1 image x 1 caption, scratch in global memory)."""
    rp, cp = _round16(n), _round16(m)
    lds = cp + 4
    ld_stage = 33 if elem_size == 4 else 72
    stage = (rp + cp) * ld_stage * elem_size
    return (2 if backward else 1) * rp * lds * 4 + (stage + 63) // 64 * 64 + 2 * (rp + cp) * 4


def input_limits(regions: torch.Tensor, words: torch.Tensor, opts: XAttnOptions) -> list:
    """Why the cuda backend cannot take these inputs (devices and dtypes are checked by the registry)."""
    out = []
    if regions.device.type != "cuda" or words.device.type != "cuda":
        out.append("regions and words must be CUDA tensors")
    n, m = regions.shape[1], words.shape[1]
    need = tile_smem_bytes(n, m, regions.element_size())
    ld_stage = 33 if regions.element_size() == 4 else 72
    gram = max(2 * lp * ld_stage * regions.element_size() + 64 + 16 * lp for lp in (_round16(n), _round16(m)))
    if max(need, gram) > _SMEM_LIMIT:
        out.append(f"N={n} regions x M={m} words is too large for one shared-memory tile of the CUDA kernels")
    return out
