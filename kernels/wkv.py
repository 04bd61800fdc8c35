"""RWKV-4's WKV operator: a softmax over the past whose weights decay with distance.

References: Peng et al., "RWKV: Reinventing RNNs for the transformer era" (2023), sections 3.1
(the WKV operator, eq. 14), 4.1 (the recurrent form) and appendix (numerical stability);
Zhai et al., "An attention free transformer" (2021), section 3.1 (AFT, its ancestor).

    wkv_t = ( Σ_{i<t} e^{-(t-1-i)·w + k_i} · v_i  +  e^{u + k_t} · v_t )
          / ( Σ_{i<t} e^{-(t-1-i)·w + k_i}        +  e^{u + k_t} )

Glossary (code = paper): ``w`` = w (the per-channel decay rate, ≥ 0), ``u`` = u (the bonus of
the current token), ``k, v`` = k, v. Shapes: ``b`` batch, ``l`` length, ``c`` channels; tensors
are channels-last ``(b, l, c)`` as in RWKV's own code, so one (b, c) pair is one independent
recurrence.

Recurrent form in log space. The state is (a, b, p) with A = e^p·a = Σ_{i<t} e^{-(t-1-i)w+k_i} v_i
and B = e^p·b its denominator; p is a running maximum exponent, so no exp ever sees a positive
argument and nothing overflows even for |k| ≫ 88 in float32. At each step, with q = max(p, u+k_t):

    y_t = (e^{p-q} a + e^{u+k_t-q} v_t) / (e^{p-q} b + e^{u+k_t-q})                  (output)
    p' = max(p - w, k_t):  a ← e^{p-w-p'} a + e^{k_t-p'} v_t,  b ← e^{p-w-p'} b + e^{k_t-p'}

One of the two exps in each line is e^0 = 1, so a step costs two exps. The opaque state tensor
is ``(b, 3, c)`` = (a, b, p); it starts at (0, 0, -1e38).

Backward, with g_t = ∂L/∂y_t and D_t the denominator of y_t (α_{t,i} = e^{-(t-1-i)w+k_i}/D_t,
β_t = e^{u+k_t}/D_t):
    ∂L/∂v_i = g_i β_i + e^{k_i} S1_i,   ∂L/∂k_i = g_i β_i (v_i - y_i) + e^{k_i}(v_i S1_i - S2_i)
    S1_i = Σ_{t>i} e^{-(t-1-i)w} g_t / D_t,  S2_i = same with g_t y_t      (a reverse recurrence)
    ∂L/∂u = Σ g_t β_t (v_t - y_t),   ∂L/∂w = Σ_t g_t (A'_t - y_t B'_t) / D_t with A' = ∂A/∂w,
    A'_{t+1} = e^{-w}(A'_t - A_t)   (a forward recurrence; likewise B').
S1, S2 are kept in log space too (a scale o). The incoming ``state`` is treated as a constant.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numba
import numpy as np
import torch
from numba import cuda, njit, prange

from minimodels.backend import cuda_simulated, dispatch, expect_tensor, launch, to_numba
from minimodels.kernels.fastexp import exp_neg

__all__ = ["wkv", "wkv_ref", "wkv_cpu", "wkv_cuda", "wkv_state0", "IMPLS"]

# =============================================================================================
# Constants
# =============================================================================================

MIN_LOG = -1e38  # p of the empty state: e^(MIN_LOG - anything finite) = 0, and it stays finite
SMALL = 1 << 18  # CPU: below this many elements a call runs on one thread
CB_MAX = 4096  # CPU: most channels one task walks together through time
VEC = 16  # CPU: blocks of channels start on a multiple of this (one AVX-512 vector of float32)
THREADS = 8 if cuda_simulated() else 64  # CUDA: one thread per (b, c); threads per block
ITEMS = 8  # CUDA: steps of k, v loaded together, one chunk ahead (memory-level parallelism)


def wkv_state0(batch: int, c: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The empty state (a, b, p) = (0, 0, MIN_LOG): (batch, 3, c)."""
    s = torch.zeros(batch, 3, c, dtype=dtype, device=device)
    s[:, 2] = MIN_LOG
    return s


# =============================================================================================
# Reference (the definition, in log space; autograd differentiates it)
# =============================================================================================


def wkv_ref(w, u, k, v, state=None, return_state=False):
    """WKV by a loop over time in PyTorch, in log space (see the module docstring).

    w, u: (c,); k, v: (b, l, c); state: (b, 3, c) or None -> y: (b, l, c) [, state']."""
    batch, l, c = k.shape
    s = wkv_state0(batch, c, k.dtype, k.device) if state is None else state
    a, b, p = s[:, 0], s[:, 1], s[:, 2]  # (b, c) each
    ys = []
    for t in range(l):
        kt, vt = k[:, t], v[:, t]  # (b, c)
        q = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        ys.append((e1 * a + e2 * vt) / (e1 * b + e2))  # the bonus term e^{u+k_t} v_t
        p_new = torch.maximum(p - w, kt)  # decay the state, then add token t
        e1, e2 = torch.exp(p - w - p_new), torch.exp(kt - p_new)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, p_new
    y = torch.stack(ys, dim=1) if ys else torch.empty_like(k)  # (b, l, c)
    return (y, torch.stack([a, b, p], dim=1)) if return_state else y


# =============================================================================================
# CPU kernel (Numba). Channels are last, so a task takes a block of cb neighbouring channels of
# one sequence and walks them through time together; the loop over the block's channels at
# one step is the vectorised one (independent recurrences, contiguous k, v, y). Of each pair of
# exps one is e^0 = 1 (the larger exponent is the scale), so one exp of e^{-|d|} serves both,
# chosen by a select rather than a branch (the sign of d is random). The exp is ``exp_neg``
# (kernels/fastexp.py), not ``math.exp``: a libm call in the loop would keep it scalar. (Staging
# the exponents in a buffer, then exponentiating and combining in two more loops, was 1.5x
# slower than this one loop.) Blocks are as wide as the thread count allows (``_block``): each
# step then reads long contiguous runs of k and v (c0 … c0 + cb at stride c); at (1, 4096,
# 2048) float32 a block of 1024 channels ran 2x faster than blocks of 128 (the hardware
# prefetchers stop at every 4 KB page, and each step of a narrow block lands on a new page).
# The backward is blocked the same way.
# =============================================================================================


def _wkv_loop(w, u, k, v, state, y, cb, consts):
    """Forward. w, u: (c,); k, v, y: (b, l, c); state: (b, 3, c), updated in place; cb: channels
    per task; ``consts`` = (0, 1, MIN_LOG) in the data's dtype (so no float64 creeps into
    float32 arithmetic)."""
    one = consts[1]
    batch, l, c = k.shape
    blocks = (c + cb - 1) // cb
    for task in prange(batch * blocks):
        n, c0 = task // blocks, (task % blocks) * cb
        c1 = min(c0 + cb, c)
        sa = state[n, 0, c0:c1].copy()  # the block's (a, b, p), kept in a private buffer
        sb = state[n, 1, c0:c1].copy()
        sp = state[n, 2, c0:c1].copy()
        wb, ub = w[c0:c1], u[c0:c1]
        for t in range(l):
            kt_, vt_, yt_ = k[n, t, c0:c1], v[n, t, c0:c1], y[n, t, c0:c1]
            for j in range(c1 - c0):  # no libm call, no branch: LLVM vectorises this loop
                a, b, p = sa[j], sb[j], sp[j]
                kt, vt = kt_[j], vt_[j]
                d = p - (ub[j] + kt)  # q = max(p, u + k_t): the larger one gets e^0 = 1
                e = exp_neg(-abs(d))
                e1 = one if d > 0 else e
                e2 = e if d > 0 else one
                yt_[j] = (e1 * a + e2 * vt) / (e1 * b + e2)
                d = p - wb[j] - kt  # p' = max(p - w, k_t)
                e = exp_neg(-abs(d))
                e1 = one if d > 0 else e
                e2 = e if d > 0 else one
                sa[j] = e1 * a + e2 * vt
                sb[j] = e1 * b + e2
                sp[j] = max(p - wb[j], kt)
        state[n, 0, c0:c1] = sa
        state[n, 1, c0:c1] = sb
        state[n, 2, c0:c1] = sp


def _wkv_bwd_loop(w, u, k, v, state, gy, gw, gu, gk, gv, cb, consts):
    """Backward. w, u: (c,); k, v, gy, gk, gv: (b, l, c); state: (b, 3, c) the incoming state
    (not modified); gw, gu: (b, c), summed over b by the caller; cb: channels per task. Pass 1
    (forward in time) recomputes y_t and log D_t, stores them in gk, gv, and accumulates ∂L/∂w;
    pass 2 (backward in time) runs S1, S2 and overwrites gk, gv. Blocked and vectorised like
    the forward; only the log of pass 1 stays a libm call, in a loop of its own."""
    zero, one, min_log = consts[0], consts[1], consts[2]
    batch, l, c = k.shape
    blocks = (c + cb - 1) // cb
    for task in prange(batch * blocks):
        n, c0 = task // blocks, (task % blocks) * cb
        c1 = min(c0 + cb, c)
        nb = c1 - c0
        wb, ub = w[c0:c1], u[c0:c1]
        sa = state[n, 0, c0:c1].copy()
        sb = state[n, 1, c0:c1].copy()
        sp = state[n, 2, c0:c1].copy()
        da = np.zeros(nb, k.dtype)  # ∂a/∂w, ∂b/∂w (scaled by e^p like a, b)
        db = np.zeros(nb, k.dtype)
        acc = np.zeros(nb, k.dtype)  # ∂L/∂w, then ∂L/∂u
        qb = np.empty(nb, k.dtype)
        for t in range(l):
            kt_, vt_, gt_ = k[n, t, c0:c1], v[n, t, c0:c1], gy[n, t, c0:c1]
            yt_, lt_ = gk[n, t, c0:c1], gv[n, t, c0:c1]
            for j in range(nb):
                a, b, p, kt, vt = sa[j], sb[j], sp[j], kt_[j], vt_[j]
                d = p - (ub[j] + kt)  # q = max(p, u + k_t)
                e = exp_neg(-abs(d))
                e1 = one if d > 0 else e
                e2 = e if d > 0 else one
                den = e1 * b + e2
                yt = (e1 * a + e2 * vt) / den
                acc[j] += gt_[j] * e1 * (da[j] - yt * db[j]) / den
                yt_[j], lt_[j], qb[j] = yt, den, max(p, ub[j] + kt)
                d = p - wb[j] - kt  # p' = max(p - w, k_t)
                e = exp_neg(-abs(d))
                f1 = one if d > 0 else e
                f2 = e if d > 0 else one
                da[j], db[j] = f1 * (da[j] - a), f1 * (db[j] - b)
                sa[j], sb[j], sp[j] = f1 * a + f2 * vt, f1 * b + f2, max(p - wb[j], kt)
            for j in range(nb):  # log D_t = q + log(den), for pass 2 (libm: not vectorised)
                lt_[j] = qb[j] + math.log(lt_[j])
        gw[n, c0:c1] = acc
        s1, s2 = np.zeros(nb, k.dtype), np.zeros(nb, k.dtype)  # S_t = e^o s
        o = np.full(nb, min_log, k.dtype)  # empty after the last step
        acc[:] = zero
        for t in range(l - 1, -1, -1):
            kt_, vt_, gt_ = k[n, t, c0:c1], v[n, t, c0:c1], gy[n, t, c0:c1]
            yt_, lt_ = gk[n, t, c0:c1], gv[n, t, c0:c1]
            for j in range(nb):
                kt, vt, gt, yt, lD = kt_[j], vt_[j], gt_[j], yt_[j], lt_[j]
                gb = gt * exp_neg(ub[j] + kt - lD)  # g_t β_t
                ek = exp_neg(kt + o[j])  # ≤ 1: D_t' holds every e^{k_t - ...} term
                lt_[j] = gb + ek * s1[j]
                yt_[j] = gb * (vt - yt) + ek * (vt * s1[j] - s2[j])
                acc[j] += gb * (vt - yt)
                # S_{t-1} = g_t/D_t + e^{-w} S_t, in log space: o' = max(o - w, -log D_t)
                d = (o[j] - wb[j]) + lD
                e = exp_neg(-abs(d))
                f1 = one if d > 0 else e
                f2 = e if d > 0 else one
                s1[j], s2[j] = f1 * s1[j] + f2 * gt, f1 * s2[j] + f2 * gt * yt
                o[j] = max(o[j] - wb[j], -lD)
        gu[n, c0:c1] = acc


_wkv_cpu_fwd = njit(parallel=True, cache=True)(_wkv_loop)
_wkv_cpu_bwd = njit(parallel=True, cache=True)(_wkv_bwd_loop)


@contextlib.contextmanager
def _threads_for(size: int):
    """One thread for small problems: waking a team of threads costs more than they save there
    (a (64, 33, 32) call took 17 ms on 2 busy cores with 2 threads, 2.4 ms with 1)."""
    before = numba.get_num_threads()
    numba.set_num_threads(1 if size < SMALL else before)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _consts(x: torch.Tensor) -> np.ndarray:
    return np.array([0.0, 1.0, MIN_LOG], dtype=str(x.dtype).removeprefix("torch."))


def _block(batch: int, c: int, threads: int) -> int:
    """Channels per CPU task: as wide as possible, with batch · blocks a multiple of the thread
    count (no thread idles at the end), at most CB_MAX channels, starting on multiples of VEC."""
    blocks = threads // math.gcd(batch, threads)
    blocks *= -(-c // (blocks * CB_MAX))  # ceil: no block wider than CB_MAX
    cb = -(-c // blocks)
    return -(-cb // VEC) * VEC


def _fwd_cpu_into(w, u, k, v, state, y):
    """All contiguous; writes y (b, l, c); state (b, 3, c) is updated in place."""
    with _threads_for(k.numel()):
        cb = _block(k.shape[0], k.shape[2], numba.get_num_threads())
        _wkv_cpu_fwd(*map(to_numba, (w, u, k, v, state, y)), cb, _consts(k))


def _fwd_cpu(w, u, k, v, state):
    """All contiguous; state (b, 3, c) is updated in place. -> y (b, l, c)."""
    y = torch.empty_like(k)
    _fwd_cpu_into(w, u, k, v, state, y)
    return y


def _bwd_cpu(w, u, k, v, state, gy):
    gk, gv = torch.empty_like(k), torch.empty_like(v)
    gw = torch.empty(k.shape[0], k.shape[2], dtype=k.dtype)  # (b, c), per sequence
    gu = torch.empty_like(gw)
    with _threads_for(k.numel()):
        cb = _block(k.shape[0], k.shape[2], numba.get_num_threads())
        _wkv_cpu_bwd(*map(to_numba, (w, u, k, v, state, gy, gw, gu, gk, gv)), cb, _consts(k))
    return gw.sum(0), gu.sum(0), gk, gv


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
    zero, min_log = dtype.type(0), dtype.type(MIN_LOG)

    @cuda.jit
    def fwd(w, u, k, v, state, y):
        vk = cuda.local.array(ITEMS, dtype)  # this chunk's k, v
        vv = cuda.local.array(ITEMS, dtype)
        nk = cuda.local.array(ITEMS, dtype)  # the next chunk's, in flight
        nv = cuda.local.array(ITEMS, dtype)
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
        da, db, acc_w = zero, zero, zero
        for t in range(l):
            kt, vt = k[n, t, j], v[n, t, j]
            uk = uj + kt
            q = max(p, uk)
            e1, e2 = math.exp(p - q), math.exp(uk - q)
            den = e1 * b + e2
            yt = (e1 * a + e2 * vt) / den
            acc_w += gy[n, t, j] * e1 * (da - yt * db) / den
            gk[n, t, j], gv[n, t, j] = yt, q + math.log(den)
            pn = max(p - wj, kt)
            f1, f2 = math.exp(p - wj - pn), math.exp(kt - pn)
            da, db = f1 * (da - a), f1 * (db - b)
            a, b, p = f1 * a + f2 * vt, f1 * b + f2, pn
        s1, s2, o = zero, zero, min_log
        g_next, y_next, lD_next, acc_u = zero, zero, zero, zero
        for t in range(l - 1, -1, -1):
            if t < l - 1:
                on = max(o - wj, -lD_next)
                f1, f2 = math.exp(o - wj - on), math.exp(-lD_next - on)
                s1, s2, o = f1 * s1 + f2 * g_next, f1 * s2 + f2 * g_next * y_next, on
            kt, vt, gt = k[n, t, j], v[n, t, j], gy[n, t, j]
            yt, lD = gk[n, t, j], gv[n, t, j]
            gb = gt * math.exp(uj + kt - lD)
            ek = math.exp(kt + o)
            gv[n, t, j] = gb + ek * s1
            gk[n, t, j] = gb * (vt - yt) + ek * (vt * s1 - s2)
            acc_u += gb * (vt - yt)
            g_next, y_next, lD_next = gt, yt, lD
        gw[n, j], gu[n, j] = acc_w, acc_u

    return fwd, bwd


def _grid(batch, c):
    return (batch * c + THREADS - 1) // THREADS, THREADS


def _fwd_cuda(w, u, k, v, state):
    y = torch.empty_like(k)
    fwd, _ = _wkv_kernels(np.dtype(str(k.dtype).removeprefix("torch.")))
    launch(fwd, *_grid(k.shape[0], k.shape[2]), w, u, k, v, state, y)
    return y


def _bwd_cuda(w, u, k, v, state, gy):
    gk, gv = torch.empty_like(k), torch.empty_like(v)
    gw = k.new_empty(k.shape[0], k.shape[2])
    gu = torch.empty_like(gw)
    _, bwd = _wkv_kernels(np.dtype(str(k.dtype).removeprefix("torch.")))
    launch(bwd, *_grid(k.shape[0], k.shape[2]), w, u, k, v, state, gy, gw, gu, gk, gv)
    return gw.sum(0), gu.sum(0), gk, gv


# =============================================================================================
# Autograd: forward and backward are both kernels of the chosen backend
# =============================================================================================


class _WKV(torch.autograd.Function):
    """Wraps a (forward, backward) kernel pair. Returns (y, state'); state' is not
    differentiable, and no gradient flows into the incoming state."""

    @staticmethod
    def forward(ctx, w, u, k, v, state, kernels):
        fwd, bwd = kernels
        w, u, k, v = (x.contiguous() for x in (w, u, k, v))
        s0 = wkv_state0(k.shape[0], k.shape[2], k.dtype, k.device) if state is None else (
            state.detach().contiguous())
        s = s0.clone()  # the kernel updates it in place
        y = fwd(w, u, k, v, s) if k.numel() else torch.empty_like(k)
        ctx.save_for_backward(w, u, k, v, s0)
        ctx.bwd = bwd
        ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, gy, _gs):
        w, u, k, v, s0 = ctx.saved_tensors
        if k.numel():
            gw, gu, gk, gv = ctx.bwd(w, u, k, v, s0, gy.contiguous())
        else:
            gw, gu, gk, gv = (torch.zeros_like(x) for x in (w, u, k, v))
        return gw, gu, gk, gv, None, None


def wkv_cpu(w, u, k, v, state=None, return_state=False):
    """Numba CPU kernel, parallel over (b, blocks of channels). Contract of ``wkv_ref``."""
    y, s = _WKV.apply(w, u, k, v, state, (_fwd_cpu, _bwd_cpu))
    return (y, s) if return_state else y


def wkv_cuda(w, u, k, v, state=None, return_state=False):
    """numba.cuda kernel (or the CUDA simulator). Contract of ``wkv_ref``."""
    y, s = _WKV.apply(w, u, k, v, state, (_fwd_cuda, _bwd_cuda))
    return (y, s) if return_state else y


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": wkv_ref, "cpu": wkv_cpu, "cuda": wkv_cuda}


def wkv(w, u, k, v, *, state=None, return_state=False, backend=None):
    """RWKV-4's WKV: y_t = (Σ_{i<t} e^{-(t-1-i)w+k_i} v_i + e^{u+k_t} v_t) / (same without v).

    Args:
        w: (c,) decay rates, every entry ≥ 0 (RWKV stores w = e^{time_decay}).
        u: (c,) bonus of the current token.
        k, v: (b, l, c) keys and values, channels last; float32 or float64, one dtype and
            device for all four.
        state: (b, 3, c) from an earlier call with ``return_state=True``, or None to start
            from the empty past. Treated as opaque and constant (no gradient flows into it).
        return_state: also return the state after the last step.
        backend: "ref", "cpu", "cuda", a callable with this signature, or None to choose
            from the tensors' device.

    Returns:
        y: (b, l, c), or (y, state) with ``return_state``. Calling ``wkv`` on the rest of a
        sequence with ``state=`` gives the same result as one call on the whole sequence.
        Differentiable in w, u, k and v on every backend.
    """
    expect_tensor("k", k, "b, l, c")
    expect_tensor("v", v, "b, l, c", dtypes=(k.dtype,), shape=k.shape)
    batch, _, c = k.shape
    expect_tensor("w", w, "c", dtypes=(k.dtype,), shape=(c,))
    expect_tensor("u", u, "c", dtypes=(k.dtype,), shape=(c,))
    if state is not None:
        expect_tensor("state", state, "b, 3, c", dtypes=(k.dtype,), shape=(batch, 3, c))
    if bool((w < 0).any()) or bool(torch.isnan(w).any()):
        raise ValueError(
            f"w must be >= 0 (a decay rate; RWKV uses w = exp(time_decay)), got min "
            f"{w.min().item():.4g}"
        )
    return dispatch(IMPLS, w, u, k, v, state, return_state, backend=backend)
