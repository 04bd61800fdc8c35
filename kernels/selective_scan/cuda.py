"""The selective scan's CUDA kernels (numba.cuda) and their host launchers, the only place that
knows grids and blocks. The equations and the glossary: kernels/selective_scan/__init__.py."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import SCAN_ITEMS as ITEMS
from minimodels.kernels._common import SCAN_THREADS as THREADS
from minimodels.kernels._common import numpy_dtype, scan_maps
from minimodels.kernels.selective_scan.ref import SOFTPLUS_THRESHOLD

# =============================================================================================
# Constants
# =============================================================================================

# CUDA: one block per (b, d) row, THREADS threads, ITEMS steps each: chunks of CHUNK steps,
# the same layout as kernels/scan.py, whose block scan of affine maps (``scan_maps``, shared in
# kernels/_common.py with THREADS = SCAN_THREADS, ITEMS = SCAN_ITEMS) we reuse.
# For each chunk the block loops over the n state channels: n scans of CHUNK steps.
CHUNK = THREADS * ITEMS
CHUNK1 = CHUNK + 1  # x_{t0-1}, x_{t0}, ..., x_{t0+CHUNK-1}: the states a chunk's backward reads
N_MAX = 64  # the CUDA kernels keep n per-channel carries in shared memory: n <= N_MAX
# CUDA forward: a block of CHANNELS * LANES threads; lane j of a channel owns its states
# k = j, j + LANES, ... (⌈n / LANES⌉ states per lane). The block walks
# the sequence in tiles of TILE steps (CHUNK is a whole number of tiles). The simulator uses
# tiny blocks and tiles so its tests cross every boundary and run several states per lane.
LANES = 4 if cuda_simulated() else 16
CHANNELS = 2 if cuda_simulated() else 8
TILE = 8 if cuda_simulated() else 32
BLOCK = CHANNELS * LANES  # threads per block of the forward
UNROLL = 8  # steps whose exps a thread puts in flight together
TILE1 = TILE + 1  # padded rows of the B and C tiles, against bank conflicts
SP_COLS = LANES + 1  # padded rows of the partial sums Σ_k C x, against bank conflicts
ROW_LOADS = CHANNELS * TILE // BLOCK  # staging loads per thread of a (channels, TILE) tile
# The forward cuts the sequence into segments (of whole chunks) until there are TARGET_BLOCKS
# blocks: at (1, 1536, 4096, 16) on the H200, 1 / 2 / 4 / 8 segments took 0.30 / 0.26 / 0.23 /
# 0.21 ms of GPU time. The simulator splits small tests.
TARGET_BLOCKS = 8 if cuda_simulated() else 1536


# =============================================================================================
# CUDA forward (numba.cuda). Parallel over channels and states: thread (channel, lane) walks
# the whole sequence with its states x_k in registers, so the expanded (b, d, l, n) tensors never
# exist. The block shares everything it reads: per tile of TILE steps it stages Δ_t (softplus
# computed once per step, not once per state), Δ_t u_t, u_t and z_t of its CHANNELS channels
# and the B_t, C_t tile of its batch row in shared memory, each with coalesced loads, and it
# issues the next tile's loads before computing the current one so that their latency hides
# behind the exps. Per step a thread runs x_k <- exp(Δ_t A_k) x_k + Δ_t u_t B_t[k], a chain of
# one multiply-add: the exps of a tile do not depend on x, so they are all in flight at once.
# The partial sums C_t[k] x_k go to shared memory and the block adds them over the lanes.
# The forward also stores x at every CHUNK boundary: the backward's checkpoints.
# b·d·n threads are too few to fill a GPU at batch 1 (24576 at (1, 1536, ·, 16): 6 warps per
# H200 SM), so the sequence is cut into segments of whole chunks, each its own block: pass 1
# runs every segment but the last from x = 0 and keeps its end state x_r and ΣΔ_r; pass 2 starts
# each segment from x = exp(A ΣΔ_r) x + x_r composed over the earlier segments r (the scan's
# combine, with Π_t exp(Δ_t A) = exp(A ΣΔ)) and computes the outputs.
# =============================================================================================


@functools.cache
def _forward_kernel(dtype: np.dtype, n: int, var_B: bool, var_C: bool, has_z: bool,
                    softplus: bool, first_pass: bool = False):
    """The forward kernel (see the section comment), compiled once per dtype, state size n and
    choice of B/C layout and options: each is a constant in the compiled code, so loops over
    states and staging loads have fixed trip counts and no branches on options remain.
    ``first_pass``: the segments' pass 1 (only x from zero and ΣΔ; no outputs)."""
    zero, one = dtype.type(0), dtype.type(1)
    STATES = -(-n // LANES)  # states per lane
    BC_LOADS = -(-n * TILE // BLOCK)  # staging loads per thread of an (n, TILE) tile
    BC_TILE = (n, TILE1)  # B, C tiles; rows padded against bank conflicts

    # fastmath for float32 only (exp becomes ex2.approx: 358 -> 321 us at (1, 1536, 4096, 16) on
    # the H200, error vs float64 2.1e-7 -> 2.4e-7); float64 keeps IEEE arithmetic
    options = {} if cuda_simulated() else {"fastmath": dtype == np.float32}
    # indices are cast to unsigned: Numba guards every signed index with a negative-index
    # wraparound test, which took ~8 of the inner loop's ~22 instructions per state-step
    U = np.uint64

    @cuda.jit(**options)
    def fwd(u, delta, A, B, C, D, z, bias, out, last, ckpt, seg_x, seg_dsum, seg_len):
        # u, delta, z, out: (b, d, l); B, C: (b, n, l) if input-dependent, else (d, n, 1);
        # grid (⌈d / CHANNELS⌉, b, segments); ckpt: (b, d, ⌈l / CHUNK⌉, n); block (·, ·, s)
        # walks steps [s · seg_len, (s + 1) · seg_len); seg_x: (b, d, segments, n) and
        # seg_dsum: (b, d, segments), each segment's x from zero and ΣΔ (pass 1's output)
        sdt = cuda.shared.array((CHANNELS, TILE), dtype)  # Δ_t
        sdu = cuda.shared.array((CHANNELS, TILE), dtype)  # Δ_t u_t
        su = cuda.shared.array((CHANNELS, TILE), dtype)  # u_t
        sz = cuda.shared.array((CHANNELS, TILE), dtype)  # z_t
        sB = cuda.shared.array(BC_TILE, dtype)  # B_t[k], C_t[k] of the tile
        sC = cuda.shared.array(BC_TILE, dtype)
        sP = cuda.shared.array((CHANNELS, TILE, SP_COLS), dtype)  # Σ_(my k) C_t[k] x_t[k]
        x = cuda.local.array(STATES, dtype)  # my states
        va = cuda.local.array(UNROLL, dtype)  # Ā_t and B̄_t u_t of UNROLL steps
        vb = cuda.local.array(UNROLL, dtype)
        rdt = cuda.local.array(ROW_LOADS, dtype)  # the next tile, in flight
        ru = cuda.local.array(ROW_LOADS, dtype)
        rz = cuda.local.array(ROW_LOADS, dtype)
        rB = cuda.local.array(BC_LOADS, dtype)
        rC = cuda.local.array(BC_LOADS, dtype)
        d, l = u.shape[1], u.shape[2]
        tid = cuda.threadIdx.x
        lane, g = tid % LANES, tid // LANES  # my lane, my channel in the block
        c0, bi, seg = cuda.blockIdx.x * CHANNELS, cuda.blockIdx.y, cuda.blockIdx.z
        di = c0 + g
        mine = di < d  # the last block may have spare channels: they only join the barriers
        dc = min(di, d - 1)
        t_start = seg * seg_len
        t_end = min(l, t_start + seg_len)
        for m in range(STATES):  # x entering the segment: the earlier segments, composed
            k = lane + m * LANES
            xk = zero
            if not first_pass and k < n and seg > 0:
                xk = seg_x[U(bi), U(dc), 0, U(k)]  # segment 0 starts from 0: nothing to decay
                for r in range(1, seg):  # x <- exp(A ΣΔ_r) x + x_r (x_r: segment r from zero)
                    xk = (math.exp(A[U(dc), U(k)] * seg_dsum[U(bi), U(dc), U(r)]) * xk
                          + seg_x[U(bi), U(dc), U(r), U(k)])
            x[m] = xk
        # A block that starts from x = 0 (segment 0; every segment in pass 1) stages Δ = 0 for
        # the exp of its first step (see step 1), so ΣΔ (pass 1) starts with that step's Δ.
        from_zero = first_pass or seg == 0
        dsum = _delta(delta, bias, bi, dc, t_start, softplus) if first_pass else zero
        for t0 in range(t_start - TILE, t_end, TILE):  # the first t0 only issues loads
            if t0 >= t_start:  # 1. put the tile in flight into shared memory
                for q in range(ROW_LOADS):
                    e = tid + q * BLOCK
                    gq, j = e // TILE, e % TILE
                    dt = rdt[q]
                    if t0 + j >= l:
                        dt = zero  # past the end: Δ = 0, the identity map
                    elif softplus and dt <= SOFTPLUS_THRESHOLD:
                        dt = math.log1p(math.exp(dt))
                    sdu[U(gq), U(j)], su[U(gq), U(j)] = dt * ru[q], ru[q]
                    if from_zero and t0 + j == t_start:
                        dt = zero  # x is exactly 0: e^{Δ A} · 0 = 0, but NaN if e^{Δ A} = inf
                    sdt[U(gq), U(j)] = dt
                    if has_z:
                        sz[U(gq), U(j)] = rz[q]
                for q in range(BC_LOADS):
                    e = tid + q * BLOCK
                    if e < n * TILE:
                        if var_B:
                            sB[U(e // TILE), U(e % TILE)] = rB[q]
                        if var_C:
                            sC[U(e // TILE), U(e % TILE)] = rC[q]
                cuda.syncthreads()
            t1 = t0 + TILE  # 2. issue the loads of the next tile
            if t1 < t_end:
                for q in range(ROW_LOADS):
                    e = tid + q * BLOCK
                    gq, t = e // TILE, min(t1 + e % TILE, l - 1)
                    cq = min(c0 + gq, d - 1)
                    rdt[q] = delta[U(bi), U(cq), U(t)] + bias[U(cq)]
                    ru[q] = u[U(bi), U(cq), U(t)]
                    if has_z:
                        rz[q] = z[U(bi), U(cq), U(t)]
                for q in range(BC_LOADS):
                    e = tid + q * BLOCK
                    if e < n * TILE:
                        t = min(t1 + e % TILE, l - 1)
                        if var_B:
                            rB[q] = B[U(bi), U(e // TILE), U(t)]
                        if var_C:
                            rC[q] = C[U(bi), U(e // TILE), U(t)]
            if t0 < t_start:
                continue
            if not first_pass and mine and t0 % CHUNK == 0:  # 3. checkpoint, then the steps
                for m in range(STATES):
                    k = lane + m * LANES
                    if k < n:
                        ckpt[U(bi), U(di), U(t0 // CHUNK), U(k)] = x[m]
            for m in range(STATES):
                k = lane + m * LANES
                if k < n:
                    # [core] selective_scan_cuda
                    Ak, xk = A[U(dc), U(k)], x[m]
                    Bk = zero if var_B else B[U(dc), U(k), 0]
                    Ck = zero if var_C or first_pass else C[U(dc), U(k), 0]
                    for j0 in range(0, TILE, UNROLL):
                        for j in range(UNROLL):  # independent of x: all in flight at once
                            va[j] = math.exp(sdt[U(g), U(j0 + j)] * Ak)
                            vb[j] = sdu[U(g), U(j0 + j)] * (sB[U(k), U(j0 + j)] if var_B else Bk)
                        for j in range(UNROLL):  # the chain: one multiply-add per step
                            xk = va[j] * xk + vb[j]
                            if first_pass:
                                if m == 0:
                                    dsum += sdt[U(g), U(j0 + j)]
                            else:
                                p = (sC[U(k), U(j0 + j)] if var_C else Ck) * xk
                                if m == 0:
                                    sP[U(g), U(j0 + j), U(lane)] = p
                                else:
                                    sP[U(g), U(j0 + j), U(lane)] += p
                    x[m] = xk
                    # [/core]
                elif m == 0 and not first_pass:
                    for j in range(TILE):
                        sP[U(g), U(j), U(lane)] = zero
            cuda.syncthreads()
            if first_pass:
                continue
            for q in range(ROW_LOADS):  # 4. y_t = Σ_lanes + D u_t, gated
                e = tid + q * BLOCK
                gq, j = e // TILE, e % TILE
                cq, t = c0 + gq, t0 + e % TILE
                if cq < d and t < l:
                    y = D[U(cq)] * su[U(gq), U(j)]
                    for r in range(LANES):
                        y += sP[U(gq), U(j), U(r)]
                    if has_z:
                        zt = sz[U(gq), U(j)]
                        y *= zt / (one + math.exp(-zt))
                    out[U(bi), U(cq), U(t)] = y
            cuda.syncthreads()
        if mine and first_pass:
            for m in range(STATES):
                k = lane + m * LANES
                if k < n:
                    seg_x[U(bi), U(di), U(seg), U(k)] = x[m]
            if lane == 0:
                seg_dsum[U(bi), U(di), U(seg)] = dsum
        elif mine and t_end == l:
            for m in range(STATES):
                k = lane + m * LANES
                if k < n:
                    last[U(bi), U(di), U(k)] = x[m]

    return fwd


# =============================================================================================
# CUDA backward (numba.cuda). One block per row (b, d); thread i owns ITEMS consecutive steps of
# each chunk of CHUNK steps. For each state channel k the block runs kernels/scan.py's chunked
# scan (kernels/_common.py's scan_maps) of affine maps x -> Ā x + B̄u (Ā and B̄u are made on the
# fly, in registers, from Δ, A, B, u: the expanded (l, n) tensors never touch global memory).
# The backward walks the chunks from the end, starting each from the forward's checkpoint: for
# each k it first recomputes the chunk's x from its checkpoint into shared memory, then runs the
# reversed scan dx_t = C_t dy_t + Ā_{t+1} dx_{t+1} with thread 0 owning the chunk's last steps.
# ∂B, ∂C (input-dependent) are summed over d with atomics; ∂A, ∂D, ∂bias and fixed ∂B, ∂C are
# summed over the block in shared memory, then over the batch with one atomic per block.
# =============================================================================================


@cuda.jit(device=True)
def _block_sum(sR, v, i):
    """Sum of v over the block's THREADS threads (tree in shared memory sR: (THREADS,))."""
    sR[i] = v
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if i < s:
            sR[i] += sR[i + s]
        cuda.syncthreads()
        s //= 2
    total = sR[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _delta(delta, bias, bi, di, t, softplus):
    dt = delta[bi, di, t] + bias[di]
    if softplus and dt <= SOFTPLUS_THRESHOLD:
        dt = math.log1p(math.exp(dt))
    return dt


@functools.cache
def _backward_kernel(dtype: np.dtype):
    """Compile-once (per dtype) backward kernel."""
    zero, one = dtype.type(0), dtype.type(1)

    @cuda.jit
    def bwd(u, delta, A, B3, B2, C3, C2, D, z, bias, var_B, var_C, has_z, softplus, ckpt, g,
            dlast, du, ddelta, dz, dA, dB3, dB2, dC3, dC2, dD, dbias):
        sA = cuda.shared.array((2, THREADS), dtype)
        sB = cuda.shared.array((2, THREADS), dtype)
        sX = cuda.shared.array(CHUNK1, dtype)  # sX[s + 1] = x at step t0 + s of this chunk
        sc = cuda.shared.array(N_MAX, dtype)  # Ā_{t+1} dx_{t+1} entering the chunk from its end
        sR = cuda.shared.array(THREADS, dtype)
        fdt = cuda.local.array(ITEMS, dtype)  # forward layout: steps t0 + i·ITEMS + j
        fu = cuda.local.array(ITEMS, dtype)
        fa = cuda.local.array(ITEMS, dtype)
        fb = cuda.local.array(ITEMS, dtype)
        bdt = cuda.local.array(ITEMS, dtype)  # backward layout: steps t0 + CHUNK-1 - i·ITEMS - j
        bu = cuda.local.array(ITEMS, dtype)
        bdy = cuda.local.array(ITEMS, dtype)
        ba = cuda.local.array(ITEMS, dtype)
        bg = cuda.local.array(ITEMS, dtype)
        bddt = cuda.local.array(ITEMS, dtype)
        bdu = cuda.local.array(ITEMS, dtype)
        by = cuda.local.array(ITEMS, dtype)
        lA = cuda.local.array(N_MAX, dtype)  # my partial sums of ∂A[d], fixed ∂B[d], ∂C[d]
        lB = cuda.local.array(N_MAX, dtype)
        lC = cuda.local.array(N_MAX, dtype)
        batch, d, l = u.shape
        n = A.shape[1]
        r, i = cuda.blockIdx.x, cuda.threadIdx.x
        bi, di = r // d, r % d
        for k in range(n):
            lA[k], lB[k], lC[k] = zero, zero, zero
        lD, lbias = zero, zero
        for k in range(i, n, THREADS):
            sc[k] = dlast[bi, di, k]
        cuda.syncthreads()
        for c in range((l + CHUNK - 1) // CHUNK - 1, -1, -1):
            t0 = c * CHUNK
            for j in range(ITEMS):
                t = t0 + i * ITEMS + j
                fdt[j] = _delta(delta, bias, bi, di, t, softplus) if t < l else zero
                fu[j] = u[bi, di, t] if t < l else zero
                t = t0 + CHUNK - 1 - i * ITEMS - j
                bdt[j] = _delta(delta, bias, bi, di, t, softplus) if t < l else zero
                bu[j] = u[bi, di, t] if t < l else zero
                dy = g[bi, di, t] if t < l else zero
                if has_z and t < l:
                    zt = z[bi, di, t]
                    dy *= zt / (one + math.exp(-zt))
                bdy[j], bddt[j], bdu[j], by[j] = dy, zero, zero, zero
            for k in range(n):
                Ak = A[di, k]
                # 1. recompute x over the chunk from its checkpoint, into sX
                x0 = ckpt[bi, di, c, k]
                MA, MB = one, zero
                for j in range(ITEMS):
                    t = min(t0 + i * ITEMS + j, l - 1)
                    # Ā_0 multiplies x_{-1} = 0: take it as 1 (e^{Δ A} may be inf; inf · 0 = NaN)
                    fa[j] = math.exp(fdt[j] * Ak) if t0 + i * ITEMS + j > 0 else one
                    fb[j] = fdt[j] * (B3[bi, k, t] if var_B else B2[di, k]) * fu[j]
                    MA, MB = fa[j] * MA, fa[j] * MB + fb[j]
                p = scan_maps(sA, sB, MA, MB, i)
                x = x0 if i == 0 else sA[p, i - 1] * x0 + sB[p, i - 1]
                for j in range(ITEMS):
                    x = fa[j] * x + fb[j]
                    sX[1 + i * ITEMS + j] = x
                if i == 0:
                    sX[0] = x0
                carry = sc[k]
                cuda.syncthreads()
                # 2. the reversed scan: c -> Ā_t (c + C_t dy_t), from the chunk's end
                MA, MB = one, zero
                for j in range(ITEMS):
                    t = min(t0 + CHUNK - 1 - i * ITEMS - j, l - 1)
                    ba[j] = math.exp(bdt[j] * Ak) if t0 + CHUNK - 1 - i * ITEMS - j > 0 else one
                    bg[j] = (C3[bi, k, t] if var_C else C2[di, k]) * bdy[j]
                    MA, MB = ba[j] * MA, ba[j] * (MB + bg[j])
                p = scan_maps(sA, sB, MA, MB, i)
                cin = carry if i == 0 else sA[p, i - 1] * carry + sB[p, i - 1]
                for j in range(ITEMS):
                    s = CHUNK - 1 - i * ITEMS - j
                    t = t0 + s
                    dx = bg[j] + cin  # ∂L/∂x_t
                    if t < l:
                        Bk = B3[bi, k, t] if var_B else B2[di, k]
                        dAbar = dx * sX[s] * ba[j]
                        bddt[j] += dAbar * Ak + dx * Bk * bu[j]
                        bdu[j] += dx * bdt[j] * Bk
                        lA[k] += dAbar * bdt[j]
                        if var_B:
                            cuda.atomic.add(dB3, (bi, k, t), dx * bdt[j] * bu[j])
                        else:
                            lB[k] += dx * bdt[j] * bu[j]
                        Ck = C3[bi, k, t] if var_C else C2[di, k]
                        by[j] += Ck * sX[s + 1]
                        if var_C:
                            cuda.atomic.add(dC3, (bi, k, t), bdy[j] * sX[s + 1])
                        else:
                            lC[k] += bdy[j] * sX[s + 1]
                    cin = ba[j] * dx
                if i == 0:
                    sc[k] = sA[p, THREADS - 1] * carry + sB[p, THREADS - 1]
                cuda.syncthreads()
            for j in range(ITEMS):
                t = t0 + CHUNK - 1 - i * ITEMS - j
                if t < l:
                    du[bi, di, t] = bdu[j] + D[di] * bdy[j]
                    lD += bdy[j] * bu[j]
                    if has_z:
                        zt = z[bi, di, t]
                        s = one / (one + math.exp(-zt))
                        dz[bi, di, t] = g[bi, di, t] * (by[j] + D[di] * bu[j]) * s * (
                            one + zt * (one - s))
                    raw = delta[bi, di, t] + bias[di]
                    ddt = bddt[j]
                    if softplus and raw <= SOFTPLUS_THRESHOLD:
                        ddt *= one / (one + math.exp(-raw))
                    ddelta[bi, di, t] = ddt
                    lbias += ddt
        for k in range(n):
            total = _block_sum(sR, lA[k], i)
            if i == 0:
                cuda.atomic.add(dA, (di, k), total)
            if not var_B:
                total = _block_sum(sR, lB[k], i)
                if i == 0:
                    cuda.atomic.add(dB2, (di, k), total)
            if not var_C:
                total = _block_sum(sR, lC[k], i)
                if i == 0:
                    cuda.atomic.add(dC2, (di, k), total)
        total = _block_sum(sR, lD, i)
        if i == 0:
            cuda.atomic.add(dD, di, total)
        total = _block_sum(sR, lbias, i)
        if i == 0:
            cuda.atomic.add(dbias, di, total)

    return bwd


def _fwd_cuda(u, delta, A, B3, B2, C3, C2, D, z, bias, flags):
    if A.shape[1] > N_MAX:
        raise ValueError(f"A: the cuda backend supports d_state n <= {N_MAX}, got {A.shape[1]}")
    batch, d, l = u.shape
    var_B, var_C = flags[:2]
    dtype = numpy_dtype(u.dtype)
    out = torch.empty_like(u)
    last = u.new_empty(batch, d, A.shape[1])
    ckpt = u.new_empty(batch, d, (l + CHUNK - 1) // CHUNK, A.shape[1])
    B = B3 if var_B else B2[:, :, None]  # (d, n, 1): one kernel signature for both layouts
    C = C3 if var_C else C2[:, :, None]
    blocks = -(-d // CHANNELS)
    # sequence segments: enough blocks to fill the GPU, each a whole number of chunks
    chunks = -(-l // CHUNK)
    seg_len = CHUNK * -(-chunks // min(chunks, max(1, TARGET_BLOCKS // (blocks * batch))))
    segments = -(-l // seg_len)
    seg_x = u.new_empty(batch, d, segments, A.shape[1])
    seg_dsum = u.new_empty(batch, d, segments)
    args = (u, delta, A, B, C, D, z if flags[2] else u, bias, out, last, ckpt, seg_x, seg_dsum,
            seg_len)
    if segments > 1:  # pass 1: each segment but the last, from zero
        first = _forward_kernel(dtype, A.shape[1], var_B, False, False, flags[3], True)
        launch(first, (blocks, batch, segments - 1), BLOCK, *args)
    launch(_forward_kernel(dtype, A.shape[1], *flags), (blocks, batch, segments), BLOCK, *args)
    return out, last, ckpt


def _bwd_cuda(u, delta, A, B3, B2, C3, C2, D, z, bias, flags, ckpt, g, dlast):
    batch, d, l = u.shape
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(u)
    grads = [torch.zeros_like(t) for t in (A, B3, B2, C3, C2, D, bias)]
    bwd = _backward_kernel(numpy_dtype(u.dtype))
    launch(bwd, batch * d, THREADS, u, delta, A, B3, B2, C3, C2, D, z, bias, *flags, ckpt, g,
            dlast, du, ddelta, dz, *grads)
    dA, dB3, dB2, dC3, dC2, dD, dbias = grads
    return du, ddelta, dA, dB3, dB2, dC3, dC2, dD, dz, dbias
