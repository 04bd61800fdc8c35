"""The direct causal convolution's CUDA kernels (numba.cuda) and their host launchers, the only
place that knows grid and block. The equations and the glossary: kernels/long_conv/__init__.py."""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import numpy_dtype

# =============================================================================================
# Constants
# =============================================================================================

THREADS = 8 if cuda_simulated() else 256  # CUDA: outputs (time steps) per block


# =============================================================================================
# CUDA kernels (numba.cuda). Forward: one thread per output y[b, c, t], blocks of THREADS
# consecutive t of one row (grid (b·c, ceil(l / THREADS))). At tap j the warp reads the single
# number k[c, j] (a broadcast) and u[b, c, t − j] for consecutive t (one coalesced load), so
# neighbouring threads share every cache line of u. The filter's gradient: one thread per
# (c, j), summing g[b, c, t]·u[b, c, t − j] over b and t (coalesced across j for each t).
# =============================================================================================


@functools.cache
def _conv_kernels(dtype: np.dtype):
    """Compile-once (per dtype) forward and filter-gradient kernels."""
    zero = dtype.type(0)

    @cuda.jit
    def fwd(u, k, D, y):
        # [core] causal_conv_cuda
        t = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        row = cuda.blockIdx.x
        channels, l = u.shape[1], u.shape[2]
        b, c = row // channels, row % channels
        if t < l:
            acc = D[c] * u[b, c, t]  # the skip term
            for j in range(min(t + 1, k.shape[1])):  # taps 0 .. min(t, lk − 1)
                acc += k[c, j] * u[b, c, t - j]
            y[b, c, t] = acc
        # [/core]

    @cuda.jit
    def filter_grad(u, g, gk):
        m = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        batch, channels, l = u.shape
        lk = gk.shape[1]
        if m < channels * lk:
            c, j = m // lk, m % lk
            acc = zero
            for b in range(batch):
                for t in range(j, l):
                    acc += g[b, c, t] * u[b, c, t - j]
            gk[c, j] = acc

    return fwd, filter_grad


def _fwd_cuda(u, k, D, y=None):
    """u (b, c, l), k (c, lk), D (c,) contiguous -> y (b, c, l)."""
    y = torch.empty_like(u) if y is None else y
    batch, channels, l = u.shape
    if u.numel():
        fwd, _ = _conv_kernels(numpy_dtype(u.dtype))
        launch(fwd, (batch * channels, (l + THREADS - 1) // THREADS), THREADS, u, k, D, y)
    return y


def _filter_grad_cuda(u, g, lk):
    """-> gk (c, lk): gk[c, j] = Σ_b Σ_t g[b, c, t]·u[b, c, t − j]."""
    gk = u.new_zeros(u.shape[1], lk)
    if u.numel():
        _, filter_grad = _conv_kernels(numpy_dtype(u.dtype))
        n = u.shape[1] * lk
        launch(filter_grad, (n + THREADS - 1) // THREADS, THREADS, u, g, gk)
    return gk
