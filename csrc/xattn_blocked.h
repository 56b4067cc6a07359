// The blocked algorithm of the xattn_similarity ops (docs/design.md), written once for every device.
//
// Both sides are packed by length (xattn_plan.h): the valid rows of a block of images (or of
// captions), normalised, padded only to the block's longest item. Then, per block pair:
//   1. the cosine tile S = R^_I W^_T^T is one GEMM (at::mm: MKL/OpenBLAS on the CPU, cuBLAS on a GPU);
//   2. per direction, the elementwise epilogue of xattn_pair.h: logits, the softmax over the context
//      rows, entropies (Dev::fwd_softmax), then G E for every context item of the block as one
//      batched GEMM (at::bmm), then the attended cosines, weights and scores (Dev::fwd_attend_score);
//      "both" runs the i2t direction on the transposed tile.
// A device may let the inference forward multiply the caller's rows of a side that needs no
// packing (Dev::direct_rows: the CPU op, for images of full length), the tile's rows then scaled
// by the inverse norms before the epilogue: no normalised copy of that side is kept.
// Backward: the epilogue backward (Dev::bwd_epilogue) gives dS and E~ for dG += E~ E^T (bmm),
// "both" in one pass over the block pairs (partials of the captions' dG per group of image blocks);
// the gradients are GEMMs, dR^ = dS W^ + 2 dG R^ and dW^ = dS^T R^ + 2 dG W^, each output block
// accumulated by one owner in a fixed order, and each product runs on one thread, so the results do
// not depend on the number of threads (docs/design.md). The backward works on "super-blocks" of
// the grid within a budget of bytes; when the whole grid's S takes at most 3/4 of the budget, the
// forward under autograd keeps it (saved-tile mode) and the backward starts from it instead of
// recomputing it (the softmax and G E of each block pair it recomputes either way).
//
// A device (Dev) supplies: the compute type C (float, or double on the CPU) and the GEMM operand
// type of the packed rows; the block caps and the largest forward panel; for_tasks(n, f) (the CPU runs tasks on its
// threads, each product on one thread; a GPU in order on the current stream); the packing of rows, the unpacking of
// gradients and a transpose; direct_rows; the GEMMs (mm, bmm, gram, addmm); and the elementwise phases (fwd_softmax,
// fwd_attend_score, bwd_epilogue); empty(numel, options), the allocator of its big buffers. Only those
// elementwise phases and the packing differ by device; this file is shared.
#ifndef MEFN_XATTN_BLOCKED_H_
#define MEFN_XATTN_BLOCKED_H_

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xattn_host.h"
#include "xattn_pair.h"
#include "xattn_plan.h"

namespace mefn {

// The inputs of one call, checked: contiguous features on the device, int64 lengths on the host.
struct CallInputs {
  at::Tensor regions, words;          // (B_img, N, d), (B_txt, M, d)
  at::Tensor rl_host, wl_host;        // (B_img,), (B_txt,) int64 on the CPU
  Options o;
};

// Per-side arrays the device needs: the sorted lengths and caller indices (int64), and for each
// packed row the caller's flat row index b * L + r (-1 for a padding row).
struct SideMeta {
  at::Tensor len, idx, src_row;
};

// A device's allocator of flat buffers: numel entries of the options' dtype on its device.
using Allocator = at::Tensor (*)(int64_t numel, const at::TensorOptions& opts);
inline at::Tensor aten_empty(int64_t numel, const at::TensorOptions& opts) { return at::empty({numel}, opts); }

// Buffers of one task (thread): tensors allocated on first use (with kTileSlack entries of
// slack), reused after.
struct Workspace {
  Allocator alloc = &aten_empty;
  std::vector<at::Tensor> slots;
  at::Tensor get(size_t slot, int64_t numel, const at::TensorOptions& opts) {
    if (slots.size() <= slot) slots.resize(slot + 1);
    if (!slots[slot].defined() || slots[slot].numel() < numel + kTileSlack) slots[slot] = alloc(numel + kTileSlack, opts);
    return slots[slot];
  }
};

// Workspace slots
enum Slot : size_t {
  kSlotS = 0, kSlotST, kSlotE0, kSlotE1, kSlotGE0, kSlotGE1, kSlotL0, kSlotL1, kSlotStats0, kSlotStats1,
  kSlotRho0, kSlotRho1, kSlotD, kSlotDE, kSlotDST, kSlotPackT, kSlotPackI, kSlotGramT, kSlotTmp, kNumSlots
};

template <typename C, class Dev>
class Blocked {
 public:
  Blocked(Dev& dev, const CallInputs& in) : dev_(dev), in_(in), o_(in.o) {
    B_img_ = in.regions.size(0);
    N_ = in.regions.size(1);
    B_txt_ = in.words.size(0);
    M_ = in.words.size(1);
    d_ = in.regions.size(2);
    img_ = plan(in.rl_host, N_, true);
    txt_ = plan(in.wl_host, M_, false);
    img_meta_ = dev.side_meta(img_);
    txt_meta_ = dev.side_meta(txt_);
    copts_ = in.regions.options().dtype(c10::CppTypeToScalarType<C>::value);
    gopts_ = in.regions.options().dtype(dev.gemm_dtype(in.regions.scalar_type()));
  }

  int64_t nI() const { return img_.blocks.size(); }
  int64_t nT() const { return txt_.blocks.size(); }
  // the saved state of forward_saving: S of the whole grid (and its slack)
  int64_t saved_numel() const { return sb_entries(whole()) + kTileSlack; }

  // Scores (B_img, B_txt) in C, in bounded memory (the inference op): the image side is packed
  // once; a task is a caption block against a run of image blocks: it packs the caption block,
  // takes the run's column panel of the tile in one GEMM and runs the epilogue image block by
  // image block. The image rows may be the caller's own (Dev::direct_rows; the scores then round
  // a little differently from the training forward's).
  at::Tensor forward() {
    at::Tensor scores = at::empty({B_img_, B_txt_}, copts_);
    if (scores.numel() == 0) return scores;
    // the image rows: the caller's own when the device allows (a side with no padding, in the
    // caller's order), each row of the tile then scaled by its inverse norm before the epilogue;
    // otherwise a packed, normalised copy
    at::Tensor inv_img;
    const bool direct = dev_.direct_rows(in_.regions, img_, inv_img);
    at::Tensor R = direct ? in_.regions.view({img_.rows, d_}) : pack_side(in_.regions, img_, img_meta_, nullptr);
    at::Tensor G_img = o_.t2i() ? (direct ? grams(in_.regions, img_, &img_meta_) : grams(R, img_)) : at::Tensor();
    auto scale_rows = [&](const at::Tensor& tile, int64_t I, bool rows) {
      if (!direct) return;
      const at::Tensor inv = inv_img.narrow(0, img_.blocks[I].row0, img_.blocks[I].rows());
      at::Tensor t = tile;
      t.mul_(rows ? inv.unsqueeze(1) : inv.unsqueeze(0));
    };
    // runs of image blocks per caption block: enough tasks for the threads, few repacks, and a
    // column panel (run rows x caption block rows) of at most the device's panel size
    const int64_t by_size = (img_.rows * txt_.max_block_rows + dev_.max_panel_entries() - 1) / dev_.max_panel_entries();
    const int64_t want = std::min(nI(), std::max<int64_t>({1, (kMinTasks + nT() - 1) / nT(), by_size}));
    const int64_t chunk = (nI() + want - 1) / want;
    const int64_t runs = (nI() + chunk - 1) / chunk;
    dev_.for_tasks(nT() * runs, [&](int64_t task, Workspace& ws) {
      const int64_t T = task / runs, I0 = (task % runs) * chunk, I1 = std::min(nI(), I0 + chunk);
      const SideBlock& tb = txt_.blocks[T];
      at::Tensor W = ws.get(kSlotPackT, tb.rows() * d_, gopts_).narrow(0, 0, tb.rows() * d_).view({tb.rows(), d_});
      dev_.pack(in_.words, txt_, txt_meta_, T, T + 1, W, nullptr);
      at::Tensor G_txt;
      if (o_.i2t()) {
        G_txt = ws.get(kSlotGramT, tb.count * tb.len * tb.len, copts_).narrow(0, 0, tb.count * tb.len * tb.len);
        dev_.gram(G_txt.view({tb.count, tb.len, tb.len}), W.view({tb.count, tb.len, d_}));
        G_txt = G_txt.view({tb.count, tb.len, tb.len});
      }
      const int64_t r0 = img_.blocks[I0].row0, run_rows = img_.row_end(I1) - r0;
      at::Tensor Rrun = R.narrow(0, r0, run_rows);
      at::Tensor S, ST;
      if (o_.t2i()) {
        S = tile(ws, kSlotS, run_rows, tb.rows());
        dev_.mm(S, Rrun, W);
      } else {
        ST = tile(ws, kSlotST, tb.rows(), run_rows);  // i2t only: the transposed panel directly
        dev_.mm(ST, W, Rrun);
      }
      for (int64_t I = I1 - 1; I >= I0; --I) {  // last first: the GEMM wrote them last, they are in cache
        const SideBlock& ib = img_.blocks[I];
        const int64_t off = ib.row0 - r0;
        at::Tensor GE0 = o_.t2i() ? tile(ws, kSlotGE0, ib.rows(), tb.rows()) : at::Tensor();
        at::Tensor GE1 = o_.i2t() ? tile(ws, kSlotGE1, tb.rows(), ib.rows()) : at::Tensor();
        if (o_.t2i()) {
          at::Tensor Sb = S.narrow(0, off, ib.rows());
          scale_rows(Sb, I, true);
          epilogue_forward(true, I, T, Sb, gram_block(G_img, img_, I), GE0, ws, &scores);
          if (o_.i2t()) {
            at::Tensor STb = tile(ws, kSlotTmp, tb.rows(), ib.rows());
            dev_.transpose(STb, Sb, false);
            epilogue_forward(false, I, T, STb, G_txt, GE1, ws, &scores);
          }
        } else {
          at::Tensor STb = ST.narrow(1, off, ib.rows());
          scale_rows(STb, I, false);
          epilogue_forward(false, I, T, STb, G_txt, GE1, ws, &scores);
        }
      }
    });
    return scores;
  }

  // The forward of a training step: the scores, and the state the backward needs, the cosine
  // tiles S of the whole grid (one matrix), when it takes at most kSavedShare of `budget` bytes
  // (the rest is the backward's, for dS); an empty tensor otherwise (the backward then recomputes
  // S, one super-block at a time). Either way the same products (run_super_block), so the same
  // scores for any budget.
  std::tuple<at::Tensor, at::Tensor> forward_saving(int64_t budget) {
    at::Tensor scores = at::empty({B_img_, B_txt_}, copts_);
    if (B_img_ == 0 || B_txt_ == 0) return {scores, at::empty({0}, copts_)};
    Packed pk = pack_both(false);
    if (!saves(budget)) {
      run_super_block(whole(), pk, nullptr, &scores);
      return {scores, at::empty({0}, copts_)};
    }
    at::Tensor saved = dev_.empty(saved_numel(), copts_);
    saved.narrow(0, saved_numel() - kTileSlack, kTileSlack).zero_();  // (the slack: no stale bits out)
    run_super_block(whole(), pk, &saved, &scores);
    return {scores, saved};
  }

  // Gradients (packed rows unpacked into the caller's layout, padding rows 0) for upstream grad
  // (B_img, B_txt) in C; saved: forward_saving's tensor, or empty to recompute.
  void backward(const at::Tensor& grad, const at::Tensor& saved, at::Tensor* grad_regions, at::Tensor* grad_words,
                int64_t budget) {
    Packed pk = pack_both(true);
    // dR^ and dW^ are written by their first product (caption block 0, the first super-block row)
    at::Tensor dR = dev_.empty(img_.rows * d_, copts_).view({img_.rows, d_});
    at::Tensor dW = dev_.empty(txt_.rows * d_, copts_).view({txt_.rows, d_});
    const bool dg_img = o_.t2i() && grad_regions != nullptr, dg_txt = o_.i2t() && grad_words != nullptr;
    at::Tensor dG_img = dg_img ? at::zeros({gram_entries(img_)}, copts_) : at::Tensor();
    at::Tensor dG_txt = dg_txt ? at::zeros({gram_entries(txt_)}, copts_) : at::Tensor();
    // super-blocks of dS within what the saved S leaves of the budget, or of S and dS
    const bool have_saved = saved.numel() > 0;
    const double left = have_saved ? double(budget) - double(sb_entries(whole())) * sizeof(C) : double(budget);
    const std::vector<BlockRange> sbs =
        super_blocks(img_, txt_, std::max<int64_t>(1, int64_t(left / ((have_saved ? 1 : 2) * sizeof(C)))));
    for (const BlockRange& sb : sbs) {
      // S: the saved grid's, or the super-block's recomputed
      at::Tensor state = have_saved ? saved : dev_.empty(sb_entries(sb) + kTileSlack, copts_);
      if (!have_saved) run_super_block(sb, pk, &state, nullptr);
      const BlockRange& ssb = have_saved ? whole() : sb;  // the block range of S's matrix
      const at::Tensor S2 = sb_matrix(state, ssb);
      at::Tensor dS = dev_.empty(sb_entries(sb) + kTileSlack, copts_);
      at::Tensor dS2 = sb_matrix(dS, sb);
      const C* g = grad.template data_ptr<C>();
      // the epilogue backward of block pair (I, T), t2i: G E again, then its dS into the pair's
      // tile of dS, the image block's dG += E~ E^T into dGi (when defined)
      auto t2i_pair = [&](int64_t I, int64_t T, Workspace& ws, const at::Tensor& dGi) {
        const SideBlock &ib = img_.blocks[I], &tb = txt_.blocks[T];
        const at::Tensor S = sb_tile(S2, ssb, I, T);
        const at::Tensor GE = tile(ws, kSlotGE0, ib.rows(), tb.rows());
        epilogue_forward(true, I, T, S, gram_block(pk.G_img, img_, I), GE, ws, nullptr);
        EpilogueJob<C> j = job(true, I, T, S, ws, 0);
        backward_job(true, j, GE, ws, g, sb_tile(dS2, sb, I, T));
        if (dGi.defined())
          dev_.baddbmm_t(dGi, view_of(j.D, ib.count, ib.len, tb.rows()), view_of(j.E, ib.count, ib.len, tb.rows()));
      };
      // i2t, on the transposed tile: G E again, its dS^T added into the pair's tile (written, i2t
      // alone), the caption block's dG into dGt (when defined)
      auto i2t_pair = [&](int64_t I, int64_t T, Workspace& ws, const at::Tensor& dGt) {
        const SideBlock &ib = img_.blocks[I], &tb = txt_.blocks[T];
        at::Tensor ST = tile(ws, kSlotST, tb.rows(), ib.rows());
        dev_.transpose(ST, sb_tile(S2, ssb, I, T), false);
        const at::Tensor GE = tile(ws, kSlotGE1, tb.rows(), ib.rows());
        epilogue_forward(false, I, T, ST, gram_block(pk.G_txt, txt_, T), GE, ws, nullptr);
        EpilogueJob<C> j = job(false, I, T, ST, ws, 1);
        at::Tensor dST = tile(ws, kSlotDST, tb.rows(), ib.rows());
        backward_job(false, j, GE, ws, g, dST);
        dev_.transpose(sb_tile(dS2, sb, I, T), dST, o_.t2i());
        if (dGt.defined())
          dev_.baddbmm_t(dGt, view_of(j.D, tb.count, tb.len, ib.rows()), view_of(j.E, tb.count, tb.len, ib.rows()));
      };
      // block b's Gram gradients inside G, or nothing when G is not wanted (undefined)
      auto dG_of = [](const at::Tensor& G, const SidePlan& p, int64_t b) {
        return G.defined() ? gram_block(G, p, b) : at::Tensor();
      };
      const int64_t groups = both_groups(sb, dg_txt);
      if (groups > 0) {
        // "both" in one pass, image block by image block: the i2t backward of a pair finds its S
        // and dS tiles in cache. A task is a group of image blocks (fixed by the shapes); it owns
        // its images' dG and adds its captions' dG into a partial of its own, the partials then
        // summed in group order.
        // (one group adds into dG itself)
        at::Tensor part = dg_txt && groups > 1 ? at::zeros({groups, gram_entries(txt_)}, copts_) : at::Tensor();
        const int64_t nb = sb.i1 - sb.i0;
        dev_.for_tasks(groups, [&](int64_t gi, Workspace& ws) {
          const at::Tensor dG_txt_of_group = part.defined() ? part[gi] : dG_txt;
          for (int64_t I = sb.i0 + gi * nb / groups; I < sb.i0 + (gi + 1) * nb / groups; ++I)
            for (int64_t T = sb.t0; T < sb.t1; ++T) {
              t2i_pair(I, T, ws, dG_of(dG_img, img_, I));
              i2t_pair(I, T, ws, dG_of(dG_txt_of_group, txt_, T));
            }
        });
        for (int64_t gi = 0; part.defined() && gi < groups; ++gi) dG_txt.add_(part[gi]);
      } else {
        // one direction: t2i, each image block owns its rows of dS and its dG, in caption order;
        // or i2t, each caption block owns its dG and writes its dS^T into the tiles, in image order
        if (o_.t2i()) {
          dev_.for_tasks(sb.i1 - sb.i0, [&](int64_t task, Workspace& ws) {
            const int64_t I = sb.i0 + task;
            for (int64_t T = sb.t0; T < sb.t1; ++T) t2i_pair(I, T, ws, dG_of(dG_img, img_, I));
          });
        }
        if (o_.i2t()) {
          dev_.for_tasks(sb.t1 - sb.t0, [&](int64_t task, Workspace& ws) {
            const int64_t T = sb.t0 + task;
            for (int64_t I = sb.i0; I < sb.i1; ++I) i2t_pair(I, T, ws, dG_of(dG_txt, txt_, T));
          });
        }
      }
      state = at::Tensor();
      // the gradient products over the whole super-block, dR^ (+)= dS W^ and dW^ (+)= dS^T R^ (the
      // first super-block of a row or column writes), one GEMM per group of at least kGroupRows
      // output rows x kFeatureChunk features: no task sums a part of another's K
      const int64_t r0 = img_.blocks[sb.i0].row0, c0 = txt_.blocks[sb.t0].row0;
      const int64_t sb_rows = img_.row_end(sb.i1) - r0, sb_cols = txt_.row_end(sb.t1) - c0;
      if (grad_regions != nullptr) {
        gradient_products(img_, sb.i0, sb.i1, [&](int64_t a, int64_t rows, int64_t f0, int64_t nf, Workspace& ws) {
          dev_.addmm(dR.narrow(0, a, rows).narrow(1, f0, nf), dS2.narrow(0, a - r0, rows),
                     pk.W.narrow(0, c0, sb_cols).narrow(1, f0, nf), false, sb.t0 > 0, ws);
        });
      }
      if (grad_words != nullptr) {
        gradient_products(txt_, sb.t0, sb.t1, [&](int64_t a, int64_t rows, int64_t f0, int64_t nf, Workspace& ws) {
          dev_.addmm(dW.narrow(0, a, rows).narrow(1, f0, nf), dS2.narrow(1, a - c0, rows),
                     pk.R.narrow(0, r0, sb_rows).narrow(1, f0, nf), true, sb.i0 > 0, ws);
        });
      }
    }
    // the Gram terms, dX^ += (dG + dG^T) X^ = 2 dG X^, then the normalisation's backward
    if (grad_regions != nullptr) {
      if (dg_img) gram_backward(dR, dG_img, pk.R, img_);
      dev_.unpack_grad(in_.regions, img_, img_meta_, dR, pk.R_norms, *grad_regions);  // every row
    }
    if (grad_words != nullptr) {
      if (dg_txt) gram_backward(dW, dG_txt, pk.W, txt_);
      dev_.unpack_grad(in_.words, txt_, txt_meta_, dW, pk.W_norms, *grad_words);
    }
  }

 private:
  static constexpr int64_t kMinTasks = 16;       // forward tasks: split image blocks into runs below this many
  static constexpr double kSavedShare = 0.75;    // the training forward keeps S within this share of the budget
  static constexpr double kPartialBytes = double(32 << 20);  // "both" backward: at most this in dG partials
  static constexpr int64_t kGroupRows = 512;     // gradient products: output rows per task, at least
  // gradient products: features per task, whole rows up to this width (split at 512 features the
  // products of train-cpu took 8-10% longer on one thread: MKL repacks the other operand per chunk)
  static constexpr int64_t kFeatureChunk = 2048;

  struct Packed {
    at::Tensor R, W, G_img, G_txt, R_norms, W_norms;
  };

  // Tasks over the output rows of blocks [b0, b1) of a side (groups of whole blocks of at least
  // kGroupRows rows) x chunks of kFeatureChunk features: f(first row, rows, first feature,
  // features, workspace). Tall and wide enough for BLAS to run near its best; shapes-only.
  template <class F>
  void gradient_products(const SidePlan& p, int64_t b0, int64_t b1, F&& f) {
    std::vector<std::pair<int64_t, int64_t>> groups;  // (first row, rows)
    for (int64_t b = b0; b < b1;) {
      int64_t e = b + 1;
      while (e < b1 && p.row_end(e) - p.blocks[b].row0 < kGroupRows) ++e;
      groups.push_back({p.blocks[b].row0, p.row_end(e) - p.blocks[b].row0});
      b = e;
    }
    const int64_t chunks = (d_ + kFeatureChunk - 1) / kFeatureChunk;
    dev_.for_tasks(int64_t(groups.size()) * chunks, [&](int64_t task, Workspace& ws) {
      const auto& g = groups[task / chunks];
      const int64_t f0 = (task % chunks) * kFeatureChunk;
      f(g.first, g.second, f0, std::min(kFeatureChunk, d_ - f0), ws);
    });
  }

  SidePlan plan(const at::Tensor& lengths, int64_t L, bool images) {
    const int64_t* len = lengths.data_ptr<int64_t>();
    const int64_t B = lengths.numel();
    int64_t valid = 0, longest = 0;
    for (int64_t b = 0; b < B; ++b) {
      valid += len[b];
      longest = std::max(longest, len[b]);
    }
    return plan_side(len, B, L, dev_.block_cap(images, valid, longest), dev_.block_cost());
  }

  // Tasks of the one-pass backward of "both" over super-block sb: groups of image blocks, at most
  // kMinTasks and, when the captions' dG is wanted, as many as have partials of it within
  // kPartialBytes (at least one); 0 for one direction. Shapes only, never threads. (A super-block
  // of few image blocks thus has few tasks: the parallelism of "both" is over image blocks.)
  int64_t both_groups(const BlockRange& sb, bool dg_txt) const {
    if (o_.direction != kBoth) return 0;
    int64_t groups = std::min(sb.i1 - sb.i0, kMinTasks);
    if (dg_txt) {
      const double partial_bytes = double(std::max<int64_t>(1, gram_entries(txt_))) * sizeof(C);
      groups = std::min(groups, std::max<int64_t>(1, int64_t(kPartialBytes / partial_bytes)));
    }
    return groups;
  }

  // whether the training forward keeps the whole grid's S: at most kSavedShare of `budget` bytes
  bool saves(int64_t budget) const {
    return double(saved_numel()) * double(sizeof(C)) <= kSavedShare * double(budget);
  }
  BlockRange whole() const { return {0, nI(), 0, nT()}; }

  at::Tensor pack_side(const at::Tensor& x, const SidePlan& p, const SideMeta& meta, at::Tensor* norms) {
    at::Tensor out = dev_.empty(p.rows * d_, gopts_).view({p.rows, d_});
    if (norms != nullptr) *norms = dev_.empty(p.rows, in_.regions.options().dtype(at::kDouble));
    dev_.pack(x, p, meta, 0, p.blocks.size(), out, norms);
    return out;
  }

  Packed pack_both(bool with_norms) {
    Packed pk;
    pk.R = pack_side(in_.regions, img_, img_meta_, with_norms ? &pk.R_norms : nullptr);
    pk.W = pack_side(in_.words, txt_, txt_meta_, with_norms ? &pk.W_norms : nullptr);
    if (o_.t2i()) pk.G_img = grams(pk.R, img_);
    if (o_.i2t()) pk.G_txt = grams(pk.W, txt_);
    return pk;
  }

  static int64_t gram_entries(const SidePlan& p) {
    int64_t n = 0;
    for (const SideBlock& b : p.blocks) n += b.count * b.len * b.len;
    return n;
  }
  static int64_t gram_offset(const SidePlan& p, int64_t b) {
    int64_t n = 0;
    for (int64_t k = 0; k < b; ++k) n += p.blocks[k].count * p.blocks[k].len * p.blocks[k].len;
    return n;
  }
  // the Gram matrices of block b's items, (count, len, len), inside a side's flat Gram tensor
  static at::Tensor gram_block(const at::Tensor& G, const SidePlan& p, int64_t b) {
    const SideBlock& k = p.blocks[b];
    return G.narrow(0, gram_offset(p, b), k.count * k.len * k.len).view({k.count, k.len, k.len});
  }
  // The Gram blocks of a side from its packed rows X, or with `caller` from the caller's rows X,
  // each block packed into the task's workspace first.
  at::Tensor grams(const at::Tensor& X, const SidePlan& p, const SideMeta* caller = nullptr) {
    at::Tensor G = dev_.empty(gram_entries(p), copts_);
    dev_.for_tasks(p.blocks.size(), [&](int64_t b, Workspace& ws) {
      const SideBlock& k = p.blocks[b];
      at::Tensor Xb;
      if (caller != nullptr) {
        Xb = ws.get(kSlotPackI, k.rows() * d_, gopts_).narrow(0, 0, k.rows() * d_).view({k.rows(), d_});
        dev_.pack(X, p, *caller, b, b + 1, Xb, nullptr);
      } else {
        Xb = X.narrow(0, k.row0, k.rows());
      }
      dev_.gram(gram_block(G, p, b), Xb.view({k.count, k.len, d_}));
    });
    return G;
  }
  // dX^_b += 2 dG_b X^_b for every item (bmm per block)
  void gram_backward(at::Tensor& dX, const at::Tensor& dG, const at::Tensor& X, const SidePlan& p) {
    dev_.for_tasks(p.blocks.size(), [&](int64_t b, Workspace& ws) {
      const SideBlock& k = p.blocks[b];
      dev_.baddbmm(dX.narrow(0, k.row0, k.rows()).view({k.count, k.len, d_}), gram_block(dG, p, b),
                   X.narrow(0, k.row0, k.rows()).view({k.count, k.len, d_}), C(2), ws);
    });
  }

  at::Tensor tile(Workspace& ws, Slot s, int64_t rows, int64_t cols) {
    return ws.get(s, rows * cols, copts_).narrow(0, 0, rows * cols).view({rows, cols});
  }
  at::Tensor view_of(C* p, int64_t a, int64_t b, int64_t c) const {
    return at::from_blob(p, {a, b, c}, copts_);
  }

  // The state of a super-block is S, one row-major matrix of its image rows x its caption rows
  // (so that each gradient block is one GEMM over the whole super-block), then kTileSlack entries
  // of slack; dS, the backward's, has its layout. The backward recomputes the softmax and G E of
  // each block pair from S, a cache-sized chunk at a time (G E for the pair as one batched GEMM):
  // keeping them would take three times the memory per entry (S, and G E in each direction), and
  // keeping e and the logits measured no faster (1.85x and 2.6x the floor on train-cpu and
  // vit-patches with them kept, 1.86x and 2.25x without, on an Intel Xeon).
  int64_t sb_entries(const BlockRange& sb) const {
    return (img_.row_end(sb.i1) - img_.blocks[sb.i0].row0) * (txt_.row_end(sb.t1) - txt_.blocks[sb.t0].row0);
  }
  at::Tensor sb_matrix(const at::Tensor& buf, const BlockRange& sb) const {
    const int64_t rows = img_.row_end(sb.i1) - img_.blocks[sb.i0].row0;
    const int64_t cols = txt_.row_end(sb.t1) - txt_.blocks[sb.t0].row0;
    return buf.narrow(0, 0, rows * cols).view({rows, cols});
  }
  // block pair (I, T) of a super-block's S (or dS) matrix: image rows x caption rows, strided
  at::Tensor sb_tile(const at::Tensor& M, const BlockRange& sb, int64_t I, int64_t T) const {
    const SideBlock &ib = img_.blocks[I], &tb = txt_.blocks[T];
    return M.narrow(0, ib.row0 - img_.blocks[sb.i0].row0, ib.rows()).narrow(1, tb.row0 - txt_.blocks[sb.t0].row0, tb.rows());
  }
  // The forward epilogue of image block I x caption block T in one direction, on S (context rows x
  // query columns, rows of unit stride): G E into GE (contiguous), scores into *scores when not null.
  void epilogue_forward(bool t2i, int64_t I, int64_t T, const at::Tensor& S, const at::Tensor& G,
                        const at::Tensor& GE, Workspace& ws, at::Tensor* scores) {
    EpilogueJob<C> j = job(t2i, I, T, S, ws, t2i ? 0 : 1);
    j.L = j.E;
    dev_.fwd_softmax(j);
    dev_.bmm(GE.view({j.nc, j.n_pad, j.cols()}), G, view_of(j.E, j.nc, j.n_pad, j.cols()));
    if (scores == nullptr) return;
    j.GE = GE.template data_ptr<C>();
    j.out = scores->template data_ptr<C>();
    j.scale = C(o_.direction == kBoth ? 0.5 : 1.0);
    j.accumulate = !t2i && o_.direction == kBoth;
    dev_.fwd_attend_score(j);
  }

  // The training forward of super-block sb: a task is a run of image blocks; each block pair's
  // tile is a GEMM of its own, then (with scores) the pair's epilogue. The products are thus the
  // same whatever the super-block, and so are the scores and a recomputed S, bit for bit, for any
  // budget (MKL's bits depend on a product's shape: on an AMD EPYC, float64 products on their
  // columns). S goes into *state when given (the saved tiles, or the backward's recomputation,
  // which needs no epilogue), else into the task's workspace.
  void run_super_block(const BlockRange& sb, const Packed& pk, at::Tensor* state, at::Tensor* scores) {
    const int64_t nb = sb.i1 - sb.i0;
    const int64_t want = std::min(nb, std::max<int64_t>(1, kMinTasks));
    const int64_t chunk = (nb + want - 1) / want, runs = (nb + chunk - 1) / chunk;
    const at::Tensor S2 = state != nullptr ? sb_matrix(*state, sb) : at::Tensor();
    dev_.for_tasks(runs, [&](int64_t task, Workspace& ws) {
      const int64_t I0 = sb.i0 + task * chunk, I1 = std::min(sb.i1, I0 + chunk);
      for (int64_t I = I0; I < I1; ++I) {
        const SideBlock& ib = img_.blocks[I];
        for (int64_t T = sb.t0; T < sb.t1; ++T) {
          const SideBlock& tb = txt_.blocks[T];
          at::Tensor S = state != nullptr ? sb_tile(S2, sb, I, T) : tile(ws, kSlotS, ib.rows(), tb.rows());
          dev_.mm(S, pk.R.narrow(0, ib.row0, ib.rows()), pk.W.narrow(0, tb.row0, tb.rows()));
          if (scores == nullptr) continue;
          if (o_.t2i())
            epilogue_forward(true, I, T, S, gram_block(pk.G_img, img_, I),
                             tile(ws, kSlotGE0, ib.rows(), tb.rows()), ws, scores);
          if (o_.i2t()) {
            at::Tensor ST = tile(ws, kSlotST, tb.rows(), ib.rows());
            dev_.transpose(ST, S, false);
            epilogue_forward(false, I, T, ST, gram_block(pk.G_txt, txt_, T),
                             tile(ws, kSlotGE1, tb.rows(), ib.rows()), ws, scores);
          }
        }
      }
    });
  }

  // The epilogue backward of a block pair in job j's direction, with its G E: the softmax again
  // from S, then dS into dS (the job's S layout), E~ into j.D.
  void backward_job(bool t2i, EpilogueJob<C>& j, const at::Tensor& GE, Workspace& ws, const C* grad,
                    const at::Tensor& dS) {
    const int64_t rows = j.nc * j.n_pad, cols = j.cols();
    j.GE = GE.template data_ptr<C>();
    if (o_.clipped) {
      j.L = tile(ws, t2i ? kSlotL0 : kSlotL1, rows, cols).template data_ptr<C>();
      j.dE = tile(ws, kSlotDE, rows, cols).template data_ptr<C>();
      j.ldde = cols;
    } else {
      j.L = j.E;
    }
    j.ldl = cols;
    j.D = tile(ws, kSlotD, rows, cols).template data_ptr<C>();
    j.ldd = cols;
    j.dS = dS.template data_ptr<C>();
    j.ldds = dS.stride(0);
    j.grad = grad;
    j.scale = C(o_.direction == kBoth ? 0.5 : 1.0);
    dev_.bwd_epilogue(j);
  }

  // The epilogue job of block pair (I, T) in one direction, on tile S (context rows x query
  // columns, rows of unit stride, row stride S.stride(0)), with work buffers from ws (slot set dir).
  EpilogueJob<C> job(bool t2i, int64_t I, int64_t T, const at::Tensor& S, Workspace& ws, int dir) {
    const SideBlock &ib = img_.blocks[I], &tb = txt_.blocks[T];
    const SideBlock &cb = t2i ? ib : tb, &qb = t2i ? tb : ib;
    const SideMeta &cm = t2i ? img_meta_ : txt_meta_, &qm = t2i ? txt_meta_ : img_meta_;
    EpilogueJob<C> j;
    j.nc = cb.count;
    j.n_pad = cb.len;
    j.nq = qb.count;
    j.w = qb.len;
    j.c_len = cm.len.template data_ptr<int64_t>() + cb.item0;
    j.q_len = qm.len.template data_ptr<int64_t>() + qb.item0;
    j.c_idx = cm.idx.template data_ptr<int64_t>() + cb.item0;
    j.q_idx = qm.idx.template data_ptr<int64_t>() + qb.item0;
    j.out_c = t2i ? B_txt_ : 1;
    j.out_q = t2i ? 1 : B_txt_;
    const int64_t rows = cb.rows(), cols = qb.rows();
    j.S = S.template data_ptr<C>();
    j.lds = S.stride(0);
    j.E = tile(ws, dir == 0 ? kSlotE0 : kSlotE1, rows, cols).template data_ptr<C>();
    j.lde = cols;
    j.ldl = cols;
    j.ldg = cols;
    j.st = ws.get(dir == 0 ? kSlotStats0 : kSlotStats1, kNumStats * j.nc * cols, copts_).template data_ptr<C>();
    j.rho = o_.clipped ? ws.get(dir == 0 ? kSlotRho0 : kSlotRho1, rows * j.nq, copts_).template data_ptr<C>() : nullptr;
    j.p = pair_params<C>(o_, t2i);
    return j;
  }

  Dev& dev_;
  const CallInputs& in_;
  Options o_;
  int64_t B_img_, N_, B_txt_, M_, d_;
  SidePlan img_, txt_;
  SideMeta img_meta_, txt_meta_;
  at::TensorOptions copts_, gopts_;
};

}  // namespace mefn

#endif  // MEFN_XATTN_BLOCKED_H_
