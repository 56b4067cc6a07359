// The cross-attention similarity (``docs/math.md``, section 1) as torch.library ops, with CPU kernels.
//
//   mefn_fast::xattn_similarity_fwd(regions, region_lengths, words, word_lengths, <options>)
//       -> scores (B_img, B_txt)
//   mefn_fast::xattn_similarity_bwd(grad_scores, regions, region_lengths, words, word_lengths,
//       <options>, need_grad_regions, need_grad_words) -> (grad_regions, grad_words)
//
// Autograd and fake (meta) kernels are attached in Python (mefn_fast/backends/ext_ops.py); the CUDA kernels
// of csrc/cuda/ register for the CUDA key against the schemas declared here.
//
// CPU algorithm. Images are cut into blocks of bi images and captions into blocks of bt
// captions (sizes depend on the shapes only, never on the thread count). For one block pair,
// the normalised rows of both blocks are copied into thread-local buffers (padded rows zero),
// the cosine tile (bi*N x bt*M) is one at::mm, and the per-pair epilogue of xattn_pair.h runs on
// each image x caption sub-tile while it is in cache; "both" uses the same tile for both
// directions. Gram matrices of the contexts (N x N per image, M x M per caption) are computed
// once per call. The backward recomputes the tiles (nothing is saved by the forward): pass 1 is
// parallel over image blocks, each owning its rows of grad_regions and visiting every caption
// block in order (dR^ += dS W^); pass 2 is parallel over caption blocks (dW^ += dS^T R^). Each
// output element is therefore reduced by one owner in a fixed order: bitwise identical results
// for any number of threads. Extra memory: O(threads * block tiles + B_img N^2 + B_txt M^2).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "xattn_host.h"
#include "xattn_pair.h"

// The per-pair math once more for AVX2+FMA, in namespace mefn::avx2::mefn, chosen at run time
// when the CPU has it (the package is built without -march flags, so the default copy is SSE2).
// Only the header's math functions are compiled under the target pragma, in their own
// namespace: no inline function shared with the default build gets AVX2 code.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MEFN_NO_ISA_DISPATCH)
#define MEFN_HAVE_AVX2_PATH 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mefn {
namespace avx2 {
#define MEFN_XATTN_PAIR_REINCLUDE
#include "xattn_pair.h"
#undef MEFN_XATTN_PAIR_REINCLUDE
}  // namespace avx2
}  // namespace mefn
#pragma GCC pop_options
#endif

// An empty Python module: importing mefn_fast._C loads this library, which registers the ops.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace mefn {
namespace {

// The per-pair kernels of this machine: AVX2+FMA when the CPU has them (and the environment
// variable MEFN_CPU_ISA is not "generic"), else the default build.
template <typename T>
struct PairKernels {
  decltype(&pair_forward<T>) forward;
  decltype(&pair_backward<T>) backward;
};

inline bool use_avx2() {
#ifdef MEFN_HAVE_AVX2_PATH
  static const bool yes = [] {
    const char* env = std::getenv("MEFN_CPU_ISA");
    if (env != nullptr && std::string(env) == "generic") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

template <typename T>
PairKernels<T> pair_kernels() {
#ifdef MEFN_HAVE_AVX2_PATH
  if (use_avx2()) return {&avx2::mefn::pair_forward<T>, &avx2::mefn::pair_backward<T>};
#endif
  return {&pair_forward<T>, &pair_backward<T>};
}

void check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, "xattn_similarity: ", name, " must have shape (batch, length, dim); got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "xattn_similarity (CPU kernel): ", name, " must be a CPU tensor; got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "xattn_similarity (CPU kernel): ", name, " must be float32 or float64; got ", x.scalar_type(),
              " (mefn_fast's reference backend computes half precision in float32)");
  TORCH_CHECK(x.size(2) > 0, "xattn_similarity: ", name, " has feature dimension 0");
}

at::Tensor check_lengths(const at::Tensor& lengths, const char* name, int64_t batch, int64_t max_len) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch, "xattn_similarity: ", name, " must have shape (", batch,
              ",); got ", lengths.sizes());
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()) && lengths.scalar_type() != at::kBool,
              "xattn_similarity: ", name, " must have an integer dtype; got ", lengths.scalar_type());
  TORCH_CHECK(lengths.device().is_cpu(), "xattn_similarity (CPU kernel): ", name, " must be a CPU tensor");
  at::Tensor l = lengths.to(at::kLong).contiguous();
  const int64_t* p = l.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(p[i] >= 1 && p[i] <= max_len, "xattn_similarity: ", name, " must lie in [1, ", max_len, "]; got ", p[i],
                " at index ", i);
  }
  return l;
}

// Block sizes: about 256 image rows and 512 caption rows per tile, but at least ~8 blocks per
// side when the batch allows it (so that both passes of the backward have parallel work).
// Depends on the shapes only.
struct Blocking {
  int64_t bi, bt, nI, nT;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Blocking choose_blocks(int64_t b_img, int64_t n, int64_t b_txt, int64_t m) {
  Blocking k;
  k.bi = std::max<int64_t>(1, std::min(ceil_div(256, n), ceil_div(b_img, 8)));
  k.bt = std::max<int64_t>(1, std::min(ceil_div(512, m), ceil_div(b_txt, 8)));
  k.nI = ceil_div(b_img, k.bi);
  k.nT = ceil_div(b_txt, k.bt);
  return k;
}

// Normalised rows of items [b0, b1) of x (B, L, d) into out ((b1-b0)*L, d); padded rows zero.
template <typename T>
void normalize_rows(const T* x, const int64_t* lengths, int64_t b0, int64_t b1, int64_t L, int64_t d, T* out) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t r = 0; r < L; ++r) {
      const T* xr = x + (b * L + r) * d;
      T* o = out + ((b - b0) * L + r) * d;
      if (r >= lengths[b]) {
        std::fill(o, o + d, T(0));
        continue;
      }
      double ss = 0;
      for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * double(xr[j]);
      const T denom = static_cast<T>(std::max(std::sqrt(ss), kNormEps));
      for (int64_t j = 0; j < d; ++j) o[j] = xr[j] / denom;
    }
  }
}

// Backward of the normalisation for the rows of items [b0, b1): grad (B, L, d) rows from
// dxhat (((b1-b0)*L, d), w.r.t. the normalised rows xhat). Padded rows get exactly 0.
template <typename T>
void normalize_backward(const T* x, const T* xhat, const T* dxhat, const int64_t* lengths, int64_t b0, int64_t b1,
                        int64_t L, int64_t d, T* grad) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t r = 0; r < L; ++r) {
      const int64_t row = (b - b0) * L + r;
      T* gr = grad + (b * L + r) * d;
      if (r >= lengths[b]) {
        std::fill(gr, gr + d, T(0));
        continue;
      }
      const T* xr = x + (b * L + r) * d;
      const T* xh = xhat + row * d;
      const T* dxh = dxhat + row * d;
      double ss = 0, dot = 0;
      for (int64_t j = 0; j < d; ++j) {
        ss += double(xr[j]) * double(xr[j]);
        dot += double(xh[j]) * double(dxh[j]);
      }
      const double nrm = std::sqrt(ss);
      if (nrm >= kNormEps) {
        const T inv = static_cast<T>(1.0 / nrm);
        const T dt = static_cast<T>(dot);
        for (int64_t j = 0; j < d; ++j) gr[j] = (dxh[j] - xh[j] * dt) * inv;
      } else {
        const T inv = static_cast<T>(1.0 / kNormEps);
        for (int64_t j = 0; j < d; ++j) gr[j] = dxh[j] * inv;
      }
    }
  }
}

// A CPU tensor view of a raw buffer (no ownership).
template <typename T>
at::Tensor view(T* p, at::IntArrayRef sizes) {
  return at::from_blob(p, sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Gram matrices G_b = X^_b X^_b^T of every item of x (B, L, d) into G (B, L, L).
template <typename T>
void compute_grams(const T* x, const int64_t* lengths, int64_t B, int64_t L, int64_t d, T* G) {
  const int64_t blk = std::max<int64_t>(1, ceil_div(256, L));
  at::parallel_for(0, ceil_div(B, blk), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(blk * L * d);
    for (int64_t ib = begin; ib < end; ++ib) {
      const int64_t b0 = ib * blk, b1 = std::min(B, b0 + blk);
      normalize_rows(x, lengths, b0, b1, L, d, buf.data());
      for (int64_t b = b0; b < b1; ++b) {
        at::Tensor xb = view(buf.data() + (b - b0) * L * d, {L, d});
        at::Tensor gb = view(G + b * L * L, {L, L});
        at::mm_out(gb, xb, xb.t());
      }
    }
  });
}

// Everything the tile workers share (read-only).
template <typename T>
struct Problem {
  const T* regions;
  const T* words;
  const int64_t* rl;
  const int64_t* wl;
  int64_t B_img, N, B_txt, M, d;
  const T* G_img;  // (B_img, N, N) when the t2i direction is on
  const T* G_txt;  // (B_txt, M, M) when the i2t direction is on
  Options o;
  Blocking blk;
};

// Per-thread buffers for one block pair.
template <typename T>
struct Workspace {
  std::vector<T> Rb, Wb, tile, dtile, pS, pdS, work;
  PairWork<T> pw;
  explicit Workspace(const Problem<T>& P, bool backward) {
    const int64_t rows = P.blk.bi * P.N, cols = P.blk.bt * P.M, L = std::max(P.N, P.M);
    Rb.resize(rows * P.d);
    Wb.resize(cols * P.d);
    tile.resize(rows * cols);
    if (backward) {
      dtile.resize(rows * cols);
      pdS.resize(P.N * P.M);
    }
    pS.resize(P.N * P.M);
    work.resize(pair_work_size(L, L));
    pw = pair_work_from(work.data(), L, L);
  }
  // normalised rows of image block I / caption block T, then the cosine tile
  int64_t i0 = -1, t0 = -1, ni = 0, nt = 0;
  void load(const Problem<T>& P, int64_t I, int64_t Tb) {
    const int64_t ni_ = std::min(P.B_img, (I + 1) * P.blk.bi) - I * P.blk.bi;
    const int64_t nt_ = std::min(P.B_txt, (Tb + 1) * P.blk.bt) - Tb * P.blk.bt;
    if (i0 != I * P.blk.bi) {
      i0 = I * P.blk.bi;
      ni = ni_;
      normalize_rows(P.regions, P.rl, i0, i0 + ni, P.N, P.d, Rb.data());
    }
    if (t0 != Tb * P.blk.bt) {
      t0 = Tb * P.blk.bt;
      nt = nt_;
      normalize_rows(P.words, P.wl, t0, t0 + nt, P.M, P.d, Wb.data());
    }
    at::Tensor S = view(tile.data(), {ni * P.N, nt * P.M});
    at::mm_out(S, view(Rb.data(), {ni * P.N, P.d}), view(Wb.data(), {nt * P.M, P.d}).t());
  }
};

// Context-major copy of pair (i, t)'s sub-tile for one direction. sub: the pair's corner of the
// tile (rows = the image's regions, columns = the caption's words), row stride ld.
// t2i: context = regions (n = n_img), query = words: out[r*n_txt + k] = sub[r, k].
// i2t: context = words (n = n_txt), query = regions: out[r*n_img + k] = sub[k, r].
template <typename T>
void gather_pair(const T* sub, int64_t ld, int64_t n_img, int64_t n_txt, bool t2i, T* out) {
  if (t2i) {
    for (int64_t r = 0; r < n_img; ++r)
      for (int64_t k = 0; k < n_txt; ++k) out[r * n_txt + k] = sub[r * ld + k];
  } else {
    for (int64_t k = 0; k < n_img; ++k)
      for (int64_t r = 0; r < n_txt; ++r) out[r * n_img + k] = sub[k * ld + r];
  }
}

template <typename T>
void scatter_add_pair(const T* in, int64_t ld, int64_t n_img, int64_t n_txt, bool t2i, T* sub) {
  if (t2i) {
    for (int64_t r = 0; r < n_img; ++r)
      for (int64_t k = 0; k < n_txt; ++k) sub[r * ld + k] += in[r * n_txt + k];
  } else {
    for (int64_t k = 0; k < n_img; ++k)
      for (int64_t r = 0; r < n_txt; ++r) sub[k * ld + r] += in[r * n_img + k];
  }
}

// 1 / max(||x_r||, eps) of every row of x (B, L, d) into inv (B*L); 0 for padded rows.
template <typename T>
void inverse_norms(const T* x, const int64_t* lengths, int64_t B, int64_t L, int64_t d, T* inv) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t r = 0; r < L; ++r) {
        if (r >= lengths[b]) {
          inv[b * L + r] = T(0);
          continue;
        }
        const T* xr = x + (b * L + r) * d;
        double ss = 0;
        for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * double(xr[j]);
        inv[b * L + r] = static_cast<T>(1.0 / std::max(std::sqrt(ss), kNormEps));
      }
    }
  });
}

// The forward multiplies the raw (contiguous) input blocks, no copies, and scales each valid
// entry of the tile by the two inverse norms as it gathers a pair; entries of padded rows are
// never read, so whatever the padding holds (even inf or NaN) cannot reach a score.
template <typename T>
void gather_pair_scaled(const T* sub, int64_t ld, const T* inv_img, const T* inv_txt, int64_t n_img, int64_t n_txt,
                        bool t2i, T* out) {
  if (t2i) {
    for (int64_t r = 0; r < n_img; ++r) {
      const T ir = inv_img[r];
      for (int64_t k = 0; k < n_txt; ++k) out[r * n_txt + k] = sub[r * ld + k] * ir * inv_txt[k];
    }
  } else {
    for (int64_t k = 0; k < n_img; ++k) {
      const T ik = inv_img[k];
      for (int64_t r = 0; r < n_txt; ++r) out[r * n_img + k] = sub[k * ld + r] * ik * inv_txt[r];
    }
  }
}

template <typename T>
void forward_kernel(const Problem<T>& P, T* scores) {
  const Blocking& B = P.blk;
  const PairParams<T> pt = pair_params<T>(P.o, true), pi = pair_params<T>(P.o, false);
  const PairKernels<T> kern = pair_kernels<T>();
  std::vector<T> inv_r(P.B_img * P.N), inv_w(P.B_txt * P.M);
  inverse_norms(P.regions, P.rl, P.B_img, P.N, P.d, inv_r.data());
  inverse_norms(P.words, P.wl, P.B_txt, P.M, P.d, inv_w.data());
  at::parallel_for(0, B.nI * B.nT, 1, [&](int64_t begin, int64_t end) {
    const int64_t L = std::max(P.N, P.M);
    std::vector<T> tile(B.bi * P.N * B.bt * P.M), pS(P.N * P.M), work(pair_work_size(L, L));
    PairWork<T> pw = pair_work_from(work.data(), L, L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t I = task / B.nT, Tb = task % B.nT;
      const int64_t i0 = I * B.bi, ni = std::min(P.B_img, i0 + B.bi) - i0;
      const int64_t t0 = Tb * B.bt, nt = std::min(P.B_txt, t0 + B.bt) - t0;
      const int64_t ld = nt * P.M;
      // const_cast: from_blob wants a mutable pointer; the inputs are only read
      at::Tensor Rb = view(const_cast<T*>(P.regions) + i0 * P.N * P.d, {ni * P.N, P.d});
      at::Tensor Wb = view(const_cast<T*>(P.words) + t0 * P.M * P.d, {nt * P.M, P.d});
      at::Tensor S = view(tile.data(), {ni * P.N, ld});
      at::mm_out(S, Rb, Wb.t());
      for (int64_t ii = 0; ii < ni; ++ii) {
        const int64_t i = i0 + ii, n_img = P.rl[i];
        for (int64_t tt = 0; tt < nt; ++tt) {
          const int64_t t = t0 + tt, n_txt = P.wl[t];
          const T* sub = tile.data() + ii * P.N * ld + tt * P.M;
          const T* ir = inv_r.data() + i * P.N;
          const T* iw = inv_w.data() + t * P.M;
          T s_t2i = T(0), s_i2t = T(0);
          if (P.o.t2i()) {
            gather_pair_scaled(sub, ld, ir, iw, n_img, n_txt, true, pS.data());
            s_t2i = kern.forward(pS.data(), P.G_img + i * P.N * P.N, P.N, n_img, n_txt, pt, pw);
          }
          if (P.o.i2t()) {
            gather_pair_scaled(sub, ld, ir, iw, n_img, n_txt, false, pS.data());
            s_i2t = kern.forward(pS.data(), P.G_txt + t * P.M * P.M, P.M, n_txt, n_img, pi, pw);
          }
          scores[i * P.B_txt + t] = P.o.direction == kT2I ? s_t2i
                                    : P.o.direction == kI2T ? s_i2t
                                                            : T(0.5) * (s_t2i + s_i2t);
        }
      }
    }
  });
}

// dS of every pair of the loaded tile into ws.dtile; dG of the owner side accumulated into dG
// (t2i Gram of the block's images when own_images, i2t Gram of its captions otherwise).
template <typename T>
void tile_backward(const Problem<T>& P, Workspace<T>& ws, const T* grad, bool own_images, T* dG) {
  const PairParams<T> pt = pair_params<T>(P.o, true), pi = pair_params<T>(P.o, false);
  const PairKernels<T> kern = pair_kernels<T>();
  const int64_t ld = ws.nt * P.M;
  std::fill(ws.dtile.begin(), ws.dtile.begin() + ws.ni * P.N * ld, T(0));
  const T scale = P.o.direction == kBoth ? T(0.5) : T(1);
  for (int64_t ii = 0; ii < ws.ni; ++ii) {
    const int64_t i = ws.i0 + ii, n_img = P.rl[i];
    for (int64_t tt = 0; tt < ws.nt; ++tt) {
      const int64_t t = ws.t0 + tt, n_txt = P.wl[t];
      const T g = grad[i * P.B_txt + t];
      if (g == T(0)) continue;  // contributes exactly nothing (e.g. hinge terms at zero)
      const T* sub = ws.tile.data() + ii * P.N * ld + tt * P.M;
      T* dsub = ws.dtile.data() + ii * P.N * ld + tt * P.M;
      if (P.o.t2i()) {
        gather_pair(sub, ld, n_img, n_txt, true, ws.pS.data());
        T* dGi = own_images ? dG + ii * P.N * P.N : nullptr;
        kern.backward(scale * g, ws.pS.data(), P.G_img + i * P.N * P.N, P.N, n_img, n_txt, pt, ws.pw, ws.pdS.data(),
                      dGi, P.N);
        scatter_add_pair(ws.pdS.data(), ld, n_img, n_txt, true, dsub);
      }
      if (P.o.i2t()) {
        gather_pair(sub, ld, n_img, n_txt, false, ws.pS.data());
        T* dGt = own_images ? nullptr : dG + tt * P.M * P.M;
        kern.backward(scale * g, ws.pS.data(), P.G_txt + t * P.M * P.M, P.M, n_txt, n_img, pi, ws.pw, ws.pdS.data(),
                      dGt, P.M);
        scatter_add_pair(ws.pdS.data(), ld, n_img, n_txt, false, dsub);
      }
    }
  }
}

template <typename T>
void backward_kernel(const Problem<T>& P, const T* grad, T* grad_regions, T* grad_words) {
  const Blocking& B = P.blk;
  if (grad_regions != nullptr) {
    // pass 1: each image block owns its rows of grad_regions
    at::parallel_for(0, B.nI, 1, [&](int64_t begin, int64_t end) {
      Workspace<T> ws(P, true);
      std::vector<T> dR(B.bi * P.N * P.d), dG(P.o.t2i() ? B.bi * P.N * P.N : 0);
      for (int64_t I = begin; I < end; ++I) {
        std::fill(dR.begin(), dR.end(), T(0));
        std::fill(dG.begin(), dG.end(), T(0));
        for (int64_t Tb = 0; Tb < B.nT; ++Tb) {
          ws.load(P, I, Tb);
          tile_backward(P, ws, grad, true, dG.data());
          const int64_t rows = ws.ni * P.N, cols = ws.nt * P.M;
          at::Tensor dRt = view(dR.data(), {rows, P.d});
          dRt.addmm_(view(ws.dtile.data(), {rows, cols}), view(ws.Wb.data(), {cols, P.d}));
        }
        if (P.o.t2i()) {  // Gram: dR^_i += (dG + dG^T) R^_i = 2 dG R^_i
          for (int64_t ii = 0; ii < ws.ni; ++ii) {
            at::Tensor dRi = view(dR.data() + ii * P.N * P.d, {P.N, P.d});
            dRi.addmm_(view(dG.data() + ii * P.N * P.N, {P.N, P.N}), view(ws.Rb.data() + ii * P.N * P.d, {P.N, P.d}),
                       1, 2);
          }
        }
        normalize_backward(P.regions, ws.Rb.data(), dR.data(), P.rl, ws.i0, ws.i0 + ws.ni, P.N, P.d, grad_regions);
      }
    });
  }
  if (grad_words != nullptr) {
    // pass 2: each caption block owns its rows of grad_words
    at::parallel_for(0, B.nT, 1, [&](int64_t begin, int64_t end) {
      Workspace<T> ws(P, true);
      std::vector<T> dW(B.bt * P.M * P.d), dG(P.o.i2t() ? B.bt * P.M * P.M : 0);
      for (int64_t Tb = begin; Tb < end; ++Tb) {
        std::fill(dW.begin(), dW.end(), T(0));
        std::fill(dG.begin(), dG.end(), T(0));
        for (int64_t I = 0; I < B.nI; ++I) {
          ws.load(P, I, Tb);
          tile_backward(P, ws, grad, false, dG.data());
          const int64_t rows = ws.ni * P.N, cols = ws.nt * P.M;
          at::Tensor dWt = view(dW.data(), {cols, P.d});
          dWt.addmm_(view(ws.dtile.data(), {rows, cols}).t(), view(ws.Rb.data(), {rows, P.d}));
        }
        if (P.o.i2t()) {
          for (int64_t tt = 0; tt < ws.nt; ++tt) {
            at::Tensor dWi = view(dW.data() + tt * P.M * P.d, {P.M, P.d});
            dWi.addmm_(view(dG.data() + tt * P.M * P.M, {P.M, P.M}), view(ws.Wb.data() + tt * P.M * P.d, {P.M, P.d}),
                       1, 2);
          }
        }
        normalize_backward(P.words, ws.Wb.data(), dW.data(), P.wl, ws.t0, ws.t0 + ws.nt, P.M, P.d, grad_words);
      }
    });
  }
}

template <typename T>
Problem<T> make_problem(const at::Tensor& regions, const at::Tensor& rl, const at::Tensor& words, const at::Tensor& wl,
                        const Options& o, std::vector<T>& g_img, std::vector<T>& g_txt) {
  Problem<T> P;
  P.regions = regions.data_ptr<T>();
  P.words = words.data_ptr<T>();
  P.rl = rl.data_ptr<int64_t>();
  P.wl = wl.data_ptr<int64_t>();
  P.B_img = regions.size(0);
  P.N = regions.size(1);
  P.B_txt = words.size(0);
  P.M = words.size(1);
  P.d = regions.size(2);
  P.o = o;
  P.blk = choose_blocks(P.B_img, P.N, P.B_txt, P.M);
  P.G_img = nullptr;
  P.G_txt = nullptr;
  if (o.t2i()) {
    g_img.resize(P.B_img * P.N * P.N);
    compute_grams(P.regions, P.rl, P.B_img, P.N, P.d, g_img.data());
    P.G_img = g_img.data();
  }
  if (o.i2t()) {
    g_txt.resize(P.B_txt * P.M * P.M);
    compute_grams(P.words, P.wl, P.B_txt, P.M, P.d, g_txt.data());
    P.G_txt = g_txt.data();
  }
  return P;
}

struct Checked {
  at::Tensor regions, rl, words, wl;
};

Checked check_inputs(const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
                     const at::Tensor& word_lengths) {
  check_features(regions, "regions");
  check_features(words, "words");
  check_feature_pair(regions, words);
  Checked c;
  c.regions = regions.contiguous();
  c.words = words.contiguous();
  c.rl = check_lengths(region_lengths, "region_lengths", regions.size(0), regions.size(1));
  c.wl = check_lengths(word_lengths, "word_lengths", words.size(0), words.size(1));
  return c;
}

at::Tensor xattn_similarity_fwd_cpu(const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
                                    const at::Tensor& word_lengths, c10::string_view direction, double lambda_t2i,
                                    double lambda_i2t, c10::string_view attn_norm, bool mfe, double tau,
                                    c10::string_view agg, double lambda_lse) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  Checked c = check_inputs(regions, region_lengths, words, word_lengths);
  at::Tensor scores = at::zeros({regions.size(0), words.size(0)}, regions.options());
  if (scores.numel() == 0) return scores;
  AT_DISPATCH_FLOATING_TYPES(regions.scalar_type(), "xattn_similarity_fwd_cpu", [&] {
    std::vector<scalar_t> g_img, g_txt;
    Problem<scalar_t> P = make_problem<scalar_t>(c.regions, c.rl, c.words, c.wl, o, g_img, g_txt);
    forward_kernel<scalar_t>(P, scores.data_ptr<scalar_t>());
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor> xattn_similarity_bwd_cpu(
    const at::Tensor& grad_scores, const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
    const at::Tensor& word_lengths, c10::string_view direction, double lambda_t2i, double lambda_i2t,
    c10::string_view attn_norm, bool mfe, double tau, c10::string_view agg, double lambda_lse, bool need_grad_regions,
    bool need_grad_words) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  Checked c = check_inputs(regions, region_lengths, words, word_lengths);
  check_grad_scores_shape(grad_scores, regions, words);
  TORCH_CHECK(grad_scores.device().is_cpu(), "xattn_similarity_bwd (CPU kernel): grad_scores must be a CPU tensor");
  at::Tensor grad = grad_scores.to(regions.scalar_type()).contiguous();
  at::Tensor gr = need_grad_regions ? at::zeros_like(c.regions) : at::empty({0}, regions.options());
  at::Tensor gw = need_grad_words ? at::zeros_like(c.words) : at::empty({0}, words.options());
  if (grad.numel() == 0 || (!need_grad_regions && !need_grad_words)) return {gr, gw};
  AT_DISPATCH_FLOATING_TYPES(regions.scalar_type(), "xattn_similarity_bwd_cpu", [&] {
    std::vector<scalar_t> g_img, g_txt;
    Problem<scalar_t> P = make_problem<scalar_t>(c.regions, c.rl, c.words, c.wl, o, g_img, g_txt);
    backward_kernel<scalar_t>(P, grad.data_ptr<scalar_t>(), need_grad_regions ? gr.data_ptr<scalar_t>() : nullptr,
                              need_grad_words ? gw.data_ptr<scalar_t>() : nullptr);
  });
  return {gr, gw};
}

}  // namespace
}  // namespace mefn

TORCH_LIBRARY(mefn_fast, m) {
  m.def(
      "xattn_similarity_fwd(Tensor regions, Tensor region_lengths, Tensor words, Tensor word_lengths, str direction, "
      "float lambda_t2i, float lambda_i2t, str attn_norm, bool mfe, float tau, str agg, float lambda_lse) -> Tensor");
  m.def(
      "xattn_similarity_bwd(Tensor grad_scores, Tensor regions, Tensor region_lengths, Tensor words, "
      "Tensor word_lengths, str direction, float lambda_t2i, float lambda_i2t, str attn_norm, bool mfe, float tau, "
      "str agg, float lambda_lse, bool need_grad_regions, bool need_grad_words) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mefn_fast, CPU, m) {
  m.impl("xattn_similarity_fwd", &mefn::xattn_similarity_fwd_cpu);
  m.impl("xattn_similarity_bwd", &mefn::xattn_similarity_bwd_cpu);
}
