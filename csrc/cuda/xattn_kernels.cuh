// The CUDA kernels of the xattn_similarity ops: one kernel per thread functor of csrc/xattn_simt.h
// (one thread per column, row or pair of a block pair's epilogue, or per packed row), launched on
// a given stream. Declared here without ATen, defined in xattn_kernels.cu, which includes no
// ATen either, so that `ptxas -v` of the kernels compiles in seconds (tests/test_cuda_ptxas.py).
// Each launch returns cudaGetLastError() for the caller to check.
#pragma once

#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../xattn_simt.h"

namespace mefn {
namespace cuda {

#define MEFN_CUDA_FUNCTORS(X)                                                                                 \
  X(simt::ClipRows) X(simt::SoftmaxColumns) X(simt::AttendColumns) X(simt::ScoreItems) X(simt::BackwardItems) \
  X(simt::BackwardColumns) X(simt::ClipBackwardRows) X(simt::PackRows<float>) X(simt::PackRows<c10::Half>)     \
  X(simt::PackRows<c10::BFloat16>) X(simt::UnpackRows<float>) X(simt::UnpackRows<c10::Half>)                   \
  X(simt::UnpackRows<c10::BFloat16>)

#define MEFN_DECLARE_LAUNCH(F) cudaError_t launch(const F& f, cudaStream_t stream);
MEFN_CUDA_FUNCTORS(MEFN_DECLARE_LAUNCH)
#undef MEFN_DECLARE_LAUNCH

constexpr int kThreads = 256;  // threads per block of every kernel

}  // namespace cuda
}  // namespace mefn
