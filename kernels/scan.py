"""Diagonal linear recurrence (the linear scan): ``h_t = a_t * h_{t-1} + b_t``.

The template kernel of the course: every later kernel module copies this layout (constants,
reference, CPU kernel, CUDA kernel, autograd, dispatch). ``parallel_scan`` computes the same
recurrence by Blelloch's work-efficient scan over the associative operator ``combine``, in
plain PyTorch (chapter 05).

References: Blelloch, "Prefix sums and their applications" (1990), section 1.4 (first-order
recurrences as scans; ``parallel_scan``: the up-sweep/down-sweep scan of section 1.2); Martin
& Cundy, "Parallelizing linear recurrent neural nets over sequence length", ICLR 2018; Gu &
Dao, "Mamba" (2023), section 3.3.

Glossary (code = paper): ``a`` = the decay / transition (Ā in an SSM), ``b`` = the input term
(B̄x), ``h`` = the state, ``h0`` = h_{-1}. Shapes: ``b`` batch, ``d`` width, ``l`` length; the
kernels see ``(r, l)`` with ``r = b·d`` independent rows.

Backward (the reverse scan), with g = ∂L/∂h:
    dh_t = g_t + a_{t+1} · dh_{t+1}          (dh_l = 0, run from t = l-1 down to 0)
    ∂L/∂b_t = dh_t,   ∂L/∂a_t = dh_t · h_{t-1},   ∂L/∂h0 = a_0 · dh_0
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda, njit, prange

from minimodels.backend import dispatch, expect_tensor, launch, resolve, to_numba
from minimodels.kernels._common import SCAN_CHUNK as CHUNK
from minimodels.kernels._common import SCAN_ITEMS as ITEMS
from minimodels.kernels._common import SCAN_THREADS as THREADS
from minimodels.kernels._common import Example, expect_out, numpy_dtype, randn, scan_maps

__all__ = ["linear_scan", "linear_scan_ref", "linear_scan_cpu", "linear_scan_cuda", "IMPLS",
           "example_inputs", "combine", "parallel_scan"]

# =============================================================================================
# Constants
# =============================================================================================

# CUDA: one block walks one row in chunks of CHUNK = THREADS * ITEMS steps; thread i owns ITEMS
# consecutive steps of each chunk (256 x 2 on a GPU, 8 x 2 in the simulator, so that its tests
# cross many chunk boundaries at tiny sizes). The layout and the block scan of affine maps
# (``scan_maps``) live in kernels/_common.py as SCAN_THREADS, SCAN_ITEMS, SCAN_CHUNK: the
# selective scan's backward (kernels/selective_scan/cuda.py) runs the same scan.

# example_inputs: the benchmark's size (b, d, l) (README.md, kernels/BENCHMARKS.md)
EXAMPLE_SHAPE = (8, 1024, 4096)
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}  # (rtol, atol)


# =============================================================================================
# Reference (the definition; autograd differentiates it)
# =============================================================================================


# [core] linear_scan_ref
def linear_scan_ref(a, b, h0=None):
    """h_t = a_t * h_{t-1} + b_t with h_{-1} = h0 (zeros if None).

    a, b: (batch, d, l); h0: (batch, d) -> h: (batch, d, l). A Python loop over time."""
    h = a.new_zeros(a.shape[:-1]) if h0 is None else h0  # (b, d)
    out = []
    for t in range(a.shape[-1]):
        h = a[..., t] * h + b[..., t]  # (b, d)
        out.append(h)
    if not out:  # l = 0: an empty (b, d, 0), still in the graph of a, b and h0
        return a * h[..., None] + b
    return torch.stack(out, dim=-1)  # (b, d, l)
# [/core]


# =============================================================================================
# The scan as an associative operator (Blelloch 1990), in plain PyTorch, for teaching
# =============================================================================================


# [core] combine
def combine(left, right):
    """Compose two steps of h -> a h + b: first ``left`` = (a1, b1), then ``right`` = (a2, b2).

    (a1, b1) • (a2, b2) = (a1 a2, a2 b1 + b2). Associative, with identity (1, 0)."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2
# [/core]


def parallel_scan(a, b, op=combine):
    """h_t = a_t h_{t-1} + b_t (h_{-1} = 0) by Blelloch's work-efficient scan over the last axis.

    a, b: (..., l) -> h: (..., l). The length is padded to L = 2^⌈log2 l⌉ with the identity
    (1, 0). Up-sweep: log2 L levels, each combining neighbouring pairs into their parent, build
    the tree of partial compositions. Down-sweep: the root gets the identity; going down, a left
    child gets its parent's prefix and a right child gets parent's prefix • left sibling. That
    is 2(L-1) combines in all (work O(l)) in 2 log2 L levels (depth O(log l)); each level is one
    vectorised PyTorch op (written without in-place writes, so autograd goes through it).
    ``op`` is the combine operator (Exercise 5.2 plugs its own in)."""
    _expect_scan_pair(a, b)
    l = a.shape[-1]
    L = 1 << max(l - 1, 0).bit_length()
    # [core] parallel_scan
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
    # [/core]


def _expect_scan_pair(a, b):
    """parallel_scan's inputs: a and b float32 or float64 tensors of one shape (..., l) with at
    least one axis, one dtype and one device (no broadcasting: b's shape is the output's).
    Raises ``TypeError``/``ValueError`` naming the argument."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (..., l), got "
                            f"{type(x).__name__}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"a must be float32 or float64, got {str(a.dtype).removeprefix('torch.')}")
    if a.dim() == 0:
        raise ValueError("a must have at least one dimension (..., l), got a 0-d tensor")
    if b.dtype != a.dtype:
        raise TypeError(f"b must be {str(a.dtype).removeprefix('torch.')} like a, got "
                        f"{str(b.dtype).removeprefix('torch.')}")
    if b.shape != a.shape:
        raise ValueError(f"b must have the shape of a, (..., l) = {tuple(a.shape)} (no "
                         f"broadcasting), got {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"b must be on {a.device} like a, got {b.device}")


# =============================================================================================
# CPU kernel (Numba). Each step depends on the last, so one row is a chain of dependent
# multiply-adds that waits on its own latency. A thread therefore advances two rows at once:
# two independent chains in flight, ~1.5x faster here (measured), at no cost in clarity.
# =============================================================================================


# [core] linear_scan_loop
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
# [/core]


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


def _fwd_cpu(a, b, h0, h=None):
    """a, b: (r, l) contiguous; h0: (r,) -> h: (r, l), written into ``h`` when given."""
    h = torch.empty_like(a) if h is None else h
    _linear_scan_cpu_fwd(to_numba(a), to_numba(b), to_numba(h0), to_numba(h))
    return h


def _bwd_cpu(a, h0, h, g):
    """-> (da, db, dh0) for rows layout."""
    da, db, dh0 = torch.empty_like(a), torch.empty_like(a), torch.zeros_like(h0)
    _linear_scan_cpu_bwd(*map(to_numba, (a, h0, h, g, da, db, dh0)))
    return da, db, dh0


# =============================================================================================
# CUDA kernel (numba.cuda). One row is far too little work for a GPU thread: its loads would
# wait one at a time. Instead a block of THREADS threads takes a row chunk by chunk:
#   1. thread i loads its ITEMS steps (all loads issued together: memory-level parallelism)
#      and composes them into one affine map  h -> A h + B;
#   2. the block scans those maps across threads (Hillis-Steele, in shared memory), so thread i
#      learns the map of everything before it in the chunk;
#   3. it applies that map to the chunk's incoming state and replays its ITEMS steps, writing h.
# A composed map can overflow where the recurrence does not: a = 1e30 for two steps gives A = inf
# in float32, and A·0 = nan where the state is 0 (or A·1e-30 = inf where it is 1e10). When the
# chunk's whole map is not finite (inf and nan are absorbing, so no part of it overflowed
# otherwise) thread 0 runs the chunk one step at a time instead, as the CPU does.
# The backward kernel is the same scan run from the end of the row (thread 0 owns the last
# steps), with coefficients a_{t+1} and inputs g_t.
# =============================================================================================


@cuda.jit(device=True)
def _load(x, r, first, step, lo, hi, fill, out):
    """out[k] = x[r, first + step·k] for k < ITEMS, or ``fill`` where that index is outside
    [lo, hi). Called one chunk ahead, so the loads are in flight while a chunk is scanned."""
    for k in range(ITEMS):
        t = first + step * k
        out[k] = x[r, t] if lo <= t < hi else fill


@cuda.jit(device=True)
def _fwd_in_order(a, b, h, r, t0, carry, i, s_carry):
    """Thread 0 runs h_t = a_t h_{t-1} + b_t one step at a time over the chunk from t0 (the
    block's way past an overflowed map); every thread returns the state after the chunk."""
    l = a.shape[1]
    if i == 0:
        for t in range(t0, min(t0 + CHUNK, l)):
            carry = a[r, t] * carry + b[r, t]
            h[r, t] = carry
        s_carry[0] = carry
    cuda.syncthreads()
    return s_carry[0]


@cuda.jit(device=True)
def _bwd_in_order(a, h0, h, g, da, db, r, t_end, carry, i, s_carry):
    """The backward's chunk one step at a time from t_end down (dh_t = a_{t+1} dh_{t+1} + g_t,
    da_t = dh_t h_{t-1}, db_t = dh_t), by thread 0; every thread returns dh of the chunk's
    first step."""
    l = a.shape[1]
    if i == 0:
        for t in range(t_end, max(t_end - CHUNK, -1), -1):
            carry = (a[r, t + 1] * carry if t + 1 < l else carry) + g[r, t]
            db[r, t] = carry
            da[r, t] = carry * (h[r, t - 1] if t > 0 else h0[r])
        s_carry[0] = carry
    cuda.syncthreads()
    return s_carry[0]


@functools.cache
def _linear_scan_kernels(dtype: np.dtype):
    """Compile-once (per dtype) forward and backward kernels."""
    zero, one = dtype.type(0), dtype.type(1)

    @cuda.jit
    def fwd(a, b, h0, h):
        # a, b, h: (r, l); h0: (r,). Block = row r, thread i.
        sA = cuda.shared.array((2, THREADS), dtype)
        sB = cuda.shared.array((2, THREADS), dtype)
        s_carry = cuda.shared.array(1, dtype)  # the state after an in-order chunk
        va = cuda.local.array(ITEMS, dtype)  # this chunk's a, b
        vb = cuda.local.array(ITEMS, dtype)
        na = cuda.local.array(ITEMS, dtype)  # the next chunk's, prefetched
        nb = cuda.local.array(ITEMS, dtype)
        rows, l = a.shape
        r, i = cuda.blockIdx.x, cuda.threadIdx.x
        carry = h0[r]  # the state entering the chunk
        _load(a, r, i * ITEMS, 1, 0, l, one, na)  # past the end: the identity map
        _load(b, r, i * ITEMS, 1, 0, l, zero, nb)
        # [core] linear_scan_cuda_chunk
        for t0 in range(0, l, CHUNK):
            first = t0 + i * ITEMS
            for k in range(ITEMS):
                va[k], vb[k] = na[k], nb[k]
            _load(a, r, first + CHUNK, 1, 0, l, one, na)
            _load(b, r, first + CHUNK, 1, 0, l, zero, nb)
            A, B = one, zero
            for k in range(ITEMS):  # compose my steps into h -> A h + B
                A, B = va[k] * A, va[k] * B + vb[k]
            p = scan_maps(sA, sB, A, B, i)
            if not math.isfinite(sA[p, THREADS - 1]):  # Π a overflowed: step by step
                carry = _fwd_in_order(a, b, h, r, t0, carry, i, s_carry)
            else:
                state = carry if i == 0 else sA[p, i - 1] * carry + sB[p, i - 1]
                for k in range(ITEMS):
                    state = va[k] * state + vb[k]
                    if first + k < l:
                        h[r, first + k] = state
                carry = sA[p, THREADS - 1] * carry + sB[p, THREADS - 1]
            cuda.syncthreads()  # everyone has read sA, sB before the next chunk writes them
        # [/core]

    @cuda.jit
    def bwd(a, h0, h, g, da, db, dh0):
        # a, h, g, da, db: (r, l); h0, dh0: (r,). dh_t = a_{t+1} dh_{t+1} + g_t, from the end;
        # thread i owns steps last, last-1, ..., last-ITEMS+1 of each chunk.
        sA = cuda.shared.array((2, THREADS), dtype)
        sB = cuda.shared.array((2, THREADS), dtype)
        s_carry = cuda.shared.array(1, dtype)
        vc = cuda.local.array(ITEMS, dtype)  # a_{t+1} (a_l is never used: the carry starts at 0)
        vg = cuda.local.array(ITEMS, dtype)  # g_t
        vh = cuda.local.array(ITEMS, dtype)  # h_{t-1}
        nc = cuda.local.array(ITEMS, dtype)
        ng = cuda.local.array(ITEMS, dtype)
        rows, l = a.shape
        r, i = cuda.blockIdx.x, cuda.threadIdx.x
        carry = zero  # dh of the step after the chunk
        _load(a, r, l - i * ITEMS, -1, 1, l, one, nc)  # t < 0: identity
        _load(g, r, l - 1 - i * ITEMS, -1, 0, l, zero, ng)
        for t_end in range(l - 1, -1, -CHUNK):
            last = t_end - i * ITEMS
            for k in range(ITEMS):
                vc[k], vg[k] = nc[k], ng[k]
            _load(a, r, last + 1 - CHUNK, -1, 1, l, one, nc)
            _load(g, r, last - CHUNK, -1, 0, l, zero, ng)
            _load(h, r, last - 1, -1, 0, l, zero, vh)
            if last - ITEMS < 0 <= last:  # this thread owns t = 0: h_{-1} is h0
                vh[last] = h0[r]
            A, B = one, zero
            for k in range(ITEMS):
                A, B = vc[k] * A, vc[k] * B + vg[k]
            p = scan_maps(sA, sB, A, B, i)
            if not math.isfinite(sA[p, THREADS - 1]):  # as in the forward
                carry = _bwd_in_order(a, h0, h, g, da, db, r, t_end, carry, i, s_carry)
            else:
                dh = carry if i == 0 else sA[p, i - 1] * carry + sB[p, i - 1]
                for k in range(ITEMS):
                    dh = vc[k] * dh + vg[k]
                    if last - k >= 0:
                        db[r, last - k] = dh
                        da[r, last - k] = dh * vh[k]
                carry = sA[p, THREADS - 1] * carry + sB[p, THREADS - 1]
            cuda.syncthreads()
        if i == 0:
            dh0[r] = a[r, 0] * carry  # carry = dh_0

    return fwd, bwd


def _launch(kernel, rows, *tensors):
    launch(kernel, rows, THREADS, *tensors)


def _fwd_cuda(a, b, h0, h=None):
    h = torch.empty_like(a) if h is None else h
    fwd, _ = _linear_scan_kernels(numpy_dtype(a.dtype))
    _launch(fwd, a.shape[0], a, b, h0, h)
    return h


def _bwd_cuda(a, h0, h, g):
    da, db, dh0 = torch.empty_like(a), torch.empty_like(a), torch.empty_like(h0)
    _, bwd = _linear_scan_kernels(numpy_dtype(a.dtype))
    _launch(bwd, a.shape[0], a, h0, h, g, da, db, dh0)
    return da, db, dh0


# =============================================================================================
# Autograd: forward and backward are both kernels of the chosen backend
# =============================================================================================


def _as_rows(a, b, h0):
    """(b, d, l) inputs as the kernels' contiguous rows: a, b (r, l) and h0 (r,) (zeros if None)."""
    batch, d, l = a.shape
    rows = (batch * d, l)
    a_r = a.contiguous().view(rows)  # (r, l)
    b_r = b.contiguous().view(rows)
    h0_r = torch.zeros(batch * d, dtype=a.dtype, device=a.device) if h0 is None else (
        h0.contiguous().view(-1)
    )  # (r,)
    return a_r, b_r, h0_r


class _LinearScan(torch.autograd.Function):
    """Wraps a (forward, backward) pair of row kernels as one differentiable op."""

    @staticmethod
    def forward(ctx, a, b, h0, kernels):
        fwd, bwd = kernels
        batch, d, l = a.shape
        a_r, b_r, h0_r = _as_rows(a, b, h0)
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


def _into(fwd):
    """A forward kernel as ``(a, b, h0, out) -> out`` (no autograd): it writes into ``out``."""

    def run(a, b, h0, out):
        if a.numel():
            fwd(*_as_rows(a, b, h0), out.view(a.shape[0] * a.shape[1], a.shape[2]))
        return out

    return run


def _ref_into(a, b, h0, out):
    return out.copy_(linear_scan_ref(a, b, h0))


_OUT_IMPLS = {"ref": _ref_into, "cpu": _into(_fwd_cpu), "cuda": _into(_fwd_cuda)}


def linear_scan(a, b, h0=None, *, backend=None, out=None):
    """The diagonal linear recurrence h_t = a_t * h_{t-1} + b_t, with h_{-1} = h0.

    Args:
        a, b: (batch, d, l) float32 or float64, same dtype and device.
        h0: (batch, d) initial state, or None for zeros.
        backend: "ref", "cpu", "cuda", a callable with this signature, or None to choose from
            the tensors' device (see ``minimodels.backend.resolve``).
        out: a contiguous (batch, d, l) tensor of a's dtype and device that receives h (the
            kernels write into it and allocate nothing of that size), or None. For calls
            without autograd (inference, timing the kernel alone): a ValueError if a, b or h0
            require grad while grad mode is on. It must not overlap a or b.

    Returns:
        h: (batch, d, l) in the dtype of ``a`` (``out`` itself when given). Differentiable in a,
        b and h0 on every backend (without ``out``).
    """
    expect_tensor("a", a, "batch, d, l")
    expect_tensor("b", b, "batch, d, l", dtypes=(a.dtype,), shape=a.shape)
    if h0 is not None:
        expect_tensor("h0", h0, "batch, d", dtypes=(a.dtype,), shape=a.shape[:2])
    if out is None:
        return dispatch(IMPLS, a, b, h0, backend=backend)
    expect_out(out, a, "batch, d, l", (a, b, h0))
    choice = resolve(backend, a, b, h0)
    if callable(choice):
        return out.copy_(choice(a, b, h0))
    return dispatch(_OUT_IMPLS, a, b, h0, out, backend=choice)


def example_inputs(shape=None, *, dtype=torch.float32, device="cpu", seed=0) -> Example:
    """The canonical inputs of ``linear_scan``: ``Example(args=(a, b, h0))``.

    shape: (b, d, l), default (8, 1024, 4096) (the benchmark's). a ~ U[0.5, 1) (decays), b and
    h0 ~ N(0, 1); drawn in float64 on the CPU from ``seed``, then cast to ``dtype`` and moved to
    ``device`` (the same values for every dtype and device). rtol = atol = 1e-5 in float32,
    1e-12 in float64 (against a float64 truth)."""
    batch, d, l = EXAMPLE_SHAPE if shape is None else shape
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, d, l, generator=g, dtype=torch.float64) * 0.5 + 0.5  # (b, d, l)
    b = randn(g, batch, d, l)  # (b, d, l)
    h0 = randn(g, batch, d)  # (b, d)
    rtol, atol = TOLERANCES[dtype]
    return Example(args=tuple(x.to(dtype=dtype, device=device) for x in (a, b, h0)),
                   rtol=rtol, atol=atol, sizes={"batch": batch, "d_model": d, "seqlen": l})
