"""Selective scan (Mamba's S6 recurrence): x_t = exp(Δ_t A) ⊙ x_{t-1} + Δ_t B_t u_t, y_t = C_t x_t.

References: Gu & Dao, "Mamba: linear-time sequence modeling with selective state spaces" (2023),
section 3.2 (selection: Δ, B, C depend on the input), section 3.3 and Algorithm 2 (the
hardware-aware scan: the expanded state never leaves fast memory); Blelloch, "Prefix sums and
their applications" (1990) for ``parallel_scan``.

Arguments follow ``mamba_ssm``'s ``selective_scan_fn`` for real A. Glossary (code = paper):
``u`` = the input x of the paper, ``delta`` = Δ, ``x`` = the hidden state h (so that the input
can be called u, as in mamba_ssm), ``A, B, C, D`` as in the paper, ``z`` = the gate branch.
Shapes: ``b`` batch, ``d`` channels, ``l`` length, ``n`` state size.

    Δ   = softplus(delta + delta_bias)   (softplus only if delta_softplus)     (b, d, l)
    Ā_t = exp(Δ_t A)                      zero-order hold for A                 (b, d, n) per t
    B̄_t = Δ_t B_t                         Euler for B, as Mamba does            (b, d, n) per t
    x_t = Ā_t ⊙ x_{t-1} + B̄_t u_t         x_{-1} = 0                            (b, d, n)
    y_t = C_t · x_t + D u_t,   then  y ← y · silu(z)                             (b, d)

Backward (g = ∂L/∂y before the gate is turned into dy = ∂L/∂(C·x + D u)), with
dx_t = ∂L/∂x_t accumulated from the end (dx_{l-1} includes ∂L/∂x_L):
    dx_t = C_t dy_t + Ā_{t+1} ⊙ dx_{t+1}
    ∂Ā_t = dx_t ⊙ x_{t-1}  ->  ∂Δ_t += Σ_n (∂Ā_t Ā_t A + dx_t B_t u_t),  ∂A += Σ_{b,t} ∂Ā_t Ā_t Δ_t
    ∂B_t += dx_t Δ_t u_t,   ∂C_t += dy_t x_t,   ∂u_t = D dy_t + Σ_n dx_t Δ_t B_t,   ∂D = Σ dy u
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda, njit, prange

from minimodels.backend import cuda_simulated, dispatch, expect_tensor, launch, to_numba
from minimodels.kernels.fastexp import exp_neg
from minimodels.kernels.scan import ITEMS, THREADS, _scan_maps

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_cpu", "selective_scan_cuda",
           "parallel_scan", "combine", "IMPLS"]

# =============================================================================================
# Constants
# =============================================================================================

# CUDA: one block per (b, d) row, THREADS threads, ITEMS steps each: chunks of CHUNK steps,
# the same layout as kernels/scan.py, whose block scan of affine maps (_scan_maps) we reuse.
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
SOFTPLUS_THRESHOLD = 20.0  # as torch.nn.functional.softplus: softplus(v) = v above it


# =============================================================================================
# Reference (the definition; autograd differentiates it)
# =============================================================================================


def _discretise(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]  # (b, d, l)
    return F.softplus(delta) if delta_softplus else delta


def _at(M, t):
    """B or C at step t, broadcastable against the state (b, d, n)."""
    return M[:, None, :, t] if M.dim() == 3 else M  # (b, 1, n) or (d, n)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """The selective scan as a Python loop over time (see the module docstring).

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l) or (d, n); D, delta_bias: (d,);
    z: (b, d, l) -> y: (b, d, l) [, x_L: (b, d, n)]."""
    delta = _discretise(delta, delta_bias, delta_softplus)  # Δ: (b, d, l)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[..., t, None]  # (b, d, 1)
        x = torch.exp(dt * A) * x + dt * _at(B, t) * u[..., t, None]  # (b, d, n)
        ys.append((x * _at(C, t)).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1) if ys else u.clone()  # (b, d, l)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, x) if return_last_state else y


# =============================================================================================
# CPU kernel (Numba). One row (b, d) per iteration: the n states live in a small local array,
# so the (b, d, l, n) expansion is never stored. It costs b·d·l·n exps; with A ≤ 0 (a decaying
# state, as Mamba's A = -exp(A_log)) they are kernels/fastexp.py's exp_neg, and the update
# of the n states at one step is one vectorised loop (B and C are transposed to (b, l, n) for
# it); otherwise one scalar libm call each. The backward recomputes the row's states into a
# per-thread scratch of (l+1, n) (never the whole (b, d, l, n)) and walks back; reductions over rows
# (∂A, ∂B, ∂C, ∂D, ∂bias) go into one private buffer per worker, summed afterwards.
# =============================================================================================


def _selective_scan_loop(u, delta, A, Bt, B2, Ct, C2, D, z, bias, var_B, var_C, has_z,
                         softplus, nonpos, out, last):
    """Forward. u, delta, z, out: (b, d, l); A, B2, C2: (d, n); Bt, Ct: (b, l, n) (B and C
    transposed, so a step's n values are contiguous); D, bias: (d,); last: (b, d, n).
    var_B / var_C pick Bt (input-dependent) or B2 (fixed); nonpos: every Δ A ≤ 0 (A ≤ 0),
    so exp_neg applies."""
    batch, d, l = u.shape
    n = A.shape[1]
    for r in prange(batch * d):
        bi, di = r // d, r % d
        a = A[di]  # (n,)
        x = np.zeros_like(a)  # (n,) the state, in cache
        for t in range(l):
            dt = delta[bi, di, t] + bias[di]
            if softplus and dt <= SOFTPLUS_THRESHOLD:
                dt = math.log1p(math.exp(dt))
            ut = u[bi, di, t]
            dtu = dt * ut
            Bv = Bt[bi, t] if var_B else B2[di]  # (n,)
            Cv = Ct[bi, t] if var_C else C2[di]
            if nonpos:  # no call, no branch: LLVM vectorises over the n states
                for k in range(n):
                    x[k] = exp_neg(dt * a[k]) * x[k] + dtu * Bv[k]
            else:
                for k in range(n):
                    x[k] = math.exp(dt * a[k]) * x[k] + dtu * Bv[k]
            y = 0.0
            for k in range(n):
                y += Cv[k] * x[k]
            y += D[di] * ut
            if has_z:
                zt = z[bi, di, t]
                y *= zt / (1.0 + math.exp(-zt))
            out[bi, di, t] = y
        for k in range(n):
            last[bi, di, k] = x[k]


def _selective_scan_bwd_loop(u, delta, A, Bt, B2, Ct, C2, D, z, bias, var_B, var_C, has_z,
                             softplus, nonpos, g, dlast, du, ddelta, dz, dA, dB3, dB2, dC3, dC2,
                             dD, dbias):
    """Backward. Inputs as the forward's; g, du, ddelta, dz: (b, d, l); dlast: (b, d, n).
    Per-worker partial sums (first axis w, zeroed on entry): dA, dB2, dC2: (w, d, n); dB3,
    dC3: (w, b, n, l); dD, dbias: (w, d)."""
    batch, d, l = u.shape
    n = A.shape[1]
    workers = dA.shape[0]
    for w in prange(workers):
        xs = np.zeros((l + 1, n), dtype=u.dtype)  # xs[t + 1] = x_t, xs[0] = x_{-1} = 0
        ab = np.empty((l, n), dtype=u.dtype)  # Ā_t, kept from the recomputation
        dts = np.empty(l, dtype=u.dtype)  # Δ_t
        c = np.empty(n, dtype=u.dtype)  # Ā_{t+1} ⊙ dx_{t+1}: what flows back into x_t
        for r in range(w, batch * d, workers):
            bi, di = r // d, r % d
            for t in range(l):  # recompute the forward, storing the row's states
                dt = delta[bi, di, t] + bias[di]
                if softplus and dt <= SOFTPLUS_THRESHOLD:
                    dt = math.log1p(math.exp(dt))
                dts[t] = dt
                dtu = dt * u[bi, di, t]
                Bv = Bt[bi, t] if var_B else B2[di]  # (n,)
                if nonpos:  # vectorised over the n states, as in the forward
                    for k in range(n):
                        ab[t, k] = exp_neg(dt * A[di, k])
                else:
                    for k in range(n):
                        ab[t, k] = math.exp(dt * A[di, k])
                for k in range(n):
                    xs[t + 1, k] = ab[t, k] * xs[t, k] + dtu * Bv[k]
            for k in range(n):
                c[k] = dlast[bi, di, k]
            for t in range(l - 1, -1, -1):
                dt, ut = dts[t], u[bi, di, t]
                dy = g[bi, di, t]
                if has_z:  # y = (C·x + D u) silu(z)
                    y = D[di] * ut
                    for k in range(n):
                        y += (Ct[bi, t, k] if var_C else C2[di, k]) * xs[t + 1, k]
                    zt = z[bi, di, t]
                    s = 1.0 / (1.0 + math.exp(-zt))
                    dz[bi, di, t] = dy * y * s * (1.0 + zt * (1.0 - s))
                    dy *= zt * s
                ddt = 0.0
                dut = D[di] * dy
                dD[w, di] += dy * ut
                for k in range(n):
                    Bk = Bt[bi, t, k] if var_B else B2[di, k]
                    Ck = Ct[bi, t, k] if var_C else C2[di, k]
                    dx = Ck * dy + c[k]
                    dAbar = dx * xs[t, k] * ab[t, k]  # ∂L/∂(Δ_t A)
                    ddt += dAbar * A[di, k] + dx * Bk * ut
                    dA[w, di, k] += dAbar * dt
                    dut += dx * dt * Bk
                    if var_B:
                        dB3[w, bi, k, t] += dx * dt * ut
                    else:
                        dB2[w, di, k] += dx * dt * ut
                    if var_C:
                        dC3[w, bi, k, t] += dy * xs[t + 1, k]
                    else:
                        dC2[w, di, k] += dy * xs[t + 1, k]
                    c[k] = ab[t, k] * dx
                du[bi, di, t] = dut
                raw = delta[bi, di, t] + bias[di]
                if softplus and raw <= SOFTPLUS_THRESHOLD:
                    ddt *= 1.0 / (1.0 + math.exp(-raw))
                ddelta[bi, di, t] = ddt
                dbias[w, di] += ddt


_selective_scan_cpu_fwd = njit(parallel=True, cache=True)(_selective_scan_loop)
_selective_scan_cpu_bwd = njit(parallel=True, cache=True)(_selective_scan_bwd_loop)


def _cpu_inputs(u, delta, A, B3, B2, C3, C2, D, z, bias, flags):
    """The CPU kernels' inputs: B and C transposed to (b, l, n) (a step's states contiguous),
    and whether A ≤ 0 everywhere (then Δ A ≤ 0 and the vectorisable exp_neg applies)."""
    var_B, var_C = flags[:2]
    Bt = B3.transpose(1, 2).contiguous() if var_B else B3
    Ct = C3.transpose(1, 2).contiguous() if var_C else C3
    args = (u, delta, A, Bt, B2, Ct, C2, D, z, bias)
    return (*map(to_numba, args), *flags, bool((A <= 0).all()))


def _fwd_cpu(u, delta, A, B3, B2, C3, C2, D, z, bias, flags):
    out = torch.empty_like(u)
    last = u.new_empty(u.shape[0], u.shape[1], A.shape[1])
    _selective_scan_cpu_fwd(*_cpu_inputs(u, delta, A, B3, B2, C3, C2, D, z, bias, flags),
                            to_numba(out), to_numba(last))
    return out, last, None


def _bwd_cpu(u, delta, A, B3, B2, C3, C2, D, z, bias, flags, saved, g, dlast):
    w = numba.get_num_threads()
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(u)
    parts = [u.new_zeros((w,) + t.shape) for t in (A, B3, B2, C3, C2, D, bias)]
    _selective_scan_cpu_bwd(*_cpu_inputs(u, delta, A, B3, B2, C3, C2, D, z, bias, flags),
                            to_numba(g), to_numba(dlast), *map(to_numba, (du, ddelta, dz, *parts)))
    dA, dB3, dB2, dC3, dC2, dD, dbias = (p.sum(0) for p in parts)
    return du, ddelta, dA, dB3, dB2, dC3, dC2, dD, dz, dbias


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
            if not first_pass and k < n:
                for r in range(seg):  # x <- exp(A ΣΔ_r) x + x_r (x_r: segment r from zero)
                    xk = (math.exp(A[U(dc), U(k)] * seg_dsum[U(bi), U(dc), U(r)]) * xk
                          + seg_x[U(bi), U(dc), U(r), U(k)])
            x[m] = xk
        dsum = zero  # ΣΔ over the segment (pass 1)
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
                    sdt[U(gq), U(j)], sdu[U(gq), U(j)], su[U(gq), U(j)] = dt, dt * ru[q], ru[q]
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
# scan of affine maps x -> Ā x + B̄u (Ā and B̄u are made on the fly, in registers, from Δ, A, B, u:
# the expanded (l, n) tensors never touch global memory). The backward walks the chunks from
# the end, starting each from the forward's checkpoint: for each
# k it first recomputes the chunk's x from its checkpoint into shared memory, then runs the
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
                    fa[j] = math.exp(fdt[j] * Ak)
                    fb[j] = fdt[j] * (B3[bi, k, t] if var_B else B2[di, k]) * fu[j]
                    MA, MB = fa[j] * MA, fa[j] * MB + fb[j]
                p = _scan_maps(sA, sB, MA, MB, i)
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
                    ba[j] = math.exp(bdt[j] * Ak)
                    bg[j] = (C3[bi, k, t] if var_C else C2[di, k]) * bdy[j]
                    MA, MB = ba[j] * MA, ba[j] * (MB + bg[j])
                p = _scan_maps(sA, sB, MA, MB, i)
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


def _dtype(x: torch.Tensor) -> np.dtype:
    return np.dtype(str(x.dtype).removeprefix("torch."))


def _fwd_cuda(u, delta, A, B3, B2, C3, C2, D, z, bias, flags):
    if A.shape[1] > N_MAX:
        raise ValueError(f"A: the cuda backend supports d_state n <= {N_MAX}, got {A.shape[1]}")
    batch, d, l = u.shape
    var_B, var_C = flags[:2]
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
        first = _forward_kernel(_dtype(u), A.shape[1], var_B, False, False, flags[3], True)
        launch(first, (blocks, batch, segments - 1), BLOCK, *args)
    launch(_forward_kernel(_dtype(u), A.shape[1], *flags), (blocks, batch, segments), BLOCK,
           *args)
    return out, last, ckpt


def _bwd_cuda(u, delta, A, B3, B2, C3, C2, D, z, bias, flags, ckpt, g, dlast):
    batch, d, l = u.shape
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(u)
    grads = [torch.zeros_like(t) for t in (A, B3, B2, C3, C2, D, bias)]
    bwd = _backward_kernel(_dtype(u))
    launch(bwd, batch * d, THREADS, u, delta, A, B3, B2, C3, C2, D, z, bias, *flags, ckpt, g,
            dlast, du, ddelta, dz, *grads)
    dA, dB3, dB2, dC3, dC2, dD, dbias = grads
    return du, ddelta, dA, dB3, dB2, dC3, dC2, dD, dz, dbias


# =============================================================================================
# Autograd: forward and backward are both kernels of the chosen backend
# =============================================================================================


class _SelectiveScan(torch.autograd.Function):
    """Wraps a (forward, backward) pair of kernels as one differentiable op."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernels):
        fwd, bwd = kernels
        batch, d, l = u.shape
        n = A.shape[1]
        dummy3, dummy2 = u.new_zeros(1, 1, 1), u.new_zeros(1, 1)
        var_B, var_C = B.dim() == 3, C.dim() == 3
        args = (
            u.contiguous(), delta.contiguous(), A.contiguous(),
            B.contiguous() if var_B else dummy3, dummy2 if var_B else B.contiguous(),
            C.contiguous() if var_C else dummy3, dummy2 if var_C else C.contiguous(),
            u.new_zeros(d) if D is None else D.contiguous(),
            dummy3 if z is None else z.contiguous(),
            u.new_zeros(d) if delta_bias is None else delta_bias.contiguous(),
        )
        flags = (var_B, var_C, z is not None, bool(delta_softplus))
        if l == 0:
            out, last, saved = torch.empty_like(u), u.new_zeros(batch, d, n), None
        else:
            out, last, saved = fwd(*args, flags)
        ctx.save_for_backward(*args, saved)
        ctx.bwd, ctx.flags = bwd, flags
        ctx.given = (D is not None, z is not None, delta_bias is not None)
        return out, last

    @staticmethod
    def backward(ctx, g, glast):
        args = ctx.saved_tensors[:10]
        saved = ctx.saved_tensors[10]
        u = args[0]
        if u.shape[-1] == 0:
            grads = [torch.zeros_like(a) for a in args]
            du, ddelta, dA, dB3, dB2, dC3, dC2, dD, dz, dbias = grads
        else:
            g = torch.zeros_like(u) if g is None else g.contiguous()
            glast = (u.new_zeros(u.shape[0], u.shape[1], args[2].shape[1]) if glast is None
                     else glast.contiguous())
            du, ddelta, dA, dB3, dB2, dC3, dC2, dD, dz, dbias = ctx.bwd(
                *args, ctx.flags, saved, g, glast)
        var_B, var_C = ctx.flags[:2]
        has_D, has_z, has_bias = ctx.given
        return (du, ddelta, dA, dB3 if var_B else dB2, dC3 if var_C else dC2,
                dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
                None, None)


def _apply(kernels, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    y, last = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernels)
    return (y, last) if return_last_state else y


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """Numba CPU kernel, parallel over the b·d rows. Same contract as ``selective_scan_ref``."""
    return _apply((_fwd_cpu, _bwd_cpu), u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                  return_last_state)


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False, return_last_state=False):
    """numba.cuda kernel (or the CUDA simulator). Same contract as ``selective_scan_ref``."""
    return _apply((_fwd_cuda, _bwd_cuda), u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                  return_last_state)


# =============================================================================================
# The scan as an associative operator (Blelloch 1990), in plain PyTorch, for teaching
# =============================================================================================


def combine(left, right):
    """Compose two steps of h -> a h + b: first ``left`` = (a1, b1), then ``right`` = (a2, b2).

    (a1, b1) • (a2, b2) = (a1 a2, a2 b1 + b2). Associative, with identity (1, 0)."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def parallel_scan(a, b, op=combine):
    """h_t = a_t h_{t-1} + b_t (h_{-1} = 0) by Blelloch's work-efficient scan over the last axis.

    a, b: (..., l) -> h: (..., l). The length is padded to L = 2^⌈log2 l⌉ with the identity
    (1, 0). Up-sweep: log2 L levels, each combining neighbouring pairs into their parent, build
    the tree of partial compositions. Down-sweep: the root gets the identity; going down, a left
    child gets its parent's prefix and a right child gets parent's prefix • left sibling. That
    is 2(L-1) combines in all (work O(l)) in 2 log2 L levels (depth O(log l)); each level is one
    vectorised PyTorch op (written without in-place writes, so autograd goes through it).
    ``op`` is the combine operator (Exercise 5.2 plugs its own in)."""
    l = a.shape[-1]
    L = 1 << max(l - 1, 0).bit_length()
    level = F.pad(a, (0, L - l), value=1.0), F.pad(b, (0, L - l), value=0.0)  # (..., L)
    tree = []
    while level[0].shape[-1] > 1:  # up-sweep
        tree.append(level)
        pairs = [x.unflatten(-1, (-1, 2)) for x in level]  # (..., m, 2)
        level = op((pairs[0][..., 0], pairs[1][..., 0]), (pairs[0][..., 1], pairs[1][..., 1]))
    prefix = torch.ones_like(level[0]), torch.zeros_like(level[1])  # root: the identity
    for P, Q in reversed(tree):  # down-sweep
        left = P[..., 0::2], Q[..., 0::2]
        right_prefix = op(prefix, left)
        prefix = tuple(torch.stack([p, r], -1).flatten(-2)
                       for p, r in zip(prefix, right_prefix, strict=True))  # (..., 2m)
    inclusive = op(tuple(x[..., :l] for x in prefix), (a, b))  # everything up to step t
    return inclusive[1]  # applied to h_{-1} = 0


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": selective_scan_ref, "cpu": selective_scan_cpu, "cuda": selective_scan_cuda}


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend=None):
    """Mamba's selective scan (see the module docstring for the equations).

    Args:
        u, delta: (b, d, l) float32 or float64, same dtype and device.
        A: (d, n) real (negative for a decaying state).
        B, C: (b, n, l) input-dependent, or (d, n) fixed; told apart by rank.
        D: (d,) skip connection, or None. z: (b, d, l) gate, or None.
        delta_bias: (d,) added to delta, or None. delta_softplus: apply softplus to Δ.
        return_last_state: also return x_L.
        backend: "ref", "cpu", "cuda", a callable with this signature, or None (by device).

    Returns:
        y: (b, d, l), and x_L: (b, d, n) when return_last_state. Differentiable everywhere.
    """
    expect_tensor("u", u, "b, d, l")
    batch, d, l = u.shape
    expect_tensor("delta", delta, "b, d, l", dtypes=(u.dtype,), shape=u.shape)
    expect_tensor("A", A, "d, n", dtypes=(u.dtype,))
    if A.shape[0] != d:
        raise ValueError(f"A must have shape (d, n) with d = {d}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if isinstance(M, torch.Tensor) and M.dim() == 2:
            expect_tensor(name, M, "d, n", dtypes=(u.dtype,), shape=(d, n))
        else:
            expect_tensor(name, M, "b, n, l", dtypes=(u.dtype,), shape=(batch, n, l))
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None:
            expect_tensor(name, v, "d", dtypes=(u.dtype,), shape=(d,))
    if z is not None:
        expect_tensor("z", z, "b, d, l", dtypes=(u.dtype,), shape=u.shape)
    return dispatch(IMPLS, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                    return_last_state, backend=backend)
