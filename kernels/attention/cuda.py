"""Attention's CUDA kernel (numba.cuda), FlashAttention on the CUDA cores, and its host
launcher, the only place that knows grid and block. The equations and the glossary:
kernels/attention/__init__.py."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import numpy_dtype

# =============================================================================================
# Constants
# =============================================================================================

# CUDA: static shared memory per block (the tiles are in ``_attention_kernel``).
SHARED_BYTES = 48 * 1024


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
                # [core] register tile
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
                # [/core]
            # [core] softmax step
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
                m_old = m[a]
                m[a] = mx  # -inf while the row has seen only -inf scores; then subtract 0:
                if mx == neg_inf:  # p = alpha = e^-inf = 0 (as ref's), not e^(-inf + inf) = nan
                    mx = zero
                alpha = math.exp(m_old - mx)  # 0 on the row's first finite tile (m = -inf)
                part = ssum[a] * alpha
                for b in range(RN):
                    p = math.exp(s[a, b] - mx)
                    part += p
                    sm[p_row + U(a * TY * (BN + 1) + b * TX) + tx] = p
                ssum[a] = part
                for c in range(EB):
                    acc[a, c] *= alpha
            # [/core]
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
                if txi == 0:  # m = ±inf (no finite max): ℓ = 0 or nan, lse = m as ref's
                    lse[U(cuda.blockIdx.y) * U(lq) + U(i)] = (
                        m[a] + math.log(total) if m[a] - m[a] == zero else m[a])

    return kernel, BM, NT


def _fwd_cuda(q, k, v, causal, scale):
    rows, lq, e = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(rows, lq, dtype=q.dtype, device=q.device)
    dtype = numpy_dtype(q.dtype)
    kernel, BM, threads = _attention_kernel(dtype, e)
    grid = ((lq + BM - 1) // BM, rows)
    flat = (x.view(-1) for x in (q, k, v, out, lse))
    launch(kernel, grid, threads, *flat, lq, k.shape[1], dtype.type(scale), causal)
    return out, lse


# =============================================================================================
# CUDA backward (numba.cuda): FlashAttention-2's backward (Dao 2023, algorithm 2) in two
# kernels, so that every output has one writer and no atomics are needed:
#   - ``dkv``: a block per (key tile J of B keys, head r) keeps K_J, V_J in shared memory and
#     walks the query tiles I that see J: it stages scale·Q_I, dO_I, lse_I, D_I, forms the
#     B x B tiles P = e^(S - lse) and dS = P ∘ (dP - D) (S = scale·Q_I K_Jᵀ, dP = dO_I V_Jᵀ) in
#     shared memory, and each thread adds its entries of dV_J += Pᵀ dO_I, dK_J += dSᵀ Q_I;
#   - ``dq``: a block per (query tile I, head r) keeps scale·Q_I, dO_I in shared memory, walks
#     the key tiles J that I sees, forms dS the same way and adds dQ_I += dS K_J (times scale);
#   - first, ``dsum``: a block per (query tile I, head r) forms D_i = Σ_j P_ij dP_ij - dlse_i
#     from the same P and dP (the same device function), not FlashAttention-2's dO_i·o_i:
#     kernels/attention/cpu.py says why (a one-hot row's dS must cancel to 0, as ref's).
# S and dS are recomputed by both (seven B·B·e products per tile pair instead of five): the
# price of having no atomics. Thread t owns the entries t + NT·u of the B x B tile (consecutive
# threads, consecutive keys: K and V rows are padded to an odd stride, so no bank conflicts) and
# of its block's (B, e) accumulator (consecutive head dims). Simple, not register-tiled like the
# forward: correct, tiled, not yet timed on a GPU.
# =============================================================================================

SIMULATOR_BWD_TILE = (4, 16)  # (B, threads): tiny tiles so that tiny tests cross every edge


def _bwd_tile(itemsize: int, e: int) -> tuple[int, int, int]:
    """(B, threads, odd row stride) of the backward kernels: the largest B <= 64 whose shared
    tiles (4 of (B, e) + 2 of (B, B) + a row) fit SHARED_BYTES."""
    es = e if e % 2 else e + 1
    if cuda_simulated():
        B, NT = SIMULATOR_BWD_TILE
        return B, NT, es
    B = 64
    while B > 1 and (4 * B * es + 2 * B * (B + 1) + B) * itemsize > SHARED_BYTES:
        B //= 2
    if (4 * B * es + 2 * B * (B + 1) + B) * itemsize > SHARED_BYTES:
        raise ValueError(f"the CUDA attention backward needs a head dim e <= "
                         f"{SHARED_BYTES // (4 * itemsize) - 6}, got e={e}")
    return B, min(256, max(32, B * B)), es


@functools.cache
def _attention_bwd_kernels(dtype: np.dtype, e: int):
    """Compile-once (per dtype and head dim) backward kernels; returns (dsum, dkv, dq, B,
    threads)."""
    B, NT, ES = _bwd_tile(dtype.itemsize, e)
    QO, DOO, KO, VO = 0, B * ES, 2 * B * ES, 3 * B * ES  # shared: (B, ES) tiles
    PO = 4 * B * ES  # P (B, B + 1)
    SO = PO + B * (B + 1)  # dS (B, B + 1)
    LO = SO + B * (B + 1)  # lse (B,)
    SMEM = LO + B
    NE = -(-B * B // NT)  # tile entries per thread
    NA = -(-B * e // NT)  # accumulator entries per thread
    NR = -(-B // NT)  # per-row values per thread
    zero, one, inf = dtype.type(0), dtype.type(1), dtype.type(np.inf)

    @cuda.jit(device=True)
    def stage_rows(sm, off, x, r, i0, n, scale_by):
        """sm[off + ii·ES + c] = scale_by · x[r, i0 + ii, c] (0 past n rows)."""
        tid = cuda.threadIdx.x
        for u in range(NA):
            idx = tid + NT * u
            if idx < B * e:
                ii, c = idx // e, idx % e
                i = i0 + ii
                sm[off + ii * ES + c] = x[r, i, c] * scale_by if i < n else zero

    @cuda.jit(device=True)
    def scores(sm, D, r, i0, j0, lq, lk, causal, mode):
        """B x B tiles of queries i0.., keys j0.. in shared: mode 0, P ∘ dP (at SO); 1, P (at
        PO) and dS (at SO); 2, dS."""
        tid = cuda.threadIdx.x
        offset = lk - lq
        for u in range(NE):
            idx = tid + NT * u
            if idx < B * B:
                ii, jj = idx // B, idx % B
                i, j = i0 + ii, j0 + jj
                p = zero
                ds = zero
                if i < lq and j < lk and not (causal and j > i + offset):
                    s = zero
                    dp = zero
                    for c in range(e):
                        s += sm[QO + ii * ES + c] * sm[KO + jj * ES + c]
                        dp += sm[DOO + ii * ES + c] * sm[VO + jj * ES + c]
                    p = math.exp(s - sm[LO + ii])
                    ds = p * dp if mode == 0 else p * (dp - D[r, i])
                if mode == 1:
                    sm[PO + ii * (B + 1) + jj] = p
                sm[SO + ii * (B + 1) + jj] = ds

    @cuda.jit(device=True)
    def stage_query_side(sm, q, do, lse, r, i0, lq, scale):
        stage_rows(sm, QO, q, r, i0, lq, scale)
        stage_rows(sm, DOO, do, r, i0, lq, one)
        for u in range(NR):
            ii = cuda.threadIdx.x + NT * u
            if ii < B:
                i = i0 + ii
                sm[LO + ii] = lse[r, i] if i < lq else inf

    @cuda.jit
    def dkv(q, do, lse, D, k, v, dk, dv, lq, lk, scale, causal):
        # q, do: (r, lq, e); lse, D: (r, lq); k, v, dk, dv: (r, lk, e). Block (key tile, head)
        sm = cuda.shared.array(SMEM, dtype)
        acc_k = cuda.local.array(NA, dtype)
        acc_v = cuda.local.array(NA, dtype)
        r, j0, tid = cuda.blockIdx.y, cuda.blockIdx.x * B, cuda.threadIdx.x
        stage_rows(sm, KO, k, r, j0, lk, one)
        stage_rows(sm, VO, v, r, j0, lk, one)
        for u in range(NA):
            acc_k[u] = zero
            acc_v[u] = zero
        i_first = (max(0, j0 - (lk - lq)) // B) * B if causal else 0  # queries that see J
        for i0 in range(i_first, lq, B):
            cuda.syncthreads()  # the previous query tile is read
            stage_query_side(sm, q, do, lse, r, i0, lq, scale)
            cuda.syncthreads()
            scores(sm, D, r, i0, j0, lq, lk, causal, 1)
            cuda.syncthreads()
            for u in range(NA):  # dV_J += Pᵀ dO_I, dK_J += dSᵀ (scale·Q_I)
                idx = tid + NT * u
                if idx < B * e:
                    jj, c = idx // e, idx % e
                    av = acc_v[u]
                    ak = acc_k[u]
                    for ii in range(B):
                        av += sm[PO + ii * (B + 1) + jj] * sm[DOO + ii * ES + c]
                        ak += sm[SO + ii * (B + 1) + jj] * sm[QO + ii * ES + c]
                    acc_v[u] = av
                    acc_k[u] = ak
        for u in range(NA):
            idx = tid + NT * u
            if idx < B * e:
                jj, c = idx // e, idx % e
                if j0 + jj < lk:
                    dk[r, j0 + jj, c] = acc_k[u]
                    dv[r, j0 + jj, c] = acc_v[u]

    @cuda.jit
    def dq(q, do, lse, D, k, v, dq_out, lq, lk, scale, causal):
        # as dkv, dq_out: (r, lq, e). Block (query tile, head)
        sm = cuda.shared.array(SMEM, dtype)
        acc = cuda.local.array(NA, dtype)
        r, i0, tid = cuda.blockIdx.y, cuda.blockIdx.x * B, cuda.threadIdx.x
        stage_query_side(sm, q, do, lse, r, i0, lq, scale)
        for u in range(NA):
            acc[u] = zero
        j_end = min(lk, min(i0 + B, lq) + lk - lq) if causal else lk  # keys the last row sees
        for j0 in range(0, j_end, B):
            cuda.syncthreads()  # the previous key tile is read
            stage_rows(sm, KO, k, r, j0, lk, one)
            stage_rows(sm, VO, v, r, j0, lk, one)
            cuda.syncthreads()
            scores(sm, D, r, i0, j0, lq, lk, causal, 2)
            cuda.syncthreads()
            for u in range(NA):  # dQ_I += dS K_J
                idx = tid + NT * u
                if idx < B * e:
                    ii, c = idx // e, idx % e
                    a = acc[u]
                    for jj in range(B):
                        a += sm[SO + ii * (B + 1) + jj] * sm[KO + jj * ES + c]
                    acc[u] = a
        for u in range(NA):
            idx = tid + NT * u
            if idx < B * e:
                ii, c = idx // e, idx % e
                if i0 + ii < lq:
                    dq_out[r, i0 + ii, c] = acc[u] * scale

    @cuda.jit
    def dsum(q, do, lse, dlse, k, v, D, lq, lk, scale, causal):
        # as dq; dlse, D: (r, lq). Block (query tile, head); thread ii < B sums row ii
        sm = cuda.shared.array(SMEM, dtype)
        r, i0, tid = cuda.blockIdx.y, cuda.blockIdx.x * B, cuda.threadIdx.x
        stage_query_side(sm, q, do, lse, r, i0, lq, scale)
        acc = zero
        j_end = min(lk, min(i0 + B, lq) + lk - lq) if causal else lk
        for j0 in range(0, j_end, B):
            cuda.syncthreads()
            stage_rows(sm, KO, k, r, j0, lk, one)
            stage_rows(sm, VO, v, r, j0, lk, one)
            cuda.syncthreads()
            scores(sm, D, r, i0, j0, lq, lk, causal, 0)
            cuda.syncthreads()
            if tid < B:
                for jj in range(B):
                    acc += sm[SO + tid * (B + 1) + jj]
        if tid < B and i0 + tid < lq:
            D[r, i0 + tid] = acc - dlse[r, i0 + tid]

    return dsum, dkv, dq, B, NT


def _bwd_cuda(q, k, v, out, lse, g_out, g_lse, causal, scale):
    """As ``cpu._bwd_cpu``: q, out, g_out (r, lq, e); k, v (r, lk, e); lse, g_lse (r, lq);
    contiguous, lq >= 1 -> dq (r, lq, e), dk, dv (r, lk, e)."""
    rows, lq, e = q.shape
    lk = k.shape[1]
    dtype = numpy_dtype(q.dtype)
    dsum, dkv, dq_kernel, B, threads = _attention_bwd_kernels(dtype, e)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    D = torch.empty_like(lse)  # (r, lq): Σ_j P_ij dP_ij - dlse_i
    s = dtype.type(scale)
    launch(dsum, ((lq + B - 1) // B, rows), threads, q, g_out, lse, g_lse, k, v, D, lq, lk, s,
           causal)
    launch(dkv, ((lk + B - 1) // B, rows), threads, q, g_out, lse, D, k, v, dk, dv, lq, lk, s,
           causal)
    launch(dq_kernel, ((lq + B - 1) // B, rows), threads, q, g_out, lse, D, k, v, dq, lq, lk, s,
           causal)
    return dq, dk, dv
