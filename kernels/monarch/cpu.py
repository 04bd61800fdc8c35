"""Monarch's CPU kernels (Numba): the loops, kept importable undecorated, and their host
wrappers. The equations and the glossary: kernels/monarch/__init__.py."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from minimodels.backend import to_numba

# =============================================================================================
# Constants
# =============================================================================================

TILE = 32  # CPU: tokens per task; the task's intermediate (TILE, k·q) stays in its L2 cache


# =============================================================================================
# CPU kernel (Numba). One task per tile of TILE tokens. The first factor runs block by block:
# block kk of w1 (q·p numbers, 16 KB at 64 x 64 float32) is read once per tile and stays in L1
# while every token of the tile uses it. Its output, the intermediate z (TILE, k·q), lives in a
# buffer of the task, never in main memory. The second factor reads z through the permutation
# P1 (z[i·l + j] is row i of block j: a strided read of single numbers, each broadcast into a
# vectorised multiply-add) and writes y through P2 (output t of block j lands at t·l + j). The
# weights come transposed, w1t (k, p, q) and w2t (l, r, s), so the innermost loops (over q and
# s) run along contiguous memory and LLVM vectorises them.
# =============================================================================================


def _monarch_loop(x, w1t, w2t, y, tile):
    """Forward. x: (b, n); w1t: (k, p, q); w2t: (l, r, s); y: (b, l·s), written."""
    batch = x.shape[0]
    k, p, q = w1t.shape
    l, r, s = w2t.shape
    for task in prange((batch + tile - 1) // tile):
        b0 = task * tile
        nt = min(tile, batch - b0)
        z = np.empty((nt, k * q), x.dtype)  # the intermediate of this tile only
        acc = np.empty(s, x.dtype)
        # [core] fused monarch
        for kk in range(k):  # BD(w1): block kk of w1 stays in L1 for the whole tile
            for t in range(nt):
                zt = z[t, kk * q:(kk + 1) * q]
                zt[:] = 0
                for pp in range(p):
                    xv = x[b0 + t, kk * p + pp]
                    wrow = w1t[kk, pp]
                    for qq in range(q):  # contiguous: vectorised
                        zt[qq] += xv * wrow[qq]
        for j in range(l):  # P1, BD(w2), P2
            for t in range(nt):
                acc[:] = 0
                for i in range(r):
                    zv = z[t, i * l + j]  # P1: row i of block j is z[i·l + j]
                    wrow = w2t[j, i]
                    for tt in range(s):
                        acc[tt] += zv * wrow[tt]
                for tt in range(s):  # P2: output tt of block j lands at tt·l + j
                    y[b0 + t, tt * l + j] = acc[tt]
        # [/core]


def _monarch_bwd_loop(x, g, w1, w1t, w2, gx, z, gz, tile):
    """Backward. x: (b, n); g: (b, l·s) = ∂L/∂y; w1: (k, q, p), w1t: (k, p, q); w2: (l, s, r).
    Writes gx (b, n) = Mᵀ g, and for the weight gradients z (b, k·q) = BD(w1) x and
    gz (b, k·q) = P1ᵀ BD(w2)ᵀ P2ᵀ g (both in the natural order kk·q + qq)."""
    batch = x.shape[0]
    k, q, p = w1.shape
    l, s, r = w2.shape
    for task in prange((batch + tile - 1) // tile):
        b0 = task * tile
        nt = min(tile, batch - b0)
        for kk in range(k):  # z = BD(w1) x, as the forward
            for t in range(nt):
                zt = z[b0 + t, kk * q:(kk + 1) * q]
                zt[:] = 0
                for pp in range(p):
                    xv = x[b0 + t, kk * p + pp]
                    wrow = w1t[kk, pp]
                    for qq in range(q):
                        zt[qq] += xv * wrow[qq]
        acc = np.empty(r, x.dtype)
        for j in range(l):  # P2ᵀ (gather g[tt·l + j]), BD(w2)ᵀ, P1ᵀ (scatter to i·l + j)
            for t in range(nt):
                acc[:] = 0
                for tt in range(s):
                    gv = g[b0 + t, tt * l + j]
                    wrow = w2[j, tt]
                    for i in range(r):
                        acc[i] += gv * wrow[i]
                for i in range(r):
                    gz[b0 + t, i * l + j] = acc[i]
        for kk in range(k):  # gx = BD(w1)ᵀ gz
            for t in range(nt):
                gxt = gx[b0 + t, kk * p:(kk + 1) * p]
                gxt[:] = 0
                for qq in range(q):
                    gv = gz[b0 + t, kk * q + qq]
                    wrow = w1[kk, qq]
                    for pp in range(p):
                        gxt[pp] += gv * wrow[pp]


_monarch_cpu_fwd = njit(parallel=True, cache=True)(_monarch_loop)
_monarch_cpu_bwd = njit(parallel=True, cache=True)(_monarch_bwd_loop)


def _fwd_cpu(x, w1, w2, y=None):
    """x (b, n), w1, w2 contiguous -> y (b, l·s), written into ``y`` when given."""
    l, s, _ = w2.shape
    y = x.new_empty(x.shape[0], l * s) if y is None else y
    if x.shape[0]:
        w1t, w2t = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        _monarch_cpu_fwd(*map(to_numba, (x, w1t, w2t, y)), TILE)
    return y


def _bwd_cpu(x, g, w1, w2):
    """-> gx (b, n), z (b, k·q), gz (b, k·q); see ``_monarch_bwd_loop``."""
    k, q, _ = w1.shape
    gx = torch.empty_like(x)
    z, gz = x.new_empty(x.shape[0], k * q), x.new_empty(x.shape[0], k * q)
    if x.shape[0]:
        w1t = w1.transpose(1, 2).contiguous()
        _monarch_cpu_bwd(*map(to_numba, (x, g, w1, w1t, w2, gx, z, gz)), TILE)
    return gx, z, gz
