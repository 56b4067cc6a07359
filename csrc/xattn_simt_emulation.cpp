// The CUDA op on the CPU, for tests: the CUDA op's device (csrc/xattn_simt_dev.h) with a host
// executor that runs each kernel's thread functor (csrc/xattn_simt.h) for every index in turn,
// and ATen's CPU products in float32 in place of cuBLAS. Same plan, same blocks, same thread
// code, same dtype handling as csrc/cuda/xattn_cuda.cu, on float32, float16 and bfloat16 CPU
// tensors:
//
//   mefn_fast::xattn_similarity_emulated_cuda_fwd(<the forward's inputs and options>, int budget,
//       int block_cap) -> (scores, saved)
//   mefn_fast::xattn_similarity_emulated_cuda_bwd(grad_scores, <inputs>, saved, <options>,
//       int budget, int block_cap, bool need_grad_regions, bool need_grad_words) -> (grad_regions, grad_words)
//
// budget < 0: the inference forward (saved empty); block_cap > 0: blocks of that many rows in
// place of the CUDA op's (so that small tests cover many blocks). Not an autograd op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "xattn_host.h"
#include "xattn_simt_dev.h"

namespace mefn {
namespace {

struct HostExec {
  at::Device device{at::kCPU};
  template <class F>
  void launch(const F& f) const {
    const int64_t n = f.size();
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  void mm_f32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    at::Tensor o = out;
    at::mm_out(o, a.to(at::kFloat), b.to(at::kFloat));
  }
  void bmm_f32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    at::Tensor o = out;
    at::bmm_out(o, a.to(at::kFloat), b.to(at::kFloat));
  }
};

constexpr const char* kWhere = "CUDA emulation";

std::tuple<at::Tensor, at::Tensor> emulated_fwd(const at::Tensor& regions, const at::Tensor& region_lengths,
                                                const at::Tensor& words, const at::Tensor& word_lengths,
                                                c10::string_view direction, double lambda_t2i, double lambda_i2t,
                                                c10::string_view attn_norm, bool mfe, double tau,
                                                c10::string_view agg, double lambda_lse, int64_t budget,
                                                int64_t block_cap) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  const CallInputs c = simt_check_inputs(regions, region_lengths, words, word_lengths, o, at::kCPU, kWhere);
  return simt_forward(HostExec{}, c, budget, block_cap);
}

std::tuple<at::Tensor, at::Tensor> emulated_bwd(const at::Tensor& grad_scores, const at::Tensor& regions,
                                                const at::Tensor& region_lengths, const at::Tensor& words,
                                                const at::Tensor& word_lengths, const at::Tensor& saved,
                                                c10::string_view direction, double lambda_t2i, double lambda_i2t,
                                                c10::string_view attn_norm, bool mfe, double tau,
                                                c10::string_view agg, double lambda_lse, int64_t budget,
                                                int64_t block_cap, bool need_grad_regions, bool need_grad_words) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  const CallInputs c = simt_check_inputs(regions, region_lengths, words, word_lengths, o, at::kCPU, kWhere);
  return simt_backward(HostExec{}, grad_scores, c, saved, budget, block_cap, need_grad_regions, need_grad_words);
}

}  // namespace
}  // namespace mefn

TORCH_LIBRARY_FRAGMENT(mefn_fast, m) {
  m.def(
      "xattn_similarity_emulated_cuda_fwd(Tensor regions, Tensor region_lengths, Tensor words, Tensor word_lengths, "
      "str direction, float lambda_t2i, float lambda_i2t, str attn_norm, bool mfe, float tau, str agg, "
      "float lambda_lse, int budget, int block_cap) -> (Tensor, Tensor)");
  m.def(
      "xattn_similarity_emulated_cuda_bwd(Tensor grad_scores, Tensor regions, Tensor region_lengths, Tensor words, "
      "Tensor word_lengths, Tensor saved, str direction, float lambda_t2i, float lambda_i2t, str attn_norm, "
      "bool mfe, float tau, str agg, float lambda_lse, int budget, int block_cap, bool need_grad_regions, "
      "bool need_grad_words) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mefn_fast, CPU, m) {
  m.impl("xattn_similarity_emulated_cuda_fwd", &mefn::emulated_fwd);
  m.impl("xattn_similarity_emulated_cuda_bwd", &mefn::emulated_bwd);
}
