// The kernels of csrc/cuda/xattn_kernels.cuh: each runs a thread functor of csrc/xattn_simt.h on a
// flat index space, kThreads threads per block, one item of work per thread.
#include "xattn_kernels.cuh"

namespace mefn {
namespace cuda {
namespace {

template <class F>
__global__ void __launch_bounds__(kThreads) run(F f) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < f.size()) f(i);
}

template <class F>
cudaError_t launch_functor(const F& f, cudaStream_t stream) {
  const int64_t n = f.size();
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  run<F><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(f);
  return cudaGetLastError();
}

}  // namespace

#define MEFN_DEFINE_LAUNCH(F) \
  cudaError_t launch(const F& f, cudaStream_t stream) { return launch_functor(f, stream); }
MEFN_CUDA_FUNCTORS(MEFN_DEFINE_LAUNCH)
#undef MEFN_DEFINE_LAUNCH

}  // namespace cuda
}  // namespace mefn
