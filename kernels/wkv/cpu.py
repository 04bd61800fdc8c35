"""WKV's CPU kernels (Numba): the loops, kept importable undecorated, and their host wrappers.
The equations and the glossary: kernels/wkv/__init__.py."""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
import torch
from numba import njit, prange

from minimodels.backend import to_numba
from minimodels.kernels._common import numpy_dtype
from minimodels.kernels.fastexp import exp_neg
from minimodels.kernels.wkv.ref import MIN_LOG

# =============================================================================================
# Constants
# =============================================================================================

SMALL = 1 << 18  # CPU: below this many elements a call runs on one thread
CB_MAX = 4096  # CPU: most channels one task walks together through time
VEC = 16  # CPU: blocks of channels start on a multiple of this (one AVX-512 vector of float32)


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
# The backward is blocked the same way. Its ∂L/∂w = Σ_t g_t (∂a/∂w - y_t ∂b/∂w) / den_t does
# not carry ∂a/∂w itself: where one token dominates the state (large w and |k|), ∂a/∂w ≈ y ∂b/∂w
# and their difference lost every digit in float32 (a gradient of 1e-6 came out 230% wrong).
# It carries dc = ∂a/∂w - m ∂b/∂w about the state's mean m = a/b instead, whose update only
# multiplies small differences (v - m): ∂a/∂w - y ∂b/∂w = dc - (y - m) ∂b/∂w, y - m = e2 (v - m)
# / den. In float32 that was 2.8e-8 from the float64 truth where ref's autograd is 3.6e-8.
# Infinite k as the definition takes it (ref, cuda): k_t = -inf is a token of weight e^-inf = 0
# (exp_neg gives exactly 0; at an empty past y_t = 0/0 = nan); k_t = +inf makes the e^0 weight
# e^(inf - inf) = nan, written ``one + (d - d)`` (d = -inf), so y and the state become nan from
# that step on. No check of k at the entry: isfinite(k).all() took ~4x this forward's time.
# =============================================================================================


def _wkv_loop(w, u, k, v, state, y, cb, consts):
    """Forward. w, u: (c,); k, v, y: (b, l, c); state: (b, 3, c), updated in place; cb: channels
    per task; ``consts`` = (0, 1, MIN_LOG) in the data's dtype (so no float64 creeps into
    float32 arithmetic)."""
    one = consts[1]
    batch, l, c = k.shape
    blocks = (c + cb - 1) // cb
    # [core] blocked time loop
    for task in prange(batch * blocks):
        bi, c0 = task // blocks, (task % blocks) * cb
        c1 = min(c0 + cb, c)
        sa = state[bi, 0, c0:c1].copy()  # the block's (a, b, p), kept in a private buffer
        sb = state[bi, 1, c0:c1].copy()
        sp = state[bi, 2, c0:c1].copy()
        wb, ub = w[c0:c1], u[c0:c1]
        for t in range(l):
            kt_, vt_, yt_ = k[bi, t, c0:c1], v[bi, t, c0:c1], y[bi, t, c0:c1]
            for j in range(c1 - c0):  # no libm call, no branch: LLVM vectorises this loop
                a, b, p = sa[j], sb[j], sp[j]
                kt, vt = kt_[j], vt_[j]
                d = p - (ub[j] + kt)  # q = max(p, u + k_t): the larger one gets e^0 = 1
                e = exp_neg(-abs(d))  # 0 at d = +inf (k_t = -inf: no weight)
                e1 = one if d > 0 else e
                e2 = e if d > 0 else one + (d - d)  # d = -inf (k_t = +inf): e^(inf - inf) = nan
                yt_[j] = (e1 * a + e2 * vt) / (e1 * b + e2)
                d = p - wb[j] - kt  # p' = max(p - w, k_t)
                e = exp_neg(-abs(d))
                e1 = one if d > 0 else e
                e2 = e if d > 0 else one + (d - d)  # as ref's: a, b become nan at k_t = +inf
                sa[j] = e1 * a + e2 * vt
                sb[j] = e1 * b + e2
                sp[j] = max(p - wb[j], kt)
    # [/core]
        state[bi, 0, c0:c1] = sa
        state[bi, 1, c0:c1] = sb
        state[bi, 2, c0:c1] = sp


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
        bi, c0 = task // blocks, (task % blocks) * cb
        c1 = min(c0 + cb, c)
        nb = c1 - c0
        wb, ub = w[c0:c1], u[c0:c1]
        sa = state[bi, 0, c0:c1].copy()
        sb = state[bi, 1, c0:c1].copy()
        sp = state[bi, 2, c0:c1].copy()
        sm = np.zeros(nb, k.dtype)  # m = a / b, the state's mean value (0 if empty)
        for j in range(nb):
            if sb[j] > zero:
                sm[j] = sa[j] / sb[j]
        dc = np.zeros(nb, k.dtype)  # ∂a/∂w - m ∂b/∂w (scaled by e^p like a, b)
        db = np.zeros(nb, k.dtype)  # ∂b/∂w
        acc = np.zeros(nb, k.dtype)  # ∂L/∂w, then ∂L/∂u
        qb = np.empty(nb, k.dtype)
        for t in range(l):
            kt_, vt_, gt_ = k[bi, t, c0:c1], v[bi, t, c0:c1], gy[bi, t, c0:c1]
            yt_, lt_ = gk[bi, t, c0:c1], gv[bi, t, c0:c1]
            for j in range(nb):
                a, b, p, m, kt, vt = sa[j], sb[j], sp[j], sm[j], kt_[j], vt_[j]
                d = p - (ub[j] + kt)  # q = max(p, u + k_t)
                e = exp_neg(-abs(d))
                e1 = one if d > 0 else e
                e2 = e if d > 0 else one + (d - d)  # nan at k_t = +inf, as the forward
                den = e1 * b + e2
                r = one / den
                yt = (e1 * a + e2 * vt) * r
                # ∂a/∂w - y ∂b/∂w = dc - (y - m) ∂b/∂w with y - m = e2 (v - m) / den: no
                # difference of two large, nearly equal terms (see the section comment)
                acc[j] += gt_[j] * e1 * (dc[j] - e2 * (vt - m) * r * db[j]) * r
                yt_[j], lt_[j], qb[j] = yt, den, max(p, ub[j] + kt)
                d = p - wb[j] - kt  # p' = max(p - w, k_t)
                e = exp_neg(-abs(d))
                f1 = one if d > 0 else e
                f2 = e if d > 0 else one + (d - d)
                bn = f1 * b + f2  # ≥ 1: one of f1, f2 is 1, and b ≥ 1 after any token
                rb = one / bn
                dm = f2 * (m - vt) * rb  # m - m'
                dc[j], db[j] = f1 * (dc[j] + dm * (db[j] - b)), f1 * (db[j] - b)
                an = f1 * a + f2 * vt
                sa[j], sb[j], sp[j], sm[j] = an, bn, max(p - wb[j], kt), an * rb
            for j in range(nb):  # log D_t = q + log(den), for pass 2 (libm: not vectorised)
                lt_[j] = qb[j] + math.log(lt_[j])
        gw[bi, c0:c1] = acc
        # S_t = e^o s1; sd = Σ s·(y - sc), the same sum of outputs centred on the last one
        # added (sc): v_t s1 - Σ s·y = (v_t - sc) s1 - sd has no difference of two large,
        # nearly equal terms where one token dominates the later outputs (y ≈ v_t)
        s1, sd, sc = np.zeros(nb, k.dtype), np.zeros(nb, k.dtype), np.zeros(nb, k.dtype)
        o = np.full(nb, min_log, k.dtype)  # empty after the last step
        acc[:] = zero
        for t in range(l - 1, -1, -1):
            kt_, vt_, gt_ = k[bi, t, c0:c1], v[bi, t, c0:c1], gy[bi, t, c0:c1]
            yt_, lt_ = gk[bi, t, c0:c1], gv[bi, t, c0:c1]
            for j in range(nb):
                kt, vt, gt, yt, lD = kt_[j], vt_[j], gt_[j], yt_[j], lt_[j]
                gb = gt * exp_neg(ub[j] + kt - lD)  # g_t β_t
                ek = exp_neg(kt + o[j])  # ≤ 1: D_t' holds every e^{k_t - ...} term
                lt_[j] = gb + ek * s1[j]
                yt_[j] = gb * (vt - yt) + ek * ((vt - sc[j]) * s1[j] - sd[j])
                acc[j] += gb * (vt - yt)
                # S_{t-1} = g_t/D_t + e^{-w} S_t, in log space: o' = max(o - w, -log D_t)
                d = (o[j] - wb[j]) + lD
                e = exp_neg(-abs(d))
                f1 = one if d > 0 else e
                f2 = e if d > 0 else one
                if s1[j] != zero:  # re-centred on y_t (nothing to move while s1 is empty)
                    sd[j] = f1 * (sd[j] + s1[j] * (sc[j] - yt))
                s1[j], sc[j] = f1 * s1[j] + f2 * gt, yt
                o[j] = max(o[j] - wb[j], -lD)
        gu[bi, c0:c1] = acc


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
    return np.array([0.0, 1.0, MIN_LOG], dtype=numpy_dtype(x.dtype))


def _block(batch: int, c: int, threads: int) -> int:
    """Channels per CPU task: as wide as possible, with batch · blocks a multiple of the thread
    count (no thread idles at the end), at most CB_MAX channels, starting on multiples of VEC."""
    blocks = threads // math.gcd(batch, threads)
    blocks *= -(-c // (blocks * CB_MAX))  # ceil: no block wider than CB_MAX
    cb = -(-c // blocks)
    return -(-cb // VEC) * VEC


def _fwd_cpu(w, u, k, v, state, y=None):
    """All contiguous; state (b, 3, c) is updated in place. -> y (b, l, c), written into ``y``
    when given."""
    y = torch.empty_like(k) if y is None else y
    with _threads_for(k.numel()):
        cb = _block(k.shape[0], k.shape[2], numba.get_num_threads())
        _wkv_cpu_fwd(*map(to_numba, (w, u, k, v, state, y)), cb, _consts(k))
    return y


def _bwd_cpu(w, u, k, v, state, gy):
    gk, gv = torch.empty_like(k), torch.empty_like(v)
    gw = torch.empty(k.shape[0], k.shape[2], dtype=k.dtype)  # (b, c), per sequence
    gu = torch.empty_like(gw)
    with _threads_for(k.numel()):
        cb = _block(k.shape[0], k.shape[2], numba.get_num_threads())
        _wkv_cpu_bwd(*map(to_numba, (w, u, k, v, state, gy, gw, gu, gk, gv)), cb, _consts(k))
    return gw.sum(0), gu.sum(0), gk, gv
