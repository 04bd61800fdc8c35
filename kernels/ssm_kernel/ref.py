"""The S4D kernel's reference (the definition; autograd differentiates it) and φ1. The
equations and the glossary: the package docstring (kernels/ssm_kernel/__init__.py)."""

from __future__ import annotations

import torch

__all__ = ["SERIES", "s4d_kernel_ref"]

# =============================================================================================
# Constants
# =============================================================================================

# φ1(x) = (e^x − 1)/x by its series 1 + x/2 + x²/6 + x³/24 where |x| < SERIES (truncation
# |x|⁴/120: below the precision's epsilon); above it the quotient, whose |x|² cannot underflow.
SERIES = {torch.complex64: 1e-2, torch.complex128: 1e-4}


# =============================================================================================
# Reference (the definition; autograd differentiates it)
# =============================================================================================


def _phi1(x):
    """φ1(x) = (e^x − 1)/x elementwise, 1 at x = 0; the series 1 + x/2 + x²/6 + x³/24 where
    |x| is small (no 0/0, no subnormal |x|², and finite gradients there)."""
    small = x.abs() < SERIES[x.dtype]
    safe = torch.where(small, torch.ones_like(x), x)
    series = 1 + x / 2 * (1 + x / 3 * (1 + x / 4))
    return torch.where(small, series, torch.expm1(safe) / safe)


def s4d_kernel_ref(A, C, dt, L):
    """K[d, l] = 2·Re Σ_n C[d,n]·(exp(dt[d]·A[d,n]) − 1)/A[d,n]·exp(dt[d]·A[d,n]·l).

    A, C: (d, n) complex; dt: (d,) real; L: int -> K: (d, L) real. Materialises (d, n, L).
    B̄ = (exp(Δ·A) − 1)/A is written Δ·φ1(Δ·A), which has the limit Δ at A = 0."""
    dtA = dt[:, None] * A  # (d, n)
    w = 2 * C * dt[:, None] * _phi1(dtA)  # (d, n): 2·C·B̄
    l = torch.arange(L, device=A.device, dtype=dt.dtype)  # (L,)
    # w·e^{Δ·A·l} as (w·h)·h with h = e^{Δ·A·l/2}: a growing kernel (Re(Δ·A) > 0) with |w| < 1
    # is finite up to where the product overflows, while e^{Δ·A·l} alone overflows sooner
    half = torch.exp(dtA[..., None] * (l / 2))  # (d, n, L): one complex exp per element
    return torch.einsum("dnl,dnl->dl", w[..., None] * half, half).real  # (d, L)
