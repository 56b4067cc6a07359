// CUDA forward of mefn_fast::xattn_similarity_fwd (schema in csrc/xattn_similarity.cpp).
//
// Grid: a persistent set of blocks walks the tiles (image block I, caption block Tb), image-major
// (fwd_block in xattn_blocks.cuh). For one tile, tile_product computes the cosine tile of BI images
// x BT captions into shared memory (tensor cores for half types), then each warp takes one image x
// caption pair at a time and runs the per-pair epilogue (xattn_pair_warp.cuh) for t2i and/or i2t
// on the same tile, writing the pair's score. Extra device memory: the inverse norms (B*L floats), the Gram matrices
// (B_img*N^2 + B_txt*M^2 floats) and, only when a pair is too big for shared memory, a per-warp
// scratch bounded by the grid size; never a B_img x B_txt x N x M tensor.
#include "xattn_common.cuh"

namespace mefn {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(Problem<T> P, T* __restrict__ scores) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  fwd_block<T>(P, scores, smem_raw);
}

at::Tensor xattn_similarity_fwd_cuda(const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
                                     const at::Tensor& word_lengths, c10::string_view direction, double lambda_t2i,
                                     double lambda_i2t, c10::string_view attn_norm, bool mfe, double tau,
                                     c10::string_view agg, double lambda_lse) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  Checked c = check_inputs(regions, region_lengths, words, word_lengths);
  const c10::cuda::CUDAGuard guard(c.regions.device());
  at::Tensor scores = at::zeros({regions.size(0), words.size(0)}, c.regions.options());
  if (scores.numel() == 0) return scores;
  const cudaStream_t stream = current_stream();
  at::Tensor rinv = inverse_norms(c.regions, c.rl), winv = inverse_norms(c.words, c.wl);
  at::Tensor G_img = o.t2i() ? gram_matrices(c.regions, c.rl, rinv) : at::Tensor();
  at::Tensor G_txt = o.i2t() ? gram_matrices(c.words, c.wl, winv) : at::Tensor();
  const Plan plan = make_plan(c.regions.size(0), c.regions.size(1), c.words.size(0), c.words.size(1),
                              c.regions.element_size(), false);
  MEFN_DISPATCH_TYPES(c.regions.scalar_type(), "xattn_similarity_fwd_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    Problem<T> P = make_problem<T>(c, o, plan, rinv, winv, G_img, G_txt);
    C10_CUDA_CHECK(cudaFuncSetAttribute(fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem)));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fwd_kernel<T>, kThreads, plan.smem));
    const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(plan.nI * plan.nT, sms * std::max(per_sm, 1)));
    at::Tensor work;
    if (plan.work_global) {
      work = at::empty({grid * kWarps * plan.work_per_warp}, c.regions.options().dtype(at::kFloat));
      P.work = work.data_ptr<float>();
    }
    fwd_kernel<T><<<grid, kThreads, plan.smem, stream>>>(P, reinterpret_cast<T*>(scores.data_ptr<scalar_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return scores;
}

}  // namespace
}  // namespace cuda
}  // namespace mefn

TORCH_LIBRARY_IMPL(mefn_fast, CUDA, m) {
  m.impl("xattn_similarity_fwd", &mefn::cuda::xattn_similarity_fwd_cuda);
}
