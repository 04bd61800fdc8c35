"""Scaled dot-product attention, computed tile by tile with the online softmax (FlashAttention).

References: Vaswani et al., "Attention is all you need" (2017), section 3.2.1 (scaled
dot-product attention); Milakov & Gimelshein, "Online normalizer calculation for softmax"
(2018), algorithm 3; Dao et al., "FlashAttention" (2022), algorithm 1 (tiling, rescaling).

Glossary (code = paper): ``q, k, v`` = Q, K, V; ``scale`` = 1/sqrt(d_k) (``e`` = d_k here);
``s`` = the scores S = scale·QKᵀ; ``m`` = the running row max m(x); ``l`` (``ssum`` in the
kernels) = the running normaliser ℓ(x); ``acc`` = the unnormalised output Õ; ``lse`` =
m + log ℓ, the log-sum-exp of a row. Shapes: ``b`` batch, ``h`` heads, ``lq``/``lk`` query and
key lengths, ``e`` head dim; the kernels see ``(r, l, e)`` with ``r = b·h`` independent heads.

    out_i = Σ_j softmax_j(s_ij) v_j,   s_ij = scale · q_i·k_j,   lse_i = log Σ_j exp(s_ij)

over the keys j that query i may see: all of them, or with ``causal=True`` those with
j ≤ i + (lk - lq) (bottom-right aligned, as FlashAttention: the last query sees every key).

The online softmax: after a tile of keys J with scores s_J, a row's state (m, ℓ, Õ) becomes

    m' = max(m, max_J s),   ℓ' = e^(m - m') ℓ + Σ_J e^(s_J - m'),
    Õ' = e^(m - m') Õ + Σ_J e^(s_J - m') v_J,          and at the end out = Õ / ℓ.

Backward: by recomputation. ``attention`` with the ``cpu``/``cuda`` backend is a
``torch.autograd.Function`` whose backward re-runs ``attention_ref`` under autograd (O(lq·lk)
memory in the backward pass only). FlashAttention's own backward kernel is not implemented.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda, njit, prange

from minimodels.backend import cuda_simulated, cuda_stream, dispatch, expect_tensor, to_numba
from minimodels.kernels.fastexp import exp_neg

__all__ = ["attention", "attention_ref", "attention_cpu", "attention_cuda", "IMPLS"]

# =============================================================================================
# Constants
# =============================================================================================

# CPU: a task is one head and BLOCK_Q queries; it walks the keys BLOCK_K at a time. 128 x 64
# measured best of 32..256 x 32..128 at (1, 8, 4096, 64) float32 (within ~10% of each other
# from 64 x 64 up); the exp is ``fastexp.exp_neg``, which vectorises (libm's does not).
BLOCK_Q = 128
BLOCK_K = 64

# CUDA: a block is BQ query rows × 2 threads (each thread owns half of the head dim) and walks
# the keys BK at a time through shared memory. The simulator (CI) uses small tiles so tiny
# tests cross tile boundaries. BK is chosen per (dtype, e) to fit 48 KB of shared memory.
BQ = 8 if cuda_simulated() else 64
SHARED_BYTES = 48 * 1024


# =============================================================================================
# Reference (the definition; autograd differentiates it)
# =============================================================================================


def causal_mask(lq: int, lk: int, device=None) -> torch.Tensor:
    """(lq, lk) bool, True where query i may see key j: j ≤ i + (lk - lq) (bottom-right)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def attention_ref(q, k, v, causal=False, scale=None, return_lse=False):
    """softmax(scale · q kᵀ [+ mask]) v, materialising the (lq, lk) scores.

    q: (b, h, lq, e); k, v: (b, h, lk, e) -> out (b, h, lq, e) [, lse (b, h, lq)]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ k.transpose(-2, -1))  # (b, h, lq, lk)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # (b, h, lq)
    out = torch.exp(s - lse[..., None]) @ v  # (b, h, lq, e)
    return (out, lse) if return_lse else out


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
def _scores_t(Qt, K, St, bk):
    """St[jj, :] = Σ_c K[jj, c] Qt[c, :] for jj < bk: Sᵀ = K Qᵀ, 4 keys x 4 head dims a pass."""
    e = Qt.shape[0]
    e4, bk4 = e - e % 4, bk - bk % 4
    for jj in range(0, bk4, 4):
        S0, S1, S2, S3 = St[jj], St[jj + 1], St[jj + 2], St[jj + 3]
        for ii in range(BLOCK_Q):
            S0[ii] = 0
            S1[ii] = 0
            S2[ii] = 0
            S3[ii] = 0
        for c in range(0, e4, 4):
            a0, a1, a2, a3 = K[jj, c], K[jj, c + 1], K[jj, c + 2], K[jj, c + 3]
            b0, b1, b2, b3 = K[jj + 1, c], K[jj + 1, c + 1], K[jj + 1, c + 2], K[jj + 1, c + 3]
            c0, c1, c2, c3 = K[jj + 2, c], K[jj + 2, c + 1], K[jj + 2, c + 2], K[jj + 2, c + 3]
            d0, d1, d2, d3 = K[jj + 3, c], K[jj + 3, c + 1], K[jj + 3, c + 2], K[jj + 3, c + 3]
            Q0, Q1, Q2, Q3 = Qt[c], Qt[c + 1], Qt[c + 2], Qt[c + 3]
            for ii in range(BLOCK_Q):
                x0, x1, x2, x3 = Q0[ii], Q1[ii], Q2[ii], Q3[ii]
                S0[ii] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3)
                S1[ii] += (b0 * x0 + b1 * x1) + (b2 * x2 + b3 * x3)
                S2[ii] += (c0 * x0 + c1 * x1) + (c2 * x2 + c3 * x3)
                S3[ii] += (d0 * x0 + d1 * x1) + (d2 * x2 + d3 * x3)
        for c in range(e4, e):  # head dims past the last multiple of 4
            a0, b0, c0, d0 = K[jj, c], K[jj + 1, c], K[jj + 2, c], K[jj + 3, c]
            Q0 = Qt[c]
            for ii in range(BLOCK_Q):
                S0[ii] += a0 * Q0[ii]
                S1[ii] += b0 * Q0[ii]
                S2[ii] += c0 * Q0[ii]
                S3[ii] += d0 * Q0[ii]
    for jj in range(bk4, bk):  # keys past the last multiple of 4
        S0 = St[jj]
        for ii in range(BLOCK_Q):
            S0[ii] = 0
        for c in range(e):
            a0, Q0 = K[jj, c], Qt[c]
            for ii in range(BLOCK_Q):
                S0[ii] += a0 * Q0[ii]


@njit(cache=True, fastmath={"contract"})
def _accumulate_t(At, V, Pt, bk):
    """At[c, :] += Σ_{jj < bk} V[jj, c] Pt[jj, :]: Õᵀ += Vᵀ Pᵀ, 4 head dims x 4 keys a pass."""
    e = At.shape[0]
    e4, bk4 = e - e % 4, bk - bk % 4
    for c in range(0, e4, 4):
        A0, A1, A2, A3 = At[c], At[c + 1], At[c + 2], At[c + 3]
        for jj in range(0, bk4, 4):
            a0, a1, a2, a3 = V[jj, c], V[jj + 1, c], V[jj + 2, c], V[jj + 3, c]
            b0, b1, b2, b3 = V[jj, c + 1], V[jj + 1, c + 1], V[jj + 2, c + 1], V[jj + 3, c + 1]
            c0, c1, c2, c3 = V[jj, c + 2], V[jj + 1, c + 2], V[jj + 2, c + 2], V[jj + 3, c + 2]
            d0, d1, d2, d3 = V[jj, c + 3], V[jj + 1, c + 3], V[jj + 2, c + 3], V[jj + 3, c + 3]
            P0, P1, P2, P3 = Pt[jj], Pt[jj + 1], Pt[jj + 2], Pt[jj + 3]
            for ii in range(BLOCK_Q):
                x0, x1, x2, x3 = P0[ii], P1[ii], P2[ii], P3[ii]
                A0[ii] += (a0 * x0 + a1 * x1) + (a2 * x2 + a3 * x3)
                A1[ii] += (b0 * x0 + b1 * x1) + (b2 * x2 + b3 * x3)
                A2[ii] += (c0 * x0 + c1 * x1) + (c2 * x2 + c3 * x3)
                A3[ii] += (d0 * x0 + d1 * x1) + (d2 * x2 + d3 * x3)
        for jj in range(bk4, bk):  # keys past the last multiple of 4
            a0, b0, c0, d0 = V[jj, c], V[jj, c + 1], V[jj, c + 2], V[jj, c + 3]
            P0 = Pt[jj]
            for ii in range(BLOCK_Q):
                A0[ii] += a0 * P0[ii]
                A1[ii] += b0 * P0[ii]
                A2[ii] += c0 * P0[ii]
                A3[ii] += d0 * P0[ii]
    for c in range(e4, e):  # head dims past the last multiple of 4
        A0 = At[c]
        for jj in range(bk):
            a0, P0 = V[jj, c], Pt[jj]
            for ii in range(BLOCK_Q):
                A0[ii] += a0 * P0[ii]


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
            _scores_t(Qt, k[r, j0:j0 + bk], St, bk)
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
            _accumulate_t(At, v[r, j0:j0 + bk], St, bk)
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
    dtype = np.dtype(str(q.dtype).removeprefix("torch."))
    _attention_cpu_fwd(*map(to_numba, (q, k, v, out, lse)), dtype.type(scale), causal)
    return out, lse


# =============================================================================================
# CUDA kernel (numba.cuda). One block = one head r and BQ query rows; 2·BQ threads: thread t
# owns row t mod BQ and half t // BQ of the head dim (so q and Õ fit in registers at e = 128).
# Per tile of BK keys: the block stages K and V in shared memory; each thread forms the partial
# dot products of its half, the two halves exchange them through shared memory, and both then
# run the same online-softmax update on their half of Õ. Reads of the K/V tiles are warp-wide
# broadcasts (a warp is 32 rows of one half, all reading the same key).
# =============================================================================================


@functools.cache
def _attention_kernel(dtype: np.dtype, e: int):
    """Compile-once (per dtype and head dim) forward kernel; returns (kernel, threads)."""
    EH = (e + 1) // 2  # head-dim entries per thread
    EP = 2 * EH  # padded row length in shared memory
    BK = max(1, min(32, SHARED_BYTES // (2 * dtype.itemsize * (EP + BQ))))
    if cuda_simulated():
        BK = 4
    KV_SIZE = BK * EP  # shared K (and V) tile
    S_SIZE = 2 * BK * BQ  # partial scores of both halves
    zero, one, neg_inf = dtype.type(0), dtype.type(1), dtype.type(-np.inf)
    threads = 2 * BQ

    @cuda.jit
    def kernel(q, k, v, out, lse, scale, causal):
        # q, out: (r, lq, e); k, v: (r, lk, e); lse: (r, lq). Block (tile, r), thread t.
        sK = cuda.shared.array(KV_SIZE, dtype)
        sV = cuda.shared.array(KV_SIZE, dtype)
        sS = cuda.shared.array(S_SIZE, dtype)
        qr = cuda.local.array(EH, dtype)  # scale · q_i, my half
        acc = cuda.local.array(EH, dtype)  # Õ_i, my half
        s = cuda.local.array(BK, dtype)  # this tile's scores of row i
        lq, lk = q.shape[1], k.shape[1]
        offset = lk - lq
        r, t = cuda.blockIdx.y, cuda.threadIdx.x
        half, row = t // BQ, t % BQ
        i0 = cuda.blockIdx.x * BQ
        i = i0 + row
        c0 = half * EH
        for cc in range(EH):
            c = c0 + cc
            qr[cc] = q[r, i, c] * scale if i < lq and c < e else zero
            acc[cc] = zero
        m, ssum = neg_inf, zero
        last = min(i0 + BQ, lq) - 1  # the block's last row
        j_end = min(lk, last + offset + 1) if causal else lk
        for j0 in range(0, j_end, BK):
            cuda.syncthreads()  # everyone is done with the previous tile
            for idx in range(t, BK * EP, threads):  # stage K_J, V_J (coalesced rows)
                jj, c = idx // EP, idx % EP
                inside = j0 + jj < lk and c < e
                sK[idx] = k[r, j0 + jj, c] if inside else zero
                sV[idx] = v[r, j0 + jj, c] if inside else zero
            cuda.syncthreads()
            n = min(BK, j_end - j0)  # keys row i sees in this tile
            if causal:
                n = min(n, i + offset + 1 - j0)
            if i >= lq:
                n = 0
            for jj in range(BK):  # my half of s_ij = (scale q_i) · k_j
                if jj < n:
                    part = zero
                    for cc in range(EH):
                        part += qr[cc] * sK[jj * EP + c0 + cc]
                    sS[(half * BK + jj) * BQ + row] = part
            cuda.syncthreads()
            if n > 0:
                m_new = m
                for jj in range(BK):
                    if jj < n:
                        s[jj] = sS[jj * BQ + row] + sS[(BK + jj) * BQ + row]
                        m_new = max(m_new, s[jj])
                alpha = math.exp(m - m_new)  # 0 on the first tile (m = -inf)
                ssum *= alpha
                for cc in range(EH):
                    acc[cc] *= alpha
                for jj in range(BK):
                    if jj < n:
                        p = math.exp(s[jj] - m_new)
                        ssum += p
                        for cc in range(EH):
                            acc[cc] += p * sV[jj * EP + c0 + cc]
                m = m_new
        if i < lq:
            inv = one / ssum
            for cc in range(EH):
                if c0 + cc < e:
                    out[r, i, c0 + cc] = acc[cc] * inv
            if half == 0:
                lse[r, i] = m + math.log(ssum)

    return kernel, threads


def _fwd_cuda(q, k, v, causal, scale):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=q.dtype, device=q.device)
    dtype = np.dtype(str(q.dtype).removeprefix("torch."))
    kernel, threads = _attention_kernel(dtype, q.shape[-1])
    grid = ((q.shape[1] + BQ - 1) // BQ, q.shape[0])
    kernel[grid, threads, cuda_stream()](*map(to_numba, (q, k, v, out, lse)),
                                        dtype.type(scale), causal)
    return out, lse


# =============================================================================================
# Autograd: the forward is a kernel; the backward recomputes with the reference
# =============================================================================================


class _Attention(torch.autograd.Function):
    """Forward by a tiled kernel; backward by recomputation through ``attention_ref``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, fwd):
        b, h, lq, e = q.shape
        lk = k.shape[2]
        rows = b * h
        q_r = q.contiguous().view(rows, lq, e)  # (r, lq, e)
        k_r = k.contiguous().view(rows, lk, e)  # (r, lk, e)
        v_r = v.contiguous().view(rows, lk, e)
        if q.numel():
            out, lse = fwd(q_r, k_r, v_r, causal, scale)
        else:
            out, lse = torch.empty_like(q_r), q_r.new_empty(q_r.shape[:2])
        ctx.save_for_backward(q, k, v)
        ctx.causal, ctx.scale = causal, scale
        return out.view(b, h, lq, e), lse.view(b, h, lq)

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            out, lse = attention_ref(q, k, v, ctx.causal, ctx.scale, return_lse=True)
            dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (g_out, g_lse))
        return dq, dk, dv, None, None, None


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_cpu(q, k, v, causal=False, scale=None, return_lse=False):
    """Numba CPU kernel, parallel over heads × query tiles. Same contract as ``attention_ref``."""
    out, lse = _Attention.apply(q, k, v, causal, _scale(q, scale), _fwd_cpu)
    return (out, lse) if return_lse else out


def attention_cuda(q, k, v, causal=False, scale=None, return_lse=False):
    """numba.cuda kernel (or the CUDA simulator). Same contract as ``attention_ref``."""
    out, lse = _Attention.apply(q, k, v, causal, _scale(q, scale), _fwd_cuda)
    return (out, lse) if return_lse else out


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": attention_ref, "cpu": attention_cpu, "cuda": attention_cuda}


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, backend=None):
    """Scaled dot-product attention softmax(scale · q kᵀ) v without forming the scores.

    Args:
        q: (b, h, lq, e) queries; k, v: (b, h, lk, e) keys and values; float32 or float64,
            one dtype and device.
        causal: if True, query i sees key j only when j ≤ i + (lk - lq) (bottom-right
            aligned, as FlashAttention; equal to SDPA's ``is_causal`` when lq == lk).
            Needs lq ≤ lk.
        scale: multiplies the scores; default 1 / sqrt(e).
        return_lse: also return lse = log Σ_j exp(s_ij) over the visible keys, (b, h, lq).
        backend: "ref", "cpu", "cuda", a callable with this signature, or None to choose from
            the tensors' device (see ``minimodels.backend.resolve``).

    Returns:
        out (b, h, lq, e) in the dtype of q, or (out, lse) with ``return_lse``. Differentiable
        on every backend (the kernels' backward recomputes with ``attention_ref``).
    """
    expect_tensor("q", q, "b, h, lq, e")
    expect_tensor("k", k, "b, h, lk, e", dtypes=(q.dtype,))
    expect_tensor("v", v, "b, h, lk, e", dtypes=(q.dtype,), shape=k.shape)
    b, h, lq, e = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, e):
        raise ValueError(
            f"k must have shape (b, h, lk, e) with b, h, e = {(b, h, e)} from q, got "
            f"{tuple(k.shape)}"
        )
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one key (lk >= 1)")
    if causal and lq > k.shape[2]:
        raise ValueError(
            f"causal attention needs lq <= lk (bottom-right aligned mask), got lq={lq}, "
            f"lk={k.shape[2]}"
        )
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    return dispatch(IMPLS, q, k, v, causal=causal, scale=scale, return_lse=return_lse,
                    backend=backend)
