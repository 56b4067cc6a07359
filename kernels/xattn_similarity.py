"""Triton kernels of the cross-attention similarity ``xattn_similarity`` (``docs/math.md``, section 1).

Layout of the work
------------------
Every kernel is written for one *direction* with a generic "context" / "query" role: t2i
launches it with context = regions (one image per program) and query = words (a block of
``BQ`` captions), i2t with context = words (one caption) and query = regions (a block of
``BQ`` images); ``direction="both"`` launches both and averages the scores. A program holds
the cosine tile ``S`` of its context item against its ``BQ`` query items, (LCP, BQ*LQP) with
the query items side by side in the columns, accumulated with ``tl.dot`` over chunks of ``BK``
features of the raw inputs and scaled afterwards by inverse row norms (``S_rk = (c_r . q_k) /
(|c_r| |q_k|)``, norms floored at 1e-12 as ``F.normalize`` does), and the context's normalised
Gram matrix ``G``, (LCP, LCP). A prologue kernel (``_prep_kernel``, one program per item, one
pass over the inputs) computes the inverse row norms of regions and words and the Gram
matrices of the context items, so the main loop is nothing but the ``S`` product; for 256-row
contexts (N > 128) the main kernels accumulate ``G`` themselves (a 256 x 256 float32 operand
loaded from memory would need more shared memory than an H100 has). The softmax over context rows,
the entropies ``H_k = log(sum_r e^{x_rk - max}) - sum_r A_rk (x_rk - max)`` (log domain), the
Gram-form attended cosine ``R_k = (sum_r A_rk S_rk) / sqrt(max(A_k^T G A_k, 1e-16))``, the
entropy-aware weights and the Mean / LogSumExp aggregation all happen in registers; per-query-
item reductions (clipped-l2 norm, weights, aggregation) are segment reductions over a
``(rows, BQ, LQP)`` reshape of the tile. Nothing of size B_img x B_txt x N x M (or x d) is
written to memory: the forward writes the (B_img, B_txt) scores and the per-item prologue
(inverse norms, B x L; Gram matrices, B_context x LCP x LCP float32, e.g. 16 MiB for 1000 images
of 36 regions) only.

Backward (deterministic, no atomics, FlashAttention-2 style split): two kernels per direction,
both recompute the tiles and the per-pair forward and back-propagate to ``dS`` (the gradient of
the cosine tile) and ``dden2`` (of the Gram-form denominator).

* ``_bwd_ctx_kernel``: one program per context item, looping over every block of query items:
  ``dC_hat += dS @ Q_hat`` and, at the end, ``dC_hat += 2 dG @ C_hat`` with
  ``dG = sum_k dden2_k A_k A_k^T`` accumulated in registers.
* ``_bwd_q_kernel``: one program per block of query items, looping over every context item:
  ``dQ_hat += dS^T @ C_hat``.

Each program read-modify-writes only its own rows of a float32 gradient buffer (with a
``tl.debug_barrier`` between passes), so results are bitwise reproducible run to run. The
gradients are with respect to the *normalised* features; the host finishes the (cheap,
elementwise) backward of ``F.normalize`` in PyTorch, and padded rows get exactly 0.

Precision
---------
Inputs float32, float16 or bfloat16; every accumulation is float32. ``tl.dot`` input precision
(constexpr ``DOT_PREC``) is ``"ieee"`` (exact float32 products, no TF32) for float32 inputs while
``torch.get_float32_matmul_precision()`` is ``"highest"`` (PyTorch's default, so the result
matches the float32 reference), and ``"tf32"`` otherwise: for float32 inputs when the user asked
for TF32 matmuls, and for the float32 tile products (G @ A, dG, dS @ Q_hat) of float16 /
bfloat16 inputs, whose outputs are rounded to 16 bits anyway. The environment variable
``MEFN_TRITON_DOT_PRECISION`` (``ieee`` / ``tf32`` / ``tf32x3``) overrides this. The products
of float16 / bfloat16 inputs in the main ``S`` / ``G`` loop are exact in float32.

Tested on
---------
Run only under the Triton CPU interpreter (``TRITON_INTERPRET=1``, Triton 3.8, torch 2.14 on
CPU): every option, direction, ragged lengths, float32 and float16, forward and gradients,
against ``mefn_fast.backends.reference``. Compiled (not run) for sm_90 offline with Triton 3.8's
``triton.compile`` and ptxas, for fp16 / bf16 / fp32 (ieee and tf32) and tile classes
(LCP, BQ*LQP) = (16, 16), (64, 64), (128, 128), bf16 (256, 64), (32, 256), (256, 128) and fp32
(256, 64): all compile; the last two exceed an H100's shared memory and are refused by
``input_limits`` (see the risks). No GPU was
available while this was written; ``benchmarks/gpu_check.sh`` carries the GPU checks (bf16,
large shapes, determinism, timings) for a lent H100/H200 (with Triton 3.6 there).

Known risks
-----------
* Not yet run on a GPU: numerics of the TF32 paths and the performance are unmeasured.
* Register pressure. ptxas (sm_90) reports for SCAN's tile (64 context rows x 64 query
  columns, fp16): forward 200 registers and no spills at 8 warps; backward kernels 255
  registers with 0.5-0.7 KB of spills; fp32 "ieee" spills more. The 256-row (N > 128) and
  128 x 128 tiles spill 5-50 KB per thread and compile in 5-60 s each (correct, slow); shared
  memory stays at or under 147 KiB (H100: 227 KiB). Their performance is the first thing to
  look at on a GPU.
* float32 with 256-row context tiles (N > 128) compiles to ~330 KiB of shared memory (the exact
  G @ A product stages G there), beyond an H100's 227 KiB, and takes minutes to compile:
  ``mefn_fast.backends.triton.input_limits`` refuses float32 with N > 128. In fp16 / bf16 the
  256-row tiles fit with M <= 32 (forward <= 66 KiB, backward <= 147 KiB); with M = 128 the
  context-gradient kernel needs 257 KiB, so N > 128 is taken only with M <= 32 (ViT patches:
  197 x 32). The interpreter tests still cover the 256-row code path.
* ``_bwd_ctx_kernel`` has only B_context programs (e.g. 128 for train-gpu): low occupancy on a
  132-SM H100 for small batches.
* Backward kernels are not autotuned (their read-modify-write of the gradient buffers would be
  corrupted by autotuning's repeated launches); they use a fixed heuristic configuration.
* The interpreter's ``tl.dot`` is exact, so TF32 paths are exercised only on a GPU.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

GRAM_PRE_MAX = tl.constexpr(128)  # context tiles up to this many rows read G from the prologue
NEG_BIG = tl.constexpr(-1.0e30)  # "minus infinity" that keeps exp(x - max) and 0 * x free of NaN
SINGLE_CONFIG_ENV = "MEFN_TRITON_SINGLE_CONFIG"
DOT_PRECISION_ENV = "MEFN_TRITON_DOT_PRECISION"


# --------------------------------------------------------------------------------------------
# Device helpers
#
# The kernels call no ``@triton.jit`` function of ``triton.language.standard`` (tl.sum, tl.max,
# tl.zeros, tl.cdiv, ...): when Triton was imported before TRITON_INTERPRET=1 was set (e.g. by
# torch.compile earlier in the same test process), those stay compiled-mode JITFunctions that
# the interpreter cannot call. ``tl.reduce`` with the standard combine functions is a builtin
# and maps to numpy's sum / max in the interpreter, and to the same reductions on a GPU.
# --------------------------------------------------------------------------------------------

_sum_combine = tl.standard._sum_combine
_max_combine = tl.standard._elementwise_max


@triton.jit
def _rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _sum_combine)


@triton.jit
def _rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _max_combine)


@triton.jit
def _seg_sum_rows(x, R: tl.constexpr, BQ: tl.constexpr, LQP: tl.constexpr):
    """(R, BQ*LQP) -> per row and query item sum, broadcast back to (R, BQ*LQP)."""
    s = _rsum(tl.reshape(x, (R, BQ, LQP)), axis=2)
    return tl.reshape(tl.broadcast_to(s[:, :, None], (R, BQ, LQP)), (R, BQ * LQP))


@triton.jit
def _seg_bcast(s, BQ: tl.constexpr, LQP: tl.constexpr):
    """(BQ,) -> (BQ*LQP,), each item's value on its columns."""
    return tl.reshape(tl.broadcast_to(s[:, None], (BQ, LQP)), (BQ * LQP,))


@triton.jit
def _seg_lse(v, BQ: tl.constexpr, LQP: tl.constexpr):
    """(BQ*LQP,) -> (BQ,) log-sum-exp per query item (entries NEG_BIG count as -inf)."""
    v2 = tl.reshape(v, (BQ, LQP))
    vmax = _rmax(v2, axis=1)
    return vmax + tl.log(_rsum(tl.exp(v2 - vmax[:, None]), axis=1))


@triton.jit
def _setup(c, qb, clen_ptr, qlen_ptr, B_Q, LCP: tl.constexpr, LQP: tl.constexpr, BQ: tl.constexpr):
    """Row / column bookkeeping of one program: context item ``c``, query block ``qb``."""
    rows = tl.arange(0, LCP)
    clen = tl.load(clen_ptr + c).to(tl.int32)
    rowok = rows < clen
    cols = tl.arange(0, BQ * LQP)
    q_idx = qb * BQ + cols // LQP
    pos = cols % LQP
    item_ok = q_idx < B_Q
    qlen = tl.load(qlen_ptr + q_idx, mask=item_ok, other=1).to(tl.int32)
    colok = item_ok & (pos < qlen)
    return rows, clen, rowok, q_idx, pos, item_ok, colok, qlen.to(tl.float32)


@triton.jit(do_not_specialize=["D"])
def _prep_kernel(x_ptr, len_ptr, gram_ptr, inv_ptr, D, s_b, s_l, s_d,
                 LP: tl.constexpr, BK: tl.constexpr, GRAM: tl.constexpr, DOT_PREC: tl.constexpr):
    """Prologue, one program per item: inverse row norms (0 on padded rows), and optionally the
    normalised Gram matrix, both padded to LP rows; read by every program of that item."""
    i = tl.cast(tl.program_id(0), tl.int64)
    rows = tl.arange(0, LP)
    ok = rows < tl.load(len_ptr + i)
    x_rows = x_ptr + i * s_b + rows.to(tl.int64) * s_l
    n2 = tl.full((LP,), 0.0, tl.float32)
    G = tl.full((LP, LP), 0.0, tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        xb = tl.load(x_rows[:, None] + kk[None, :] * s_d, mask=ok[:, None] & (kk < D)[None, :], other=0.0)
        if GRAM:
            G = tl.dot(xb, tl.trans(xb), G, input_precision=DOT_PREC)
        xf = xb.to(tl.float32)
        n2 += _rsum(xf * xf, axis=1)
    inv = tl.where(ok, 1.0 / tl.maximum(tl.sqrt(n2), 1e-12), 0.0)
    tl.store(inv_ptr + i * LP + rows, inv)
    if GRAM:
        G = G * inv[:, None] * inv[None, :]
        tl.store(gram_ptr + i * (LP * LP) + rows[:, None] * LP + rows[None, :], G)


@triton.jit
def _tiles(c_ptr, c, rows, rowok, s_cb, s_cl, s_cd, q_ptr, q_idx, pos, colok, s_qb, s_ql, s_qd, D,
           gram_ptr, ic_ptr, iq_ptr, s_iq,
           LCP: tl.constexpr, COLS: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Normalised cosine tile S (LCP, COLS) by tl.dot over chunks of d, and the context's Gram
    matrix G (LCP, LCP). The inverse row norms come from the prologue, and so does G for
    LCP <= 128; a 256-row G is accumulated here instead (loading a 256 x 256 float32 tile into
    a tl.dot operand would stage 256 KiB through shared memory, more than an H100 has)."""
    c64 = tl.cast(c, tl.int64)
    c_rows = c_ptr + c64 * s_cb + rows.to(tl.int64) * s_cl
    q_rows = q_ptr + q_idx.to(tl.int64) * s_qb + pos.to(tl.int64) * s_ql
    S = tl.full((LCP, COLS), 0.0, tl.float32)
    G = tl.full((LCP, LCP), 0.0, tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kok = kk < D
        cb = tl.load(c_rows[:, None] + kk[None, :] * s_cd, mask=rowok[:, None] & kok[None, :], other=0.0)
        qt = tl.load(q_rows[:, None] + kk[None, :] * s_qd, mask=colok[:, None] & kok[None, :], other=0.0)
        S = tl.dot(cb, tl.trans(qt), S, input_precision=DOT_PREC)
        if LCP > GRAM_PRE_MAX:
            G = tl.dot(cb, tl.trans(cb), G, input_precision=DOT_PREC)
    inv_c = tl.load(ic_ptr + c64 * LCP + rows)
    inv_q = tl.load(iq_ptr + q_idx.to(tl.int64) * s_iq + pos, mask=colok, other=0.0)
    S = S * inv_c[:, None] * inv_q[None, :]
    if LCP > GRAM_PRE_MAX:
        G = G * inv_c[:, None] * inv_c[None, :]
    else:
        G = tl.load(gram_ptr + c64 * (LCP * LCP) + rows[:, None] * LCP + rows[None, :])
    return S, G, inv_c, inv_q, c_rows, q_rows


@triton.jit
def _pair_math(S, G, rowok, colok, clen, m_col, lam, tau, lam_lse,
               LCP: tl.constexpr, BQ: tl.constexpr, LQP: tl.constexpr, ATTN_CLIP: tl.constexpr,
               MFE: tl.constexpr, AGG_LSE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Steps 3-8 of the per-pair function (docs/math.md) on a tile; returns the (BQ,) scores and what the backward needs."""
    if ATTN_CLIP:
        P = tl.where(S > 0, S, 0.1 * S)
        P = tl.where(colok[None, :], P, 0.0)
        nrm = tl.sqrt(_seg_sum_rows(P * P, LCP, BQ, LQP))
        E = P / (nrm + 1e-8)
    else:
        P = S
        nrm = S
        E = S
    x = lam * E
    mx = _rmax(tl.where(rowok[:, None], x, NEG_BIG), axis=0)
    xc = tl.where(rowok[:, None], x - mx[None, :], 0.0)  # x - max over rows; 0 on padded rows
    ex = tl.where(rowok[:, None], tl.exp(xc), 0.0)
    se = _rsum(ex, axis=0)
    A = ex / se[None, :]
    log_se = tl.log(se)
    H = log_se - _rsum(A * xc, axis=0)  # entropy, log domain
    GA = tl.dot(G, A, input_precision=DOT_PREC)
    num = _rsum(A * S, axis=0)
    den2 = _rsum(A * GA, axis=0)
    den = tl.sqrt(tl.maximum(den2, 1e-16))
    R = tl.where(colok, num / den, 0.0)
    inv_log_n = tl.where(clen > 1, 1.0 / tl.log(tl.maximum(clen.to(tl.float32), 2.0)), 0.0)
    if MFE:
        lw = tl.where(colok, -(H * inv_log_n) / tau, NEG_BIG)
        lw = tl.where(colok, lw - _seg_bcast(_seg_lse(lw, BQ, LQP), BQ, LQP), NEG_BIG)
    else:
        lw = tl.where(colok, -tl.log(m_col), NEG_BIG)
    w = tl.where(colok, tl.exp(lw), 0.0)
    if AGG_LSE:
        z = tl.where(colok, lw + lam_lse * R, NEG_BIG)
        zl = _seg_lse(z, BQ, LQP)
        m_item = _rmax(tl.reshape(m_col, (BQ, LQP)), axis=1)
        score = (tl.log(m_item) + zl) / lam_lse
        p = tl.where(colok, tl.exp(z - _seg_bcast(zl, BQ, LQP)), 0.0)
    else:
        score = _rsum(tl.reshape(w * R, (BQ, LQP)), axis=1)
        p = w
    return score, A, P, nrm, E, xc, log_se, H, GA, num, den, den2, R, w, p, inv_log_n


@triton.jit
def _pair_grad(S, G, rowok, colok, clen, m_col, g_col, lam, tau, lam_lse,
               LCP: tl.constexpr, BQ: tl.constexpr, LQP: tl.constexpr, ATTN_CLIP: tl.constexpr,
               MFE: tl.constexpr, AGG_LSE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Recompute the pair function and back-propagate g_col (upstream per column) to dS, dden2."""
    score, A, P, nrm, E, xc, log_se, H, GA, num, den, den2, R, w, p, inv_log_n = _pair_math(
        S, G, rowok, colok, clen, m_col, lam, tau, lam_lse, LCP, BQ, LQP, ATTN_CLIP, MFE, AGG_LSE, DOT_PREC)
    if AGG_LSE:
        dR = g_col * p
        u = g_col * p / lam_lse  # d score / d log w_k
    else:
        dR = g_col * w
        u = g_col * w * R
    dR = tl.where(colok, dR, 0.0)
    u = tl.where(colok, u, 0.0)
    if MFE:
        su = _seg_bcast(_rsum(tl.reshape(u, (BQ, LQP)), axis=1), BQ, LQP)
        dH = tl.where(colok, (-1.0 / tau) * (u - w * su) * inv_log_n, 0.0)
    else:
        dH = dR * 0.0
    dnum = dR / den
    dden2 = tl.where(colok & (den2 > 1e-16), -dR * num / (2.0 * den * den * den), 0.0)
    dA = dnum[None, :] * S + 2.0 * dden2[None, :] * GA
    logA_plus_H = tl.where(rowok[:, None], xc - log_se[None, :] + H[None, :], 0.0)
    dx = A * (dA - _rsum(A * dA, axis=0)[None, :]) - dH[None, :] * A * logA_plus_H
    dE = lam * dx
    if ATTN_CLIP:
        Dr = _seg_sum_rows(dE * E, LCP, BQ, LQP)
        ratio = P / tl.where(nrm > 0, nrm, 1.0)
        dP = (dE - Dr * ratio) / (nrm + 1e-8)
        dP = tl.where(colok[None, :], dP, 0.0)
        dSe = tl.where(S > 0, dP, 0.1 * dP)
    else:
        dSe = dE
    dS = tl.where(rowok[:, None] & colok[None, :], dnum[None, :] * A + dSe, 0.0)
    return dS, A, dden2


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


# Batch sizes, d and the output / upstream-gradient strides are not specialised on (their
# divisibility by 16 would otherwise make every new batch size a new compilation).
_NO_SPEC = ["B_C", "B_Q", "D", "s_oc", "s_oq", "s_gc", "s_gq", "s_iq"]


@triton.jit(do_not_specialize=_NO_SPEC[:5] + _NO_SPEC[7:])
def _fwd_kernel(c_ptr, clen_ptr, q_ptr, qlen_ptr, out_ptr, gram_ptr, ic_ptr, iq_ptr, s_iq,
                B_C, B_Q, D,
                s_cb, s_cl, s_cd, s_qb, s_ql, s_qd, s_oc, s_oq,
                lam, tau, lam_lse,
                LCP: tl.constexpr, LQP: tl.constexpr, ATTN_CLIP: tl.constexpr, MFE: tl.constexpr,
                AGG_LSE: tl.constexpr, DOT_PREC: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    """Scores of one context item against BQ query items: out[c, q] (strides say which is which)."""
    pid = tl.program_id(0)
    n_qb = (B_Q + BQ - 1) // BQ
    c = pid // n_qb
    qb = pid % n_qb
    rows, clen, rowok, q_idx, pos, item_ok, colok, m_col = _setup(c, qb, clen_ptr, qlen_ptr, B_Q, LCP, LQP, BQ)
    S, G, inv_c, inv_q, c_rows, q_rows = _tiles(c_ptr, c, rows, rowok, s_cb, s_cl, s_cd, q_ptr, q_idx, pos, colok,
                                                s_qb, s_ql, s_qd, D, gram_ptr, ic_ptr, iq_ptr, s_iq,
                                                LCP, BQ * LQP, BK, DOT_PREC)
    score, A, P, nrm, E, xc, log_se, H, GA, num, den, den2, R, w, p, inv_log_n = _pair_math(
        S, G, rowok, colok, clen, m_col, lam, tau, lam_lse, LCP, BQ, LQP, ATTN_CLIP, MFE, AGG_LSE, DOT_PREC)
    items = qb * BQ + tl.arange(0, BQ)
    tl.store(out_ptr + tl.cast(c, tl.int64) * s_oc + items.to(tl.int64) * s_oq, score, mask=items < B_Q)


@triton.jit(do_not_specialize=_NO_SPEC[:3] + _NO_SPEC[5:])
def _bwd_ctx_kernel(c_ptr, clen_ptr, q_ptr, qlen_ptr, g_ptr, dc_ptr, gram_ptr, ic_ptr, iq_ptr, s_iq,
                    B_C, B_Q, D,
                    s_cb, s_cl, s_cd, s_qb, s_ql, s_qd, s_gc, s_gq, s_db, s_dl, s_dd,
                    lam, tau, lam_lse, scale,
                    LCP: tl.constexpr, LQP: tl.constexpr, ATTN_CLIP: tl.constexpr, MFE: tl.constexpr,
                    AGG_LSE: tl.constexpr, DOT_PREC: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    """dC_hat[c] += sum over query items of dS @ Q_hat, + 2 dG @ C_hat (one program per context item)."""
    c = tl.program_id(0)
    COLS: tl.constexpr = BQ * LQP
    dG = tl.full((LCP, LCP), 0.0, tl.float32)
    rows = tl.arange(0, LCP)
    clen0 = tl.load(clen_ptr + c).to(tl.int32)
    rowok0 = rows < clen0
    d_rows = dc_ptr + tl.cast(c, tl.int64) * s_db + rows.to(tl.int64) * s_dl
    n_qb = (B_Q + BQ - 1) // BQ
    for qb in range(0, n_qb):
        rows, clen, rowok, q_idx, pos, item_ok, colok, m_col = _setup(c, qb, clen_ptr, qlen_ptr, B_Q, LCP, LQP, BQ)
        S, G, inv_c, inv_q, c_rows, q_rows = _tiles(c_ptr, c, rows, rowok, s_cb, s_cl, s_cd, q_ptr, q_idx, pos,
                                                    colok, s_qb, s_ql, s_qd, D, gram_ptr, ic_ptr, iq_ptr, s_iq,
                                                    LCP, COLS, BK, DOT_PREC)
        g_col = tl.load(g_ptr + tl.cast(c, tl.int64) * s_gc + q_idx.to(tl.int64) * s_gq, mask=item_ok, other=0.0) * scale
        dS, A, dden2 = _pair_grad(S, G, rowok, colok, clen, m_col, g_col, lam, tau, lam_lse,
                                  LCP, BQ, LQP, ATTN_CLIP, MFE, AGG_LSE, DOT_PREC)
        dG = tl.dot(A * dden2[None, :], tl.trans(A), dG, input_precision=DOT_PREC)
        dSq = dS * inv_q[None, :]  # dS @ Q_hat == (dS * inv_q) @ Q
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            kok = kk < D
            qf = tl.load(q_rows[:, None] + kk[None, :] * s_qd, mask=colok[:, None] & kok[None, :], other=0.0).to(tl.float32)
            dmask = rowok[:, None] & kok[None, :]
            acc = tl.load(d_rows[:, None] + kk[None, :] * s_dd, mask=dmask, other=0.0)
            acc = tl.dot(dSq, qf, acc, input_precision=DOT_PREC)
            tl.store(d_rows[:, None] + kk[None, :] * s_dd, acc, mask=dmask)
        tl.debug_barrier()
    # Gram term: dC_hat += (dG + dG^T) @ C_hat = 2 dG @ C_hat (dG is symmetric).
    rows = tl.arange(0, LCP)
    inv_c0 = tl.load(ic_ptr + tl.cast(c, tl.int64) * LCP + rows)
    dG2 = 2.0 * dG * inv_c0[None, :]
    c_rows = c_ptr + tl.cast(c, tl.int64) * s_cb + rows.to(tl.int64) * s_cl
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        kok = kk < D
        dmask = rowok0[:, None] & kok[None, :]
        cf = tl.load(c_rows[:, None] + kk[None, :] * s_cd, mask=dmask, other=0.0).to(tl.float32)
        acc = tl.load(d_rows[:, None] + kk[None, :] * s_dd, mask=dmask, other=0.0)
        acc = tl.dot(dG2, cf, acc, input_precision=DOT_PREC)
        tl.store(d_rows[:, None] + kk[None, :] * s_dd, acc, mask=dmask)


@triton.jit(do_not_specialize=_NO_SPEC[:3] + _NO_SPEC[5:])
def _bwd_q_kernel(c_ptr, clen_ptr, q_ptr, qlen_ptr, g_ptr, dq_ptr, gram_ptr, ic_ptr, iq_ptr, s_iq,
                  B_C, B_Q, D,
                  s_cb, s_cl, s_cd, s_qb, s_ql, s_qd, s_gc, s_gq, s_db, s_dl, s_dd,
                  lam, tau, lam_lse, scale,
                  LCP: tl.constexpr, LQP: tl.constexpr, ATTN_CLIP: tl.constexpr, MFE: tl.constexpr,
                  AGG_LSE: tl.constexpr, DOT_PREC: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    """dQ_hat[block] += sum over context items of dS^T @ C_hat (one program per query block)."""
    qb = tl.program_id(0)
    COLS: tl.constexpr = BQ * LQP
    for c in range(0, B_C):
        rows, clen, rowok, q_idx, pos, item_ok, colok, m_col = _setup(c, qb, clen_ptr, qlen_ptr, B_Q, LCP, LQP, BQ)
        S, G, inv_c, inv_q, c_rows, q_rows = _tiles(c_ptr, c, rows, rowok, s_cb, s_cl, s_cd, q_ptr, q_idx, pos,
                                                    colok, s_qb, s_ql, s_qd, D, gram_ptr, ic_ptr, iq_ptr, s_iq,
                                                    LCP, COLS, BK, DOT_PREC)
        g_col = tl.load(g_ptr + tl.cast(c, tl.int64) * s_gc + q_idx.to(tl.int64) * s_gq, mask=item_ok, other=0.0) * scale
        dS, A, dden2 = _pair_grad(S, G, rowok, colok, clen, m_col, g_col, lam, tau, lam_lse,
                                  LCP, BQ, LQP, ATTN_CLIP, MFE, AGG_LSE, DOT_PREC)
        dSt = tl.trans(dS * inv_c[:, None])  # dS^T @ C_hat == (dS * inv_c)^T @ C
        d_rows = dq_ptr + q_idx.to(tl.int64) * s_db + pos.to(tl.int64) * s_dl
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            kok = kk < D
            cf = tl.load(c_rows[:, None] + kk[None, :] * s_cd, mask=rowok[:, None] & kok[None, :], other=0.0).to(tl.float32)
            dmask = colok[:, None] & kok[None, :]
            acc = tl.load(d_rows[:, None] + kk[None, :] * s_dd, mask=dmask, other=0.0)
            acc = tl.dot(dSt, cf, acc, input_precision=DOT_PREC)
            tl.store(d_rows[:, None] + kk[None, :] * s_dd, acc, mask=dmask)
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# Host side: configurations (built lazily) and launchers
# --------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def interpreter_enabled() -> bool:
    return _flag("TRITON_INTERPRET")


def single_config() -> bool:
    """One heuristic configuration instead of autotuning (forced under the interpreter)."""
    return interpreter_enabled() or _flag(SINGLE_CONFIG_ENV)


def dot_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision for inputs of ``dtype`` (see the module docstring)."""
    env = os.environ.get(DOT_PRECISION_ENV, "").strip().lower()
    if env:
        if env not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"{DOT_PRECISION_ENV}={env!r}: choose ieee, tf32 or tf32x3")
        return env
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _min_bq(lqp: int) -> int:
    return max(1, 16 // lqp)  # tl.dot needs >= 16 columns


def _heuristic(lcp: int, lqp: int) -> dict:
    """One sensible configuration: about 64 query columns per program, 8 warps unless the tiles are tiny.

    (ptxas for sm_90, Triton 3.8 offline: with a 64 x 64 fp16 tile the forward needs 200 registers
    per thread at 8 warps, no spills; at 4 warps it spills. The backward kernels spill a little.)
    """
    bq = max(_min_bq(lqp), min(4, 64 // lqp))
    small = lcp * max(lcp, bq * lqp) <= 1024
    return dict(BQ=bq, BK=32 if interpreter_enabled() else 64, num_warps=4 if small else 8, num_stages=2)


@functools.lru_cache(maxsize=None)
def _autotuned_fwd(lcp: int, lqp: int):
    """The forward kernel wrapped in ``triton.autotune`` for one tile-shape class, built on first use."""
    configs = []
    bq0 = _min_bq(lqp)
    for bq in sorted({bq0, 2 * bq0}):
        if bq > bq0 and bq * lqp > 128:
            continue
        for warps in (4, 8):
            configs.append(triton.Config({"BQ": bq, "BK": 64}, num_warps=warps, num_stages=2))
    # Keyed on d only (plus the tensors' dtypes, which Triton adds): a batch size change does
    # not re-tune, the tile shape class is fixed per wrapper.
    return triton.autotune(configs=configs, key=["D"])(_fwd_kernel)


def _flags(opts) -> dict:
    return dict(ATTN_CLIP=opts["attn_norm"] == "clipped_l2norm", MFE=bool(opts["mfe"]), AGG_LSE=opts["agg"] == "lse")


def _directions(direction: str):
    """(name, scale) of the launches for a direction option."""
    if direction == "both":
        return (("t2i", 0.5), ("i2t", 0.5))
    return ((direction, 1.0),)


def _roles(dname, regions, region_lengths, words, word_lengths, opts):
    """Context and query of one direction, and its attention temperature."""
    if dname == "t2i":
        return regions, region_lengths, words, word_lengths, float(opts["lambda_t2i"])
    return words, word_lengths, regions, region_lengths, float(opts["lambda_i2t"])


def _prep(x: torch.Tensor, lengths: torch.Tensor, gram: bool, prec: str):
    """(Gram matrices (B, LP, LP) or None, inverse row norms (B, LP)) of x, LP = max(16, pow2(L))."""
    b, L, d = x.shape
    lp = max(16, _next_pow2(L))
    inv = torch.empty((b, lp), dtype=torch.float32, device=x.device)
    G = torch.empty((b, lp, lp), dtype=torch.float32, device=x.device) if gram else None
    if b:
        _prep_kernel[(b,)](x, lengths, inv if G is None else G, inv, d, x.stride(0), x.stride(1), x.stride(2),
                           LP=lp, BK=32 if interpreter_enabled() else 64, GRAM=gram, DOT_PREC=prec,
                           num_warps=4 if lp <= 64 else 8)
    return G, inv


def _preps(regions, region_lengths, words, word_lengths, direction: str, prec: str) -> dict:
    """Per direction: (context Gram, context inverse norms, query inverse norms)."""
    def gram(x):  # 256-row Gram matrices are formed inside the main kernels (see _tiles)
        return max(16, _next_pow2(x.shape[1])) <= GRAM_PRE_MAX.value

    g_r, inv_r = _prep(regions, region_lengths, direction in ("t2i", "both") and gram(regions), prec)
    g_w, inv_w = _prep(words, word_lengths, direction in ("i2t", "both") and gram(words), prec)
    return {"t2i": (g_r, inv_r, inv_w), "i2t": (g_w, inv_w, inv_r)}


def xattn_similarity_forward(regions, region_lengths, words, word_lengths, opts: dict) -> torch.Tensor:
    """float32 scores (B_img, B_txt). ``opts``: the fields of :class:`mefn_fast.options.XAttnOptions`.

    Inputs: (B, L, d) tensors of one dtype on one device, int64 lengths in [1, L] on the same device.
    """
    b_img, b_txt, d = regions.shape[0], words.shape[0], regions.shape[2]
    out = torch.zeros((b_img, b_txt), dtype=torch.float32, device=regions.device)
    if b_img == 0 or b_txt == 0:
        return out
    prec = dot_precision(regions.dtype)
    flags = _flags(opts)
    pre = _preps(regions, region_lengths, words, word_lengths, opts["direction"], prec)
    parts = []
    for dname, scale in _directions(opts["direction"]):
        ctx, clen, qry, qlen, lam = _roles(dname, regions, region_lengths, words, word_lengths, opts)
        o = out if len(parts) == 0 and scale == 1.0 else torch.empty_like(out)
        s_oc, s_oq = (o.stride(0), o.stride(1)) if dname == "t2i" else (o.stride(1), o.stride(0))
        lcp, lqp = max(16, _next_pow2(ctx.shape[1])), _next_pow2(qry.shape[1])
        b_c, b_q = ctx.shape[0], qry.shape[0]
        gram, inv_c, inv_q = pre[dname]
        gram = inv_c if gram is None else gram  # not read when the kernel forms G itself
        args = (ctx, clen, qry, qlen, o, gram, inv_c, inv_q, inv_q.stride(0), b_c, b_q, d,
                ctx.stride(0), ctx.stride(1), ctx.stride(2), qry.stride(0), qry.stride(1), qry.stride(2), s_oc, s_oq,
                lam, float(opts["tau"]), float(opts["lambda_lse"]))
        meta = dict(LCP=lcp, LQP=lqp, DOT_PREC=prec, **flags)
        if single_config():
            cfg = _heuristic(lcp, lqp)
            grid = (b_c * triton.cdiv(b_q, cfg["BQ"]),)
            _fwd_kernel[grid](*args, **meta, **cfg)
        else:
            grid = lambda META: (b_c * triton.cdiv(b_q, META["BQ"]),)  # noqa: E731
            _autotuned_fwd(lcp, lqp)[grid](*args, **meta)
        parts.append((o, scale))
    if len(parts) == 2:
        out = parts[0][0] * parts[0][1] + parts[1][0] * parts[1][1]
    return out


def _normalize_backward(x: torch.Tensor, lengths: torch.Tensor, dxhat: torch.Tensor) -> torch.Tensor:
    """Backward of ``F.normalize(x, eps=1e-12)`` on the valid rows; padded rows get exactly 0."""
    mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None])[..., None]
    xf = torch.where(mask, x.float(), 0.0)
    nrm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    denom = nrm.clamp_min(1e-12)
    xh = xf / denom
    dot = (xh * dxhat).sum(-1, keepdim=True)
    dx = (dxhat - torch.where(nrm > 1e-12, xh * dot, 0.0)) / denom
    return torch.where(mask, dx, 0.0).to(x.dtype)


def xattn_similarity_backward(grad, regions, region_lengths, words, word_lengths, opts: dict,
                              need_regions: bool = True, need_words: bool = True):
    """Gradients (d regions, d words) in the inputs' dtype for the upstream ``grad`` (B_img, B_txt)."""
    b_img, b_txt, d = regions.shape[0], words.shape[0], regions.shape[2]
    if b_img == 0 or b_txt == 0 or not (need_regions or need_words):
        return torch.zeros_like(regions), torch.zeros_like(words)
    g = grad.to(torch.float32).contiguous()  # an upstream gradient of .sum() has stride 0
    prec = dot_precision(regions.dtype)
    flags = _flags(opts)
    pre = _preps(regions, region_lengths, words, word_lengths, opts["direction"], prec)
    dr_hat = torch.zeros(regions.shape, dtype=torch.float32, device=regions.device)
    dw_hat = torch.zeros(words.shape, dtype=torch.float32, device=words.device)
    for dname, scale in _directions(opts["direction"]):
        ctx, clen, qry, qlen, lam = _roles(dname, regions, region_lengths, words, word_lengths, opts)
        d_ctx, d_qry = (dr_hat, dw_hat) if dname == "t2i" else (dw_hat, dr_hat)
        s_gc, s_gq = (g.stride(0), g.stride(1)) if dname == "t2i" else (g.stride(1), g.stride(0))
        need_ctx, need_qry = (need_regions, need_words) if dname == "t2i" else (need_words, need_regions)
        lcp, lqp = max(16, _next_pow2(ctx.shape[1])), _next_pow2(qry.shape[1])
        b_c, b_q = ctx.shape[0], qry.shape[0]
        cfg = _heuristic(lcp, lqp)
        gram, inv_c, inv_q = pre[dname]
        pro = (inv_c if gram is None else gram, inv_c, inv_q, inv_q.stride(0))
        common = (b_c, b_q, d, ctx.stride(0), ctx.stride(1), ctx.stride(2), qry.stride(0), qry.stride(1),
                  qry.stride(2), s_gc, s_gq)
        hyper = (lam, float(opts["tau"]), float(opts["lambda_lse"]), scale)
        meta = dict(LCP=lcp, LQP=lqp, DOT_PREC=prec, **flags, **cfg)
        if need_ctx:
            _bwd_ctx_kernel[(b_c,)](ctx, clen, qry, qlen, g, d_ctx, *pro, *common,
                                    d_ctx.stride(0), d_ctx.stride(1), d_ctx.stride(2), *hyper, **meta)
        if need_qry:
            _bwd_q_kernel[(triton.cdiv(b_q, cfg["BQ"]),)](ctx, clen, qry, qlen, g, d_qry, *pro, *common,
                                                          d_qry.stride(0), d_qry.stride(1), d_qry.stride(2),
                                                          *hyper, **meta)
    dr = _normalize_backward(regions, region_lengths, dr_hat) if need_regions else torch.zeros_like(regions)
    dw = _normalize_backward(words, word_lengths, dw_hat) if need_words else torch.zeros_like(words)
    return dr, dw
