"""Monarch's reference (the definition, by einsum), its dense matrix and the DFT as a Monarch
product. The equations and the glossary: the package docstring (kernels/monarch/__init__.py)."""

from __future__ import annotations

import math

import torch

__all__ = ["monarch_dft", "monarch_matrix_ref", "monarch_ref"]


# =============================================================================================
# Reference (the definition; autograd differentiates it; real or complex)
# =============================================================================================


# [core] monarch_ref
def monarch_ref(x, w1, w2):
    """y = P2 · BD(w2) · P1 · BD(w1) · x by einsum and reshapes.

    x: (..., n) with n = k·p; w1: (k, q, p); w2: (l, s, r) with l·r = k·q -> y: (..., l·s)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    lead = x.shape[:-1]
    xb = x.reshape(*lead, k, p)  # (..., k, p): block kk holds x[kk·p : (kk+1)·p]
    z = torch.einsum("kqp,...kp->...kq", w1, xb)  # BD(w1) x: (..., k, q)
    z = z.reshape(*lead, r, l).transpose(-1, -2)  # P1: index i·l + j -> block j, row i: (..., l, r)
    y = torch.einsum("lsr,...lr->...sl", w2, z)  # BD(w2), then P2: (j, t) -> t·l + j: (..., s, l)
    return y.reshape(*lead, s * l)  # (..., l·s)
# [/core]


def monarch_matrix_ref(w1, w2):
    """The dense (l·s, n) matrix M of the Monarch product: M @ x == monarch_ref(x, w1, w2)."""
    n = w1.shape[0] * w1.shape[2]
    eye = torch.eye(n, dtype=w1.dtype, device=w1.device)  # row a = the basis vector e_a
    return monarch_ref(eye, w1, w2).transpose(0, 1)  # column a = M e_a: (l·s, n)


# =============================================================================================
# The DFT of length n = m² as a Monarch product (Cooley-Tukey, radix m)
# =============================================================================================


def monarch_dft(m: int, *, device=None):
    """Factors of the DFT of length n = m²: ``monarch_multiply(x[..., perm], w1, w2)`` equals
    ``torch.fft.fft(x)``.

    With ω = e^{-2πi/n}, ω_m = ω^m, an input index a = m·a1 + a2 and an output index
    c = c1 + m·c2 (all four < m): ω^{a·c} = ω_m^{a1·c1} · ω^{a2·c1} · ω_m^{a2·c2}, so
    X[c1 + m·c2] = Σ_{a2} ω_m^{a2·c2} · [ω^{a2·c1} Σ_{a1} ω_m^{a1·c1} x[m·a1 + a2]]:

    - perm gathers block a2 = (x[a2], x[m + a2], x[2m + a2], ...): perm[a2·m + a1] = m·a1 + a2;
    - w1[a2, c1, a1] = ω_m^{a1·c1} · ω^{a2·c1}: m DFTs of length m, times the twiddle factors;
    - P1 sends z[a2·m + c1] to block c1, row a2; w2[c1, c2, a2] = ω_m^{a2·c2}: m more DFTs;
    - P2 sends block c1's output c2 to c2·m + c1 = c1 + m·c2. ✓

    Returns (w1 (m, m, m) complex128, w2 (m, m, m) complex128, perm (m²,) int64)."""
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive int (the DFT has length n = m²), got {m!r}")
    n = m * m
    a = torch.arange(m, dtype=torch.float64)
    outer = a[:, None] * a[None, :]  # (m, m): a1·c1 (or a2·c2)
    dft_m = torch.polar(torch.ones(m, m, dtype=torch.float64), -2 * math.pi * outer / m)
    twiddle = torch.polar(torch.ones(m, m, dtype=torch.float64), -2 * math.pi * outer / n)
    w1 = twiddle[:, :, None] * dft_m[None, :, :]  # (a2, c1, a1): ω^{a2·c1} · ω_m^{c1·a1}
    w2 = dft_m[None].expand(m, m, m).clone()  # (c1, c2, a2): ω_m^{c2·a2}
    idx = torch.arange(n)
    perm = m * (idx % m) + idx // m  # perm[a2·m + a1] = m·a1 + a2
    return w1.to(device), w2.to(device), perm.to(device)
