// The plan of the blocked algorithm (docs/design.md): ragged items packed by length into blocks.
//
// Each side (the images' regions, the captions' words) is sorted by length, longest first
// (stable), and cut into blocks of consecutive items. A block's items are padded to its longest
// item only, and their valid rows are packed one block after another into a (rows x d) matrix:
// the cosine tile of an image block x a caption block is then one GEMM over valid rows (up to
// the little padding inside a block), and the work scales with the sum of the lengths, not with
// B x the longest length. The cut is the one that minimises the packed rows plus a fixed cost per
// block, with at most `cap` rows per block (dynamic programming over the sorted items). Block
// sizes depend on the lengths and the shapes only, never on the number of threads, so every
// reduction over blocks runs in the same order whatever the parallelism.
#ifndef MEFN_XATTN_PLAN_H_
#define MEFN_XATTN_PLAN_H_

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace mefn {

struct SideBlock {
  int64_t item0 = 0;  // first item, in sorted order
  int64_t count = 0;  // items
  int64_t len = 0;    // rows per item (the block's longest item)
  int64_t row0 = 0;   // first packed row
  int64_t rows() const { return count * len; }
};

struct SidePlan {
  int64_t B = 0, L = 0;              // items, and the padded length of the input
  std::vector<int64_t> order;        // sorted position -> the caller's index
  std::vector<int64_t> len;          // sorted position -> valid rows
  std::vector<int64_t> row;          // sorted position -> first packed row
  std::vector<int64_t> src_row;      // packed row -> the caller's flat row b * L + r (-1: padding)
  std::vector<SideBlock> blocks;
  int64_t rows = 0;                  // packed rows in all
  int64_t max_block_rows = 0, max_block_len = 0, max_block_count = 0;

  // The packed rows of blocks [b0, b1) are contiguous: [blocks[b0].row0, row_end(b1)).
  int64_t row_end(int64_t b1) const { return b1 < int64_t(blocks.size()) ? blocks[b1].row0 : rows; }
  int64_t valid_rows() const { return std::accumulate(len.begin(), len.end(), int64_t(0)); }
};

// Sort by length (longest first, stable) and cut into blocks of at most cap rows (an item longer
// than cap gets a block of its own); block_cost: the fixed cost of a block, in rows.
inline SidePlan plan_side(const int64_t* lengths, int64_t B, int64_t L, int64_t cap, int64_t block_cost) {
  SidePlan p;
  p.B = B;
  p.L = L;
  p.order.resize(B);
  std::iota(p.order.begin(), p.order.end(), int64_t(0));
  std::stable_sort(p.order.begin(), p.order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  p.len.resize(B);
  for (int64_t s = 0; s < B; ++s) p.len[s] = lengths[p.order[s]];
  // cost[j]: cheapest cut of the first j items; from[j]: where its last block starts
  const int64_t inf = std::numeric_limits<int64_t>::max() / 4;
  std::vector<int64_t> cost(B + 1, inf), from(B + 1, 0);
  cost[0] = 0;
  for (int64_t j = 1; j <= B; ++j) {
    // a block [s, j) has len[s] rows per item (the longest, sorted first)
    for (int64_t s = j - 1; s >= 0; --s) {
      const int64_t rows = (j - s) * p.len[s];
      if (rows > cap && s < j - 1) break;
      const int64_t c = cost[s] + rows + block_cost;
      if (c < cost[j]) {
        cost[j] = c;
        from[j] = s;
      }
    }
  }
  std::vector<int64_t> starts;
  for (int64_t j = B; j > 0; j = from[j]) starts.push_back(from[j]);
  std::reverse(starts.begin(), starts.end());
  p.row.resize(B);
  for (size_t b = 0; b < starts.size(); ++b) {
    SideBlock k;
    k.item0 = starts[b];
    k.count = (b + 1 < starts.size() ? starts[b + 1] : B) - k.item0;
    k.len = p.len[k.item0];
    k.row0 = p.rows;
    for (int64_t i = 0; i < k.count; ++i) {
      const int64_t s = k.item0 + i;
      p.row[s] = k.row0 + i * k.len;
      for (int64_t r = 0; r < k.len; ++r) p.src_row.push_back(r < p.len[s] ? p.order[s] * L + r : -1);
    }
    p.rows += k.rows();
    p.max_block_rows = std::max(p.max_block_rows, k.rows());
    p.max_block_len = std::max(p.max_block_len, k.len);
    p.max_block_count = std::max(p.max_block_count, k.count);
    p.blocks.push_back(k);
  }
  return p;
}

// A rectangle of whole blocks, [i0, i1) image blocks x [t0, t1) caption blocks.
struct BlockRange {
  int64_t i0, i1, t0, t1;
};

// Rectangles covering the block grid, row-major, each holding at most `budget` tile entries
// (rows x columns) when a single block pair allows it: the backward works on one at a time (and
// a forward that saves its tiles needs the whole grid to be one).
inline std::vector<BlockRange> super_blocks(const SidePlan& img, const SidePlan& txt, int64_t budget) {
  const int64_t nI = img.blocks.size(), nT = txt.blocks.size();
  std::vector<BlockRange> out;
  // full-width rows of blocks when one image block row fits, else split the columns too
  int64_t widest_row = 0;
  for (const SideBlock& b : img.blocks) widest_row = std::max(widest_row, b.rows());
  if (widest_row * txt.rows <= budget || nT <= 1) {
    int64_t i0 = 0;
    while (i0 < nI) {
      int64_t i1 = i0 + 1;
      while (i1 < nI && (img.row_end(i1 + 1) - img.blocks[i0].row0) * txt.rows <= budget) ++i1;
      out.push_back({i0, i1, 0, nT});
      i0 = i1;
    }
    return out;
  }
  for (int64_t i = 0; i < nI; ++i) {
    const int64_t rows = img.blocks[i].rows();
    int64_t t0 = 0;
    while (t0 < nT) {
      int64_t t1 = t0 + 1;
      while (t1 < nT && rows * (txt.row_end(t1 + 1) - txt.blocks[t0].row0) <= budget) ++t1;
      out.push_back({i, i + 1, t0, t1});
      t0 = t1;
    }
  }
  return out;
}

}  // namespace mefn

#endif  // MEFN_XATTN_PLAN_H_
