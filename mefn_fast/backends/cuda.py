"""The "cuda" backend: the CUDA kernels of the C++ ops ``mefn_fast::xattn_similarity_*``
(``csrc/cuda/*.cu``, registered for the CUDA dispatch key; schemas in ``csrc/xattn_similarity.cpp``),
for float16, bfloat16 and float32 CUDA tensors.

The Python side (fake kernels, autograd, the saved-tile mode) is :mod:`mefn_fast.backends.ext_ops`,
shared with the cpu backend: the dispatcher sends CUDA tensors to the CUDA kernels.

The algorithm is the cpu backend's (``csrc/xattn_blocked.h``, docs/design.md): ragged items packed
by length into blocks, the cosine tile of an image block x a caption block one cuBLAS GEMM
(through ``at::mm``: tensor cores with float32 accumulation for float16/bfloat16, exact float32
unless TF32 is enabled), ``G E`` one batched GEMM per block, the gradients GEMMs, and between
them the elementwise epilogue of ``csrc/xattn_pair.h``, one CUDA thread per column, row or pair
(``csrc/xattn_simt.h``); every intermediate in float32, on the current stream.

Memory: the packed inputs, the blocks in flight (a few tiles of 2048 x 4096 float32) and, in
training, the saved tiles within the tile budget; never a B_img x B_txt x N x M tensor. Needs
sm_80 or newer (the build's MEFN_CUDA_ARCHS, default 8.0;9.0). Without a GPU the backend reports
itself unavailable (the extension may still be built with CUDA, as in CI), and its logic is
tested on the CPU through the emulation ops of ``csrc/xattn_simt_emulation.cpp``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import BackendUnavailable
from ..options import XAttnOptions

OPS = ("mefn_fast::xattn_similarity_fwd", "mefn_fast::xattn_similarity_bwd", "mefn_fast::xattn_similarity_fwd_saved",
       "mefn_fast::xattn_similarity_bwd_saved")


def cuda_ops_registered() -> bool:
    """Whether the loaded extension has CUDA kernels for every op."""
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


def input_limits(regions: torch.Tensor, words: torch.Tensor, opts: XAttnOptions) -> list:
    """Why the cuda backend cannot take these inputs (devices and dtypes are checked by the registry)."""
    out = []
    if regions.device.type != "cuda" or words.device.type != "cuda":
        out.append("regions and words must be CUDA tensors")
    return out
