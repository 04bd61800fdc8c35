"""The direct causal convolution's CPU kernels (Numba): the loops, kept importable undecorated,
and their host wrappers. The equations and the glossary: kernels/long_conv/__init__.py."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from minimodels.backend import to_numba

# =============================================================================================
# CPU kernel (Numba). One task per row (b, c). The row is copied once, zero-padded on the left
# by lk − 1 (so the first outputs need no bounds test), and the filter once, reversed and with
# D added to its tap 0. Each output is then a dot product of the reversed filter with a window
# of the padded row: y_t = Σ_i kr_i · up_{t+i}. Both run along contiguous memory, so LLVM
# vectorises the dot product once it may reassociate the sum (fastmath "reassoc"): the scaled-
# copy form y[t:] += k_j · u[:l−j] writes y at every tap and was 10x slower here.
# =============================================================================================


def _causal_conv_loop(u, k, D, y):
    """Forward. u: (b, c, l); k: (c, lk); D: (c,); y: (b, c, l), written."""
    batch, channels, l = u.shape
    lk = k.shape[1]
    for row in prange(batch * channels):
        b, c = row // channels, row % channels
        # [core] direct causal conv
        up = np.zeros(l + lk - 1, u.dtype)  # u_{t}, t = −(lk − 1) .. l − 1: zeros before 0
        up[lk - 1:] = u[b, c]
        kr = k[c, ::-1].copy()  # kr_i = k_{lk−1−i}: the filter reversed
        kr[lk - 1] += D[c]  # the skip D·u_t is tap 0's
        zero = np.zeros(1, u.dtype)[0]  # a 0 of u's dtype
        for t in range(l):
            acc = zero
            for i in range(lk):  # vectorised dot product
                acc += kr[i] * up[t + i]
            y[b, c, t] = acc
        # [/core]


def _filter_grad_loop(u, g, gk):
    """∂L/∂k. u, g: (b, c, l); gk: (c, lk), written: gk[c, j] = Σ_b Σ_{t>=j} g[b, c, t] u[b, c, t−j]
    (a correlation of g with u, one task per channel; the inner sum is a vectorised dot)."""
    batch, channels, l = u.shape
    lk = gk.shape[1]
    for c in prange(channels):
        for j in range(lk):
            acc = 0.0
            for b in range(batch):
                for t in range(j, l):
                    acc += g[b, c, t] * u[b, c, t - j]
            gk[c, j] = acc


_FASTMATH = {"reassoc", "contract"}  # sums may be reordered; inf and NaN keep their meaning
_causal_conv_cpu = njit(parallel=True, cache=True, fastmath=_FASTMATH)(_causal_conv_loop)
_filter_grad_cpu = njit(parallel=True, cache=True, fastmath=_FASTMATH)(_filter_grad_loop)


def _fwd_cpu(u, k, D, y=None):
    """u (b, c, l), k (c, lk), D (c,) contiguous -> y (b, c, l)."""
    y = torch.empty_like(u) if y is None else y
    if u.numel():
        _causal_conv_cpu(*map(to_numba, (u, k, D, y)))
    return y


def _filter_grad_cpu_wrap(u, g, lk):
    """-> gk (c, lk) = Σ_b Σ_t g u shifted (see ``_filter_grad_loop``)."""
    gk = u.new_zeros(u.shape[1], lk)
    if u.numel():
        _filter_grad_cpu(*map(to_numba, (u, g, gk)))
    return gk
