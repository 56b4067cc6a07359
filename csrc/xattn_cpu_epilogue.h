// The CPU's loops over the epilogue phases of xattn_pair.h, and the CPU's packing, gradient
// unpacking and transpose (csrc/xattn_similarity.cpp, the CpuDev of xattn_blocked.h).
//
// Strip functions run on the SIMD lanes of the instruction set (xattn_pair.h: 16 float columns at a
// time with AVX-512, 8 with AVX2, 4 with SSE2; half as many doubles), the remainder column by column; segment functions once per (row, query item) on the same lanes,
// or once per query item. Every tile buffer has kTileSlack entries of slack at its end (the SIMD
// segment functions read a little past a row, see xattn_pair.h).
// Compiled once per instruction set, inside that set's namespace, like the math of xattn_pair.h
// (the including file defines MEFN_XATTN_PAIR_REINCLUDE around the second and later copies).
#if !defined(MEFN_XATTN_CPU_EPILOGUE_) || defined(MEFN_XATTN_PAIR_REINCLUDE)
#ifndef MEFN_XATTN_PAIR_REINCLUDE
#define MEFN_XATTN_CPU_EPILOGUE_
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

namespace mefn {
namespace cpu {

// The phases on the columns of query items [q0, q1) of panel c (every function below works on
// such a range: a panel at once in the forward, a cache-sized chunk at a time in the backward).
// Strips of W columns, the range's last few columns one at a time.
template <typename T, class F>
inline void for_strips(const EpilogueJob<T>& j, int64_t q0, int64_t q1, F&& f) {
  constexpr int W = Lanes<typename HostLanes<T>::V>::W;
  int64_t k = q0 * j.w;
  const int64_t k1 = q1 * j.w;
  for (; k + W <= k1; k += W) f(k, std::true_type{});
  for (; k < k1; ++k) f(k, std::false_type{});
}

template <typename T>
struct Panel {
  const EpilogueJob<T>& j;
  int64_t c, n, o;  // context item, its valid rows, its first row
  int64_t sst;      // stride between statistics
  T* st;            // its statistics
  Panel(const EpilogueJob<T>& job, int64_t c_)
      : j(job), c(c_), n(job.c_len[c_]), o(c_ * job.n_pad), sst(job.nc * job.cols()), st(job.stat(kInv, c_)) {}
};

// logits (clipped_l2norm: row by row, the items' norms with their square roots and divisions
// batched, and the running column maxima while the row is in L1), then the softmax strips
template <typename T>
void logits_softmax(const Panel<T>& P, int64_t q0, int64_t q1, T* fac) {
  using V = typename HostLanes<T>::V;
  const EpilogueJob<T>& j = P.j;
  const T* S = j.S + P.o * j.lds;
  T* L = j.L + P.o * j.ldl;
  T* E = j.E + P.o * j.lde;
  const int64_t k0 = q0 * j.w, k1 = q1 * j.w;
  if (j.p.clipped) {
    T* rho = j.rho + P.o * j.nq;
    T* mx = P.st + kMx * P.sst;
    for (int64_t r = 0; r < P.n; ++r) {
      const T* Sr = S + r * j.lds;
      T* Lr = L + r * j.ldl;
      T* rr = rho + r * j.nq;
      for (int64_t q = q0; q < q1; ++q) rr[q] = segment_sumsq<V, T>(Sr + q * j.w, j.q_len[q]);
      for (int64_t q = q0; q < q1; ++q) fac[q] = clip_factor(rr[q] = std::sqrt(rr[q]));
      for (int64_t q = q0; q < q1; ++q)
        segment_scale<V, T>(Sr + q * j.w, Lr + q * j.w, j.q_len[q], j.w, fac[q], j.p.lambda, (j.nq - q) * j.w);
      if (r == 0) {
        std::copy(Lr + k0, Lr + k1, mx + k0);
      } else {
        for (int64_t k = k0; k < k1; ++k) mx[k] = std::max(mx[k], Lr[k]);
      }
    }
  }
  for_strips(j, q0, q1, [&](int64_t k, auto vec) {
    using U = std::conditional_t<decltype(vec)::value, V, T>;
    strip_forward<U, T>(S + k, j.lds, L + k, j.ldl, j.p.clipped, j.p.lambda, P.n, j.n_pad, E + k, j.lde, P.st + k,
                        P.sst, j.p.clipped);
  });
}

template <typename T>
void attend(const Panel<T>& P, int64_t q0, int64_t q1) {
  using V = typename HostLanes<T>::V;
  const EpilogueJob<T>& j = P.j;
  const T* E = j.E + P.o * j.lde;
  const T* GE = j.GE + P.o * j.ldg;
  for_strips(j, q0, q1, [&](int64_t k, auto vec) {
    using U = std::conditional_t<decltype(vec)::value, V, T>;
    strip_attend<U, T>(E + k, j.lde, GE + k, j.ldg, P.n, P.st + k, P.sst);
  });
}

// the backward of items [q0, q1) of panel c, after logits_softmax and attend
template <typename T>
void backward(const Panel<T>& P, int64_t q0, int64_t q1) {
  using V = typename HostLanes<T>::V;
  const EpilogueJob<T>& j = P.j;
  const int64_t w = j.w;
  const T *H = j.stat(kH, P.c), *R = j.stat(kR, P.c);
  T *logw = j.stat(kLogW, P.c), *dR = j.stat(kDR, P.c), *dH = j.stat(kDH, P.c);
  for (int64_t q = q0; q < q1; ++q) {
    const T g = j.scale * j.grad[j.c_idx[P.c] * j.out_c + j.q_idx[q] * j.out_q];
    (segment_backward)(g, H + q * w, R + q * w, j.q_len[q], w, P.n, j.p, logw + q * w, dR + q * w, dH + q * w);
  }
  const T* S = j.S + P.o * j.lds;
  const T* L = j.L + P.o * j.ldl;
  const T* E = j.E + P.o * j.lde;
  const T* GE = j.GE + P.o * j.ldg;
  T* D = j.D + P.o * j.ldd;
  T* dE = j.p.clipped ? j.dE + P.o * j.ldde : nullptr;
  T* dS = j.dS + P.o * j.ldds;
  for_strips(j, q0, q1, [&](int64_t k, auto vec) {
    using U = std::conditional_t<decltype(vec)::value, V, T>;
    strip_backward<U, T>(S + k, j.lds, L + k, j.ldl, j.p.clipped, j.p.lambda, P.n, j.n_pad, E + k, j.lde, GE + k,
                         j.ldg, D + k, j.ldd, dE == nullptr ? nullptr : dE + k, j.ldde, dS + k, j.ldds, P.st + k,
                         P.sst);
  });
  if (j.p.clipped) {
    const T* rho = j.rho + P.o * j.nq;
    for (int64_t r = 0; r < P.n; ++r)
      for (int64_t q = q0; q < q1; ++q)
        segment_clip_backward<V, T>(S + r * j.lds + q * w, dE + r * j.ldde + q * w, rho[r * j.nq + q], j.q_len[q],
                                    dS + r * j.ldds + q * w, (j.nq - q) * w);
  }
}

// Logits, softmax over the context rows and the column statistics of every panel.
template <typename T>
void fwd_softmax(const EpilogueJob<T>& j) {
  std::vector<T> fac(j.nq);
  for (int64_t c = 0; c < j.nc; ++c) logits_softmax(Panel<T>(j, c), 0, j.nq, fac.data());
}

// After G E: attended cosines, weights and the scores of every pair.
template <typename T>
void fwd_attend_score(const EpilogueJob<T>& j) {
  for (int64_t c = 0; c < j.nc; ++c) {
    const Panel<T> P(j, c);
    attend(P, 0, j.nq);
    const T *H = j.stat(kH, c), *R = j.stat(kR, c);
    T* logw = j.stat(kLogW, c);
    for (int64_t q = 0; q < j.nq; ++q) {
      const T s = (segment_score)(H + q * j.w, R + q * j.w, j.q_len[q], P.n, j.p, logw + q * j.w);
      T& out = j.out[j.c_idx[c] * j.out_c + j.q_idx[q] * j.out_q];
      out = j.accumulate ? out + j.scale * s : j.scale * s;
    }
  }
}

// The epilogue backward of every pair, with G E given: the forward's logits and softmax again,
// then dS and E~ (in D, for dG), a chunk of query items at a time so that the chunk's tiles stay
// in cache through all the phases (a multiple of W columns, about kChunkColumns).
template <typename T>
void bwd_epilogue(const EpilogueJob<T>& j) {
  constexpr int64_t W = Lanes<typename HostLanes<T>::V>::W;
  constexpr int64_t kChunkColumns = 256;
  int64_t step = W;
  for (int64_t a = j.w, b = W; b != 0;) {  // items per multiple of W columns: W / gcd(w, W)
    const int64_t t = a % b;
    a = b;
    b = t;
    step = W / a;
  }
  const int64_t chunk = step * std::max<int64_t>(1, kChunkColumns / (step * j.w));
  std::vector<T> fac(j.nq);
  for (int64_t c = 0; c < j.nc; ++c) {
    const Panel<T> P(j, c);
    for (int64_t q0 = 0; q0 < j.nq; q0 += chunk) {
      const int64_t q1 = std::min(j.nq, q0 + chunk);
      logits_softmax(P, q0, q1, fac.data());
      attend(P, q0, q1);
      backward(P, q0, q1);
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

// In-register transpose of a square of W x W lanes: log2(W) stages; stage b swaps the
// off-diagonal b x b blocks of every pair of rows i, i + b (i without bit b), two shuffles a pair.
// Output lane l of the pair's first row: a[l] when l lacks bit b, else c[l - b]; of its second
// row: a[l + b] when l lacks bit b, else c[l] (indices into the concatenation a, c).
constexpr int transpose_lo(int W, int b, int l) { return (l & b) ? W + l - b : l; }
constexpr int transpose_hi(int W, int b, int l) { return (l & b) ? W + l : l + b; }
template <typename V, int W, int b, size_t... l>
inline void transpose_stage(V* r, std::index_sequence<l...>) {
  for (int i = 0; i < W; ++i) {
    if (i & b) continue;
    const V a = r[i], c = r[i + b];
    r[i] = __builtin_shufflevector(a, c, transpose_lo(W, b, int(l))...);
    r[i + b] = __builtin_shufflevector(a, c, transpose_hi(W, b, int(l))...);
  }
}
template <typename V, int b = Lanes<V>::W / 2>
inline void transpose_lanes(V* r) {
  constexpr int W = Lanes<V>::W;
  transpose_stage<V, W, b>(r, std::make_index_sequence<W>{});
  if constexpr (b > 1) transpose_lanes<V, b / 2>(r);
}

// dst (cols x rows, row stride ldd) = (or +=) src (rows x cols, row stride lds) transposed: squares
// of W x W lanes in registers, the ragged edges element by element.
template <typename T>
void transpose(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t rows, int64_t cols, bool add) {
  using V = typename HostLanes<T>::V;
  using Ln = Lanes<V>;
  constexpr int64_t W = Ln::W;
  const int64_t r1 = rows / W * W, c1 = cols / W * W;
  V r[W];
  for (int64_t i0 = 0; i0 < r1; i0 += W) {
    for (int64_t j0 = 0; j0 < c1; j0 += W) {
      for (int64_t i = 0; i < W; ++i) r[i] = Ln::load(src + (i0 + i) * lds + j0);
      transpose_lanes(r);
      for (int64_t j = 0; j < W; ++j) {
        T* o = dst + (j0 + j) * ldd + i0;
        Ln::store(o, add ? Ln::load(o) + r[j] : r[j]);
      }
    }
  }
  auto edge = [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T* o = dst + j * ldd;
      for (int64_t i = i0; i < i1; ++i) o[i] = add ? o[i] + src[i * lds + j] : src[i * lds + j];
    }
  };
  edge(0, r1, c1, cols);
  edge(r1, rows, 0, cols);
}

}  // namespace cpu
}  // namespace mefn

#endif  // MEFN_XATTN_CPU_EPILOGUE_
