// The per-pair epilogue of csrc/xattn_pair.h, one warp per pair.
//
// pair_forward / pair_backward of the shared header are sequential loops over the query positions
// k and the context rows r. Here the 32 lanes of a warp take the query positions (k = lane,
// lane + 32, ...) for the loops "for each k" and the context rows for the loops "for each r"
// (the clipped_l2norm row norms), and the sums over k become fixed-order warp reductions. Every
// formula, constant and scalar helper (leaky, m_exp/m_log/m_sqrt/m_max, the eps constants,
// PairParams) is the header's, step for step, in float (pair_logit below restates its logit
// expression); the loop bodies are the header's loop
// bodies. Only the summation order of the sums over k differs (a butterfly instead of left to right).
// The per-pair scratch layout is the header's context-major one (A[r * m + k], GA[r * m + k]).
//
// Layout: the pair's cosine sub-tile S(r, k) = S[r * sr + k * sk] lives in the block's tile (shared
// memory); t2i: (sr, sk) = (lds, 1), i2t: (1, lds). Per-warp scratch (shared or global memory):
// A and GA are context-major, A[r * m + k] (lanes over k read consecutive words).
//
// This header depends on csrc/xattn_pair.h only, so that tests/cuda_emulation/ can compile it on
// the host with the warp primitives emulated (MEFN_WARP_EMULATION) and compare it with the header's
// sequential functions without a GPU.
#pragma once

#include <math.h>
#include <stdint.h>

#include "../xattn_pair.h"

#ifndef MEFN_WARP_EMULATION
#define MEFN_WARP_FN __device__ __forceinline__
#define MEFN_WARP_BIG_FN __device__ inline  // inline linkage: defined in every .cu that includes it
#define MEFN_SYNCWARP() __syncwarp()
#define MEFN_SHFL_XOR(v, o) __shfl_xor_sync(0xffffffffu, (v), (o))
#endif

namespace mefn {
namespace cuda {

// Warp reductions (fixed butterfly: deterministic, every lane gets the result)
MEFN_WARP_FN float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += MEFN_SHFL_XOR(v, o);
  return v;
}
MEFN_WARP_FN float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, MEFN_SHFL_XOR(v, o));
  return v;
}

// Floats of per-warp scratch for pairs with up to N x M valid cells (either direction).
inline int64_t warp_work_floats(int64_t N, int64_t M, bool backward) {
  const int64_t L = N > M ? N : M;
  return (backward ? 2 : 1) * N * M + 10 * L;
}

struct PairView {
  const float* S;  // S(r, k) = S[r * sr + k * sk]
  float* dS;       // same strides (backward; accumulated into)
  int sr, sk;
  const float* G;  // context Gram matrix, row stride gld
  int gld;
  int n, m;        // valid context rows, valid query positions
};

struct WarpWork {
  float *A, *GA, *rho, *drho, *lse, *H, *num, *u, *R, *logw, *dR, *dH;
};

// Scratch of warp_work_floats(N, M, backward) floats; L = max(N, M).
MEFN_WARP_FN WarpWork warp_work_from(float* base, int N, int M, bool backward) {
  const int L = N > M ? N : M;
  WarpWork w;
  w.A = base; base += N * M;
  w.GA = backward ? base : nullptr; if (backward) base += N * M;
  w.rho = base; base += L;
  w.drho = base; base += L;
  w.lse = base; base += L;
  w.H = base; base += L;
  w.num = base; base += L;
  w.u = base; base += L;
  w.R = base; base += L;
  w.logw = base; base += L;
  w.dR = base; base += L;
  w.dH = base;
  return w;
}

MEFN_WARP_FN float pS(const PairView& P, int r, int k) { return P.S[r * P.sr + k * P.sk]; }

// The attention logit L_rk of the header: lambda * leaky(S) / (rho_r + eps) (clipped) or lambda * S.
MEFN_WARP_FN float pair_logit(float s, float rho, const PairParams<float>& p) {
  return p.clipped ? p.lambda * (leaky(s) / (rho + float(kClipEps))) : p.lambda * s;
}

// Forward of one pair (all 32 lanes call it); returns the score on every lane. Fills A, rho, lse,
// H, num, u, R, logw (and GA = G A_k when keep_ga).
MEFN_WARP_BIG_FN float warp_pair_forward(const PairView& P, const PairParams<float>& p, WarpWork& w, int lane, bool keep_ga) {
  const int n = P.n, m = P.m;
  if (p.clipped) {
    for (int r = lane; r < n; r += 32) {
      float acc = 0.f;
      for (int k = 0; k < m; ++k) {
        const float q = leaky(pS(P, r, k));
        acc += q * q;
      }
      w.rho[r] = m_sqrt(acc);
    }
    MEFN_SYNCWARP();
  }
  for (int k = lane; k < m; k += 32) {
    // softmax over the context rows, in the log domain
    float mx = pair_logit(pS(P, 0, k), p.clipped ? w.rho[0] : 0.f, p);
    for (int r = 0; r < n; ++r) {
      const float L = pair_logit(pS(P, r, k), p.clipped ? w.rho[r] : 0.f, p);
      w.A[r * m + k] = L;
      mx = m_max(mx, L);
    }
    float sum = 0.f, t = 0.f;
    for (int r = 0; r < n; ++r) {
      const float a = w.A[r * m + k];
      const float e = m_exp(a - mx);
      t += e * (mx - a);
      w.A[r * m + k] = e;
      sum += e;
    }
    const float inv = 1.f / sum;
    const float log_sum = m_log(sum);
    w.lse[k] = mx + log_sum;
    w.H[k] = log_sum + t * inv;
    float num = 0.f;
    for (int r = 0; r < n; ++r) {
      const float a = w.A[r * m + k] * inv;
      w.A[r * m + k] = a;
      num += a * pS(P, r, k);
    }
    // Gram form: GA_r = sum_s G_rs A_s, u = sum_r A_r GA_r. The forward alone needs only u, and G
    // is symmetric: u = 2 sum_r A_r (G_rr A_r / 2 + sum_{s<r} G_rs A_s), half the products.
    float u = 0.f;
    if (keep_ga) {
      for (int r = 0; r < n; ++r) {
        float ga = 0.f;
        for (int s = 0; s < n; ++s) ga += P.G[r * P.gld + s] * w.A[s * m + k];
        w.GA[r * m + k] = ga;
        u += w.A[r * m + k] * ga;
      }
    } else {
      for (int r = 0; r < n; ++r) {
        const float ar = w.A[r * m + k];
        const float* Gr = P.G + r * P.gld;
        // four independent partial sums (instruction-level parallelism in the hottest loop)
        float t0 = 0.5f * Gr[r] * ar, t1 = 0.f, t2 = 0.f, t3 = 0.f;
        int s = 0;
        for (; s + 4 <= r; s += 4) {
          t0 += Gr[s] * w.A[s * m + k];
          t1 += Gr[s + 1] * w.A[(s + 1) * m + k];
          t2 += Gr[s + 2] * w.A[(s + 2) * m + k];
          t3 += Gr[s + 3] * w.A[(s + 3) * m + k];
        }
        for (; s < r; ++s) t0 += Gr[s] * w.A[s * m + k];
        u += ar * ((t0 + t1) + (t2 + t3));
      }
      u *= 2.f;
    }
    w.num[k] = num;
    w.u[k] = u;
    w.R[k] = num / m_sqrt(m_max(u, float(kAttendedNormSqEps)));
  }
  // entropy-aware weights over the query positions (each lane touches its own k)
  if (p.mfe) {
    const float log_n = n > 1 ? m_log(float(n)) : 1.f;
    float mx = -INFINITY;
    for (int k = lane; k < m; k += 32) {
      const float h_norm = n > 1 ? w.H[k] / log_n : 0.f;
      w.logw[k] = -h_norm / p.tau;
      mx = m_max(mx, w.logw[k]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
    for (int k = lane; k < m; k += 32) sum += m_exp(w.logw[k] - mx);
    sum = warp_sum(sum);
    const float lse = mx + m_log(sum);
    for (int k = lane; k < m; k += 32) w.logw[k] -= lse;
  } else {
    const float lw = -m_log(float(m));
    for (int k = lane; k < m; k += 32) w.logw[k] = lw;
  }
  float score;
  if (!p.agg_lse) {
    float s = 0.f;
    for (int k = lane; k < m; k += 32) s += m_exp(w.logw[k]) * w.R[k];
    score = warp_sum(s);
  } else {
    float mx = -INFINITY;
    for (int k = lane; k < m; k += 32) mx = m_max(mx, w.logw[k] + p.lambda_lse * w.R[k]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int k = lane; k < m; k += 32) sum += m_exp(w.logw[k] + p.lambda_lse * w.R[k] - mx);
    sum = warp_sum(sum);
    score = (m_log(float(m)) + (mx + m_log(sum))) / p.lambda_lse;
  }
  MEFN_SYNCWARP();
  return score;
}

// Backward of one pair for the upstream gradient g of its score (all 32 lanes call it): ADDS
// dScore/dS into P.dS and, when dG is not null, dScore/dG into dG (row stride dgld). Recomputes the
// forward first.
MEFN_WARP_BIG_FN void warp_pair_backward(float g, const PairView& P, const PairParams<float>& p, WarpWork& w, int lane,
                                   float* dG, int dgld) {
  warp_pair_forward(P, p, w, lane, true);
  const int n = P.n, m = P.m;
  // aggregation: dR_k and dScore/dlog w_k (kept in dH for now)
  if (p.agg_lse) {
    float mx = -INFINITY;
    for (int k = lane; k < m; k += 32) mx = m_max(mx, w.logw[k] + p.lambda_lse * w.R[k]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int k = lane; k < m; k += 32) sum += m_exp(w.logw[k] + p.lambda_lse * w.R[k] - mx);
    sum = warp_sum(sum);
    const float lse = mx + m_log(sum);
    for (int k = lane; k < m; k += 32) {
      const float pk = m_exp(w.logw[k] + p.lambda_lse * w.R[k] - lse);
      w.dR[k] = g * pk;
      w.dH[k] = g * pk / p.lambda_lse;
    }
  } else {
    for (int k = lane; k < m; k += 32) {
      const float wk = m_exp(w.logw[k]);
      w.dR[k] = g * wk;
      w.dH[k] = g * wk * w.R[k];
    }
  }
  // weights: log w = log_softmax(-H / (tau log n)) -> dH_k
  if (p.mfe && n > 1) {
    float sum = 0.f;
    for (int k = lane; k < m; k += 32) sum += w.dH[k];
    sum = warp_sum(sum);
    const float c = -1.f / (p.tau * m_log(float(n)));
    for (int k = lane; k < m; k += 32) w.dH[k] = c * (w.dH[k] - m_exp(w.logw[k]) * sum);
  } else {
    for (int k = lane; k < m; k += 32) w.dH[k] = 0.f;
  }
  for (int k = lane; k < m; k += 32) {
    const float u = w.u[k];
    const float dR = w.dR[k];
    const float dnum = dR / m_sqrt(m_max(u, float(kAttendedNormSqEps)));
    const float du = u > float(kAttendedNormSqEps) ? -0.5f * dR * w.R[k] / u : 0.f;
    float dot = 0.f;
    for (int r = 0; r < n; ++r) {
      const float dA = dnum * pS(P, r, k) + 2.f * du * w.GA[r * m + k];  // GA_k becomes dA_k, then dE_k
      w.GA[r * m + k] = dA;
      dot += w.A[r * m + k] * dA;
    }
    w.num[k] = du;  // num is not needed any more: keep du for dG
    const float lse = w.lse[k], Hk = w.H[k], dHk = w.dH[k];
    for (int r = 0; r < n; ++r) {
      const float s = pS(P, r, k);
      const float a = w.A[r * m + k];
      const float L = pair_logit(s, p.clipped ? w.rho[r] : 0.f, p);
      // softmax backward, plus the entropy's: dH/dL_r = -A_r (log A_r + H)
      const float dL = a * (w.GA[r * m + k] - dot) - dHk * a * (L - lse + Hk);
      const float dE = p.lambda * dL;
      float v = dnum * a;  // from num_k = sum_r A_rk S_rk
      if (p.clipped) w.GA[r * m + k] = dE; else v += dE;
      P.dS[r * P.sr + k * P.sk] += v;
    }
  }
  MEFN_SYNCWARP();
  if (dG != nullptr) {
    // dG_rs += sum_k du_k A_rk A_sk (lanes over the entries (r, s))
    for (int e = lane; e < n * n; e += 32) {
      const int r = e / n, s = e % n;
      float acc = 0.f;
      for (int k = 0; k < m; ++k) acc += w.num[k] * w.A[r * m + k] * w.A[s * m + k];
      dG[r * dgld + s] += acc;
    }
  }
  if (p.clipped) {
    // E_rk = P_rk / (rho_r + eps), rho_r = ||P_r.||, P = leaky_relu(S). With c = 1/(rho_r + eps),
    // P^ = P / rho_r and q_r = sum_k dE_rk P^_rk (the header's projection form):
    //   dP_rk = c ((dE_rk - P^_rk q_r) + eps c P^_rk q_r). A zero row has q = 0.
    for (int r = lane; r < n; r += 32) {
      float acc = 0.f;
      for (int k = 0; k < m; ++k) acc += w.GA[r * m + k] * leaky(pS(P, r, k));
      const float inv_rho = w.rho[r] > 0.f ? 1.f / w.rho[r] : 0.f;
      const float q = acc * inv_rho;
      const float c = 1.f / (w.rho[r] + float(kClipEps));
      w.drho[r] = inv_rho * q;  // a_r: P^_rk q_r = leaky(S_rk) a_r
      w.rho[r] = c;
    }
    MEFN_SYNCWARP();
    for (int k = lane; k < m; k += 32) {
      for (int r = 0; r < n; ++r) {
        const float s = pS(P, r, k);
        const float c = w.rho[r];
        const float pq = leaky(s) * w.drho[r];
        const float dP = c * ((w.GA[r * m + k] - pq) + float(kClipEps) * c * pq);
        P.dS[r * P.sr + k * P.sk] += s > 0.f ? dP : dP * float(kLeakySlope);
      }
    }
  }
  MEFN_SYNCWARP();
}

}  // namespace cuda
}  // namespace mefn
