"""The S4D kernel's CPU kernels (Numba): the loops, kept importable undecorated, and their host
wrappers. The equations and the glossary: kernels/ssm_kernel/__init__.py."""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from minimodels.backend import to_numba

# =============================================================================================
# Constants
# =============================================================================================

# CPU: the sequence is cut into blocks of BLOCK steps. z^j for j < BLOCK is tabulated once per
# mode (by the power recurrence, in float64); the block's anchor z^{l0} is carried from block to
# block (z^{l0 + BLOCK} = z^{l0}·z^BLOCK) and recomputed exactly by exp every REANCHOR blocks.
# Inside a block K[l0 + j] += Re(w·z^{l0}·z^j): independent over j, so it vectorises. The
# backward uses the same tables and anchors for its sums over j.
BLOCK = 128
REANCHOR = 8  # exact exp every 8 blocks = 1024 steps; error measured in tests and chapter 04
# Below d·n·L = PARALLEL_MIN the CPU kernels run on one thread: waking OpenMP's threads cost
# ~8 ms per call on the 2-core CI machine when other processes share it (measured: fwd+bwd at
# (d, n, L) = (64, 32, 1024) 16 ms parallel vs 3.4 ms on one thread), more than the work.
PARALLEL_MIN = 1 << 23

# The backward's φ1 and φ1' = (e^x − φ1)/x: that difference cancels for small |x|, so below
# |x| < 1/2 both come from their Taylor series (18 terms: truncation < 1e-18).
_PHI1 = np.array([1 / math.factorial(m + 1) for m in range(18)])  # φ1 = Σ x^m/(m+1)!
_DPHI1 = np.array([(m + 1) / math.factorial(m + 2) for m in range(18)])  # φ1' = Σ (m+1)x^m/(m+2)!


# =============================================================================================
# CPU kernel (Numba). One thread per channel. Per mode: a table z^j (j < BLOCK) by the power
# recurrence; per block: the anchor z^{l0}; then K[l0 + j] += Re(w·z^{l0}·z^j), a loop of two
# multiply-adds per element over contiguous memory that LLVM vectorises. Exps per (d, n):
# 2 + L/(BLOCK·REANCHOR) instead of L. The backward runs the same blocks, with four sums over j
# per mode (Σ G·z^j and Σ j·G·z^j, real and imaginary) in place of the update.
# =============================================================================================


@njit(cache=True)
def _zoh_weight(Ar, Ai, Cr, Ci, step):
    """(Δ·A, w = 2·C·B̄) for one mode, in float64: B̄ = Δ·φ1(Δ·A) with
    exp(x) − 1 = expm1(x_r)·cos x_i − 2·sin²(x_i/2) + i·e^{x_r}·sin x_i (no cancellation for
    small Δ·A), and φ1's series where |Δ·A| < 1e-4 (so A = 0 and tiny A give B̄ = Δ)."""
    xr, xi = step * Ar, step * Ai
    den = xr * xr + xi * xi
    if den < 1e-8:  # φ1 = 1 + x/2·(1 + x/3·(1 + x/4))
        pr, pi = 1.0 + xr / 4, xi / 4
        pr, pi = 1.0 + (pr * xr - pi * xi) / 3, (pr * xi + pi * xr) / 3
        pr, pi = 1.0 + (pr * xr - pi * xi) / 2, (pr * xi + pi * xr) / 2
    else:
        sh = math.sin(0.5 * xi)
        er = math.expm1(xr) * math.cos(xi) - 2.0 * sh * sh
        ei = math.exp(xr) * math.sin(xi)
        pr, pi = (er * xr + ei * xi) / den, (ei * xr - er * xi) / den
    qr, qi = step * pr, step * pi  # B̄
    return xr, xi, 2.0 * (Cr * qr - Ci * qi), 2.0 * (Cr * qi + Ci * qr)


def _mode_grads(Ar, Ai, Cr, Ci, step, sr, si, tr, ti):
    """(∂A_r, ∂A_i, ∂C_r, ∂C_i, ∂Δ contribution) of one mode from its adjoint sums S = sr + i·si,
    T = tr + i·ti, all in float64 (the formulas of the module docstring). Plain Python over
    scalars: compiled for the CPU (``njit``) and for CUDA (a device function)."""
    xr, xi = step * Ar, step * Ai
    e = math.exp(xr)
    zr, zi = e * math.cos(xi), e * math.sin(xi)  # z = exp(Δ·A)
    r2 = xr * xr + xi * xi
    if r2 < 0.25:  # |x| < 1/2: φ1 and φ1' by Horner on their Taylor series
        fr, fi = _PHI1[17], 0.0
        dr, di = _DPHI1[17], 0.0
        for m in range(16, -1, -1):
            fr, fi = fr * xr - fi * xi + _PHI1[m], fr * xi + fi * xr
            dr, di = dr * xr - di * xi + _DPHI1[m], dr * xi + di * xr
    else:
        sh = math.sin(0.5 * xi)
        er = math.expm1(xr) * math.cos(xi) - 2.0 * sh * sh  # exp(x) − 1
        ei = e * math.sin(xi)
        fr, fi = (er * xr + ei * xi) / r2, (ei * xr - er * xi) / r2  # φ1 = (e^x − 1)/x
        nr, ni = zr - fr, zi - fi
        dr, di = (nr * xr + ni * xi) / r2, (ni * xr - nr * xi) / r2  # φ1' = (e^x − φ1)/x
    Br, Bi = step * fr, step * fi  # B̄
    Wr, Wi = 2.0 * (Cr * Br - Ci * Bi), 2.0 * (Cr * Bi + Ci * Br)  # w = 2·C·B̄
    WTr, WTi = Wr * tr - Wi * ti, Wr * ti + Wi * tr  # w·T
    BSr, BSi = Br * sr - Bi * si, Br * si + Bi * sr  # B̄·S
    DSr, DSi = dr * sr - di * si, dr * si + di * sr  # φ1'·S
    CDr, CDi = Cr * DSr - Ci * DSi, Cr * DSi + Ci * DSr  # C·φ1'·S
    ZSr, ZSi = zr * sr - zi * si, zr * si + zi * sr  # z·S
    s2 = step * step
    gAr = 2.0 * s2 * CDr + step * WTr
    gAi = 2.0 * s2 * CDi + step * WTi
    gdt = 2.0 * (Cr * ZSr - Ci * ZSi) + (Ar * WTr - Ai * WTi)
    return gAr, -gAi, 2.0 * BSr, -2.0 * BSi, gdt


_mode_grads_cpu = njit(cache=True)(_mode_grads)


def _s4d_kernel_loop(A, C, dt, K):
    """A, C: (d, n, 2) real and imaginary parts; dt: (d,); K: (d, L), written. The O(d·n)
    setup runs in float64 whatever the input precision; the O(d·n·L) loop in K's."""
    d, n = A.shape[0], A.shape[1]
    L = K.shape[1]
    R = min(BLOCK, L)
    for c in prange(d):
        Tr = np.empty((n, R), K.dtype)  # Re z^j, Im z^j in the output precision
        Ti = np.empty((n, R), K.dtype)
        xr = np.empty(n)  # Re Δ·A, Im Δ·A, Re w, Im w: float64
        xi = np.empty(n)
        wr = np.empty(n)
        wi = np.empty(n)
        vr = np.empty(n)  # the carried anchor w·z^{l0}, float64
        vi = np.empty(n)
        Zr = np.empty(n)  # z^R, float64
        Zi = np.empty(n)
        ar = np.empty(n, K.dtype)  # the anchor rounded to the output precision
        ai = np.empty(n, K.dtype)
        for k in range(n):
            xr[k], xi[k], wr[k], wi[k] = _zoh_weight(
                np.float64(A[c, k, 0]), np.float64(A[c, k, 1]), np.float64(C[c, k, 0]),
                np.float64(C[c, k, 1]), np.float64(dt[c]))
            # [core] s4d_table
            e = math.exp(xr[k])
            zr, zi = e * math.cos(xi[k]), e * math.sin(xi[k])
            pr, pi = 1.0, 0.0
            for j in range(R):  # the power recurrence z^j = z^{j-1}·z
                Tr[k, j] = pr
                Ti[k, j] = pi
                pr, pi = pr * zr - pi * zi, pr * zi + pi * zr
            Zr[k], Zi[k] = pr, pi  # z^R
            # [/core]
        # [core] s4d_blocks
        row = K[c]
        row[:] = 0
        for b in range(0, (L + R - 1) // R):
            l0 = b * R
            m = min(R, L - l0)
            for k in range(n):
                if b % REANCHOR == 0:  # exact: ((w·e^{iIm(Δ·A)·l0})·h)·h, h = e^{Re(Δ·A)·l0/2}
                    h = math.exp(xr[k] * (0.5 * l0))  # halved: the anchor is finite where
                    cr, ci = math.cos(xi[k] * l0), math.sin(xi[k] * l0)  # e^{Δ·A·l0} is not
                    vr[k] = (wr[k] * cr - wi[k] * ci) * h * h
                    vi[k] = (wr[k] * ci + wi[k] * cr) * h * h
                ar[k], ai[k] = vr[k], vi[k]
                vr[k], vi[k] = vr[k] * Zr[k] - vi[k] * Zi[k], vr[k] * Zi[k] + vi[k] * Zr[k]
            for k in range(n):
                pr, pi = ar[k], ai[k]
                for j in range(m):  # Re((pr + i·pi)(Tr + i·Ti)); vectorised over j
                    row[l0 + j] += pr * Tr[k, j] - pi * Ti[k, j]
        # [/core]


@njit(cache=True, fastmath={"reassoc", "contract"})
def _block_sums(g, jg, tr, ti, m):
    """Σ_j g_j·z^j and Σ_j j·g_j·z^j over j < m, real and imaginary parts (z^j = tr + i·ti),
    accumulated in float64. Reassociation lets LLVM vectorise the four reductions."""
    ur = ui = vr = vi = 0.0
    for j in range(m):
        ur += g[j] * tr[j]
        ui += g[j] * ti[j]
        vr += jg[j] * tr[j]
        vi += jg[j] * ti[j]
    return ur, ui, vr, vi


def _s4d_kernel_bwd_loop(A, C, dt, G, gA, gC, gdt):
    """A, C: (d, n, 2); dt: (d,); G: (d, L) = ∂loss/∂K. Writes gA, gC (d, n, 2) and gdt (d,).
    Per channel: S = Σ_l G_l·z^l and T = Σ_l l·G_l·z^l by blocks (z^{l0}·Σ_j G·z^j, with
    l = l0 + j in T), in float64 across blocks; then ``_mode_grads``."""
    d, n = A.shape[0], A.shape[1]
    L = G.shape[1]
    R = min(BLOCK, L)
    for c in prange(d):
        Tr = np.empty((n, R), G.dtype)  # Re z^j, Im z^j in the input precision
        Ti = np.empty((n, R), G.dtype)
        xr = np.empty(n)  # Re Δ·A, Im Δ·A: float64
        xi = np.empty(n)
        vr = np.empty(n)  # the carried anchor z^{l0}, float64
        vi = np.empty(n)
        Zr = np.empty(n)  # z^R, float64
        Zi = np.empty(n)
        S = np.zeros((n, 4))  # Re S, Im S, Re T, Im T
        jg = np.empty(R, G.dtype)  # j·G[l0 + j]
        step = np.float64(dt[c])
        for k in range(n):
            xr[k], xi[k] = step * np.float64(A[c, k, 0]), step * np.float64(A[c, k, 1])
            e = math.exp(xr[k])
            zr, zi = e * math.cos(xi[k]), e * math.sin(xi[k])
            pr, pi = 1.0, 0.0
            for j in range(R):
                Tr[k, j] = pr
                Ti[k, j] = pi
                pr, pi = pr * zr - pi * zi, pr * zi + pi * zr
            Zr[k], Zi[k] = pr, pi
        for b in range(0, (L + R - 1) // R):
            l0 = b * R
            m = min(R, L - l0)
            g = G[c, l0:l0 + m]
            for j in range(m):
                jg[j] = j * g[j]
            for k in range(n):
                if b % REANCHOR == 0:  # exact: exp(Δ·A·l0)
                    e = math.exp(xr[k] * l0)
                    vr[k], vi[k] = e * math.cos(xi[k] * l0), e * math.sin(xi[k] * l0)
                ar, ai = vr[k], vi[k]
                vr[k], vi[k] = ar * Zr[k] - ai * Zi[k], ar * Zi[k] + ai * Zr[k]
                ur, ui, qr, qi = _block_sums(g, jg, Tr[k], Ti[k], m)
                qr += l0 * ur  # Σ_j (l0 + j)·G·z^j
                qi += l0 * ui
                S[k, 0] += ar * ur - ai * ui
                S[k, 1] += ar * ui + ai * ur
                S[k, 2] += ar * qr - ai * qi
                S[k, 3] += ar * qi + ai * qr
        total = 0.0
        for k in range(n):
            gAr, gAi, gCr, gCi, gd = _mode_grads_cpu(
                np.float64(A[c, k, 0]), np.float64(A[c, k, 1]), np.float64(C[c, k, 0]),
                np.float64(C[c, k, 1]), step, S[k, 0], S[k, 1], S[k, 2], S[k, 3])
            gA[c, k, 0], gA[c, k, 1], gC[c, k, 0], gC[c, k, 1] = gAr, gAi, gCr, gCi
            total += gd
        gdt[c] = total


_s4d_kernel_cpu_loop = njit(parallel=True, cache=True)(_s4d_kernel_loop)
_s4d_kernel_bwd_cpu_loop = njit(parallel=True, cache=True)(_s4d_kernel_bwd_loop)
_s4d_kernel_serial_loop = njit(cache=True)(_s4d_kernel_loop)  # prange runs as range
_s4d_kernel_bwd_serial_loop = njit(cache=True)(_s4d_kernel_bwd_loop)


def _fwd_cpu(A, C, dt, L):
    K = torch.empty(A.shape[0], L, dtype=dt.dtype)
    Ar, Cr = torch.view_as_real(A), torch.view_as_real(C)  # (d, n, 2)
    loop = _s4d_kernel_cpu_loop if A.numel() * L >= PARALLEL_MIN else _s4d_kernel_serial_loop
    loop(to_numba(Ar), to_numba(Cr), to_numba(dt), to_numba(K))
    return K


def _bwd_cpu(A, C, dt, G):
    gA, gC, gdt = torch.empty_like(A), torch.empty_like(C), torch.empty_like(dt)
    loop = (_s4d_kernel_bwd_cpu_loop if A.numel() * G.shape[1] >= PARALLEL_MIN
            else _s4d_kernel_bwd_serial_loop)
    loop(*(to_numba(torch.view_as_real(x)) for x in (A, C)), to_numba(dt), to_numba(G),
         *(to_numba(torch.view_as_real(x)) for x in (gA, gC)), to_numba(gdt))
    return gA, gC, gdt
