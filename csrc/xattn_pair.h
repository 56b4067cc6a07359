// Per-pair math of the cross-attention similarity (docs/math.md, section 1), shared by the CPU op
// (csrc/xattn_similarity.cpp) and the CUDA op (csrc/cuda/xattn_cuda.cu): host + device inline
// functions on caller-owned buffers, no allocation and no library calls.
//
// The unit of work is a *panel*: one context item (n valid rows, padded to n_pad) against a run of
// query items laid side by side in the columns of a cosine tile (docs/design.md, "the blocked
// algorithm"). Query item j owns the columns [j w, j w + w) of the panel, of which the first m_j are
// valid; the other columns are zero (padded rows of the packed query side), take part in the
// elementwise work and never in an output. For every query column k and context row r:
//
//   L_rk  = lambda S_rk                                   (attn_norm "none")
//         = lambda P_rk / (rho_r + 1e-8),  P = leaky(S), rho_r = ||P_r.|| over the item's valid k
//   e_rk  = exp(L_rk - mx_k),  mx_k = max_r L_rk,  A = e / sum_r e      (softmax over the rows)
//   H_k   = log sum_r e_rk + sum_r e_rk (mx_k - L_rk) / sum_r e_rk      (entropy, log domain)
//   R_k   = (sum_r A_rk S_rk) / sqrt(max(A_k^T G A_k, 1e-16))          (Gram form)
//   w     = softmax_k(-(H_k / log n) / tau) (mfe) or 1/m,  score = sum_k w_k R_k (mean)
//           or (log m + logsumexp_k(log w_k + lambda_lse R_k)) / lambda_lse (lse)
//
// The work is split into the phases of the blocked algorithm, each a loop nest that a device
// schedules its own way (the CPU over SIMD strips of 16 columns, CUDA one thread per column, row or
// item): segment_sumsq, clip_factor and segment_scale (clipped rows), strip_forward (softmax and column statistics), then the
// caller's batched product GE = G E, strip_attend (R), segment_score (weights, aggregation); and
// backward segment_backward, strip_backward, segment_clip_backward, after which the caller
// accumulates dG += E~ E^T and the gradient products.
//
// Strip functions are templates on the lane type V: T itself (one column) or, on the host, a SIMD
// vector of T (xattn_lanes.h) covering consecutive columns; everything per column is then in
// registers. The math section may be compiled a second time inside another namespace (define
// MEFN_XATTN_PAIR_REINCLUDE and include again): the CPU op does so once per instruction set and
// picks the copy at run time (csrc/xattn_cpu_epilogue.h).
#ifndef MEFN_XATTN_PAIR_H_
#define MEFN_XATTN_PAIR_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define MEFN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MEFN_HOST_DEVICE inline
#endif

// A pragma that lets the host compiler vectorise a reduction loop (ignored on the device).
#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define MEFN_SIMD_REDUCE(...)
#else
#define MEFN_PRAGMA_(x) _Pragma(#x)
#define MEFN_SIMD_REDUCE(...) MEFN_PRAGMA_(omp simd reduction(__VA_ARGS__))
#endif


namespace mefn {

// Which scores a call computes: text-to-image, image-to-text, or their mean (docs/math.md, directions).
enum Direction { kT2I = 0, kI2T = 1, kBoth = 2 };

// Constants of the per-pair function (docs/math.md; identical to mefn_fast/backends/reference.py).
constexpr double kNormEps = 1e-12;             // F.normalize's eps (step 1)
constexpr double kClipEps = 1e-8;              // clipped_l2norm's eps (step 3)
constexpr double kAttendedNormSqEps = 1e-16;   // floor of A^T G A (step 5)
constexpr double kLeakySlope = 0.1;            // leaky_relu slope of clipped_l2norm (step 3)

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

// Entries of slack at the end of every tile buffer: the host's SIMD segment functions read and
// write up to one vector past a row (segment_scale, segment_clip_backward).
constexpr int64_t kTileSlack = 16;

// The per-column statistics of a panel, one array each (EpilogueJob::st).
enum Stat {
  kInv = 0,   // 1 / sum_r e_rk
  kMx,        // max_r L_rk
  kLogSum,    // log sum_r e_rk
  kH,         // entropy H_k
  kNum,       // sum_r A_rk S_rk
  kU,         // A_k^T G A_k
  kR,         // attended cosine R_k
  kDR,        // backward: dScore/dR_k
  kDH,        // backward: dScore/dH_k
  kLogW,      // scratch of the per-item functions: log w_k
  kNumStats
};

// One direction's epilogue over a block pair: nc context items (panels) of n_pad rows against nq
// query items of w columns each. Every pointer is in the device's memory; the tiles have row
// strides as given, the statistics are kNumStats arrays of nc * cols, rho is (nc * n_pad) x nq.
template <typename T>
struct EpilogueJob {
  int64_t nc = 0, n_pad = 0, nq = 0, w = 0;
  const int64_t* c_len = nullptr;   // valid rows of each context item (nc)
  const int64_t* q_len = nullptr;   // valid columns of each query item (nq)
  const T* S = nullptr;  int64_t lds = 0;   // cosine tile, (nc n_pad) x cols
  T* L = nullptr;        int64_t ldl = 0;   // clipped_l2norm: logits (backward: their gradient)
  T* E = nullptr;        int64_t lde = 0;   // e = exp(L - mx), padded rows 0
  const T* GE = nullptr; int64_t ldg = 0;   // G E, the caller's batched product
  T* D = nullptr;        int64_t ldd = 0;   // backward scratch: dA, then E~ = e inv^2 du
  T* dE = nullptr;       int64_t ldde = 0;  // backward, clipped_l2norm: dScore/dE
  T* dS = nullptr;       int64_t ldds = 0;  // backward: dScore/dS of the panel's entries
  T* st = nullptr;       // statistics (kNumStats x nc x cols)
  T* rho = nullptr;      // clipped row norms (nc n_pad x nq)
  PairParams<T> p;
  // scores: out[c_idx[c] * out_c + q_idx[q] * out_q] (=, or += scale * score when accumulate);
  // the backward reads its upstream gradient from grad with the same indexing, times scale.
  T* out = nullptr;
  const T* grad = nullptr;
  const int64_t* c_idx = nullptr;
  const int64_t* q_idx = nullptr;
  int64_t out_c = 0, out_q = 0;
  T scale = T(1);
  bool accumulate = false;
  MEFN_HOST_DEVICE int64_t cols() const { return nq * w; }
  MEFN_HOST_DEVICE T* stat(Stat s, int64_t c) const { return st + (int64_t(s) * nc + c) * cols(); }
};

}  // namespace mefn

#endif  // MEFN_XATTN_PAIR_H_

#if !defined(MEFN_XATTN_PAIR_MATH_) || defined(MEFN_XATTN_PAIR_REINCLUDE)
#ifndef MEFN_XATTN_PAIR_REINCLUDE
#define MEFN_XATTN_PAIR_MATH_
#endif

namespace mefn {

// ------------------------------------------------------------------------------------------------
// Scalars as one-lane vectors, and the scalar math (the host's SIMD lanes are in xattn_lanes.h)

template <typename V> struct Lanes;
template <> struct Lanes<float> {
  using T = float;
  static constexpr int W = 1;
  MEFN_HOST_DEVICE static float load(const float* p) { return *p; }
  MEFN_HOST_DEVICE static void store(float* p, float v) { *p = v; }
  MEFN_HOST_DEVICE static float splat(float x) { return x; }
};
template <> struct Lanes<double> {
  using T = double;
  static constexpr int W = 1;
  MEFN_HOST_DEVICE static double load(const double* p) { return *p; }
  MEFN_HOST_DEVICE static void store(double* p, double v) { *p = v; }
  MEFN_HOST_DEVICE static double splat(double x) { return x; }
};

template <typename T> MEFN_HOST_DEVICE T m_max(T a, T b) { return a > b ? a : b; }
MEFN_HOST_DEVICE float m_sqrt(float x) { return sqrtf(x); }
MEFN_HOST_DEVICE double m_sqrt(double x) { return sqrt(x); }
MEFN_HOST_DEVICE double m_exp(double x) { return exp(x); }
MEFN_HOST_DEVICE double m_log(double x) { return log(x); }
MEFN_HOST_DEVICE double m_expm1(double x) { return expm1(x); }
MEFN_HOST_DEVICE float m_expm1(float x) { return expm1f(x); }
// (c > 0) ? a : b, lane by lane
MEFN_HOST_DEVICE float sel_pos(float c, float a, float b) { return c > 0.0f ? a : b; }
MEFN_HOST_DEVICE double sel_pos(double c, double a, double b) { return c > 0.0 ? a : b; }
// lane l of x when k + l < m, else 0 (x may hold anything there, even NaN)
MEFN_HOST_DEVICE float lanes_below(float x, int64_t k, int64_t m) { return k < m ? x : 0.0f; }
MEFN_HOST_DEVICE double lanes_below(double x, int64_t k, int64_t m) { return k < m ? x : 0.0; }
// the sum of the lanes, in a fixed order
MEFN_HOST_DEVICE float lanes_sum(float x) { return x; }
MEFN_HOST_DEVICE double lanes_sum(double x) { return x; }
// stores the first n lanes of x at p (n >= 1)
MEFN_HOST_DEVICE void lanes_store_first(float* p, float x, int64_t) { *p = x; }
MEFN_HOST_DEVICE void lanes_store_first(double* p, double x, int64_t) { *p = x; }

#ifndef __CUDA_ARCH__
// Cephes' expf and logf as plain arithmetic (no libm call), so that a compiler vectorises the
// loops that use them; templates over a float lane type V (float, or vfloat on the host) with the
// bit casts, conversions and selects below. Relative error below 2 ulp.
MEFN_HOST_DEVICE int32_t lanes_bits(float x) { int32_t i; memcpy(&i, &x, 4); return i; }
MEFN_HOST_DEVICE float lanes_from_bits(int32_t i) { float x; memcpy(&x, &i, 4); return x; }
MEFN_HOST_DEVICE int32_t lanes_to_int(float x) { return static_cast<int32_t>(x); }
MEFN_HOST_DEVICE float lanes_to_float(int32_t i) { return static_cast<float>(i); }
MEFN_HOST_DEVICE float sel_lt(float a, float b, float x, float y) { return a < b ? x : y; }
MEFN_HOST_DEVICE int32_t sel_lt_int(float a, float b, int32_t x, int32_t y) { return a < b ? x : y; }
#endif
#ifndef __CUDACC__
// The host's SIMD lanes: GCC vectors as wide as the instruction set this copy of the math is
// compiled for (MEFN_HOST_LANE_BYTES, defined by the including file: 64 bytes for AVX-512, 32 for
// AVX2, 16 for the default SSE2 copy), so that one lane vector is one register and the strip
// loops keep their values in registers (a vector twice a register's width, lowered to pairs of
// AVX2 registers, measured spilling to the stack in the softmax loops).
#ifndef MEFN_HOST_LANE_BYTES
#define MEFN_HOST_LANE_BYTES 16
#endif
typedef float vfloat __attribute__((vector_size(MEFN_HOST_LANE_BYTES)));
typedef double vdouble __attribute__((vector_size(MEFN_HOST_LANE_BYTES)));
typedef int32_t vint32 __attribute__((vector_size(MEFN_HOST_LANE_BYTES)));
template <> struct Lanes<vfloat> {
  using T = float;
  static constexpr int W = int(sizeof(vfloat) / sizeof(float));
  static inline vfloat load(const float* p) { vfloat v; memcpy(&v, p, sizeof v); return v; }
  static inline void store(float* p, vfloat v) { memcpy(p, &v, sizeof v); }
  static inline vfloat splat(float x) { return vfloat{} + x; }
};
template <> struct Lanes<vdouble> {
  using T = double;
  static constexpr int W = int(sizeof(vdouble) / sizeof(double));
  static inline vdouble load(const double* p) { vdouble v; memcpy(&v, p, sizeof v); return v; }
  static inline void store(double* p, vdouble v) { memcpy(p, &v, sizeof v); }
  static inline vdouble splat(double x) { return vdouble{} + x; }
};
// The lane type of T on the host.
template <typename T> struct HostLanes;
template <> struct HostLanes<float> { using V = vfloat; };
template <> struct HostLanes<double> { using V = vdouble; };

// the lane indices 0, 1, ..., W - 1
template <typename V>
inline V lane_index() {
  V idx{};
  for (int i = 0; i < Lanes<V>::W; ++i) idx[i] = i;
  return idx;
}
inline vfloat lanes_below(vfloat x, int64_t k, int64_t m) { return lane_index<vfloat>() < float(m - k) ? x : vfloat{}; }
inline vdouble lanes_below(vdouble x, int64_t k, int64_t m) { return lane_index<vdouble>() < double(m - k) ? x : vdouble{}; }
inline void lanes_store_first(float* p, vfloat x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = x[i];
}
inline void lanes_store_first(double* p, vdouble x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = x[i];
}
// the sum of the lanes in a fixed tree (lane i + lane i + W/2, then halves again)
template <typename V, typename T = typename Lanes<V>::T>
inline T lanes_tree_sum(V v) {
  T a[Lanes<V>::W];
  memcpy(a, &v, sizeof a);
  for (int h = Lanes<V>::W / 2; h > 0; h /= 2)
    for (int i = 0; i < h; ++i) a[i] += a[i + h];
  return a[0];
}
inline float lanes_sum(vfloat v) { return lanes_tree_sum(v); }
inline double lanes_sum(vdouble v) { return lanes_tree_sum(v); }
inline vfloat m_max(vfloat a, vfloat b) { return a > b ? a : b; }
inline vdouble m_max(vdouble a, vdouble b) { return a > b ? a : b; }
inline vfloat sel_pos(vfloat c, vfloat a, vfloat b) { return c > 0.0f ? a : b; }
inline vdouble sel_pos(vdouble c, vdouble a, vdouble b) { return c > 0.0 ? a : b; }
inline vfloat sel_lt(vfloat a, vfloat b, vfloat x, vfloat y) { return a < b ? x : y; }
inline vint32 sel_lt_int(vfloat a, vfloat b, vint32 x, vint32 y) { return a < b ? x : y; }
inline vint32 lanes_bits(vfloat x) { vint32 i; memcpy(&i, &x, sizeof i); return i; }
inline vfloat lanes_from_bits(vint32 i) { vfloat x; memcpy(&x, &i, sizeof x); return x; }
inline vint32 lanes_to_int(vfloat x) { return __builtin_convertvector(x, vint32); }
inline vfloat lanes_to_float(vint32 i) { return __builtin_convertvector(i, vfloat); }
inline vfloat m_sqrt(vfloat x) {
  for (int i = 0; i < Lanes<vfloat>::W; ++i) x[i] = __builtin_sqrtf(x[i]);
  return x;
}
inline vdouble m_sqrt(vdouble x) {
  for (int i = 0; i < Lanes<vdouble>::W; ++i) x[i] = __builtin_sqrt(x[i]);
  return x;
}
// float64 lanes take libm's exp and log one lane at a time (exact to the last bit matters more
// there than speed)
inline vdouble m_exp_nonpos(vdouble x) {
  for (int i = 0; i < Lanes<vdouble>::W; ++i) x[i] = exp(x[i]);
  return x;
}
inline vdouble m_log_ge1(vdouble x) {
  for (int i = 0; i < Lanes<vdouble>::W; ++i) x[i] = log(x[i]);
  return x;
}
#endif
#ifndef __CUDA_ARCH__
// exp(x) for x <= 0; 0 below -87.34 (where expf underflows to subnormals).
template <typename V>
MEFN_HOST_DEVICE V exp_nonpos(V x) {
  using L = Lanes<V>;
  const V lo = L::splat(-87.3365447505531f);
  const V xc = sel_lt(x, lo, lo, x);
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = L::splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const V scale = lanes_from_bits((lanes_to_int(n) + 127) << 23);
  return sel_lt(x, lo, L::splat(0.0f), p * scale);
}

// log(x) for positive normal x.
template <typename V>
MEFN_HOST_DEVICE V log_pos(V x) {
  using L = Lanes<V>;
  const auto bits = lanes_bits(x);
  auto e = ((bits >> 23) & 0xff) - 126;                                // x = f 2^e, f in [0.5, 1)
  V f = lanes_from_bits((bits & 0x007fffff) | 0x3f000000);
  const V half_sqrt2 = L::splat(0.707106781186547524f);
  e = sel_lt_int(f, half_sqrt2, e - 1, e);
  f = sel_lt(f, half_sqrt2, f + f - 1.0f, f - 1.0f);
  const V z = f * f;
  V y = L::splat(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const V fe = lanes_to_float(e);
  y = y + fe * -2.12194440e-4f;
  y = y - z * 0.5f;
  return f + y + fe * 0.693359375f;
}

MEFN_HOST_DEVICE float m_exp_nonpos(float x) { return exp_nonpos(x); }
MEFN_HOST_DEVICE float m_log_ge1(float x) { return log_pos(x); }
#ifndef __CUDACC__
inline vfloat m_exp_nonpos(vfloat x) { return exp_nonpos(x); }
inline vfloat m_log_ge1(vfloat x) { return log_pos(x); }
#endif
#else
MEFN_HOST_DEVICE float m_exp_nonpos(float x) { return expf(x); }
MEFN_HOST_DEVICE float m_log_ge1(float x) { return logf(x); }
#endif
MEFN_HOST_DEVICE double m_exp_nonpos(double x) { return exp(x); }
MEFN_HOST_DEVICE double m_log_ge1(double x) { return log(x); }
// exp and log of the per-item (not per-cell) work, where accuracy matters more than speed
MEFN_HOST_DEVICE float m_exp(float x) { return expf(x); }
MEFN_HOST_DEVICE float m_log(float x) { return logf(x); }

// leaky_relu(s, 0.1) as max(s, 0.1 s): both operands are always computed, so loops using it
// vectorise. Bitwise equal to torch's s > 0 ? s : s * 0.1.
template <typename V, typename T>
MEFN_HOST_DEVICE V leaky(V s) { return m_max(s, s * T(kLeakySlope)); }

// ------------------------------------------------------------------------------------------------
// Forward

// clipped_l2norm for one context row of one query item (m valid of w columns), in two steps so
// that a device can batch the square roots and divisions of a row's items:
//   segment_sumsq: sum_k leaky(S_k)^2 over the m valid columns, = rho^2;
//   clip_factor:   c = 1 / (rho + 1e-8);
//   segment_scale: the logits L_k = lambda (c leaky(S_k)), 0 on the padded columns (E = c leaky(S)
//                  first, |E| <= 1, so that L stays finite for any finite lambda).
// With SIMD lanes (W > 1) they read up to W - 1 entries past S[w) (the caller's buffers have that
// slack, kTileSlack), and segment_scale may write whole vectors up to `room` entries from L
// (the rest of the row: the next items' calls overwrite what spills into them), lane by lane past it.
template <typename V, typename T>
MEFN_HOST_DEVICE T segment_sumsq(const T* S, int64_t m) {
  using Ln = Lanes<V>;
  V ss = Ln::splat(T(0));
  for (int64_t k = 0; k < m; k += Ln::W) {
    const V q = lanes_below(leaky<V, T>(Ln::load(S + k)), k, m);
    ss = ss + q * q;
  }
  return lanes_sum(ss);
}

template <typename T>
MEFN_HOST_DEVICE T clip_factor(T rho) { return T(1) / (rho + T(kClipEps)); }

template <typename V, typename T>
MEFN_HOST_DEVICE void segment_scale(const T* S, T* L, int64_t m, int64_t w, T c, T lam, int64_t room) {
  using Ln = Lanes<V>;
  for (int64_t k = 0; k < w; k += Ln::W) {
    const V x = (lanes_below(leaky<V, T>(Ln::load(S + k)), k, m) * c) * lam;
    if (k + Ln::W <= room) Ln::store(L + k, x);
    else lanes_store_first(L + k, x, w - k);
  }
}

// The logit of row r (lanes = columns): from L (clipped) or lambda S.
template <typename V, typename T>
MEFN_HOST_DEVICE V logit_row(const T* S, int64_t lds, const T* L, int64_t ldl, bool clipped, T lam, int64_t r) {
  return clipped ? Lanes<V>::load(L + r * ldl) : Lanes<V>::load(S + r * lds) * lam;
}

// Softmax over the n context rows of a strip of columns (one lane each): writes e (rows n..n_pad
// zero) and the statistics kInv, kMx, kLogSum, kH, kNum of the strip's columns (st: the strip's
// entry of the first statistic, stride sst between statistics). With have_mx, kMx already holds
// the column maxima of the logits (a device that computed them with the logits).
template <typename V, typename T>
MEFN_HOST_DEVICE void strip_forward(const T* S, int64_t lds, const T* L, int64_t ldl, bool clipped, T lam, int64_t n,
                                    int64_t n_pad, T* E, int64_t lde, T* st, int64_t sst, bool have_mx = false) {
  using Ln = Lanes<V>;
  V mx;
  if (have_mx) {
    mx = Ln::load(st + kMx * sst);
  } else {
    mx = logit_row<V>(S, lds, L, ldl, clipped, lam, 0);
    for (int64_t r = 1; r < n; ++r) mx = m_max(mx, logit_row<V>(S, lds, L, ldl, clipped, lam, r));
  }
  V sum = Ln::splat(T(0)), t = Ln::splat(T(0)), num = Ln::splat(T(0));
  for (int64_t r = 0; r < n; ++r) {
    const V d = mx - logit_row<V>(S, lds, L, ldl, clipped, lam, r);
    const V e = m_exp_nonpos(-d);
    sum = sum + e;
    t = t + e * d;
    num = num + e * Ln::load(S + r * lds);
    Ln::store(E + r * lde, e);
  }
  for (int64_t r = n; r < n_pad; ++r) Ln::store(E + r * lde, Ln::splat(T(0)));
  const V inv = T(1) / sum;
  const V log_sum = m_log_ge1(sum);
  Ln::store(st + kInv * sst, inv);
  Ln::store(st + kMx * sst, mx);
  Ln::store(st + kLogSum * sst, log_sum);
  Ln::store(st + kH * sst, log_sum + t * inv);
  Ln::store(st + kNum * sst, num * inv);
}

// After GE = G E: u = A^T G A and R = num / sqrt(max(u, 1e-16)) of a strip.
template <typename V, typename T>
MEFN_HOST_DEVICE void strip_attend(const T* E, int64_t lde, const T* GE, int64_t ldg, int64_t n, T* st, int64_t sst) {
  using Ln = Lanes<V>;
  V u = Ln::splat(T(0));
  for (int64_t r = 0; r < n; ++r) u = u + Ln::load(E + r * lde) * Ln::load(GE + r * ldg);
  const V inv = Ln::load(st + kInv * sst);
  u = u * (inv * inv);
  Ln::store(st + kU * sst, u);
  const V floor = Ln::splat(T(kAttendedNormSqEps));
  Ln::store(st + kR * sst, Ln::load(st + kNum * sst) / m_sqrt(m_max(u, floor)));
}

// log w_k of one query item's m valid columns (H: its entries of kH) into logw; n: the context's
// valid rows.
template <typename T>
MEFN_HOST_DEVICE void segment_log_weights(const T* H, int64_t m, int64_t n, const PairParams<T>& p, T* logw) {
  if (!p.mfe) {
    const T lw = -m_log(T(m));
    for (int64_t k = 0; k < m; ++k) logw[k] = lw;
    return;
  }
  // logits -(H_k / log n) / tau, rounded as the reference rounds them (with tau tiny they are huge
  // and the weights follow their last bits)
  const T log_n = n > 1 ? m_log(T(n)) : T(1);
  for (int64_t k = 0; k < m; ++k) logw[k] = n > 1 ? -(H[k] / log_n) / p.tau : T(0);
  T mx = logw[0];
  for (int64_t k = 1; k < m; ++k) mx = m_max(mx, logw[k]);
  T sum = T(0);
  MEFN_SIMD_REDUCE(+ : sum)
  for (int64_t k = 0; k < m; ++k) sum += m_exp_nonpos(logw[k] - mx);
  const T lse = mx + m_log(sum);
  for (int64_t k = 0; k < m; ++k) logw[k] -= lse;
}

// The score of one query item (docs/math.md, steps 7-8). H, R: its m valid entries of kH and kR;
// logw: scratch of m.
template <typename T>
MEFN_HOST_DEVICE T segment_score(const T* H, const T* R, int64_t m, int64_t n, const PairParams<T>& p, T* logw) {
  (segment_log_weights)(H, m, n, p, logw);  // parenthesised: no ADL into another copy of this header
  if (!p.agg_lse) {
    T s = T(0);
    MEFN_SIMD_REDUCE(+ : s)
    for (int64_t k = 0; k < m; ++k) s += m_exp_nonpos(logw[k]) * R[k];
    return s;
  }
  T mx = logw[0] + p.lambda_lse * R[0];
  for (int64_t k = 1; k < m; ++k) mx = m_max(mx, logw[k] + p.lambda_lse * R[k]);
  T sum = T(0);
  MEFN_SIMD_REDUCE(+ : sum)
  for (int64_t k = 0; k < m; ++k) sum += m_exp_nonpos(logw[k] + p.lambda_lse * R[k] - mx);
  return (m_log(T(m)) + (mx + m_log(sum))) / p.lambda_lse;
}

// ------------------------------------------------------------------------------------------------
// Backward

// One query item's part of the backward for an upstream gradient g of its score: dR_k and dH_k
// for its m valid columns (dR, dH: its entries of kDR, kDH), 0 on its w - m padded ones.
// logw: scratch of m. The log-softmax backward dlogw_k - w_k sum_j dlogw_j is formed as
// w_k times a difference taken around the heaviest weight (mean) or with expm1 (lse): with tau
// tiny the weights are nearly one-hot and the plain form cancels.
template <typename T>
MEFN_HOST_DEVICE void segment_backward(T g, const T* H, const T* R, int64_t m, int64_t w, int64_t n,
                                       const PairParams<T>& p, T* logw, T* dR, T* dH) {
  (segment_log_weights)(H, m, n, p, logw);
  const bool weights = p.mfe && n > 1;
  const T c = weights ? T(-1) / (p.tau * m_log(T(n))) : T(0);   // dlog w / dH
  if (!p.agg_lse) {
    // dR_k = g w_k; dlogw_k = g w_k R_k; dH_k = c g w_k (R_k - sum_j w_j R_j)
    int64_t top = 0;
    for (int64_t k = 1; k < m; ++k) top = logw[k] > logw[top] ? k : top;
    T dev = T(0);   // sum_j w_j (R_j - R_top)
    for (int64_t k = 0; k < m; ++k) dev += m_exp(logw[k]) * (R[k] - R[top]);
    for (int64_t k = 0; k < m; ++k) {
      const T wk = m_exp(logw[k]);
      dR[k] = g * wk;
      dH[k] = weights ? c * g * wk * ((R[k] - R[top]) - dev) : T(0);
    }
  } else {
    // p_k = softmax_k(log w_k + l R_k): dR_k = g p_k; dlogw_k = g p_k / l; dH_k = c g (p_k - w_k) / l,
    // p_k - w_k = w_k expm1(l R_k - log sum_j w_j exp(l R_j))
    const T l = p.lambda_lse;
    T mx = logw[0] + l * R[0];
    for (int64_t k = 1; k < m; ++k) mx = m_max(mx, logw[k] + l * R[k]);
    T sum = T(0);
    for (int64_t k = 0; k < m; ++k) sum += m_exp(logw[k] + l * R[k] - mx);
    const T lse = mx + m_log(sum);
    for (int64_t k = 0; k < m; ++k) {
      const T pk = m_exp(logw[k] + l * R[k] - lse);
      dR[k] = g * pk;
      dH[k] = weights ? c * g * m_exp(logw[k]) * m_expm1(l * R[k] - lse) / l : T(0);
    }
  }
  for (int64_t k = m; k < w; ++k) {
    dR[k] = T(0);
    dH[k] = T(0);
  }
}

// The strip's part of the backward, after segment_backward: with A = e inv, GA = GE inv,
//   dnum = dR / sqrt(max(u, eps)),  du = u > eps ? -dR R / (2 u) : 0,
//   dA   = dnum S + 2 du GA,        dL = A (dA - sum_r A dA) - dH A (log A + H),
// log A = (L - mx) - log sum (no large cancelling terms when lambda is large). Writes
// dS = dnum A + lambda dL (clipped_l2norm: dnum A, and dE = lambda dL for segment_clip_backward)
// and E~ = e inv^2 du into D (after using D for dA), for dG += E~ E^T. Rows n..n_pad of dS and D
// are set to 0. Reads the forward's S, L, E and G E only.
template <typename V, typename T>
MEFN_HOST_DEVICE void strip_backward(const T* S, int64_t lds, const T* L, int64_t ldl, bool clipped, T lam, int64_t n,
                                     int64_t n_pad, const T* E, int64_t lde, const T* GE, int64_t ldg, T* D,
                                     int64_t ldd, T* dE, int64_t ldde, T* dS, int64_t ldds, const T* st,
                                     int64_t sst) {
  using Ln = Lanes<V>;
  const V inv = Ln::load(st + kInv * sst), mx = Ln::load(st + kMx * sst), log_sum = Ln::load(st + kLogSum * sst);
  const V H = Ln::load(st + kH * sst), u = Ln::load(st + kU * sst), R = Ln::load(st + kR * sst);
  const V dR = Ln::load(st + kDR * sst), dH = Ln::load(st + kDH * sst);
  const V eps = Ln::splat(T(kAttendedNormSqEps));
  const V dnum = dR / m_sqrt(m_max(u, eps));
  const V du = sel_pos(u - eps, T(-0.5) * dR * R / m_max(u, eps), Ln::splat(T(0)));
  const V two_du_inv = T(2) * du * inv;
  V dot = Ln::splat(T(0));
  for (int64_t r = 0; r < n; ++r) {
    const V dA = dnum * Ln::load(S + r * lds) + two_du_inv * Ln::load(GE + r * ldg);
    dot = dot + Ln::load(E + r * lde) * dA;
    Ln::store(D + r * ldd, dA);
  }
  dot = dot * inv;
  const V et_scale = inv * inv * du;
  for (int64_t r = 0; r < n; ++r) {
    const V e = Ln::load(E + r * lde);
    const V A = e * inv;
    const V log_a = (logit_row<V>(S, lds, L, ldl, clipped, lam, r) - mx) - log_sum;
    const V dL = A * (Ln::load(D + r * ldd) - dot) - dH * A * (log_a + H);
    if (clipped) {
      Ln::store(dS + r * ldds, dnum * A);
      Ln::store(dE + r * ldde, lam * dL);
    } else {
      Ln::store(dS + r * ldds, dnum * A + lam * dL);
    }
    Ln::store(D + r * ldd, e * et_scale);
  }
  for (int64_t r = n; r < n_pad; ++r) {
    Ln::store(dS + r * ldds, Ln::splat(T(0)));
    Ln::store(D + r * ldd, Ln::splat(T(0)));
  }
}

// clipped_l2norm backward for one context row of one query item: with P = leaky(S), c = 1/(rho + eps),
// P^ = P / rho and q = sum_k dE_k P^_k,
//   dP_k = c dE_k - c^2 P_k sum_k dE_k P_k / rho = c ((dE_k - P^_k q) + eps c P^_k q),
// the projection form, which keeps the tiny true gradient of an item with one valid column
// (E = +-1 for any P) instead of cancelling two large terms; P^ by division, so that for m = 1
// P^ = +-1 exactly and the bracket cancels exactly (for m > 1, by a multiplication with 1 / rho,
// cheaper than a division a cell). A zero row has P^ = 0. Adds dS += dP dP/dS
// on the m valid columns (with SIMD lanes, reads up to W - 1 entries past them and rewrites them
// unchanged within `room`, like segment_scale).
template <typename V, typename T>
MEFN_HOST_DEVICE void segment_clip_backward(const T* S, const T* dE, T rho, int64_t m, T* dS, int64_t room) {
  using Ln = Lanes<V>;
  const T r = rho > T(0) ? rho : T(1);
  const T on = rho > T(0) ? T(1) : T(0);
  const T inv_r = T(1) / r;
  // P^ of a lane: leaky(s) / r for one valid column, leaky(s) * (1 / r) for more
  auto unit = [&](const V& s) { return m == 1 ? leaky<V, T>(s) / r : leaky<V, T>(s) * inv_r; };
  V qv = Ln::splat(T(0));
  for (int64_t k = 0; k < m; k += Ln::W) qv = qv + lanes_below(Ln::load(dE + k) * (on * unit(Ln::load(S + k))), k, m);
  const T q = lanes_sum(qv);
  const T c = T(1) / (rho + T(kClipEps));
  for (int64_t k = 0; k < m; k += Ln::W) {
    const V s = Ln::load(S + k);
    const V pq = on * unit(s) * q;
    const V dP = c * ((Ln::load(dE + k) - pq) + T(kClipEps) * c * pq);
    const V x = Ln::load(dS + k) + lanes_below(sel_pos(s, dP, dP * T(kLeakySlope)), k, m);
    if (k + Ln::W <= room) Ln::store(dS + k, x);
    else lanes_store_first(dS + k, x, m - k);
  }
}

}  // namespace mefn

#endif  // the math functions
