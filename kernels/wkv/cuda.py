"""WKV's CUDA kernels (numba.cuda), one thread per (b, c) recurrence, and their host
launchers, the only place that knows grid and block. The equations and the glossary:
kernels/wkv/__init__.py."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import numpy_dtype
from minimodels.kernels.wkv.ref import MIN_LOG

# =============================================================================================
# Constants
# =============================================================================================

THREADS = 8 if cuda_simulated() else 64  # CUDA: one thread per (b, c); threads per block
ITEMS = 8  # CUDA: steps of k, v loaded together, one chunk ahead (memory-level parallelism)


# =============================================================================================
# CUDA kernel (numba.cuda): one thread per (b, c) recurrence, as RWKV's own kernel, with
# neighbouring threads on neighbouring channels so each step's loads are coalesced. A thread's
# steps depend on each other, but its loads do not: it loads ITEMS steps of k and v at once, one
# chunk ahead of the one it computes, so many loads are in flight per thread.
# =============================================================================================


@cuda.jit(device=True)
def _load(x, n, j, t0, l, out):
    """out[i] = x[n, t0 + i, j] for i < ITEMS (0 past the end)."""
    for i in range(ITEMS):
        t = t0 + i
        out[i] = x[n, t, j] if t < l else 0


@functools.cache
def _wkv_kernels(dtype: np.dtype):
    """Compile-once (per dtype) forward and backward kernels."""
    zero, one, min_log = dtype.type(0), dtype.type(1), dtype.type(MIN_LOG)

    @cuda.jit
    def fwd(w, u, k, v, state, y):
        vk = cuda.local.array(ITEMS, dtype)  # this chunk's k, v
        vv = cuda.local.array(ITEMS, dtype)
        nk = cuda.local.array(ITEMS, dtype)  # the next chunk's, in flight
        nv = cuda.local.array(ITEMS, dtype)
        # [core] one thread per channel
        batch, l, c = k.shape
        idx = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
        if idx >= batch * c:
            return
        n, j = idx // c, idx % c
        wj, uj = w[j], u[j]
        a, b, p = state[n, 0, j], state[n, 1, j], state[n, 2, j]
        _load(k, n, j, 0, l, nk)
        _load(v, n, j, 0, l, nv)
        for t0 in range(0, l, ITEMS):
            for i in range(ITEMS):
                vk[i], vv[i] = nk[i], nv[i]
            _load(k, n, j, t0 + ITEMS, l, nk)
            _load(v, n, j, t0 + ITEMS, l, nv)
            for i in range(ITEMS):
                if t0 + i < l:
                    kt, vt = vk[i], vv[i]
                    uk = uj + kt
                    q = max(p, uk)
                    e1, e2 = math.exp(p - q), math.exp(uk - q)
                    y[n, t0 + i, j] = (e1 * a + e2 * vt) / (e1 * b + e2)
                    pn = max(p - wj, kt)
                    e1, e2 = math.exp(p - wj - pn), math.exp(kt - pn)
                    a, b, p = e1 * a + e2 * vt, e1 * b + e2, pn
        state[n, 0, j], state[n, 1, j], state[n, 2, j] = a, b, p
        # [/core]

    @cuda.jit
    def bwd(w, u, k, v, state, gy, gw, gu, gk, gv):
        # Same two passes as _wkv_bwd_loop, one thread per (n, j).
        batch, l, c = k.shape
        idx = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
        if idx >= batch * c:
            return
        n, j = idx // c, idx % c
        wj, uj = w[j], u[j]
        a, b, p = state[n, 0, j], state[n, 1, j], state[n, 2, j]
        m = a / b if b > zero else zero  # the state's mean a / b (0 if empty)
        dc, db, acc_w = zero, zero, zero  # ∂a/∂w - m ∂b/∂w, ∂b/∂w (as kernels/wkv/cpu.py)
        for t in range(l):
            kt, vt = k[n, t, j], v[n, t, j]
            uk = uj + kt
            q = max(p, uk)
            e1, e2 = math.exp(p - q), math.exp(uk - q)
            den = e1 * b + e2
            r = one / den
            yt = (e1 * a + e2 * vt) * r
            acc_w += gy[n, t, j] * e1 * (dc - e2 * (vt - m) * r * db) * r
            gk[n, t, j], gv[n, t, j] = yt, q + math.log(den)
            pn = max(p - wj, kt)
            f1, f2 = math.exp(p - wj - pn), math.exp(kt - pn)
            bn = f1 * b + f2
            rb = one / bn
            dc, db = f1 * (dc + f2 * (m - vt) * rb * (db - b)), f1 * (db - b)
            a, b, p = f1 * a + f2 * vt, bn, pn
            m = a * rb
        s1, sd, sc, o = zero, zero, zero, min_log  # sd, sc: the centred sum (cpu.py)
        g_next, y_next, lD_next, acc_u = zero, zero, zero, zero
        for t in range(l - 1, -1, -1):
            if t < l - 1:
                on = max(o - wj, -lD_next)
                f1, f2 = math.exp(o - wj - on), math.exp(-lD_next - on)
                if s1 != zero:
                    sd = f1 * (sd + s1 * (sc - y_next))
                s1, sc, o = f1 * s1 + f2 * g_next, y_next, on
            kt, vt, gt = k[n, t, j], v[n, t, j], gy[n, t, j]
            yt, lD = gk[n, t, j], gv[n, t, j]
            gb = gt * math.exp(uj + kt - lD)
            ek = math.exp(kt + o)
            gv[n, t, j] = gb + ek * s1
            gk[n, t, j] = gb * (vt - yt) + ek * ((vt - sc) * s1 - sd)
            acc_u += gb * (vt - yt)
            g_next, y_next, lD_next = gt, yt, lD
        gw[n, j], gu[n, j] = acc_w, acc_u

    return fwd, bwd


def _grid(batch, c):
    return (batch * c + THREADS - 1) // THREADS, THREADS


def _fwd_cuda(w, u, k, v, state, y=None):
    y = torch.empty_like(k) if y is None else y
    fwd, _ = _wkv_kernels(numpy_dtype(k.dtype))
    launch(fwd, *_grid(k.shape[0], k.shape[2]), w, u, k, v, state, y)
    return y


def _bwd_cuda(w, u, k, v, state, gy):
    gk, gv = torch.empty_like(k), torch.empty_like(v)
    gw = k.new_empty(k.shape[0], k.shape[2])
    gu = torch.empty_like(gw)
    _, bwd = _wkv_kernels(numpy_dtype(k.dtype))
    launch(bwd, *_grid(k.shape[0], k.shape[2]), w, u, k, v, state, gy, gw, gu, gk, gv)
    return gw.sum(0), gu.sum(0), gk, gv
