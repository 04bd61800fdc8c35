"""Attention's CPU kernel (Numba): the tiled loop with the online softmax, kept importable
undecorated, and its host wrapper. The equations and the glossary: kernels/attention/__init__.py."""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

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
    (St, K, Qt); Õᵀ += Vᵀ Pᵀ is (At, Vᵀ, Pt), accumulating."""
    r4, s4 = rows - rows % 4, inner - inner % 4
    if not accumulate:
        for r in range(rows):
            Out[r, :BLOCK_Q] = 0
    for r in range(0, r4, 4):
        O0, O1, O2, O3 = Out[r], Out[r + 1], Out[r + 2], Out[r + 3]
        for s in range(0, s4, 4):
            a0, a1, a2, a3 = M[r, s], M[r, s + 1], M[r, s + 2], M[r, s + 3]
            b0, b1, b2, b3 = M[r + 1, s], M[r + 1, s + 1], M[r + 1, s + 2], M[r + 1, s + 3]
            c0, c1, c2, c3 = M[r + 2, s], M[r + 2, s + 1], M[r + 2, s + 2], M[r + 2, s + 3]
            d0, d1, d2, d3 = M[r + 3, s], M[r + 3, s + 1], M[r + 3, s + 2], M[r + 3, s + 3]
            X0, X1, X2, X3 = X[s], X[s + 1], X[s + 2], X[s + 3]
            for ii in range(BLOCK_Q):
                x0, x1, x2, x3 = X0[ii], X1[ii], X2[ii], X3[ii]
                O0[ii] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3)
                O1[ii] += (b0 * x0 + b1 * x1) + (b2 * x2 + b3 * x3)
                O2[ii] += (c0 * x0 + c1 * x1) + (c2 * x2 + c3 * x3)
                O3[ii] += (d0 * x0 + d1 * x1) + (d2 * x2 + d3 * x3)
        for s in range(s4, inner):  # inner steps past the last multiple of 4
            a0, b0, c0, d0 = M[r, s], M[r + 1, s], M[r + 2, s], M[r + 3, s]
            X0 = X[s]
            for ii in range(BLOCK_Q):
                O0[ii] += a0 * X0[ii]
                O1[ii] += b0 * X0[ii]
                O2[ii] += c0 * X0[ii]
                O3[ii] += d0 * X0[ii]
    for r in range(r4, rows):  # rows past the last multiple of 4
        O0 = Out[r]
        for s in range(inner):
            a0, X0 = M[r, s], X[s]
            for ii in range(BLOCK_Q):
                O0[ii] += a0 * X0[ii]


def _attention_loop(q, k, v, out, lse, scale, causal):
    """Forward loop. q, out: (r, lq, e); k, v: (r, lk, e); lse: (r, lq). Writes out, lse."""
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
            for ii in range(BLOCK_Q):  # every row saw key 0 in the first tile: m' is finite
                alpha[ii] = exp_neg(m[ii] - m_new[ii]) if m[ii] != m_new[ii] else one
                m[ii] = m_new[ii]
                ssum[ii] *= alpha[ii]
            for jj in range(bk):  # Pᵀ = e^(Sᵀ - m'), ℓ' = e^(m - m') ℓ + Σ_J p
                for ii in range(BLOCK_Q):
                    s = St[jj, ii]
                    p = exp_neg(s - m_new[ii])
                    p = p if s != -np.inf else zero  # hidden: exactly 0 (exp_neg clamps)
                    St[jj, ii] = p
                    ssum[ii] += p
            for c in range(e):
                for ii in range(BLOCK_Q):
                    At[c, ii] *= alpha[ii]
            _block_product(At, v[r, j0:j0 + bk].T, St, e, bk, True)  # Õᵀ += Vᵀ Pᵀ
        for ii in range(bq):
            inv = ssum[ii] ** -1
            for c in range(e):
                out[r, i0 + ii, c] = At[c, ii] * inv
            lse[r, i0 + ii] = m[ii] + math.log(ssum[ii])


_attention_cpu_fwd = njit(parallel=True, cache=True, fastmath={"contract"})(_attention_loop)


def _fwd_cpu(q, k, v, causal, scale):
    """q: (r, lq, e), k, v: (r, lk, e) contiguous -> out (r, lq, e), lse (r, lq)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=q.dtype)
    dtype = numpy_dtype(q.dtype)
    _attention_cpu_fwd(*map(to_numba, (q, k, v, out, lse)), dtype.type(scale), causal)
    return out, lse
