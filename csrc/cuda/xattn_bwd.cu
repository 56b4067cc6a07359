// CUDA backward of mefn_fast::xattn_similarity_bwd (schema in csrc/xattn_similarity.cpp).
//
// Like the CPU kernel, two passes (bwd_block, finalize_block in xattn_blocks.cuh) that recompute
// the cosine tiles (the forward saves nothing):
//   pass 1 (grad_regions): one block per image block; it walks every caption block in order,
//     recomputes the tile, runs the per-pair backward of every pair (one warp per pair, the t2i and
//     i2t directions one after the other into the same dS tile in shared memory), then adds
//     dS diag(1/|w|) W to its own rows of a float accumulator (B_img*N x d, CUDA-core FMA,
//     fp32). The t2i Gram gradients dG of its images are summed per warp and reduced over the
//     warps in a fixed order at the end.
//   pass 2 (grad_words): the same with the roles of images and captions swapped.
//   finalize: per row, dR^ += 2 dG R^ (Gram term), then the backward of the normalisation, in the
//     input dtype; padded rows get exactly 0.
// Determinism: every output element has one owner (a block, a warp or a thread) that reduces its
// terms in a fixed order; there are no atomics, so results are bitwise identical run to run.
#include "xattn_common.cuh"

namespace mefn {
namespace cuda {
namespace {

template <typename T, bool kOwnImages>
__global__ void __launch_bounds__(kThreads)
    bwd_pass_kernel(Problem<T> P, const float* __restrict__ grad, float* __restrict__ acc, float* __restrict__ dGpart,
                    float* __restrict__ dGtot) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bwd_block<T, kOwnImages>(P, grad, acc, dGpart, dGtot, smem_raw);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const T* __restrict__ x, const int64_t* __restrict__ len, const float* __restrict__ inv,
                    const float* __restrict__ dG, int L, int64_t d, float* __restrict__ acc, T* __restrict__ grad) {
  __shared__ float red[kWarps];
  finalize_block<T>(x, len, inv, dG, L, d, acc, grad, red);
}

std::tuple<at::Tensor, at::Tensor> xattn_similarity_bwd_cuda(
    const at::Tensor& grad_scores, const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
    const at::Tensor& word_lengths, c10::string_view direction, double lambda_t2i, double lambda_i2t,
    c10::string_view attn_norm, bool mfe, double tau, c10::string_view agg, double lambda_lse, bool need_grad_regions,
    bool need_grad_words) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  Checked c = check_inputs(regions, region_lengths, words, word_lengths);
  check_grad_scores_shape(grad_scores, regions, words);
  TORCH_CHECK(grad_scores.device() == regions.device(), "xattn_similarity_bwd (CUDA kernel): grad_scores must be on ",
              regions.device(), "; got ", grad_scores.device());
  TORCH_CHECK(at::isFloatingType(grad_scores.scalar_type()), "xattn_similarity_bwd: grad_scores must be floating point; got ",
              grad_scores.scalar_type());
  const c10::cuda::CUDAGuard guard(c.regions.device());
  at::Tensor grad = grad_scores.to(at::kFloat).contiguous();
  at::Tensor gr = need_grad_regions ? at::zeros_like(c.regions) : at::empty({0}, regions.options());
  at::Tensor gw = need_grad_words ? at::zeros_like(c.words) : at::empty({0}, words.options());
  if (grad.numel() == 0 || (!need_grad_regions && !need_grad_words)) return {gr, gw};
  const cudaStream_t stream = current_stream();
  const int64_t B_img = c.regions.size(0), N = c.regions.size(1), B_txt = c.words.size(0), M = c.words.size(1),
                d = c.regions.size(2);
  at::Tensor rinv = inverse_norms(c.regions, c.rl), winv = inverse_norms(c.words, c.wl);
  at::Tensor G_img = o.t2i() ? gram_matrices(c.regions, c.rl, rinv) : at::Tensor();
  at::Tensor G_txt = o.i2t() ? gram_matrices(c.words, c.wl, winv) : at::Tensor();
  const Plan plan = make_plan(B_img, N, B_txt, M, c.regions.element_size(), true);
  const auto fopts = c.regions.options().dtype(at::kFloat);
  MEFN_DISPATCH_TYPES(c.regions.scalar_type(), "xattn_similarity_bwd_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    Problem<T> P = make_problem<T>(c, o, plan, rinv, winv, G_img, G_txt);
    const float* gp = grad.data_ptr<float>();
    if (need_grad_regions) {
      at::Tensor acc = at::zeros({B_img * N, d}, fopts);
      at::Tensor part = o.t2i() ? at::zeros({plan.nI * kWarps * plan.BI * N * N}, fopts) : at::empty({0}, fopts);
      at::Tensor dG = o.t2i() ? at::empty({B_img, N, N}, fopts) : at::empty({0}, fopts);
      at::Tensor work = plan.work_global ? at::empty({plan.nI * kWarps * plan.work_per_warp}, fopts) : at::Tensor();
      P.work = plan.work_global ? work.data_ptr<float>() : nullptr;
      auto kernel = bwd_pass_kernel<T, true>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem)));
      kernel<<<plan.nI, kThreads, plan.smem, stream>>>(P, gp, acc.data_ptr<float>(), part.data_ptr<float>(),
                                                       dG.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_kernel<T><<<B_img * N, kThreads, 0, stream>>>(
          P.regions, P.rl, P.rinv, o.t2i() ? dG.data_ptr<float>() : nullptr, static_cast<int>(N), d,
          acc.data_ptr<float>(), reinterpret_cast<T*>(gr.data_ptr<scalar_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_grad_words) {
      at::Tensor acc = at::zeros({B_txt * M, d}, fopts);
      at::Tensor part = o.i2t() ? at::zeros({plan.nT * kWarps * plan.BT * M * M}, fopts) : at::empty({0}, fopts);
      at::Tensor dG = o.i2t() ? at::empty({B_txt, M, M}, fopts) : at::empty({0}, fopts);
      at::Tensor work = plan.work_global ? at::empty({plan.nT * kWarps * plan.work_per_warp}, fopts) : at::Tensor();
      P.work = plan.work_global ? work.data_ptr<float>() : nullptr;
      auto kernel = bwd_pass_kernel<T, false>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem)));
      kernel<<<plan.nT, kThreads, plan.smem, stream>>>(P, gp, acc.data_ptr<float>(), part.data_ptr<float>(),
                                                       dG.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_kernel<T><<<B_txt * M, kThreads, 0, stream>>>(
          P.words, P.wl, P.winv, o.i2t() ? dG.data_ptr<float>() : nullptr, static_cast<int>(M), d,
          acc.data_ptr<float>(), reinterpret_cast<T*>(gw.data_ptr<scalar_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gr, gw};
}

}  // namespace
}  // namespace cuda
}  // namespace mefn

TORCH_LIBRARY_IMPL(mefn_fast, CUDA, m) {
  m.impl("xattn_similarity_bwd", &mefn::cuda::xattn_similarity_bwd_cuda);
}
