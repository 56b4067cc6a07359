// The device of the blocked algorithm (xattn_blocked.h) for one thread per item of work: the
// CUDA op (csrc/cuda/xattn_cuda.cu, Exec = its kernel launcher) and the host emulation of that
// op (csrc/xattn_simt_emulation.cpp, Exec = a loop), which therefore run the same plan, the same
// ATen products and the same thread functors (xattn_simt.h).
//
// Compute type float, whatever the input dtype; the packed rows keep the input dtype, so that
// the cosine tiles of float16/bfloat16 inputs are tensor-core GEMMs with float32 accumulation and
// output (at::mm with an output dtype). Blocks are large, 4096 image rows x 8192 caption rows (a
// tile of at most 2^25 float32 entries, 128 MiB): the GPU's parallelism is inside a block pair,
// and every launch costs host time. Exec supplies: device (where the metadata goes), launch(functor)
// and mm_f32 / bmm_f32 (float32 results of products of the packed rows).
#ifndef MEFN_XATTN_SIMT_DEV_H_
#define MEFN_XATTN_SIMT_DEV_H_

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "xattn_blocked.h"
#include "xattn_simt.h"

namespace mefn {

// The input dtypes of a SIMT device (the op checks them first).
#define MEFN_SIMT_DISPATCH(TYPE, NAME, ...)                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

template <class Exec>
struct SimtDev {
  Exec exec;
  int64_t cap_override = 0;  // tests: rows of a block instead of the defaults below (0: defaults)

  at::ScalarType gemm_dtype(at::ScalarType in) const { return in; }
  int64_t block_cap(bool images, int64_t, int64_t longest) const {
    return std::max(longest, cap_override > 0 ? cap_override : images ? 4096 : 8192);
  }
  int64_t block_cost() const { return 64; }
  int64_t max_panel_entries() const { return int64_t(1) << 25; }

  SideMeta side_meta(const SidePlan& p) const {
    auto dev = [&](const std::vector<int64_t>& v) {
      return at::from_blob(const_cast<int64_t*>(v.data()), {int64_t(v.size())}, at::TensorOptions().dtype(at::kLong))
          .to(exec.device);
    };
    return {dev(p.len), dev(p.order), dev(p.src_row)};
  }

  // buffers from the device's caching allocator
  at::Tensor empty(int64_t numel, const at::TensorOptions& opts) const { return at::empty({numel}, opts); }

  // tasks in order, on the current stream, with one workspace for the whole call
  Workspace ws;
  template <class F>
  void for_tasks(int64_t n, F&& f) {
    for (int64_t task = 0; task < n; ++task) f(task, ws);
  }

  void pack(const at::Tensor& x, const SidePlan& p, const SideMeta& meta, int64_t b0, int64_t b1, at::Tensor& out,
            at::Tensor* norms) {
    const int64_t q0 = p.blocks[b0].row0, n = p.row_end(b1) - q0;
    MEFN_SIMT_DISPATCH(x.scalar_type(), "xattn_simt_pack", [&] {
      exec.launch(simt::PackRows<scalar_t>{x.data_ptr<scalar_t>(), x.size(2), meta.src_row.data_ptr<int64_t>(), q0, n,
                                           out.data_ptr<scalar_t>(),
                                           norms != nullptr ? norms->data_ptr<double>() : nullptr});
    });
  }

  // the forward always packs (in the input dtype, for tensor-core GEMMs): no direct rows
  bool direct_rows(const at::Tensor&, const SidePlan&, at::Tensor&) const { return false; }

  // every row of grad: the valid ones from dX, the others 0
  void unpack_grad(const at::Tensor& x, const SidePlan& p, const SideMeta& meta, const at::Tensor& dX,
                   const at::Tensor& norms, at::Tensor& grad) {
    grad.zero_();
    MEFN_SIMT_DISPATCH(x.scalar_type(), "xattn_simt_unpack", [&] {
      exec.launch(simt::UnpackRows<scalar_t>{x.data_ptr<scalar_t>(), x.size(2), meta.src_row.data_ptr<int64_t>(),
                                             p.rows, dX.data_ptr<float>(), norms.data_ptr<double>(),
                                             grad.data_ptr<scalar_t>()});
    });
  }

  void transpose(const at::Tensor& dst, const at::Tensor& src, bool add) {
    at::Tensor d = dst;
    if (add) d.add_(src.t());
    else d.copy_(src.t());
  }

  void mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { exec.mm_f32(out, a, b.t()); }
  void bmm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor o = out;
    at::bmm_out(o, a, b);
  }
  void gram(const at::Tensor& out, const at::Tensor& x) { exec.bmm_f32(out, x, x.transpose(1, 2)); }
  void baddbmm_t(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor o = out;
    o.baddbmm_(a, b.transpose(1, 2));
  }
  // out += alpha a b; b may be in the packed rows' dtype
  void baddbmm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float alpha, Workspace&) {
    at::Tensor o = out;
    o.baddbmm_(a, b.to(at::kFloat), 1, alpha);
  }
  // out (+)= a b (or a^T b), a float, b in the packed rows' dtype: for half b, a is rounded to it
  // so that the product runs on tensor cores, with float accumulation
  void addmm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool transpose_a, bool accumulate,
             Workspace&) {
    at::Tensor o = out;
    const at::Tensor ta = transpose_a ? a.t() : a;
    if (!accumulate) {
      exec.mm_f32(o, b.scalar_type() == at::kFloat ? ta : ta.to(b.scalar_type()), b);
    } else if (b.scalar_type() == at::kFloat) {
      o.addmm_(ta, b);
    } else {
      at::Tensor prod = at::empty(o.sizes(), o.options());
      exec.mm_f32(prod, ta.to(b.scalar_type()), b);
      o.add_(prod);
    }
  }

  void fwd_softmax(const EpilogueJob<float>& j) {
    if (j.p.clipped) exec.launch(simt::ClipRows{j});
    exec.launch(simt::SoftmaxColumns{j});
  }
  void fwd_attend_score(const EpilogueJob<float>& j) {
    exec.launch(simt::AttendColumns{j});
    exec.launch(simt::ScoreItems{j});
  }
  // the backward's recompute of the softmax, then its elementwise backward
  void bwd_epilogue(const EpilogueJob<float>& j) {
    fwd_softmax(j);
    exec.launch(simt::AttendColumns{j});
    exec.launch(simt::BackwardItems{j});
    exec.launch(simt::BackwardColumns{j});
    if (j.p.clipped) exec.launch(simt::ClipBackwardRows{j});
  }
};

// ------------------------------------------------------------------------------------------------
// The ops on a SIMT device: checks, then the blocked algorithm in float; scores and gradients in
// the input dtype. `where` names the kernel in messages ("CUDA kernel", "CUDA emulation").

inline void simt_check_features(const at::Tensor& x, const char* name, at::DeviceType type, const char* where) {
  TORCH_CHECK(x.dim() == 3, "xattn_similarity: ", name, " must have shape (batch, length, dim); got ", x.sizes());
  TORCH_CHECK(x.device().type() == type, "xattn_similarity (", where, "): ", name, " must be a ",
              c10::DeviceTypeName(type), " tensor; got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "xattn_similarity (", where, "): ", name, " must be float16, bfloat16 or float32; got ", x.scalar_type(),
              " (use backend='reference' or the cpu backend for float64)");
  TORCH_CHECK(x.size(2) > 0, "xattn_similarity: ", name, " has feature dimension 0");
}

inline CallInputs simt_check_inputs(const at::Tensor& regions, const at::Tensor& region_lengths,
                                    const at::Tensor& words, const at::Tensor& word_lengths, const Options& o,
                                    at::DeviceType type, const char* where) {
  simt_check_features(regions, "regions", type, where);
  simt_check_features(words, "words", type, where);
  TORCH_CHECK(regions.device() == words.device(), "xattn_similarity: regions (", regions.device(), ") and words (",
              words.device(), ") must be on the same device");
  check_feature_pair(regions, words);
  for (const at::Tensor* l : {&region_lengths, &word_lengths}) {
    TORCH_CHECK(l->is_cpu() || l->device() == regions.device(), "xattn_similarity: ",
                l == &region_lengths ? "region_lengths" : "word_lengths", " is on ", l->device(),
                " but the features are on ", regions.device());
  }
  CallInputs c;
  c.regions = regions.contiguous();
  c.words = words.contiguous();
  c.rl_host = host_lengths(region_lengths, "region_lengths", regions.size(0), regions.size(1));
  c.wl_host = host_lengths(word_lengths, "word_lengths", words.size(0), words.size(1));
  c.o = o;
  return c;
}

// forward (budget < 0) or saved-tile forward (budget >= 0): (scores in the input dtype, saved)
template <class Exec>
std::tuple<at::Tensor, at::Tensor> simt_forward(Exec exec, const CallInputs& c, int64_t budget, int64_t block_cap) {
  SimtDev<Exec> dev{exec, block_cap};
  Blocked<float, SimtDev<Exec>> b(dev, c);
  at::Tensor scores, saved;
  if (budget < 0) {
    scores = b.forward();
    saved = at::empty({0}, c.regions.options().dtype(at::kFloat));
  } else {
    std::tie(scores, saved) = b.forward_saving(budget);
  }
  return {scores.to(c.regions.scalar_type()), saved};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> simt_backward(Exec exec, const at::Tensor& grad_scores, const CallInputs& c,
                                                 const at::Tensor& saved, int64_t budget, int64_t block_cap,
                                                 bool need_grad_regions, bool need_grad_words) {
  check_grad_scores_shape(grad_scores, c.regions, c.words);
  TORCH_CHECK(grad_scores.device() == c.regions.device(), "xattn_similarity_bwd: grad_scores must be on ",
              c.regions.device(), "; got ", grad_scores.device());
  TORCH_CHECK(at::isFloatingType(grad_scores.scalar_type()),
              "xattn_similarity_bwd: grad_scores must be floating point; got ", grad_scores.scalar_type());
  at::Tensor grad = grad_scores.to(at::kFloat).contiguous();
  // gradients: every row is written by the backward (padding rows 0)
  at::Tensor gr = need_grad_regions ? at::empty_like(c.regions) : at::empty({0}, c.regions.options());
  at::Tensor gw = need_grad_words ? at::empty_like(c.words) : at::empty({0}, c.words.options());
  if (grad.numel() == 0) {
    gr.zero_();
    gw.zero_();
    return {gr, gw};
  }
  if (!need_grad_regions && !need_grad_words) return {gr, gw};
  SimtDev<Exec> dev{exec, block_cap};
  Blocked<float, SimtDev<Exec>> b(dev, c);
  at::Tensor s = saved.defined() ? saved : at::empty({0}, c.regions.options().dtype(at::kFloat));
  check_saved(s, b.saved_numel(), at::kFloat);
  b.backward(grad, s, need_grad_regions ? &gr : nullptr, need_grad_words ? &gw : nullptr, budget);
  return {gr, gw};
}

}  // namespace mefn

#endif  // MEFN_XATTN_SIMT_DEV_H_
