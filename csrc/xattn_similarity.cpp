// The cross-attention similarity (docs/math.md, section 1) as torch.library ops, with CPU kernels.
//
//   mefn_fast::xattn_similarity_fwd(regions, region_lengths, words, word_lengths, <options>)
//       -> scores (B_img, B_txt)
//   mefn_fast::xattn_similarity_bwd(grad_scores, regions, region_lengths, words, word_lengths,
//       <options>, need_grad_regions, need_grad_words) -> (grad_regions, grad_words)
//   mefn_fast::xattn_similarity_fwd_saved(<the forward's arguments>, budget) -> (scores, saved)
//   mefn_fast::xattn_similarity_bwd_saved(grad_scores, <inputs>, saved, <options>, budget,
//       need_grad_regions, need_grad_words) -> (grad_regions, grad_words)
//
// The _saved pair is the training path (mefn_fast/backends/ext_ops.py takes it under autograd):
// when the tiles of the whole batch fit `budget` bytes, the forward returns them and the backward
// starts from them; otherwise `saved` is empty and the backward recomputes them, one super-block
// of at most `budget` bytes at a time. Autograd and fake kernels are attached in Python; the CUDA
// kernels of csrc/cuda/ register for the CUDA key against the schemas declared here.
//
// Algorithm: the blocked algorithm of xattn_blocked.h (shared with the CUDA op), with this file's
// CpuDev: MKL (through at::mm / at::bmm) for every product, always called inside at::parallel_for
// (with more than one thread) so that each GEMM runs on one thread and its result does not depend
// on the thread count; tasks
// handed out dynamically to the threads (each task owns its outputs, so the order does not
// matter); and the elementwise epilogue of xattn_pair.h in csrc/xattn_cpu_epilogue.h on SIMD
// strips one register wide, compiled three times (generic x86-64, AVX2+FMA, AVX-512) and picked
// at run time.
// Block caps (rows of a packed block): 256 image rows and 512 caption rows, at most an eighth of
// a side's valid rows but at least 64 (so that the backward's passes have parallel work, and a
// small batch is not cut into tiny blocks); a block costs 8 rows. A forward task multiplies a
// caption block by a run of image blocks of at most 2^22 tile entries (16 MiB of float32): the
// taller the GEMM, the less MKL repacks the caption block (measured: a 4608 x 512 x 1024 product
// takes 0.92 of the time of the one product of all rows, a 1152-row one 1.03, on an Intel Xeon).
// Measured on this project's 2-core machine, now an AMD EPYC with AVX2 (one interleaved run,
// ratios to the packed floor, see README "Benchmarks"): the figures are in the README's cpu section.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <utility>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "xattn_blocked.h"
#include "xattn_host.h"
#include "xattn_pair.h"
#include "xattn_cpu_epilogue.h"

// The epilogue once more for AVX2+FMA and once for AVX-512, each in its own namespace
// (mefn::avx2::mefn, mefn::avx512::mefn), chosen at run time when the CPU has it (the package is
// built without -march flags, so the default copy is SSE2). Each copy's SIMD lanes are one register
// of its instruction set wide (MEFN_HOST_LANE_BYTES: 16, 32, 64 bytes). Only the header's math and the CPU
// loops are compiled under the target pragmas: no inline function shared with the default build
// gets their code.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MEFN_NO_ISA_DISPATCH)
#define MEFN_HAVE_ISA_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mefn {
namespace avx2 {
#define MEFN_XATTN_PAIR_REINCLUDE
#undef MEFN_HOST_LANE_BYTES
#define MEFN_HOST_LANE_BYTES 32
#include "xattn_pair.h"
#include "xattn_cpu_epilogue.h"
#undef MEFN_XATTN_PAIR_REINCLUDE
}  // namespace avx2
}  // namespace mefn
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,prefer-vector-width=512")
namespace mefn {
namespace avx512 {
#define MEFN_XATTN_PAIR_REINCLUDE
#undef MEFN_HOST_LANE_BYTES
#define MEFN_HOST_LANE_BYTES 64
#include "xattn_pair.h"
#include "xattn_cpu_epilogue.h"
#undef MEFN_XATTN_PAIR_REINCLUDE
}  // namespace avx512
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

// The CPU epilogue of one instruction set.
template <typename T>
struct CpuKernels {
  void (*fwd_softmax)(const EpilogueJob<T>&);
  void (*fwd_attend_score)(const EpilogueJob<T>&);
  void (*bwd_epilogue)(const EpilogueJob<T>&);
  void (*pack_rows)(const T*, int64_t, const int64_t*, int64_t, int64_t, T*, double*);
  void (*unpack_rows)(const T*, int64_t, const int64_t*, int64_t, int64_t, const T*, const double*, T*);
  void (*transpose)(T*, int64_t, const T*, int64_t, int64_t, int64_t, bool);
  double (*row_norm)(const T*, int64_t);
};

#define MEFN_CPU_KERNELS(NS)                                                                             \
  CpuKernels<T> {                                                                                       \
    &NS::cpu::fwd_softmax<T>, &NS::cpu::fwd_attend_score<T>, &NS::cpu::bwd_epilogue<T>,                 \
        &NS::cpu::pack_rows<T>, &NS::cpu::unpack_rows<T>, &NS::cpu::transpose<T>, &NS::cpu::row_norm<T> \
  }

// The instruction set of this machine's epilogue: AVX-512 or AVX2+FMA when the CPU has them,
// unless MEFN_CPU_ISA names another ("generic", "avx2", "avx512").
std::string cpu_isa() {
#ifdef MEFN_HAVE_ISA_DISPATCH
  static const std::string isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    const char* env = std::getenv("MEFN_CPU_ISA");
    const std::string want = env != nullptr ? env : "";
    if (want == "generic") return std::string("generic");
    if (want == "avx2") return std::string(avx2 ? "avx2" : "generic");
    return std::string(avx512 ? "avx512" : avx2 ? "avx2" : "generic");
  }();
  return isa;
#else
  return "generic";
#endif
}

template <typename T>
CpuKernels<T> cpu_kernels() {
#ifdef MEFN_HAVE_ISA_DISPATCH
  const std::string isa = cpu_isa();
  if (isa == "avx512") return MEFN_CPU_KERNELS(avx512::mefn);
  if (isa == "avx2") return MEFN_CPU_KERNELS(avx2::mefn);
#endif
  return MEFN_CPU_KERNELS(mefn);
}

// Freed big buffers, kept for the next call: glibc returns allocations above its mmap threshold
// (at most 32 MiB) to the kernel when they are freed, and every fresh page then costs a fault and
// a zeroing on first touch (measured: about an eighth of a training step's time). A buffer goes
// back here when its last tensor dies (for the saved tiles, when autograd frees them); a request
// takes the smallest cached buffer that fits and is at most twice as large. At most kMaxBuffers
// buffers and kMaxBytes bytes are kept.
class BufferCache {
 public:
  static at::Tensor empty(int64_t numel, const at::TensorOptions& opts) { return instance().get(numel, opts); }

 private:
  static constexpr size_t kMaxBuffers = 16;
  static constexpr size_t kMaxBytes = size_t(1) << 30;
  static constexpr size_t kSmall = size_t(1) << 20;  // below this, malloc reuses memory well

  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();  // never destroyed: tensors may outlive static destruction
    return *cache;
  }
  at::Tensor get(int64_t numel, const at::TensorOptions& opts) {
    const size_t bytes = size_t(std::max<int64_t>(numel, 1)) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
    if (bytes < kSmall) return at::empty({numel}, opts);
    void* ptr = nullptr;
    size_t cap = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].first >= bytes && free_[i].first <= 2 * bytes && (best == free_.size() || free_[i].first < free_[best].first))
          best = i;
      if (best < free_.size()) {
        cap = free_[best].first;
        ptr = free_[best].second;
        held_ -= cap;
        free_.erase(free_.begin() + best);
      }
    }
    if (ptr == nullptr) {
      cap = (bytes + 4095) / 4096 * 4096;
      ptr = std::aligned_alloc(4096, cap);
      TORCH_CHECK(ptr != nullptr, "xattn_similarity (CPU kernel): out of memory allocating ", cap, " bytes");
    }
    return at::from_blob(ptr, {numel}, [cap](void* p) { instance().put(p, cap); }, opts);
  }
  void put(void* p, size_t cap) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_.size() < kMaxBuffers && held_ + cap <= kMaxBytes) {
        free_.push_back({cap, p});
        held_ += cap;
        return;
      }
    }
    std::free(p);
  }
  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;
  size_t held_ = 0;
};

// A CPU tensor over a host vector (no copy; the vector outlives the tensor's use).
at::Tensor host_tensor(const std::vector<int64_t>& v) {
  return at::from_blob(const_cast<int64_t*>(v.data()), {int64_t(v.size())}, at::TensorOptions().dtype(at::kLong));
}

// The device of the blocked algorithm for CPU tensors of float T (xattn_blocked.h).
template <typename T>
struct CpuDev {
  CpuKernels<T> k = cpu_kernels<T>();

  at::ScalarType gemm_dtype(at::ScalarType in) const { return in; }
  int64_t block_cap(bool images, int64_t valid_rows, int64_t longest) const {
    const int64_t cap = images ? 256 : 512;
    return std::max(longest, std::min(cap, std::max<int64_t>(64, (valid_rows + 7) / 8)));
  }
  int64_t block_cost() const { return 8; }
  int64_t max_panel_entries() const { return int64_t(1) << 22; }
  SideMeta side_meta(const SidePlan& p) const { return {host_tensor(p.len), host_tensor(p.order), host_tensor(p.src_row)}; }

  // Tasks [0, n) handed out to the threads one at a time; f(task, workspace) with one workspace
  // per thread. With more than one thread the tasks always run inside a parallel region, even a
  // single one: there MKL runs every product on its task's thread, whereas outside one it may
  // thread a product itself, and then (as measured on an AMD EPYC, even for products of 40
  // features) its last bits change with the thread count. So the results do not depend on it.
  template <class F>
  void for_tasks(int64_t n, F&& f) {
    if (n <= 0) return;
    if (threads_ == 1) {
      for (int64_t task = 0; task < n; ++task) f(task, ws_[0]);
      return;
    }
    std::atomic<int64_t> next{0};
    // at least two threads, so that the region is active even for one task
    const int64_t threads = std::max<int64_t>(2, std::min<int64_t>(threads_, n));
    // the caller's thread-local dispatch state, for the products on the other threads: the op runs
    // below autograd, whose kernels there would refuse inputs that require grad
    const at::ThreadLocalState caller;
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard guard(caller);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t task = next++; task < n; task = next++) f(task, ws_[t]);
      }
    });
  }
  // one workspace per thread for the whole call (buffers are reused from loop to loop)
  int64_t threads_ = at::get_num_threads();
  std::vector<Workspace> ws_ = std::vector<Workspace>(threads_, Workspace{&BufferCache::empty, {}});
  at::Tensor empty(int64_t numel, const at::TensorOptions& opts) const { return BufferCache::empty(numel, opts); }

  void pack(const at::Tensor& x, const SidePlan& p, const SideMeta&, int64_t b0, int64_t b1, at::Tensor& out,
            at::Tensor* norms) {
    const int64_t q0 = p.blocks[b0].row0, q1 = p.row_end(b1), d = x.size(2);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    double* np = norms != nullptr ? norms->data_ptr<double>() : nullptr;
    at::parallel_for(q0, q1, 64, [&](int64_t a, int64_t b) {
      k.pack_rows(xp, d, p.src_row.data(), a, b, op + (a - q0) * d, np != nullptr ? np + (a - q0) : nullptr);
    });
  }

  // The caller's rows of a side can be the forward's GEMM operand when they need no packing (no
  // padding, the caller's order) and their norms lie where the product of a raw row and a
  // normalised one neither overflows nor loses precision (1e-18 to 1e18, or 0): then inv gets the
  // inverse norms 1 / max(||x||, 1e-12) of the rows, by which the tile's rows are scaled, and the
  // forward keeps no normalised copy of the side.
  bool direct_rows(const at::Tensor& x, const SidePlan& p, at::Tensor& inv) {
    if (p.rows != p.B * p.L) return false;
    for (int64_t q = 0; q < p.rows; ++q)
      if (p.src_row[q] != q) return false;
    const int64_t d = x.size(2);
    inv = at::empty({p.rows}, x.options());
    const T* xp = x.data_ptr<T>();
    T* ip = inv.data_ptr<T>();
    std::atomic<bool> ok{true};
    at::parallel_for(0, p.rows, 64, [&](int64_t a, int64_t b) {
      for (int64_t q = a; q < b; ++q) {
        const double nrm = k.row_norm(xp + q * d, d);
        if (nrm != 0 && !(nrm >= 1e-18 && nrm <= 1e18)) ok = false;
        ip[q] = static_cast<T>(1.0 / std::max(nrm, kNormEps));
      }
    });
    return ok;
  }

  // every row of grad (uninitialised): the valid ones from dX, the caller's padding rows 0
  void unpack_grad(const at::Tensor& x, const SidePlan& p, const SideMeta&, const at::Tensor& dX,
                   const at::Tensor& norms, at::Tensor& grad) {
    const int64_t d = x.size(2);
    const T* xp = x.data_ptr<T>();
    const T* dp = dX.data_ptr<T>();
    const double* np = norms.data_ptr<double>();
    T* gp = grad.data_ptr<T>();
    at::parallel_for(0, p.rows, 64, [&](int64_t a, int64_t b) {
      k.unpack_rows(xp, d, p.src_row.data(), a, b, dp + a * d, np + a, gp);
    });
    for (int64_t s = 0; s < p.B; ++s) {
      T* g = gp + (p.order[s] * p.L + p.len[s]) * d;
      std::fill(g, g + (p.L - p.len[s]) * d, T(0));
    }
  }

  // dst (c x r) = (or +=) src (r x c)^T; rows of unit stride
  void transpose(const at::Tensor& dst, const at::Tensor& src, bool add) {
    k.transpose(dst.data_ptr<T>(), dst.stride(0), src.data_ptr<T>(), src.stride(0), src.size(0), src.size(1), add);
  }

  // out = a b^T
  void mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor o = out;
    at::mm_out(o, a, b.t());
  }
  // out = a b (batched)
  void bmm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor o = out;
    at::bmm_out(o, a, b);
  }
  // out_i = x_i x_i^T (batched)
  void gram(const at::Tensor& out, const at::Tensor& x) {
    at::Tensor o = out;
    at::bmm_out(o, x, x.transpose(1, 2));
  }
  // out += a b^T (batched)
  void baddbmm_t(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor o = out;
    o.baddbmm_(a, b.transpose(1, 2));
  }
  // out += alpha a b (batched)
  void baddbmm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, T alpha, Workspace&) {
    at::Tensor o = out;
    o.baddbmm_(a, b, 1, alpha);
  }
  // out (+)= a b, or a^T b
  void addmm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool transpose_a, bool accumulate,
             Workspace&) {
    at::Tensor o = out;
    if (accumulate) o.addmm_(transpose_a ? a.t() : a, b);
    else at::mm_out(o, transpose_a ? a.t() : a, b);
  }

  void fwd_softmax(const EpilogueJob<T>& j) { k.fwd_softmax(j); }
  void fwd_attend_score(const EpilogueJob<T>& j) { k.fwd_attend_score(j); }
  void bwd_epilogue(const EpilogueJob<T>& j) { k.bwd_epilogue(j); }
};

// ------------------------------------------------------------------------------------------------
// Input checks

void check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, "xattn_similarity: ", name, " must have shape (batch, length, dim); got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "xattn_similarity (CPU kernel): ", name, " must be a CPU tensor; got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "xattn_similarity (CPU kernel): ", name, " must be float32 or float64; got ", x.scalar_type(),
              " (mefn_fast's reference backend computes half precision in float32)");
  TORCH_CHECK(x.size(2) > 0, "xattn_similarity: ", name, " has feature dimension 0");
}

CallInputs check_inputs(const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
                        const at::Tensor& word_lengths, const Options& o) {
  check_features(regions, "regions");
  check_features(words, "words");
  check_feature_pair(regions, words);
  CallInputs c;
  c.regions = regions.contiguous();
  c.words = words.contiguous();
  TORCH_CHECK(region_lengths.device().is_cpu(), "xattn_similarity (CPU kernel): region_lengths must be a CPU tensor");
  TORCH_CHECK(word_lengths.device().is_cpu(), "xattn_similarity (CPU kernel): word_lengths must be a CPU tensor");
  c.rl_host = host_lengths(region_lengths, "region_lengths", regions.size(0), regions.size(1));
  c.wl_host = host_lengths(word_lengths, "word_lengths", words.size(0), words.size(1));
  c.o = o;
  return c;
}

at::Tensor grad_in(const at::Tensor& grad_scores, const at::Tensor& regions, const at::Tensor& words) {
  check_grad_scores_shape(grad_scores, regions, words);
  TORCH_CHECK(grad_scores.device().is_cpu(), "xattn_similarity_bwd (CPU kernel): grad_scores must be a CPU tensor");
  return grad_scores.to(regions.scalar_type()).contiguous();
}

// ------------------------------------------------------------------------------------------------
// The ops

at::Tensor xattn_similarity_fwd_cpu(const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
                                    const at::Tensor& word_lengths, c10::string_view direction, double lambda_t2i,
                                    double lambda_i2t, c10::string_view attn_norm, bool mfe, double tau,
                                    c10::string_view agg, double lambda_lse) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  const CallInputs c = check_inputs(regions, region_lengths, words, word_lengths, o);
  at::Tensor scores;
  AT_DISPATCH_FLOATING_TYPES(regions.scalar_type(), "xattn_similarity_fwd_cpu", [&] {
    CpuDev<scalar_t> dev;
    scores = Blocked<scalar_t, CpuDev<scalar_t>>(dev, c).forward();
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor> xattn_similarity_fwd_saved_cpu(
    const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words, const at::Tensor& word_lengths,
    c10::string_view direction, double lambda_t2i, double lambda_i2t, c10::string_view attn_norm, bool mfe, double tau,
    c10::string_view agg, double lambda_lse, int64_t budget) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  const CallInputs c = check_inputs(regions, region_lengths, words, word_lengths, o);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(regions.scalar_type(), "xattn_similarity_fwd_saved_cpu", [&] {
    CpuDev<scalar_t> dev;
    out = Blocked<scalar_t, CpuDev<scalar_t>>(dev, c).forward_saving(budget);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_scores, const at::Tensor& regions,
                                                const at::Tensor& region_lengths, const at::Tensor& words,
                                                const at::Tensor& word_lengths, const at::Tensor& saved,
                                                const Options& o, int64_t budget, bool need_grad_regions,
                                                bool need_grad_words) {
  const CallInputs c = check_inputs(regions, region_lengths, words, word_lengths, o);
  at::Tensor grad = grad_in(grad_scores, regions, words);
  // gradients: every row is written by the backward (padding rows 0)
  at::Tensor gr = need_grad_regions ? at::empty_like(c.regions) : at::empty({0}, regions.options());
  at::Tensor gw = need_grad_words ? at::empty_like(c.words) : at::empty({0}, words.options());
  if (grad.numel() == 0) {
    gr.zero_();
    gw.zero_();
    return {gr, gw};
  }
  if (!need_grad_regions && !need_grad_words) return {gr, gw};
  AT_DISPATCH_FLOATING_TYPES(regions.scalar_type(), "xattn_similarity_bwd_cpu", [&] {
    CpuDev<scalar_t> dev;
    Blocked<scalar_t, CpuDev<scalar_t>> b(dev, c);
    at::Tensor s = saved.defined() ? saved : at::empty({0}, c.regions.options());
    check_saved(s, b.saved_numel(), c.regions.scalar_type());
    b.backward(grad, s, need_grad_regions ? &gr : nullptr, need_grad_words ? &gw : nullptr, budget);
  });
  return {gr, gw};
}

std::tuple<at::Tensor, at::Tensor> xattn_similarity_bwd_cpu(
    const at::Tensor& grad_scores, const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
    const at::Tensor& word_lengths, c10::string_view direction, double lambda_t2i, double lambda_i2t,
    c10::string_view attn_norm, bool mfe, double tau, c10::string_view agg, double lambda_lse, bool need_grad_regions,
    bool need_grad_words) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  return backward_cpu(grad_scores, regions, region_lengths, words, word_lengths, at::Tensor(), o, kDefaultTileBudget,
                      need_grad_regions, need_grad_words);
}

std::tuple<at::Tensor, at::Tensor> xattn_similarity_bwd_saved_cpu(
    const at::Tensor& grad_scores, const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
    const at::Tensor& word_lengths, const at::Tensor& saved, c10::string_view direction, double lambda_t2i,
    double lambda_i2t, c10::string_view attn_norm, bool mfe, double tau, c10::string_view agg, double lambda_lse,
    int64_t budget, bool need_grad_regions, bool need_grad_words) {
  const Options o = parse_options(direction, lambda_t2i, lambda_i2t, attn_norm, mfe, tau, agg, lambda_lse);
  return backward_cpu(grad_scores, regions, region_lengths, words, word_lengths, saved, o, budget, need_grad_regions,
                      need_grad_words);
}

std::string cpu_isa_op() { return cpu_isa(); }

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
  m.def(
      "xattn_similarity_fwd_saved(Tensor regions, Tensor region_lengths, Tensor words, Tensor word_lengths, "
      "str direction, float lambda_t2i, float lambda_i2t, str attn_norm, bool mfe, float tau, str agg, "
      "float lambda_lse, int budget) -> (Tensor, Tensor)");
  m.def(
      "xattn_similarity_bwd_saved(Tensor grad_scores, Tensor regions, Tensor region_lengths, Tensor words, "
      "Tensor word_lengths, Tensor saved, str direction, float lambda_t2i, float lambda_i2t, str attn_norm, bool mfe, "
      "float tau, str agg, float lambda_lse, int budget, bool need_grad_regions, bool need_grad_words) "
      "-> (Tensor, Tensor)");
  // the instruction set of the CPU epilogue on this machine (for tests and mefn_fast.info)
  m.def("cpu_isa() -> str", &mefn::cpu_isa_op);
}

TORCH_LIBRARY_IMPL(mefn_fast, CPU, m) {
  m.impl("xattn_similarity_fwd", &mefn::xattn_similarity_fwd_cpu);
  m.impl("xattn_similarity_bwd", &mefn::xattn_similarity_bwd_cpu);
  m.impl("xattn_similarity_fwd_saved", &mefn::xattn_similarity_fwd_saved_cpu);
  m.impl("xattn_similarity_bwd_saved", &mefn::xattn_similarity_bwd_saved_cpu);
}
