// The bodies of the CUDA kernels of the xattn_similarity ops, as block-level functions (one call per
// thread of a block): csrc/cuda/xattn_{prep,fwd,bwd}.cu wrap each in a __global__ kernel, and
// tests/cuda_emulation/ runs them on the host (float32, threads emulating the block) to check the
// whole pipeline against the reference without a GPU.
//
//   inverse_norms_block  1 / max(|x_row|, eps), one warp per row (0 for padded rows)
//   gram_block           G_b = X^_b X^_b^T of one item (tile_product of the item with itself)
//   fwd_block            forward: persistent over the tiles (image block x caption block); the
//                        cosine tile in shared memory, then one warp per pair runs the per-pair
//                        epilogue for t2i and/or i2t and writes the pair's score
//   bwd_block            backward pass owned by an image block (kOwnImages) or a caption block: walks
//                        the other side's blocks in order, recomputes the tile, accumulates every
//                        pair's dS (both directions) into a dS tile, folds the other side's inverse
//                        norms in, and adds dS x_other to its own rows of a float accumulator with
//                        fp32 FMA in a fixed order; per-warp Gram gradients are reduced over the
//                        warps in a fixed order at the end
//   finalize_block       per row: Gram term 2 dG R^, then the normalisation backward, in dtype T
// No atomics anywhere: every output element has one owner that sums in a fixed order, so the
// results are bitwise identical from run to run.
#pragma once

#include "xattn_tile.cuh"

#ifndef MEFN_WARP_EMULATION
#define MEFN_BLOCK_FN __device__ __forceinline__
#endif

namespace mefn {
namespace cuda {

constexpr int kRowGroup = 8;  // owner rows per register group in the gradient accumulation

// 1 / max(||x_row||, eps) per row, one warp per row; 0 for padded rows.
template <typename T>
MEFN_BLOCK_FN void inverse_norms_block(const T* __restrict__ x, const int64_t* __restrict__ len, int64_t rows, int L,
                                       int64_t d, float* __restrict__ inv) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  if (row % L >= len[row / L]) {
    if (lane == 0) inv[row] = 0.f;
    return;
  }
  const T* xr = x + row * d;
  float ss = 0.f;
  for (int64_t j = lane; j < d; j += 32) {
    const float v = to_float(xr[j]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) inv[row] = 1.f / m_max(m_sqrt(ss), float(kNormEps));
}

// G[b] = X^_b X^_b^T for one item per block, written straight to global memory (row stride Lp).
template <typename T>
MEFN_BLOCK_FN void gram_block(const T* __restrict__ x, const int64_t* __restrict__ len, const float* __restrict__ inv,
                              int L, int64_t d, int Lp, bool vec, float* __restrict__ G, unsigned char* smem_raw) {
  constexpr int LD = Stage<T>::LD;
  const int64_t b = blockIdx.x;
  T* stage = reinterpret_cast<T*>(smem_raw);
  float* masks = reinterpret_cast<float*>(smem_raw + region_bytes(Lp, Lp, sizeof(T), LD, true, 0));
  Side<T> s{x, len, inv, b, 1, L, vec};
  tile_product(s, s, Lp, Lp, d, G + b * Lp * Lp, Lp, stage, masks, masks + Lp, masks + 2 * Lp, masks + 3 * Lp);
}

template <typename T>
MEFN_BLOCK_FN void fwd_block(const Problem<T>& P, T* __restrict__ scores, unsigned char* smem_raw) {
  constexpr int LD = Stage<T>::LD;
  const size_t rbytes = region_bytes(P.rp, P.cp, sizeof(T), LD, P.work_global, P.work_per_warp);
  Smem sm = carve_smem(smem_raw, P.rp, P.cp, P.lds, false, rbytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* wbase = P.work_global ? P.work + (int64_t(blockIdx.x) * kWarps + warp) * P.work_per_warp
                               : reinterpret_cast<float*>(sm.region) + warp * P.work_per_warp;
  WarpWork ww = warp_work_from(wbase, P.N, P.M, false);
  const int64_t ntiles = P.nI * P.nT;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t I = tile / P.nT, Tb = tile % P.nT;
    const int64_t i0 = I * P.BI, t0 = Tb * P.BT;
    const int ni = static_cast<int>(P.B_img - i0 < P.BI ? P.B_img - i0 : P.BI);
    const int nt = static_cast<int>(P.B_txt - t0 < P.BT ? P.B_txt - t0 : P.BT);
    Side<T> X{P.regions, P.rl, P.rinv, i0, ni, P.N, P.vec_regions};
    Side<T> W{P.words, P.wl, P.winv, t0, nt, P.M, P.vec_words};
    tile_product(X, W, P.rp, P.cp, P.d, sm.S, P.lds, reinterpret_cast<T*>(sm.region), sm.xs, sm.xv, sm.ws, sm.wv);
    for (int pr = warp; pr < ni * nt; pr += kWarps) {
      const int ii = pr / nt, tt = pr % nt;
      const int64_t i = i0 + ii, t = t0 + tt;
      const int n_img = static_cast<int>(P.rl[i]), n_txt = static_cast<int>(P.wl[t]);
      const float* sub = sm.S + ii * P.N * P.lds + tt * P.M;
      float s_t2i = 0.f, s_i2t = 0.f;
      if (P.direction != kI2T) {
        PairView v{sub, nullptr, P.lds, 1, P.G_img + i * P.gld_img * P.gld_img, P.gld_img, n_img, n_txt};
        s_t2i = warp_pair_forward(v, P.pt, ww, lane, false);
      }
      if (P.direction != kT2I) {
        PairView v{sub, nullptr, 1, P.lds, P.G_txt + t * P.gld_txt * P.gld_txt, P.gld_txt, n_txt, n_img};
        s_i2t = warp_pair_forward(v, P.pi, ww, lane, false);
      }
      if (lane == 0) {
        const float s = P.direction == kT2I ? s_t2i : P.direction == kI2T ? s_i2t : 0.5f * (s_t2i + s_i2t);
        scores[i * P.B_txt + t] = from_float<T>(s);
      }
    }
    // the next tile_product starts with MEFN_SYNCTHREADS(), so the tile is not overwritten early
  }
}

template <typename T, bool kOwnImages>
MEFN_BLOCK_FN void bwd_block(const Problem<T>& P, const float* __restrict__ grad, float* __restrict__ acc,
                             float* __restrict__ dGpart, float* __restrict__ dGtot, unsigned char* smem_raw) {
  constexpr int LD = Stage<T>::LD;
  const size_t rbytes = region_bytes(P.rp, P.cp, sizeof(T), LD, P.work_global, P.work_per_warp);
  Smem sm = carve_smem(smem_raw, P.rp, P.cp, P.lds, true, rbytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* wbase = P.work_global ? P.work + (int64_t(blockIdx.x) * kWarps + warp) * P.work_per_warp
                               : reinterpret_cast<float*>(sm.region) + warp * P.work_per_warp;
  WarpWork ww = warp_work_from(wbase, P.N, P.M, true);

  const int64_t ob = blockIdx.x;
  const int64_t n_other = kOwnImages ? P.nT : P.nI;
  const int L_own = kOwnImages ? P.N : P.M;
  const int max_own = kOwnImages ? P.BI : P.BT;
  // the direction whose context is the owner side contributes Gram gradients here
  const bool own_gram = kOwnImages ? P.direction != kI2T : P.direction != kT2I;
  const int64_t part_stride = int64_t(max_own) * L_own * L_own;
  float* my_dG = own_gram ? dGpart + (int64_t(blockIdx.x) * kWarps + warp) * part_stride : nullptr;
  const float scale = P.direction == kBoth ? 0.5f : 1.f;

  for (int64_t ot = 0; ot < n_other; ++ot) {
    const int64_t I = kOwnImages ? ob : ot, Tb = kOwnImages ? ot : ob;
    const int64_t i0 = I * P.BI, t0 = Tb * P.BT;
    const int ni = static_cast<int>(P.B_img - i0 < P.BI ? P.B_img - i0 : P.BI);
    const int nt = static_cast<int>(P.B_txt - t0 < P.BT ? P.B_txt - t0 : P.BT);
    Side<T> X{P.regions, P.rl, P.rinv, i0, ni, P.N, P.vec_regions};
    Side<T> W{P.words, P.wl, P.winv, t0, nt, P.M, P.vec_words};
    tile_product(X, W, P.rp, P.cp, P.d, sm.S, P.lds, reinterpret_cast<T*>(sm.region), sm.xs, sm.xv, sm.ws, sm.wv);
    for (int idx = threadIdx.x; idx < P.rp * P.lds; idx += kThreads) sm.dS[idx] = 0.f;
    MEFN_SYNCTHREADS();
    for (int pr = warp; pr < ni * nt; pr += kWarps) {
      const int ii = pr / nt, tt = pr % nt;
      const int64_t i = i0 + ii, t = t0 + tt;
      const float g = grad[i * P.B_txt + t];
      if (g == 0.f) continue;  // contributes exactly nothing (as in the CPU kernel)
      const int n_img = static_cast<int>(P.rl[i]), n_txt = static_cast<int>(P.wl[t]);
      const int off = ii * P.N * P.lds + tt * P.M;
      if (P.direction != kI2T) {
        PairView v{sm.S + off, sm.dS + off, P.lds, 1, P.G_img + i * P.gld_img * P.gld_img, P.gld_img, n_img, n_txt};
        warp_pair_backward(scale * g, v, P.pt, ww, lane, kOwnImages ? my_dG + ii * P.N * P.N : nullptr, P.N);
      }
      if (P.direction != kT2I) {
        PairView v{sm.S + off, sm.dS + off, 1, P.lds, P.G_txt + t * P.gld_txt * P.gld_txt, P.gld_txt, n_txt, n_img};
        warp_pair_backward(scale * g, v, P.pi, ww, lane, kOwnImages ? nullptr : my_dG + tt * P.M * P.M, P.M);
      }
    }
    MEFN_SYNCTHREADS();
    // fold the other side's inverse norms (0 on padded rows) into dS
    for (int idx = threadIdx.x; idx < P.rp * P.cp; idx += kThreads) {
      const int r = idx / P.cp, c = idx % P.cp;
      sm.dS[r * P.lds + c] *= kOwnImages ? sm.ws[c] : sm.xs[r];
    }
    MEFN_SYNCTHREADS();
    // acc[owner row o] += sum_q dS(o, q) x_other[q]  (fp32 FMA, q in a fixed order)
    const int own_rows = kOwnImages ? ni * P.N : nt * P.M;
    const int oth_rows = kOwnImages ? nt * P.M : ni * P.N;
    const float* own_valid = kOwnImages ? sm.xv : sm.wv;
    const float* oth_valid = kOwnImages ? sm.wv : sm.xv;
    const T* other = kOwnImages ? P.words + t0 * P.M * P.d : P.regions + i0 * P.N * P.d;
    float* acc0 = acc + (kOwnImages ? i0 * P.N : t0 * P.M) * P.d;
    for (int og = 0; og < own_rows; og += kRowGroup) {
      for (int64_t j = threadIdx.x; j < P.d; j += kThreads) {
        float a[kRowGroup];
#pragma unroll
        for (int rr = 0; rr < kRowGroup; ++rr) a[rr] = 0.f;
        for (int q = 0; q < oth_rows; ++q) {
          if (oth_valid[q] == 0.f) continue;  // padded rows of the other side may hold NaN/Inf
          const float xv = to_float(other[q * P.d + j]);
#pragma unroll
          for (int rr = 0; rr < kRowGroup; ++rr) {
            const int o = og + rr;
            const float ds = o < own_rows ? (kOwnImages ? sm.dS[o * P.lds + q] : sm.dS[q * P.lds + o]) : 0.f;
            a[rr] = fmaf(ds, xv, a[rr]);
          }
        }
#pragma unroll
        for (int rr = 0; rr < kRowGroup; ++rr) {
          const int o = og + rr;
          if (o < own_rows && own_valid[o] != 0.f) acc0[o * P.d + j] += a[rr];
        }
      }
    }
  }
  if (own_gram) {
    MEFN_SYNCTHREADS();  // every warp's partial dG is complete
    const int64_t own0 = kOwnImages ? ob * P.BI : ob * P.BT;
    const int64_t own_items = kOwnImages ? (P.B_img - own0 < P.BI ? P.B_img - own0 : P.BI)
                                         : (P.B_txt - own0 < P.BT ? P.B_txt - own0 : P.BT);
    const float* part0 = dGpart + int64_t(blockIdx.x) * kWarps * part_stride;
    for (int64_t e = threadIdx.x; e < own_items * L_own * L_own; e += kThreads) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += part0[w * part_stride + e];
      dGtot[own0 * L_own * L_own + e] = s;
    }
  }
}

// Deterministic block sum (fixed tree); every thread gets the result.
MEFN_DEV float block_sum(float v, float* red) {
  v = warp_sum(v);
  MEFN_SYNCTHREADS();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  MEFN_SYNCTHREADS();
  float s = 0.f;
  for (int w = 0; w < kWarps; ++w) s += red[w];
  return s;
}

// One block per row of one side: Gram term, then the normalisation backward, into grad (dtype T).
template <typename T>
MEFN_BLOCK_FN void finalize_block(const T* __restrict__ x, const int64_t* __restrict__ len, const float* __restrict__ inv,
                                  const float* __restrict__ dG, int L, int64_t d, float* __restrict__ acc,
                                  T* __restrict__ grad, float* red) {
  const int64_t row = blockIdx.x, b = row / L;
  const int r = static_cast<int>(row % L);
  T* gr = grad + row * d;
  const int n = static_cast<int>(len[b]);
  if (r >= n) {
    for (int64_t j = threadIdx.x; j < d; j += kThreads) gr[j] = from_float<T>(0.f);
    return;
  }
  const float invr = inv[row];
  float* ar = acc + row * d;
  const T* xr = x + row * d;
  const float* g = dG != nullptr ? dG + row * L : nullptr;  // dG[b][r][:]
  float dot = 0.f, ss = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    float v = ar[j];
    if (g != nullptr) {
      // dR^_r += (dG + dG^T) R^ = 2 dG R^ (dG is symmetric)
      float t = 0.f;
      for (int s = 0; s < n; ++s) t += g[s] * (to_float(x[(b * L + s) * d + j]) * inv[b * L + s]);
      v += 2.f * t;
    }
    ar[j] = v;
    const float xv = to_float(xr[j]);
    ss += xv * xv;
    dot += (xv * invr) * v;
  }
  dot = block_sum(dot, red);
  ss = block_sum(ss, red);
  const bool above = m_sqrt(ss) >= float(kNormEps);
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const float v = ar[j];
    const float xh = to_float(xr[j]) * invr;
    gr[j] = from_float<T>(above ? (v - xh * dot) * invr : v * invr);
  }
}

}  // namespace cuda
}  // namespace mefn
