// The CPU's loops over the epilogue phases of xattn_pair.h, and the CPU's packing, gradient
// unpacking and transpose (csrc/xattn_similarity.cpp, the CpuDev of xattn_blocked.h).
//
// Strip functions run on 64-byte SIMD lanes (16 float or 8 double columns at a time, the
// remainder column by column); segment functions once per (row, query item) on the same lanes,
// or once per query item. Every tile buffer has kTileSlack entries of slack at its end (the SIMD
// segment functions read and write a little past a row, see xattn_pair.h).
// Compiled once per instruction set, inside that set's namespace, like the math of xattn_pair.h
// (the including file defines MEFN_XATTN_PAIR_REINCLUDE around the second and later copies).
#if !defined(MEFN_XATTN_CPU_EPILOGUE_) || defined(MEFN_XATTN_PAIR_REINCLUDE)
#ifndef MEFN_XATTN_PAIR_REINCLUDE
#define MEFN_XATTN_CPU_EPILOGUE_
#endif

#include <algorithm>
#include <cmath>
#include <vector>

namespace mefn {
namespace cpu {

// Logits (clipped_l2norm), softmax over the context rows and the column statistics of every panel.
template <typename T>
void fwd_softmax(const EpilogueJob<T>& j) {
  using V = typename HostLanes<T>::V;
  constexpr int W = Lanes<V>::W;
  const int64_t cols = j.cols(), sst = j.nc * cols;
  std::vector<T> fac(j.nq);
  for (int64_t c = 0; c < j.nc; ++c) {
    const int64_t n = j.c_len[c];
    const T* S = j.S + c * j.n_pad * j.lds;
    T* L = j.L + c * j.n_pad * j.ldl;
    T* E = j.E + c * j.n_pad * j.lde;
    T* st = j.stat(kInv, c);
    if (j.p.clipped) {
      // row by row: the items' norms, their factors (square roots and divisions batched), the
      // logits, and the running column maxima while the row is in L1
      T* rho = j.rho + c * j.n_pad * j.nq;
      T* mx = st + kMx * sst;
      for (int64_t r = 0; r < n; ++r) {
        const T* Sr = S + r * j.lds;
        T* Lr = L + r * j.ldl;
        T* rr = rho + r * j.nq;
        for (int64_t q = 0; q < j.nq; ++q) rr[q] = segment_sumsq<V, T>(Sr + q * j.w, j.q_len[q]);
        for (int64_t q = 0; q < j.nq; ++q) fac[q] = clip_factor(rr[q] = std::sqrt(rr[q]), j.p.lambda);
        for (int64_t q = 0; q < j.nq; ++q) segment_scale<V, T>(Sr + q * j.w, Lr + q * j.w, j.q_len[q], j.w, fac[q]);
        if (r == 0) {
          std::copy(Lr, Lr + cols, mx);
        } else {
          for (int64_t k = 0; k < cols; ++k) mx[k] = std::max(mx[k], Lr[k]);
        }
      }
    }
    int64_t k = 0;
    for (; k + W <= cols; k += W)
      strip_forward<V, T>(S + k, j.lds, L + k, j.ldl, j.p.clipped, j.p.lambda, n, j.n_pad, E + k, j.lde, st + k, sst,
                          j.p.clipped);
    for (; k < cols; ++k)
      strip_forward<T, T>(S + k, j.lds, L + k, j.ldl, j.p.clipped, j.p.lambda, n, j.n_pad, E + k, j.lde, st + k, sst,
                          j.p.clipped);
  }
}

template <typename T>
void attend_panel(const EpilogueJob<T>& j, int64_t c, int64_t n) {
  using V = typename HostLanes<T>::V;
  constexpr int W = Lanes<V>::W;
  const int64_t cols = j.cols(), sst = j.nc * cols;
  const T* E = j.E + c * j.n_pad * j.lde;
  const T* GE = j.GE + c * j.n_pad * j.ldg;
  T* st = j.stat(kInv, c);
  int64_t k = 0;
  for (; k + W <= cols; k += W) strip_attend<V, T>(E + k, j.lde, GE + k, j.ldg, n, st + k, sst);
  for (; k < cols; ++k) strip_attend<T, T>(E + k, j.lde, GE + k, j.ldg, n, st + k, sst);
}

// After G E: attended cosines, weights and the scores of every pair.
template <typename T>
void fwd_attend_score(const EpilogueJob<T>& j) {
  for (int64_t c = 0; c < j.nc; ++c) {
    const int64_t n = j.c_len[c];
    attend_panel(j, c, n);
    const T* H = j.stat(kH, c);
    const T* R = j.stat(kR, c);
    T* logw = j.stat(kLogW, c);
    for (int64_t q = 0; q < j.nq; ++q) {
      const T s = (segment_score)(H + q * j.w, R + q * j.w, j.q_len[q], n, j.p, logw + q * j.w);
      T& o = j.out[j.c_idx[c] * j.out_c + j.q_idx[q] * j.out_q];
      o = j.accumulate ? o + j.scale * s : j.scale * s;
    }
  }
}

// The epilogue backward of every pair (after fwd_softmax and G E): dS, and E~ in D for dG.
template <typename T>
void bwd_elementwise(const EpilogueJob<T>& j) {
  using V = typename HostLanes<T>::V;
  constexpr int W = Lanes<V>::W;
  const int64_t cols = j.cols(), sst = j.nc * cols;
  for (int64_t c = 0; c < j.nc; ++c) {
    const int64_t n = j.c_len[c];
    attend_panel(j, c, n);
    T* st = j.stat(kInv, c);
    T* logw = j.stat(kLogW, c);
    const T* H = j.stat(kH, c);
    const T* R = j.stat(kR, c);
    T* dR = j.stat(kDR, c);
    T* dH = j.stat(kDH, c);
    for (int64_t q = 0; q < j.nq; ++q) {
      const T g = j.scale * j.grad[j.c_idx[c] * j.out_c + j.q_idx[q] * j.out_q];
      (segment_backward)(g, H + q * j.w, R + q * j.w, j.q_len[q], j.w, n, j.p, logw + q * j.w, dR + q * j.w,
                         dH + q * j.w);
    }
    const int64_t o = c * j.n_pad;
    const T* S = j.S + o * j.lds;
    T* L = j.L + o * j.ldl;
    const T* E = j.E + o * j.lde;
    const T* GE = j.GE + o * j.ldg;
    T* D = j.D + o * j.ldd;
    T* dS = j.dS + o * j.ldds;
    int64_t k = 0;
    for (; k + W <= cols; k += W)
      strip_backward<V, T>(S + k, j.lds, L + k, j.ldl, j.p.clipped, j.p.lambda, n, j.n_pad, E + k, j.lde, GE + k,
                           j.ldg, D + k, j.ldd, dS + k, j.ldds, st + k, sst);
    for (; k < cols; ++k)
      strip_backward<T, T>(S + k, j.lds, L + k, j.ldl, j.p.clipped, j.p.lambda, n, j.n_pad, E + k, j.lde, GE + k,
                           j.ldg, D + k, j.ldd, dS + k, j.ldds, st + k, sst);
    if (j.p.clipped) {
      const T* rho = j.rho + o * j.nq;
      for (int64_t r = 0; r < n; ++r)
        for (int64_t q = 0; q < j.nq; ++q)
          segment_clip_backward<V, T>(S + r * j.lds + q * j.w, L + r * j.ldl + q * j.w, rho[r * j.nq + q],
                                      j.q_len[q], dS + r * j.ldds + q * j.w);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Rows: normalisation (forward and backward) and transposes

// ||x|| of a row without overflow or underflow: float rows accumulate in double; double rows with
// an extreme largest magnitude are scaled by it first.
template <typename T>
double row_norm(const T* x, int64_t d) {
  if constexpr (sizeof(T) == 4) {
    double ss = 0;
    MEFN_SIMD_REDUCE(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += double(x[i]) * double(x[i]);
    return std::sqrt(ss);
  } else {
    double mx = 0;
    for (int64_t i = 0; i < d; ++i) mx = std::max(mx, std::fabs(double(x[i])));
    double ss = 0;
    if (mx > 0x1p+500 || (mx < 0x1p-500 && mx > 0)) {
      MEFN_SIMD_REDUCE(+ : ss)
      for (int64_t i = 0; i < d; ++i) ss += (x[i] / mx) * (x[i] / mx);
      return mx * std::sqrt(ss);
    }
    MEFN_SIMD_REDUCE(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
    return std::sqrt(ss);
  }
}

// Packed rows [q0, q1) of a side: x^ = x / max(||x||, 1e-12) of the caller's row src_row[q]
// (0 for padding rows), into out (row q - q0); norms[q - q0] = ||x|| when norms is not null.
template <typename T>
void pack_rows(const T* x, int64_t d, const int64_t* src_row, int64_t q0, int64_t q1, T* out, double* norms) {
  for (int64_t q = q0; q < q1; ++q) {
    T* o = out + (q - q0) * d;
    const int64_t s = src_row[q];
    if (s < 0) {
      std::fill(o, o + d, T(0));
      if (norms != nullptr) norms[q - q0] = 0;
      continue;
    }
    const T* xr = x + s * d;
    const double nrm = row_norm(xr, d);
    if (norms != nullptr) norms[q - q0] = nrm;
    const double den = std::max(nrm, kNormEps);
    if constexpr (sizeof(T) == 4) {
      const double inv = 1.0 / den;
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(double(xr[i]) * inv);
    } else {
      for (int64_t i = 0; i < d; ++i) o[i] = xr[i] / den;
    }
  }
}

// The normalisation's backward for packed rows [q0, q1): grad of the caller's row src_row[q] from
// dxh (row q - q0, w.r.t. x^), (dx^ - x^ (x^ . dx^)) / ||x||, or dx^ / 1e-12 below the eps.
template <typename T>
void unpack_rows(const T* x, int64_t d, const int64_t* src_row, int64_t q0, int64_t q1, const T* dxh,
                 const double* norms, T* grad) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t s = src_row[q];
    if (s < 0) continue;
    const T* xr = x + s * d;
    const T* dq = dxh + (q - q0) * d;
    T* g = grad + s * d;
    const double nrm = norms[q - q0];
    if (nrm < kNormEps) {
      for (int64_t i = 0; i < d; ++i) g[i] = static_cast<T>(dq[i] / kNormEps);
      continue;
    }
    if constexpr (sizeof(T) == 4) {
      const double inv = 1.0 / nrm;
      double dot = 0;
      MEFN_SIMD_REDUCE(+ : dot)
      for (int64_t i = 0; i < d; ++i) dot += double(xr[i]) * double(dq[i]);
      dot *= inv;
      for (int64_t i = 0; i < d; ++i) g[i] = static_cast<T>((double(dq[i]) - double(xr[i]) * inv * dot) * inv);
    } else {
      double dot = 0;
      MEFN_SIMD_REDUCE(+ : dot)
      for (int64_t i = 0; i < d; ++i) dot += (xr[i] / nrm) * dq[i];
      for (int64_t i = 0; i < d; ++i) g[i] = (dq[i] - (xr[i] / nrm) * dot) / nrm;
    }
  }
}

// dst (cols x rows, row stride ldd) = (or +=) src (rows x cols, row stride lds) transposed.
template <typename T>
void transpose(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t rows, int64_t cols, bool add) {
  constexpr int64_t kB = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kB) {
    const int64_t i1 = std::min(rows, i0 + kB);
    for (int64_t j0 = 0; j0 < cols; j0 += kB) {
      const int64_t j1 = std::min(cols, j0 + kB);
      for (int64_t jj = j0; jj < j1; ++jj) {
        T* o = dst + jj * ldd;
        if (add) {
          for (int64_t ii = i0; ii < i1; ++ii) o[ii] += src[ii * lds + jj];
        } else {
          for (int64_t ii = i0; ii < i1; ++ii) o[ii] = src[ii * lds + jj];
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace mefn

#endif  // MEFN_XATTN_CPU_EPILOGUE_
