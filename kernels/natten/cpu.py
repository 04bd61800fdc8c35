"""Neighbourhood attention's CPU kernels (Numba): the loops, kept importable undecorated, and
their host wrappers. The equations and the glossary: kernels/natten/__init__.py."""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from minimodels.backend import to_numba
from minimodels.kernels._common import numpy_dtype
from minimodels.kernels.fastexp import exp_neg

# =============================================================================================
# CPU kernel (Numba). One prange task = one head r and one row i of queries: every query of the
# row shares its window's rows r0 .. r0 + K − 1 (they depend on i only), so the task reads K
# rows of keys and values, a few KB that stay in L1 while it walks the row. Per query the K²
# scores go to a small buffer (no online softmax: the window is known in advance), then one
# max, one pass of exps (fastexp.exp_neg, vectorised) and the weighted sum of the K² values,
# whose innermost loop over e runs along contiguous memory. The dot products q·k reduce over
# e; ``reassoc`` lets LLVM vectorise that reduction (the order of a sum of 64 numbers changes,
# nothing else).
# =============================================================================================


def _natten_loop(q, k, v, out, lse, K, scale):
    """Forward. q, k, v, out: (r, H, W, e); lse: (r, H, W). Writes out and lse."""
    R, H, W, e = q.shape
    half = K // 2
    for task in prange(R * H):
        r, i = task // H, task % H
        r0 = min(max(i - half, 0), H - K)
        s = np.empty(K * K, q.dtype)
        acc = np.empty(e, q.dtype)
        qs = np.empty(e, q.dtype)
        zero = scale - scale  # 0 in q's dtype (scale comes in it)
        # [core] natten_cpu
        for j in range(W):
            c0 = min(max(j - half, 0), W - K)  # the window: rows r0.., columns c0.., K each
            for d in range(e):  # scale · q first, as the reference (one rounding less in S)
                qs[d] = scale * q[r, i, j, d]
            for a in range(K):
                for c in range(K):
                    dot = zero
                    for d in range(e):  # q·k over e: a vectorised reduction
                        dot += qs[d] * k[r, r0 + a, c0 + c, d]
                    s[a * K + c] = dot
            m = s[0]
            for t in range(K * K):
                m = max(m, s[t])
            if m == -np.inf:  # no finite score: 0/0 below, as the reference's softmax
                m = zero
            total = zero
            for t in range(K * K):  # P = exp(S − max), vectorised
                s[t] = exp_neg(s[t] - m)
                total += s[t]
            acc[:] = 0
            for a in range(K):
                for c in range(K):
                    p = s[a * K + c]
                    for d in range(e):  # contiguous: vectorised
                        acc[d] += p * v[r, r0 + a, c0 + c, d]
            for d in range(e):
                out[r, i, j, d] = acc[d] / total
            lse[r, i, j] = m + math.log(total)
        # [/core]


def _natten_bwd_loop(q, k, v, g, dq, dk, dv, K, scale):
    """Backward. g = ∂L/∂out; writes dq, dk, dv (all (r, H, W, e)). One task per head r: the
    queries of a head run in order, so the scatter into dk, dv has one writer."""
    R, H, W, e = q.shape
    half = K // 2
    for r in prange(R):
        dk[r] = 0
        dv[r] = 0
        p = np.empty(K * K, q.dtype)
        dp = np.empty(K * K, q.dtype)
        qs = np.empty(e, q.dtype)
        zero = scale - scale  # 0 in q's dtype
        for i in range(H):
            r0 = min(max(i - half, 0), H - K)
            for j in range(W):
                c0 = min(max(j - half, 0), W - K)
                for d in range(e):
                    qs[d] = scale * q[r, i, j, d]
                for a in range(K):
                    for c in range(K):
                        sd = zero
                        gd = zero
                        for d in range(e):
                            sd += qs[d] * k[r, r0 + a, c0 + c, d]
                            gd += g[r, i, j, d] * v[r, r0 + a, c0 + c, d]
                        p[a * K + c] = sd  # S = (scale·q)·k, as the forward
                        dp[a * K + c] = gd  # dP = dO · v
                # P recomputed as the forward does (max, exps, sum), not as exp(S − lse): a
                # one-hot row then has P = 1 exactly and dS = 0, as the reference's
                m = p[0]
                for t in range(K * K):
                    m = max(m, p[t])
                if m == -np.inf:
                    m = zero
                total = zero
                for t in range(K * K):
                    p[t] = exp_neg(p[t] - m)
                    total += p[t]
                D = zero
                for t in range(K * K):
                    p[t] /= total
                    D += p[t] * dp[t]  # D = Σ P dP
                dq[r, i, j, :] = 0
                for a in range(K):
                    for c in range(K):
                        t = a * K + c
                        ds = scale * p[t] * (dp[t] - D)  # ∂L/∂(q·k)
                        for d in range(e):
                            dq[r, i, j, d] += ds * k[r, r0 + a, c0 + c, d]
                            dk[r, r0 + a, c0 + c, d] += ds * q[r, i, j, d]
                            dv[r, r0 + a, c0 + c, d] += p[t] * g[r, i, j, d]


_FLAGS = {"contract", "reassoc"}
_natten_cpu_fwd = njit(parallel=True, cache=True, fastmath=_FLAGS)(_natten_loop)
_natten_cpu_bwd = njit(parallel=True, cache=True, fastmath=_FLAGS)(_natten_bwd_loop)


def _fwd_cpu(q, k, v, kernel_size, scale):
    """q, k, v contiguous (r, H, W, e) -> out (r, H, W, e), lse (r, H, W)."""
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1])
    if q.numel():
        _natten_cpu_fwd(*map(to_numba, (q, k, v, out, lse)), kernel_size,
                        numpy_dtype(q.dtype).type(scale))
    return out, lse


def _bwd_cpu(q, k, v, g, kernel_size, scale):
    """-> dq, dk, dv, each (r, H, W, e)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.numel():
        _natten_cpu_bwd(*map(to_numba, (q, k, v, g, dq, dk, dv)), kernel_size,
                        numpy_dtype(q.dtype).type(scale))
    return dq, dk, dv
