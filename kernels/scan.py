"""Diagonal linear recurrence (the linear scan): ``h_t = a_t * h_{t-1} + b_t``.

The template kernel of the course: every later kernel module copies this layout (constants,
reference, CPU kernel, CUDA kernel, autograd, dispatch).

References: Blelloch, "Prefix sums and their applications" (1990), section 1.4 (first-order
recurrences as scans); Martin & Cundy, "Parallelizing linear recurrent neural nets over
sequence length", ICLR 2018; Gu & Dao, "Mamba" (2023), section 3.3.

Glossary (code = paper): ``a`` = the decay / transition (Ā in an SSM), ``b`` = the input term
(B̄x), ``h`` = the state, ``h0`` = h_{-1}. Shapes: ``b`` batch, ``d`` channels, ``l`` length; the
kernels see ``(r, l)`` with ``r = b·d`` independent rows.

Backward (the reverse scan), with g = ∂L/∂h:
    dh_t = g_t + a_{t+1} · dh_{t+1}          (dh_l = 0, run from t = l-1 down to 0)
    ∂L/∂b_t = dh_t,   ∂L/∂a_t = dh_t · h_{t-1},   ∂L/∂h0 = a_0 · dh_0
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import cuda, njit, prange

from minimodels.backend import cuda_stream, dispatch, expect_tensor, to_numba

__all__ = ["linear_scan", "linear_scan_ref", "linear_scan_cpu", "linear_scan_cuda", "IMPLS"]

# =============================================================================================
# Constants
# =============================================================================================

TILE = 32  # CUDA: rows per block (one thread each) and time steps per shared-memory tile


# =============================================================================================
# Reference (the definition; autograd differentiates it)
# =============================================================================================


def linear_scan_ref(a, b, h0=None):
    """h_t = a_t * h_{t-1} + b_t with h_{-1} = h0 (zeros if None).

    a, b: (batch, d, l); h0: (batch, d) -> h: (batch, d, l). A Python loop over time."""
    h = torch.zeros_like(a[..., 0]) if h0 is None else h0  # (b, d)
    out = []
    for t in range(a.shape[-1]):
        h = a[..., t] * h + b[..., t]  # (b, d)
        out.append(h)
    return torch.stack(out, dim=-1)  # (b, d, l)


# =============================================================================================
# CPU kernel (Numba). Each step depends on the last, so one row is a chain of dependent
# multiply-adds that waits on its own latency. A thread therefore advances two rows at once:
# two independent chains in flight, ~1.5x faster here (measured), at no cost in clarity.
# =============================================================================================


def _linear_scan_loop(a, b, h0, h):
    """Forward loop. a, b, h: (r, l); h0: (r,). Writes h in place.

    Rows are taken in pairs (r, q); an odd last row pairs with itself (same values, twice)."""
    rows, l = a.shape
    for p in prange((rows + 1) // 2):
        r = 2 * p
        q = min(r + 1, rows - 1)
        s, u = h0[r], h0[q]
        for t in range(l):
            s = a[r, t] * s + b[r, t]
            u = a[q, t] * u + b[q, t]
            h[r, t] = s
            h[q, t] = u


def _linear_scan_bwd_loop(a, h0, h, g, da, db, dh0):
    """Reverse scan. a, h, g, da, db: (r, l); h0, dh0: (r,). dh0 arrives zeroed.

    ``cs``/``cu`` carry a_t · dh_t, the part of dh_{t-1} that flows back through step t."""
    rows, l = a.shape
    for p in prange((rows + 1) // 2):
        r = 2 * p
        q = min(r + 1, rows - 1)
        cs, cu = dh0[r], dh0[q]  # zeros, typed like the data
        for t in range(l - 1, 0, -1):
            ds = g[r, t] + cs
            du = g[q, t] + cu
            db[r, t] = ds
            db[q, t] = du
            da[r, t] = ds * h[r, t - 1]
            da[q, t] = du * h[q, t - 1]
            cs = a[r, t] * ds
            cu = a[q, t] * du
        ds = g[r, 0] + cs  # t = 0: h_{-1} = h0
        du = g[q, 0] + cu
        db[r, 0] = ds
        db[q, 0] = du
        da[r, 0] = ds * h0[r]
        da[q, 0] = du * h0[q]
        dh0[r] = a[r, 0] * ds
        dh0[q] = a[q, 0] * du


_linear_scan_cpu_fwd = njit(parallel=True, cache=True)(_linear_scan_loop)
_linear_scan_cpu_bwd = njit(parallel=True, cache=True)(_linear_scan_bwd_loop)


def _fwd_cpu(a, b, h0):
    """a, b: (r, l) contiguous; h0: (r,) -> h: (r, l)."""
    h = torch.empty_like(a)
    _linear_scan_cpu_fwd(to_numba(a), to_numba(b), to_numba(h0), to_numba(h))
    return h


def _bwd_cpu(a, h0, h, g):
    """-> (da, db, dh0) for rows layout."""
    da, db, dh0 = torch.empty_like(a), torch.empty_like(a), torch.zeros_like(h0)
    _linear_scan_cpu_bwd(*map(to_numba, (a, h0, h, g, da, db, dh0)))
    return da, db, dh0


# =============================================================================================
# CUDA kernel (numba.cuda): a block of TILE threads owns TILE rows. Tiles of TILE x TILE steps
# are loaded coalesced (thread i reads time step t0+i of every row), transposed through shared
# memory, scanned sequentially by thread i along row i, and stored coalesced.
# =============================================================================================


@functools.cache
def _linear_scan_kernels(dtype: np.dtype):
    """Compile-once (per dtype) forward and backward kernels."""
    zero = dtype.type(0)

    @cuda.jit
    def fwd(a, b, h0, h):
        # a, b, h: (r, l); h0: (r,)
        sa = cuda.shared.array((TILE, TILE + 1), dtype)  # +1: row i of sa is bank-conflict free
        sh = cuda.shared.array((TILE, TILE + 1), dtype)
        rows, l = a.shape
        i = cuda.threadIdx.x
        row0 = cuda.blockIdx.x * TILE
        r = row0 + i
        state = h0[r] if r < rows else zero
        for t0 in range(0, l, TILE):
            t = t0 + i
            for j in range(TILE):  # coalesced: the warp reads TILE consecutive steps of row j
                if row0 + j < rows and t < l:
                    sa[j, i] = a[row0 + j, t]
                    sh[j, i] = b[row0 + j, t]
            cuda.syncthreads()
            if r < rows:
                for k in range(min(TILE, l - t0)):  # sequential along row i
                    state = sa[i, k] * state + sh[i, k]
                    sh[i, k] = state
            cuda.syncthreads()
            for j in range(TILE):
                if row0 + j < rows and t < l:
                    h[row0 + j, t] = sh[j, i]
            cuda.syncthreads()

    @cuda.jit
    def bwd(a, h0, h, g, da, db, dh0):
        # a, h, g, da, db: (r, l); h0, dh0: (r,). Tiles run from the end of the sequence.
        sa = cuda.shared.array((TILE, TILE + 1), dtype)
        sh = cuda.shared.array((TILE, TILE + 1), dtype)  # h, then overwritten with da
        sg = cuda.shared.array((TILE, TILE + 1), dtype)  # g, then overwritten with db
        rows, l = a.shape
        i = cuda.threadIdx.x
        row0 = cuda.blockIdx.x * TILE
        r = row0 + i
        carry = zero
        n_tiles = (l + TILE - 1) // TILE
        for tile in range(n_tiles - 1, -1, -1):
            t0 = tile * TILE
            t = t0 + i
            for j in range(TILE):
                if row0 + j < rows and t < l:
                    sa[j, i] = a[row0 + j, t]
                    sh[j, i] = h[row0 + j, t]
                    sg[j, i] = g[row0 + j, t]
            cuda.syncthreads()
            if r < rows:
                h_before = h[r, t0 - 1] if t0 > 0 else h0[r]  # h_{t0-1}
                for k in range(min(TILE, l - t0) - 1, -1, -1):
                    dh = sg[i, k] + carry
                    carry = sa[i, k] * dh
                    sg[i, k] = dh  # db
                    # da, in place: sh[i, k - 1] is still h (the loop runs backwards)
                    sh[i, k] = dh * (sh[i, k - 1] if k > 0 else h_before)
            cuda.syncthreads()
            for j in range(TILE):
                if row0 + j < rows and t < l:
                    db[row0 + j, t] = sg[j, i]
                    da[row0 + j, t] = sh[j, i]
            cuda.syncthreads()
        if r < rows:
            dh0[r] = carry

    return fwd, bwd


def _launch(kernel, rows, *tensors):
    grid = (rows + TILE - 1) // TILE
    kernel[grid, TILE, cuda_stream()](*map(to_numba, tensors))


def _fwd_cuda(a, b, h0):
    h = torch.empty_like(a)
    fwd, _ = _linear_scan_kernels(np.dtype(str(a.dtype).removeprefix("torch.")))
    _launch(fwd, a.shape[0], a, b, h0, h)
    return h


def _bwd_cuda(a, h0, h, g):
    da, db, dh0 = torch.empty_like(a), torch.empty_like(a), torch.empty_like(h0)
    _, bwd = _linear_scan_kernels(np.dtype(str(a.dtype).removeprefix("torch.")))
    _launch(bwd, a.shape[0], a, h0, h, g, da, db, dh0)
    return da, db, dh0


# =============================================================================================
# Autograd: forward and backward are both kernels of the chosen backend
# =============================================================================================


class _LinearScan(torch.autograd.Function):
    """Wraps a (forward, backward) pair of row kernels as one differentiable op."""

    @staticmethod
    def forward(ctx, a, b, h0, kernels):
        fwd, bwd = kernels
        batch, d, l = a.shape
        rows = (batch * d, l)
        a_r = a.contiguous().view(rows)  # (r, l)
        b_r = b.contiguous().view(rows)
        h0_r = torch.zeros(batch * d, dtype=a.dtype, device=a.device) if h0 is None else (
            h0.contiguous().view(-1)
        )  # (r,)
        h = fwd(a_r, b_r, h0_r) if a.numel() else torch.empty_like(a_r)  # (r, l)
        ctx.save_for_backward(a_r, h0_r, h)
        ctx.bwd, ctx.shape, ctx.has_h0 = bwd, a.shape, h0 is not None
        return h.view(batch, d, l)

    @staticmethod
    def backward(ctx, g):
        a_r, h0_r, h = ctx.saved_tensors
        batch, d, l = ctx.shape
        g_r = g.contiguous().view(batch * d, l)
        if a_r.numel():
            da, db, dh0 = ctx.bwd(a_r, h0_r, h, g_r)
        else:
            da, db, dh0 = torch.zeros_like(a_r), torch.zeros_like(a_r), torch.zeros_like(h0_r)
        return da.view(ctx.shape), db.view(ctx.shape), (
            dh0.view(batch, d) if ctx.has_h0 else None
        ), None


def linear_scan_cpu(a, b, h0=None):
    """Numba CPU kernel, parallel over the b·d rows. Same contract as ``linear_scan_ref``."""
    return _LinearScan.apply(a, b, h0, (_fwd_cpu, _bwd_cpu))


def linear_scan_cuda(a, b, h0=None):
    """numba.cuda kernel (or the CUDA simulator). Same contract as ``linear_scan_ref``."""
    return _LinearScan.apply(a, b, h0, (_fwd_cuda, _bwd_cuda))


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": linear_scan_ref, "cpu": linear_scan_cpu, "cuda": linear_scan_cuda}


def linear_scan(a, b, h0=None, *, backend=None):
    """The diagonal linear recurrence h_t = a_t * h_{t-1} + b_t, with h_{-1} = h0.

    Args:
        a, b: (batch, d, l) float32 or float64, same dtype and device.
        h0: (batch, d) initial state, or None for zeros.
        backend: "ref", "cpu", "cuda", a callable with this signature, or None to choose from
            the tensors' device (see ``minimodels.backend.resolve``).

    Returns:
        h: (batch, d, l) in the dtype of ``a``. Differentiable in a, b and h0 on every backend.
    """
    expect_tensor("a", a, "batch, d, l")
    expect_tensor("b", b, "batch, d, l", dtypes=(a.dtype,), shape=a.shape)
    if h0 is not None:
        expect_tensor("h0", h0, "batch, d", dtypes=(a.dtype,), shape=a.shape[:2])
    return dispatch(IMPLS, a, b, h0, backend=backend)
