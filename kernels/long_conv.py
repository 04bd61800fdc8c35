"""Causal long convolution y = K * u, the convolution mode of SSMs (S4, S4D) and of Hyena.

References: Gu, Goel & Ré, "Efficiently modeling long sequences with structured state spaces"
(S4, 2022), section 3.3 (y = K * u by FFT in O(L log L)); Poli et al., "Hyena hierarchy"
(2023), section 3.3 (long implicit filters evaluated by FFT convolution).

    y_k = Σ_{j ≤ k} K_j·u_{k−j},   k = 0..L−1

The direct sum costs O(L²). The FFT computes a circular convolution of length N in O(N log N);
zero-padding both signals to N = 2L makes it equal the linear one on the first L outputs (the
tail that would wrap around lands in the padding), so y = ifft(fft(u, 2L)·fft(K, 2L))[:L].

Backends (``long_conv(u, K, backend=...)``): ``ref`` is the direct O(L²) sum (the definition,
differentiable, exact to rounding); ``cpu`` and ``cuda`` are the FFT path, which is torch's own
(pocketfft on the CPU, cuFFT on the GPU): no loop written here beats it at long L. A later
chapter (Hyena) adds direct kernels for short filters under the same names.

Glossary: ``u`` the input sequence, ``K`` the convolution kernel (filter), ``y`` the output.
Shapes: ``...`` any batch dimensions (broadcast between u and K), ``l``/``L`` length.
"""

from __future__ import annotations

import torch

from minimodels.backend import dispatch

__all__ = ["IMPLS", "causal_conv_ref", "causal_fft_conv", "long_conv"]

# =============================================================================================
# Constants: none (the FFT length is 2L, the smallest padding that cannot wrap)
# =============================================================================================


# =============================================================================================
# Input checks
# =============================================================================================


def _check(u, K) -> int:
    """Validate (u, K) and return L. Raises TypeError/ValueError naming the argument."""
    for name, x in (("u", u), ("K", K)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (..., L), got "
                            f"{type(x).__name__}")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{name} must be a float or complex tensor, got "
                            f"{str(x.dtype).removeprefix('torch.')}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dimension (..., L), got a scalar")
    L = u.shape[-1]
    if K.shape[-1] != L:
        raise ValueError(f"K must have length L = {L} in its last axis like u, got shape "
                         f"{tuple(K.shape)}")
    try:
        torch.broadcast_shapes(u.shape[:-1], K.shape[:-1])
    except RuntimeError:
        raise ValueError(f"u (..., L) = {tuple(u.shape)} and K (..., L) = {tuple(K.shape)} "
                         "must have broadcastable batch dimensions") from None
    if u.device != K.device:
        raise ValueError(f"u and K must be on one device, got {u.device} and {K.device}")
    return L


def _out_shape(u, K):
    return torch.broadcast_shapes(u.shape[:-1], K.shape[:-1]) + (u.shape[-1],)


# =============================================================================================
# Reference: the direct sum, O(L²) (the definition; autograd differentiates it)
# =============================================================================================


def causal_conv_ref(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y_k = Σ_{j ≤ k} K_j·u_{k−j} by the materialised lower-triangular Toeplitz matrix
    T[k, i] = K_{k−i} (k ≥ i): y = T u. u: (..., L), K: (..., L) broadcastable -> y: (..., L)
    in the promoted dtype. O(L²) time and memory per batch entry."""
    L = _check(u, K)
    dtype = torch.promote_types(u.dtype, K.dtype)
    if L == 0:
        return torch.zeros(_out_shape(u, K), dtype=dtype, device=u.device)
    k = torch.arange(L, device=u.device)
    lag = k[:, None] - k[None, :]  # (L, L): k − i
    T = torch.where(lag >= 0, K[..., lag.clamp(min=0)], 0).to(dtype)  # (..., L, L)
    return (T @ u.to(dtype)[..., None])[..., 0]  # (..., L)


# =============================================================================================
# FFT path: O(L log L)
# =============================================================================================


def causal_fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y_k = Σ_{j ≤ k} K_j·u_{k−j} in O(L log L): zero-pad both to 2L, so the FFT's circular
    convolution never wraps the tail onto the start.

    Args:
        u: (..., L) float or complex, the input.
        K: (..., L) float or complex, the kernel; batch dimensions broadcast with u's.

    Returns:
        y: (..., L) in the promoted dtype (complex if either input is complex).
        Differentiable (torch.fft)."""
    L = _check(u, K)
    dtype = torch.promote_types(u.dtype, K.dtype)
    if L == 0:
        return torch.zeros(_out_shape(u, K), dtype=dtype, device=u.device)
    u, K = u.to(dtype), K.to(dtype)  # both FFTs in the output's precision
    if dtype.is_complex:
        return torch.fft.ifft(torch.fft.fft(u, n=2 * L) * torch.fft.fft(K, n=2 * L))[..., :L]
    return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[
        ..., :L
    ]  # (..., L)


# =============================================================================================
# Dispatch
# =============================================================================================

IMPLS = {"ref": causal_conv_ref, "cpu": causal_fft_conv, "cuda": causal_fft_conv}


def long_conv(u: torch.Tensor, K: torch.Tensor, *, backend=None) -> torch.Tensor:
    """Causal convolution y_k = Σ_{j ≤ k} K_j·u_{k−j}.

    Args:
        u: (..., L) float or complex.
        K: (..., L) float or complex, batch dimensions broadcastable with u's.
        backend: "ref" (the direct O(L²) sum), "cpu" / "cuda" (the FFT path on that device),
            a callable with this signature, or None to choose from the tensors' device.

    Returns:
        y: (..., L) in the promoted dtype; differentiable on every backend."""
    _check(u, K)
    return dispatch(IMPLS, u, K, backend=backend)


# =============================================================================================
# Autograd: every backend is written in differentiable torch operations; nothing to add
# =============================================================================================
