"""The selective scan's CUDA kernels (numba.cuda) and their host launchers, the only place that
knows grids and blocks. The equations and the glossary: kernels/selective_scan/__init__.py."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import numpy_dtype
from minimodels.kernels.selective_scan.ref import SOFTPLUS_THRESHOLD

# =============================================================================================
# Constants
# =============================================================================================

N_MAX = 64  # the CUDA kernels keep a lane's states in registers: n <= N_MAX
# CUDA forward: a block of CHANNELS * LANES threads; lane j of a channel owns its states
# k = j, j + LANES, ... (⌈n / LANES⌉ states per lane). The block walks
# the sequence in tiles of TILE steps. The simulator uses
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
CHUNK = (2 if cuda_simulated() else 16) * TILE  # segments are whole numbers of CHUNK steps


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
# The forward also stores x entering every tile of the backward: its checkpoints.
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
    CKPT = _bwd_plan(dtype, n, var_B, var_C, has_z, softplus)[0]  # the backward's tile: x_{t-1}
    # is saved at each of its starts
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
        # grid (⌈d / CHANNELS⌉, b, segments); ckpt: (b, d, ⌈l / CKPT⌉, n); block (·, ·, s)
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
            for m in range(STATES):  # 3. the steps (and a checkpoint every CKPT steps)
                k = lane + m * LANES
                if k < n:
                    # [core] selective_scan_cuda
                    Ak, xk = A[U(dc), U(k)], x[m]
                    Bk = zero if var_B else B[U(dc), U(k), 0]
                    Ck = zero if var_C or first_pass else C[U(dc), U(k), 0]
                    for j0 in range(0, TILE, UNROLL):
                        if not first_pass and mine and j0 % CKPT == 0 and t0 + j0 < t_end:
                            ckpt[U(bi), U(di), U((t0 + j0) // CKPT), U(k)] = xk
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
# CUDA backward (numba.cuda), laid out like the forward: a block of CH channels × LANES lanes,
# thread (channel, lane) owns the states k = lane, lane + LANES, ..., and the block walks the
# sequence from the end in tiles of BT steps (the forward saved x entering each tile, so no
# (b, d, l, n) tensor is ever stored). Per tile, three barriers:
#   1. write the tile that is in registers into shared memory: Δ_t, Δ_t u_t, u_t, dy_t =
#      g_t · silu(z_t), the gate's factor for ∂z_t, softplus'(Δ raw) and B_t, C_t (all computed
#      once per (channel, step), not once per state); barrier; then issue the global loads of
#      the next tile (and of its checkpoint), which fly while 2-3 compute;
#   2. recompute the tile's states from its checkpoint, x_t = Ā_t x_{t-1} + Δ_t u_t B_t, keeping
#      x_t and Ā_t in registers (2·BT per state);
#   3. the reversed recurrence, one multiply-add per step: dx_t = C_t dy_t + ρ_t,
#      ρ_{t-1} = Ā_t dx_t (ρ enters the sequence's end as ∂L/∂x_L); per step the lane's shares
#      of S1_t = Σ_k dx_t B_t, S2_t = Σ_k dx_t x_{t-1} Ā_t A and y_t = Σ_k C_t x_t, and the
#      channel's ∂B_t[k] = dx_t Δ_t u_t, ∂C_t[k] = dy_t x_t go to shared memory; barrier;
#   4. per (channel, step) the lanes' shares summed: ∂u_t = Δ_t S1_t + D dy_t,
#      ∂Δ_t = (S2_t + u_t S1_t) softplus', ∂z_t; per (state, step) the block's channels summed:
#      one partial ∂B_t, ∂C_t per block (summed over blocks by the host: no atomics on
#      addresses that all d channels share); barrier (the next tile overwrites shared memory).
# ∂A, ∂D, ∂bias, fixed ∂B, ∂C stay in registers and go out as one partial per block at the end.
# No atomics anywhere: the gradients are deterministic.
# Why this layout (round 2, 2026-12-05): the round-1 backward kept dx_t in registers for a fifth
# pass over the tile (∂B, ∂C) and summed y in a pass of its own: 6 barriers a tile, ~69 SASS
# instructions per state-step, 255 registers (8 warps per SM), and each tile's loads issued
# only after the previous tile's last barrier. Here: 3 barriers, ~56 instructions, the next
# tile in flight, 159 registers (3 blocks, 12 warps per SM; kernels/BENCHMARKS.md).
# Segments as in the forward, mirrored: pass 1 runs every segment but the first from ρ = 0 at its
# end and keeps ρ at its start, h_r, and ΣΔ_r; pass 2 enters segment s with
# ρ <- exp(A ΣΔ_r) ρ + h_r composed over the later segments r, starting from ∂L/∂x_L.
# =============================================================================================

SMEM_BYTES = 48 * 1024  # static shared memory of a block


@cuda.jit(device=True)
def _delta(delta, bias, bi, di, t, softplus):
    dt = delta[bi, di, t] + bias[di]
    if softplus and dt <= SOFTPLUS_THRESHOLD:
        dt = math.log1p(math.exp(dt))
    return dt


def _bwd_words(n: int, ch: int, bt: int, var_B: bool, var_C: bool, has_z: bool,
               softplus: bool) -> int:
    """Words of the backward's shared arrays for CH = ch channels and BT = bt steps."""
    cols = -(-n // LANES) * LANES + 1  # ∂B, ∂C shares: every state, padded
    return ((4 + has_z + softplus) * ch * bt  # Δ, Δu, u, dy (+ ∂z factor, softplus')
            + (var_B + var_C) * n * (bt + 1)  # B, C
            + (2 + has_z) * ch * bt * SP_COLS  # the lanes' shares of S1, S2 (+ y)
            + (var_B + var_C) * ch * bt * cols)  # the channels' shares of ∂B, ∂C


@functools.cache
def _bwd_plan(dtype: np.dtype, n: int, var_B: bool = True, var_C: bool = True,
              has_z: bool = True, softplus: bool = True) -> tuple[int, int]:
    """(BT, CH): the backward's tile of steps and channels per block. The most channels (the
    forward's CHANNELS, halved while nothing fits), then the longest tile of 32, 16, 8 steps (at
    most the forward's TILE, which it divides, and a multiple of UNROLL: the forward writes a
    checkpoint every BT steps) whose shared arrays fit a block's static shared memory. float32
    at n = 16 with every option: (16, 8)."""
    ch = CHANNELS
    while ch >= 1:
        for bt in (32, 16, 8):
            words = _bwd_words(n, ch, bt, var_B, var_C, has_z, softplus)
            if bt <= TILE and words * dtype.itemsize <= SMEM_BYTES:
                return bt, ch
        ch //= 2
    raise ValueError(f"selective_scan cuda: no backward tile fits n = {n} in {dtype}")


def _segments(l: int, rows: int) -> tuple[int, int]:
    """(seg_len, segments): cut l into segments of whole CHUNKs until rows · segments blocks
    reach TARGET_BLOCKS (the forward and the backward use the same cut)."""
    chunks = -(-l // CHUNK)
    seg_len = CHUNK * -(-chunks // min(chunks, max(1, TARGET_BLOCKS // rows)))
    return seg_len, -(-l // seg_len)


@functools.cache
def _backward_kernel(dtype: np.dtype, n: int, var_B: bool, var_C: bool, has_z: bool,
                     softplus: bool, first_pass: bool = False):
    """The backward kernel (see the section comment), compiled once per dtype, n, layout and
    options. ``first_pass``: the segments' pass 1 (only ρ from zero and ΣΔ; no gradients)."""
    zero, one = dtype.type(0), dtype.type(1)
    STATES = -(-n // LANES)  # states per lane
    BT, CH = _bwd_plan(dtype, n, var_B, var_C, has_z, softplus)
    NT = CH * LANES  # threads per block
    ROWS = -(-CH * BT // NT)  # (channel, step) pairs per thread
    COLS = -(-n * BT // NT)  # (state, step) pairs per thread, for ∂B, ∂C
    BC_LOADS = -(-n * BT // NT)
    PREFETCH_BC = BC_LOADS <= 4  # B_t, C_t of the next tile in registers (else loaded in step 1)
    # shapes as constants (the GPU compiler needs them; an array unused for these options is 1x1)
    ROW_TILE = (CH, BT)
    Z_TILE = (CH, BT) if has_z else (1, 1)
    SP_TILE = (CH, BT) if softplus else (1, 1)
    B_TILE = (n, BT + 1) if var_B else (1, 1)  # rows padded against bank conflicts
    C_TILE = (n, BT + 1) if var_C else (1, 1)
    SHARES = (2 + has_z, CH, BT, SP_COLS)
    DBC = (var_B + var_C, CH, BT, STATES * LANES + 1) if var_B or var_C else (1, 1, 1, 1)
    XB = (STATES, BT)
    iC = 1 if var_B else 0  # ∂C's index in the ∂B, ∂C shares
    options = {} if cuda_simulated() else {"fastmath": dtype == np.float32}
    U = np.uint64  # unsigned indices: no negative-index wraparound tests (see the forward)

    @cuda.jit(**options)
    def bwd(u, delta, A, B, C, D, z, bias, g, dlast, ckpt, seg_h, seg_dsum, seg_len,
            du, ddelta, dz, dA, dBf, dCf, dBp, dCp, dD, dbias):
        # u, delta, z, g, du, ddelta, dz: (b, d, l); B, C: (b, n, l) or (d, n, 1); dlast: (b, d,
        # n); ckpt: (b, d, ⌈l / BT⌉, n), x entering each tile; seg_h: (b, d, segments, n) and
        # seg_dsum: (b, d, segments): pass 1's ρ at each segment's start and its ΣΔ; per-block
        # partials: dA, dBf, dCf (b, segments, d, n) (fixed B, C); dD, dbias (b, segments, d);
        # dBp, dCp: (b, ⌈d / CH⌉, n, l) (input-dependent B, C);
        # grid (⌈d / CH⌉, b, segments [- 1 in pass 1])
        sdt = cuda.shared.array(ROW_TILE, dtype)  # Δ_t
        sdu = cuda.shared.array(ROW_TILE, dtype)  # Δ_t u_t
        su = cuda.shared.array(ROW_TILE, dtype)  # u_t
        sdy = cuda.shared.array(ROW_TILE, dtype)  # dy_t
        sgz = cuda.shared.array(Z_TILE, dtype)  # ∂z_t / (y_t + D u_t)
        ssp = cuda.shared.array(SP_TILE, dtype)  # softplus'(delta_t + bias)
        sB = cuda.shared.array(B_TILE, dtype)
        sC = cuda.shared.array(C_TILE, dtype)
        sP = cuda.shared.array(SHARES, dtype)  # the lanes' shares of S1, S2, y
        sQ = cuda.shared.array(DBC, dtype)  # the channels' shares of ∂B, ∂C
        X = cuda.local.array(XB, dtype)  # x_t of the tile
        Ab = cuda.local.array(XB, dtype)  # Ā_t of the tile
        x_in = cuda.local.array(STATES, dtype)  # x entering the tile
        rX = cuda.local.array(STATES, dtype)  # x entering the next tile, in flight
        rho = cuda.local.array(STATES, dtype)  # ρ entering the tile from its end
        lA = cuda.local.array(STATES, dtype)  # my sums of ∂A, fixed ∂B, ∂C
        lB = cuda.local.array(STATES, dtype)
        lC = cuda.local.array(STATES, dtype)
        lD = cuda.local.array(ROWS, dtype)  # my sums of ∂D, ∂bias
        lbias = cuda.local.array(ROWS, dtype)
        rdt = cuda.local.array(ROWS, dtype)  # the next tile, in flight
        ru = cuda.local.array(ROWS, dtype)
        rg = cuda.local.array(ROWS, dtype)
        rz = cuda.local.array(ROWS, dtype)
        rB = cuda.local.array(BC_LOADS, dtype)
        rC = cuda.local.array(BC_LOADS, dtype)
        batch, d, l = u.shape
        tid = cuda.threadIdx.x
        lane, gi = tid % LANES, tid // LANES  # my lane, my channel in the block
        blk, bi = cuda.blockIdx.x, cuda.blockIdx.y
        seg = cuda.blockIdx.z + 1 if first_pass else cuda.blockIdx.z
        segments = seg_dsum.shape[2]
        c0 = blk * CH
        di = c0 + gi
        mine = di < d  # spare channels of the last block compute copies of channel d - 1
        dc = min(di, d - 1)
        t_start = seg * seg_len
        t_end = min(l, t_start + seg_len)
        for m in range(STATES):  # ρ entering the segment from its end (pass 2)
            k = lane + m * LANES
            r0 = zero
            if not first_pass and k < n:
                r0 = dlast[U(bi), U(dc), U(k)]
                for r in range(segments - 1, seg, -1):  # ρ <- exp(A ΣΔ_r) ρ + h_r
                    r0 = (math.exp(A[U(dc), U(k)] * seg_dsum[U(bi), U(dc), U(r)]) * r0
                          + seg_h[U(bi), U(dc), U(r), U(k)])
            rho[m], lA[m], lB[m], lC[m] = r0, zero, zero, zero
        for q in range(ROWS):
            lD[q], lbias[q] = zero, zero
        dsum = zero
        t_last = t_start + ((t_end - 1 - t_start) // BT) * BT
        for t0 in range(t_last + BT, t_start - 1, -BT):  # the first t0 only issues loads
            if t0 <= t_last:  # 1. the tile in flight into shared memory
                for q in range(ROWS):
                    e = tid + q * NT
                    if e < CH * BT:
                        gq, j = e // BT, e % BT
                        dt, uu, dy, sp, gz = zero, zero, zero, one, zero
                        if t0 + j < l:  # past the end: Δ = 0 (the identity map), dy = 0
                            dt, uu, dy = rdt[q], ru[q], rg[q]
                            if softplus and dt <= SOFTPLUS_THRESHOLD:
                                ex = math.exp(dt)
                                dt, sp = math.log1p(ex), ex / (one + ex)
                            if has_z:
                                zt = rz[q]
                                sg = one / (one + math.exp(-zt))
                                gz = dy * sg * (one + zt * (one - sg))
                                dy *= zt * sg
                        sdt[U(gq), U(j)], sdu[U(gq), U(j)] = dt, dt * uu
                        su[U(gq), U(j)], sdy[U(gq), U(j)] = uu, dy
                        if has_z:
                            sgz[U(gq), U(j)] = gz
                        if softplus:
                            ssp[U(gq), U(j)] = sp
                for m in range(STATES):
                    x_in[m] = rX[m]
                for q in range(BC_LOADS):
                    e = tid + q * NT
                    if e < n * BT:
                        if not PREFETCH_BC:
                            t = min(t0 + e % BT, l - 1)
                            if var_B and not first_pass:
                                rB[q] = B[U(bi), U(e // BT), U(t)]
                            if var_C:
                                rC[q] = C[U(bi), U(e // BT), U(t)]
                        if var_B and not first_pass:
                            sB[U(e // BT), U(e % BT)] = rB[q]
                        if var_C:
                            sC[U(e // BT), U(e % BT)] = rC[q]
                cuda.syncthreads()
            t1 = t0 - BT  # 2. issue the loads of the next tile (and its checkpoint)
            if t1 >= t_start:
                for q in range(ROWS):
                    e = tid + q * NT
                    if e < CH * BT:
                        cq, t = min(c0 + e // BT, d - 1), min(t1 + e % BT, l - 1)
                        rdt[q] = delta[U(bi), U(cq), U(t)] + bias[U(cq)]
                        ru[q] = u[U(bi), U(cq), U(t)]
                        rg[q] = g[U(bi), U(cq), U(t)]
                        if has_z:
                            rz[q] = z[U(bi), U(cq), U(t)]
                        if c0 + e // BT >= d:  # a spare channel: u = dy = 0, so its ∂B, ∂C
                            ru[q], rg[q] = zero, zero  # shares (summed over channels) are 0
                for q in range(BC_LOADS if PREFETCH_BC else 0):
                    e = tid + q * NT
                    if e < n * BT:
                        t = min(t1 + e % BT, l - 1)
                        if var_B and not first_pass:
                            rB[q] = B[U(bi), U(e // BT), U(t)]
                        if var_C:
                            rC[q] = C[U(bi), U(e // BT), U(t)]
                if not first_pass:
                    for m in range(STATES):
                        k = lane + m * LANES
                        if k < n:
                            rX[m] = ckpt[U(bi), U(dc), U(t1 // BT), U(k)]
            if t0 > t_last:
                continue
            if first_pass:  # ρ only, and ΣΔ
                for m in range(STATES):
                    k = lane + m * LANES
                    if k < n:
                        Ak, r0 = A[U(dc), U(k)], rho[m]
                        Ck = zero if var_C else C[U(dc), U(k), 0]
                        for jj in range(BT):
                            j = BT - 1 - jj
                            dx = (sC[U(k), U(j)] if var_C else Ck) * sdy[U(gi), U(j)] + r0
                            r0 = math.exp(sdt[U(gi), U(j)] * Ak) * dx
                        rho[m] = r0
                if lane == 0:
                    for j in range(BT):
                        dsum += sdt[U(gi), U(j)]
                cuda.syncthreads()
                continue
            for m in range(STATES):  # 2-3. recompute the tile's states, then walk it back
                k = lane + m * LANES
                if k < n:
                    Ak, r0, xk = A[U(dc), U(k)], rho[m], x_in[m]
                    Bk = zero if var_B else B[U(dc), U(k), 0]
                    Ck = zero if var_C else C[U(dc), U(k), 0]
                    for j in range(BT):
                        a = one  # Ā_0 multiplies x_{-1} = 0 (and e^{Δ_0 A} may be inf)
                        if j > 0 or t0 > 0:
                            a = math.exp(sdt[U(gi), U(j)] * Ak)
                        xk = a * xk + sdu[U(gi), U(j)] * (sB[U(k), U(j)] if var_B else Bk)
                        X[m, j], Ab[m, j] = xk, a
                    # [core] selective_scan_cuda_backward
                    for jj in range(BT):  # from the tile's end: dx_t = C_t dy_t + ρ_t
                        j = BT - 1 - jj
                        dy, Ct = sdy[U(gi), U(j)], sC[U(k), U(j)] if var_C else Ck
                        dx = Ct * dy + r0
                        x_prev = X[m, j - 1] if j > 0 else x_in[m]
                        dAbar = dx * x_prev * Ab[m, j]  # ∂L/∂Ā_t · Ā_t
                        lA[m] += dAbar * sdt[U(gi), U(j)]
                        s1 = dx * (sB[U(k), U(j)] if var_B else Bk)  # my share of S1_t
                        s2, dBk = dAbar * Ak, dx * sdu[U(gi), U(j)]  # of S2_t; ∂B_t[k]
                        if m == 0:
                            sP[0, U(gi), U(j), U(lane)] = s1
                            sP[1, U(gi), U(j), U(lane)] = s2
                        else:
                            sP[0, U(gi), U(j), U(lane)] += s1
                            sP[1, U(gi), U(j), U(lane)] += s2
                        if has_z:  # my share of y_t = Σ_k C_t x_t, for ∂z_t
                            if m == 0:
                                sP[2, U(gi), U(j), U(lane)] = Ct * X[m, j]
                            else:
                                sP[2, U(gi), U(j), U(lane)] += Ct * X[m, j]
                        if var_B:
                            sQ[0, U(gi), U(j), U(k)] = dBk
                        else:
                            lB[m] += dBk
                        if var_C:
                            sQ[iC, U(gi), U(j), U(k)] = dy * X[m, j]
                        else:
                            lC[m] += dy * X[m, j]
                        r0 = Ab[m, j] * dx  # ρ_{t-1} = Ā_t dx_t
                    rho[m] = r0
                    # [/core]
                elif m == 0:  # no state (n < LANES): zero shares
                    for j in range(BT):
                        for s in range(SHARES[0]):
                            sP[s, U(gi), U(j), U(lane)] = zero
            cuda.syncthreads()
            # 4. per (channel, step): the lanes' shares summed
            for q in range(ROWS):
                e = tid + q * NT
                if e < CH * BT:
                    gq, j = e // BT, e % BT
                    cq, t = c0 + gq, t0 + j
                    if cq < d and t < l:
                        S1, S2, y = zero, zero, zero
                        for r in range(LANES):
                            S1 += sP[0, U(gq), U(j), U(r)]
                            S2 += sP[1, U(gq), U(j), U(r)]
                            if has_z:
                                y += sP[2, U(gq), U(j), U(r)]
                        dt, uu, dy = sdt[U(gq), U(j)], su[U(gq), U(j)], sdy[U(gq), U(j)]
                        Dc = D[U(cq)]
                        du[U(bi), U(cq), U(t)] = dt * S1 + Dc * dy
                        ddt = S2 + uu * S1
                        if softplus:
                            ddt *= ssp[U(gq), U(j)]
                        ddelta[U(bi), U(cq), U(t)] = ddt
                        lD[q] += dy * uu
                        lbias[q] += ddt
                        if has_z:
                            dz[U(bi), U(cq), U(t)] = sgz[U(gq), U(j)] * (y + Dc * uu)
            # ... and per (state, step): the block's channels summed, ∂B_t, ∂C_t
            if var_B or var_C:
                for q in range(COLS):
                    e = tid + q * NT
                    kq, j = e // BT, e % BT
                    t = t0 + j
                    if e < n * BT and t < l:
                        vb, vc = zero, zero
                        for r in range(CH):
                            if var_B:
                                vb += sQ[0, U(r), U(j), U(kq)]
                            if var_C:
                                vc += sQ[iC, U(r), U(j), U(kq)]
                        if var_B:
                            dBp[U(bi), U(blk), U(kq), U(t)] = vb
                        if var_C:
                            dCp[U(bi), U(blk), U(kq), U(t)] = vc
            cuda.syncthreads()
        if first_pass:
            if mine:
                for m in range(STATES):
                    k = lane + m * LANES
                    if k < n:
                        seg_h[U(bi), U(di), U(seg), U(k)] = rho[m]
                if lane == 0:
                    seg_dsum[U(bi), U(di), U(seg)] = dsum
            return
        # per-block partials (summed by the host in a fixed order: deterministic gradients)
        if mine:
            for m in range(STATES):
                k = lane + m * LANES
                if k < n:
                    dA[U(bi), U(seg), U(di), U(k)] = lA[m]
                    if not var_B:
                        dBf[U(bi), U(seg), U(di), U(k)] = lB[m]
                    if not var_C:
                        dCf[U(bi), U(seg), U(di), U(k)] = lC[m]
        for q in range(ROWS):  # ∂D, ∂bias: the block's BT shares per channel, summed
            e = tid + q * NT
            if e < CH * BT:
                sP[0, U(e // BT), U(e % BT), 0] = lD[q]
                sP[1, U(e // BT), U(e % BT), 0] = lbias[q]
        cuda.syncthreads()
        if tid < CH and c0 + tid < d:
            sD, sbias = zero, zero
            for j in range(BT):
                sD += sP[0, U(tid), U(j), 0]
                sbias += sP[1, U(tid), U(j), 0]
            dD[U(bi), U(seg), U(c0 + tid)] = sD
            dbias[U(bi), U(seg), U(c0 + tid)] = sbias

    return bwd


def _fwd_cuda(u, delta, A, B3, B2, C3, C2, D, z, bias, flags):
    if A.shape[1] > N_MAX:
        raise ValueError(f"A: the cuda backend supports d_state n <= {N_MAX}, got {A.shape[1]}")
    batch, d, l = u.shape
    var_B, var_C = flags[:2]
    dtype = numpy_dtype(u.dtype)
    out = torch.empty_like(u)
    last = u.new_empty(batch, d, A.shape[1])
    ckpt = u.new_empty(batch, d, -(-l // _bwd_plan(dtype, A.shape[1], *flags)[0]), A.shape[1])
    B = B3 if var_B else B2[:, :, None]  # (d, n, 1): one kernel signature for both layouts
    C = C3 if var_C else C2[:, :, None]
    blocks = -(-d // CHANNELS)
    seg_len, segments = _segments(l, blocks * batch)
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
    n = A.shape[1]
    var_B, var_C = flags[:2]
    dtype = numpy_dtype(u.dtype)
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.empty_like(u)
    # the same segments as the forward; the backward's block holds CH channels (its plan)
    seg_len, segments = _segments(l, -(-d // CHANNELS) * batch)
    first_flags = (False, var_C, flags[2], flags[3])  # pass 1 reads no B
    blocks = -(-d // _bwd_plan(dtype, n, *flags)[1])
    # per-block partials, summed below in a fixed order (no atomics: deterministic gradients)
    dA, dB2, dC2 = (u.new_empty(batch, segments, d, n) for _ in range(3))
    dD, dbias = u.new_empty(batch, segments, d), u.new_empty(batch, segments, d)
    dummy = u.new_empty(1, 1, 1, 1)
    dBp = u.new_empty(batch, blocks, n, l) if var_B else dummy  # ∂B_t per block of channels
    dCp = u.new_empty(batch, blocks, n, l) if var_C else dummy
    B = B3 if var_B else B2[:, :, None]  # (d, n, 1): one kernel signature for both layouts
    C = C3 if var_C else C2[:, :, None]
    seg_h = u.new_empty(batch, d, segments, n)
    seg_dsum = u.new_empty(batch, d, segments)
    args = (u, delta, A, B, C, D, z if flags[2] else u, bias, g, dlast, ckpt, seg_h, seg_dsum,
            seg_len, du, ddelta, dz, dA, dB2, dC2, dBp, dCp, dD, dbias)
    if segments > 1:  # pass 1: each segment but the first, from ρ = 0 at its end
        ch = _bwd_plan(dtype, n, *first_flags)[1]
        launch(_backward_kernel(dtype, n, *first_flags, True), (-(-d // ch), batch, segments - 1),
               ch * LANES, *args)
    launch(_backward_kernel(dtype, n, *flags), (blocks, batch, segments),
           _bwd_plan(dtype, n, *flags)[1] * LANES, *args)
    dB3 = dBp.sum(1) if var_B else B3.new_zeros(B3.shape)
    dC3 = dCp.sum(1) if var_C else C3.new_zeros(C3.shape)
    dB2 = B2.new_zeros(B2.shape) if var_B else dB2.sum((0, 1))
    dC2 = C2.new_zeros(C2.shape) if var_C else dC2.sum((0, 1))
    return du, ddelta, dA.sum((0, 1)), dB3, dB2, dC3, dC2, dD.sum((0, 1)), dz, dbias.sum((0, 1))
