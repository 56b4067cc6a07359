// Host check of the CUDA per-pair epilogue (csrc/cuda/xattn_pair_warp.cuh) without a GPU.
//
// One warp is emulated by 32 std::threads: __syncwarp() is a barrier and __shfl_xor_sync goes
// through a shared array between two barriers, so the warp code runs unchanged (lane-parallel
// loops, warp reductions, scratch shared by the lanes). Its scores, dScore/dS and dScore/dG are
// compared with mefn::pair_forward / pair_backward of the shared header (csrc/xattn_pair.h), which
// the CPU tests check against the reference, on random pairs of every option, both tile layouts
// (t2i and i2t strides) and sizes around the warp width. Prints "ok" and exits 0 on success.
//
// Build: g++ -std=c++20 -O1 -pthread warp_epilogue_check.cpp (tests/test_xattn_similarity_cuda.py).
#include <barrier>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

namespace emu {
inline std::barrier<>* bar = nullptr;
inline float slots[32];
thread_local int lane_id = 0;
inline void sync() { bar->arrive_and_wait(); }
inline float shfl_xor(float v, int o) {
  sync();
  slots[lane_id] = v;
  sync();
  return slots[lane_id ^ o];
}
}  // namespace emu

#define MEFN_WARP_EMULATION 1
#define MEFN_WARP_FN inline
#define MEFN_WARP_BIG_FN inline
#define MEFN_SYNCWARP() emu::sync()
#define MEFN_SHFL_XOR(v, o) emu::shfl_xor((v), (o))
#include "../../csrc/cuda/xattn_pair_warp.cuh"

using mefn::PairParams;
using mefn::cuda::PairView;
using mefn::cuda::WarpWork;

template <typename F>
static void run_warp(F&& f) {
  std::barrier<> b(32);
  emu::bar = &b;
  std::vector<std::thread> ts;
  for (int l = 0; l < 32; ++l)
    ts.emplace_back([&, l] {
      emu::lane_id = l;
      f(l);
    });
  for (auto& t : ts) t.join();
}

static double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::fmax(m, std::fabs(double(x)));
  return m;
}

int main() {
  std::mt19937 gen(1234);
  std::normal_distribution<double> nd;
  // 1x1, ragged small, one query position per lane and more than one (m > 32), n > 32
  const int sizes[][2] = {{1, 1}, {7, 5}, {40, 3}, {33, 70}};
  int failures = 0, cases = 0;
  double worst = 0;
  for (auto& sz : sizes) {
    const int n = sz[0], m = sz[1], d = 24;
    for (int opt = 0; opt < 8; ++opt) {
      for (int layout = 0; layout < 2; ++layout) {
        PairParams<float> p;
        p.lambda = 7.f;
        p.clipped = opt & 1;
        p.mfe = opt & 2;
        p.tau = 0.4f;
        p.agg_lse = opt & 4;
        p.lambda_lse = 5.f;
        // unit context / query rows -> S (context-major n x m), G (n x n)
        std::vector<double> C(n * d), Q(m * d);
        for (auto& x : C) x = nd(gen);
        for (auto& x : Q) x = nd(gen);
        auto normalize = [&](std::vector<double>& X, int rows) {
          for (int r = 0; r < rows; ++r) {
            double s = 0;
            for (int j = 0; j < d; ++j) s += X[r * d + j] * X[r * d + j];
            s = std::sqrt(s);
            for (int j = 0; j < d; ++j) X[r * d + j] /= s;
          }
        };
        normalize(C, n);
        normalize(Q, m);
        std::vector<float> S(n * m), G(n * n);
        for (int r = 0; r < n; ++r)
          for (int k = 0; k < m; ++k) {
            double s = 0;
            for (int j = 0; j < d; ++j) s += C[r * d + j] * Q[k * d + j];
            S[r * m + k] = float(s);
          }
        for (int r = 0; r < n; ++r)
          for (int s2 = 0; s2 < n; ++s2) {
            double s = 0;
            for (int j = 0; j < d; ++j) s += C[r * d + j] * C[s2 * d + j];
            G[r * n + s2] = float(s);
          }
        const float g = 0.7f;
        // header (sequential)
        std::vector<float> work(mefn::pair_work_size(n, m));
        mefn::PairWork<float> pw = mefn::pair_work_from(work.data(), n, m);
        const float want = mefn::pair_forward(S.data(), G.data(), n, n, m, p, pw);
        std::vector<float> dS_want(n * m), dG_want(n * n, 0.f);
        mefn::pair_backward(g, S.data(), G.data(), n, n, m, p, pw, dS_want.data(), dG_want.data(), n);
        // warp, inside a larger tile with padding (ld > dims), transposed for layout 1
        const int ld = (layout == 0 ? m : n) + 3;
        const int rows = layout == 0 ? n : m;
        std::vector<float> tile(rows * ld, 1e30f), dtile(rows * ld, 0.f);
        PairView v;
        v.sr = layout == 0 ? ld : 1;
        v.sk = layout == 0 ? 1 : ld;
        for (int r = 0; r < n; ++r)
          for (int k = 0; k < m; ++k) tile[r * v.sr + k * v.sk] = S[r * m + k];
        const int gld = n + 5;
        std::vector<float> Gp(n * gld, 1e30f);
        for (int r = 0; r < n; ++r)
          for (int s2 = 0; s2 < n; ++s2) Gp[r * gld + s2] = G[r * n + s2];
        v.S = tile.data();
        v.dS = dtile.data();
        v.G = Gp.data();
        v.gld = gld;
        v.n = n;
        v.m = m;
        const int Nmax = n + 2, Mmax = m + 1;  // scratch sized for bigger pairs, as in a block
        std::vector<float> wscratch(mefn::cuda::warp_work_floats(Nmax, Mmax, true), 1e30f);
        const int dgld = n + 1;
        std::vector<float> dG(n * dgld, 0.f);
        float got = 0.f;
        run_warp([&](int lane) {
          WarpWork w = mefn::cuda::warp_work_from(wscratch.data(), Nmax, Mmax, true);
          const float s = mefn::cuda::warp_pair_forward(v, p, w, lane, false);
          if (lane == 0) got = s;
          mefn::cuda::warp_pair_backward(g, v, p, w, lane, dG.data(), dgld);
        });
        ++cases;
        const double e_s = std::fabs(double(got) - want) / std::fmax(1.0, std::fabs(want));
        double e_ds = 0, e_dg = 0;
        const double sc_ds = std::fmax(max_abs(dS_want), 1e-6), sc_dg = std::fmax(max_abs(dG_want), 1e-6);
        for (int r = 0; r < n; ++r)
          for (int k = 0; k < m; ++k)
            e_ds = std::fmax(e_ds, std::fabs(double(dtile[r * v.sr + k * v.sk]) - dS_want[r * m + k]) / sc_ds);
        for (int r = 0; r < n; ++r)
          for (int s2 = 0; s2 < n; ++s2)
            e_dg = std::fmax(e_dg, std::fabs(double(dG[r * dgld + s2]) - dG_want[r * n + s2]) / sc_dg);
        // nothing outside the pair's cells is touched
        int stray = 0;
        for (int i = 0; i < rows * ld; ++i) {
          const bool inside = layout == 0 ? (i / ld < n && i % ld < m) : (i / ld < m && i % ld < n);
          if (!inside && dtile[i] != 0.f) ++stray;
        }
        const double e = std::fmax(e_s, std::fmax(e_ds, e_dg));
        worst = std::fmax(worst, e);
        if (e > 2e-4 || !std::isfinite(got) || stray) {
          ++failures;
          std::printf("FAIL n=%d m=%d opt=%d layout=%d: score %.9g vs %.9g, dS err %.3g, dG err %.3g, stray %d\n", n, m,
                      opt, layout, got, want, e_ds, e_dg, stray);
        }
      }
    }
  }
  std::printf("%d cases, worst relative error %.3g\n", cases, worst);
  if (failures) return 1;
  std::printf("ok\n");
  return 0;
}
