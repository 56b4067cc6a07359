// Host code shared by the CPU and the CUDA xattn_similarity ops: the options, parsed and checked
// once, the per-pair parameters of a direction, and the input checks that do not depend on the
// device (each op adds its own device and dtype checks). The per-pair math is in xattn_pair.h.
//
// The op schemas (csrc/xattn_similarity.cpp) take the options of the similarity (docs/math.md) as strings,
// floats and a bool, in this order: direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg,
// lambda_lse. Bad values raise (TORCH_CHECK -> RuntimeError) naming the option, although the
// Python API (mefn_fast/_validate.py) has already rejected them with a ValueError.
#ifndef MEFN_XATTN_HOST_H_
#define MEFN_XATTN_HOST_H_

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#include "xattn_pair.h"

namespace mefn {

struct Options {
  Direction direction;
  double lambda_t2i, lambda_i2t;
  bool clipped, mfe;
  double tau;
  bool agg_lse;
  double lambda_lse;
  bool t2i() const { return direction != kI2T; }
  bool i2t() const { return direction != kT2I; }
};

inline Options parse_options(c10::string_view direction, double lambda_t2i, double lambda_i2t,
                             c10::string_view attn_norm, bool mfe, double tau, c10::string_view agg,
                             double lambda_lse) {
  Options o;
  if (direction == "t2i") o.direction = kT2I;
  else if (direction == "i2t") o.direction = kI2T;
  else if (direction == "both") o.direction = kBoth;
  else TORCH_CHECK(false, "xattn_similarity: direction must be 't2i', 'i2t' or 'both'; got '", std::string(direction), "'");
  TORCH_CHECK(attn_norm == "clipped_l2norm" || attn_norm == "none",
              "xattn_similarity: attn_norm must be 'clipped_l2norm' or 'none'; got '", std::string(attn_norm), "'");
  TORCH_CHECK(agg == "mean" || agg == "lse", "xattn_similarity: agg must be 'mean' or 'lse'; got '", std::string(agg), "'");
  TORCH_CHECK(std::isfinite(lambda_t2i) && lambda_t2i >= 0, "xattn_similarity: lambda_t2i must be finite and >= 0; got ", lambda_t2i);
  TORCH_CHECK(std::isfinite(lambda_i2t) && lambda_i2t >= 0, "xattn_similarity: lambda_i2t must be finite and >= 0; got ", lambda_i2t);
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "xattn_similarity: tau must be finite and > 0; got ", tau);
  TORCH_CHECK(std::isfinite(lambda_lse) && lambda_lse > 0, "xattn_similarity: lambda_lse must be finite and > 0; got ", lambda_lse);
  o.lambda_t2i = lambda_t2i;
  o.lambda_i2t = lambda_i2t;
  o.clipped = attn_norm == "clipped_l2norm";
  o.mfe = mfe;
  o.tau = tau;
  o.agg_lse = agg == "lse";
  o.lambda_lse = lambda_lse;
  return o;
}

// The per-pair parameters of one direction, in the kernels' compute type T.
template <typename T>
PairParams<T> pair_params(const Options& o, bool t2i) {
  PairParams<T> p;
  p.lambda = static_cast<T>(t2i ? o.lambda_t2i : o.lambda_i2t);
  p.clipped = o.clipped;
  p.mfe = o.mfe;
  p.tau = static_cast<T>(o.tau);
  p.agg_lse = o.agg_lse;
  p.lambda_lse = static_cast<T>(o.lambda_lse);
  return p;
}

// regions and words share the feature dimension and the dtype.
inline void check_feature_pair(const at::Tensor& regions, const at::Tensor& words) {
  TORCH_CHECK(regions.size(2) == words.size(2), "xattn_similarity: regions and words must share the feature dimension; got ",
              regions.size(2), " and ", words.size(2));
  TORCH_CHECK(regions.scalar_type() == words.scalar_type(), "xattn_similarity: regions (", regions.scalar_type(),
              ") and words (", words.scalar_type(), ") must have the same dtype");
}

// The lengths as int64 on the host (one device-to-host copy for GPU lengths), each checked to lie
// in [1, max_len].
inline at::Tensor host_lengths(const at::Tensor& lengths, const char* name, int64_t batch, int64_t max_len) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch, "xattn_similarity: ", name, " must have shape (", batch,
              ",); got ", lengths.sizes());
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()) && !at::isComplexType(lengths.scalar_type()) &&
                  lengths.scalar_type() != at::kBool,
              "xattn_similarity: ", name, " must have an integer dtype; got ", lengths.scalar_type());
  at::Tensor l = lengths.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = l.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(p[i] >= 1 && p[i] <= max_len, "xattn_similarity: ", name, " must lie in [1, ", max_len, "]; got ", p[i],
                " at index ", i);
  }
  return l;
}

// Bytes of tiles a call may hold at once by default (the forward's saved tiles, the backward's
// super-blocks); the _saved ops take it as an argument (mefn_fast/backends/ext_ops.py). 512 MiB:
// the 323 MB of vit-patches' tiles then stay saved (1.70x the packed floor, against 2.1x with
// 256 MiB, which recomputes them; one run each, AMD EPYC, one thread).
constexpr int64_t kDefaultTileBudget = int64_t(512) << 20;

// The saved tiles of xattn_similarity_fwd_saved: empty, or numel values of the compute type.
inline void check_saved(const at::Tensor& saved, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(saved.numel() == 0 || (saved.dim() == 1 && saved.numel() == numel && saved.scalar_type() == dtype),
              "xattn_similarity_bwd_saved: saved must be the tensor xattn_similarity_fwd_saved returned for these "
              "inputs and options (", numel, " values of ", dtype, "); got ", saved.sizes(), " of ", saved.scalar_type());
}

// The backward's upstream gradient has the scores' shape (B_img, B_txt).
inline void check_grad_scores_shape(const at::Tensor& grad_scores, const at::Tensor& regions, const at::Tensor& words) {
  TORCH_CHECK(grad_scores.dim() == 2 && grad_scores.size(0) == regions.size(0) && grad_scores.size(1) == words.size(0),
              "xattn_similarity_bwd: grad_scores must have shape (", regions.size(0), ", ", words.size(0), "); got ",
              grad_scores.sizes());
}

}  // namespace mefn

#endif  // MEFN_XATTN_HOST_H_
