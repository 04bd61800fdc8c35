"""The S4D kernel's CUDA kernels (numba.cuda) and their host launchers, the only place that
knows grid and block. The equations and the glossary: kernels/ssm_kernel/__init__.py."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import numpy_dtype
from minimodels.kernels.ssm_kernel.cpu import _mode_grads  # plain Python: a device function here

# =============================================================================================
# Constants
# =============================================================================================

# CUDA forward: a block of THREADS threads owns THREADS·ITEMS consecutive l of one channel d;
# thread i owns l = l0 + i + k·THREADS (k < ITEMS: coalesced writes). It anchors exactly at its
# first l and then multiplies by z^THREADS, ITEMS − 1 times. Modes are staged in shared memory
# N_TILE at a time. The simulator (CI) uses small sizes so its tests cross tiles and blocks.
THREADS = 8 if cuda_simulated() else 128
ITEMS = 4 if cuda_simulated() else 8
N_TILE = 4 if cuda_simulated() else 64

# CUDA backward: one thread per (channel, MODES modes, chunk of CHUNK consecutive l): an exact
# anchor z^l every ANCHOR steps and the power recurrence between anchors, summing S and T, then
# one atomic add per sum. Threads of a warp hold consecutive modes of one chunk, so they read
# the same G[d, l]. Measured on the H200 at (1536, 32, 4096) complex64: backward 174 us with
# MODES = 4 (327 with 1, 221 with 2, 214 with 8; CHUNK 128-512 within 3%), forward 129 us.
BWD_THREADS = 8 if cuda_simulated() else 128
CHUNK = 8 if cuda_simulated() else 256
ANCHOR = 4 if cuda_simulated() else 64
MODES = 2 if cuda_simulated() else 4  # modes per thread: one load of G[d, l] for all of them


# =============================================================================================
# CUDA kernel (numba.cuda). Grid (L / (THREADS·ITEMS), d). Each tile of N_TILE modes is staged
# in shared memory (Δ·A, w, z^THREADS computed once per block by the first threads); then each
# thread evaluates one exact anchor w·z^{l} per mode and ITEMS − 1 multiplications, summing
# Re(·) into ITEMS registers: one complex exp per mode per ITEMS outputs, not per output.
# Backward: grid (n·L / (MODES·CHUNK·BWD_THREADS), d) of threads (mode group, chunk) adding
# their S and T into a float64 (d, n, 4) array (exact anchors every ANCHOR steps); then one
# thread per mode turns them into gradients.
# =============================================================================================


@functools.cache
def _s4d_cuda_kernel(dtype: np.dtype):
    """Compile-once (per dtype) kernel. Constants are typed so float32 math stays float32."""
    real = dtype.type
    zero, one, half, two, span = real(0), real(1), real(0.5), real(2), real(THREADS)
    third, quarter = real(1 / 3), real(0.25)
    small2 = real(1e-4 if dtype == np.float32 else 1e-8)  # SERIES²

    @cuda.jit
    def kernel(A, C, dt, K):
        # A, C: (d, n, 2) real and imaginary parts; dt: (d,); K: (d, L).
        s_ar = cuda.shared.array(N_TILE, dtype)  # Re Δ·A
        s_ai = cuda.shared.array(N_TILE, dtype)  # Im Δ·A
        s_wr = cuda.shared.array(N_TILE, dtype)  # Re w = 2·C·B̄
        s_wi = cuda.shared.array(N_TILE, dtype)
        s_zr = cuda.shared.array(N_TILE, dtype)  # Re z^THREADS
        s_zi = cuda.shared.array(N_TILE, dtype)
        acc = cuda.local.array(ITEMS, dtype)
        n = A.shape[1]
        L = K.shape[1]
        c, i = cuda.blockIdx.y, cuda.threadIdx.x
        first = cuda.blockIdx.x * THREADS * ITEMS + i  # my l: first + k·THREADS
        lf = real(first)
        step = dt[c]
        for k in range(ITEMS):
            acc[k] = zero
        for n0 in range(0, n, N_TILE):
            m = min(N_TILE, n - n0)
            for k in range(i, m, THREADS):  # stage the tile: O(n) exps per block
                Ar, Ai = A[c, n0 + k, 0], A[c, n0 + k, 1]
                Cr, Ci = C[c, n0 + k, 0], C[c, n0 + k, 1]
                xr, xi = step * Ar, step * Ai
                den = xr * xr + xi * xi
                if den < small2:  # φ1(x) = 1 + x/2·(1 + x/3·(1 + x/4))
                    pr, pi = one + xr * quarter, xi * quarter
                    pr, pi = one + (pr * xr - pi * xi) * third, (pr * xi + pi * xr) * third
                    pr, pi = one + (pr * xr - pi * xi) * half, (pr * xi + pi * xr) * half
                else:  # φ1(x) = (exp(x) − 1)/x, the numerator without cancellation
                    sh = math.sin(half * xi)
                    er = math.expm1(xr) * math.cos(xi) - two * sh * sh
                    ei = math.exp(xr) * math.sin(xi)
                    pr, pi = (er * xr + ei * xi) / den, (ei * xr - er * xi) / den
                qr, qi = step * pr, step * pi  # B̄ = Δ·φ1(Δ·A)
                s_wr[k] = two * (Cr * qr - Ci * qi)
                s_wi[k] = two * (Cr * qi + Ci * qr)
                e = math.exp(xr * span)
                s_zr[k] = e * math.cos(xi * span)
                s_zi[k] = e * math.sin(xi * span)
                s_ar[k] = xr
                s_ai[k] = xi
            cuda.syncthreads()
            # [core] s4d_cuda
            for k in range(m):
                h = math.exp(s_ar[k] * (half * lf))  # the exact anchor w·z^first as
                cr, ci = math.cos(s_ai[k] * lf), math.sin(s_ai[k] * lf)  # ((w·phase)·h)·h,
                pr = (s_wr[k] * cr - s_wi[k] * ci) * h * h  # finite where the value is
                pi = (s_wr[k] * ci + s_wi[k] * cr) * h * h
                zr, zi = s_zr[k], s_zi[k]
                for j in range(ITEMS):  # z^{l + THREADS} = z^l · z^THREADS
                    acc[j] += pr
                    pr, pi = pr * zr - pi * zi, pr * zi + pi * zr
            # [/core]
            cuda.syncthreads()  # all have read the tile before the next one is staged
        for j in range(ITEMS):
            l = first + j * THREADS
            if l < L:
                K[c, l] = acc[j]

    return kernel


@functools.cache
def _s4d_cuda_bwd_kernels(dtype: np.dtype):
    """(sums, finish) kernels of the backward, compiled once per dtype."""
    real = dtype.type
    zero = real(0)
    f64 = np.float64
    mode_grads = cuda.jit(device=True)(_mode_grads)

    @cuda.jit
    def sums(A, dt, G, S):
        # A: (d, n, 2); dt: (d,); G: (d, L); S: (d, n, 4) float64 zeros, += Σ G·z^l, Σ l·G·z^l.
        # A thread owns MODES modes (one load of G[d, l] serves them all) and one chunk.
        pr = cuda.local.array(MODES, dtype)  # z^l
        pi = cuda.local.array(MODES, dtype)
        zr = cuda.local.array(MODES, dtype)  # z
        zi = cuda.local.array(MODES, dtype)
        xr = cuda.local.array(MODES, dtype)  # Δ·A
        xi = cuda.local.array(MODES, dtype)
        acc = cuda.local.array((MODES, 4), dtype)  # Re S, Im S, Re T, Im T (this chunk's)
        n = A.shape[1]
        L = G.shape[1]
        groups = (n + MODES - 1) // MODES
        c = cuda.blockIdx.y
        t = cuda.blockIdx.x * BWD_THREADS + cuda.threadIdx.x
        k0, q = (t % groups) * MODES, t // groups  # first mode, chunk
        l0 = q * CHUNK
        if l0 >= L:
            return
        step = dt[c]
        for u in range(MODES):
            k = min(k0 + u, n - 1)  # past the last mode: a copy, never written back
            xr[u], xi[u] = step * A[c, k, 0], step * A[c, k, 1]
            e = math.exp(xr[u])
            zr[u], zi[u] = e * math.cos(xi[u]), e * math.sin(xi[u])
            for v in range(4):
                acc[u, v] = zero
        m = min(CHUNK, L - l0)
        for r in range(0, m, ANCHOR):
            lf = real(l0 + r)
            for u in range(MODES):
                e = math.exp(xr[u] * lf)  # the exact anchor z^{l0 + r}
                pr[u], pi[u] = e * math.cos(xi[u] * lf), e * math.sin(xi[u] * lf)
            for j in range(r, min(r + ANCHOR, m)):
                g = G[c, l0 + j]
                gj = g * real(j)
                for u in range(MODES):
                    a, b = pr[u], pi[u]
                    acc[u, 0] += g * a
                    acc[u, 1] += g * b
                    acc[u, 2] += gj * a
                    acc[u, 3] += gj * b
                    pr[u], pi[u] = a * zr[u] - b * zi[u], a * zi[u] + b * zr[u]
        for u in range(MODES):
            k = k0 + u
            if k < n:
                sr, si = f64(acc[u, 0]), f64(acc[u, 1])
                cuda.atomic.add(S, (c, k, 0), sr)
                cuda.atomic.add(S, (c, k, 1), si)
                cuda.atomic.add(S, (c, k, 2), f64(l0) * sr + f64(acc[u, 2]))  # Σ (l0 + j)·G·z^l
                cuda.atomic.add(S, (c, k, 3), f64(l0) * si + f64(acc[u, 3]))

    @cuda.jit
    def finish(A, C, dt, S, gA, gC, gdt):
        # One thread per (d, n): gA, gC (d, n, 2) written; gdt (d,) float64 zeros, += Σ_n.
        n = A.shape[1]
        c = cuda.blockIdx.y
        k = cuda.blockIdx.x * BWD_THREADS + cuda.threadIdx.x
        if k >= n:
            return
        gAr, gAi, gCr, gCi, gd = mode_grads(
            f64(A[c, k, 0]), f64(A[c, k, 1]), f64(C[c, k, 0]), f64(C[c, k, 1]), f64(dt[c]),
            S[c, k, 0], S[c, k, 1], S[c, k, 2], S[c, k, 3])
        gA[c, k, 0] = gAr
        gA[c, k, 1] = gAi
        gC[c, k, 0] = gCr
        gC[c, k, 1] = gCi
        cuda.atomic.add(gdt, c, gd)

    return sums, finish


def _fwd_cuda(A, C, dt, L):
    d = A.shape[0]
    K = torch.empty(d, L, dtype=dt.dtype, device=dt.device)
    kernel = _s4d_cuda_kernel(numpy_dtype(dt.dtype))
    Ar, Cr = torch.view_as_real(A), torch.view_as_real(C)  # (d, n, 2)
    grid = ((L + THREADS * ITEMS - 1) // (THREADS * ITEMS), d)
    launch(kernel, grid, THREADS, Ar, Cr, dt, K)
    return K


def _bwd_cuda(A, C, dt, G):
    (d, n), L = A.shape, G.shape[1]
    sums, finish = _s4d_cuda_bwd_kernels(numpy_dtype(dt.dtype))
    S = torch.zeros(d, n, 4, dtype=torch.float64, device=dt.device)
    gA, gC = torch.empty_like(A), torch.empty_like(C)
    gdt = torch.zeros(d, dtype=torch.float64, device=dt.device)
    Ar, Cr = torch.view_as_real(A), torch.view_as_real(C)  # (d, n, 2)
    threads = (n + MODES - 1) // MODES * ((L + CHUNK - 1) // CHUNK)  # (mode group, chunk)
    launch(sums, ((threads + BWD_THREADS - 1) // BWD_THREADS, d), BWD_THREADS, Ar, dt, G, S)
    launch(finish, ((n + BWD_THREADS - 1) // BWD_THREADS, d), BWD_THREADS, Ar, Cr, dt, S,
           torch.view_as_real(gA), torch.view_as_real(gC), gdt)
    return gA, gC, gdt.to(dt.dtype)
