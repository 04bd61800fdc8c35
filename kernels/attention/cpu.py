"""Attention's CPU kernel (Numba): the tiled loop with the online softmax, kept importable
undecorated, and its host wrapper. The equations and the glossary: kernels/attention/__init__.py."""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import get_num_threads, njit, prange

from minimodels.backend import to_numba
from minimodels.kernels._common import numpy_dtype
from minimodels.kernels.fastexp import exp_neg

# =============================================================================================
# Constants
# =============================================================================================

# CPU: a task is one head and BLOCK_Q queries; it walks the keys BLOCK_K at a time. 128 x 64
# measured best of 32..256 x 32..128 at (1, 8, 4096, 64) float32 (within ~10% of each other
# from 64 x 64 up); the exp is ``fastexp.exp_neg``, which vectorises (libm's does not).
BLOCK_Q = 128
BLOCK_K = 64


# =============================================================================================
# CPU kernel (Numba). One prange task = one head r and one tile of BLOCK_Q queries; it walks the
# keys BLOCK_K at a time. Tiles are held transposed, queries last: Qᵀ (e, BLOCK_Q), the scores
# Sᵀ (BLOCK_K, BLOCK_Q), Õᵀ (e, BLOCK_Q), so every inner loop runs over the tile's contiguous
# queries and LLVM vectorises it (fastexp.exp_neg included):
#   - Sᵀ = K Qᵀ and Õᵀ += Vᵀ Pᵀ are register-blocked: each pass over the queries takes 4 keys x
#     4 head dims (16 scalars of K or V) and updates 4 rows of Sᵀ (Õᵀ) from 4 rows of Qᵀ (Pᵀ),
#     16 multiply-adds per 4 vector loads and 4 load-stores. One query row at a time, with the
#     keys contiguous (the previous kernel), did one per load and store: 3x slower, load-bound;
#   - the online softmax's row maxima, exps and row sums become elementwise over the queries
#     (a max or a sum down the columns of Sᵀ): no horizontal reduction, no scalar exp.
# The causal mask hides a prefix of each key's row of Sᵀ: queries i < j - (lk - lq).
# =============================================================================================


@njit(cache=True, fastmath={"contract"})
def _block_product(Out, M, X, rows, inner, accumulate):
    """Out[r, :] (+)= Σ_{s < inner} M[r, s] X[s, :] for r < rows, 4 rows x 4 inner steps a pass
    over the queries (16 scalars of M, 4 rows of X in, 4 rows of Out updated). Sᵀ = K Qᵀ is
    (St, K, Qt); Õᵀ += Vᵀ Pᵀ is (At, Vᵀ, Pt), accumulating. The loop is ``_block_product_w``'s
    (the backward's), at the forward's tile width BLOCK_Q."""
    if not accumulate:
        for r in range(rows):
            Out[r, :BLOCK_Q] = 0
    _block_product_w(Out, M, X, rows, inner, BLOCK_Q)


def _attention_loop(q, k, v, out, lse, lse_lo, onehot, scale, causal):
    """Forward loop. q, out: (r, lq, e); k, v: (r, lk, e); lse, lse_lo, onehot: (r, lq). Writes
    out, lse, lse_lo = (m + log ℓ) - lse, the rounding of lse (by TwoSum in float64; 0 where lse
    is not finite), and onehot = 1 where ℓ = 1 exactly (the row's softmax is one-hot to working
    precision: every weight but its largest's rounds away), else 0; the backward needs both."""
    rows, lq, e = q.shape
    lk = k.shape[1]
    offset = lk - lq  # causal: query i sees keys j <= i + offset
    n_qt = (lq + BLOCK_Q - 1) // BLOCK_Q
    for task in prange(rows * n_qt):
        r, t = task // n_qt, task % n_qt
        # tiles in the order 0, n-1, 1, n-2, ...: prange gives each thread a contiguous range
        # of tasks, and under the causal mask later tiles cost more
        i0 = (t // 2 if t % 2 == 0 else n_qt - 1 - t // 2) * BLOCK_Q
        bq = min(BLOCK_Q, lq - i0)
        Qt = np.zeros((e, BLOCK_Q), q.dtype)  # scale · q tile, transposed (padding queries: 0)
        St = np.empty((BLOCK_K, BLOCK_Q), q.dtype)  # scores Sᵀ, then the weights Pᵀ
        At = np.zeros((e, BLOCK_Q), q.dtype)  # Õᵀ
        m = np.full(BLOCK_Q, -np.inf, q.dtype)
        m_new = np.empty(BLOCK_Q, q.dtype)
        alpha = np.empty(BLOCK_Q, q.dtype)  # e^(m - m')
        ssum = np.zeros(BLOCK_Q, q.dtype)  # ℓ
        zero, one = ssum[0], ssum[0] + 1
        for ii in range(bq):
            for c in range(e):
                Qt[c, ii] = q[r, i0 + ii, c] * scale
        j_end = min(lk, i0 + bq + offset) if causal else lk  # keys the last row sees
        # [core] online softmax tile
        for j0 in range(0, j_end, BLOCK_K):
            bk = min(BLOCK_K, j_end - j0)
            _block_product(St, k[r, j0:j0 + bk], Qt, bk, e, False)  # Sᵀ = K Qᵀ
            if causal:  # key j0 + jj is hidden from the queries ii < j0 + jj - offset - i0
                for jj in range(bk):
                    for ii in range(min(j0 + jj - offset - i0, BLOCK_Q)):
                        St[jj, ii] = -np.inf
            for ii in range(BLOCK_Q):
                m_new[ii] = m[ii]
            for jj in range(bk):  # m' = max(m, max_J s), down the columns
                for ii in range(BLOCK_Q):
                    m_new[ii] = max(m_new[ii], St[jj, ii])
            # m' = -inf while a row has seen only -inf scores (then alpha = 1, p = 0, ℓ = 0),
            # +inf after a +inf score (its p = e^nan: ℓ and Õ become nan); the last loop
            # reads both
            for ii in range(BLOCK_Q):
                alpha[ii] = exp_neg(m[ii] - m_new[ii]) if m[ii] != m_new[ii] else one
                m[ii] = m_new[ii]
                ssum[ii] *= alpha[ii]
            for jj in range(bk):  # Pᵀ = e^(Sᵀ - m'), ℓ' = e^(m - m') ℓ + Σ_J p
                for ii in range(BLOCK_Q):
                    s = St[jj, ii]
                    p = exp_neg(s - m_new[ii])
                    p = p if s != -np.inf else zero  # hidden: 0, also at m' = -inf (e^nan)
                    St[jj, ii] = p
                    ssum[ii] += p
            for c in range(e):
                for ii in range(BLOCK_Q):
                    At[c, ii] *= alpha[ii]
            _block_product(At, v[r, j0:j0 + bk].T, St, e, bk, True)  # Õᵀ += Vᵀ Pᵀ
        # [/core]
        for ii in range(bq):  # out = Õ / ℓ, lse = m + log ℓ
            mi, li = m[ii], ssum[ii]
            onehot[r, i0 + ii] = 0
            lse_lo[r, i0 + ii] = zero
            if li > zero and mi - mi == zero:  # m finite, so ℓ >= 1 (its max's e^0) or nan
                inv = one / li
                for c in range(e):
                    out[r, i0 + ii, c] = At[c, ii] * inv
                m64, log_l = np.float64(mi), math.log(li)  # lse = m + log ℓ, and its
                lse64 = m64 + log_l  # rounding by TwoSum (Knuth): exact in float64
                b64 = lse64 - m64
                lo64 = (m64 - (lse64 - b64)) + (log_l - b64)
                lse[r, i0 + ii] = lse64
                lse_lo[r, i0 + ii] = (lse64 - np.float64(lse[r, i0 + ii])) + lo64
                onehot[r, i0 + ii] = li == one
            else:  # no finite max, or a nan score: out = nan as ref's e^(s - lse) gives it;
                # lse = -inf (every visible score -inf: ℓ = 0), +inf (a +inf score), else nan
                for c in range(e):
                    out[r, i0 + ii, c] = np.nan
                lse[r, i0 + ii] = mi if mi - mi != zero else np.nan


_attention_cpu_fwd = njit(parallel=True, cache=True, fastmath={"contract"})(_attention_loop)


def _fwd_cpu(q, k, v, causal, scale):
    """q: (r, lq, e), k, v: (r, lk, e) contiguous -> out (r, lq, e), lse (r, lq), and for the
    backward (which takes them after its other arguments) lse_lo (r, lq) and onehot (r, lq)
    uint8 (``_attention_loop``)."""
    out = torch.empty_like(q)
    lse, lse_lo = (torch.empty(q.shape[:2], dtype=q.dtype) for _ in range(2))
    onehot = torch.empty(q.shape[:2], dtype=torch.uint8)
    dtype = numpy_dtype(q.dtype)
    _attention_cpu_fwd(*map(to_numba, (q, k, v, out, lse, lse_lo, onehot)), dtype.type(scale),
                       causal)
    return out, lse, lse_lo, onehot


# =============================================================================================
# CPU backward (Numba): FlashAttention-2's backward (Dao 2023, algorithm 2), tile by tile from
# the saved lse, never forming an (lq, lk) array. With the tiles held transposed (queries last)
# as in the forward, a pair of tiles (query tile I, key tile J) gives
#   Sᵀ = K_J (scale·Q_I)ᵀ,  Pᵀ = e^(Sᵀ - lse_I),  dPᵀ = V_J dO_Iᵀ,  dSᵀ = Pᵀ ∘ (dPᵀ - D_I),
#   dV_J += Pᵀ dO_I,  dK_J += dSᵀ (scale·Q_I),  dQ_I += dS K_J  (times scale at the end).
# Main pass: one prange task = one head r and every G-th key tile (G groups per head,
# ``_groups``); for its key tile J it walks the query tiles I that see J. dK_J and dV_J belong
# to the task alone; dQ is summed over the task's key tiles into its group's partial dQ
# (G, r, lq, e), the G partials added afterwards: no atomics, and the result does not depend on
# the thread schedule. Five products of BLOCK_K x BLOCK_Q x e per tile pair, one exp per score.
# D: FlashAttention-2's D_i = dO_i·o_i - dlse_i (the gradient reaching lse adds P_ij·dlse_i to
# dS_ij), formed in ``_attention_bwd_prep`` from the saved output in O(l·e): no pass over the
# keys. It equals Σ_j P_ij dP_ij, but not to the last bit, and two kinds of row need more:
#   - one-hot rows (ℓ = 1 exactly in the forward: large logits, or one key): dP_ij - D_i should
#     vanish at the key with P = 1 and would be left at eps·|dO||v|, which the sums over queries
#     carry into dK and dQ, where the reference has exactly 0 (the fuzzer found it, in float32
#     and float64). For the query tiles holding such a row (none at the benchmark's size), a
#     first pass forms D_i = Σ_j P_ij dP_ij - dlse_i for those rows from the same P and dP (the
#     same calls, bit for bit) as the main pass: two more products and one more exp per tile
#     pair of those tiles only. (Before, that pass ran for every tile: ~20% of fwd + bwd.)
#   - lse's rounding: lse = m + log ℓ is rounded to the dtype, so Σ_j e^(s_ij - lse_i) =
#     e^(lse_lo) with lse_lo = (m + log ℓ) - lse (the forward keeps it, by TwoSum): at |lse| ~ 1e3
#     in float32, ulp(lse)/2 = 6e-5 scales a whole row of P. float32 subtracts it (c = lse_lo:
#     P = e^(s - lse - c), exact near the row's max, Σ_j P_ij = 1, consistent with D = dO·o);
#     this took the fuzzer's worst large-logit case from 1.0x its tolerance to 0.24x. float64
#     keeps P = e^(s - lse) as the reference computes it (its rounding, 1e-16·|lse|, is the
#     definition's own: ref's autograd differentiates exp(s - lse) with lse rounded the same
#     way) and D = e^(lse_lo)·dO·o = Σ_j P_ij dP_ij to match; otherwise near one-hot rows
#     (a second weight ~1e-9) differ from ref by ~1e-9 of the scale, at the fuzzer's tolerance.
# The query-side tiles arrive padded to whole tiles (queries past lq: zero q and dO, lse = +inf,
# so P = 0 there) and transposed, made by ``_attention_bwd_prep``; the Sᵀ product is the
# forward's own (the same P to the last bit).
# =============================================================================================


@njit(cache=True, fastmath={"contract"})
def _block_product_w(Out, M, X, rows, inner, width):
    """Out[r, :width] += Σ_{s < inner} M[r, s] X[s, :width] for r < rows, 4 rows x 4 inner
    steps a pass (the forward's ``_block_product`` calls it at width BLOCK_Q; the backward at the
    head dim e), accumulating. dV_J += Pᵀ dO_I is
    (dVJ, Pt, dO tile), dK_J += dSᵀ Q_I is (dKJ, dSt, Q tile). Each row takes its 4 terms as a
    chain O + a0·x0 + a1·x1 + ... (4 fused multiply-adds) rather than the pairwise tree
    (a0·x0 + a1·x1) + (a2·x2 + a3·x3) (2 multiplies, 2 FMAs, 2 adds): 83-94 vs 72-82 GFLOP/s on
    one core in a micro-benchmark, fwd + bwd ~18% faster."""
    r4, s4 = rows - rows % 4, inner - inner % 4
    for r in range(0, r4, 4):
        O0, O1, O2, O3 = Out[r], Out[r + 1], Out[r + 2], Out[r + 3]
        for s in range(0, s4, 4):
            a0, a1, a2, a3 = M[r, s], M[r, s + 1], M[r, s + 2], M[r, s + 3]
            b0, b1, b2, b3 = M[r + 1, s], M[r + 1, s + 1], M[r + 1, s + 2], M[r + 1, s + 3]
            c0, c1, c2, c3 = M[r + 2, s], M[r + 2, s + 1], M[r + 2, s + 2], M[r + 2, s + 3]
            d0, d1, d2, d3 = M[r + 3, s], M[r + 3, s + 1], M[r + 3, s + 2], M[r + 3, s + 3]
            X0, X1, X2, X3 = X[s], X[s + 1], X[s + 2], X[s + 3]
            for ii in range(width):  # a chain of 4 multiply-adds per row (fused: 4 FMAs)
                x0, x1, x2, x3 = X0[ii], X1[ii], X2[ii], X3[ii]
                O0[ii] = O0[ii] + a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                O1[ii] = O1[ii] + b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
                O2[ii] = O2[ii] + c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3
                O3[ii] = O3[ii] + d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3
        for s in range(s4, inner):
            a0, b0, c0, d0 = M[r, s], M[r + 1, s], M[r + 2, s], M[r + 3, s]
            X0 = X[s]
            for ii in range(width):
                O0[ii] += a0 * X0[ii]
                O1[ii] += b0 * X0[ii]
                O2[ii] += c0 * X0[ii]
                O3[ii] += d0 * X0[ii]
    for r in range(r4, rows):
        O0 = Out[r]
        for s in range(inner):
            a0, X0 = M[r, s], X[s]
            for ii in range(width):
                O0[ii] += a0 * X0[ii]


def _attention_bwd_prep(q, do, out, lse, lse_lo, dlse, onehot, scale, correct, qst, dot, lse_t,
                        D_t, hot_t):
    """The backward's query-side tiles (one prange task per head and tile). q, do, out:
    (r, lq, e); lse, lse_lo, dlse, onehot: (r, lq). Writes qst, dot (r, n_qt, e, BLOCK_Q) =
    (scale·q)ᵀ and dOᵀ, zeros given past lq; lse_t (r, n_qt, 2, BLOCK_Q) = lse and the
    correction c = lse_lo if ``correct`` else 0 (+inf and 0 past lq: P = 0 there), so that
    P = e^(s - lse - c) and Σ_j P_ij = e^(lse_lo - c); D_t (r, n_qt, BLOCK_Q) = e^(lse_lo - c)
    dO_i·o_i - dlse_i = Σ_j P_ij dP_ij - dlse_i (FlashAttention-2's D, summed in float64; 0
    past lq); hot_t (r, n_qt) = the number of one-hot rows in each tile."""
    rows, lq, e = q.shape
    n_qt = qst.shape[1]
    for task in prange(rows * n_qt):
        r, t = task // n_qt, task % n_qt
        i0 = t * BLOCK_Q
        bq = min(BLOCK_Q, lq - i0)
        for ii in range(BLOCK_Q):
            lse_t[r, t, 0, ii] = np.inf
            lse_t[r, t, 1, ii] = 0
            D_t[r, t, ii] = 0
        hot = 0
        for ii in range(bq):
            d = 0.0  # float64: the products of two float32s are exact in it
            for c in range(e):
                qst[r, t, c, ii] = q[r, i0 + ii, c] * scale
                g = do[r, i0 + ii, c]
                dot[r, t, c, ii] = g
                d += np.float64(g) * np.float64(out[r, i0 + ii, c])
            lo = lse_lo[r, i0 + ii]
            lse_t[r, t, 0, ii] = lse[r, i0 + ii]
            lse_t[r, t, 1, ii] = lo if correct else 0
            D_t[r, t, ii] = (d if correct else math.exp(np.float64(lo)) * d) - dlse[r, i0 + ii]
            hot += onehot[r, i0 + ii]
        hot_t[r, t] = hot


@njit(cache=True, fastmath={"contract"})
def _p_dp(St, dPt, kJ, vJ, Qt, dOt, lse_i, bk, e):
    """Pᵀ = e^(K_J Qt - lse) into St and dPᵀ = V_J dOt into dPt (bk x BLOCK_Q; Qt = (scale·Q_I)ᵀ
    and dOt = dO_Iᵀ are (e, BLOCK_Q)), for both passes: the same arithmetic, the same bits.
    lse_i (2, BLOCK_Q): lse and the correction c of ``_attention_bwd_prep``."""
    _block_product(St, kJ, Qt, bk, e, False)  # Sᵀ = K_J (scale·Q_I)ᵀ
    lse_hi, lse_c = lse_i[0], lse_i[1]
    for jj in range(bk):  # Pᵀ = e^(Sᵀ - lse - c): s - lse is exact near the row's max
        for ii in range(BLOCK_Q):
            St[jj, ii] = exp_neg((St[jj, ii] - lse_hi[ii]) - lse_c[ii])
    _block_product(dPt, vJ, dOt, bk, e, False)  # dPᵀ = V_J dO_Iᵀ


def _attention_bwd_d_loop(qst, dot, lse_t, dlse, onehot, k, v, tiles, D_t, causal, lq):
    """Exact D for the one-hot rows: D_t[r, t, ii] = Σ_j P_ij dP_ij - dlse_i over the keys row
    i = t·BLOCK_Q + ii sees, where onehot[r, i]; one prange task per query tile listed in
    ``tiles`` (flat indices r·n_qt + t). qst, dot, lse_t, D_t: ``_attention_bwd_prep``'s; dlse,
    onehot (r, lq); k, v (r, lk, e)."""
    n_qt, e = qst.shape[1], qst.shape[2]
    lk = k.shape[1]
    offset = lk - lq
    for task in prange(len(tiles)):
        r, t = tiles[task] // n_qt, tiles[task] % n_qt
        i0 = t * BLOCK_Q
        bq = min(BLOCK_Q, lq - i0)
        St = np.empty((BLOCK_K, BLOCK_Q), qst.dtype)
        dPt = np.empty((BLOCK_K, BLOCK_Q), qst.dtype)
        D = np.zeros(BLOCK_Q, qst.dtype)
        j_end = min(lk, i0 + bq + offset) if causal else lk  # keys the last row sees
        for j0 in range(0, j_end, BLOCK_K):
            bk = min(BLOCK_K, j_end - j0)
            _p_dp(St, dPt, k[r, j0:j0 + bk], v[r, j0:j0 + bk], qst[r, t], dot[r, t], lse_t[r, t],
                  bk, e)
            if causal:  # hidden keys: P = 0
                for jj in range(bk):
                    for ii in range(min(j0 + jj - offset - i0, BLOCK_Q)):
                        St[jj, ii] = 0
            for jj in range(bk):  # D += Σ_J P dP, down the columns
                for ii in range(BLOCK_Q):
                    D[ii] += St[jj, ii] * dPt[jj, ii]
        for ii in range(bq):
            if onehot[r, i0 + ii]:
                D_t[r, t, ii] = D[ii] - dlse[r, i0 + ii]


def _attention_bwd_loop(q, qst, do, dot, lse_t, D_t, k, v, dqp, dk, dv, causal, scale):
    """Main pass. q, do: (r, lq, e) as given; qst, dot, lse_t, D_t the query-side tiles of
    ``_attention_bwd_prep`` and the first pass; k, v, dk, dv: (r, lk, e); dqp (G, r, lq, e)
    zeros, gets each group's Σ_J dS K_J. Writes dk (times scale), dv and dqp."""
    G = dqp.shape[0]
    rows, lq, e = q.shape
    n_qt = qst.shape[1]
    lk = k.shape[1]
    offset = lk - lq  # causal: query i sees keys j <= i + offset
    n_kt = (lk + BLOCK_K - 1) // BLOCK_K
    for task in prange(rows * G):
        r, g = task // G, task % G
        St = np.empty((BLOCK_K, BLOCK_Q), q.dtype)  # Sᵀ, then Pᵀ
        dPt = np.empty((BLOCK_K, BLOCK_Q), q.dtype)  # dPᵀ, then dSᵀ
        dKJ = np.empty((BLOCK_K, e), q.dtype)  # Σ_I dSᵀ Q_I
        dVJ = np.empty((BLOCK_K, e), q.dtype)
        for jt in range(g, n_kt, G):
            j0 = jt * BLOCK_K
            bk = min(BLOCK_K, lk - j0)
            dKJ[:] = 0
            dVJ[:] = 0
            kJ, vJ = k[r, j0:j0 + bk], v[r, j0:j0 + bk]
            t_first = max(0, j0 - offset) // BLOCK_Q if causal else 0  # queries that see J
            # [core] backward tile
            for t in range(t_first, n_qt):
                i0 = t * BLOCK_Q
                bq = min(BLOCK_Q, lq - i0)
                _p_dp(St, dPt, kJ, vJ, qst[r, t], dot[r, t], lse_t[r, t], bk, e)  # Pᵀ, dPᵀ
                D_i = D_t[r, t]
                for jj in range(bk):  # dSᵀ = Pᵀ ∘ (dPᵀ - D)
                    for ii in range(BLOCK_Q):
                        dPt[jj, ii] = St[jj, ii] * (dPt[jj, ii] - D_i[ii])
                if causal:  # key j0 + jj is hidden from the queries ii < j0 + jj - offset - i0:
                    for jj in range(bk):  # P = dS = 0 there, even in a row of nan (lse = -inf)
                        for ii in range(min(j0 + jj - offset - i0, BLOCK_Q)):
                            St[jj, ii] = 0
                            dPt[jj, ii] = 0
                _block_product_w(dVJ, St, do[r, i0:i0 + bq], bk, bq, e)  # dV_J += Pᵀ dO_I
                _block_product_w(dKJ, dPt, q[r, i0:i0 + bq], bk, bq, e)  # dK_J += dSᵀ Q_I
                _block_product_w(dqp[g, r, i0:i0 + bq], dPt.T, kJ, bq, bk, e)  # dQ_I += dS K_J
            # [/core]
            for jj in range(bk):
                for c in range(e):
                    dk[r, j0 + jj, c] = dKJ[jj, c] * scale
                    dv[r, j0 + jj, c] = dVJ[jj, c]


_attention_cpu_bwd_prep = njit(parallel=True, cache=True)(_attention_bwd_prep)
_attention_cpu_bwd_d = njit(parallel=True, cache=True, fastmath={"contract"})(_attention_bwd_d_loop)
_attention_cpu_bwd = njit(parallel=True, cache=True, fastmath={"contract"})(_attention_bwd_loop)


def _groups(rows: int, lk: int) -> int:
    """Key-tile groups per head: enough tasks for two per thread, at most one per key tile."""
    n_kt = (lk + BLOCK_K - 1) // BLOCK_K
    return max(1, min(n_kt, -(-2 * get_num_threads() // rows)))


def _bwd_cpu(q, k, v, out, lse, g_out, g_lse, causal, scale, lse_lo, onehot):
    """q, out, g_out: (r, lq, e); k, v: (r, lk, e); lse, g_lse, and lse_lo, onehot
    (``_fwd_cpu``'s): (r, lq); contiguous, lq >= 1 -> dq (r, lq, e), dk, dv (r, lk, e)."""
    rows, lq, e = q.shape
    n_qt = (lq + BLOCK_Q - 1) // BLOCK_Q
    G = _groups(rows, k.shape[1])
    qst = q.new_zeros(rows, n_qt, e, BLOCK_Q)  # (r, n_qt, e, BQ)
    dot = q.new_zeros(rows, n_qt, e, BLOCK_Q)
    lse_t = q.new_empty(rows, n_qt, 2, BLOCK_Q)  # (r, n_qt, 2, BQ): lse, c
    D_t = q.new_empty(rows, n_qt, BLOCK_Q)
    hot_t = torch.empty(rows, n_qt, dtype=torch.int64)  # one-hot rows per tile
    dtype = numpy_dtype(q.dtype).type
    correct = q.dtype == torch.float32  # see "lse's rounding" above
    _attention_cpu_bwd_prep(*map(to_numba, (q, g_out, out, lse, lse_lo, g_lse, onehot)),
                            dtype(scale), correct,
                            *map(to_numba, (qst, dot, lse_t, D_t, hot_t)))
    tiles = hot_t.view(-1).nonzero().view(-1)  # tiles holding a one-hot row
    if len(tiles):
        _attention_cpu_bwd_d(*map(to_numba, (qst, dot, lse_t, g_lse, onehot, k, v, tiles, D_t)),
                             causal, lq)
    dqp = q.new_zeros(G, rows, lq, e)  # (G, r, lq, e)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _attention_cpu_bwd(*map(to_numba, (q, qst, g_out, dot, lse_t, D_t, k, v, dqp, dk, dv)),
                       causal, dtype(scale))
    dq = dqp[0] if G == 1 else dqp.sum(0)
    return dq.mul_(scale), dk, dv
