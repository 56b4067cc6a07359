// Host side of the CUDA implementation of the cross-attention similarity ops (``docs/math.md``, section 1):
// option parsing and input checks (mirroring csrc/xattn_similarity.cpp), the launch plan and the
// kernel arguments. The kernels: xattn_blocks.cuh (bodies), xattn_tile.cuh (cosine tiles on tensor
// cores), xattn_pair_warp.cuh (the per-pair epilogue of csrc/xattn_pair.h, one warp per pair);
// xattn_prep.cu / xattn_fwd.cu / xattn_bwd.cu launch them and register the ops for the CUDA key.
//
// Everything is computed in fp32 whatever the input dtype (as the reference does for half inputs);
// scores and gradients are returned in the input dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "../xattn_host.h"
#include "xattn_blocks.cuh"

namespace mefn {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Options and input checks (host)

struct Checked {
  at::Tensor regions, rl, words, wl;  // contiguous features; int64 lengths on the features' device
};

// TORCH_CHECKs with the argument's name; lengths are checked to lie in [1, L] (one device sync).
Checked check_inputs(const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
                     const at::Tensor& word_lengths);

// 1 / max(||x_row||, 1e-12) for every row of x (B, L, d), as float (B*L); 0 for padded rows.
at::Tensor inverse_norms(const at::Tensor& x, const at::Tensor& lengths);

// Gram matrices of the normalised valid rows of every item: float (B, Lp, Lp), Lp = L rounded up to
// 16 (row stride Lp); entries with a padded row or column are 0.
at::Tensor gram_matrices(const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& inv);

// The dtypes of the CUDA kernels (the schema is dtype-agnostic; float64 is refused by check_inputs).
#define MEFN_DISPATCH_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// Not ATen/cuda/CUDAContext.h: that header pulls in cuBLAS/cuSPARSE headers, which a bare CUDA
// toolkit (nvcc + cudart, as in CI) does not ship. c10::cuda::getCurrentCUDAStream() is the
// function that at::cuda::getCurrentCUDAStream() names.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// An attribute of the current device (shared memory per block opt-in, SM count).
int device_attribute(cudaDeviceAttr attr);


// Whether the rows of x (B, L, d) can be read with 16-byte loads of 8 half-precision features.
inline bool rows_vectorizable(const at::Tensor& x) {
  return x.element_size() == 2 && x.size(2) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
}

template <typename T> struct DeviceType { using type = T; };
template <> struct DeviceType<at::Half> { using type = __half; };
template <> struct DeviceType<at::BFloat16> { using type = __nv_bfloat16; };

// The plan for these shapes on the current device (TORCH_CHECK when one tile cannot fit).
Plan make_plan(int64_t B_img, int64_t N, int64_t B_txt, int64_t M, size_t elem_size, bool backward);

// Everything the fwd and bwd launchers share: checks, norms, Grams, plan -> Problem.
template <typename T>
inline Problem<T> make_problem(const Checked& c, const Options& o, const Plan& plan, const at::Tensor& rinv,
                        const at::Tensor& winv, const at::Tensor& G_img, const at::Tensor& G_txt) {
  Problem<T> P;
  P.regions = reinterpret_cast<const T*>(c.regions.data_ptr());
  P.words = reinterpret_cast<const T*>(c.words.data_ptr());
  P.rl = c.rl.data_ptr<int64_t>();
  P.wl = c.wl.data_ptr<int64_t>();
  P.rinv = rinv.data_ptr<float>();
  P.winv = winv.data_ptr<float>();
  P.G_img = G_img.defined() ? G_img.data_ptr<float>() : nullptr;
  P.G_txt = G_txt.defined() ? G_txt.data_ptr<float>() : nullptr;
  P.gld_img = G_img.defined() ? static_cast<int>(G_img.size(1)) : 0;
  P.gld_txt = G_txt.defined() ? static_cast<int>(G_txt.size(1)) : 0;
  P.B_img = c.regions.size(0);
  P.B_txt = c.words.size(0);
  P.d = c.regions.size(2);
  P.N = static_cast<int>(c.regions.size(1));
  P.M = static_cast<int>(c.words.size(1));
  P.BI = plan.BI;
  P.BT = plan.BT;
  P.nI = plan.nI;
  P.nT = plan.nT;
  P.rp = plan.rp;
  P.cp = plan.cp;
  P.lds = plan.lds;
  P.vec_regions = rows_vectorizable(c.regions);
  P.vec_words = rows_vectorizable(c.words);
  P.work_global = plan.work_global;
  P.work = nullptr;
  P.work_per_warp = plan.work_per_warp;
  P.direction = o.direction;
  P.pt = pair_params<float>(o, true);
  P.pi = pair_params<float>(o, false);
  return P;
}

}  // namespace cuda
}  // namespace mefn
