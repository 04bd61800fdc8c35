"""The causal convolution's references: the definition (a Toeplitz matrix, O(L²)) and the FFT
path (torch.fft, O(L log L)). The equations and the glossary: kernels/long_conv/__init__.py."""

from __future__ import annotations

import torch

# =============================================================================================
# Input checks (shared by both references and the public entries)
# =============================================================================================


def check_general(u, k, D=None) -> int:
    """Validate u (..., L), k (..., lk) with 1 <= lk <= L (or L = lk = 0), D (...) or None, all
    broadcastable over the batch axes; return L. Raises TypeError/ValueError naming the
    argument."""
    for name, x in (("u", u), ("k", k), ("D", D)):
        if x is None and name == "D":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (..., L), got "
                            f"{type(x).__name__}")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{name} must be a float or complex tensor, got "
                            f"{str(x.dtype).removeprefix('torch.')}")
        if name != "D" and x.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dimension (..., L), got a scalar")
        if x.device != u.device:
            raise ValueError(f"{name} must be on u's device {u.device}, got {x.device}")
    L, lk = u.shape[-1], k.shape[-1]
    if not (1 <= lk <= L or L == 0):
        raise ValueError(f"k must have 1 <= lk <= L = {L} taps in its last axis (the length "
                         f"of u), got shape {tuple(k.shape)}")
    try:
        torch.broadcast_shapes(u.shape[:-1], k.shape[:-1], *(() if D is None else (D.shape,)))
    except RuntimeError:
        raise ValueError(f"u (..., L) = {tuple(u.shape)}, k (..., lk) = {tuple(k.shape)}"
                         + ("" if D is None else f" and D = {tuple(D.shape)}")
                         + " must have broadcastable batch dimensions") from None
    return L


def _promoted(u, k, D):
    dtype = torch.promote_types(u.dtype, k.dtype)
    return dtype if D is None else torch.promote_types(dtype, D.dtype)


def _out_shape(u, k, D):
    extra = () if D is None else (D.shape,)
    return torch.broadcast_shapes(u.shape[:-1], k.shape[:-1], *extra) + (u.shape[-1],)


# =============================================================================================
# Reference: the direct sum, O(L²) (the definition; autograd differentiates it)
# =============================================================================================


def causal_conv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """y_t = Σ_{j=0}^{min(t, lk-1)} k_j·u_{t−j} + D·u_t by the materialised lower-triangular
    Toeplitz matrix T[t, s] = k_{t−s} (0 <= t − s < lk): y = T u + D u.

    u: (..., L); k: (..., lk), 1 <= lk <= L; D: (...) or None; batch axes broadcast.
    Returns y: (..., L) in the promoted dtype. O(L²) time and memory per batch entry."""
    L = check_general(u, k, D)
    dtype = _promoted(u, k, D)
    if L == 0:
        return torch.zeros(_out_shape(u, k, D), dtype=dtype, device=u.device)
    # [core] causal_conv_ref
    lk = k.shape[-1]
    t = torch.arange(L, device=u.device)
    lag = t[:, None] - t[None, :]  # (L, L): t − s
    inside = (lag >= 0) & (lag < lk)  # causal, and within the filter's taps
    T = torch.where(inside, k[..., lag.clamp(0, lk - 1)], 0).to(dtype)  # (..., L, L)
    y = (T @ u.to(dtype)[..., None])[..., 0]  # (..., L)
    if D is not None:
        y = y + D.to(dtype)[..., None] * u  # the skip term D·u_t
    # [/core]
    return y


# =============================================================================================
# FFT path: O(L log L) by torch.fft on the tensors' device
# =============================================================================================


def fft_length(L: int, lk: int) -> int:
    """The FFT length: the smallest power of two >= L + lk − 1, so the circular convolution
    of the zero-padded signals never wraps its tail onto the first L outputs."""
    n = max(L + lk - 1, 1)
    return 1 << (n - 1).bit_length()


def causal_fft_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The same y in O(L log L): zero-pad u and k to N = ``fft_length(L, lk)`` >= L + lk − 1,
    multiply the spectra, keep the first L outputs. D·u is added to the filter's spectrum
    (the spectrum of D·δ_0 is D at every frequency), so the skip costs no pass over u.

    Args:
        u: (..., L) float or complex, the input.
        k: (..., lk) float or complex, 1 <= lk <= L; batch axes broadcast with u's.
        D: (...) or None, the skip term.

    Returns:
        y: (..., L) in the promoted dtype (complex if an input is complex). Differentiable
        (torch.fft)."""
    L = check_general(u, k, D)
    dtype = _promoted(u, k, D)
    if u.numel() == 0 or k.numel() == 0:  # L = 0 or an empty batch: nothing to transform
        return torch.zeros(_out_shape(u, k, D), dtype=dtype, device=u.device)
    u, k = u.to(dtype), k.to(dtype)  # both FFTs in the output's precision
    N = fft_length(L, k.shape[-1])
    fft, ifft = (torch.fft.fft, torch.fft.ifft) if dtype.is_complex else (
        torch.fft.rfft, torch.fft.irfft)
    # [core] causal_fft_conv
    U = fft(u, n=N)  # (..., N/2 + 1) for real u: u zero-padded to N >= L + lk − 1
    Kf = fft(k, n=N)  # k zero-padded to N
    if D is not None:  # D·u = (D·δ_0) * u, and δ_0's spectrum is all ones
        Dc = D.to(dtype)[..., None]
        fits = torch.broadcast_shapes(Kf.shape, Dc.shape) == Kf.shape
        Kf = Kf.add_(Dc) if fits else Kf + Dc  # in place when it fits: no second spectrum
    return ifft(U * Kf, n=N)[..., :L]  # (..., L): the outputs past L are cut off
    # [/core]
