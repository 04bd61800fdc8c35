"""Neighbourhood attention's CUDA kernels (numba.cuda) and their host launchers, the only place
that knows grid and block. The equations and the glossary: kernels/natten/__init__.py."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import numpy_dtype

# =============================================================================================
# Constants
# =============================================================================================

# CUDA forward: a block is THREAD_ROWS x TILE threads; thread (tr, tc) owns tile column tc and
# QPT vertically adjacent query rows (``_tiles``). In the simulator: small blocks, so that tiny
# tests cross every tile edge.
TILE = 4 if cuda_simulated() else 16  # the tile's width: one column of queries per lane
THREAD_ROWS = 2 if cuda_simulated() else 4
THREADS = TILE * THREAD_ROWS
E_CHUNK = 4 if cuda_simulated() else 16  # head dims staged at a time, at most (a power of 2)
STAGE_ROWS = 2 if cuda_simulated() else 8  # rows of a halo or tile one staging step copies
MAX_KERNEL = 13  # CUDA: the largest window side (a thread's scores live in its registers)
SCORE_REGISTERS = 112  # the scores a thread may hold: QPT is the largest that fits (``_tiles``)
SHARED_BYTES = 48 * 1024  # static shared memory per block
FWD_BLOCKS_PER_SM = {4: 3, 8: 2}  # the forward's launch bound per itemsize: blocks of THREADS
# per SM that the registers must allow (at 64 threads both leave ptxas its 255 registers)
BWD_THREADS = 8 if cuda_simulated() else 128  # CUDA backward: queries per block
INLINE = {} if cuda_simulated() else {"forceinline": True}  # (the simulator has no such option)


# =============================================================================================
# CUDA forward (numba.cuda). One block = one head r and a tile of TR x TILE queries; one kernel
# per (dtype, K, e), so every loop over the window and over the head dims has a compile-time
# trip count, LLVM unrolls the window loops, a thread's scores are registers (never local
# memory), and every global or shared address in the staging is a per-lane base plus an
# immediate offset.
#   - Thread (tr, tc) owns the QPT queries (i + u, j), u < QPT, of one column: i = i0 + QPT·tr,
#     j = j0 + tc. Their windows share columns ρ(j) .. ρ(j) + K − 1 and their rows lie within
#     ρ(i) .. ρ(i) + K + QPT − 2 (a window starts at most one row lower per query row). So per
#     head dim the thread reads (K + QPT − 1)·K keys and QPT queries from shared memory and does
#     up to QPT·K² useful FMAs: 105 FMAs per 58 loads at K = 7 (QPT = 2), against one per load
#     with a query per thread. Query u scores all K + u rows it may see (rows t < K + u); the
#     u rows outside its window (t < δ_u or t ≥ δ_u + K, δ_u = ρ(i + u) − ρ(i)) are set to −∞
#     before the softmax, so their weights are exactly 0: no branch on δ_u in the inner loops.
#   - The windows of the tile lie inside one halo of (TR + K − 1) x (TILE + K − 1) pixels. The
#     block stages the halo of k (then of v) and the tile of scale·q in shared memory, EC head
#     dims at a time (EC divides e: no partial chunk), coalesced: lane dl = tid % EC copies head
#     dim dl of pixel columns slot + SLOTS·st, STAGE_ROWS rows per step, all the step's loads in
#     flight before its stores. A lane's global address is its base (computed once) + row·W·e
#     + a compile-time offset; loads outside the image are not made (predicated) and store 0,
#     so every halo value a thread may read is written each chunk and finite, and a weight of 0
#     contributes exactly 0.
#   - S = (scale·q) kᵀ accumulates over the chunks in registers; the softmax runs in registers;
#     then O = P v, EC dims at a time: each thread's outputs go through the tile buffer, which
#     the block writes out coalesced.
# Bank conflicts: a pixel takes EC + 1 words (odd) and a halo row RS pixels with QPT·RS ≡ 16
# (mod 32): the 16 lanes of a thread row read 16 banks and the next thread row the other 16.
# Every index into an array is unsigned (np.uint64): Numba guards signed indices with a
# negative-index test. Tiles of 8 x 16 queries, 64 threads (THREAD_ROWS = 4): ptxas takes 249
# registers in float32 (K = 7, e = 64) and no local memory, so 4 blocks = 8 warps share an SM
# (registers), and none of the staging's instructions spill.
# Why (round 2, kernels/BENCHMARKS.md, natten): round 1 measured 1.52 ms against a predicted
# 0.35-0.45. Its SASS spent ~22 instructions per staged word (clamped 64-bit addresses), so
# staging and write-out issued as many instructions as the FMA loops (~47 K per warp in all),
# at 254 registers (8 warps per SM): ~1 instruction per clock per SM, latency-bound. Now e is a
# compile-time constant, addresses are a per-lane base + immediates (~12 instructions per
# staged word, ~37 K per warp); timed at 0.553 ms on an H100 (16 x 16 tiles, 168 registers, 12
# warps per SM). Round 3 (a sweep of tiles, launch bounds and chunks on an H100): 8 x 16 tiles
# of 64 threads at 249 registers, 0.478 ms: fewer queries per block stage a halo that is
# larger per query (22 x 14 pixels per 128 queries, not 22 x 22 per 256), but a block's
# barriers then stall 2 warps, not 4, and 4 blocks per SM overlap each other's staging.
# =============================================================================================


class _Tiles(NamedTuple):
    qpt: int  # queries per thread (adjacent rows of one column)
    rows: int  # TR: the tile's rows of queries
    halo_rows: int  # HR = TR + K − 1
    halo_cols: int  # HC = TILE + K − 1
    halo_stride: int  # RS: pixels per halo row in shared memory (> HC: padded)
    tile_stride: int  # TS: pixels per row of the tile buffer (> TILE: padded)
    chunk: int  # EC: head dims staged at a time (a power of 2 that divides e)
    shared_words: int


def _padded(n: int, qpt: int) -> int:
    """The first row stride > n (in pixels of an odd number of words) for which two thread
    rows QPT image rows apart read opposite halves of the 32 banks: QPT·stride ≡ 16 (mod 32)."""
    stride = n + 1
    while not cuda_simulated() and (qpt * stride) % 32 != 16:
        stride += 1
    return stride


@functools.cache
def _tiles(K: int, e: int, itemsize: int) -> _Tiles:
    """The forward's tiles for window side K and head dim e: QPT as large as SCORE_REGISTERS
    allows (query u of a thread holds (K + u)·K scores), then the largest chunk EC that divides
    e, is at most E_CHUNK and fits SHARED_BYTES."""
    qpt = next(n for n in (4, 2, 1)
               if n * K * K + K * n * (n - 1) // 2 <= SCORE_REGISTERS or n == 1)
    rows = THREAD_ROWS * qpt
    halo_rows, halo_cols = rows + K - 1, TILE + K - 1
    rs, ts = _padded(halo_cols, qpt), _padded(TILE, qpt)
    pixels = _rounded(halo_rows) * rs + _rounded(rows) * ts  # (room for whole staging steps)
    chunk = E_CHUNK
    while chunk > 1 and (e % chunk or pixels * (chunk + 1) * itemsize > SHARED_BYTES):
        chunk //= 2
    return _Tiles(qpt, rows, halo_rows, halo_cols, rs, ts, chunk, pixels * (chunk + 1))


def _rounded(rows: int) -> int:
    """rows rounded up to whole staging steps of STAGE_ROWS."""
    return -(-rows // STAGE_ROWS) * STAGE_ROWS


@functools.cache
def _forward_kernel(dtype: np.dtype, K: int, e: int):
    """Compile-once (per dtype, window side K and head dim e) forward kernel."""
    QPT, TR, HR, HC, RS, TS, EC, SMEM = _tiles(K, e, dtype.itemsize)
    G = STAGE_ROWS
    PS = EC + 1  # words per pixel in shared memory (odd: no bank conflicts)
    KR = K + QPT - 1  # key rows a thread reads
    NS = QPT * KR * K  # score slots: query u, key row t, column c at (u·KR + t)·K + c
    HALF = K // 2
    TILE0 = _rounded(HR) * RS * PS  # where the tile buffer (scale·q, then the output) starts
    SLOTS = THREADS // EC  # staging: lane dl = tid % EC copies head dim dl of pixel columns
    HALO_IT = -(-HC // SLOTS)  # slot + SLOTS·st, st < HALO_IT (halo) or TILE_IT (tile)
    TILE_IT = -(-TILE // SLOTS)
    BUF = G * max(HALO_IT, TILE_IT)  # values one staging step has in flight
    nd = EC  # head dims per chunk (every chunk is whole)
    U = np.uint64
    zero, one, ninf = dtype.type(0), dtype.type(1), dtype.type(-np.inf)

    def stager(ROWS, COLS, IT, stride):
        """A device function that stages the ROWS x COLS pixels of x whose (0, 0) is at src
        (lane's head dim, column slot) into shared memory at dst (the same lane's word),
        ``stride`` pixels per row, times ``mult``: G rows at a time, the step's loads all in
        flight, then its stores; 0 for pixels past the image (rows >= rows, cols >= cols)."""
        STEPS = _rounded(ROWS)
        @cuda.jit(device=True, **INLINE)  # inlined: buf stays in registers
        def stage(sm, buf, x, src, dst, rows, cols, uWE, slot, mult):
            for a0 in range(0, STEPS, G):
                for g in range(G):
                    row = src + U(a0 + g) * uWE
                    for st in range(IT):
                        inside = a0 + g < rows and slot + SLOTS * st < cols
                        buf[g * IT + st] = x[row + U(SLOTS * st * e)] if inside else zero
                for g in range(G):
                    for st in range(IT):
                        if slot + SLOTS * st < COLS:  # (columns past COLS: never read)
                            sm[dst + U(((a0 + g) * stride + SLOTS * st) * PS)] = (
                                mult * buf[g * IT + st])
        return stage

    stage_halo = stager(HR, HC, HALO_IT, RS)  # the halo of k or v
    stage_tile = stager(TR, TILE, TILE_IT, TS)  # the tile of scale·q

    options = {} if cuda_simulated() else {  # (the simulator has no launch bounds)
        "launch_bounds": (THREADS, FWD_BLOCKS_PER_SM[dtype.itemsize])}

    @cuda.jit(**options)
    def fwd(q, k, v, out, lse, H, W, scale):
        # q, k, v, out: flat (r·H·W·e,) views of (r, H, W, e); lse: (r·H·W,). Signed ints for
        # the logic, unsigned (U) for indices.
        sm = cuda.shared.array(SMEM, dtype)  # the halo of k or v, then the tile buffer
        s = cuda.local.array(NS, dtype)  # S, then P, of my QPT queries
        qv = cuda.local.array(QPT, dtype)
        acc = cuda.local.array(QPT, dtype)
        inv = cuda.local.array(QPT, dtype)  # 1 / Σ P of each query
        buf = cuda.local.array(BUF, dtype)  # staged values in flight
        n_i, n_j = (H + TR - 1) // TR, (W + TILE - 1) // TILE
        r, tile = cuda.blockIdx.x // (n_i * n_j), cuda.blockIdx.x % (n_i * n_j)
        i0, j0 = (tile // n_j) * TR, (tile % n_j) * TILE
        tid = cuda.threadIdx.x
        slot, dl = tid // EC, tid % EC  # staging: head dim dl of pixel columns slot + SLOTS·st
        uW, uWE = U(W), U(W) * U(e)
        head = U(r) * U(H) * uWE + U(slot * e + dl)  # + my staging lane's column and dim
        hr0 = min(max(i0 - HALF, 0), H - K)  # the halo: the first window's corner ...
        hc0 = min(max(j0 - HALF, 0), W - K)
        nr, nc = min(HR, H - hr0), min(HC, W - hc0)  # ... and its size inside the image
        nq, ncq = min(TR, H - i0), min(TILE, W - j0)  # the tile's size inside the image
        halo_src = head + (U(hr0) * uW + U(hc0)) * U(e)  # my staging lane's (row 0, col slot)
        tile_src = head + (U(i0) * uW + U(j0)) * U(e)  # ... of the tile (q, then the output)
        lane = U(slot * PS + dl)  # my staging lane's word in a staged row
        i, j = i0 + QPT * (tid // TILE), j0 + tid % TILE  # my queries: (i + u, j), u < QPT
        ri = min(max(min(i, H - 1) - HALF, 0), H - K) - hr0  # my windows' first row and
        ci = min(max(min(j, W - 1) - HALF, 0), W - K) - hc0  # column, in the halo
        corner = U(ri * RS + ci) * U(PS)  # ... as a shared-memory offset
        mine = U(TILE0 + (QPT * (tid // TILE) * TS + tid % TILE) * PS)  # my (i, j) in the tile
        for n in range(NS):
            s[n] = zero
        for phase in range(2):  # 0: S = (scale·q) kᵀ; 1: the softmax, then O = P v
            x = k if phase == 0 else v
            if phase == 1:  # the softmax of each query, in registers
                for u in range(QPT):
                    du = min(max(min(i + u, H - 1) - HALF, 0), H - K) - hr0 - ri  # δ_u
                    m = ninf
                    for t in range(K + u):
                        for c in range(K):
                            if t < du or t >= du + K:  # outside query u's window: weight 0
                                s[(u * KR + t) * K + c] = ninf
                            m = max(m, s[(u * KR + t) * K + c])
                    m = zero if m == ninf else m
                    total = zero
                    for t in range(K + u):
                        for c in range(K):
                            p = math.exp(s[(u * KR + t) * K + c] - m)
                            s[(u * KR + t) * K + c] = p
                            total += p
                    inv[u] = one / total
                    if i + u < H and j < W:  # no finite score: lse = −∞ (log(0) raises)
                        lse[U(r) * U(H) * uW + U(i + u) * uW + U(j)] = (
                            m + math.log(total) if total > zero else ninf)
            for d0 in range(0, e, EC):  # EC head dims at a time
                cuda.syncthreads()  # the previous chunk is read and written out
                stage_halo(sm, buf, x, halo_src + U(d0), lane, nr, nc, uWE, slot, one)
                if phase == 0:  # the tile of scale·q
                    stage_tile(sm, buf, q, tile_src + U(d0), U(TILE0) + lane, nq, ncq, uWE,
                               slot, scale)
                cuda.syncthreads()
                # [core] natten_cuda
                if phase == 0:
                    for d in range(nd):
                        for u in range(QPT):
                            qv[u] = sm[mine + U(u * TS * PS + d)]
                        for t in range(KR):  # key row t of mine: my QPT queries share each key
                            for c in range(K):
                                kx = sm[corner + U((t * RS + c) * PS + d)]
                                for u in range(QPT):
                                    if t < K + u:  # (compile time) the rows query u may see
                                        s[(u * KR + t) * K + c] += qv[u] * kx
                else:
                    for d in range(nd):
                        for u in range(QPT):
                            acc[u] = zero
                        for t in range(KR):
                            for c in range(K):
                                vx = sm[corner + U((t * RS + c) * PS + d)]
                                for u in range(QPT):
                                    if t < K + u:
                                        acc[u] += s[(u * KR + t) * K + c] * vx
                        for u in range(QPT):  # the outputs, through the tile buffer
                            sm[mine + U(u * TS * PS + d)] = acc[u] * inv[u]
                # [/core]
                    cuda.syncthreads()
                    for a in range(TR):  # written out coalesced
                        for st in range(TILE_IT):
                            if a < nq and slot + SLOTS * st < ncq:
                                out[tile_src + U(d0) + U(a) * uWE + U(SLOTS * st * e)] = (
                                    sm[U(TILE0) + lane + U((a * TS + SLOTS * st) * PS)])

    return fwd


# =============================================================================================
# CUDA backward (numba.cuda): one thread per query, dq directly, dk and dv scattered with
# atomic adds. One kernel per (dtype, K): the K² weights and their gradients are registers.
# =============================================================================================


@functools.cache
def _backward_kernel(dtype: np.dtype, K: int):
    """Compile-once (per dtype and window side K) backward kernel."""
    zero = dtype.type(0)
    ninf = dtype.type(-np.inf)
    KK = K * K
    HALF = K // 2

    @cuda.jit
    def bwd(q, k, v, g, dq, dk, dv, scale):
        """One thread per query: dq directly; dk, dv scattered with atomic adds."""
        R, H, W, e = q.shape
        n = cuda.grid(1)
        if n >= R * H * W:
            return
        r, i, j = n // (H * W), (n // W) % H, n % W
        r0 = min(max(i - HALF, 0), H - K)
        c0 = min(max(j - HALF, 0), W - K)
        p = cuda.local.array(KK, dtype)
        dp = cuda.local.array(KK, dtype)
        for a in range(K):
            for c in range(K):
                sd = zero
                gd = zero
                for d in range(e):
                    sd += scale * q[r, i, j, d] * k[r, r0 + a, c0 + c, d]
                    gd += g[r, i, j, d] * v[r, r0 + a, c0 + c, d]
                p[a * K + c] = sd
                dp[a * K + c] = gd
        m = ninf  # P recomputed as the forward does: a one-hot row gets P = 1, dS = 0 exactly
        for t in range(KK):
            m = max(m, p[t])
        m = zero if m == ninf else m
        total = zero
        for t in range(KK):
            p[t] = math.exp(p[t] - m)
            total += p[t]
        D = zero
        for t in range(KK):
            p[t] /= total
            D += p[t] * dp[t]
        for d in range(e):
            dq[r, i, j, d] = zero
        for a in range(K):
            for c in range(K):
                t = a * K + c
                ds = scale * p[t] * (dp[t] - D)
                for d in range(e):
                    dq[r, i, j, d] += ds * k[r, r0 + a, c0 + c, d]
                    cuda.atomic.add(dk, (r, r0 + a, c0 + c, d), ds * q[r, i, j, d])
                    cuda.atomic.add(dv, (r, r0 + a, c0 + c, d), p[t] * g[r, i, j, d])

    return bwd


def _check_kernel(kernel_size):
    if kernel_size > MAX_KERNEL:
        raise ValueError(f"the cuda backend keeps a query's K² scores in registers: kernel_size "
                         f"must be <= {MAX_KERNEL}, got {kernel_size}")


def _fwd_cuda(q, k, v, kernel_size, scale):
    _check_kernel(kernel_size)
    R, H, W, e = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1])
    if q.numel():
        dtype = numpy_dtype(q.dtype)
        fwd = _forward_kernel(dtype, kernel_size, e)
        rows = _tiles(kernel_size, e, dtype.itemsize).rows
        grid = R * ((H + rows - 1) // rows) * ((W + TILE - 1) // TILE)
        flat = (x.view(-1) for x in (q, k, v, out, lse))
        launch(fwd, grid, THREADS, *flat, H, W, dtype.type(scale))
    return out, lse


def _bwd_cuda(q, k, v, g, kernel_size, scale):
    _check_kernel(kernel_size)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.numel():
        dtype = numpy_dtype(q.dtype)
        bwd = _backward_kernel(dtype, kernel_size)
        n = q.shape[0] * q.shape[1] * q.shape[2]
        launch(bwd, (n + BWD_THREADS - 1) // BWD_THREADS, BWD_THREADS, q, k, v, g, dq, dk, dv,
               dtype.type(scale))
    return dq, dk, dv
