"""The selective scan's CPU kernels (Numba): the loops, kept importable undecorated, and their
host wrappers. The equations and the glossary: kernels/selective_scan/__init__.py."""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from minimodels.backend import to_numba
from minimodels.kernels.fastexp import exp_neg
from minimodels.kernels.selective_scan.ref import SOFTPLUS_THRESHOLD

# =============================================================================================
# CPU kernel (Numba). One row (b, d) per iteration: the n states live in a small local array,
# so the (b, d, l, n) expansion is never stored. It costs b·d·l·n exps; where Δ A ≤ 0 (a
# decaying state, as Mamba's A = -exp(A_log), and Δ ≥ 0, always so after softplus) they are
# kernels/fastexp.py's exp_neg, and the update of the n states at one step is one vectorised
# loop (B and C are transposed to (b, l, n) for it); otherwise one scalar libm call each,
# chosen per channel (the sign of A) and per step (the sign of Δ). The backward recomputes the
# row's states into a per-thread scratch of (l+1, n) (never the whole (b, d, l, n)) and walks
# back; reductions over rows (∂A, ∂B, ∂C, ∂D, ∂bias) go into one private buffer per worker,
# summed afterwards.
# =============================================================================================


def _selective_scan_loop(u, delta, A, Bt, B2, Ct, C2, D, z, bias, var_B, var_C, has_z,
                         softplus, nonpos, out, last):
    """Forward. u, delta, z, out: (b, d, l); A, B2, C2: (d, n); Bt, Ct: (b, l, n) (B and C
    transposed, so a step's n values are contiguous); D, bias: (d,); last: (b, d, n).
    var_B / var_C pick Bt (input-dependent) or B2 (fixed); nonpos: (d,) bool, A[di] ≤ 0, so
    that at a step with Δ ≥ 0 every Δ A ≤ 0 and exp_neg applies (Δ < 0 is possible without
    softplus: then e^{Δ A} may overflow, and only libm's exp gives inf)."""
    batch, d, l = u.shape
    n = A.shape[1]
    for r in prange(batch * d):
        bi, di = r // d, r % d
        a = A[di]  # (n,)
        x = np.zeros_like(a)  # (n,) the state, in cache
        # [core] selective_scan_cpu
        for t in range(l):
            dt = delta[bi, di, t] + bias[di]
            if softplus and dt <= SOFTPLUS_THRESHOLD:
                dt = math.log1p(math.exp(dt))
            ut = u[bi, di, t]
            dtu = dt * ut
            Bv = Bt[bi, t] if var_B else B2[di]  # (n,)
            Cv = Ct[bi, t] if var_C else C2[di]
            if t == 0:  # x_{-1} = 0: nothing to decay (e^{Δ A} · 0 is NaN if e^{Δ A} = inf)
                for k in range(n):
                    x[k] = dtu * Bv[k]
            elif nonpos[di] and dt >= 0:  # Δ A ≤ 0: no call, no branch: LLVM vectorises
                for k in range(n):
                    x[k] = exp_neg(dt * a[k]) * x[k] + dtu * Bv[k]
            else:  # Δ A may be > 0: libm's exp, which overflows to inf as it should
                for k in range(n):
                    x[k] = math.exp(dt * a[k]) * x[k] + dtu * Bv[k]
            y = 0.0
            for k in range(n):
                y += Cv[k] * x[k]
            y += D[di] * ut
            if has_z:
                zt = z[bi, di, t]
                y *= zt / (1.0 + math.exp(-zt))
            out[bi, di, t] = y
            # [/core]
        for k in range(n):
            last[bi, di, k] = x[k]


def _selective_scan_bwd_loop(u, delta, A, Bt, B2, Ct, C2, D, z, bias, var_B, var_C, has_z,
                             softplus, nonpos, g, dlast, du, ddelta, dz, dA, dB3, dB2, dC3, dC2,
                             dD, dbias):
    """Backward. Inputs as the forward's; g, du, ddelta, dz: (b, d, l); dlast: (b, d, n).
    Per-worker partial sums (first axis w, zeroed on entry): dA, dB2, dC2: (w, d, n); dB3,
    dC3: (w, b, n, l); dD, dbias: (w, d)."""
    batch, d, l = u.shape
    n = A.shape[1]
    workers = dA.shape[0]
    for w in prange(workers):
        xs = np.zeros((l + 1, n), dtype=u.dtype)  # xs[t + 1] = x_t, xs[0] = x_{-1} = 0
        ab = np.empty((l, n), dtype=u.dtype)  # Ā_t, kept from the recomputation
        dts = np.empty(l, dtype=u.dtype)  # Δ_t
        c = np.empty(n, dtype=u.dtype)  # Ā_{t+1} ⊙ dx_{t+1}: what flows back into x_t
        for r in range(w, batch * d, workers):
            bi, di = r // d, r % d
            for t in range(l):  # recompute the forward, storing the row's states
                dt = delta[bi, di, t] + bias[di]
                if softplus and dt <= SOFTPLUS_THRESHOLD:
                    dt = math.log1p(math.exp(dt))
                dts[t] = dt
                dtu = dt * u[bi, di, t]
                Bv = Bt[bi, t] if var_B else B2[di]  # (n,)
                if t == 0:  # x_{-1} = 0: Ā_0 multiplies nothing, take it as 1 (as the forward)
                    for k in range(n):
                        ab[t, k] = 1.0
                elif nonpos[di] and dt >= 0:  # vectorised over the n states, as in the forward
                    for k in range(n):
                        ab[t, k] = exp_neg(dt * A[di, k])
                else:
                    for k in range(n):
                        ab[t, k] = math.exp(dt * A[di, k])
                for k in range(n):
                    xs[t + 1, k] = ab[t, k] * xs[t, k] + dtu * Bv[k]
            for k in range(n):
                c[k] = dlast[bi, di, k]
            for t in range(l - 1, -1, -1):
                dt, ut = dts[t], u[bi, di, t]
                dy = g[bi, di, t]
                if has_z:  # y = (C·x + D u) silu(z)
                    y = D[di] * ut
                    for k in range(n):
                        y += (Ct[bi, t, k] if var_C else C2[di, k]) * xs[t + 1, k]
                    zt = z[bi, di, t]
                    s = 1.0 / (1.0 + math.exp(-zt))
                    dz[bi, di, t] = dy * y * s * (1.0 + zt * (1.0 - s))
                    dy *= zt * s
                ddt = 0.0
                dut = D[di] * dy
                dD[w, di] += dy * ut
                for k in range(n):
                    Bk = Bt[bi, t, k] if var_B else B2[di, k]
                    Ck = Ct[bi, t, k] if var_C else C2[di, k]
                    dx = Ck * dy + c[k]
                    dAbar = dx * xs[t, k] * ab[t, k]  # ∂L/∂(Δ_t A)
                    ddt += dAbar * A[di, k] + dx * Bk * ut
                    dA[w, di, k] += dAbar * dt
                    dut += dx * dt * Bk
                    if var_B:
                        dB3[w, bi, k, t] += dx * dt * ut
                    else:
                        dB2[w, di, k] += dx * dt * ut
                    if var_C:
                        dC3[w, bi, k, t] += dy * xs[t + 1, k]
                    else:
                        dC2[w, di, k] += dy * xs[t + 1, k]
                    c[k] = ab[t, k] * dx
                du[bi, di, t] = dut
                raw = delta[bi, di, t] + bias[di]
                if softplus and raw <= SOFTPLUS_THRESHOLD:
                    ddt *= 1.0 / (1.0 + math.exp(-raw))
                ddelta[bi, di, t] = ddt
                dbias[w, di] += ddt


_selective_scan_cpu_fwd = njit(parallel=True, cache=True)(_selective_scan_loop)
_selective_scan_cpu_bwd = njit(parallel=True, cache=True)(_selective_scan_bwd_loop)


def _cpu_inputs(u, delta, A, B3, B2, C3, C2, D, z, bias, flags):
    """The CPU kernels' inputs: B and C transposed to (b, l, n) (a step's states contiguous),
    and per channel whether A ≤ 0 (then Δ A ≤ 0 at steps with Δ ≥ 0, and the vectorisable
    exp_neg applies)."""
    var_B, var_C = flags[:2]
    Bt = B3.transpose(1, 2).contiguous() if var_B else B3
    Ct = C3.transpose(1, 2).contiguous() if var_C else C3
    args = (u, delta, A, Bt, B2, Ct, C2, D, z, bias)
    return (*map(to_numba, args), *flags, (A <= 0).all(1).numpy())


def _fwd_cpu(u, delta, A, B3, B2, C3, C2, D, z, bias, flags):
    out = torch.empty_like(u)
    last = u.new_empty(u.shape[0], u.shape[1], A.shape[1])
    _selective_scan_cpu_fwd(*_cpu_inputs(u, delta, A, B3, B2, C3, C2, D, z, bias, flags),
                            to_numba(out), to_numba(last))
    return out, last, None


def _bwd_cpu(u, delta, A, B3, B2, C3, C2, D, z, bias, flags, saved, g, dlast):
    w = numba.get_num_threads()
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(u)
    parts = [u.new_zeros((w,) + t.shape) for t in (A, B3, B2, C3, C2, D, bias)]
    _selective_scan_cpu_bwd(*_cpu_inputs(u, delta, A, B3, B2, C3, C2, D, z, bias, flags),
                            to_numba(g), to_numba(dlast), *map(to_numba, (du, ddelta, dz, *parts)))
    dA, dB3, dB2, dC3, dC2, dD, dbias = (p.sum(0) for p in parts)
    return du, ddelta, dA, dB3, dB2, dC3, dC2, dD, dz, dbias
