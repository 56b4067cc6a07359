"""Device code of the Triton ``xattn_similarity`` kernels: the ``@triton.jit`` functions only.

The design, the numbers and the risks are in :mod:`mefn_fast.kernels.xattn_similarity`, which
plans the work and launches these kernels; the math is ``docs/math.md``, section 1.

Vocabulary. A *tile* is the cosine matrix of one R block (the MMA's M side, ``BM`` packed rows)
against one C block (the N side, ``BN`` packed columns). A block packs several items (images or
captions), only their valid rows, one *segment* of consecutive rows per item (at most ``NSR`` /
``NSC`` segments a block). The host's tables say, for every block row, its flat input row
(``item * L + position``, or -1) and its segment (or -1), and for every segment its item and
length. A tile's rows are one direction's query positions and its columns their context
positions (t2i: words x regions, i2t: regions x words): the softmax runs along the MMA's N axis.

Segment sums and their broadcasts back to the tile are ``tl.dot`` products with the blocks'
0/1 segment matrices, so they run on tensor cores for any packing (see ``_sdot``). No
``@triton.jit`` function of ``triton.language.standard`` is called (``tl.sum``, ``tl.max``,
``tl.zeros``...): if Triton was imported before ``TRITON_INTERPRET=1`` was set, those stay
compiled-mode functions that the interpreter cannot call; ``tl.reduce`` with the standard
combine functions is a builtin. Under the interpreter every nested ``@triton.jit`` call costs a
few milliseconds, so the helpers are few and coarse.
"""
from __future__ import annotations

import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # "minus infinity" that keeps exp(x - max) and 0 * x free of NaN
TINY = tl.constexpr(1000)  # exponent marker of a row whose norm is at most 1e-12
NSP = tl.constexpr(64)  # query segments padded for the per-pair sums (an MMA's M is at least 64)
CHAIN_ROWS = tl.constexpr(128)  # 8 warps x 16 rows: a tile of fewer rows breaks its product chains (_own)
LEFT = tl.constexpr(0)  # _sdot forms: x @ oh
RIGHT = tl.constexpr(1)  # oh @ x
ROWSUM = tl.constexpr(2)  # oh @ x as (x^T @ oh^T)^T

_sum_combine = tl.standard._sum_combine
_max_combine = tl.standard._elementwise_max


@triton.jit
def _amax_all(x):
    """max |x| over a 2-D tensor, 1.0 when it is 0 (a scale factor)."""
    m = tl.reduce(tl.reduce(tl.abs(x), 1, _max_combine), 0, _max_combine)
    return tl.where(m > 0, m, 1.0)


@triton.jit
def _pad_cols(y):
    """(K, N) -> (K, 2N): every column followed by a zero column."""
    return tl.reshape(tl.join(y, y * 0.0), (y.shape[0], 2 * y.shape[1]))


@triton.jit
def _even_cols(y):
    """(M, 2N) -> (M, N): the even columns (undoes :func:`_pad_cols` on a product's output)."""
    a, b = tl.split(tl.reshape(y, (y.shape[0], y.shape[1] // 2, 2)))
    return a


@triton.jit
def _own(y, rt):
    """y, passed through a branch on ``rt`` (None: y as it is; else a runtime float: a branch the
    compiler cannot decide, y both ways). Triton gives a product whose result reaches another
    product, however far on, all the warps on M (for FlashAttention's P @ V); a tile of fewer
    rows than that (64 rows over 8 warps, ``CHAIN_ROWS``) then holds every tile-sized value in
    both warp groups, twice the registers. The chain Triton follows ends at a branch, so a
    product whose result passes one keeps the tile's layout (the ViT forward: 3.6 KB of spills
    a thread without, none with)."""
    if rt is not None:
        if rt == rt:
            y = y + 0.0
    return y


@triton.jit
def _sdot(x, oh, FORM: tl.constexpr, SPLIT: tl.constexpr, EMU: tl.constexpr, rt=None):
    """:func:`_sdot16` for any output width: a product with N = 8 (eight segments) is computed
    with N = 16, every output column followed by a zero one. (An N = 8 product is an mma.sync in
    Triton 3.6, whose operand fragments of a whole tile, converted from the wgmma layout, spill.)"""
    if FORM == LEFT:
        if oh.shape[1] < 16:
            return _even_cols(_sdot16(x, _pad_cols(oh), LEFT, SPLIT, EMU, rt))
        else:
            return _sdot16(x, oh, LEFT, SPLIT, EMU, rt)
    elif FORM == RIGHT:
        if x.shape[1] < 16:
            return _even_cols(_sdot16(_pad_cols(x), oh, RIGHT, SPLIT, EMU, rt))
        else:
            return _sdot16(x, oh, RIGHT, SPLIT, EMU, rt)
    else:
        if oh.shape[0] < 16:
            return tl.trans(_even_cols(tl.trans(_sdot16(x, tl.trans(_pad_cols(tl.trans(oh))), ROWSUM, SPLIT, EMU, rt))))
        else:
            return _sdot16(x, oh, ROWSUM, SPLIT, EMU, rt)


@triton.jit
def _sdot16(x, oh, FORM: tl.constexpr, SPLIT: tl.constexpr, EMU: tl.constexpr, rt=None):
    """Float32 data x times a 0/1 segment matrix oh (exact in any dtype) on tensor cores:
    x @ oh (FORM LEFT), oh @ x (RIGHT), or oh @ x computed as (x^T @ oh^T)^T (ROWSUM: a sum over
    the rows of a tile with M = 16 would be an mma.sync holding all its fragments in registers;
    transposed, the tile is a wgmma operand).

    x is split into SPLIT bfloat16 terms (each the top 8 significant bits of what is left), so
    x = t1 + t2 (+ t3) + r with |r| <= 2^-16 |x| for SPLIT = 2 (fp16 / bf16 inputs: far below
    their rounding) and r = 0 for SPLIT = 3 (float32 inputs: the products are exact and the sums
    are float32 sums, as "ieee" products would give). The terms are multiplied by the 0/1 matrix
    exactly and accumulated in float32. EMU multiplies the same terms in float32 (for the
    interpreter, whose bf16 dot is wrong). ``rt``: the LEFT and RIGHT products pass
    :func:`_own` (the broadcasts give it: their products are tile-sized; the interpreter has no
    layouts). (One function with the split written out: the interpreter pays for every nested
    call.)"""
    t1 = (x.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    r = x - t1
    t2 = (r.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    if SPLIT == 3:
        t3 = r - t2  # at most 8 significant bits are left: exact in bf16
    if EMU:
        if FORM == LEFT:
            acc = tl.dot(t2, oh, tl.dot(t1, oh, input_precision="ieee"), input_precision="ieee")
            if SPLIT == 3:
                acc = tl.dot(t3, oh, acc, input_precision="ieee")
        else:
            acc = tl.dot(oh, t2, tl.dot(oh, t1, input_precision="ieee"), input_precision="ieee")
            if SPLIT == 3:
                acc = tl.dot(oh, t3, acc, input_precision="ieee")
        return acc
    else:
        ob = oh.to(tl.bfloat16)
        if FORM == LEFT:
            acc = _own(tl.dot(t2.to(tl.bfloat16), ob, _own(tl.dot(t1.to(tl.bfloat16), ob), rt)), rt)
            if SPLIT == 3:
                acc = _own(tl.dot(t3.to(tl.bfloat16), ob, acc), rt)
            return acc
        elif FORM == RIGHT:
            acc = _own(tl.dot(ob, t2.to(tl.bfloat16), _own(tl.dot(ob, t1.to(tl.bfloat16)), rt)), rt)
            if SPLIT == 3:
                acc = _own(tl.dot(ob, t3.to(tl.bfloat16), acc), rt)
            return acc
        else:
            obt = tl.trans(ob)
            acc = tl.dot(tl.trans(t2.to(tl.bfloat16)), obt, tl.dot(tl.trans(t1.to(tl.bfloat16)), obt))
            if SPLIT == 3:
                acc = tl.dot(tl.trans(t3.to(tl.bfloat16)), obt, acc)
            return tl.trans(acc)



@triton.jit
def _terms(x, SPLIT: tl.constexpr, EMU: tl.constexpr):
    """The SPLIT bfloat16 terms of x (see :func:`_sdot`), as bf16 (float32 values under EMU)."""
    t1 = (x.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    r = x - t1
    t2 = (r.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    t3 = r - t2
    if EMU:
        return t1, t2, t3
    else:
        return t1.to(tl.bfloat16), t2.to(tl.bfloat16), t3.to(tl.bfloat16)


@triton.jit
def _tdot(t1, t2, t3, ob, SPLIT: tl.constexpr, EMU: tl.constexpr):
    """sum of t_i @ ob over the SPLIT terms."""
    if EMU:
        acc = tl.dot(t2, ob, tl.dot(t1, ob, input_precision="ieee"), input_precision="ieee")
        if SPLIT == 3:
            acc = tl.dot(t3, ob, acc, input_precision="ieee")
    else:
        acc = tl.dot(t2, ob, tl.dot(t1, ob))
        if SPLIT == 3:
            acc = tl.dot(t3, ob, acc)
    return acc


@triton.jit
def _csum3(e, x, S, oh, SPLIT: tl.constexpr, EMU: tl.constexpr):
    """(e x) @ oh, (e S) @ oh and e @ oh: the three context sums of the softmax, with every split
    term formed first, element by element, so that x and S die before the products (at a 128 x 128
    tile each tile-sized value is 64 registers a thread)."""
    NC: tl.constexpr = oh.shape[1]
    if NC < 16:
        oh2 = _pad_cols(oh)
    else:
        oh2 = oh
    ob = oh2 if EMU else oh2.to(tl.bfloat16)
    b1, b2, b3 = _terms(e * S, SPLIT, EMU)
    num = _tdot(b1, b2, b3, ob, SPLIT, EMU)
    a1, a2, a3 = _terms(e * x, SPLIT, EMU)
    sax = _tdot(a1, a2, a3, ob, SPLIT, EMU)
    c1, c2, c3 = _terms(e, SPLIT, EMU)
    z = _tdot(c1, c2, c3, ob, SPLIT, EMU)
    if NC < 16:
        return _even_cols(sax), _even_cols(num), _even_cols(z)
    else:
        return sax, num, z


@triton.jit
def _cbc(Y, cseg, SPLIT: tl.constexpr, EMU: tl.constexpr, rt):
    """Broadcast a small (rows, NC) tensor to the tile, each context item's value on its columns.
    tl.dot needs K >= 16: with NC = 8 every value is paired with a 0 (and the segment matrix with
    a 0 row), (rows, 16) @ (16, BN). ``rt``: see :func:`_own`."""
    NC: tl.constexpr = Y.shape[1]
    if NC < 16:
        Yp = tl.reshape(tl.join(Y, Y * 0.0), (Y.shape[0], 2 * NC))
        k = tl.arange(0, 2 * NC)
        oh = tl.where(((k % 2) == 0)[:, None] & (cseg[None, :] == (k // 2)[:, None]), 1.0, 0.0)
        return _sdot(Yp, oh, LEFT, SPLIT, EMU, rt)
    else:
        return _sdot(Y, tl.where(cseg[None, :] == tl.arange(0, NC)[:, None], 1.0, 0.0), LEFT, SPLIT, EMU, rt)


@triton.jit
def _qbc(Y, qseg, SPLIT: tl.constexpr, EMU: tl.constexpr, rt=None):
    """Broadcast an (NQ, n) tensor to the rows: row k gets row qseg[k] (0 where invalid). With
    NQ = 8 the rows are interleaved with 0 rows to reach tl.dot's K >= 16. ``rt``: see
    :func:`_own` (for a tile-sized result)."""
    NQ: tl.constexpr = Y.shape[0]
    if NQ < 16:
        Yp = tl.reshape(tl.permute(tl.join(Y, Y * 0.0), (0, 2, 1)), (2 * NQ, Y.shape[1]))
        k = tl.arange(0, 2 * NQ)
        oh = tl.where(((k % 2) == 0)[None, :] & (qseg[:, None] == (k // 2)[None, :]), 1.0, 0.0)
        return _sdot(Yp, oh, RIGHT, SPLIT, EMU, rt)
    else:
        return _sdot(Y, tl.where(qseg[:, None] == tl.arange(0, NQ)[None, :], 1.0, 0.0), RIGHT, SPLIT, EMU, rt)


@triton.jit
def _psum(Y, ohq_tp, SPLIT: tl.constexpr, EMU: tl.constexpr, NQ: tl.constexpr, NC: tl.constexpr):
    """Per-pair sums of a small (rows, NC) tensor over each query item's rows: (NQ, NC), from the
    0/1 matrix padded to NSP rows (a 64-row MMA; rows NQ.. are 0)."""
    return tl.reduce(tl.reshape(_sdot(Y, ohq_tp, RIGHT, SPLIT, EMU), (NSP // NQ, NQ, NC)), 0, _sum_combine)


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_product(r_ptr, rf, rok, s_rb, s_rl, s_rd, LR, r_sc_ptr, r_in_ptr,
                  c_ptr, cf, cok, s_cb, s_cl, s_cd, LC, c_sc_ptr, c_in_ptr, D,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRESCALE: tl.constexpr,
                  MAIN_PREC: tl.constexpr, EVEN_K: tl.constexpr):
    """The normalised cosine tile S (BM, BN), 0 outside the valid rows and columns (their loads are
    masked to 0). The epilogue needs no tile-sized mask after this: every context sum is a product
    with a 0/1 segment matrix whose invalid rows are 0, and every per-item value of an invalid row
    is masked in the small tensors.

    ``tl.dot`` over chunks of BK features of the raw rows; with PRESCALE each row is first scaled
    by its power of two (exact), so that features of any finite size cannot overflow or underflow
    the products (float32 and bfloat16 have 8-bit exponents). S = acc * (1/|r s_r|) * (1/|c s_c|)."""
    r_rows = r_ptr + (rf // LR).to(tl.int64) * s_rb + (rf % LR).to(tl.int64) * s_rl
    c_rows = c_ptr + (cf // LC).to(tl.int64) * s_cb + (cf % LC).to(tl.int64) * s_cl
    if PRESCALE:
        r_sc = tl.load(r_sc_ptr + rf, mask=rok, other=0.0)
        c_sc = tl.load(c_sc_ptr + cf, mask=cok, other=0.0)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        if EVEN_K:
            a = tl.load(r_rows[:, None] + kk[None, :] * s_rd, mask=rok[:, None], other=0.0)
            b = tl.load(c_rows[:, None] + kk[None, :] * s_cd, mask=cok[:, None], other=0.0)
        else:
            a = tl.load(r_rows[:, None] + kk[None, :] * s_rd, mask=rok[:, None] & (kk < D)[None, :], other=0.0)
            b = tl.load(c_rows[:, None] + kk[None, :] * s_cd, mask=cok[:, None] & (kk < D)[None, :], other=0.0)
        if PRESCALE:
            a = (a.to(tl.float32) * r_sc[:, None]).to(a.dtype)
            b = (b.to(tl.float32) * c_sc[:, None]).to(b.dtype)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=MAIN_PREC)
    # per-row values are loaded after the loop: a column vector costs BN / 4 registers a thread
    # in the MMA layout, and nothing but the addresses should stay alive across the loop
    r_in = tl.load(r_in_ptr + rf, mask=rok, other=0.0)
    c_in = tl.load(c_in_ptr + cf, mask=cok, other=0.0)
    if PRESCALE:
        return acc * r_in[:, None] * c_in[None, :]
    else:
        r_in = r_in * tl.load(r_sc_ptr + rf, mask=rok, other=0.0)
        c_in = c_in * tl.load(c_sc_ptr + cf, mask=cok, other=0.0)
        return acc * r_in[:, None] * c_in[None, :]


@triton.jit
def _tile_rows(rb, cb, r_tab, c_tab, BM: tl.constexpr, BN: tl.constexpr, AGAIN: tl.constexpr = False):
    """Flat input rows of R block ``rb`` and C block ``cb`` (0 where invalid) and their validity.
    AGAIN: a second read (volatile, so that the compiler does not merge it with the first and
    keep those values alive in between)."""
    rf = tl.load(r_tab + rb * BM + tl.arange(0, BM), volatile=AGAIN)
    cf = tl.load(c_tab + cb * BN + tl.arange(0, BN), volatile=AGAIN)
    rok = rf >= 0
    cok = cf >= 0
    return tl.where(rok, rf, 0), rok, tl.where(cok, cf, 0), cok


@triton.jit
def _tile_segments(rb, cb, r_seg, c_seg, BM: tl.constexpr, BN: tl.constexpr, NSR: tl.constexpr):
    """The segment of every row and column of the tile (-1 where invalid) and the rows' 0/1
    segment matrix (rows x NSR; zero rows where invalid), read after the product. (Per-item values
    are read where they are used: a value alive from here to the store would be spilled.)"""
    rseg = tl.load(r_seg + rb * BM + tl.arange(0, BM))
    cseg = tl.load(c_seg + cb * BN + tl.arange(0, BN))
    return rseg, tl.where(rseg[:, None] == tl.arange(0, NSR)[None, :], 1.0, 0.0), cseg


@triton.jit
def _items(item_ptr, len_ptr, b, NS: tl.constexpr):
    """Item ids, lengths and validity of the segments of block b; their count."""
    s = tl.arange(0, NS)
    item = tl.load(item_ptr + b * NS + s)
    ok = item >= 0
    return item, tl.load(len_ptr + b * NS + s), ok, tl.reduce(ok.to(tl.int32), 0, _sum_combine)


@triton.jit
def _segmax(x, seg, n_seg, init, AXIS: tl.constexpr, NS: tl.constexpr):
    """Exact maxima of x over each segment of axis AXIS (segment ids ``seg`` along that axis),
    placed in ``init`` (that axis replaced by the NS segments). Only the exact path (large
    temperatures) takes this loop over the segments."""
    m = init
    s_idx = tl.arange(0, NS)
    for s in range(0, n_seg):
        if AXIS == 1:
            ms = tl.reduce(tl.where(seg[None, :] == s, x, NEG), 1, _max_combine)
            m = tl.where(s_idx[None, :] == s, ms[:, None], m)
        else:
            ms = tl.reduce(tl.where(seg[:, None] == s, x, NEG), 0, _max_combine)
            m = tl.where(s_idx[:, None] == s, ms[None, :], m)
    return m


# --------------------------------------------------------------------------------------------
# One direction on a tile whose rows are the query positions and whose columns are the context
# positions (docs/math.md, steps 3-8): words x regions for t2i, regions x words for i2t. "Small" tensors hold one value per (query position, context item): (rows, NS);
# "pair" tensors one per (query item, context item): (NS, NS). Context sums are (tile @ ohc),
# their broadcasts (small @ ohc^T); query sums (ohq^T @ .), their broadcasts (ohq @ .).
# --------------------------------------------------------------------------------------------


@triton.jit
def _dir_forward(S, g_ptr, ohq, qseg, cseg, q_seg, q_item, q_len, qb, c_item, c_len, cb, lam, tau, lam_lse,
                 CLIP: tl.constexpr, MFE: tl.constexpr, LSE: tl.constexpr, EXACT_MAX: tl.constexpr,
                 SPLIT: tl.constexpr, EMU: tl.constexpr, GDT: tl.constexpr, GPREC: tl.constexpr, NQ: tl.constexpr,
                 NC: tl.constexpr):
    """Scores (NQ, NC) of every (query item, context item) pair of the tile, and what the
    backward needs."""
    small0 = tl.full((S.shape[0], NC), 0.0, tl.float32)
    rt = lam if S.shape[0] < CHAIN_ROWS else None  # see _own
    # ---- logits (step 3): clipped l2 norm over the query positions of each context row. (The
    # order below keeps few tile-sized values alive at once: each is 64 registers a thread.)
    if CLIP:
        n2 = _sdot(tl.where(S > 0, S * S, 0.01 * (S * S)), tl.trans(ohq), ROWSUM, SPLIT, EMU)  # (NQ, BN)
        inv_ne = 1.0 / (tl.sqrt(n2) + 1e-8)
        x = tl.where(S > 0, S, 0.1 * S) * _qbc(lam * inv_ne, qseg, SPLIT, EMU, rt)
    else:
        n2 = small0
        inv_ne = small0
        x = lam * S
    # ---- attention (step 4): softmax over the context rows, shifted by lam (x <= lam) or exactly.
    # Invalid cells need no mask: ohc has zero rows for them, and invalid query rows are masked
    # in the small tensors.
    if EXACT_MAX:
        citem, clen, csok, n_cseg = _items(c_item, c_len, cb, NC)
        vsm = (qseg >= 0)[:, None] & csok[None, :]
        m = _segmax(x, cseg, n_cseg, small0 + NEG, 1, NC)
        if SPLIT == 2:  # the value a split broadcast delivers, so that the tile and the sums agree
            hi = (m.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
            m = hi + ((m - hi).to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
        shift = tl.where(vsm, m, 0.0)
        x = x - _cbc(shift, cseg, SPLIT, EMU, rt)
    else:
        shift = small0 + lam
        x = x - lam
    # from here on x is the shifted logit (<= 0 near the maxima): the entropy's sum of A x then
    # carries no cancellation of two numbers of size lam
    e = tl.exp(x)
    # the context segment matrix, made here (alive from the top, it would be spilled)
    ohc = tl.where(cseg[:, None] == tl.arange(0, NC)[None, :], 1.0, 0.0)
    SAx, num, Z = _csum3(e, x, S, ohc, SPLIT, EMU)
    Z = tl.where(Z > 0, Z, 1.0)  # 0 only for an empty context segment
    rZ = 1.0 / Z
    SAx = SAx * rZ
    num = num * rZ
    A = e * _cbc(rZ, cseg, SPLIT, EMU, rt)
    # ---- Gram form (step 5): G A on tensor cores, G block diagonal over the block's items (read
    # here, not earlier: it would hold 32 registers a thread until this product)
    jj = tl.arange(0, S.shape[1])
    G = tl.load(g_ptr + cb.to(tl.int64) * (S.shape[1] * S.shape[1]) + jj[:, None] * S.shape[1] + jj[None, :])
    Ag = A.to(GDT)
    GA = _own(tl.dot(Ag, G, input_precision=GPREC), rt)
    # A A^T G in the Gram product's precision: from the same rounded A, so that the forward's
    # float32 A is dead here
    den2 = _sdot(Ag.to(tl.float32) * GA, ohc, LEFT, SPLIT, EMU)
    # ---- per (query position, context item) from here on: the tile values are dead. (The small
    # tensors' constants are made here, not earlier, so that they do not live across the tile.)
    # the query segments again (a value alive from the top would be spilled)
    qseg = tl.load(q_seg + qb * S.shape[0] + tl.arange(0, S.shape[0]))
    ohq = tl.where(qseg[:, None] == tl.arange(0, NQ)[None, :], 1.0, 0.0)
    qitem, qlen, qsok, n_qseg = _items(q_item, q_len, qb, NQ)
    citem, clen, csok, n_cseg = _items(c_item, c_len, cb, NC)
    vsm = (qseg >= 0)[:, None] & csok[None, :]
    pair_ok = qsok[:, None] & csok[None, :]
    inv_log_n = tl.where(clen > 1, 1.0 / tl.log(tl.maximum(clen.to(tl.float32), 2.0)), 0.0)[None, :]
    qok = qseg >= 0
    m_q = tl.maximum(tl.load(q_len + qb * NQ + tl.where(qok, qseg, 0), mask=qok, other=1), 1).to(tl.float32)[:, None]
    ohq_tp = tl.where(tl.arange(0, NSP)[:, None] == qseg[None, :], 1.0, 0.0)  # (NSP, rows)
    den = tl.sqrt(tl.maximum(den2, 1e-16))
    R = tl.where(vsm, num / den, 0.0)
    # ---- entropies (step 6), log domain: H = log Z - sum_r A (x - shift)
    logZ = tl.log(Z)
    H = tl.where(vsm, logZ - SAx, 0.0)
    # ---- weights (step 7) and aggregation (step 8), per query item, in log space. Every operand
    # of a 0/1 product must be finite (0 * nan = nan): the masks below keep it so.
    if MFE:
        lw = -(H * inv_log_n) / tau  # <= 0
        if EXACT_MAX:
            wsh = _qbc(tl.where(pair_ok, _segmax(lw, qseg, n_qseg, tl.full((NQ, NC), NEG, tl.float32), 0, NQ), 0.0),
                       qseg, SPLIT, EMU)
        else:
            wsh = small0
        ew = tl.where(vsm, tl.exp(lw - wsh), 0.0)
        Sw = _psum(ew, ohq_tp, SPLIT, EMU, NQ, NC)
        Swb = _qbc(tl.where(pair_ok & (Sw > 0), Sw, 1.0), qseg, SPLIT, EMU)
        w = tl.where(vsm, ew / Swb, 0.0)
        logw = tl.where(vsm, lw - wsh - tl.log(Swb), 0.0)
    else:
        w = tl.where(vsm, 1.0 / m_q, 0.0)
        logw = -tl.log(m_q) + small0
    if LSE:
        z = tl.where(vsm, logw + lam_lse * R, 0.0)
        if EXACT_MAX:
            zsh_p = tl.where(pair_ok, _segmax(z, qseg, n_qseg, tl.full((NQ, NC), NEG, tl.float32), 0, NQ), 0.0)
            if SPLIT == 2:
                hi = (zsh_p.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
                zsh_p = hi + ((zsh_p - hi).to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
            ez = tl.where(vsm, tl.exp(z - _qbc(zsh_p, qseg, SPLIT, EMU)), 0.0)
        else:
            zsh_p = tl.full((NQ, NC), 0.0, tl.float32) + lam_lse
            ez = tl.where(vsm, tl.exp(z - lam_lse), 0.0)
        Sz = _psum(ez, ohq_tp, SPLIT, EMU, NQ, NC)
        Sz = tl.where(pair_ok & (Sz > 0), Sz, 1.0)
        score = (tl.log(tl.maximum(qlen, 1).to(tl.float32)[:, None]) + tl.log(Sz) + zsh_p) / lam_lse
        p = tl.where(vsm, ez / _qbc(Sz, qseg, SPLIT, EMU), 0.0)
    else:
        score = _psum(w * R, ohq_tp, SPLIT, EMU, NQ, NC)
        p = w
    score = tl.where(pair_ok, score, 0.0)
    return score, n2, inv_ne, x, A, GA, logZ, shift, H, num, den, den2, R, w, p, inv_log_n, vsm, ohq_tp


@triton.jit
def _dir_backward(S, g_ptr, g, ohq, qseg, cseg, q_seg, q_item, q_len, qb, c_item, c_len, cb, lam, tau, lam_lse,
                  CLIP: tl.constexpr, MFE: tl.constexpr, LSE: tl.constexpr, EXACT_MAX: tl.constexpr,
                  SPLIT: tl.constexpr, EMU: tl.constexpr, GDT: tl.constexpr, GPREC: tl.constexpr, NQ: tl.constexpr,
                  NC: tl.constexpr, GRAM_EXACT: tl.constexpr):
    """dS (the gradient of the tile), and the two factors of the tile's part of 2 dG (of the
    context Gram matrix: 2 dG = (A dd2)^T A; the caller keeps the diagonal blocks): A and
    A dd2 / sc, with the scale sc = max |dd2| (1 when GRAM_EXACT), for the upstream gradient g
    (NQ, NC) of the tile's pairs, recomputing the forward. Tile values that are cheap to recompute (x, the broadcasts) are recomputed rather
    than kept: at 64 registers a thread each, fewer live tile values means fewer spills."""
    score, n2, inv_ne, x, A, GA, logZ, shift, H, num, den, den2, R, w, p, inv_log_n, vsm, ohq_tp = _dir_forward(
        S, g_ptr, ohq, qseg, cseg, q_seg, q_item, q_len, qb, c_item, c_len, cb, lam, tau, lam_lse,
        CLIP, MFE, LSE, EXACT_MAX, SPLIT, EMU, GDT, GPREC, NQ, NC)
    rt = lam if S.shape[0] < CHAIN_ROWS else None  # see _own
    qseg = tl.load(q_seg + qb * S.shape[0] + tl.arange(0, S.shape[0]), volatile=True)
    gs = _qbc(g, qseg, SPLIT, EMU)
    # ---- per (query position, context item): back through steps 8 -> 5
    if LSE:
        dR = gs * p
        u = gs * p / lam_lse  # d score / d log w_k
    else:
        dR = gs * w
        u = gs * w * R
    dR = tl.where(vsm, dR, 0.0)
    u = tl.where(vsm, u, 0.0)
    if MFE:
        sub = _qbc(_psum(u, ohq_tp, SPLIT, EMU, NQ, NC), qseg, SPLIT, EMU)
        dH = tl.where(vsm, -(u - w * sub) * inv_log_n / tau, 0.0)
    else:
        dH = dR * 0.0
    dnum = dR / den
    dd2 = tl.where(vsm & (den2 > 1e-16), -dR * num / (den * den * den), 0.0)  # 2 * d den2
    # dx = A (dA - sum_r A dA) - dH A (log A + H), dA = dnum S + 2 dden2 GA, sum_r A dA = dnum num
    # + 2 dden2 den2, log A = x - log Z (x shifted):  dx = A (dnum S + dd2 GA - dH x + beta)
    beta = -(dnum * num + dd2 * den2) + dH * (logZ - H)
    t = _cbc(dd2, cseg, SPLIT, EMU, rt) * GA + _cbc(beta, cseg, SPLIT, EMU, rt)
    t += _cbc(dnum, cseg, SPLIT, EMU, rt) * S
    if CLIP:
        SC = _qbc(lam * inv_ne, qseg, SPLIT, EMU, rt)
        x = tl.where(S > 0, S, 0.1 * S) * SC
    else:
        x = lam * S
    if EXACT_MAX:
        x = x - _cbc(shift, cseg, SPLIT, EMU, rt)
    else:
        x = x - lam
    t -= _cbc(dH, cseg, SPLIT, EMU, rt) * x
    dx = A * t
    shift_t = _cbc(shift, cseg, SPLIT, EMU, rt) if EXACT_MAX else lam
    # ---- back through the logits (step 3): E = P inv_ne, x = lam E
    if CLIP:
        D = _sdot(dx * (x + shift_t), tl.trans(ohq), ROWSUM, SPLIT, EMU)  # sum over query positions of dE * E
        nrm = tl.sqrt(n2)
        c2 = tl.where(nrm > 0, D * inv_ne / tl.where(nrm > 0, nrm, 1.0), 0.0)
        dP = dx * SC - tl.where(S > 0, S, 0.1 * S) * _qbc(c2, qseg, SPLIT, EMU, rt)
        dS = tl.where(S > 0, dP, 0.1 * dP)
    else:
        dS = lam * dx
    dS += _cbc(dnum, cseg, SPLIT, EMU, rt) * A
    # ---- 2 dG = sum_k dd2_k A_k A_k^T: its factors (the product is a GEMM of its own)
    if GRAM_EXACT:
        gsc = 1.0
    else:
        gsc = _amax_all(dd2)  # scale into float16's range: A <= 1, |A dd2| <= max |dd2|
    return dS, A, A * _cbc(dd2 / gsc, cseg, SPLIT, EMU, rt), gsc


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(pid, NB_R, NB_C, GROUP):
    """Grouped program order (as in Triton's matmul tutorial): GROUP R blocks stay resident while
    the programs sweep every C block, so each C block is fetched once per group and each R block
    once. Returns (r block, c block) of a grid of NB_R x NB_C tiles."""
    per_group = GROUP * NB_C
    first = (pid // per_group) * GROUP
    size = tl.minimum(NB_R - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


# What depends on the batch sizes is not specialised on, so a new batch size is not a new
# compilation: block counts, the group size, the chunk start, the output / gradient strides.
# (Row strides and d are: their divisibility by 16 gives aligned vector loads.)
_NO_SPEC = ["NB_R", "NB_C", "GROUP", "s_or", "s_oc"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_kernel(r_ptr, r_tab, r_seg, r_item, r_len, r_sc, r_in, n_r_ptr,
                c_ptr, c_tab, c_seg, c_item, c_len, c_sc, c_in, n_c_ptr,
                gc_ptr, out_ptr,
                D, LR, LC, NB_R, NB_C, GROUP,
                s_rb, s_rl, s_rd, s_cb, s_cl, s_cd, s_or, s_oc,
                lam, tau, lam_lse, weight,
                CLIP: tl.constexpr, MFE: tl.constexpr, LSE: tl.constexpr, EXACT_MAX: tl.constexpr,
                PRESCALE: tl.constexpr, MAIN_PREC: tl.constexpr, SPLIT: tl.constexpr, EMU: tl.constexpr, GDT: tl.constexpr,
                GPREC: tl.constexpr, EVEN_K: tl.constexpr, ACCUMULATE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NSR: tl.constexpr,
                NSC: tl.constexpr):
    """weight x the scores of every (R item, C item) pair of one tile, the query items on R and
    their context on C: out[item_R * s_or + item_C * s_oc] (added to what is there when
    ACCUMULATE: the second direction of "both")."""
    rb, cb = _tile_ids(tl.program_id(0), NB_R, NB_C, GROUP)
    if (rb < tl.load(n_r_ptr)) & (cb < tl.load(n_c_ptr)):
        rf, rok, cf, cok = _tile_rows(rb, cb, r_tab, c_tab, BM, BN)
        S = _tile_product(r_ptr, rf, rok, s_rb, s_rl, s_rd, LR, r_sc, r_in, c_ptr, cf, cok, s_cb, s_cl, s_cd, LC,
                          c_sc, c_in, D, BM, BN, BK, PRESCALE, MAIN_PREC, EVEN_K)
        rseg, ohr, cseg = _tile_segments(rb, cb, r_seg, c_seg, BM, BN, NSR)
        score = weight * _dir_forward(S, gc_ptr, ohr, rseg, cseg, r_seg, r_item, r_len, rb, c_item, c_len, cb,
                                      lam, tau, lam_lse, CLIP, MFE, LSE, EXACT_MAX, SPLIT, EMU, GDT, GPREC, NSR,
                                      NSC)[0]
        ritem = tl.load(r_item + rb * NSR + tl.arange(0, NSR))
        citem = tl.load(c_item + cb * NSC + tl.arange(0, NSC))
        optr = out_ptr + ritem.to(tl.int64)[:, None] * s_or + citem.to(tl.int64)[None, :] * s_oc
        omask = (ritem >= 0)[:, None] & (citem >= 0)[None, :]
        if ACCUMULATE:
            score += tl.load(optr, mask=omask, other=0.0)
        tl.store(optr, score, mask=omask)


@triton.jit(do_not_specialize=_NO_SPEC + ["RB0"])
def _bwd_tile_kernel(r_ptr, r_tab, r_seg, r_item, r_len, r_sc, r_in, n_r_ptr,
                     c_ptr, c_tab, c_seg, c_item, c_len, c_sc, c_in, n_c_ptr,
                     gc_ptr, g_ptr, ds_ptr, dsc_ptr, a_ptr, ad_ptr, asc_ptr,
                     D, LR, LC, NB_R, NB_C, GROUP, RB0,
                     s_rb, s_rl, s_rd, s_cb, s_cl, s_cd, s_or, s_oc,
                     lam, tau, lam_lse, weight,
                     CLIP: tl.constexpr, MFE: tl.constexpr, LSE: tl.constexpr, EXACT_MAX: tl.constexpr,
                     PRESCALE: tl.constexpr, MAIN_PREC: tl.constexpr, SPLIT: tl.constexpr, EMU: tl.constexpr, GDT: tl.constexpr,
                     GPREC: tl.constexpr, EVEN_K: tl.constexpr, DS_SCALED: tl.constexpr, GRAM_EXACT: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NSR: tl.constexpr,
                     NSC: tl.constexpr):
    """Backward of one tile of the R blocks [RB0, RB0 + NB_R) (query items on R, context on C):
    recomputes the tile and the pair functions and writes dS (the tile's gradient, scaled into the
    storage dtype by a per-tile factor when DS_SCALED) and the factors A, A dd2 / asc (in the Gram
    blocks' dtype) and asc of the Gram gradient (see ``_bwd_gram_kernel``). Every output is
    written by one program: no atomics, the same bits every run."""
    rbl, cb = _tile_ids(tl.program_id(0), NB_R, NB_C, GROUP)
    rb = RB0 + rbl
    if (rb < tl.load(n_r_ptr)) & (cb < tl.load(n_c_ptr)):
        rf, rok, cf, cok = _tile_rows(rb, cb, r_tab, c_tab, BM, BN)
        S = _tile_product(r_ptr, rf, rok, s_rb, s_rl, s_rd, LR, r_sc, r_in, c_ptr, cf, cok, s_cb, s_cl, s_cd, LC,
                          c_sc, c_in, D, BM, BN, BK, PRESCALE, MAIN_PREC, EVEN_K)
        rseg, ohr, cseg = _tile_segments(rb, cb, r_seg, c_seg, BM, BN, NSR)
        ritem = tl.load(r_item + rb * NSR + tl.arange(0, NSR))
        citem = tl.load(c_item + cb * NSC + tl.arange(0, NSC))
        g = tl.load(g_ptr + tl.where(ritem >= 0, ritem, 0).to(tl.int64)[:, None] * s_or
                    + tl.where(citem >= 0, citem, 0).to(tl.int64)[None, :] * s_oc,
                    mask=(ritem >= 0)[:, None] & (citem >= 0)[None, :], other=0.0)
        tile = rbl.to(tl.int64) * NB_C + cb
        dS, A, AD, gsc = _dir_backward(S, gc_ptr, g * weight, ohr, rseg, cseg, r_seg, r_item, r_len, rb, c_item,
                                       c_len, cb, lam, tau, lam_lse, CLIP, MFE, LSE, EXACT_MAX, SPLIT, EMU, GDT, GPREC,
                                       NSR, NSC, GRAM_EXACT)
        ii = tl.arange(0, BM)
        jj = tl.arange(0, BN)
        cells = tile * (BM * BN) + ii[:, None] * BN + jj[None, :]
        tl.store(a_ptr + cells, A.to(a_ptr.dtype.element_ty))
        tl.store(ad_ptr + cells, AD.to(ad_ptr.dtype.element_ty))
        tl.store(asc_ptr + tile, gsc)
        # the rows and columns again (alive from the top, they would be spilled)
        rf, rok, cf, cok = _tile_rows(rb, cb, r_tab, c_tab, BM, BN, True)
        dS = tl.where(rok[:, None] & cok[None, :], dS, 0.0)
        if DS_SCALED:
            sc = _amax_all(dS)
            tl.store(dsc_ptr + tile, sc)
            dS = dS / sc
        tl.store(ds_ptr + cells, dS.to(ds_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["NB_C", "accumulate"])
def _bwd_gram_kernel(a_ptr, ad_ptr, asc_ptr, c_tab, c_seg, n_r_ptr, n_c_ptr, dg_ptr, LC, NB_C, accumulate,
                     PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GB: tl.constexpr):
    """2 dG of the C items, one (GB, GB) sub-block of C block ``program_id(0)`` a program (axes 1,
    2: its rows and columns): the sum over the chunk's R blocks of (A dd2)^T A times each tile's
    scale, kept on the diagonal blocks (the items) and written to dg[flat row, position] (float32,
    (B * L, L)), added to what is there when ``accumulate``."""
    cb = tl.program_id(0)
    if cb < tl.load(n_c_ptr):
        i = tl.program_id(1) * GB + tl.arange(0, GB)
        j = tl.program_id(2) * GB + tl.arange(0, GB)
        k = tl.arange(0, BM)
        acc = tl.full((GB, GB), 0.0, tl.float32)
        for t in range(0, tl.load(n_r_ptr)):
            tile = tl.cast(t, tl.int64) * NB_C + cb
            adt = tl.load(ad_ptr + tile * (BM * BN) + k[None, :] * BN + i[:, None])  # (GB, BM) = (A dd2)^T
            at = tl.load(a_ptr + tile * (BM * BN) + k[:, None] * BN + j[None, :])  # (BM, GB)
            acc += tl.dot(adt, at, input_precision=PREC) * tl.load(asc_ptr + tile)
        fi = tl.load(c_tab + cb * BN + i)
        fj = tl.load(c_tab + cb * BN + j)
        same = (tl.load(c_seg + cb * BN + i)[:, None] == tl.load(c_seg + cb * BN + j)[None, :]) & \
            (fi >= 0)[:, None] & (fj >= 0)[None, :]
        ptr = dg_ptr + tl.where(fi >= 0, fi, 0).to(tl.int64)[:, None] * LC + (tl.where(fj >= 0, fj, 0) % LC)[None, :]
        if accumulate != 0:
            acc += tl.load(ptr, mask=same, other=0.0)
        tl.store(ptr, acc, mask=same)


@triton.jit(do_not_specialize=["NB_C", "accumulate"])
def _bwd_gemm_kernel(ds_ptr, dsc_ptr, x_ptr, x_tab, o_tab, n_own_ptr, n_other_ptr, out_ptr,
                     D, LX, NB_C, s_xb, s_xl, s_xd, accumulate,
                     OWN_R: tl.constexpr, DS_SCALED: tl.constexpr, PREC: tl.constexpr,
                     BO: tl.constexpr, BX: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dX_hat of one block of the "own" side (BO rows x BD features): the sum over the other
    side's blocks of dS (or dS^T) @ X_hat_other, each tile times its scale. The rows are written to
    their places in out (B, L, d) float32, added to what is there when ``accumulate``."""
    ob = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dok = dd < D
    if ob < tl.load(n_own_ptr):
        io = tl.arange(0, BO)
        ix = tl.arange(0, BX)
        n_other = tl.load(n_other_ptr)
        acc = tl.full((BO, BD), 0.0, tl.float32)
        for t in range(0, n_other):
            if OWN_R:
                tile = ob.to(tl.int64) * NB_C + t
                dsv = tl.load(ds_ptr + tile * (BM * BN) + io[:, None] * BN + ix[None, :])  # (BM, BN)
            else:
                tile = tl.cast(t, tl.int64) * NB_C + ob
                dsv = tl.load(ds_ptr + tile * (BM * BN) + ix[None, :] * BN + io[:, None])  # (BN, BM) = dS^T
            xf = tl.load(x_tab + t * BX + ix)
            xok = xf >= 0
            xf = tl.where(xok, xf, 0)
            xrow = x_ptr + (xf // LX).to(tl.int64) * s_xb + (xf % LX).to(tl.int64) * s_xl
            xv = tl.load(xrow[:, None] + dd[None, :] * s_xd, mask=xok[:, None] & dok[None, :], other=0.0)
            part = tl.dot(dsv, xv, input_precision=PREC)
            if DS_SCALED:
                acc += part * tl.load(dsc_ptr + tile)
            else:
                acc += part
        of = tl.load(o_tab + ob * BO + io)
        ook = of >= 0
        of = tl.where(ook, of, 0)
        optr = out_ptr + of.to(tl.int64)[:, None] * D + dd[None, :]
        omask = ook[:, None] & dok[None, :]
        if accumulate != 0:
            acc += tl.load(optr, mask=omask, other=0.0)
        tl.store(optr, acc, mask=omask)


@triton.jit(do_not_specialize=["n_rows"])
def _rownorm_kernel(x_ptr, sc_ptr, in_ptr, ex_ptr, xhat_ptr, n_rows, D, L, s_b, s_l, s_d,
                    WRITE_XHAT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """Per flat row f = item * L + position: the power of two s_f = 2^-e that brings the row's
    largest magnitude into [1, 2), and 1 / max(|x_f s_f|, 1e-12 s_f), so that x_hat = x s in
    without ever squaring an unscaled feature (one pass over d: the running exponent only grows,
    and rescaling the partial sum by a power of two is exact). ex_ptr gets e, or TINY (a norm at
    most 1e-12, where F.normalize clamps). Optionally writes x_hat in xhat_ptr's dtype."""
    f = tl.program_id(0) * BR + tl.arange(0, BR)
    fok = f < n_rows
    rows = x_ptr + (f // L).to(tl.int64) * s_b + (f % L).to(tl.int64) * s_l
    e = tl.full((BR,), -126, tl.int32)
    ssum = tl.full((BR,), 0.0, tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        x = tl.load(rows[:, None] + kk[None, :] * s_d, mask=fok[:, None] & (kk < D)[None, :], other=0.0).to(tl.float32)
        mx = tl.reduce(tl.abs(x), 1, _max_combine)
        ce = ((mx.to(tl.int32, bitcast=True) >> 23) & 255) - 127
        en = tl.maximum(e, tl.minimum(ce, 126))
        # old sum * 2^(2 (e - en)): exact, and 0 once the exponent grows by more than 63
        dsh = tl.minimum(en - e, 63)
        ssum = ssum * ((127 - 2 * dsh) << 23).to(tl.float32, bitcast=True)
        s = ((127 - en) << 23).to(tl.float32, bitcast=True)
        y = x * s[:, None]
        ssum += tl.reduce(y * y, 1, _sum_combine)
        e = en
    s = ((127 - e) << 23).to(tl.float32, bitcast=True)
    nrm = tl.sqrt(ssum)
    inv = 1.0 / tl.maximum(nrm, 1e-12 * s)
    tl.store(sc_ptr + f, s, mask=fok)
    tl.store(in_ptr + f, inv, mask=fok)
    tl.store(ex_ptr + f, tl.where(nrm > 1e-12 * s, e, TINY), mask=fok)
    if WRITE_XHAT:
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            m = fok[:, None] & (kk < D)[None, :]
            x = tl.load(rows[:, None] + kk[None, :] * s_d, mask=m, other=0.0).to(tl.float32)
            xh = (x * s[:, None]) * inv[:, None]
            tl.store(xhat_ptr + f.to(tl.int64)[:, None] * D + kk[None, :], xh.to(xhat_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gram_kernel(x_ptr, tab, seg, sc_ptr, in_ptr, n_ptr, g_ptr, D, L, s_b, s_l, s_d,
                 PREC: tl.constexpr, BLK: tl.constexpr, GB: tl.constexpr, BK: tl.constexpr):
    """The normalised Gram matrix of one block, block diagonal over its items (0 across items and
    on invalid rows): G = X_hat X_hat^T, (BLK, BLK) in g_ptr's dtype, one (GB, GB) sub-block per
    program (axes 1, 2: its rows and columns), so that a 256-row block is four 128 x 128 products."""
    b = tl.program_id(0)
    if b < tl.load(n_ptr):
        i = tl.program_id(1) * GB + tl.arange(0, GB)
        j = tl.program_id(2) * GB + tl.arange(0, GB)
        fi = tl.load(tab + b * BLK + i)
        fj = tl.load(tab + b * BLK + j)
        oki = fi >= 0
        okj = fj >= 0
        fi = tl.where(oki, fi, 0)
        fj = tl.where(okj, fj, 0)
        si = tl.load(sc_ptr + fi, mask=oki, other=0.0)
        sj = tl.load(sc_ptr + fj, mask=okj, other=0.0)
        rows_i = x_ptr + (fi // L).to(tl.int64) * s_b + (fi % L).to(tl.int64) * s_l
        rows_j = x_ptr + (fj // L).to(tl.int64) * s_b + (fj % L).to(tl.int64) * s_l
        G = tl.full((GB, GB), 0.0, tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            xi = tl.load(rows_i[:, None] + kk[None, :] * s_d, mask=oki[:, None] & (kk < D)[None, :], other=0.0)
            xj = tl.load(rows_j[:, None] + kk[None, :] * s_d, mask=okj[:, None] & (kk < D)[None, :], other=0.0)
            xi = (xi.to(tl.float32) * si[:, None]).to(xi.dtype)  # exact: a power of two
            xj = (xj.to(tl.float32) * sj[:, None]).to(xj.dtype)
            G = tl.dot(xi, tl.trans(xj), G, input_precision=PREC)
        same = (tl.load(seg + b * BLK + i)[:, None] == tl.load(seg + b * BLK + j)[None, :]) & oki[:, None] & okj[None, :]
        G = tl.where(same, G * tl.load(in_ptr + fi, mask=oki, other=0.0)[:, None]
                     * tl.load(in_ptr + fj, mask=okj, other=0.0)[None, :], 0.0)
        tl.store(g_ptr + b.to(tl.int64) * (BLK * BLK) + i[:, None] * BLK + j[None, :], G.to(g_ptr.dtype.element_ty))
