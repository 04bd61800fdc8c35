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

from minimodels.backend import cuda_simulated, dispatch, expect_tensor, launch, to_numba
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

# CUDA: static shared memory per block (the tiles are in ``_attention_kernel``).
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
    dtype = np.dtype(str(q.dtype).removeprefix("torch."))
    _attention_cpu_fwd(*map(to_numba, (q, k, v, out, lse)), dtype.type(scale), causal)
    return out, lse


# =============================================================================================
# CUDA kernel (numba.cuda): FlashAttention on the CUDA cores, register-tiled like a SIMT GEMM.
# A block is one head r and BM = TY·RM query rows, TY × TX threads; it walks the keys BN = TX·RN
# at a time. Thread (ty, tx) owns rows ty + TY·a (a < RM) of the score tile S, of Õ and of the
# softmax state (m, ℓ), keys tx + TX·b (b < RN) of S, and head dims tx + TX·c (c < EB) of Õ.
# Per key tile J, all through one shared buffer:
#   1. S = (scale·Q_I) K_Jᵀ over chunks of EC head dims: Q and K chunks are staged in shared
#      memory; every step reads RM q and RN k values and does RM·RN FMAs in registers;
#   2. the row max across the TX threads of a row through shared memory; P = e^(S - m'), the
#      rescale of Õ and ℓ by e^(m - m') (each thread keeps its own part of ℓ, summed at the end);
#   3. Õ += P V_J: V chunks of VK keys are staged in shared memory next to P; every step reads
#      RM p and EB v values and does RM·EB FMAs.
# Reads are free of bank conflicts: rows are padded by one word, and a warp's lanes either share
# an address (broadcast) or read consecutive words.
# Every index into an array is unsigned (np.uint64): Numba guards each signed index with a
# negative-index wraparound test, which cost more instructions than the FMAs themselves.
# =============================================================================================

# (TY, TX, RM, RN) by itemsize on a GPU: float32's is the best of 7 shapes measured on the H200
# at (1, 16, 16384, 128) short of 255 registers (kernels/BENCHMARKS.md); in the simulator, small
# tiles so that tiny tests cross every tile edge
CUDA_TILES = {4: (8, 16, 8, 4), 8: (8, 16, 4, 2)}
SIMULATOR_TILES = (2, 4, 2, 2)
UNROLL_FMAS = 64  # FMAs per iteration of the inner loops, which LLVM then unrolls in full


@functools.cache
def _attention_kernel(dtype: np.dtype, e: int):
    """Compile-once (per dtype and head dim) forward kernel; returns (kernel, BM, threads)."""
    TY, TX, RM, RN = SIMULATOR_TILES if cuda_simulated() else CUDA_TILES[dtype.itemsize]
    BM, BN, NT = TY * RM, TX * RN, TY * TX
    EB = (e + TX - 1) // TX  # Õ columns per thread
    EP = EB * TX  # padded head dim
    EC = 2 * TX if EP % (2 * TX) == 0 and TY % 2 == 0 else TX  # head dims per S chunk
    SEG, RSTEP = EP // EC, NT // EC  # EC-column groups of a row; rows one staging pass covers
    # shared words: S phase: Q chunk (BM, EC + 1), K chunk (BN, EC + 1); PV phase: P (BM, BN + 1),
    # V chunk (VK, EP); row partials (BM, TX + 1) after both
    QO, KO = 0, BM * (EC + 1)
    PO, VO = 0, BM * (BN + 1)
    S_WORDS = KO + BN * (EC + 1)
    M_WORDS = BM * (TX + 1)
    VK = BN  # keys per V chunk: the most that fits 48 KB
    while VK > 1 and (max(S_WORDS, VO + VK * EP) + M_WORDS) * dtype.itemsize > SHARED_BYTES:
        VK //= 2
    MO = max(S_WORDS, VO + VK * EP)
    SMEM = MO + M_WORDS
    # steps per inner-loop iteration, about UNROLL_FMAS FMAs (powers of 2: they divide EC and VK)
    US = min(EC, 1 << max(0, (UNROLL_FMAS // (RM * RN)).bit_length() - 1))
    UV = min(VK, 1 << max(0, (UNROLL_FMAS // (RM * EB)).bit_length() - 1))
    S_TILE, O_TILE = (RM, RN), (RM, EB)
    U = np.uint64
    uE, uEC, uEP = U(e), U(EC), U(EP)
    Q_IT, K_IT, V_IT = (-(-rows // RSTEP) for rows in (BM, BN, VK * SEG))  # staging passes
    zero, one, neg_inf = dtype.type(0), dtype.type(1), dtype.type(-np.inf)
    # float32: exp becomes ex2.approx (error ~1e-7, far inside the float32 tolerance)
    options = {} if cuda_simulated() else {"fastmath": dtype == np.float32}

    @cuda.jit(**options)
    def kernel(q, k, v, out, lse, lq, lk, scale, causal):
        # q, out: (r·lq·e,) and k, v: (r·lk·e,) flat views of (r, l, e); lse: (r·lq,).
        # Block (query tile, head r); signed ints for the logic, unsigned (U) for indices.
        sm = cuda.shared.array(SMEM, dtype)
        s = cuda.local.array(S_TILE, dtype)  # S, then P: rows ty + TY·a, keys j0 + tx + TX·b
        acc = cuda.local.array(O_TILE, dtype)  # Õ: rows ty + TY·a, dims tx + TX·c
        m = cuda.local.array(RM, dtype)  # running row max
        ssum = cuda.local.array(RM, dtype)  # my part of ℓ
        qa = cuda.local.array(RM, dtype)
        kb = cuda.local.array(RN, dtype)
        pa = cuda.local.array(RM, dtype)
        vc = cuda.local.array(EB, dtype)
        offset = lk - lq  # causal: query i sees keys j <= i + offset
        i0 = cuda.blockIdx.x * BM
        tyi, txi = cuda.threadIdx.x // TX, cuda.threadIdx.x % TX
        tid, ty, tx = U(cuda.threadIdx.x), U(tyi), U(txi)
        q_head = U(cuda.blockIdx.y) * U(lq) * uE  # where head r starts in q and out
        k_head = U(cuda.blockIdx.y) * U(lk) * uE  # ... in k and v
        q_row = U(QO) + ty * U(EC + 1)  # my first row of the Q chunk
        k_row = U(KO) + tx * U(EC + 1)  # my first key of the K chunk
        p_row = U(PO) + ty * U(BN + 1)  # my first row of P
        m_row = U(MO) + ty * U(TX + 1)  # my first row of the row partials
        # staging: thread tid copies column c_me of rows s_me + RSTEP·it of each chunk
        c_me, s_me = tid % uEC, tid // uEC
        q_src = q_head + (U(i0) + s_me) * uE  # my first row of the Q chunk, in q
        k_src = k_head + s_me * uE  # ... of the K chunk, in k (plus j0·e)
        q_st = U(QO) + s_me * U(EC + 1) + c_me  # ... in shared memory
        k_st = U(KO) + s_me * U(EC + 1) + c_me
        for a in range(RM):
            m[a] = neg_inf
            ssum[a] = zero
            for c in range(EB):
                acc[a, c] = zero
        j_end = min(lk, min(i0 + BM, lq) + offset) if causal else lk  # keys the last row sees
        for j0 in range(0, j_end, BN):
            # 1. S = (scale·Q_I) K_Jᵀ, EC head dims at a time
            for a in range(RM):
                for b in range(RN):
                    s[a, b] = zero
            for c0 in range(0, EP, EC):
                cuda.syncthreads()  # the previous readers of the buffer are done
                cq = U(c0) + c_me  # my column of the chunk
                for it in range(Q_IT):  # rows s_me + RSTEP·it: fixed offsets, no index math
                    row = s_me + U(it * RSTEP)
                    if Q_IT * RSTEP <= BM or row < U(BM):
                        i = U(i0) + row
                        sm[q_st + U(it * RSTEP * (EC + 1))] = (
                            q[q_src + cq + U(it * RSTEP * e)] * scale
                            if i < U(lq) and cq < uE else zero)
                for it in range(K_IT):
                    col = s_me + U(it * RSTEP)
                    if K_IT * RSTEP <= BN or col < U(BN):
                        j = U(j0) + col
                        sm[k_st + U(it * RSTEP * (EC + 1))] = (
                            k[k_src + U(j0) * uE + cq + U(it * RSTEP * e)]
                            if j < U(lk) and cq < uE else zero)
                cuda.syncthreads()
                for c4 in range(EC // US):
                    c_base = U(c4 * US)
                    for cc in range(US):
                        for a in range(RM):
                            qa[a] = sm[q_row + c_base + U(a * TY * (EC + 1) + cc)]
                        for b in range(RN):
                            kb[b] = sm[k_row + c_base + U(b * TX * (EC + 1) + cc)]
                        for a in range(RM):
                            for b in range(RN):
                                s[a, b] += qa[a] * kb[b]
            # 2. mask; row max across the row's TX threads; P = e^(S - m'); rescale
            for a in range(RM):
                i = i0 + tyi + TY * a
                mx = m[a]
                for b in range(RN):
                    j = j0 + txi + TX * b
                    if j >= lk or (causal and j > i + offset):
                        s[a, b] = neg_inf
                    mx = max(mx, s[a, b])
                sm[m_row + U(a * TY * (TX + 1)) + tx] = mx
            cuda.syncthreads()  # also: the S-phase buffers are free
            for a in range(RM):
                mx = m[a]
                for t in range(TX):
                    mx = max(mx, sm[m_row + U(a * TY * (TX + 1) + t)])
                alpha = math.exp(m[a] - mx)  # 0 on the first tile (m = -inf); m' is finite
                m[a] = mx  # (every row sees key 0, which is in the first tile)
                part = ssum[a] * alpha
                for b in range(RN):
                    p = math.exp(s[a, b] - mx)
                    part += p
                    sm[p_row + U(a * TY * (BN + 1) + b * TX) + tx] = p
                ssum[a] = part
                for c in range(EB):
                    acc[a, c] *= alpha
            # 3. Õ += P V_J, VK keys at a time
            for v0 in range(0, BN, VK):
                if v0 > 0:
                    cuda.syncthreads()  # the previous V chunk is read
                for it in range(V_IT):  # segment s = (key jj, EC-column group cs)
                    seg = s_me + U(it * RSTEP)
                    if V_IT * RSTEP <= VK * SEG or seg < U(VK * SEG):
                        jj, cs = seg // U(SEG), seg % U(SEG)
                        j, cv = U(j0 + v0) + jj, cs * uEC + c_me
                        sm[U(VO) + seg * uEC + c_me] = (v[k_head + j * uE + cv]
                                                         if j < U(lk) and cv < uE else zero)
                cuda.syncthreads()  # the V chunk and P are in place
                for j4 in range(VK // UV):
                    jj = U(v0 + j4 * UV)
                    for cc in range(UV):
                        for a in range(RM):
                            pa[a] = sm[p_row + jj + U(a * TY * (BN + 1) + cc)]
                        for c in range(EB):
                            vc[c] = sm[U(VO) + (jj - U(v0)) * uEP + tx + U(cc * EP + c * TX)]
                        for a in range(RM):
                            for c in range(EB):
                                acc[a, c] += pa[a] * vc[c]
        # ℓ = the sum of the TX parts of each row; out = Õ / ℓ, lse = m + log ℓ
        for a in range(RM):
            sm[m_row + U(a * TY * (TX + 1)) + tx] = ssum[a]
        cuda.syncthreads()
        for a in range(RM):
            i = i0 + tyi + TY * a
            total = zero
            for t in range(TX):
                total += sm[m_row + U(a * TY * (TX + 1) + t)]
            if i < lq:
                inv = one / total
                for c in range(EB):
                    if txi + TX * c < e:
                        out[q_head + U(i) * uE + tx + U(c * TX)] = acc[a, c] * inv
                if txi == 0:
                    lse[U(cuda.blockIdx.y) * U(lq) + U(i)] = m[a] + math.log(total)

    return kernel, BM, NT


def _fwd_cuda(q, k, v, causal, scale):
    rows, lq, e = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(rows, lq, dtype=q.dtype, device=q.device)
    dtype = np.dtype(str(q.dtype).removeprefix("torch."))
    kernel, BM, threads = _attention_kernel(dtype, e)
    grid = ((lq + BM - 1) // BM, rows)
    flat = (x.view(-1) for x in (q, k, v, out, lse))
    launch(kernel, grid, threads, *flat, lq, k.shape[1], dtype.type(scale), causal)
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
