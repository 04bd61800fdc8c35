"""Neighbourhood attention's CUDA kernels (numba.cuda) and their host launchers, the only place
that knows grid and block. The equations and the glossary: kernels/natten/__init__.py."""

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

TILE = 4 if cuda_simulated() else 8  # CUDA: a block owns TILE x TILE queries (one per thread)
MAX_KERNEL = 13  # CUDA: the largest window side (the K² scores live in each thread's registers)
MAX_WINDOW = MAX_KERNEL * MAX_KERNEL  # (a constant: numba.cuda sizes local arrays only by those)
HALO = 8 + MAX_KERNEL - 1  # CUDA: the side of the key halo a tile's windows cover, at most
E_CHUNK = 8  # CUDA: head dims of the halo held in shared memory at a time
BWD_THREADS = 8 if cuda_simulated() else 128  # CUDA backward: queries per block


# =============================================================================================
# CUDA forward (numba.cuda). A block owns a TILE x TILE tile of queries of one head; thread t
# owns query (i0 + t // TILE, j0 + t % TILE). The windows of the tile's queries lie inside one
# halo of at most (TILE + K − 1)² pixels (window starts grow by at most 1 per query), so the
# block stages the halo's keys in shared memory, E_CHUNK head dims at a time, and each thread
# adds those dims' share of its K² dot products to its scores: every key is read from global
# memory once per tile instead of once per query (K² times). Then each thread's softmax runs in
# its registers, and the values' halo is staged the same way for the weighted sum.
# =============================================================================================


@functools.cache
def _natten_kernels(dtype: np.dtype):
    """Compile-once (per dtype) forward and backward kernels."""
    zero = dtype.type(0)
    ninf = dtype.type(-np.inf)

    @cuda.jit
    def fwd(q, k, v, out, lse, K, scale):
        halo = cuda.shared.array((HALO, HALO, E_CHUNK), dtype)
        s = cuda.local.array(MAX_WINDOW, dtype)
        R, H, W, e = q.shape
        tid = cuda.threadIdx.x
        n_i, n_j = (H + TILE - 1) // TILE, (W + TILE - 1) // TILE
        r, tile = cuda.blockIdx.x // (n_i * n_j), cuda.blockIdx.x % (n_i * n_j)
        i0, j0 = (tile // n_j) * TILE, (tile % n_j) * TILE
        # [core] natten_cuda
        half = K // 2
        hr0 = min(max(i0 - half, 0), H - K)  # the halo: the first window's corner ...
        hc0 = min(max(j0 - half, 0), W - K)
        nr, nc = min(TILE + K - 1, H - hr0), min(TILE + K - 1, W - hc0)  # ... and its size
        i, j = i0 + tid // TILE, j0 + tid % TILE
        active = i < H and j < W
        ii, jj = min(i, H - 1), min(j, W - 1)
        a0 = min(max(ii - half, 0), H - K) - hr0  # this query's window, inside the halo
        c0 = min(max(jj - half, 0), W - K) - hc0
        for t in range(K * K):
            s[t] = zero
        for d0 in range(0, e, E_CHUNK):  # S = q kᵀ, E_CHUNK dims of the keys' halo at a time
            nd = min(E_CHUNK, e - d0)
            cuda.syncthreads()
            for m in range(tid, nr * nc * nd, TILE * TILE):
                a, c, d = m // (nc * nd), (m // nd) % nc, m % nd
                halo[a, c, d] = k[r, hr0 + a, hc0 + c, d0 + d]
            cuda.syncthreads()
            for d in range(nd):
                qd = scale * q[r, ii, jj, d0 + d]  # scale · q first, as the reference
                for a in range(K):
                    for c in range(K):
                        s[a * K + c] += qd * halo[a0 + a, c0 + c, d]
        m = ninf
        for t in range(K * K):
            m = max(m, s[t])
        m = zero if m == ninf else m
        total = zero
        for t in range(K * K):  # P = exp(S − max), in registers
            s[t] = math.exp(s[t] - m)
            total += s[t]
        # [/core]
        for d0 in range(0, e, E_CHUNK):  # O = P v, the values' halo the same way
            nd = min(E_CHUNK, e - d0)
            cuda.syncthreads()
            for m2 in range(tid, nr * nc * nd, TILE * TILE):
                a, c, d = m2 // (nc * nd), (m2 // nd) % nc, m2 % nd
                halo[a, c, d] = v[r, hr0 + a, hc0 + c, d0 + d]
            cuda.syncthreads()
            if active:
                for d in range(nd):
                    acc = zero
                    for a in range(K):
                        for c in range(K):
                            acc += s[a * K + c] * halo[a0 + a, c0 + c, d]
                    out[r, i, j, d0 + d] = acc / total
        if active:  # total = 0 (every score −∞): lse = −∞ (the simulator's log(0) raises)
            lse[r, i, j] = m + math.log(total) if total > zero else ninf

    @cuda.jit
    def bwd(q, k, v, g, dq, dk, dv, K, scale):
        """One thread per query: dq directly; dk, dv scattered with atomic adds."""
        R, H, W, e = q.shape
        n = cuda.grid(1)
        if n >= R * H * W:
            return
        r, i, j = n // (H * W), (n // W) % H, n % W
        half = K // 2
        r0 = min(max(i - half, 0), H - K)
        c0 = min(max(j - half, 0), W - K)
        p = cuda.local.array(MAX_WINDOW, dtype)
        dp = cuda.local.array(MAX_WINDOW, dtype)
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
        for t in range(K * K):
            m = max(m, p[t])
        m = zero if m == ninf else m
        total = zero
        for t in range(K * K):
            p[t] = math.exp(p[t] - m)
            total += p[t]
        D = zero
        for t in range(K * K):
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

    return fwd, bwd


def _check_kernel(kernel_size):
    if kernel_size > MAX_KERNEL:
        raise ValueError(f"the cuda backend keeps a query's K² scores in registers: kernel_size "
                         f"must be <= {MAX_KERNEL}, got {kernel_size}")


def _fwd_cuda(q, k, v, kernel_size, scale):
    _check_kernel(kernel_size)
    R, H, W, _ = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1])
    if q.numel():
        dtype = numpy_dtype(q.dtype)
        fwd, _ = _natten_kernels(dtype)
        grid = R * ((H + TILE - 1) // TILE) * ((W + TILE - 1) // TILE)
        launch(fwd, grid, TILE * TILE, q, k, v, out, lse, kernel_size, dtype.type(scale))
    return out, lse


def _bwd_cuda(q, k, v, g, kernel_size, scale):
    _check_kernel(kernel_size)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.numel():
        dtype = numpy_dtype(q.dtype)
        _, bwd = _natten_kernels(dtype)
        n = q.shape[0] * q.shape[1] * q.shape[2]
        launch(bwd, (n + BWD_THREADS - 1) // BWD_THREADS, BWD_THREADS, q, k, v, g, dq, dk, dv,
               kernel_size, dtype.type(scale))
    return dq, dk, dv
