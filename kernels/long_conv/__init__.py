"""Causal long convolution y = k * u + D·u: the convolution mode of SSMs (S4, S4D) and Hyena's
long filters, by FFT for long filters and by a direct loop for short ones.

References: Gu, Goel & Ré, "Efficiently modeling long sequences with structured state spaces"
(S4, 2022), section 3.3 (y = K * u by FFT in O(L log L)); Poli et al., "Hyena hierarchy:
towards larger convolutional language models" (ICML 2023), section 3 (long implicit filters
evaluated by FFT convolution in O(L log L), with the bias D); Fu et al., "Simple
hardware-efficient long convolutions for sequence modeling" (2023), section 3 (direct versus FFT
convolution).

    y_t = Σ_{j=0}^{min(t, lk−1)} k_j·u_{t−j} + D·u_t,   t = 0..L−1

The direct sum costs O(L·lk) per row: cheap for short filters. The FFT computes a circular
convolution of length N in O(N log N); zero-padding both signals to N >= L + lk − 1 makes it
equal the linear one on the first L outputs (the tail that would wrap around lands in the
padding). Without the padding the last outputs' tails wrap onto the first ones: a circular,
not causal, convolution.

``causal_conv(u, k, D=, method=, backend=)`` is the op: u (b, h, l), k (h, lk), D (h,),
float32/float64. ``method="fft"`` is, on the ``cuda`` backend, the fused FFT kernel
(``causal_conv_fft_cuda``: one block per row, the row's spectrum in shared memory, u read and y
written once) for rows whose FFT length N fits it (``FFT_MAX_N``: 8192 in float32, 4096 in
float64) and ``causal_fft_conv`` (torch.fft: cuFFT) for longer rows; on the ``cpu`` backend
``causal_fft_conv`` (pocketfft). ``method="direct"`` is the loop of the chosen ``backend``
(``ref`` the Toeplitz-matrix definition, ``cpu`` Numba, ``cuda`` numba.cuda); ``"auto"`` picks
the direct loop for filters of at most ``DIRECT_MAX_TAPS[backend]`` taps (the crossover the
benchmark measured on each backend) and the FFT above. ``long_conv(u, K, backend=)`` is the
full-length convolution S4D and M2 use (any batch axes, complex allowed; ``ref`` the direct
sum, ``cpu``/``cuda`` the FFT path).

Backward, with g = ∂L/∂y:
    ∂L/∂u_s = Σ_j k_j g_{s+j} + D g_s   (the same convolution run backwards in time; by FFT, the
                                         product with the conjugate spectrum conj(K_f) + D),
    ∂L/∂k_j = Σ_b Σ_t g_t u_{t−j},       ∂L/∂D = Σ_b Σ_t g_t u_t.

Glossary: ``u`` the input sequence, ``k`` the filter (the paper's h, S4's K), ``D`` the skip
(Hyena's bias), ``lk`` the filter's taps. Shapes: ``b`` batch, ``h`` channels (heads), ``l``/``L``
length. Layout: ``ref.py`` the definition and the FFT path; ``cpu.py`` the Numba loops;
``cuda.py`` the numba.cuda kernels; this file: the autograd Function, the public entries and
``example_inputs``.
"""

from __future__ import annotations

import torch

from minimodels.backend import dispatch, expect_tensor, resolve
from minimodels.kernels._common import Example, numpy_dtype, randn
from minimodels.kernels.long_conv.cpu import _filter_grad_cpu_wrap, _fwd_cpu
from minimodels.kernels.long_conv.cuda import (
    FFT_MAX_N,
    FFT_MIN_N,
    _fft_conv_cuda,
    _filter_grad_cuda,
    _fwd_cuda,
)
from minimodels.kernels.long_conv.ref import (
    causal_conv_ref,
    causal_fft_conv,
    check_general,
    fft_length,
)

__all__ = ["DIRECT_MAX_TAPS", "FFT_MAX_N", "IMPLS", "causal_conv", "causal_conv_cpu",
           "causal_conv_cuda", "causal_conv_fft_cuda", "causal_conv_ref", "causal_fft_conv",
           "example_inputs", "fft_length", "fused_fft_length", "long_conv"]

# =============================================================================================
# Constants
# =============================================================================================

# method="auto": the direct loop up to this many taps on each backend, the FFT above. Measured
# crossovers, float32 (`python -m minimodels.bench long_conv [--device cuda]`): on the 2-core CPU
# between 256 and 1024 taps at (8, 768, 4096) with 2 threads, ~190 taps at (1, 64, 4096) on one
# thread (chapter 07), and 128 stays below both; on the H200 (2026-12-05) at (8, 768, 4096) the
# direct loop took 0.83x the fused FFT's time at 4 taps and 1.28x at 16
DIRECT_MAX_TAPS = {"cpu": 128, "cuda": 4}
EXAMPLE_SHAPE = (8, 768, 4096, 64)  # (b, h, l, lk): the benchmark's direct-path size
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-10)}  # (rtol, atol)
METHODS = ("auto", "fft", "direct")


# =============================================================================================
# Autograd: the forward and ∂L/∂u are the backend's direct loop, ∂L/∂k its correlation kernel
# =============================================================================================


class _DirectConv(torch.autograd.Function):
    """Wraps a (forward, filter-gradient) kernel pair on contiguous u (b, h, l), k (h, lk),
    D (h,)."""

    @staticmethod
    def forward(ctx, u, k, D, kernels):
        fwd, filter_grad = kernels
        ctx.save_for_backward(u, k, D)
        ctx.kernels = kernels
        return fwd(u, k, D)

    @staticmethod
    def backward(ctx, g):
        u, k, D = ctx.saved_tensors
        fwd, filter_grad = ctx.kernels
        g = g.contiguous()
        gu = gk = gD = None
        if ctx.needs_input_grad[0]:  # the same convolution backwards in time
            gu = fwd(g.flip(-1).contiguous(), k, D).flip(-1)
        if ctx.needs_input_grad[1]:
            gk = filter_grad(u, g, k.shape[-1])
        if ctx.needs_input_grad[2]:
            gD = (g * u).sum((0, 2))
        return gu, gk, gD, None


def _direct(u, k, D, kernels):
    D = torch.zeros_like(k[:, 0]) if D is None else D
    return _DirectConv.apply(u.contiguous(), k.contiguous(), D.contiguous(), kernels)


def causal_conv_cpu(u, k, D=None):
    """Numba CPU direct loop, parallel over rows (b, h). Contract of ``causal_conv``."""
    return _direct(u, k, D, (_fwd_cpu, _filter_grad_cpu_wrap))


def causal_conv_cuda(u, k, D=None):
    """numba.cuda direct loop, one thread per output. Contract of ``causal_conv``."""
    return _direct(u, k, D, (_fwd_cuda, _filter_grad_cuda))


# =============================================================================================
# Autograd of the fused FFT kernel: the forward, and ∂L/∂u (the same kernel with the conjugate
# spectrum: a correlation); ∂L/∂k by torch.fft, ∂L/∂D by a sum
# =============================================================================================


def fused_fft_length(l: int, lk: int) -> int:
    """The fused kernel's FFT length N: ``fft_length(l, lk)`` (the smallest power of two >=
    l + lk − 1), at least ``FFT_MIN_N`` = 4 (the real FFT is one complex FFT of N/2 >= 2)."""
    return max(fft_length(l, lk), FFT_MIN_N)


def _filter_spectrum(k, D, N):
    """K_f = (rfft(k, N) + D) / 2N: (h, N/2 + 1) complex, contiguous. The skip D·u is D·δ_0 * u,
    and δ_0's spectrum is all ones; 1/2N is the inverse transform's 1/N and the real-FFT
    split's 1/2 (``cuda.py``), exact in binary."""
    Kf = torch.fft.rfft(k, n=N)  # (h, N/2 + 1)
    if D is not None:
        Kf += D[:, None]
    return (Kf / (2 * N)).contiguous()


class _FusedFFTConv(torch.autograd.Function):
    """The fused FFT kernel on contiguous u (b, h, l), k (h, lk), D (h,) or None."""

    @staticmethod
    def forward(ctx, u, k, D):
        N = fused_fft_length(u.shape[-1], k.shape[-1])
        Kf = _filter_spectrum(k, D, N)  # (h, N/2 + 1)
        ctx.save_for_backward(u, Kf)
        ctx.N, ctx.lk, ctx.has_D = N, k.shape[-1], D is not None
        return _fft_conv_cuda(u, Kf)

    @staticmethod
    def backward(ctx, g):
        u, Kf = ctx.saved_tensors
        g = g.contiguous()
        gu = gk = gD = None
        if ctx.needs_input_grad[0]:  # Σ_j k_j g_{s+j} + D g_s: the spectrum conjugated
            gu = _fft_conv_cuda(g, Kf.conj_physical())
        if ctx.needs_input_grad[1] and not u.numel():  # no batch: no gradient (and no FFT)
            gk = u.new_zeros(u.shape[1], ctx.lk)
        elif ctx.needs_input_grad[1]:  # Σ_b Σ_t g_t u_{t−j}, j < lk: no wrap-around at N
            G, Uf = torch.fft.rfft(g, n=ctx.N), torch.fft.rfft(u, n=ctx.N)  # (b, h, N/2 + 1)
            gk = torch.fft.irfft((G * Uf.conj()).sum(0), n=ctx.N)[:, :ctx.lk]  # (h, lk)
        if ctx.needs_input_grad[2] and ctx.has_D:
            gD = (g * u).sum((0, 2))
        return gu, gk, gD


def causal_conv_fft_cuda(u, k, D=None):
    """The fused FFT convolution (numba.cuda, ``cuda.py``): one block per row (b, h) holds the
    row's spectrum in shared memory, so u is read and y written once. Contract of
    ``causal_conv``, plus a limit: the FFT length N = ``fused_fft_length(l, lk)`` must be at
    most ``FFT_MAX_N`` (8192 in float32, 4096 in float64), else ValueError. Differentiable in
    u (the same kernel), k (torch.fft) and D."""
    _check(u, k, D, "fft")
    N = fused_fft_length(u.shape[-1], k.shape[-1])
    limit = FFT_MAX_N[numpy_dtype(u.dtype)]
    if N > limit:
        raise ValueError(f"causal_conv_fft_cuda holds the FFT of a row in shared memory: N = "
                         f"{N} (the power of two >= l + lk − 1 = {u.shape[-1]} + "
                         f"{k.shape[-1]} − 1) exceeds {limit} in {str(u.dtype)[6:]}; use "
                         "causal_fft_conv (torch.fft) for longer rows")
    D = None if D is None else D.contiguous()
    return _FusedFFTConv.apply(u.contiguous(), k.contiguous(), D)


# =============================================================================================
# Public entries
# =============================================================================================

IMPLS = {"ref": causal_conv_ref, "cpu": causal_conv_cpu, "cuda": causal_conv_cuda}
_LONG_IMPLS = {"ref": causal_conv_ref, "cpu": causal_fft_conv, "cuda": causal_fft_conv}


def _check(u, k, D, method):
    expect_tensor("u", u, "b, h, l")
    expect_tensor("k", k, "h, lk", dtypes=(u.dtype,))
    b, h, l = u.shape
    if k.shape[0] != h:
        raise ValueError(f"k must have shape (h, lk) with h = {h} channels like u (b, h, l) = "
                         f"{tuple(u.shape)}, got {tuple(k.shape)}")
    if not (1 <= k.shape[1] <= max(l, 1)):
        raise ValueError(f"k must have 1 <= lk <= l = {l} taps, got shape {tuple(k.shape)}")
    if D is not None:
        expect_tensor("D", D, "h", dtypes=(u.dtype,), shape=(h,))
    for name, t in (("k", k), ("D", D)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} must be on u's device {u.device}, got {t.device}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")


def causal_conv(u: torch.Tensor, k: torch.Tensor, *, D: torch.Tensor | None = None,
                method: str = "auto", backend=None) -> torch.Tensor:
    """y_t = Σ_{j=0}^{min(t, lk−1)} k_j·u_{t−j} + D·u_t, per batch entry and channel.

    Args:
        u: (b, h, l) float32 or float64, the input.
        k: (h, lk) with 1 <= lk <= l, u's dtype: one causal filter per channel.
        D: (h,) or None, the skip term.
        method: "fft" (O(l log l)), "direct" (the O(l·lk) loop of ``backend``) or "auto"
            (direct up to ``DIRECT_MAX_TAPS[backend]`` taps, fft above). The FFT is, on the "cuda"
            backend, the fused kernel ``causal_conv_fft_cuda`` when the FFT length
            ``fused_fft_length(l, lk)`` is at most ``FFT_MAX_N[dtype]`` (8192 in float32, 4096
            in float64: l + lk <= 8193 or 4097) and torch.fft (cuFFT) for longer rows; on the
            "cpu" backend torch.fft (pocketfft).
        backend: "ref", "cpu", "cuda", a callable with this signature, or None to choose from
            the tensors' device. "ref" (the Toeplitz definition) and a callable are used
            whatever the method.

    Returns:
        y: (b, h, l), u's dtype. Differentiable in u, k and D on every path."""
    _check(u, k, D, method)
    choice = resolve(backend, u, k, D)
    if method == "auto":  # ("ref" and a callable run their one path whatever the method)
        method = "direct" if k.shape[1] <= DIRECT_MAX_TAPS.get(choice, 0) else "fft"
    if method == "fft" and not callable(choice) and choice != "ref":
        fused = choice == "cuda" and (fused_fft_length(u.shape[-1], k.shape[1])
                                      <= FFT_MAX_N[numpy_dtype(u.dtype)])
        return causal_conv_fft_cuda(u, k, D) if fused else causal_fft_conv(u, k, D)
    return dispatch(IMPLS, u, k, D, backend=choice)


def long_conv(u: torch.Tensor, K: torch.Tensor, *, backend=None) -> torch.Tensor:
    """Full-length causal convolution y_t = Σ_{j<=t} K_j·u_{t−j} (S4D's and M2's).

    Args:
        u: (..., L) float or complex.
        K: (..., L) float or complex, batch dimensions broadcastable with u's.
        backend: "ref" (the direct O(L²) sum), "cpu" / "cuda" (the FFT path on that device),
            a callable with this signature, or None to choose from the tensors' device.

    Returns:
        y: (..., L) in the promoted dtype; differentiable on every backend."""
    L = check_general(u, K)
    if K.shape[-1] != L:
        raise ValueError(f"K must have length L = {L} in its last axis like u, got shape "
                         f"{tuple(K.shape)}")
    return dispatch(_LONG_IMPLS, u, K, backend=backend)


def example_inputs(shape=None, *, dtype=torch.float32, device="cpu", seed=0,
                   skip: bool = True) -> Example:
    """The canonical inputs of ``causal_conv``: ``Example(args=(u, k), kwargs={"D": D})``.

    shape: (b, h, l, lk), default (8, 768, 4096, 64) (the benchmark's direct-path size).
    u ~ N(0, 1) (b, h, l); k ~ N(0, 1/lk) · e^{−3j/lk} (h, lk): a decaying filter that keeps
    u's scale; D ~ N(0, 1) (h,), or no D with ``skip=False``. Drawn in float64 on the CPU from
    ``seed``, then cast to ``dtype`` and moved to ``device``. rtol 1e-4, atol 1e-5 in float32
    (against a float64 truth), 1e-10 in float64."""
    b, h, l, lk = EXAMPLE_SHAPE if shape is None else shape
    if not (1 <= lk <= max(l, 1)):
        raise ValueError(f"example shape (b, h, l, lk) = {shape}: need 1 <= lk <= l")
    g = torch.Generator().manual_seed(seed)
    u = randn(g, b, h, l)  # (b, h, l)
    decay = torch.exp(-3 * torch.arange(lk, dtype=torch.float64) / lk)
    k = randn(g, h, lk) / lk ** 0.5 * decay  # (h, lk)
    D = randn(g, h)  # (h,)
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float64])
    move = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return Example(args=(move(u), move(k)), kwargs={"D": move(D)} if skip else {},
                   rtol=rtol, atol=atol,
                   sizes={"batch": b, "channels": h, "seqlen": l, "taps": lk})
