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

__all__ = ["attention", "attention_ref", "attention_cpu", "attention_cuda", "IMPLS"]

# =============================================================================================
# Constants
# =============================================================================================

# CPU: a task is one head and BLOCK_Q queries; it walks the keys BLOCK_K at a time.
BLOCK_Q = 64
BLOCK_K = 64

# exp(x) for x ≤ 0 as 2^n · p(x - n·ln 2), p the Taylor polynomial of degree 11 (relative
# error < 1e-14 on |x - n ln 2| ≤ ln2/2), in loops LLVM vectorises: pip's Numba calls a scalar
# libm exp (~5x slower here, measured). ln 2 = LN2_HI + LN2_LO with LN2_HI short enough that
# n·LN2_HI is exact (Cody & Waite). Arguments below EXP_MIN count as EXP_MIN: a weight of
# e^-87 ≈ 1.6e-38 instead of a smaller one, invisible next to the row's largest weight, 1.
EXP_MIN = -87.0
LOG2E = 1.4426950408889634
LN2_HI = 0.693359375
LN2_LO = -2.12194440054690583e-4
EXP_DEGREE = 11

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
# CPU kernel (Numba). One prange task = one head r and one tile of BLOCK_Q queries. For each
# tile of BLOCK_K keys it forms the (BLOCK_Q, BLOCK_K) score tile S, then updates every row's
# (m, ℓ, Õ) with the online softmax. Every inner loop runs over a contiguous axis so LLVM
# vectorises it: S += q_c · Kᵀ[c, :] (K tile transposed once per tile), Õ += p_j · v_j.
# =============================================================================================


@njit(cache=True)
def _exp_rows(x, n, bits, pow2, c):
    """x[j] = exp(x[j]) for j < n, all x[j] ≤ 0. ``bits`` (an integer array) and ``pow2`` share
    their bytes: we write the exponent field of the float 2^t directly. c = (EXP_MIN, LOG2E,
    LN2_HI, LN2_LO, 1/0!, 1/1!, ..., 1/11!) in the data's dtype, so float32 stays float32."""
    mantissa = 23 if bits.itemsize == 4 else 52
    bias = 127 if bits.itemsize == 4 else 1023
    lo, log2e, ln2_hi, ln2_lo, half = c[0], c[1], c[2], c[3], c[6]
    c0, c1, c2, c3, c4, c5, c6, c7 = c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11]
    c8, c9, c10, c11 = c[12], c[13], c[14], c[15]
    for j in range(n):
        y = max(x[j], lo)
        t = np.floor(y * log2e + half)  # t = round(y / ln 2)
        r = (y - t * ln2_hi) - t * ln2_lo  # |r| <= ln2 / 2
        x[j] = ((((((((((c11 * r + c10) * r + c9) * r + c8) * r + c7) * r + c6) * r + c5) * r
                    + c4) * r + c3) * r + c2) * r + c1) * r + c0  # Σ_d r^d / d!
        bits[j] = (int(t) + bias) << mantissa
    for j in range(n):
        x[j] *= pow2[j]


def _exp_consts(dtype: np.dtype) -> np.ndarray:
    taylor = [1 / math.factorial(d) for d in range(EXP_DEGREE + 1)]
    return np.array([EXP_MIN, LOG2E, LN2_HI, LN2_LO, *taylor], dtype=dtype)


def _attention_loop(q, k, v, out, lse, scale, causal, ibits, consts):
    """Forward loop. q, out: (r, lq, e); k, v: (r, lk, e); lse: (r, lq). Writes out, lse.

    ``ibits``: an empty integer array of the floats' itemsize; ``consts``: ``_exp_consts``."""
    rows, lq, e = q.shape
    lk = k.shape[1]
    offset = lk - lq  # causal: query i sees keys j <= i + offset
    n_qt = (lq + BLOCK_Q - 1) // BLOCK_Q
    for task in prange(rows * n_qt):
        r = task // n_qt
        i0 = (task % n_qt) * BLOCK_Q
        bq = min(BLOCK_Q, lq - i0)
        Q = np.empty((BLOCK_Q, e), q.dtype)  # scale · q tile
        Kt = np.empty((e, BLOCK_K), q.dtype)  # k tile, transposed
        S = np.empty(BLOCK_K, q.dtype)  # one row of scores
        V = np.empty((BLOCK_K, e), q.dtype)  # v tile
        bits = np.empty(BLOCK_K, ibits.dtype)  # scratch of the vectorised exp
        pow2 = bits.view(q.dtype)
        acc = np.zeros((BLOCK_Q, e), q.dtype)  # Õ
        m = np.full(BLOCK_Q, -np.inf, q.dtype)
        ssum = np.zeros(BLOCK_Q, q.dtype)  # ℓ
        for ii in range(bq):
            for c in range(e):
                Q[ii, c] = q[r, i0 + ii, c] * scale
        j_end = min(lk, i0 + bq + offset) if causal else lk  # keys the last row sees
        for j0 in range(0, j_end, BLOCK_K):
            bk = min(BLOCK_K, j_end - j0)
            for jj in range(bk):
                for c in range(e):
                    Kt[c, jj] = k[r, j0 + jj, c]
                    V[jj, c] = v[r, j0 + jj, c]
            for ii in range(bq):
                n = min(bk, i0 + ii + offset + 1 - j0) if causal else bk  # keys row ii sees
                if n <= 0:
                    continue
                for jj in range(n):  # S = q_i · K_Jᵀ
                    S[jj] = 0
                for c in range(e):
                    qc = Q[ii, c]
                    for jj in range(n):
                        S[jj] += qc * Kt[c, jj]
                m_tile = S[0]
                for jj in range(1, n):
                    m_tile = max(m_tile, S[jj])
                m_new = max(m[ii], m_tile)
                alpha = math.exp(m[ii] - m_new)  # e^(m - m'); 0 on the first tile
                for jj in range(n):
                    S[jj] -= m_new
                _exp_rows(S, n, bits, pow2, consts)  # S becomes P = e^(S - m')
                total = S[0] * 0
                for jj in range(n):
                    total += S[jj]
                ssum[ii] = alpha * ssum[ii] + total
                for c in range(e):
                    acc[ii, c] *= alpha
                for jj in range(n):  # Õ += p_j v_j
                    pj = S[jj]
                    for c in range(e):
                        acc[ii, c] += pj * V[jj, c]
                m[ii] = m_new
        for ii in range(bq):
            inv = ssum[ii] ** -1
            for c in range(e):
                out[r, i0 + ii, c] = acc[ii, c] * inv
            lse[r, i0 + ii] = m[ii] + math.log(ssum[ii])


_attention_cpu_fwd = njit(parallel=True, cache=True)(_attention_loop)


def _fwd_cpu(q, k, v, causal, scale):
    """q: (r, lq, e), k, v: (r, lk, e) contiguous -> out (r, lq, e), lse (r, lq)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=q.dtype)
    dtype = np.dtype(str(q.dtype).removeprefix("torch."))
    ibits = np.empty(0, np.int32 if dtype.itemsize == 4 else np.int64)
    _attention_cpu_fwd(*map(to_numba, (q, k, v, out, lse)), dtype.type(scale), causal, ibits,
                       _exp_consts(dtype))
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
