"""The S4D convolution kernel: K[h, l] = 2·Re Σ_n C[h,n]·B̄[h,n]·Ā[h,n]^l (a Vandermonde product).

References: Gu, Gupta, Goel & Ré, "On the parameterization and initialization of diagonal state
space models" (S4D, 2022), section 3.1 (the kernel as a Vandermonde matrix-vector product,
computed in O(nL) without materialising it); Gu, Goel & Ré, "S4" (2022), eq. 4-5.

With Δ = dt and zero-order hold (B = 1, folded into C):

    z = Ā = exp(Δ·A),   B̄ = (exp(Δ·A) − 1) / A,   K[h, l] = 2·Re Σ_n C·B̄·z^l

(the factor 2 and the real part stand for the complex-conjugate half of the modes).

Why a kernel: the reference evaluates one complex exp per (h, n, l) and materialises that
(h, n, L) tensor. pip's Numba has no vector math library, so exp is a slow scalar call; the
kernels instead take powers by multiplication, z^l = z^{l−1}·z, which costs one complex multiply,
and re-anchor on an exactly computed power now and then so rounding cannot accumulate.

Glossary (code = paper): ``dt`` = Δ, ``z`` = Ā, ``w`` = 2·C·B̄ (the weight of mode n), ``K`` = K̄.
Shapes: ``h`` channels (heads), ``n`` complex modes, ``L`` length.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda, njit, prange

from minimodels.backend import cuda_simulated, dispatch, launch, to_numba

__all__ = ["s4d_kernel", "s4d_kernel_ref", "s4d_kernel_cpu", "s4d_kernel_cuda", "IMPLS"]

# =============================================================================================
# Constants
# =============================================================================================

# CPU: the sequence is cut into blocks of BLOCK steps. z^j for j < BLOCK is tabulated once per
# mode (by the power recurrence, in float64); the block's anchor z^{l0} is carried from block to
# block (z^{l0 + BLOCK} = z^{l0}·z^BLOCK) and recomputed exactly by exp every REANCHOR blocks.
# Inside a block K[l0 + j] += Re(w·z^{l0}·z^j): independent over j, so it vectorises.
BLOCK = 128
REANCHOR = 8  # exact exp every 8 blocks = 1024 steps; error measured in tests and chapter 04

# CUDA: a block of THREADS threads owns THREADS·ITEMS consecutive l of one channel h; thread i
# owns l = l0 + i + k·THREADS (k < ITEMS: coalesced writes). It anchors exactly at its first l
# and then multiplies by z^THREADS, ITEMS − 1 times. Modes are staged in shared memory N_TILE
# at a time. The simulator (CI) uses small sizes so its tests cross tiles and blocks.
THREADS = 8 if cuda_simulated() else 128
ITEMS = 4 if cuda_simulated() else 8
N_TILE = 4 if cuda_simulated() else 64


# =============================================================================================
# Reference (the definition; autograd differentiates it)
# =============================================================================================


def _zoh_B(dtA, A, dt):
    """B̄ = (exp(Δ·A) − 1) / A, with the limit Δ where A = 0. All (h, n)."""
    zero = A == 0
    safe = torch.where(zero, torch.ones_like(A), A)
    return torch.where(zero, dt.to(A.dtype).expand_as(A), torch.expm1(dtA) / safe)


def s4d_kernel_ref(A, C, dt, L):
    """K[h, l] = 2·Re Σ_n C[h,n]·(exp(dt[h]·A[h,n]) − 1)/A[h,n]·exp(dt[h]·A[h,n]·l).

    A, C: (h, n) complex; dt: (h,) real; L: int -> K: (h, L) real. Materialises (h, n, L)."""
    dtA = dt[:, None] * A  # (h, n)
    w = C * _zoh_B(dtA, A, dt[:, None])  # (h, n)
    l = torch.arange(L, device=A.device, dtype=dt.dtype)  # (L,)
    powers = torch.exp(dtA[..., None] * l)  # (h, n, L): one complex exp per element
    return 2 * torch.einsum("hn,hnl->hl", w, powers).real  # (h, L)


@njit(cache=True)
def _zoh_weight(Ar, Ai, Cr, Ci, step):
    """(Δ·A, w = 2·C·B̄) for one mode, in float64: exp(Δ·A) − 1 = expm1(x)·cos y − 2·sin²(y/2)
    + i·e^x·sin y (no cancellation for small Δ·A), then divided by A (B̄ = Δ where A = 0)."""
    xr, xi = step * Ar, step * Ai
    sh = math.sin(0.5 * xi)
    er = math.expm1(xr) * math.cos(xi) - 2.0 * sh * sh
    ei = math.exp(xr) * math.sin(xi)
    den = Ar * Ar + Ai * Ai
    if den == 0.0:
        qr, qi = step, 0.0
    else:
        qr, qi = (er * Ar + ei * Ai) / den, (ei * Ar - er * Ai) / den
    return xr, xi, 2.0 * (Cr * qr - Ci * qi), 2.0 * (Cr * qi + Ci * qr)


# =============================================================================================
# CPU kernel (Numba). One thread per channel h. Per mode: a table z^j (j < BLOCK) by the power
# recurrence; per block: the anchor w·z^{l0}; then K[l0 + j] += Re(anchor·z^j), a loop of two
# multiply-adds per element over contiguous memory that LLVM vectorises. Exps per (h, n):
# 2 + L/(BLOCK·REANCHOR) instead of L.
# =============================================================================================


def _s4d_kernel_loop(A, C, dt, K):
    """A, C: (h, n, 2) real and imaginary parts; dt: (h,); K: (h, L), written. The O(h·n)
    setup runs in float64 whatever the input precision; the O(h·n·L) loop in K's."""
    h, n = A.shape[0], A.shape[1]
    L = K.shape[1]
    R = min(BLOCK, L)
    for c in prange(h):
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
                float(A[c, k, 0]), float(A[c, k, 1]), float(C[c, k, 0]), float(C[c, k, 1]),
                float(dt[c]))
            e = math.exp(xr[k])
            zr, zi = e * math.cos(xi[k]), e * math.sin(xi[k])
            pr, pi = 1.0, 0.0
            for j in range(R):  # the power recurrence z^j = z^{j-1}·z
                Tr[k, j] = pr
                Ti[k, j] = pi
                pr, pi = pr * zr - pi * zi, pr * zi + pi * zr
            Zr[k], Zi[k] = pr, pi  # z^R
        row = K[c]
        row[:] = 0
        for b in range(0, (L + R - 1) // R):
            l0 = b * R
            m = min(R, L - l0)
            for k in range(n):
                if b % REANCHOR == 0:  # exact: w·exp(Δ·A·l0)
                    e = math.exp(xr[k] * l0)
                    cr, ci = e * math.cos(xi[k] * l0), e * math.sin(xi[k] * l0)
                    vr[k], vi[k] = wr[k] * cr - wi[k] * ci, wr[k] * ci + wi[k] * cr
                ar[k], ai[k] = vr[k], vi[k]
                vr[k], vi[k] = vr[k] * Zr[k] - vi[k] * Zi[k], vr[k] * Zi[k] + vi[k] * Zr[k]
            for k in range(n):
                pr, pi = ar[k], ai[k]
                for j in range(m):  # Re((pr + i·pi)(Tr + i·Ti)); vectorised over j
                    row[l0 + j] += pr * Tr[k, j] - pi * Ti[k, j]


_s4d_kernel_cpu_loop = njit(parallel=True, cache=True)(_s4d_kernel_loop)


def s4d_kernel_cpu(A, C, dt, L):
    """Numba CPU kernel. Same contract as ``s4d_kernel_ref`` (no backward)."""
    K = torch.empty(A.shape[0], L, dtype=dt.dtype)
    if A.shape[0] == 0 or A.shape[1] == 0:
        return K.zero_()
    Ar, Cr = torch.view_as_real(A.contiguous()), torch.view_as_real(C.contiguous())  # (h, n, 2)
    _s4d_kernel_cpu_loop(to_numba(Ar), to_numba(Cr), to_numba(dt.contiguous()), to_numba(K))
    return K


# =============================================================================================
# CUDA kernel (numba.cuda). Grid (L / (THREADS·ITEMS), h). Each tile of N_TILE modes is staged
# in shared memory (Δ·A, w, z^THREADS computed once per block by the first threads); then each
# thread evaluates one exact anchor w·z^{l} per mode and ITEMS − 1 multiplications, summing
# Re(·) into ITEMS registers: one complex exp per mode per ITEMS outputs, not per output.
# =============================================================================================


@functools.cache
def _s4d_cuda_kernel(dtype: np.dtype):
    """Compile-once (per dtype) kernel. Constants are typed so float32 math stays float32."""
    real = dtype.type
    zero, half, two, span = real(0), real(0.5), real(2), real(THREADS)

    @cuda.jit
    def kernel(A, C, dt, K):
        # A, C: (h, n, 2) real and imaginary parts; dt: (h,); K: (h, L).
        s_ar = cuda.shared.array(N_TILE, dtype)  # Re Δ·A
        s_ai = cuda.shared.array(N_TILE, dtype)  # Im Δ·A
        s_wr = cuda.shared.array(N_TILE, dtype)  # Re w = 2·C·B̄
        s_wi = cuda.shared.array(N_TILE, dtype)
        s_zr = cuda.shared.array(N_TILE, dtype)  # Re z^THREADS
        s_zi = cuda.shared.array(N_TILE, dtype)
        acc = cuda.local.array(ITEMS, dtype)
        n = A.shape[1]
        L = K.shape[1]
        c, i = cuda.blockIdx.y, cuda.threadIdx.x
        first = cuda.blockIdx.x * THREADS * ITEMS + i  # my l: first + k·THREADS
        lf = real(first)
        step = dt[c]
        for k in range(ITEMS):
            acc[k] = zero
        for n0 in range(0, n, N_TILE):
            m = min(N_TILE, n - n0)
            for k in range(i, m, THREADS):  # stage the tile: O(n) exps per block
                Ar, Ai = A[c, n0 + k, 0], A[c, n0 + k, 1]
                Cr, Ci = C[c, n0 + k, 0], C[c, n0 + k, 1]
                xr, xi = step * Ar, step * Ai
                sh = math.sin(half * xi)  # exp(x) − 1 without cancellation
                er = math.expm1(xr) * math.cos(xi) - two * sh * sh
                ei = math.exp(xr) * math.sin(xi)
                den = Ar * Ar + Ai * Ai
                if den == zero:  # A = 0: B̄ = Δ
                    qr, qi = step, zero
                else:
                    qr, qi = (er * Ar + ei * Ai) / den, (ei * Ar - er * Ai) / den
                s_wr[k] = two * (Cr * qr - Ci * qi)
                s_wi[k] = two * (Cr * qi + Ci * qr)
                e = math.exp(xr * span)
                s_zr[k] = e * math.cos(xi * span)
                s_zi[k] = e * math.sin(xi * span)
                s_ar[k] = xr
                s_ai[k] = xi
            cuda.syncthreads()
            for k in range(m):
                e = math.exp(s_ar[k] * lf)  # the exact anchor w·z^first
                cr, ci = e * math.cos(s_ai[k] * lf), e * math.sin(s_ai[k] * lf)
                pr = s_wr[k] * cr - s_wi[k] * ci
                pi = s_wr[k] * ci + s_wi[k] * cr
                zr, zi = s_zr[k], s_zi[k]
                for j in range(ITEMS):  # z^{l + THREADS} = z^l · z^THREADS
                    acc[j] += pr
                    pr, pi = pr * zr - pi * zi, pr * zi + pi * zr
            cuda.syncthreads()  # all have read the tile before the next one is staged
        for j in range(ITEMS):
            l = first + j * THREADS
            if l < L:
                K[c, l] = acc[j]

    return kernel


def s4d_kernel_cuda(A, C, dt, L):
    """numba.cuda kernel (or the CUDA simulator). Same contract as ``s4d_kernel_ref``."""
    h = A.shape[0]
    K = torch.empty(h, L, dtype=dt.dtype, device=dt.device)
    if h == 0:
        return K
    if A.shape[1] == 0:
        return K.zero_()
    kernel = _s4d_cuda_kernel(np.dtype(str(dt.dtype).removeprefix("torch.")))
    Ar, Cr = torch.view_as_real(A.contiguous()), torch.view_as_real(C.contiguous())  # (h, n, 2)
    grid = ((L + THREADS * ITEMS - 1) // (THREADS * ITEMS), h)
    launch(kernel, grid, THREADS, Ar, Cr, dt.contiguous(), K)
    return K


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": s4d_kernel_ref, "cpu": s4d_kernel_cpu, "cuda": s4d_kernel_cuda}

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def s4d_kernel(A, C, dt, L, *, backend=None):
    """The S4D convolution kernel K[h, l] = 2·Re Σ_n C·(exp(Δ·A) − 1)/A·exp(Δ·A·l).

    Args:
        A: (h, n) complex64 or complex128, the continuous-time diagonal state matrix.
        C: (h, n) same dtype, the output matrix already multiplied by B.
        dt: (h,) float32 for complex64 (float64 for complex128), the step Δ of each channel.
        L: int >= 1, the kernel length.
        backend: "ref", "cpu", "cuda", a callable with this signature, or None.

    Returns:
        K: (h, L) float32 for complex64 input, float64 for complex128. Only ``ref`` is
        differentiable; the kernels are for inference and benchmarks.
    """
    if not isinstance(A, torch.Tensor) or A.dtype not in _REAL:
        raise TypeError(f"A must be a complex64 or complex128 tensor of shape (h, n), got "
                        f"{getattr(A, 'dtype', type(A).__name__)}")
    if A.dim() != 2:
        raise ValueError(f"A must have 2 dimensions (h, n), got shape {tuple(A.shape)}")
    if not isinstance(C, torch.Tensor) or C.dtype != A.dtype:
        raise TypeError(f"C must be a {str(A.dtype)[6:]} tensor like A, got "
                        f"{getattr(C, 'dtype', type(C).__name__)}")
    if C.shape != A.shape:
        raise ValueError(f"C must have shape (h, n) = {tuple(A.shape)}, got {tuple(C.shape)}")
    real = _REAL[A.dtype]
    if not isinstance(dt, torch.Tensor) or dt.dtype != real:
        raise TypeError(f"dt must be a {str(real)[6:]} tensor of shape (h,) for "
                        f"{str(A.dtype)[6:]} A, got {getattr(dt, 'dtype', type(dt).__name__)}")
    if dt.shape != A.shape[:1]:
        raise ValueError(f"dt must have shape (h,) = ({A.shape[0]},), got {tuple(dt.shape)}")
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be an int >= 1, got {L!r}")
    return dispatch(IMPLS, A, C, dt, L, backend=backend)
