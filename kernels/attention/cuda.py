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
    def kernel(q, k, v, out, lse, onehot, lq, lk, scale, causal):
        # q, out: (r·lq·e,) and k, v: (r·lk·e,) flat views of (r, l, e); lse, onehot: (r·lq,)
        # (onehot = 1 where ℓ = 1 exactly: the backward's ``dfix`` takes those rows).
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
                    finite = m[a] - m[a] == zero
                    lse[U(cuda.blockIdx.y) * U(lq) + U(i)] = (
                        m[a] + math.log(total) if finite else m[a])
                    onehot[U(cuda.blockIdx.y) * U(lq) + U(i)] = 1 if finite and total == one else 0

    return kernel, BM, NT


def _fwd_cuda(q, k, v, causal, scale):
    rows, lq, e = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(rows, lq, dtype=q.dtype, device=q.device)
    onehot = torch.empty(rows, lq, dtype=torch.uint8, device=q.device)
    dtype = numpy_dtype(q.dtype)
    kernel, BM, threads = _attention_kernel(dtype, e)
    grid = ((lq + BM - 1) // BM, rows)
    flat = (x.view(-1) for x in (q, k, v, out, lse, onehot))
    launch(kernel, grid, threads, *flat, lq, k.shape[1], dtype.type(scale), causal)
    return out, lse, onehot


# =============================================================================================
# CUDA backward (numba.cuda): FlashAttention-2's backward (Dao 2023, algorithm 2), register-tiled
# like the forward. First ``ddot``: a thread per query row i forms FlashAttention-2's
# D_i = dO_i·o_i - dlse_i from the saved output (O(l·e), no pass over the keys), as one chain of
# FMAs over the head dims in the order dkv forms each dP_ij = dO_i·v_j: where a row's softmax is
# one-hot (P_ij = 1 at one key, 0 elsewhere) its o_i is v_j to the bit, so dP_ij - D_i = 0 and dS
# cancels exactly, as ref's. Then ``dfix`` re-forms D from the keys for the rows the forward
# flagged (ℓ = 1: the other weights round away in ℓ, but not in dS; ``_dfix_kernel``). Then
# BWD_DQ = "atomic" (the default, measured faster) runs ``dkv_atomic`` only (step D below);
# BWD_DQ = "separate" runs dkv and dq, so that every output has one writer (no atomics):
#   - ``dkv``: a block per (key tile J, head r) walks the query tiles I that see J and keeps
#     dV_J += Pᵀ dO_I and dK_J += dSᵀ Q_I in registers (dk = scale · dK_J at the end);
#   - ``dq``: a block per (query tile I, head r) walks the key tiles J that I sees and keeps
#     dQ_I += dS K_J in registers (dq = scale · dQ_I).
# A block owns BR rows ("own": queries; keys in dkv) and walks the other side BC at a time. It is
# two groups of TY × TX = 64 threads (two warps each: a group never splits a warp). Per walk tile:
#   A. products over chunks of EC head dims staged in padded shared memory: group 0 forms the
#      scores S = (scale·Q_I) K_Jᵀ, group 1 dP = dO_I V_Jᵀ (dkv: Sᵀ and dPᵀ, rows = keys).
#      Thread (ty, tx) of a group owns rows ty + TY·a (a < RM) and columns tx + TX·b (b < RN):
#      per head dim it reads RM + RN values and does RM·RN FMAs in registers (the forward's S
#      step; with one product per group a thread holds one RM x RN tile, not two);
#   B. group 0: P = e^(S - lse) (0 where the key is hidden or past the end) into shared memory;
#      group 1 reads its own entries of P back and forms dS = P ∘ (dP - D), into shared memory
#      (dkv: beside P; dq: over P);
#   C. acc += M Z over chunks of VK walk rows of Z staged in shared memory (the forward's P V
#      step): in dkv group 0 keeps dV_J (M = Pᵀ, Z = dO_I), group 1 dK_J (M = dSᵀ, Z = Q_I),
#      a thread RM keys x EB head dims tx + TX·c; in dq the two groups act as one TY x 2·TX grid
#      keeping dQ_I (M = dS, Z = K_J), a thread RM queries x EB head dims. Per walk row a thread
#      reads RM + EB values and does RM·EB FMAs.
#   D. (dkv_atomic only) dQ_I += dS K_J, FlashAttention-2's way: after C, K_J is staged over step
#      A's buffers, KW keys at a time (all BR at float32's e = 128), and the block as one
#      TYD x TX = 2·TY x TX grid reads dS from the dSᵀ of B (rows by columns: no transpose
#      needed); a thread keeps RMD = BC / TYD queries yd + TYD·a x EB head dims xd + TX·c in
#      registers (the same ``accumulator`` as C, other strides: per key RMD + EB loads, RMD·EB
#      FMAs), then adds scale · its tile into dq with cuda.atomic.add (ptxas makes them REDG:
#      no round trip; float32's also flush subnormal sums to 0). dq is zeroed first; its sums
#      then depend on the order the blocks run (not bit-reproducible run to run).
# A tile pair costs 4 (dkv) + 3 (dq) = 7 products of BR·BC·e FMAs ("separate"), or 5, the
# minimum, and BC·e atomic adds ("atomic"). FMAs per shared load at float32's tiles: dkv's and
# dq's A 2.7 (8 x 4), every C and D 4 (8 x 8); the forward's: 2.7 in its S step, 4 in P V. Reads
# are free of bank conflicts as in the forward: rows padded by one word, and a warp's lanes share
# an address (broadcast) or read distinct banks. Indices are unsigned (np.uint64), as the
# forward's. Why round 1 measured slower than predicted, round 2's prediction and its measure
# (1.69x SDPA's fwd + bwd on the H200): kernels/BENCHMARKS.md, "CUDA backward, round 2".
# =============================================================================================

# (TY, TX, RM, RN, EC) of a product group by itemsize and kernel. float32: dq and dkv hold an
# 8 x 8 accumulator beside their RM x RN tile, so their tiles are 8 x 4 (8 x 8 spilled 16-24
# bytes at 255 registers). Launch bounds cap dq and dkv_atomic at 168 registers (3 blocks of 128
# threads per SM, 12 warps, as the forward), where ptxas (sm_90, e = 128) spills nothing; dkv
# spills 40 bytes there, so it keeps 254 registers (2 blocks). dkv's two accumulators (dV_J,
# dK_J, one per group) of 8 x 8 take TX = 16, hence BR = 32 keys. float64 halves the tiles (and
# runs at 2 blocks: dkv_atomic takes 245 registers). In the simulator: tiny tiles (BR = BC = 4,
# 8 threads) so that tiny tests cross every edge.
CUDA_BWD_TILES = {4: {"dkv": (4, 16, 8, 4, 16), "dq": (8, 8, 8, 4, 16)},
                  8: {"dkv": (4, 16, 4, 4, 8), "dq": (8, 8, 4, 4, 16)}}
# How dq is made: "atomic", added by dkv_atomic with atomics (step D; 5 products a tile pair, not
# 7; dq's float sums then depend on the order the blocks run), the default because it measured
# faster on the H200 (2026-12-05, fwd + bwd at (1, 16, 8192, 128): 136 vs 173 ms, causal 68.7 vs
# 93.5, both with round 1's dsum kernel); "separate", by the dq kernel (bit-reproducible). Read at
# every call.
BWD_DQ = "atomic"
# launch bounds: (itemsize, kind) -> blocks of 128 threads per SM, which caps the registers
CUDA_BWD_BLOCKS_PER_SM = {(4, "dq"): 3, (4, "dkv_atomic"): 3}
DDOT_THREADS = 128  # ddot: query rows (threads) per block; 32 in the simulator
SIMULATOR_BWD_TILES = (2, 2, 2, 2, 2)


@functools.cache
def _ddot_kernel(dtype: np.dtype, e: int):
    """Compile-once (per dtype and head dim) ``ddot`` kernel; returns (kernel, rows a block owns,
    threads): D_i = dO_i·o_i - dlse_i, a thread per query row i."""
    NT = 32 if cuda_simulated() else DDOT_THREADS
    U = np.uint64
    uE = U(e)
    zero = dtype.type(0)

    @cuda.jit
    def ddot(do, out, dlse, D, n):
        # flat views: do, out (n·e,) of (r, lq, e); dlse, D (n,), n = r·lq query rows
        i = cuda.blockIdx.x * NT + cuda.threadIdx.x
        if i < n:
            row = U(i) * uE
            d = zero
            for c in range(e):  # the chain of FMAs of dkv's dP_ij = Σ_c v_jc dO_ic, in its order
                d += do[row + U(c)] * out[row + U(c)]
            D[U(i)] = d - dlse[U(i)]

    return ddot, NT, NT


@functools.cache
def _dfix_kernel(dtype: np.dtype, e: int):
    """Compile-once (per dtype and head dim) ``dfix`` kernel; returns (kernel, rows a block owns,
    threads): D_i of the rows the forward flagged one-hot (ℓ = 1), from the keys.

    There o_i rounds to v_ref (ref = the row's argmax key) although P_i,ref = 1 - δ, δ > 0: D =
    dO·o then drops Σ_j P_ij (dP_ij - dP_i,ref), the very term dS_i,ref = -P (that sum) is made
    of (and carries o's rounding, eps·|dO||v|, into dK and dQ). As Σ_j P_ij = 1,

        D_i = Σ_j P_ij dP_ij - dlse_i = dP_i,ref + Σ_j P_ij (dP_ij - dP_i,ref) - dlse_i

    for any key ref: dP_i,ref by ddot's chain of FMAs (dkv's own bits, so that an exactly
    one-hot row keeps dS = 0 to the bit), the small sum as it stands. A thread per flagged row,
    two passes over the keys it sees (O(lk·e)); other rows return at once."""
    NT = 32 if cuda_simulated() else DDOT_THREADS
    U = np.uint64
    uE = U(e)
    zero, neg_inf = dtype.type(0), dtype.type(-np.inf)

    @cuda.jit(device=True)
    def score(q, k, qrow, krow, scale):
        s = zero
        for c in range(e):
            s += (q[qrow + U(c)] * scale) * k[krow + U(c)]
        return s

    @cuda.jit(device=True)
    def dot(do, v, qrow, krow):  # dP_ij = Σ_c dO_ic v_jc: ddot's chain, in its order
        d = zero
        for c in range(e):
            d += do[qrow + U(c)] * v[krow + U(c)]
        return d

    @cuda.jit
    def dfix(q, k, v, do, lse, dlse, onehot, D, n, lq, lk, scale, causal):
        # flat views: q, do (n·e,) of (r, lq, e); k, v (r·lk·e,); lse, dlse, onehot, D (n,)
        i = cuda.blockIdx.x * NT + cuda.threadIdx.x
        if i >= n or onehot[U(i)] == 0:
            return
        r, qi = i // lq, i % lq
        seen = min(lk, qi + lk - lq + 1) if causal else lk  # keys j < seen are visible
        qrow, head = U(i) * uE, U(r) * U(lk) * uE
        ref, best = 0, neg_inf
        for j in range(seen):
            s = score(q, k, qrow, head + U(j) * uE, scale)
            if s > best:
                ref, best = j, s
        dref = dot(do, v, qrow, head + U(ref) * uE)
        small = zero
        for j in range(seen):
            if j != ref:
                p = math.exp(score(q, k, qrow, head + U(j) * uE, scale) - lse[U(i)])
                small += p * (dot(do, v, qrow, head + U(j) * uE) - dref)
        D[U(i)] = (dref + small) - dlse[U(i)]

    return dfix, NT, NT


def _bwd_tiles(itemsize: int, e: int, kind: str, shared_bytes: int = SHARED_BYTES) -> dict:
    """Tiles and shared-memory layout (in words) of the backward kernel ``kind`` ("dkv", "dq",
    or "dkv_atomic": dkv's tiles, plus step D's) at head dim e; a ValueError when e is too large
    for ``shared_bytes``."""
    dkv = kind in ("dkv", "dkv_atomic")
    TY, TX, RM, RN, EC = (SIMULATOR_BWD_TILES if cuda_simulated()
                          else CUDA_BWD_TILES[itemsize]["dkv" if dkv else kind])
    BR, BC = TY * RM, TX * RN
    TXC = TX if dkv else 2 * TX  # C's grid: dkv, each group's; dq, both as one
    EB = -(-e // TXC)  # accumulator head dims per thread
    NZ = 2 if dkv else 1  # Z chunks of step C: (dO, Q) or K
    A_WORDS = 2 * (BR + BC) * (EC + 1)  # step A: own and walk chunks of both products
    M_WORDS = (2 if dkv else 1) * BR * (BC + 1)  # P (and dS in dkv)
    words = shared_bytes // itemsize
    VK = BC  # walk rows per Z chunk: the most that fits
    while VK > 1 and max(A_WORDS, NZ * VK * EB * TXC) + M_WORDS > words:
        VK //= 2
    MO = max(A_WORDS, NZ * VK * EB * TXC)
    if MO + M_WORDS > words:
        raise ValueError(f"the CUDA attention backward cannot fit head dim e={e} in "
                         f"{shared_bytes} bytes of shared memory")
    T = dict(TY=TY, TX=TX, RM=RM, RN=RN, EC=EC, BR=BR, BC=BC, TXC=TXC, EB=EB, VK=VK, MO=MO,
             SMEM=MO + M_WORDS)
    if kind == "dkv_atomic":  # step D: K_J in chunks of KW keys over step A's buffers [0, MO)
        KW = BR
        while KW > 1 and (BR % KW or KW * EB * TXC > MO):
            KW -= 1
        TYD = 2 * TY  # step D's grid: TYD x TX threads, a thread RMD queries x EB head dims
        if BC % TYD:
            raise ValueError(f"dkv_atomic's step D needs BC = {BC} queries to be a multiple of "
                             f"2·TY = {TYD}")
        T.update(KW=KW, TYD=TYD, RMD=BC // TYD)
    return T


@functools.cache
def _attention_bwd_kernel(dtype: np.dtype, e: int, kind: str):
    """Compile-once (per dtype, head dim and kind: "ddot", "dkv", "dq" or "dkv_atomic") backward
    kernel; returns (kernel, BR rows a block owns, threads)."""
    if kind not in ("ddot", "dkv", "dq", "dkv_atomic"):
        raise ValueError(f"kind must be 'ddot', 'dkv', 'dq' or 'dkv_atomic', got {kind!r}")
    if kind == "ddot":
        return _ddot_kernel(dtype, e)
    T = _bwd_tiles(dtype.itemsize, e, kind)
    TY, TX, RM, RN, EC, BR, BC = (T[x] for x in ("TY", "TX", "RM", "RN", "EC", "BR", "BC"))
    TXC, EB, VK, MO, SMEM = T["TXC"], T["EB"], T["VK"], T["MO"], T["SMEM"]
    G, NT = TY * TX, 2 * TY * TX  # threads per group, per block
    EA = -(-e // EC) * EC  # head dims of step A, padded to whole chunks
    EP = EB * TXC  # head dims of step C, padded
    SEG = EP // TXC  # TXC-column segments of a Z row
    RSTEP, ZSTEP = NT // EC, NT // TXC  # rows (segments) one staging pass covers
    A0, B0 = 0, BR * (EC + 1)  # step A chunks: product 0 own (BR, EC + 1), walk (BC, EC + 1)
    A1, B1 = (BR + BC) * (EC + 1), (2 * BR + BC) * (EC + 1)  # ... product 1
    Z0, Z1 = 0, VK * EP  # step C chunks (VK, EP), over step A's
    PM, DM = MO, MO + BR * (BC + 1)  # P (BR, BC + 1), then dS (dkv)
    IT_R, IT_C = -(-BR // RSTEP), -(-BC // RSTEP)  # staging passes
    US = min(EC, 1 << max(0, (UNROLL_FMAS // (RM * RN)).bit_length() - 1))  # steps/iteration
    ATOMIC = kind == "dkv_atomic"  # dkv with step D: dQ_I += dS K_J added into dq by atomics
    KW, TYD, RMD = (T["KW"], T["TYD"], T["RMD"]) if ATOMIC else (1, 1, 1)
    U = np.uint64
    uE = U(e)
    zero, one = dtype.type(0), dtype.type(1)
    # float32: e^x by ex2.approx (as the forward's fastmath); no other fast-math flag, so that the
    # chains of FMAs stay in order: dP_ij of a one-hot row is ddot's D_i to the bit
    exp = math.exp
    if dtype == np.float32 and not cuda_simulated():
        from numba.cuda import libdevice

        exp = libdevice.fast_expf
    options = {} if cuda_simulated() else {"forceinline": True}
    blocks = None if cuda_simulated() else CUDA_BWD_BLOCKS_PER_SM.get((dtype.itemsize, kind))
    kernel_options = {"launch_bounds": (NT, blocks)} if blocks else {}

    @cuda.jit(device=True, **options)
    def visible(i, j, lq, lk, causal):
        """Whether query i sees key j (both in range; causal: j <= i + lk - lq)."""
        return i < lq and j < lk and not (causal and j > i + lk - lq)

    @cuda.jit(device=True, **options)
    def stage_own(sm, dst, x, src, left, cq, mult):
        """sm[dst + row·(EC + 1)] = mult · x[src + row·e] for this thread's rows of an own chunk
        (0 past ``left`` rows or e columns): rows s_me + RSTEP·it, fixed offsets."""
        s_me = U(cuda.threadIdx.x) // U(EC)
        for it in range(IT_R):
            row = s_me + U(it * RSTEP)
            if IT_R * RSTEP <= BR or row < U(BR):
                sm[dst + U(it * RSTEP * (EC + 1))] = (x[src + U(it * RSTEP * e)] * mult
                                                      if row < left and cq < uE else zero)

    @cuda.jit(device=True, **options)
    def stage_walk(sm, dst, x, src, left, cq, mult):
        """As ``stage_own``, for a walk chunk (BC rows)."""
        s_me = U(cuda.threadIdx.x) // U(EC)
        for it in range(IT_C):
            row = s_me + U(it * RSTEP)
            if IT_C * RSTEP <= BC or row < U(BC):
                sm[dst + U(it * RSTEP * (EC + 1))] = (x[src + U(it * RSTEP * e)] * mult
                                                      if row < left and cq < uE else zero)

    @cuda.jit(device=True, **options)
    def products(sm, t, xa, xb, ya, yb, a_src, b_src, a_left, b_left, a_mult, b_mult):
        """Step A. t = this thread's RM x RN tile of its group's product: group 0 the own rows
        of a_mult·xa times the walk rows of b_mult·xb (transposed), group 1 ya times yb; a_src,
        b_src: where the thread's first staged element lies in x (own, walk), at head dim 0;
        a_left, b_left: own and walk rows left before the end."""
        xr = cuda.local.array(RM, dtype)
        yw = cuda.local.array(RN, dtype)
        tid = U(cuda.threadIdx.x)
        g, lt = tid // U(G), tid % U(G)
        c_me, s_me = tid % U(EC), tid // U(EC)
        a_row = (U(A0) if g == U(0) else U(A1)) + (lt // U(TX)) * U(EC + 1)
        b_row = (U(B0) if g == U(0) else U(B1)) + (lt % U(TX)) * U(EC + 1)
        a_st, b_st = s_me * U(EC + 1) + c_me, s_me * U(EC + 1) + c_me
        for a in range(RM):
            for b in range(RN):
                t[a, b] = zero
        for c0 in range(0, EA, EC):
            cuda.syncthreads()  # the previous readers of the chunks are done
            cq = U(c0) + c_me
            stage_own(sm, U(A0) + a_st, xa, a_src + U(c0), a_left, cq, a_mult)
            stage_walk(sm, U(B0) + b_st, xb, b_src + U(c0), b_left, cq, b_mult)
            stage_own(sm, U(A1) + a_st, ya, a_src + U(c0), a_left, cq, one)
            stage_walk(sm, U(B1) + b_st, yb, b_src + U(c0), b_left, cq, one)
            cuda.syncthreads()
            # [core] backward register tile
            for c4 in range(EC // US):
                c_base = U(c4 * US)
                for cc in range(US):
                    for a in range(RM):
                        xr[a] = sm[a_row + c_base + U(a * TY * (EC + 1) + cc)]
                    for b in range(RN):
                        yw[b] = sm[b_row + c_base + U(b * TX * (EC + 1) + cc)]
                    for a in range(RM):
                        for b in range(RN):
                            t[a, b] += xr[a] * yw[b]
            # [/core]

    def z_stager(rows):
        """Step C (and D): a device function staging a Z chunk of ``rows`` walk rows."""
        IT_Z = -(-rows * SEG // ZSTEP)  # staging passes

        @cuda.jit(device=True, **options)
        def stage_z(sm, dst, z, src, left):
            """sm[dst + jj·EP + col] = z[src + jj·e + col] for this thread's segments of a Z
            chunk (rows x EP head dims; 0 past ``left`` rows or e columns)."""
            tid = U(cuda.threadIdx.x)
            c_me, s_me = tid % U(TXC), tid // U(TXC)
            for it in range(IT_Z):
                seg = s_me + U(it * ZSTEP)
                if IT_Z * ZSTEP <= rows * SEG or seg < U(rows * SEG):
                    jj, col = seg // U(SEG), (seg % U(SEG)) * U(TXC) + c_me
                    sm[dst + seg * U(TXC) + c_me] = (z[src + jj * uE + col]
                                                      if jj < left and col < uE else zero)

        return stage_z

    def accumulator(R, r_step, w_step, W):
        """Step C (and D): a device function doing acc[a, c] += Σ_w M[a, w] Z[w, c] over a Z
        chunk of W walk rows, for a < R, c < EB: M[a, w] = sm[m_row + a·r_step + w·w_step],
        Z[w, c] = sm[z_col + w·EP + c·TXC]."""
        UW = min(W, 1 << max(0, (UNROLL_FMAS // (R * EB)).bit_length() - 1))  # w per iteration
        while W % UW:
            UW //= 2

        @cuda.jit(device=True, **options)
        def accumulate(sm, acc, m_row, z_col):
            ma = cuda.local.array(R, dtype)
            zc = cuda.local.array(EB, dtype)
            for w4 in range(W // UW):
                m_w, z_w = m_row + U(w4 * UW * w_step), z_col + U(w4 * UW * EP)
                for ww in range(UW):
                    for a in range(R):
                        ma[a] = sm[m_w + U(ww * w_step + a * r_step)]
                    for c in range(EB):
                        zc[c] = sm[z_w + U(ww * EP + c * TXC)]
                    for a in range(R):
                        for c in range(EB):
                            acc[a, c] += ma[a] * zc[c]

        return accumulate

    # step C: M's rows a (stride TY·(BC + 1)) by walk rows (stride 1), VK walk rows a chunk;
    # step D: dS = (dSᵀ)ᵀ, query rows a (stride TYD) by keys (stride BC + 1), KW keys a chunk
    stage_z, accumulate = z_stager(VK), accumulator(RM, TY * (BC + 1), 1, VK)
    stage_k, accumulate_d = z_stager(KW), accumulator(RMD, TYD, BC + 1, KW)

    if kind == "dq":

        @cuda.jit(**kernel_options)
        def dq(q, do, lse, D, k, v, dq_out, lq, lk, scale, causal):
            # flat views: q, do, dq_out (r·lq·e,); k, v (r·lk·e,); lse, D (r·lq,).
            # Block (query tile I, head r): dQ_I = Σ_J dS K_J
            sm = cuda.shared.array(SMEM, dtype)
            t = cuda.local.array((RM, RN), dtype)  # group 0: S; group 1: dP
            c_r = cuda.local.array(RM, dtype)  # group 0: lse of my rows; group 1: D
            acc = cuda.local.array((RM, EB), dtype)  # dQ_I: rows yc + TY·a, dims xc + TXC·c
            tid = U(cuda.threadIdx.x)
            g = tid // U(G)
            tyi, txi = (cuda.threadIdx.x % G) // TX, cuda.threadIdx.x % TX  # signed, for logic
            ty, tx = U(tyi), U(txi)
            yci = cuda.threadIdx.x // TXC  # step C's grid
            yc, xc = U(yci), tid % U(TXC)
            r, i0 = cuda.blockIdx.y, cuda.blockIdx.x * BR
            q_head, k_head = U(r) * U(lq) * uE, U(r) * U(lk) * uE
            c_me, s_me = tid % U(EC), tid // U(EC)
            p_row = U(PM) + ty * U(BC + 1)
            for a in range(RM):
                i = i0 + tyi + TY * a
                c_r[a] = (lse[U(r * lq + i)] if g == U(0) else D[U(r * lq + i)]) if i < lq else zero
                for c in range(EB):
                    acc[a, c] = zero
            j_end = min(lk, min(i0 + BR, lq) + lk - lq) if causal else lk
            for j0 in range(0, j_end, BC):
                products(sm, t, q, k, do, v, q_head + (U(i0) + s_me) * uE + c_me,
                         k_head + (U(j0) + s_me) * uE + c_me, U(lq - i0), U(lk - j0), scale, one)
                if g == U(0):  # P = e^(S - lse)
                    for a in range(RM):
                        i = i0 + tyi + TY * a
                        for b in range(RN):
                            j = j0 + txi + TX * b
                            sm[p_row + U(a * TY * (BC + 1) + b * TX) + tx] = (
                                exp(t[a, b] - c_r[a]) if visible(i, j, lq, lk, causal) else zero)
                cuda.syncthreads()
                if g == U(1):  # dS = P (dP - D), over P
                    for a in range(RM):
                        i = i0 + tyi + TY * a
                        for b in range(RN):
                            j = j0 + txi + TX * b
                            at = p_row + U(a * TY * (BC + 1) + b * TX) + tx
                            sm[at] = (sm[at] * (t[a, b] - c_r[a])
                                      if visible(i, j, lq, lk, causal) else zero)
                # dQ_I += dS K_J, VK keys at a time
                for v0 in range(0, BC, VK):
                    cuda.syncthreads()  # dS is in place; the previous K chunk is read
                    stage_z(sm, U(Z0), k, k_head + U(j0 + v0) * uE, U(max(0, lk - j0 - v0)))
                    cuda.syncthreads()
                    accumulate(sm, acc, U(PM + v0) + yc * U(BC + 1), U(Z0) + xc)
            for a in range(RM):
                i = i0 + yci + TY * a
                if i < lq:
                    for c in range(EB):
                        col = xc + U(c * TXC)
                        if col < uE:
                            dq_out[q_head + U(i) * uE + col] = acc[a, c] * scale

        return dq, BR, NT

    @cuda.jit(**kernel_options)
    def dkv(q, do, lse, D, k, v, dk, dv, dq_out, lq, lk, scale, causal):
        # flat views: q, do, dq_out (r·lq·e,); k, v, dk, dv (r·lk·e,); lse, D (r·lq,).
        # Block (key tile J, head r): dV_J = Σ_I Pᵀ dO_I (group 0), dK_J = Σ_I dSᵀ Q_I (group 1);
        # dkv_atomic also adds scale · dS K_J into dq_out (zeroed by the caller) per tile I
        sm = cuda.shared.array(SMEM, dtype)
        t = cuda.local.array((RM, RN), dtype)  # group 0: Sᵀ; group 1: dPᵀ
        c_c = cuda.local.array(RN, dtype)  # group 0: lse of my columns (queries); group 1: D
        acc = cuda.local.array((RM, EB), dtype)  # group 0: dV_J, group 1: dK_J; dims tx + TX·c
        dacc = cuda.local.array((RMD, EB), dtype)  # step D: dQ_I's part, rows yd + TYD·a
        tid = U(cuda.threadIdx.x)
        yd, xd = tid // U(TX), tid % U(TX)  # step D's grid: TYD x TX
        g = tid // U(G)
        tyi, txi = (cuda.threadIdx.x % G) // TX, cuda.threadIdx.x % TX  # signed, for logic
        ty, tx = U(tyi), U(txi)
        r, j0 = cuda.blockIdx.y, cuda.blockIdx.x * BR
        q_head, k_head = U(r) * U(lq) * uE, U(r) * U(lk) * uE
        c_me, s_me = tid % U(EC), tid // U(EC)
        p_row = U(PM) + ty * U(BC + 1)
        m_row = (U(PM) if g == U(0) else U(DM)) + ty * U(BC + 1)  # step C: Pᵀ or dSᵀ
        z_col = (U(Z0) if g == U(0) else U(Z1)) + tx  # ... dO_I or Q_I
        for a in range(RM):
            for c in range(EB):
                acc[a, c] = zero
        i_first = (max(0, j0 - (lk - lq)) // BC) * BC if causal else 0  # queries that see J
        for i0 in range(i_first, lq, BC):
            products(sm, t, k, q, v, do, k_head + (U(j0) + s_me) * uE + c_me,
                     q_head + (U(i0) + s_me) * uE + c_me, U(lk - j0), U(lq - i0), one, scale)
            for b in range(RN):
                i = i0 + txi + TX * b
                c_c[b] = (lse[U(r * lq + i)] if g == U(0) else D[U(r * lq + i)]) if i < lq else zero
            if g == U(0):  # Pᵀ = e^(Sᵀ - lse)
                for a in range(RM):
                    j = j0 + tyi + TY * a
                    for b in range(RN):
                        i = i0 + txi + TX * b
                        sm[p_row + U(a * TY * (BC + 1) + b * TX) + tx] = (
                            exp(t[a, b] - c_c[b]) if visible(i, j, lq, lk, causal) else zero)
            cuda.syncthreads()
            if g == U(1):  # dSᵀ = Pᵀ (dPᵀ - D), beside Pᵀ
                for a in range(RM):
                    j = j0 + tyi + TY * a
                    for b in range(RN):
                        i = i0 + txi + TX * b
                        at = p_row + U(a * TY * (BC + 1) + b * TX) + tx
                        sm[at + U(DM - PM)] = (sm[at] * (t[a, b] - c_c[b])
                                               if visible(i, j, lq, lk, causal) else zero)
            # dV_J += Pᵀ dO_I (group 0), dK_J += dSᵀ Q_I (group 1), VK queries at a time
            for v0 in range(0, BC, VK):
                cuda.syncthreads()  # dSᵀ is in place; the previous chunks are read
                stage_z(sm, U(Z0), do, q_head + U(i0 + v0) * uE, U(max(0, lq - i0 - v0)))
                stage_z(sm, U(Z1), q, q_head + U(i0 + v0) * uE, U(max(0, lq - i0 - v0)))
                cuda.syncthreads()
                accumulate(sm, acc, m_row + U(v0), z_col)
            if ATOMIC:  # D. dQ_I += scale · dS K_J: K_J staged KW keys at a time, then atomics
                for a in range(RMD):
                    for c in range(EB):
                        dacc[a, c] = zero
                for w0 in range(0, BR, KW):
                    cuda.syncthreads()  # step C's (or the previous K chunk's) readers are done
                    stage_k(sm, U(Z0), k, k_head + U(j0 + w0) * uE, U(max(0, lk - j0 - w0)))
                    cuda.syncthreads()
                    accumulate_d(sm, dacc, U(DM + w0 * (BC + 1)) + yd, U(Z0) + xd)
                for a in range(RMD):
                    i = U(i0 + TYD * a) + yd
                    if i < U(lq):
                        for c in range(EB):
                            col = xd + U(c * TX)
                            if col < uE:
                                cuda.atomic.add(dq_out, q_head + i * uE + col, dacc[a, c] * scale)
        for a in range(RM):
            j = j0 + tyi + TY * a
            if j < lk:
                for c in range(EB):
                    col = tx + U(c * TX)
                    if col < uE:
                        if g == U(0):
                            dv[k_head + U(j) * uE + col] = acc[a, c]
                        else:
                            dk[k_head + U(j) * uE + col] = acc[a, c] * scale

    return dkv, BR, NT


def _bwd_cuda(q, k, v, out, lse, g_out, g_lse, causal, scale, onehot):
    """As ``cpu._bwd_cpu``: q, out, g_out (r, lq, e); k, v (r, lk, e); lse, g_lse, onehot (the
    forward's flags) (r, lq); contiguous, lq >= 1 -> dq (r, lq, e), dk, dv (r, lk, e). D by ddot,
    and by dfix for the one-hot rows; then dq by the dq kernel, or added by dkv_atomic with
    atomics when the module's BWD_DQ is "atomic"."""
    if BWD_DQ not in ("separate", "atomic"):
        raise ValueError(f"BWD_DQ must be 'separate' or 'atomic', got {BWD_DQ!r}")
    atomic = BWD_DQ == "atomic"
    rows, lq, e = q.shape
    lk = k.shape[1]
    dtype = numpy_dtype(q.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if atomic:
        dq.zero_()  # dkv_atomic adds every key tile's scale · dS K_J into it
    D = torch.empty_like(lse)  # (r, lq): dO_i·o_i - dlse_i
    s = dtype.type(scale)
    q, g_out, lse, g_lse, k, v = (x.view(-1) for x in (q, g_out, lse, g_lse, k, v))
    kernel, BR, threads = _attention_bwd_kernel(dtype, e, "ddot")
    launch(kernel, (-(-rows * lq // BR),), threads, g_out, out.reshape(-1), g_lse, D.view(-1),
           rows * lq)
    kernel, BR, threads = _dfix_kernel(dtype, e)
    launch(kernel, (-(-rows * lq // BR),), threads, q, k, v, g_out, lse, g_lse, onehot.view(-1),
           D.view(-1), rows * lq, lq, lk, s, causal)
    kernel, BR, threads = _attention_bwd_kernel(dtype, e, "dkv_atomic" if atomic else "dkv")
    launch(kernel, (-(-lk // BR), rows), threads, q, g_out, lse, D.view(-1), k, v, dk.view(-1),
           dv.view(-1), dq.view(-1), lq, lk, s, causal)
    if not atomic:
        kernel, BR, threads = _attention_bwd_kernel(dtype, e, "dq")
        launch(kernel, (-(-lq // BR), rows), threads, q, g_out, lse, D.view(-1), k, v,
               dq.view(-1), lq, lk, s, causal)
    return dq, dk, dv
