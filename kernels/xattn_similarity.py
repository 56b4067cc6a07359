"""Triton kernels of the cross-attention similarity ``xattn_similarity`` (``docs/math.md``, section 1).

This module plans the work and launches the kernels of :mod:`mefn_fast.kernels.xattn_similarity_jit`.

Layout of the work
------------------
One program computes one *tile*: the cosine matrix of an R block (the MMA's M side, ``BM`` rows)
against a C block (the N side, ``BN`` columns), one ``tl.dot`` over chunks of d, and then every
image x caption pair inside the tile down to its score. A block packs several items (images or
captions) and only their valid rows, one segment of consecutive rows each: items are sorted by
length and grouped by how many fit a block (at most 16; 8 on C in the backward when full-length
items fill an eighth of it), so ragged captions lie back to back (varlen, as FlashAttention packs sequences).
Eval shapes (N = 36 regions, 8..32 words, d = 1024): 3 images = 108 of 128 columns and 4-16
captions, about 117 of 128 rows, instead of 64 padded context rows per image and 32 columns per
caption. The tables are built on the device without a host sync (large grids read the block
counts back once, for an exact grid).

* **Softmax along the columns.** A direction runs on a tile whose columns are its context: t2i
  on (words x regions), i2t on (regions x words), so the softmax over context rows runs along the
  MMA's N axis (as in FlashAttention). ``direction="both"`` is one pass of each direction, each on
  its own tiles (the second pass adds its half of the scores, and the gradients of the normalised
  rows are summed before the normalisation's backward): a pass holds one direction's values only,
  and both run on tiles of 128 rows (the i2t half of a fused pass ran on the transpose of the t2i
  tile, whose 64 rows split every context sum over two warp groups).
* **Segment sums on tensor cores.** Every per-item reduction (the softmax sums, sum_r A S,
  sum_r A (G A), the clipped-l2 norms over query positions, the weights, the aggregation) and every
  broadcast of a per-item value back to its cells is a ``tl.dot`` with the block's 0/1 segment
  matrix: the packing costs no masked passes. Every such product has N >= 16 (eight segments are
  padded with zero columns): Triton 3.6 makes an N = 8 product an mma.sync whose operand
  fragments, converted from the wgmma layout, spilled. The data is split into bfloat16 terms, two (16
  significant bits, float32's range) for fp16 / bf16 inputs and TF32, three (exact) for fp32.
* **Gram form on tensor cores.** ``G A`` is one ``tl.dot`` with the C block's Gram matrix, block
  diagonal over its items, formed once per block by a prologue (fp16 for fp16 / bf16, float32
  for fp32).
* **Stable without a max pass.** Cosines and clipped-l2 logits lie in [-1, 1], so exp(lambda E -
  lambda) cannot overflow and, for lambda <= 40, cannot underflow; likewise the MFE weights
  (shift 0) and the LogSumExp (shift lambda_lse). Larger temperatures switch on exact per-item
  maxima (``EXACT_MAX``). The entropy sums A (x - shift): nothing of size lambda cancels.
* **L2-sized groups.** Programs run in groups of R blocks (``GROUP``, about 8 MiB of rows) that
  sweep every C block: a resident group of caption blocks serves every image block.
* **Row norms that cannot overflow.** A prologue finds each row's power of two s = 2^-e that
  brings its largest magnitude into [1, 2), and 1 / |x s| from the scaled squares; fp32 (and bf16
  with rows outside 2^-40..2^40) multiply each row by s before the product, so features with
  norms of 1e30 or 1e-30 score and back-propagate right.

Backward (deterministic, no atomics), one direction at a time, in chunks of R blocks whose
tile buffers stay under ``BWD_CHUNK_BYTES``:

* ``_bwd_tile_kernel``, one program per tile: recomputes the tile and the pair functions, writes
  dS (in the inputs' dtype for fp16 / bf16, scaled per tile into range, as FlashAttention rounds
  dS) and the two factors of the tile's part of the Gram gradient, 2 dG = (A dd2)^T A (in the
  Gram blocks' dtype, A dd2 scaled per tile);
* ``_bwd_gemm_kernel`` twice: dX_hat of an R block = sum over C blocks of dS X_hat_C, of a C block =
  sum over the chunk's R blocks of dS^T X_hat_R (each program owns its rows; C rows add chunk
  after chunk, in order);
* ``_bwd_gram_kernel``: 2 dG of a C block's items, the sum over the chunk's R blocks of
  (A dd2)^T A, in sub-blocks of ``GRAM_GRAD_BLOCK`` (a 256-row ViT block: 4 x 4 programs);
* the host adds 2 dG X_hat (``torch.bmm``), sums the directions and finishes the backward of the
  normalisation.

Precision
---------
Every accumulation is float32. float32 inputs use exact products (``"ieee"``) and exact segment
sums unless ``torch.get_float32_matmul_precision()`` is not ``"highest"`` (then TF32 products and
two-term sums); ``MEFN_TRITON_DOT_PRECISION=ieee|tf32|tf32x3`` overrides. fp16 / bf16 inputs: the
tile product is exact in float32, ``G A`` and the Gram gradient take fp16 operands (11 bits, like
TF32), segment sums carry 16 bits or more, and dS is rounded to the inputs' dtype for the two
gradient products.

Tested on
---------
No GPU was available while this was written. Interpreter (``TRITON_INTERPRET=1``, Triton 3.8,
torch 2.14 on CPU): every option, direction, ragged and odd shape, fp32 and fp16, forward and
gradients, huge and tiny norms, the exact-max path, many blocks and chunks, contexts longer than
a query block (the ViT shape, scaled down), against ``mefn_fast.backends.reference``
(``tests/test_xattn_similarity_triton.py``). Compiled offline for ``GPUTarget("cuda", 90, 64)``
with Triton 3.8 (CI) and 3.6 (the GPU machine's), at the configurations the launchers pick for
the GPU workloads (``tests/test_xattn_similarity_triton_compile.py``, which prints registers,
spills, shared memory and wgmma use per kernel; its docstring holds the table and the estimated
ratio to the packed floor per workload). In short (bytes of spill stores a thread, Triton 3.8 /
3.6): wgmma in every forward; no spills in any forward: eval-f30k-gpu, eval-coco5k-gpu and
train-gpu (128 x 128 at 8 warps, 255 registers, 96 KiB of shared memory), their autotuning
candidates and vit-patches (64 x 256 at 8 warps, 254 registers, 170 KiB), nor in the gradient
GEMMs, the Gram-gradient GEMM and the prologues; the backward tile kernel spills 476 / 352 at
train-gpu (128 x 64) and 724 / 636 at vit-patches (32 x 256); at most 170 KiB of shared memory.
Estimated: eval about 2.3x the packed floor, train-gpu forward + backward about 6-7x,
vit-patches about 5x (targets 1.5x and 2x). Memory: the forward needs the inputs, the Gram blocks (32 KiB a block) and the scores
only, so eval-coco5k-gpu stays bounded (0.5 GiB of scores, 55 MiB of Gram blocks).

Known risks
-----------
* Not yet run on a GPU: speed and the TF32 and bf16 numerics are unmeasured (the interpreter's
  bf16 arithmetic is wrong, so bf16 is only tested on a GPU; its ``tl.dot`` is exact, so the TF32
  and split-bf16 products are checked with the same values multiplied in float32).
* Register pressure: the forward holds the 128 x 128 float32 tile (64 registers a thread at 8
  warps) and two tile-sized temporaries at its peak, at 255 registers, so a change to the
  epilogue can bring spills back (the compile test catches it). The ViT forward's 64-row tile
  splits its columns over two warp groups, and keeps that layout in its broadcasts and ``G A``
  only through a runtime branch on each product (Triton gives a product that feeds another all
  the warps on M, which at 64 rows holds every tile value twice: see ``_own``); a Triton that
  looks through branches would bring its spills back. The backward tile kernel recomputes the
  forward and back-propagates in one program. The way on is in ``docs/design.md``.
* ``direction="both"`` runs each direction on its own tiles: twice the products of a fused pass
  (forward, recomputation and gradient GEMMs), the price of tiles of 128 rows for both.
* No warp specialisation in Triton 3.6 for Hopper: the tensor cores idle during the epilogue.
* bf16 inputs pay one device-to-host sync a call to find rows outside 2^-40..2^40.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton

from . import xattn_similarity_jit as jit

NS_MAX = 16  # segments (items) per block at most: the width of the 0/1 segment matrices
SINGLE_CONFIG_ENV = "MEFN_TRITON_SINGLE_CONFIG"
DOT_PRECISION_ENV = "MEFN_TRITON_DOT_PRECISION"
BWD_CHUNK_BYTES = 256 * 2 ** 20  # dS buffer of one backward chunk
EXACT_GRID_TILES = 2 ** 16  # above this many tiles the block counts are read back for an exact grid
GROUP_BYTES = 8 * 2 ** 20  # rows of the R blocks of one program group (about an L2's worth)
SAFE_EXP = 80.0  # exp(-80) is a normal float32: fixed shifts are exact while the range stays below
TINY_ROW = 1000  # exponent marker of a row whose norm is at most 1e-12 (F.normalize's clamp)
INTERPRET_BLOCK = 128  # block rows under the interpreter (tests set 16 to get many blocks a side)
GRAM_GRAD_BLOCK = 64  # rows and columns of a Gram-gradient program (a 256-row block takes 4 x 4)
PRESCALE_EXP = 40  # bf16 rows with a largest magnitude outside 2^-40..2^40 need the prescaled product


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def interpreter_enabled() -> bool:
    return _flag("TRITON_INTERPRET")


def single_config() -> bool:
    """One heuristic configuration instead of autotuning (forced under the interpreter)."""
    return interpreter_enabled() or _flag(SINGLE_CONFIG_ENV)


def dot_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision of float32 products (see the module docstring)."""
    env = os.environ.get(DOT_PRECISION_ENV, "").strip().lower()
    if env:
        if env not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"{DOT_PRECISION_ENV}={env!r}: choose ieee, tf32 or tf32x3")
        return env
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


_RECORD = None  # a list while record_launches() is active: launches are recorded, not run


class record_launches:
    """Context manager: every kernel launch of the launchers is appended to a list (kernel, grid,
    args, constexprs and options) instead of running; outputs stay as allocated. The compile
    test uses it to compile exactly what the launchers would launch, without a GPU."""

    def __enter__(self):
        global _RECORD
        self.launches, _RECORD = [], []
        return self.launches

    def __exit__(self, *exc):
        global _RECORD
        self.launches.extend(_RECORD)
        _RECORD = None


def _launch(kernel, grid, *args, **meta):
    if _RECORD is not None:
        _RECORD.append(dict(kernel=kernel, grid=grid, args=args, meta=meta))
    else:
        kernel[grid](*args, **meta)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


def tile_config(l_r: int, l_c: int, dtype: torch.dtype, backward: bool, interpret: bool | None = None) -> dict | None:
    """Block sizes and launch options for query items of at most ``l_r`` rows on R and context
    items of at most ``l_c`` on C.

    GPU, fp16 / bf16: forward tiles of 128 x 128 (8 warps: each tile-sized float32 value is 64
    registers a thread), or 64 x 256 when the context items have more than 128 rows (ViT
    patches). The backward tile kernel, whose epilogue holds about twice as many tile values,
    takes half the cells: 128 x 64 (an MMA with M = 128 over 8 warps keeps each row in one warp
    group; at 64 x 128 the two warp groups split the columns, and every context sum reshuffles
    them). float32 (exact products on CUDA cores) halves both, and takes at most 8192 cells.
    Interpreter: blocks of ``INTERPRET_BLOCK`` rows (its cost is
    per operation and program, not per element, so few large programs are fastest; the tests
    shrink it to get many blocks a side). ``None`` where no configuration takes items this long
    (see ``input_limits``)."""
    interpret = interpreter_enabled() if interpret is None else interpret
    need_m, need_n = max(16, _pow2(l_r)), max(16, _pow2(l_c))
    if interpret:
        return dict(BM=max(INTERPRET_BLOCK, need_m), BN=max(INTERPRET_BLOCK, need_n), BK=32, num_warps=4,
                    num_stages=1)
    fp32 = dtype == torch.float32
    if backward and not fp32 and need_m <= 128 and need_n <= 64:
        return dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3)
    # preferred size, then the largest that fits shared memory (float32 tiles of 128 x 128 would
    # stage about 300 KiB: more than an H100 has)
    for elems in ((8192 if fp32 else 16384) // (2 if backward else 1), 8192 if fp32 else 16384):
        bn = max(64 if fp32 else 128, need_n)
        bm = max(16, elems // bn)
        if bm < need_m:  # long query items: give R the rows, C what is left
            bm = need_m
            bn = max(need_n, elems // bm)
        if bm >= need_m and bn >= need_n and bm * bn <= elems and min(bm, bn) >= 16:
            return dict(BM=bm, BN=bn, BK=32 if fp32 else 64, num_warps=8 if bm * bn >= 8192 else 4, num_stages=3)
    return None


def _fwd_configs(cfg: dict) -> list:
    """Autotuning candidates around the heuristic configuration (pipeline depth, chunk of d)."""
    base = {k: cfg[k] for k in ("BM", "BN", "BK")}
    out = []
    for stages in (2, 3, 4):
        out.append(triton.Config(dict(base), num_warps=cfg["num_warps"], num_stages=stages))
    if cfg["BK"] == 64:
        out.append(triton.Config(dict(base, BK=128), num_warps=cfg["num_warps"], num_stages=2))
    return out


@functools.lru_cache(maxsize=None)
def _autotuned_fwd(bm: int, bn: int, bk: int, num_warps: int, num_stages: int):
    """The forward kernel wrapped in ``triton.autotune`` for one tile shape, built on first use.
    Keyed on d and the tile's flags; the batch sizes do not re-tune."""
    cfg = dict(BM=bm, BN=bn, BK=bk, num_warps=num_warps, num_stages=num_stages)
    return triton.autotune(configs=_fwd_configs(cfg), key=["D"])(jit._fwd_kernel)


# --------------------------------------------------------------------------------------------
# Packing: blocks of items of one length, on the device, with no host sync
# --------------------------------------------------------------------------------------------


class Side:
    """One input (regions or words) packed into blocks of ``blk`` rows (varlen: only valid rows),
    at most ``ns`` items a block.

    Tables (int32, on the input's device): ``tab`` (nb, blk) the flat row ``item * L + position``
    of every block row, or -1; ``seg`` (nb, blk) its segment, or -1; ``item`` (nb, NS) and
    ``length`` (nb, NS) of every segment (-1 and 0 where none); ``count`` (1,) the number of
    blocks. ``nb`` is an upper bound computed from the shapes alone (the kernels skip the blocks
    beyond ``count``), or the exact count when ``exact`` (one host sync)."""

    def __init__(self, x: torch.Tensor, lengths: torch.Tensor, blk: int, ns: int, exact: bool = False):
        self.x, self.blk, self.ns = x, blk, ns
        NS = ns
        self.b, self.L, self.d = x.shape
        if self.b * self.L >= 2 ** 31:
            raise ValueError(f"{self.b} x {self.L} rows do not fit the kernels' 32-bit row indices")
        dev = lengths.device
        lens = lengths.to(torch.int64).clamp(1, self.L)
        # Items of length l fit min(NS, blk // l) to a block: blocks of c items take every item
        # with that capacity c, longest first, back to back (so lengths may differ in a block).
        slen, perm = torch.sort(lens, descending=True, stable=True)
        cap = torch.clamp(blk // slen, max=NS)  # non-decreasing along the sorted order
        count = torch.bincount(cap, minlength=NS + 1)
        cv = torch.arange(NS + 1, device=dev)
        nblk = (count + cv.clamp_min(1) - 1) // cv.clamp_min(1)
        off = torch.cumsum(nblk, 0) - nblk  # first block of each capacity
        first = torch.cumsum(count, 0) - count  # first sorted position of each capacity
        pos = torch.arange(self.b, device=dev)
        q = pos - first[cap]
        blk_of = off[cap] + q // cap
        slot = q % cap
        cs = torch.cumsum(slen, 0) - slen  # rows before each item, in sorted order
        start = cs - cs[first[cap] + (q // cap) * cap]  # rows before it in its own block
        c_min = min(NS, blk // self.L)
        bound = min(self.b, -(-self.b // c_min) + NS) if self.b else 0
        self.count = nblk.sum().to(torch.int32).reshape(1)
        if exact and self.b:
            bound = int(self.count[0])
        self.nb = max(bound, 1)
        p = torch.arange(self.L, device=dev)
        valid = p[None, :] < slen[:, None]
        trash = self.nb * blk
        dst = torch.where(valid, blk_of[:, None] * blk + start[:, None] + p[None, :], trash)
        tab = torch.full((trash + 1,), -1, dtype=torch.int32, device=dev)
        tab.scatter_(0, dst.flatten(), (perm[:, None] * self.L + p[None, :]).to(torch.int32).flatten())
        seg = torch.full((trash + 1,), -1, dtype=torch.int32, device=dev)
        seg.scatter_(0, dst.flatten(), slot[:, None].expand(-1, self.L).to(torch.int32).flatten())
        self.tab = tab[:-1].view(self.nb, blk)
        self.seg = seg[:-1].view(self.nb, blk)
        sdst = blk_of * NS + slot
        item = torch.full((self.nb * NS,), -1, dtype=torch.int32, device=dev)
        item.scatter_(0, sdst, perm.to(torch.int32))
        length = torch.zeros(self.nb * NS, dtype=torch.int32, device=dev)
        length.scatter_(0, sdst, slen.to(torch.int32))
        self.item, self.length = item.view(self.nb, NS), length.view(self.nb, NS)
        self.sc = self.inv = self.ex = self.xhat = None

    def norms(self, xhat_dtype=None):
        """Row scales and inverse norms (and x_hat in ``xhat_dtype``) of every flat row."""
        n = self.b * self.L
        dev = self.x.device
        self.sc = torch.empty(n, dtype=torch.float32, device=dev)
        self.inv = torch.empty(n, dtype=torch.float32, device=dev)
        self.ex = torch.zeros(n, dtype=torch.int32, device=dev)
        self.xhat = None if xhat_dtype is None else torch.empty((n, self.d), dtype=xhat_dtype, device=dev)
        if n:
            br = 16 if interpreter_enabled() else 64
            _launch(jit._rownorm_kernel, (triton.cdiv(n, br),),
                self.x, self.sc, self.inv, self.ex, self.sc if self.xhat is None else self.xhat, n, self.d, self.L,
                *self.x.stride(), WRITE_XHAT=self.xhat is not None, BR=br, BK=32 if interpreter_enabled() else 64,
                num_warps=4)
        return self

    def gram(self, gdt: torch.dtype, prec: str) -> torch.Tensor:
        """Block-diagonal normalised Gram matrices of every block, (nb, blk, blk)."""
        g = torch.zeros((self.nb, self.blk, self.blk), dtype=gdt, device=self.x.device)
        if self.b:
            gb = min(self.blk, 128)
            _launch(jit._gram_kernel, (self.nb, self.blk // gb, self.blk // gb), self.x, self.tab, self.seg, self.sc,
                    self.inv, self.count, g, self.d, self.L, *self.x.stride(), PREC=prec, BLK=self.blk, GB=gb,
                    BK=32 if interpreter_enabled() else 64, num_warps=4 if gb <= 64 else 8)
        return g

    def needs_prescale(self, lengths: torch.Tensor) -> bool:
        """Whether a valid row has its largest magnitude outside 2^-40..2^40 (one host sync)."""
        ex = self.ex.view(self.b, self.L)
        valid = torch.arange(self.L, device=ex.device)[None, :] < lengths[:, None]
        bad = valid & (ex.abs() > PRESCALE_EXP) & (ex != TINY_ROW)
        return bool(bad.any())


# --------------------------------------------------------------------------------------------
# Plans: which input goes on which side, flags and precisions
# --------------------------------------------------------------------------------------------


def directions(opts: dict) -> list:
    """(direction, weight) of every pass: "both" is a pass of each direction, weight 1/2."""
    if opts["direction"] == "both":
        return [("t2i", 0.5), ("i2t", 0.5)]
    return [(opts["direction"], 1.0)]


class Plan:
    """Everything the launches of one direction need, from the inputs and options: the query
    items on R, their context on C (t2i: words x regions, i2t: regions x words)."""

    def __init__(self, regions, region_lengths, words, word_lengths, opts: dict, backward: bool,
                 direction: str, weight: float):
        self.direction, self.weight = direction, weight
        self.r_is_words = direction == "t2i"
        r, rl, c, cl = (words, word_lengths, regions, region_lengths) if self.r_is_words else \
            (regions, region_lengths, words, word_lengths)
        self.dtype = regions.dtype
        self.cfg = tile_config(r.shape[1], c.shape[1], self.dtype, backward)
        if self.cfg is None:
            raise ValueError(f"no Triton tile takes blocks of {r.shape[1]} x {c.shape[1]} rows in "
                             f"{str(self.dtype).replace('torch.', '')} (see mefn_fast.backends.triton.input_limits)")
        b_img, b_txt = regions.shape[0], words.shape[0]
        bm, bn = self.cfg["BM"], self.cfg["BN"]
        # the exact block counts cost a host sync on a GPU: worth it for large grids only
        exact = regions.device.type == "cpu" or math.ceil(r.shape[0] * r.shape[1] / bm) * math.ceil(
            c.shape[0] * c.shape[1] / bn) > EXACT_GRID_TILES
        # Segments a block: 16; on C (the context) in the backward 8 when full-length items fill at
        # least an eighth of a block, which halves its per-item tensors (shorter items then pack at
        # most 8 to a block). (The forward at 8 spills a few registers: ptxas's choice, measured.)
        self.ns_r = NS_MAX
        self.ns_c = NS_MAX // 2 if backward and c.shape[1] >= bn // 8 else NS_MAX
        self.R = Side(r, rl, bm, self.ns_r, exact)
        self.C = Side(c, cl, bn, self.ns_c, exact)
        self.lam = float(opts["lambda_t2i"] if direction == "t2i" else opts["lambda_i2t"])
        self.tau, self.lam_lse = float(opts["tau"]), float(opts["lambda_lse"])
        self.flags = dict(CLIP=opts["attn_norm"] == "clipped_l2norm", MFE=bool(opts["mfe"]), LSE=opts["agg"] == "lse")
        self.exact_max = not self.safe_shifts()
        fp32 = self.dtype == torch.float32
        self.prec = dot_precision(self.dtype) if fp32 else "tf32"
        self.split = 3 if (fp32 and self.prec == "ieee") else 2  # exact segment sums for exact fp32
        self.gdt = torch.float32 if fp32 else torch.float16
        self.d = regions.shape[2]
        self.group = max(1, min(64, GROUP_BYTES // max(1, bm * self.d * regions.element_size())))
        self.b_img, self.b_txt = b_img, b_txt

    def safe_shifts(self) -> bool:
        """Whether the fixed shifts keep every exp in float32's normal range (module docstring)."""
        if self.lam * 2 > SAFE_EXP:
            return False
        inv_tau = 1.0 / self.tau if self.flags["MFE"] else 0.0
        if inv_tau > SAFE_EXP:
            return False
        if self.flags["LSE"] and inv_tau + math.log(256) + 2 * self.lam_lse > SAFE_EXP:
            return False
        return True

    def prepare(self, xhat: bool):
        """Row norms of both sides (x_hat too for the backward) and the Gram blocks needed."""
        xd = self.dtype if xhat else None
        self.R.norms(xd)
        self.C.norms(xd)
        if self.dtype == torch.float32:
            self.prescale = True
        elif self.dtype == torch.bfloat16:
            self.prescale = self.R.needs_prescale(self.r_lengths) or self.C.needs_prescale(self.c_lengths)
        else:
            self.prescale = False
        self.gc = self.C.gram(self.gdt, self.prec)
        return self

    def set_lengths(self, region_lengths, word_lengths):
        self.r_lengths, self.c_lengths = (word_lengths, region_lengths) if self.r_is_words else \
            (region_lengths, word_lengths)
        return self

    def pair_strides(self, t: torch.Tensor):
        """Strides of (R item, C item) in a (B_img, B_txt) tensor."""
        return (t.stride(1), t.stride(0)) if self.r_is_words else (t.stride(0), t.stride(1))

    def side_args(self):
        R, C = self.R, self.C
        return (R.x, R.tab, R.seg, R.item, R.length, R.sc, R.inv, R.count,
                C.x, C.tab, C.seg, C.item, C.length, C.sc, C.inv, C.count)

    def consts(self) -> dict:
        return dict(EXACT_MAX=self.exact_max, PRESCALE=self.prescale,
                    MAIN_PREC=self.prec, SPLIT=self.split, EMU=interpreter_enabled(), GDT=_tl_dtype(self.gdt), GPREC=self.prec,
                    EVEN_K=self.d % self.cfg["BK"] == 0, NSR=self.ns_r, NSC=self.ns_c, **self.flags)


def _tl_dtype(dt: torch.dtype):
    import triton.language as tl
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dt]


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def xattn_similarity_forward(regions, region_lengths, words, word_lengths, opts: dict) -> torch.Tensor:
    """float32 scores (B_img, B_txt). ``opts``: the fields of :class:`mefn_fast.options.XAttnOptions`.

    Inputs: (B, L, d) tensors of one dtype on one device (any strides), int64 lengths in [1, L]
    on the same device. ``direction="both"`` is a pass of each direction (each with its own
    tiles), the second adding its half to the scores."""
    b_img, b_txt = regions.shape[0], words.shape[0]
    out = torch.zeros((b_img, b_txt), dtype=torch.float32, device=regions.device)
    if b_img == 0 or b_txt == 0:
        return out
    for i, (direction, weight) in enumerate(directions(opts)):
        plan = Plan(regions, region_lengths, words, word_lengths, opts, False, direction, weight)
        plan.set_lengths(region_lengths, word_lengths).prepare(xhat=False)
        R, C, cfg = plan.R, plan.C, plan.cfg
        s_or, s_oc = plan.pair_strides(out)
        args = (*plan.side_args(), plan.gc, out, plan.d, R.L, C.L, R.nb, C.nb, plan.group,
                *R.x.stride(), *C.x.stride(), s_or, s_oc, plan.lam, plan.tau, plan.lam_lse, plan.weight)
        grid = (R.nb * C.nb,)
        consts = dict(plan.consts(), ACCUMULATE=i > 0)
        if single_config() or _RECORD is not None:
            _launch(jit._fwd_kernel, grid, *args, **consts, **cfg)
        else:
            _autotuned_fwd(*(cfg[k] for k in ("BM", "BN", "BK", "num_warps", "num_stages")))[grid](*args, **consts)
    return out


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _normalize_backward(side: Side, lengths: torch.Tensor, dxhat: torch.Tensor, dtype) -> torch.Tensor:
    """Backward of ``F.normalize(x, eps=1e-12)`` on the valid rows from the overflow-safe row
    scales; padded rows get exactly 0."""
    b, L, d = side.x.shape
    x = side.x.reshape(b * L, d).float()
    xh = (x * side.sc[:, None]) * side.inv[:, None]
    inv_u = (side.sc * side.inv)[:, None]  # 1 / max(|x|, 1e-12)
    big = (side.ex != TINY_ROW)[:, None]
    mask = (torch.arange(L, device=x.device)[None, :] < lengths[:, None]).reshape(b * L, 1)
    xh = torch.where(mask, xh, 0.0)
    dxhat = dxhat.reshape(b * L, d)
    dot = (xh * dxhat).sum(-1, keepdim=True)
    dx = (dxhat - torch.where(big, xh * dot, 0.0)) * inv_u
    return torch.where(mask, dx, 0.0).reshape(b, L, d).to(dtype)


def xattn_similarity_backward(grad, regions, region_lengths, words, word_lengths, opts: dict,
                              need_regions: bool = True, need_words: bool = True):
    """Gradients (d regions, d words) in the inputs' dtype for the upstream ``grad`` (B_img, B_txt).
    ``direction="both"``: the two directions' gradients of the normalised rows are summed before
    the backward of the normalisation."""
    b_img, b_txt = regions.shape[0], words.shape[0]
    if b_img == 0 or b_txt == 0 or not (need_regions or need_words):
        return torch.zeros_like(regions), torch.zeros_like(words)
    g = grad.to(torch.float32).contiguous()  # an upstream gradient of .sum() has stride 0
    total = {}  # "regions" / "words": float32 gradient of the normalised rows, (B, L, d)
    for direction, weight in directions(opts):
        plan = Plan(regions, region_lengths, words, word_lengths, opts, True, direction, weight)
        plan.set_lengths(region_lengths, word_lengths).prepare(xhat=True)
        need_r, need_c = (need_words, need_regions) if plan.r_is_words else (need_regions, need_words)
        for name, dxhat in zip(("words", "regions") if plan.r_is_words else ("regions", "words"),
                               _direction_backward(plan, g, need_r, need_c)):
            if dxhat is not None:
                total[name] = dxhat if name not in total else total[name] + dxhat
    R, C = plan.R, plan.C
    sides = {"words": (R, plan.r_lengths), "regions": (C, plan.c_lengths)} if plan.r_is_words else \
        {"regions": (R, plan.r_lengths), "words": (C, plan.c_lengths)}
    out = []
    for name, x in (("regions", regions), ("words", words)):
        side, lengths = sides[name]
        out.append(_normalize_backward(side, lengths, total[name], plan.dtype) if name in total
                   else torch.zeros_like(x))
    return tuple(out)


def _gemm_bd(rows: int) -> int:
    """Features a gradient-GEMM program takes: at most 16384 float32 accumulators (64 registers
    a thread at 8 warps)."""
    return 64 if interpreter_enabled() else min(128, 16384 // rows)


def _direction_backward(plan: Plan, g: torch.Tensor, need_r: bool, need_c: bool):
    """float32 gradients of the normalised R and C rows, (B, L, d) each (None where not needed), of
    one direction's scores times its weight."""
    R, C, cfg = plan.R, plan.C, plan.cfg
    bm, bn = cfg["BM"], cfg["BN"]
    dev = R.x.device
    ds_dtype = torch.float32 if plan.dtype == torch.float32 else plan.dtype
    dxr = torch.zeros((R.b * R.L, plan.d), dtype=torch.float32, device=dev) if need_r else None
    dxc = torch.zeros((C.b * C.L, plan.d), dtype=torch.float32, device=dev) if need_c else None
    dgc = torch.zeros((C.b * C.L, C.L), dtype=torch.float32, device=dev)
    # dS and the two factors of the Gram gradient, a tile each
    tile_bytes = bm * bn * (torch.finfo(ds_dtype).bits + 2 * torch.finfo(plan.gdt).bits) // 8
    chunk = max(1, min(R.nb, BWD_CHUNK_BYTES // (tile_bytes * C.nb)))
    s_or, s_oc = plan.pair_strides(g)
    consts = plan.consts()
    scaled = ds_dtype != torch.float32
    gemm_prec = plan.prec if plan.dtype == torch.float32 else "tf32"
    for rb0 in range(0, R.nb, chunk):
        nrb = min(chunk, R.nb - rb0)
        n_r_chunk = (R.count - rb0).clamp(0, nrb).to(torch.int32)
        ds = torch.empty((nrb * C.nb, bm, bn), dtype=ds_dtype, device=dev)
        dsc = torch.ones(nrb * C.nb, dtype=torch.float32, device=dev)
        fa = torch.empty((2, nrb * C.nb, bm, bn), dtype=plan.gdt, device=dev)  # A, A dd2 / asc
        asc = torch.empty(nrb * C.nb, dtype=torch.float32, device=dev)
        _launch(jit._bwd_tile_kernel, (nrb * C.nb,),
            *plan.side_args(), plan.gc, g, ds, dsc, fa[0], fa[1], asc,
            plan.d, R.L, C.L, nrb, C.nb, plan.group, rb0,
            *R.x.stride(), *C.x.stride(), s_or, s_oc, plan.lam, plan.tau, plan.lam_lse, plan.weight,
            **consts, DS_SCALED=scaled, GRAM_EXACT=plan.dtype == torch.float32, **cfg)
        if need_r:  # R rows of this chunk: complete here
            _launch(jit._bwd_gemm_kernel, (nrb, triton.cdiv(plan.d, _gemm_bd(bm))),
                ds, dsc, C.xhat, C.tab, R.tab[rb0:], n_r_chunk, C.count, dxr,
                plan.d, C.L, C.nb, C.L * plan.d, plan.d, 1, 0,
                OWN_R=True, DS_SCALED=scaled, PREC=gemm_prec, BO=bm, BX=bn, BD=_gemm_bd(bm), BM=bm, BN=bn,
                num_warps=cfg["num_warps"], num_stages=2)
        if need_c:  # C rows: add this chunk's R blocks
            _launch(jit._bwd_gemm_kernel, (C.nb, triton.cdiv(plan.d, _gemm_bd(bn))),
                ds, dsc, R.xhat, R.tab[rb0:], C.tab, C.count, n_r_chunk, dxc,
                plan.d, R.L, C.nb, R.L * plan.d, plan.d, 1, int(rb0 > 0),
                OWN_R=False, DS_SCALED=scaled, PREC=gemm_prec, BO=bn, BX=bm, BD=_gemm_bd(bn), BM=bm, BN=bn,
                num_warps=cfg["num_warps"], num_stages=2)
        if need_c:  # 2 dG of the C items: add this chunk's R blocks
            gb = min(bn, GRAM_GRAD_BLOCK)
            _launch(jit._bwd_gram_kernel, (C.nb, bn // gb, bn // gb),
                fa[0], fa[1], asc, C.tab, C.seg, n_r_chunk, C.count, dgc, C.L, C.nb, int(rb0 > 0),
                PREC=plan.prec, BM=bm, BN=bn, GB=gb, num_warps=4)
    dxr = None if dxr is None else dxr.view(R.b, R.L, plan.d)
    if dxc is not None:  # + 2 dG X_hat, per item (padded rows may hold anything: masked out first)
        xh = C.x.reshape(C.b * C.L, plan.d).float() * C.sc[:, None] * C.inv[:, None]
        valid = torch.arange(C.L, device=dev)[None, :] < plan.c_lengths[:, None]
        xh = torch.where(valid.reshape(-1, 1), xh, 0.0).view(C.b, C.L, plan.d)
        dxc = dxc.view(C.b, C.L, plan.d) + torch.bmm(dgc.view(C.b, C.L, C.L), xh)
    return dxr, dxc
