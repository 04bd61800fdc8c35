"""Monarch's CUDA kernels (numba.cuda), one block per token, and their host launchers, the only
place that knows grid and block. The equations and the glossary: kernels/monarch/__init__.py."""

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

THREADS = 8 if cuda_simulated() else 256  # CUDA: threads per block (one block per token)
Z_MAX = 4096  # CUDA: most numbers of the intermediate (k·q) one block holds in shared memory


# =============================================================================================
# CUDA kernel (numba.cuda): one block per token. The block's threads compute the k·q outputs
# of BD(w1) into shared memory (thread m owns output m = kk·q + qq), wait at a barrier, then
# the l·s outputs of the second factor: thread m computes y[m] with m = tt·l + j, so that
# neighbouring threads store neighbouring outputs (P2 costs nothing: it is which thread owns
# which output) and read z[i·l + j] from shared memory (P1 costs nothing either). The
# intermediate never leaves the chip. Weights are read from global memory (cached: every block
# reads the same ones).
# =============================================================================================


@functools.cache
def _monarch_kernels(dtype: np.dtype):
    """Compile-once (per dtype) forward and backward kernels."""
    zero = dtype.type(0)

    @cuda.jit
    def fwd(x, w1, w2, y):
        z = cuda.shared.array(Z_MAX, dtype)
        # [core] monarch_cuda
        b, tid = cuda.blockIdx.x, cuda.threadIdx.x
        k, q, p = w1.shape
        l, s, r = w2.shape
        for m in range(tid, k * q, THREADS):  # BD(w1): output m = kk·q + qq
            kk, qq = m // q, m % q
            acc = zero
            for pp in range(p):
                acc += w1[kk, qq, pp] * x[b, kk * p + pp]
            z[m] = acc
        cuda.syncthreads()
        for m in range(tid, l * s, THREADS):  # P2 · BD(w2) · P1: output m = tt·l + j
            tt, j = m // l, m % l
            acc = zero
            for i in range(r):
                acc += w2[j, tt, i] * z[i * l + j]  # P1: row i of block j
            y[b, m] = acc
        # [/core]

    @cuda.jit
    def bwd(x, g, w1, w2, gx, z, gz):
        gzs = cuda.shared.array(Z_MAX, dtype)
        b, tid = cuda.blockIdx.x, cuda.threadIdx.x
        k, q, p = w1.shape
        l, s, r = w2.shape
        for m in range(tid, k * q, THREADS):  # z = BD(w1) x (for ∂L/∂w2)
            kk, qq = m // q, m % q
            acc = zero
            for pp in range(p):
                acc += w1[kk, qq, pp] * x[b, kk * p + pp]
            z[b, m] = acc
        for m in range(tid, k * q, THREADS):  # gz = P1ᵀ BD(w2)ᵀ P2ᵀ g: m = i·l + j
            i, j = m // l, m % l
            acc = zero
            for tt in range(s):
                acc += w2[j, tt, i] * g[b, tt * l + j]
            gzs[m] = acc
            gz[b, m] = acc
        cuda.syncthreads()
        for m in range(tid, k * p, THREADS):  # gx = BD(w1)ᵀ gz: m = kk·p + pp
            kk, pp = m // p, m % p
            acc = zero
            for qq in range(q):
                acc += w1[kk, qq, pp] * gzs[kk * q + qq]
            gx[b, m] = acc

    return fwd, bwd


def _check_shared(w1):
    k, q, _ = w1.shape
    if k * q > Z_MAX:
        raise ValueError(f"the cuda backend holds the intermediate (k·q numbers per token) in "
                         f"shared memory: k·q must be <= {Z_MAX}, got {k}·{q} = {k * q}")


def _fwd_cuda(x, w1, w2, y=None):
    _check_shared(w1)
    l, s, _ = w2.shape
    y = x.new_empty(x.shape[0], l * s) if y is None else y
    if x.shape[0]:
        fwd, _ = _monarch_kernels(numpy_dtype(x.dtype))
        launch(fwd, x.shape[0], THREADS, x, w1, w2, y)
    return y


def _bwd_cuda(x, g, w1, w2):
    _check_shared(w1)
    k, q, _ = w1.shape
    gx = torch.empty_like(x)
    z, gz = x.new_empty(x.shape[0], k * q), x.new_empty(x.shape[0], k * q)
    if x.shape[0]:
        _, bwd = _monarch_kernels(numpy_dtype(x.dtype))
        launch(bwd, x.shape[0], THREADS, x, g, w1, w2, gx, z, gz)
    return gx, z, gz
