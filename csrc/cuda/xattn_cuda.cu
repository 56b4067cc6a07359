// CUDA kernels of the ops mefn_fast::xattn_similarity_fwd / _bwd / _fwd_saved / _bwd_saved
// (schemas in csrc/xattn_similarity.cpp), for float16, bfloat16 and float32 CUDA tensors.
//
// The algorithm is the CPU op's (csrc/xattn_blocked.h): both sides packed by length, the cosine
// tile of an image block x a caption block one cuBLAS GEMM through at::mm (tensor cores with
// float32 accumulation and output for half inputs; exact float32 unless the user enabled TF32),
// G E for every context item one batched GEMM (at::bmm, float32), the gradients GEMMs again
// (dS rounded to the input dtype for the tensor cores, float32 accumulation); in between, the
// elementwise epilogue of csrc/xattn_pair.h, one thread per column, row or pair
// (csrc/xattn_simt.h, kernels in xattn_kernels.cu), every intermediate in float32. All work is
// on the current stream; every launch is checked. The same code runs on the CPU as the emulation
// ops of csrc/xattn_simt_emulation.cpp, which tests/test_xattn_similarity_cuda.py checks against
// the reference, so the logic here is tested without a GPU. Never run on a GPU yet.
//
// Estimate on an H200 (FLOPs and bytes per block pair; no measurement yet). Per tile entry and
// direction the epilogue moves about 44 B through memory (cuBLAS writes S 4; ClipRows reads S,
// writes L 8; SoftmaxColumns reads L twice and S, writes E 16; bmm reads E, writes G E 8;
// AttendColumns reads both 8) against 2d FLOPs of the tile GEMM; G E adds 2n FLOPs per entry on
// float32 cores (n = 36: 72). A block pair is up to 4096 x 8192 entries (128 MiB per float32 tile,
// beyond the 50 MB of L2), so the traffic goes to HBM (about 4 TB/s reached of 4.8):
//   eval-f30k-gpu fp16 (36000 x ~100000 valid entries, d = 1024): floor 7.4 TFLOP at about
//     700 TFLOP/s = 10.5 ms; epilogue 3.6e9 x 44 B = 158 GB = 40 ms; G E 0.26 TFLOP at about
//     50 TFLOP/s = 5 ms; about 5.3x the packed floor.
//   eval-coco5k-gpu bf16 (180000 x ~500000, in bounded memory: tiles of one block pair at a time):
//     the same per-entry counts, about 5.3x.
//   train-gpu bf16 (4608 x ~2560, both directions, forward + backward, S saved; the backward
//     recomputes the softmax and G E of its two block pairs): floor 3 x 24 GFLOP = 0.1 ms at full
//     speed, but this size is launch-bound (about 40 launches of a few microseconds, and the
//     recomputation adds about 3 a block pair and direction): about 1 ms, 8-10x.
// Against the targets (1.5x, 1.5x, 2x of the packed floor) all three are estimated to miss.
// Closing the gap needs a fused epilogue that reads each tile entry once (one thread per column
// keeping its n context rows in registers, G in shared memory), which cuts the traffic to 8 B per
// entry and the launches to two per block pair: about 1.6-2x for the eval workloads.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../xattn_host.h"
#include "../xattn_simt_dev.h"
#include "xattn_kernels.cuh"

namespace mefn {
namespace cuda {
namespace {

// Kernel launches on the current stream, and float32 products of the packed rows on cuBLAS.
struct CudaExec {
  at::Device device;
  template <class F>
  void launch(const F& f) const {
    C10_CUDA_CHECK(cuda::launch(f, c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  }
  void mm_f32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    at::Tensor o = out;
    if (a.scalar_type() == at::kFloat) at::mm_out(o, a, b);
    else at::mm_out(o, a, b, at::kFloat);
  }
  void bmm_f32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    at::Tensor o = out;
    if (a.scalar_type() == at::kFloat) at::bmm_out(o, a, b);
    else at::bmm_out(o, a, b, at::kFloat);
  }
};

constexpr const char* kWhere = "CUDA kernel";

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& regions, const at::Tensor& region_lengths,
                                           const at::Tensor& words, const at::Tensor& word_lengths, const Options& o,
                                           int64_t budget) {
  const c10::cuda::CUDAGuard guard(regions.device());
  const CallInputs c = simt_check_inputs(regions, region_lengths, words, word_lengths, o, at::kCUDA, kWhere);
  return simt_forward(CudaExec{c.regions.device()}, c, budget, 0);
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_scores, const at::Tensor& regions,
                                            const at::Tensor& region_lengths, const at::Tensor& words,
                                            const at::Tensor& word_lengths, const at::Tensor& saved, const Options& o,
                                            int64_t budget, bool need_grad_regions, bool need_grad_words) {
  const c10::cuda::CUDAGuard guard(regions.device());
  const CallInputs c = simt_check_inputs(regions, region_lengths, words, word_lengths, o, at::kCUDA, kWhere);
  return simt_backward(CudaExec{c.regions.device()}, grad_scores, c, saved, budget, 0, need_grad_regions,
                       need_grad_words);
}

at::Tensor xattn_similarity_fwd_cuda(const at::Tensor& regions, const at::Tensor& region_lengths,
                                     const at::Tensor& words, const at::Tensor& word_lengths,
                                     c10::string_view direction, double lambda_t2i, double lambda_i2t,
                                     c10::string_view attn_norm, bool mfe, double tau, c10::string_view agg,
                                     double lambda_lse) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  return std::get<0>(forward(regions, region_lengths, words, word_lengths, o, -1));
}

std::tuple<at::Tensor, at::Tensor> xattn_similarity_fwd_saved_cuda(
    const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words, const at::Tensor& word_lengths,
    c10::string_view direction, double lambda_t2i, double lambda_i2t, c10::string_view attn_norm, bool mfe, double tau,
    c10::string_view agg, double lambda_lse, int64_t budget) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  return forward(regions, region_lengths, words, word_lengths, o, std::max<int64_t>(budget, 0));
}

std::tuple<at::Tensor, at::Tensor> xattn_similarity_bwd_cuda(
    const at::Tensor& grad_scores, const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
    const at::Tensor& word_lengths, c10::string_view direction, double lambda_t2i, double lambda_i2t,
    c10::string_view attn_norm, bool mfe, double tau, c10::string_view agg, double lambda_lse, bool need_grad_regions,
    bool need_grad_words) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  return backward(grad_scores, regions, region_lengths, words, word_lengths, at::Tensor(), o, kDefaultTileBudget,
                  need_grad_regions, need_grad_words);
}

std::tuple<at::Tensor, at::Tensor> xattn_similarity_bwd_saved_cuda(
    const at::Tensor& grad_scores, const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
    const at::Tensor& word_lengths, const at::Tensor& saved, c10::string_view direction, double lambda_t2i,
    double lambda_i2t, c10::string_view attn_norm, bool mfe, double tau, c10::string_view agg, double lambda_lse,
    int64_t budget, bool need_grad_regions, bool need_grad_words) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  return backward(grad_scores, regions, region_lengths, words, word_lengths, saved, o, budget, need_grad_regions,
                  need_grad_words);
}

}  // namespace
}  // namespace cuda
}  // namespace mefn

TORCH_LIBRARY_IMPL(mefn_fast, CUDA, m) {
  m.impl("xattn_similarity_fwd", &mefn::cuda::xattn_similarity_fwd_cuda);
  m.impl("xattn_similarity_bwd", &mefn::cuda::xattn_similarity_bwd_cuda);
  m.impl("xattn_similarity_fwd_saved", &mefn::cuda::xattn_similarity_fwd_saved_cuda);
  m.impl("xattn_similarity_bwd_saved", &mefn::cuda::xattn_similarity_bwd_saved_cuda);
}
