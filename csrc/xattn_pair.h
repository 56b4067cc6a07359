// Per-pair math of the cross-attention similarity (``docs/math.md``, section 1), shared by the CPU op
// (csrc/xattn_similarity.cpp) and the CUDA op (csrc/cuda/).
//
// One "pair" is one context (n rows) attended by one query (m rows). The caller supplies the
// pair's cosine tile S already restricted to the valid rows and laid out context-major,
// S[r * m + k] = cos(context row r, query row k), and the context's Gram matrix G (n x n valid
// part, row stride gld). Everything here is plain arithmetic on caller-owned buffers: no
// allocation, no library calls, so the same code runs on the host and (under nvcc) on the device.
//
// Forward (pair_forward), for every query position k:
//   E_rk   = S_rk                                    (attn_norm "none")
//          = P_rk / (sqrt(sum_k' P_rk'^2) + 1e-8),   P = leaky_relu(S, 0.1)   ("clipped_l2norm")
//   L_rk   = lambda * E_rk,   A_rk = softmax_r(L_rk),  lse_k = logsumexp_r(L_rk)
//   H_k    = -sum_r A_rk log A_rk = log(sum_r e_r) + sum_r e_r (max - L_rk) / sum_r e_r,
//            e_r = exp(L_rk - max_r L_rk)  (log domain: no log of an underflowed A)
//   R_k    = (sum_r A_rk S_rk) / sqrt(max(A_k^T G A_k, 1e-16))   (Gram form)
//   w      = softmax_k(-(H_k / log n) / tau) (mfe) or 1/m,  score = sum_k w_k R_k (mean)
//            or (log m + logsumexp_k(log w_k + lambda_lse R_k)) / lambda_lse (lse).
// Backward (pair_backward) recomputes the forward and returns dScore/dS (times the upstream
// gradient g) in the same context-major layout, and optionally accumulates dScore/dG.
//
// Layout of this header: the types and constants are defined once; the math functions below them
// may be compiled a second time inside another namespace (define MEFN_XATTN_PAIR_REINCLUDE and
// include again): the CPU op does so under `#pragma GCC target("avx2,fma")` and picks the copy at
// run time (csrc/xattn_similarity.cpp).
#ifndef MEFN_XATTN_PAIR_H_
#define MEFN_XATTN_PAIR_H_

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define MEFN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MEFN_HOST_DEVICE inline
#endif

namespace mefn {

// Which scores a call computes: text-to-image, image-to-text, or their mean (docs/math.md, directions).
enum Direction { kT2I = 0, kI2T = 1, kBoth = 2 };

// Constants of the per-pair function (docs/math.md; identical to mefn_fast/backends/reference.py).
constexpr double kNormEps = 1e-12;             // F.normalize's eps (2.1)
constexpr double kClipEps = 1e-8;              // clipped_l2norm's eps (2.3)
constexpr double kAttendedNormSqEps = 1e-16;   // floor of A^T G A (2.5)
constexpr double kLeakySlope = 0.1;            // leaky_relu slope of clipped_l2norm (2.3)

// Options of one direction, in the compute type.
template <typename T>
struct PairParams {
  T lambda;        // softmax inverse temperature of this direction
  bool clipped;    // attn_norm == "clipped_l2norm"
  bool mfe;        // entropy-aware weights
  T tau;           // their temperature
  bool agg_lse;    // agg == "lse"
  T lambda_lse;
};

// Caller-owned scratch for one pair of at most n_max x m_max:
//   A, GA, At: n*m each; rho, drho, rc: n each; m-vectors: see the fields.
template <typename T>
struct PairWork {
  T* A;     // attention, context-major A[r*m + k]
  T* GA;    // (G A)[r*m + k]; reused by the backward as dA, then dE
  T* At;    // backward scratch: A transposed (query-major), for the dG outer products
  T* rho;   // clipped_l2norm row norms sqrt(sum_k P_rk^2)
  T* drho;  // backward scratch (per context row)
  T* rc;    // backward scratch: 1/(rho + eps)
  T* mx;    // max_r L_rk, then 1/sum_r e_r
  T* sum;   // sum_r e_r
  T* t;     // sum_r e_r (max - L_rk)
  T* lse;   // logsumexp_r L_rk
  T* H;     // query entropies
  T* num;   // sum_r A_rk S_rk
  T* u;     // A_k^T G A_k
  T* R;     // attended cosine
  T* logw;  // log of the aggregation weights
  T* dR;    // backward: dScore/dR, then dScore/dnum
  T* dH;    // backward: dScore/dlog w, then dScore/dH
  T* du;    // backward: dScore/du
  T* dot;   // backward: sum_r A_rk dA_rk
};

constexpr int64_t kPairMVectors = 13;

// Number of T elements a PairWork needs for pairs up to n_max x m_max.
MEFN_HOST_DEVICE int64_t pair_work_size(int64_t n_max, int64_t m_max) {
  return 3 * n_max * m_max + 3 * n_max + kPairMVectors * m_max;
}

template <typename T>
MEFN_HOST_DEVICE PairWork<T> pair_work_from(T* base, int64_t n_max, int64_t m_max) {
  PairWork<T> w;
  T** mats[] = {&w.A, &w.GA, &w.At};
  for (T** p : mats) { *p = base; base += n_max * m_max; }
  T** rows[] = {&w.rho, &w.drho, &w.rc};
  for (T** p : rows) { *p = base; base += n_max; }
  T** vecs[kPairMVectors] = {&w.mx, &w.sum, &w.t, &w.lse, &w.H, &w.num, &w.u, &w.R, &w.logw, &w.dR, &w.dH, &w.du, &w.dot};
  for (T** p : vecs) { *p = base; base += m_max; }
  return w;
}

}  // namespace mefn

#endif  // MEFN_XATTN_PAIR_H_

#if !defined(MEFN_XATTN_PAIR_MATH_) || defined(MEFN_XATTN_PAIR_REINCLUDE)
#ifndef MEFN_XATTN_PAIR_REINCLUDE
#define MEFN_XATTN_PAIR_MATH_
#endif

namespace mefn {

MEFN_HOST_DEVICE float m_exp(float x) { return expf(x); }
MEFN_HOST_DEVICE double m_exp(double x) { return exp(x); }
MEFN_HOST_DEVICE float m_log(float x) { return logf(x); }
MEFN_HOST_DEVICE double m_log(double x) { return log(x); }
MEFN_HOST_DEVICE float m_sqrt(float x) { return sqrtf(x); }
MEFN_HOST_DEVICE double m_sqrt(double x) { return sqrt(x); }
template <typename T> MEFN_HOST_DEVICE T m_max(T a, T b) { return a > b ? a : b; }

// leaky_relu(s, 0.1) as max(s, 0.1 s): both operands are always computed, so loops using it
// vectorise (a compiler may not speculate s * 0.1 behind a branch under the default
// -ftrapping-math). Bitwise equal to torch's s > 0 ? s : s * 0.1.
template <typename T>
MEFN_HOST_DEVICE T leaky(T s) { return m_max(s, s * T(kLeakySlope)); }

// sum_k x_k y_k over a contiguous row with four independent accumulators (fixed order).
template <typename T>
MEFN_HOST_DEVICE T row_dot(const T* x, const T* y, int64_t m) {
  T a0 = T(0), a1 = T(0), a2 = T(0), a3 = T(0);
  int64_t k = 0;
  for (; k + 4 <= m; k += 4) {
    a0 += x[k] * y[k];
    a1 += x[k + 1] * y[k + 1];
    a2 += x[k + 2] * y[k + 2];
    a3 += x[k + 3] * y[k + 3];
  }
  for (; k < m; ++k) a0 += x[k] * y[k];
  return (a0 + a1) + (a2 + a3);
}

// sum_k leaky(x_k)^2 over a contiguous row, likewise.
template <typename T>
MEFN_HOST_DEVICE T row_leaky_sq(const T* x, int64_t m) {
  T a0 = T(0), a1 = T(0), a2 = T(0), a3 = T(0);
  int64_t k = 0;
  for (; k + 4 <= m; k += 4) {
    const T q0 = leaky(x[k]), q1 = leaky(x[k + 1]), q2 = leaky(x[k + 2]), q3 = leaky(x[k + 3]);
    a0 += q0 * q0;
    a1 += q1 * q1;
    a2 += q2 * q2;
    a3 += q3 * q3;
  }
  for (; k < m; ++k) {
    const T q = leaky(x[k]);
    a0 += q * q;
  }
  return (a0 + a1) + (a2 + a3);
}

// Forward of one pair; S is context-major (S[r*m + k] = cos(context r, query k)), G the context's
// Gram matrix (row stride gld). Fills w and returns the score. The inner loops run over the query
// positions k, elementwise, so that they vectorise (no reductions in them).
template <typename T>
MEFN_HOST_DEVICE T pair_forward(const T* S, const T* G, int64_t gld, int64_t n, int64_t m,
                                const PairParams<T>& p, PairWork<T>& w) {
  const T lam = p.lambda;
  if (p.clipped) {
    for (int64_t r = 0; r < n; ++r) w.rho[r] = m_sqrt(row_leaky_sq(S + r * m, m));
  }
  // logits L = lambda E into A, and their max over the context rows
  for (int64_t r = 0; r < n; ++r) {
    const T* Sr = S + r * m;
    T* Ar = w.A + r * m;
    if (p.clipped) {
      const T den = w.rho[r] + T(kClipEps);
      for (int64_t k = 0; k < m; ++k) Ar[k] = lam * (leaky(Sr[k]) / den);
    } else {
      for (int64_t k = 0; k < m; ++k) Ar[k] = lam * Sr[k];
    }
    if (r == 0) {
      for (int64_t k = 0; k < m; ++k) w.mx[k] = Ar[k];
    } else {
      for (int64_t k = 0; k < m; ++k) w.mx[k] = m_max(w.mx[k], Ar[k]);
    }
  }
  // softmax over the context rows, in the log domain
  for (int64_t k = 0; k < m; ++k) { w.sum[k] = T(0); w.t[k] = T(0); }
  for (int64_t r = 0; r < n; ++r) {
    T* Ar = w.A + r * m;
    for (int64_t k = 0; k < m; ++k) {
      const T d = w.mx[k] - Ar[k];
      const T e = m_exp(-d);
      w.t[k] += e * d;
      w.sum[k] += e;
      Ar[k] = e;
    }
  }
  for (int64_t k = 0; k < m; ++k) {
    const T inv = T(1) / w.sum[k];
    const T log_sum = m_log(w.sum[k]);
    w.lse[k] = w.mx[k] + log_sum;
    w.H[k] = log_sum + w.t[k] * inv;
    w.mx[k] = inv;
    w.num[k] = T(0);
    w.u[k] = T(0);
  }
  for (int64_t r = 0; r < n; ++r) {
    T* Ar = w.A + r * m;
    const T* Sr = S + r * m;
    for (int64_t k = 0; k < m; ++k) {
      Ar[k] *= w.mx[k];
      w.num[k] += Ar[k] * Sr[k];
    }
  }
  // Gram form: u_k = A_k^T G A_k, with GA = G A
  for (int64_t r = 0; r < n; ++r) {
    T* GAr = w.GA + r * m;
    const T* Gr = G + r * gld;
    for (int64_t k = 0; k < m; ++k) GAr[k] = T(0);
    for (int64_t s = 0; s < n; ++s) {
      const T g = Gr[s];
      const T* As = w.A + s * m;
      for (int64_t k = 0; k < m; ++k) GAr[k] += g * As[k];
    }
    const T* Ar = w.A + r * m;
    for (int64_t k = 0; k < m; ++k) w.u[k] += Ar[k] * GAr[k];
  }
  for (int64_t k = 0; k < m; ++k) w.R[k] = w.num[k] / m_sqrt(m_max(w.u[k], T(kAttendedNormSqEps)));
  // entropy-aware weights over the query positions
  if (p.mfe) {
    const T log_n = n > 1 ? m_log(T(n)) : T(1);
    T mx = T(0);
    for (int64_t k = 0; k < m; ++k) {
      const T h_norm = n > 1 ? w.H[k] / log_n : T(0);
      w.logw[k] = -h_norm / p.tau;
      mx = k == 0 ? w.logw[k] : m_max(mx, w.logw[k]);
    }
    T sum = T(0);
    for (int64_t k = 0; k < m; ++k) sum += m_exp(w.logw[k] - mx);
    const T lse = mx + m_log(sum);
    for (int64_t k = 0; k < m; ++k) w.logw[k] -= lse;
  } else {
    const T lw = -m_log(T(m));
    for (int64_t k = 0; k < m; ++k) w.logw[k] = lw;
  }
  if (!p.agg_lse) {
    T s = T(0);
    for (int64_t k = 0; k < m; ++k) s += m_exp(w.logw[k]) * w.R[k];
    return s;
  }
  T mx = w.logw[0] + p.lambda_lse * w.R[0];
  for (int64_t k = 1; k < m; ++k) mx = m_max(mx, w.logw[k] + p.lambda_lse * w.R[k]);
  T sum = T(0);
  for (int64_t k = 0; k < m; ++k) sum += m_exp(w.logw[k] + p.lambda_lse * w.R[k] - mx);
  return (m_log(T(m)) + (mx + m_log(sum))) / p.lambda_lse;
}

// Backward of one pair for an upstream gradient g of its score. Writes dS (context-major, n x m,
// overwritten) and, when dG is not null, accumulates dScore/dG into dG (row stride dgld).
// Recomputes the forward first, so w needs no state from an earlier call.
template <typename T>
MEFN_HOST_DEVICE void pair_backward(T g, const T* S, const T* G, int64_t gld, int64_t n, int64_t m,
                                    const PairParams<T>& p, PairWork<T>& w, T* dS, T* dG, int64_t dgld) {
  (pair_forward<T>)(S, G, gld, n, m, p, w);  // parenthesised: no ADL into another copy of this header
  const T lam = p.lambda;
  // aggregation: dR_k and dScore/dlog w_k (kept in dH for now)
  if (p.agg_lse) {
    T mx = w.logw[0] + p.lambda_lse * w.R[0];
    for (int64_t k = 1; k < m; ++k) mx = m_max(mx, w.logw[k] + p.lambda_lse * w.R[k]);
    T sum = T(0);
    for (int64_t k = 0; k < m; ++k) sum += m_exp(w.logw[k] + p.lambda_lse * w.R[k] - mx);
    const T lse = mx + m_log(sum);
    for (int64_t k = 0; k < m; ++k) {
      const T pk = m_exp(w.logw[k] + p.lambda_lse * w.R[k] - lse);
      w.dR[k] = g * pk;
      w.dH[k] = g * pk / p.lambda_lse;
    }
  } else {
    for (int64_t k = 0; k < m; ++k) {
      const T wk = m_exp(w.logw[k]);
      w.dR[k] = g * wk;
      w.dH[k] = g * wk * w.R[k];
    }
  }
  // weights: log w = log_softmax(-H / (tau log n)) -> dH_k
  if (p.mfe && n > 1) {
    T sum = T(0);
    for (int64_t k = 0; k < m; ++k) sum += w.dH[k];
    const T c = T(-1) / (p.tau * m_log(T(n)));
    for (int64_t k = 0; k < m; ++k) w.dH[k] = c * (w.dH[k] - m_exp(w.logw[k]) * sum);
  } else {
    for (int64_t k = 0; k < m; ++k) w.dH[k] = T(0);
  }
  // R_k = num_k / sqrt(u_k): dnum (kept in dR) and du
  for (int64_t k = 0; k < m; ++k) {
    const T u = w.u[k], dR = w.dR[k];
    w.du[k] = u > T(kAttendedNormSqEps) ? T(-0.5) * dR * w.R[k] / u : T(0);
    w.dR[k] = dR / m_sqrt(m_max(u, T(kAttendedNormSqEps)));
    w.dot[k] = T(0);
  }
  // dA = dnum S + 2 du G A (into GA), and sum_r A_rk dA_rk
  for (int64_t r = 0; r < n; ++r) {
    const T* Sr = S + r * m;
    const T* Ar = w.A + r * m;
    T* Dr = w.GA + r * m;
    for (int64_t k = 0; k < m; ++k) {
      const T dA = w.dR[k] * Sr[k] + T(2) * w.du[k] * Dr[k];
      Dr[k] = dA;
      w.dot[k] += Ar[k] * dA;
    }
  }
  if (dG != nullptr) {  // dG += sum_k du_k A_k A_k^T, as outer products over contiguous rows of A^T
    for (int64_t r = 0; r < n; ++r)
      for (int64_t k = 0; k < m; ++k) w.At[k * n + r] = w.A[r * m + k];
    for (int64_t k = 0; k < m; ++k) {
      if (w.du[k] == T(0)) continue;
      const T* Ak = w.At + k * n;
      for (int64_t r = 0; r < n; ++r) {
        const T c = w.du[k] * Ak[r];
        T* dGr = dG + r * dgld;
        for (int64_t s = 0; s < n; ++s) dGr[s] += c * Ak[s];
      }
    }
  }
  // softmax and entropy backward (dH/dL_r = -A_r (log A_r + H)), then dE = lambda dL
  for (int64_t r = 0; r < n; ++r) {
    const T* Sr = S + r * m;
    const T* Ar = w.A + r * m;
    T* Dr = w.GA + r * m;
    T* dSr = dS + r * m;
    const T den = p.clipped ? w.rho[r] + T(kClipEps) : T(1);
    for (int64_t k = 0; k < m; ++k) {
      const T L = p.clipped ? lam * (leaky(Sr[k]) / den) : lam * Sr[k];
      const T dL = Ar[k] * (Dr[k] - w.dot[k]) - w.dH[k] * Ar[k] * (L - w.lse[k] + w.H[k]);
      const T dE = lam * dL;
      dSr[k] = w.dR[k] * Ar[k];  // from num_k = sum_r A_rk S_rk
      if (p.clipped) Dr[k] = dE; else dSr[k] += dE;
    }
  }
  if (p.clipped) {
    // E_rk = P_rk / (rho_r + eps), rho_r = ||P_r.||, P = leaky_relu(S). With c = 1/(rho_r + eps),
    // P^ = P / rho_r and q_r = sum_k dE_rk P^_rk:
    //   dP_rk = c dE_rk - c^2 P_rk sum_k dE_rk P_rk / rho_r = c ((dE_rk - P^_rk q_r) + eps c P^_rk q_r),
    // the projection form, which keeps the tiny true gradient of a row with one query position
    // (E = +-1 for any P) instead of cancelling two large terms. A zero row has P^ = 0.
    // P^ = P / rho by division: for m = 1, rho = |P| exactly, so P^ = +-1, P^ q = dE and the
    // bracket cancels exactly. At (free here) holds the row's P^.
    for (int64_t r = 0; r < n; ++r) {
      const T* Sr = S + r * m;
      const T* dEr = w.GA + r * m;
      T* dSr = dS + r * m;
      const T rho = w.rho[r];
      T* Ph = w.At;
      if (rho > T(0)) {
        for (int64_t k = 0; k < m; ++k) Ph[k] = leaky(Sr[k]) / rho;
      } else {
        for (int64_t k = 0; k < m; ++k) Ph[k] = T(0);
      }
      const T q = row_dot(dEr, Ph, m);
      const T c = T(1) / (rho + T(kClipEps));
      for (int64_t k = 0; k < m; ++k) {
        const T s = Sr[k];
        const T pq = Ph[k] * q;
        const T dP = c * ((dEr[k] - pq) + T(kClipEps) * c * pq);
        dSr[k] += s > T(0) ? dP : dP * T(kLeakySlope);
      }
    }
  }
}

}  // namespace mefn

#endif  // the math functions
