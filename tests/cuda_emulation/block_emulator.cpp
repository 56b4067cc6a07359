// Host emulator of the CUDA kernels of the xattn_similarity ops (float32 path), for checking the
// whole CUDA pipeline against the reference without a GPU.
//
// The kernel bodies of csrc/cuda/xattn_blocks.cuh run unchanged: a "launch" runs each block of the
// grid in turn as 128 std::threads, with __syncthreads() a 128-thread barrier, __syncwarp() a
// 32-thread barrier per warp, and __shfl_xor_sync through a per-warp array. Shared memory and every
// uninitialised buffer are filled with NaN first, so a read before a write shows up in the output.
// The host steps mirror csrc/cuda/xattn_{prep,fwd,bwd}.cu (same plan function, same launches).
//
// What this does not cover: the tensor-core (WMMA) path for float16/bfloat16, the 16-byte
// vectorised staging, the CUDA runtime calls, and real concurrency between blocks (blocks run one
// after the other here; the kernels share no data between blocks except through disjoint outputs).
//
// Usage: block_emulator IN OUT. IN (little endian): int64 B_img, N, B_txt, M, d, direction (0 t2i,
// 1 i2t, 2 both), clipped, mfe, agg_lse, smem_limit (bytes), grid_cap (max blocks of the persistent
// forward), need_grad; float64 lambda_t2i, lambda_i2t, tau, lambda_lse; int64 region_lengths[B_img],
// word_lengths[B_txt]; float32 regions[B_img*N*d], words[B_txt*M*d], grad[B_img*B_txt].
// OUT: float32 scores[B_img*B_txt], grad_regions[B_img*N*d], grad_words[B_txt*M*d].
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

namespace emu {
struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
inline std::barrier<>* block_bar = nullptr;
inline std::barrier<>* warp_bar[4] = {nullptr, nullptr, nullptr, nullptr};
inline float slots[4][32];
}  // namespace emu

thread_local emu::Dim threadIdx, blockIdx;
emu::Dim gridDim;

namespace emu {
inline void syncthreads() { block_bar->arrive_and_wait(); }
inline void syncwarp() { warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
inline float shfl_xor(float v, int o) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  syncwarp();
  slots[w][l] = v;
  syncwarp();
  return slots[w][l ^ o];
}
}  // namespace emu

#define MEFN_WARP_EMULATION 1
#define MEFN_WARP_FN inline
#define MEFN_WARP_BIG_FN inline
#define MEFN_SYNCWARP() emu::syncwarp()
#define MEFN_SHFL_XOR(v, o) emu::shfl_xor((v), (o))
#define MEFN_DEV inline
#define MEFN_HD inline
#define MEFN_SYNCTHREADS() emu::syncthreads()
#define MEFN_BLOCK_FN inline
#include "../../csrc/cuda/xattn_blocks.cuh"

using namespace mefn;
using namespace mefn::cuda;

static const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Run body(smem) for every block of a grid of `grid` blocks of kThreads threads.
static void launch(int64_t grid, size_t smem_bytes, const std::function<void(unsigned char*, float*)>& body) {
  gridDim.x = static_cast<unsigned>(grid);
  std::vector<float> smem_f((smem_bytes + 3) / 4 + 32, kNaN);  // 128-byte aligned below, NaN-filled
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_f.data()) + 127) / 128 * 128);
  for (int64_t b = 0; b < grid; ++b) {
    std::fill(smem_f.begin(), smem_f.end(), kNaN);
    float red[kWarps];
    std::barrier<> bb(kThreads), w0(32), w1(32), w2(32), w3(32);
    emu::block_bar = &bb;
    emu::warp_bar[0] = &w0;
    emu::warp_bar[1] = &w1;
    emu::warp_bar[2] = &w2;
    emu::warp_bar[3] = &w3;
    std::vector<std::thread> ts;
    ts.reserve(kThreads);
    for (int t = 0; t < kThreads; ++t)
      ts.emplace_back([&, t, b] {
        threadIdx.x = t;
        blockIdx.x = static_cast<unsigned>(b);
        body(smem, red);
      });
    for (auto& t : ts) t.join();
  }
}

template <typename V>
static void read_into(FILE* f, V* dst, size_t n) {
  if (n && std::fread(dst, sizeof(V), n, f) != n) {
    std::fprintf(stderr, "short input\n");
    std::exit(2);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  int64_t h[12];
  read_into(in, h, 12);
  const int64_t B_img = h[0], N = h[1], B_txt = h[2], M = h[3], d = h[4];
  const Direction dir = static_cast<Direction>(h[5]);
  const bool clipped = h[6], mfe = h[7], agg_lse = h[8];
  const size_t limit = static_cast<size_t>(h[9]);
  const int64_t grid_cap = h[10];
  const bool need_grad = h[11];
  double prm[4];
  read_into(in, prm, 4);
  std::vector<int64_t> rl(B_img), wl(B_txt);
  read_into(in, rl.data(), B_img);
  read_into(in, wl.data(), B_txt);
  std::vector<float> regions(B_img * N * d), words(B_txt * M * d), grad(B_img * B_txt);
  read_into(in, regions.data(), regions.size());
  read_into(in, words.data(), words.size());
  read_into(in, grad.data(), grad.size());
  std::fclose(in);
  const bool t2i = dir != kI2T, i2t = dir != kT2I;

  // inverse norms and Gram matrices (xattn_prep.cu)
  auto inv_norms = [&](const std::vector<float>& x, const std::vector<int64_t>& len, int64_t B, int64_t L) {
    std::vector<float> inv(B * L, kNaN);
    launch((B * L + kWarps - 1) / kWarps, 0, [&](unsigned char*, float*) {
      inverse_norms_block<float>(x.data(), len.data(), B * L, static_cast<int>(L), d, inv.data());
    });
    return inv;
  };
  auto grams = [&](const std::vector<float>& x, const std::vector<int64_t>& len, const std::vector<float>& inv,
                   int64_t B, int64_t L) {
    const int Lp = round16(L);
    std::vector<float> G(B * Lp * Lp, kNaN);
    const size_t smem = region_bytes(Lp, Lp, 4, Stage<float>::LD, true, 0) + 4 * size_t(Lp) * 4;
    launch(B, smem, [&](unsigned char* s, float*) {
      gram_block<float>(x.data(), len.data(), inv.data(), static_cast<int>(L), d, Lp, false, G.data(), s);
    });
    return G;
  };
  std::vector<float> rinv = inv_norms(regions, rl, B_img, N), winv = inv_norms(words, wl, B_txt, M);
  std::vector<float> G_img, G_txt;
  if (t2i) G_img = grams(regions, rl, rinv, B_img, N);
  if (i2t) G_txt = grams(words, wl, winv, B_txt, M);

  auto problem = [&](const Plan& plan) {
    Problem<float> P;
    P.regions = regions.data();
    P.words = words.data();
    P.rl = rl.data();
    P.wl = wl.data();
    P.rinv = rinv.data();
    P.winv = winv.data();
    P.G_img = t2i ? G_img.data() : nullptr;
    P.G_txt = i2t ? G_txt.data() : nullptr;
    P.gld_img = t2i ? round16(N) : 0;
    P.gld_txt = i2t ? round16(M) : 0;
    P.B_img = B_img;
    P.B_txt = B_txt;
    P.d = d;
    P.N = static_cast<int>(N);
    P.M = static_cast<int>(M);
    P.BI = plan.BI;
    P.BT = plan.BT;
    P.nI = plan.nI;
    P.nT = plan.nT;
    P.rp = plan.rp;
    P.cp = plan.cp;
    P.lds = plan.lds;
    P.vec_regions = P.vec_words = false;
    P.work_global = plan.work_global;
    P.work = nullptr;
    P.work_per_warp = plan.work_per_warp;
    P.direction = dir;
    for (int k = 0; k < 2; ++k) {
      PairParams<float>& p = k == 0 ? P.pt : P.pi;
      p.lambda = static_cast<float>(k == 0 ? prm[0] : prm[1]);
      p.clipped = clipped;
      p.mfe = mfe;
      p.tau = static_cast<float>(prm[2]);
      p.agg_lse = agg_lse;
      p.lambda_lse = static_cast<float>(prm[3]);
    }
    return P;
  };

  // forward (xattn_fwd.cu)
  bool ok = false;
  const Plan pf = plan_for(B_img, N, B_txt, M, 4, false, limit, &ok);
  if (!ok) {
    std::fprintf(stderr, "forward plan does not fit\n");
    return 3;
  }
  Problem<float> P = problem(pf);
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(pf.nI * pf.nT, grid_cap));
  std::vector<float> work, scores(B_img * B_txt, 0.f);
  if (pf.work_global) {
    work.assign(grid * kWarps * pf.work_per_warp, kNaN);
    P.work = work.data();
  }
  launch(grid, pf.smem, [&](unsigned char* s, float*) { fwd_block<float>(P, scores.data(), s); });
  std::printf("forward: BI=%d BT=%d tiles=%lld grid=%lld smem=%zu work_global=%d\n", pf.BI, pf.BT,
              (long long)(pf.nI * pf.nT), (long long)grid, pf.smem, int(pf.work_global));

  // backward (xattn_bwd.cu)
  std::vector<float> gr(B_img * N * d, 0.f), gw(B_txt * M * d, 0.f);
  if (need_grad) {
    const Plan pb = plan_for(B_img, N, B_txt, M, 4, true, limit, &ok);
    if (!ok) {
      std::fprintf(stderr, "backward plan does not fit\n");
      return 3;
    }
    Problem<float> Q = problem(pb);
    std::printf("backward: BI=%d BT=%d nI=%lld nT=%lld smem=%zu work_global=%d\n", pb.BI, pb.BT, (long long)pb.nI,
                (long long)pb.nT, pb.smem, int(pb.work_global));
    for (int own_images = 1; own_images >= 0; --own_images) {
      const int64_t B = own_images ? B_img : B_txt, L = own_images ? N : M, nb = own_images ? pb.nI : pb.nT;
      const int max_own = own_images ? pb.BI : pb.BT;
      const bool gram = own_images ? t2i : i2t;
      std::vector<float> acc(B * L * d, 0.f), part(gram ? nb * kWarps * max_own * L * L : 0, 0.f),
          dG(gram ? B * L * L : 0, kNaN);
      std::vector<float> wk;
      if (pb.work_global) {
        wk.assign(nb * kWarps * pb.work_per_warp, kNaN);
        Q.work = wk.data();
      }
      launch(nb, pb.smem, [&](unsigned char* s, float*) {
        if (own_images)
          bwd_block<float, true>(Q, grad.data(), acc.data(), part.data(), dG.data(), s);
        else
          bwd_block<float, false>(Q, grad.data(), acc.data(), part.data(), dG.data(), s);
      });
      const std::vector<float>& x = own_images ? regions : words;
      const std::vector<int64_t>& len = own_images ? rl : wl;
      const std::vector<float>& inv = own_images ? rinv : winv;
      std::vector<float>& out = own_images ? gr : gw;
      launch(B * L, 0, [&](unsigned char*, float* red) {
        finalize_block<float>(x.data(), len.data(), inv.data(), gram ? dG.data() : nullptr, static_cast<int>(L), d,
                              acc.data(), out.data(), red);
      });
    }
  }
  FILE* o = std::fopen(argv[2], "wb");
  if (!o) return 2;
  std::fwrite(scores.data(), 4, scores.size(), o);
  std::fwrite(gr.data(), 4, gr.size(), o);
  std::fwrite(gw.data(), 4, gw.size(), o);
  std::fclose(o);
  std::printf("ok\n");
  return 0;
}
