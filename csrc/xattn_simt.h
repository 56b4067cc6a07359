// One thread's share of each elementwise phase of the blocked algorithm (xattn_blocked.h), for a
// device that runs one thread per item of work: the CUDA op (csrc/cuda/xattn_cuda.cu launches one
// kernel per functor) and its host emulation (csrc/xattn_simt_emulation.cpp runs the same
// functors in a loop, so the CUDA op's logic is tested without a GPU).
//
// Every functor is called with an index i in [0, size()); threads past the work return. Index
// spaces, for an EpilogueJob j of nc context items x nq query items of w columns:
//   rows:    (c, r, q) over nc x n_pad x nq  - one context row of one query item (clipped_l2norm)
//   columns: (c, k)    over nc x cols        - one column of one panel (the strip functions, one lane)
//   items:   (c, q)    over nc x nq          - one pair (weights, scores, their backward)
// and for packing, one packed row. All math is xattn_pair.h's, in float.
#ifndef MEFN_XATTN_SIMT_H_
#define MEFN_XATTN_SIMT_H_

#include <stdint.h>

#include "xattn_pair.h"

namespace mefn {
namespace simt {

using Job = EpilogueJob<float>;

// Work item i of the clipped_l2norm functions: query item q and context row `row` of the tile;
// false on the padding rows of a context item.
MEFN_HOST_DEVICE bool clip_item(const Job& j, int64_t i, int64_t& q, int64_t& row) {
  q = i % j.nq;
  const int64_t cr = i / j.nq, c = cr / j.n_pad, r = cr % j.n_pad;
  row = c * j.n_pad + r;
  return r < j.c_len[c];
}

// clipped_l2norm logits of one context row of one query item (forward and the backward's recompute)
struct ClipRows {
  Job j;
  MEFN_HOST_DEVICE int64_t size() const { return j.nc * j.n_pad * j.nq; }
  MEFN_HOST_DEVICE void operator()(int64_t i) const {
    int64_t q, row;
    if (!clip_item(j, i, q, row)) return;
    const float rho = m_sqrt(segment_sumsq<float, float>(j.S + row * j.lds + q * j.w, j.q_len[q]));
    j.rho[row * j.nq + q] = rho;
    segment_scale<float, float>(j.S + row * j.lds + q * j.w, j.L + row * j.ldl + q * j.w, j.q_len[q], j.w,
                                clip_factor(rho), j.p.lambda, j.w);
  }
};

// the softmax over the context rows of one column
struct SoftmaxColumns {
  Job j;
  MEFN_HOST_DEVICE int64_t size() const { return j.nc * j.cols(); }
  MEFN_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t cols = j.cols(), c = i / cols, k = i % cols, o = c * j.n_pad;
    strip_forward<float, float>(j.S + o * j.lds + k, j.lds, j.L + o * j.ldl + k, j.ldl, j.p.clipped, j.p.lambda,
                                j.c_len[c], j.n_pad, j.E + o * j.lde + k, j.lde, j.stat(kInv, c) + k, j.nc * cols);
  }
};

// u and R of one column, after G E
struct AttendColumns {
  Job j;
  MEFN_HOST_DEVICE int64_t size() const { return j.nc * j.cols(); }
  MEFN_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t cols = j.cols(), c = i / cols, k = i % cols, o = c * j.n_pad;
    strip_attend<float, float>(j.E + o * j.lde + k, j.lde, j.GE + o * j.ldg + k, j.ldg, j.c_len[c],
                               j.stat(kInv, c) + k, j.nc * cols);
  }
};

// the score of one pair
struct ScoreItems {
  Job j;
  MEFN_HOST_DEVICE int64_t size() const { return j.nc * j.nq; }
  MEFN_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t c = i / j.nq, q = i % j.nq, k = q * j.w;
    const float s = (segment_score)(j.stat(kH, c) + k, j.stat(kR, c) + k, j.q_len[q], j.c_len[c], j.p,
                                    j.stat(kLogW, c) + k);
    float& o = j.out[j.c_idx[c] * j.out_c + j.q_idx[q] * j.out_q];
    o = j.accumulate ? o + j.scale * s : j.scale * s;
  }
};

// the backward of one pair's weights and aggregation: dR, dH of its columns
struct BackwardItems {
  Job j;
  MEFN_HOST_DEVICE int64_t size() const { return j.nc * j.nq; }
  MEFN_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t c = i / j.nq, q = i % j.nq, k = q * j.w;
    const float g = j.scale * j.grad[j.c_idx[c] * j.out_c + j.q_idx[q] * j.out_q];
    (segment_backward)(g, j.stat(kH, c) + k, j.stat(kR, c) + k, j.q_len[q], j.w, j.c_len[c], j.p,
                       j.stat(kLogW, c) + k, j.stat(kDR, c) + k, j.stat(kDH, c) + k);
  }
};

// the backward of one column: dS (and dE), and E~ for dG
struct BackwardColumns {
  Job j;
  MEFN_HOST_DEVICE int64_t size() const { return j.nc * j.cols(); }
  MEFN_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t cols = j.cols(), c = i / cols, k = i % cols, o = c * j.n_pad;
    strip_backward<float, float>(j.S + o * j.lds + k, j.lds, j.L + o * j.ldl + k, j.ldl, j.p.clipped, j.p.lambda,
                                 j.c_len[c], j.n_pad, j.E + o * j.lde + k, j.lde, j.GE + o * j.ldg + k, j.ldg,
                                 j.D + o * j.ldd + k, j.ldd, j.p.clipped ? j.dE + o * j.ldde + k : nullptr, j.ldde,
                                 j.dS + o * j.ldds + k, j.ldds, j.stat(kInv, c) + k, j.nc * cols);
  }
};

// clipped_l2norm backward of one context row of one query item (after BackwardColumns)
struct ClipBackwardRows {
  Job j;
  MEFN_HOST_DEVICE int64_t size() const { return j.nc * j.n_pad * j.nq; }
  MEFN_HOST_DEVICE void operator()(int64_t i) const {
    int64_t q, row;
    if (!clip_item(j, i, q, row)) return;
    segment_clip_backward<float, float>(j.S + row * j.lds + q * j.w, j.dE + row * j.ldde + q * j.w,
                                        j.rho[row * j.nq + q], j.q_len[q], j.dS + row * j.ldds + q * j.w, j.w);
  }
};

// ------------------------------------------------------------------------------------------------
// Rows: normalisation and its backward, one packed row per thread. X is the input's element type
// (float, c10::Half, c10::BFloat16); sums in double, so no row of a finite input overflows.

template <typename X>
struct PackRows {
  const X* x;              // (B, L, d) input
  int64_t d;
  const int64_t* src_row;  // packed row -> the caller's flat row, or -1
  int64_t q0, n;           // rows [q0, q0 + n)
  X* out;                  // n x d normalised rows (padding rows 0)
  double* norms;           // n norms, or null
  MEFN_HOST_DEVICE int64_t size() const { return n; }
  MEFN_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t s = src_row[q0 + i];
    X* o = out + i * d;
    if (s < 0) {
      for (int64_t k = 0; k < d; ++k) o[k] = X(0.0f);
      if (norms != nullptr) norms[i] = 0;
      return;
    }
    const X* xr = x + s * d;
    double ss = 0;
    for (int64_t k = 0; k < d; ++k) {
      const double v = static_cast<float>(xr[k]);
      ss += v * v;
    }
    const double nrm = sqrt(ss);
    if (norms != nullptr) norms[i] = nrm;
    const double inv = 1.0 / (nrm > kNormEps ? nrm : kNormEps);
    for (int64_t k = 0; k < d; ++k) o[k] = X(static_cast<float>(static_cast<float>(xr[k]) * inv));
  }
};

template <typename X>
struct UnpackRows {
  const X* x;
  int64_t d;
  const int64_t* src_row;
  int64_t n;               // packed rows
  const float* dxh;        // n x d gradient w.r.t. the normalised rows
  const double* norms;
  X* grad;                 // (B, L, d), rows of padding untouched
  MEFN_HOST_DEVICE int64_t size() const { return n; }
  MEFN_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t s = src_row[i];
    if (s < 0) return;
    const X* xr = x + s * d;
    const float* dq = dxh + i * d;
    X* g = grad + s * d;
    const double nrm = norms[i];
    if (nrm < kNormEps) {
      for (int64_t k = 0; k < d; ++k) g[k] = X(static_cast<float>(dq[k] / kNormEps));
      return;
    }
    const double inv = 1.0 / nrm;
    double dot = 0;
    for (int64_t k = 0; k < d; ++k) dot += static_cast<float>(xr[k]) * inv * dq[k];
    for (int64_t k = 0; k < d; ++k) g[k] = X(static_cast<float>((dq[k] - static_cast<float>(xr[k]) * inv * dot) * inv));
  }
};

}  // namespace simt
}  // namespace mefn

#endif  // MEFN_XATTN_SIMT_H_
