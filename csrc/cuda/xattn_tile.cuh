// Device building blocks of the CUDA xattn_similarity kernels (no ATen): the launch plan, the kernel
// arguments, and the cosine tile product
//
//   tile_product: S[r][c] = (x_r . w_c) / (max(|x_r|, eps) max(|w_c|, eps)) for a block of items
//   against another, on tensor cores (WMMA 16x16x16, fp32 accumulation) for float16/bfloat16 and
//   with plain fp32 FMA (exact fp32, no TF32) for float32. The raw inputs go to the tensor cores (no
//   rounded copy of the normalised rows); the inverse norms are applied in fp32 afterwards. Padded
//   rows are staged as zeros, so NaN/Inf in padding never reaches a product.
//
// Like xattn_pair_warp.cuh, this header compiles on the host with MEFN_WARP_EMULATION (float only,
// block and warp primitives emulated by threads): tests/cuda_emulation/.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "xattn_pair_warp.cuh"

#ifndef MEFN_WARP_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define MEFN_DEV __device__ __forceinline__
#define MEFN_HD __host__ __device__ inline
#define MEFN_SYNCTHREADS() __syncthreads()
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "mefn_fast's CUDA kernels need sm_80 or newer (bfloat16 WMMA); set MEFN_CUDA_ARCHS to 8.0 or above"
#endif
#endif

namespace mefn {
namespace cuda {

constexpr int kThreads = 128;             // threads per block
constexpr int kWarps = kThreads / 32;     // warps per block; one pair per warp at a time
constexpr int kMaxFrags = 8;              // 16x16 accumulator tiles per warp per pass of tile_product

MEFN_HD int round16(int64_t x) { return static_cast<int>((x + 15) / 16 * 16); }

// ------------------------------------------------------------------------------------------------
// Element types

MEFN_DEV float to_float(float x) { return x; }
template <typename T> MEFN_DEV T from_float(float x);
template <> MEFN_DEV float from_float<float>(float x) { return x; }
#ifndef MEFN_WARP_EMULATION
MEFN_DEV float to_float(__half x) { return __half2float(x); }
MEFN_DEV float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> MEFN_DEV __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> MEFN_DEV __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
#endif

// Staging of the feature chunks: KC features per step, row stride LD elements.
template <typename T> struct Stage { static constexpr int KC = 64, LD = 72; };  // half types (WMMA)
template <> struct Stage<float> { static constexpr int KC = 32, LD = 33; };      // FMA


// ------------------------------------------------------------------------------------------------
// Launch plan (host): block sizes and the shared-memory layout of the fwd/bwd kernels.
//
// A block owns BI images x BT captions: its cosine tile has rp = round16(BI*N) rows (image rows)
// and cp = round16(BT*M) columns (caption rows), row stride lds = cp + 4, in shared memory.
// Dynamic shared memory, in this order (every offset a multiple of 64 bytes):
//   S  [rp * lds] floats       the cosine tile
//   dS [rp * lds] floats       (backward) dScore/dS of every pair of the tile
//   region                     the staging buffers of tile_product (bytes_stage), aliased with the
//                              per-warp epilogue scratch when that lives in shared memory
//   masks [2 * (rp + cp)] floats   row/column scale (inverse norm, 0 if padded) and validity
struct Plan {
  int BI = 1, BT = 1;
  int64_t nI = 0, nT = 0;
  int rp = 16, cp = 16, lds = 20;
  bool work_global = false;  // per-warp scratch in global memory (too big for shared memory)
  int64_t work_per_warp = 0; // floats
  size_t smem = 0;           // dynamic shared memory per block, bytes
};


// Bytes of the staging / scratch region of the plan (host and device agree).
MEFN_HD size_t region_bytes(int rp, int cp, size_t elem_size, int ld_stage, bool work_global, int64_t work_per_warp) {
  const size_t stage = static_cast<size_t>(rp + cp) * ld_stage * elem_size;
  const size_t work = work_global ? 0 : static_cast<size_t>(kWarps) * work_per_warp * sizeof(float);
  const size_t b = stage > work ? stage : work;
  return (b + 63) / 64 * 64;
}

// The plan for a problem (host): about 64 image rows x 128 caption rows per tile, halved (captions
// first) until the block fits in `limit` bytes of shared memory, first with the per-warp scratch in
// shared memory, then in global memory. ok = false when even one image x one caption does not fit.
inline Plan plan_for(int64_t B_img, int64_t N, int64_t B_txt, int64_t M, size_t elem_size, bool backward, size_t limit,
                     bool* ok) {
  const int ld_stage = elem_size == 4 ? Stage<float>::LD : 72;
  auto clampi = [](int64_t v, int64_t lo, int64_t hi) { return static_cast<int>(v < lo ? lo : v > hi ? hi : v); };
  const int bi0 = clampi(64 / N < B_img ? 64 / N : B_img, 1, 1 << 20);
  const int bt0 = clampi(128 / M < B_txt ? 128 / M : B_txt, 1, 1 << 20);
  Plan p;
  p.work_per_warp = warp_work_floats(N, M, backward);
  *ok = false;
  for (int global = 0; global < 2; ++global) {
    p.work_global = global == 1;
    p.BI = bi0;
    p.BT = bt0;
    while (true) {
      p.rp = round16(int64_t(p.BI) * N);
      p.cp = round16(int64_t(p.BT) * M);
      p.lds = p.cp + 4;
      const size_t tiles = (backward ? 2 : 1) * size_t(p.rp) * p.lds * sizeof(float);
      p.smem = tiles + region_bytes(p.rp, p.cp, elem_size, ld_stage, p.work_global, p.work_per_warp) +
               2 * size_t(p.rp + p.cp) * sizeof(float);
      if (p.smem <= limit) {
        p.nI = (B_img + p.BI - 1) / p.BI;
        p.nT = (B_txt + p.BT - 1) / p.BT;
        *ok = true;
        return p;
      }
      if (p.BT > 1) p.BT = (p.BT + 1) / 2;
      else if (p.BI > 1) p.BI = (p.BI + 1) / 2;
      else break;
    }
  }
  return p;
}

// ------------------------------------------------------------------------------------------------
// Kernel arguments

template <typename T>
struct Problem {
  const T* regions;
  const T* words;
  const int64_t* rl;
  const int64_t* wl;
  const float* rinv;   // (B_img*N) inverse norms
  const float* winv;   // (B_txt*M)
  const float* G_img;  // (B_img, gld_img, gld_img) Gram matrices when the t2i direction is on
  const float* G_txt;  // (B_txt, gld_txt, gld_txt) when i2t is on
  int gld_img, gld_txt;
  int64_t B_img, B_txt, d;
  int N, M;
  int BI, BT;
  int64_t nI, nT;
  int rp, cp, lds;
  bool vec_regions, vec_words;  // Side::vec of each side
  bool work_global;
  float* work;          // per-warp scratch when work_global: (gridDim.x * kWarps * work_per_warp)
  int64_t work_per_warp;
  Direction direction;
  PairParams<float> pt, pi;  // per-direction parameters
};

// ------------------------------------------------------------------------------------------------
// Tile product (device)

// Accumulators of up to kMaxFrags 16x16 output tiles per warp.
template <typename T>
struct TileAcc;

#ifndef MEFN_WARP_EMULATION
template <typename T>
struct TileAcc {  // float16 / bfloat16: WMMA on tensor cores, fp32 accumulation
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[kMaxFrags];
  MEFN_DEV void zero() {
#pragma unroll
    for (int j = 0; j < kMaxFrags; ++j) nvcuda::wmma::fill_fragment(c[j], 0.0f);
  }
  // c[j] += A (16 x KC, row stride LD) * B^T (B: 16 x KC, row stride LD)
  MEFN_DEV void mma(int j, const T* A, const T* B, int /*lane*/) {
    using namespace nvcuda;
#pragma unroll
    for (int kk = 0; kk < Stage<T>::KC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(a, A + kk, Stage<T>::LD);
      wmma::load_matrix_sync(b, B + kk, Stage<T>::LD);
      wmma::mma_sync(c[j], a, b, c[j]);
    }
  }
  MEFN_DEV void store(int j, float* out, int ld, int /*lane*/) {
    nvcuda::wmma::store_matrix_sync(out, c[j], ld, nvcuda::wmma::mem_row_major);
  }
};
#endif  // MEFN_WARP_EMULATION

template <>
struct TileAcc<float> {  // float32: CUDA-core FMA; lane owns rows 2*(lane/4)+{0,1}, columns 4*(lane%4)+{0..3}
  float c[kMaxFrags][8];
  MEFN_DEV void zero() {
#pragma unroll
    for (int j = 0; j < kMaxFrags; ++j)
#pragma unroll
      for (int e = 0; e < 8; ++e) c[j][e] = 0.f;
  }
  MEFN_DEV void mma(int j, const float* A, const float* B, int lane) {
    constexpr int LD = Stage<float>::LD;
    const float* a0 = A + (2 * (lane >> 2)) * LD;
    const float* b0 = B + (4 * (lane & 3)) * LD;
#pragma unroll 8
    for (int kk = 0; kk < Stage<float>::KC; ++kk) {
      const float x0 = a0[kk], x1 = a0[LD + kk];
      const float y0 = b0[kk], y1 = b0[LD + kk], y2 = b0[2 * LD + kk], y3 = b0[3 * LD + kk];
      c[j][0] = fmaf(x0, y0, c[j][0]);
      c[j][1] = fmaf(x0, y1, c[j][1]);
      c[j][2] = fmaf(x0, y2, c[j][2]);
      c[j][3] = fmaf(x0, y3, c[j][3]);
      c[j][4] = fmaf(x1, y0, c[j][4]);
      c[j][5] = fmaf(x1, y1, c[j][5]);
      c[j][6] = fmaf(x1, y2, c[j][6]);
      c[j][7] = fmaf(x1, y3, c[j][7]);
    }
  }
  MEFN_DEV void store(int j, float* out, int ld, int lane) {
    const int r = 2 * (lane >> 2), col = 4 * (lane & 3);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) out[(r + i) * ld + col + q] = c[j][i * 4 + q];
  }
};

// One side of a tile: items [i0, i0 + items) of x (B, L, d); tile row r <-> item i0 + r / L, row r % L.
template <typename T>
struct Side {
  const T* x;
  const int64_t* len;
  const float* inv;
  int64_t i0;
  int items, L;
  bool vec;  // 16-byte loads: d % 8 == 0 and x 16-byte aligned (half types)
};


// Scale (inverse norm, 0 when padded) and validity (1/0) of the rows of one side, for rp rows.
template <typename T>
MEFN_DEV void side_masks(const Side<T>& s, int rp, float* scale, float* valid) {
  const int rows = s.items * s.L;
  for (int r = threadIdx.x; r < rp; r += kThreads) {
    bool ok = false;
    if (r < rows) {
      const int64_t item = s.i0 + r / s.L;
      ok = (r % s.L) < s.len[item];
    }
    scale[r] = ok ? s.inv[s.i0 * s.L + r] : 0.f;
    valid[r] = ok ? 1.f : 0.f;
  }
}

// Stage features [k0, k0 + KC) of the rp rows of one side into dst (rp x LD); padded rows and
// features beyond d are zeros (so NaN/Inf in padding never reaches the products).
template <typename T>
MEFN_DEV void stage_rows(const Side<T>& s, int rp, int64_t d, int64_t k0, const float* valid, T* dst) {
  constexpr int KC = Stage<T>::KC, LD = Stage<T>::LD;
  const T zero = from_float<T>(0.f);
  const T* base = s.x + s.i0 * s.L * d;
#ifndef MEFN_WARP_EMULATION
  if constexpr (sizeof(T) == 2) {
    // 16-byte loads of 8 features when rows are 16-byte aligned (d % 8 == 0; the tensor is)
    if (s.vec) {
      constexpr int V = KC / 8;
      for (int idx = threadIdx.x; idx < rp * V; idx += kThreads) {
        const int r = idx / V, kk = (idx % V) * 8;
        const int64_t j = k0 + kk;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (valid[r] != 0.f && j < d) v = *reinterpret_cast<const uint4*>(base + r * d + j);
        *reinterpret_cast<uint4*>(dst + r * LD + kk) = v;
      }
      return;
    }
  }
#endif
  for (int idx = threadIdx.x; idx < rp * KC; idx += kThreads) {
    const int r = idx / KC, kk = idx % KC;
    const int64_t j = k0 + kk;
    dst[r * LD + kk] = (valid[r] != 0.f && j < d) ? base[r * d + j] : zero;
  }
}

// out[r * ld + c] = cos(row r of X, row c of W) for r < rp, c < cp (0 where either row is padded).
// Fills the masks (xs, xv: rp entries; ws, wv: cp entries). stage: (rp + cp) * LD elements of T.
// All threads of the block must call it; it begins and ends with MEFN_SYNCTHREADS().
template <typename T>
MEFN_DEV void tile_product(const Side<T>& X, const Side<T>& W, int rp, int cp, int64_t d, float* out, int ld,
                             T* stage, float* xs, float* xv, float* ws, float* wv) {
  constexpr int KC = Stage<T>::KC, LD = Stage<T>::LD;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  MEFN_SYNCTHREADS();  // earlier users of the masks / stage / output
  side_masks(X, rp, xs, xv);
  side_masks(W, cp, ws, wv);
  T* Xs = stage;
  T* Ws = stage + rp * LD;
  const int nfc = cp / 16, nfrag = (rp / 16) * nfc;
  const int per_warp = (nfrag + kWarps - 1) / kWarps;
  const int passes = (per_warp + kMaxFrags - 1) / kMaxFrags;
  for (int pass = 0; pass < passes; ++pass) {
    TileAcc<T> acc;
    acc.zero();
    for (int64_t k0 = 0; k0 < d; k0 += KC) {
      MEFN_SYNCTHREADS();  // masks ready / previous chunk consumed
      stage_rows(X, rp, d, k0, xv, Xs);
      stage_rows(W, cp, d, k0, wv, Ws);
      MEFN_SYNCTHREADS();
#pragma unroll
      for (int j = 0; j < kMaxFrags; ++j) {
        const int f = warp + kWarps * (pass * kMaxFrags + j);
        if (f < nfrag) acc.mma(j, Xs + (f / nfc) * 16 * LD, Ws + (f % nfc) * 16 * LD, lane);
      }
    }
#pragma unroll
    for (int j = 0; j < kMaxFrags; ++j) {
      const int f = warp + kWarps * (pass * kMaxFrags + j);
      if (f < nfrag) acc.store(j, out + (f / nfc) * 16 * ld + (f % nfc) * 16, ld, lane);
    }
  }
  MEFN_SYNCTHREADS();
  for (int idx = threadIdx.x; idx < rp * cp; idx += kThreads) {
    const int r = idx / cp, c = idx % cp;
    out[r * ld + c] *= xs[r] * ws[c];
  }
  MEFN_SYNCTHREADS();
}

// Shared-memory layout of a fwd/bwd block (see Plan).
struct Smem {
  float* S;
  float* dS;
  unsigned char* region;
  float *xs, *xv, *ws, *wv;
};

MEFN_DEV Smem carve_smem(unsigned char* base, int rp, int cp, int lds, bool backward,
                                           size_t region_bytes) {
  Smem s;
  float* f = reinterpret_cast<float*>(base);
  s.S = f;
  f += rp * lds;
  s.dS = backward ? f : nullptr;
  if (backward) f += rp * lds;
  s.region = reinterpret_cast<unsigned char*>(f);
  f = reinterpret_cast<float*>(s.region + region_bytes);
  s.xs = f;
  s.xv = f + rp;
  s.ws = f + 2 * rp;
  s.wv = f + 2 * rp + cp;
  return s;
}

}  // namespace cuda
}  // namespace mefn
