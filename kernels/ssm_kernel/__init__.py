"""The S4D convolution kernel: K[d, l] = 2·Re Σ_n C[d,n]·B̄[d,n]·Ā[d,n]^l (a Vandermonde product).

References: Gu, Gupta, Goel & Ré, "On the parameterization and initialization of diagonal state
space models" (S4D, 2022), section 3.1 (the kernel as a Vandermonde matrix-vector product,
computed in O(nL) without materialising it); Gu, Goel & Ré, "S4" (2022), eq. 4-5.

With Δ = dt and zero-order hold (B = 1, folded into C), per channel d and mode n:

    x = Δ·A,   z = Ā = exp(x),   B̄ = (exp(x) − 1) / A = Δ·φ1(x),   φ1(x) = (e^x − 1) / x,
    K[d, l] = 2·Re Σ_n C·B̄·z^l = Re Σ_n w·z^l,   w = 2·C·B̄

(the factor 2 and the real part stand for the complex-conjugate half of the modes). B̄ is
computed as Δ·φ1(Δ·A), with a series where |Δ·A| is small: the quotient by A loses its digits
when |A|² is subnormal, and the limit A → 0 is B̄ = Δ.

Backward (every backend; ``ref`` by autograd). With G = ∂loss/∂K (d, L) real and, per (d, n),

    S = Σ_l G_l·z^l,   T = Σ_l l·G_l·z^l     (the adjoint Vandermonde products: one pass over l)

the gradients in PyTorch's convention for complex inputs (the conjugate of Σ_l G_l ∂F_l/∂p for
the holomorphic F_l = w·z^l, so that a step along −grad lowers the loss) are

    ∂C = conj(2·B̄·S),   ∂A = conj(2·C·Δ²·φ1'(x)·S + w·Δ·T),   ∂Δ = Σ_n Re(2·C·z·S + w·A·T)

from ∂w/∂C = 2·B̄, ∂B̄/∂A = Δ²·φ1'(x), ∂B̄/∂Δ = z, ∂z^l/∂A = l·Δ·z^l, ∂z^l/∂Δ = l·A·z^l.

Why a kernel: the reference evaluates one complex exp per (d, n, l) and materialises that
(d, n, L) tensor. pip's Numba has no vector math library, so exp is a slow scalar call; the
kernels instead take powers by multiplication, z^l = z^{l−1}·z, which costs one complex multiply,
and re-anchor on an exactly computed power now and then so rounding cannot accumulate.

Glossary (code = paper): ``dt`` = Δ, ``z`` = Ā, ``w`` = 2·C·B̄ (the weight of mode n), ``K`` = K̄,
``G`` = ∂loss/∂K, ``S``, ``T`` the adjoint sums above.
Shapes: ``d`` channels (the model width; one SSM per channel), ``n`` complex modes, ``l``
position, ``L`` length.

Layout: ``ref.py`` the reference (the definition) and φ1; ``cpu.py`` the Numba loops and
their host wrappers; ``cuda.py`` the numba.cuda kernels and their launchers; this file: the
autograd Function, the public entry and ``example_inputs``.
"""

from __future__ import annotations

import math

import torch

from minimodels.backend import dispatch
from minimodels.kernels._common import Example
from minimodels.kernels.ssm_kernel.cpu import BLOCK, PARALLEL_MIN, REANCHOR, _bwd_cpu, _fwd_cpu
from minimodels.kernels.ssm_kernel.cuda import (
    ANCHOR,
    BWD_THREADS,
    CHUNK,
    ITEMS,
    MODES,
    N_TILE,
    THREADS,
    _bwd_cuda,
    _fwd_cuda,
)
from minimodels.kernels.ssm_kernel.ref import SERIES, s4d_kernel_ref

__all__ = ["s4d_kernel", "s4d_kernel_ref", "s4d_kernel_cpu", "s4d_kernel_cuda",
           "example_inputs", "IMPLS", "BLOCK", "REANCHOR", "PARALLEL_MIN", "THREADS", "ITEMS",
           "N_TILE", "BWD_THREADS", "CHUNK", "ANCHOR", "MODES", "SERIES"]

# =============================================================================================
# Autograd: forward and backward are both kernels of the chosen backend
# =============================================================================================


class _S4DKernel(torch.autograd.Function):
    """Wraps a (forward, backward) kernel pair: fwd(A, C, dt, L) -> K and
    bwd(A, C, dt, G) -> (∂A, ∂C, ∂dt), on contiguous tensors with conjugation resolved."""

    @staticmethod
    def forward(ctx, A, C, dt, L, kernels):
        fwd, bwd = kernels
        A, C, dt = (x.detach().resolve_conj().contiguous() for x in (A, C, dt))
        d, n = A.shape
        if d and n:
            K = fwd(A, C, dt, L)  # (d, L)
        else:
            K = torch.zeros(d, L, dtype=dt.dtype, device=dt.device)
        ctx.save_for_backward(A, C, dt)
        ctx.bwd = bwd
        return K

    @staticmethod
    def backward(ctx, G):
        A, C, dt = ctx.saved_tensors
        if A.numel():
            gA, gC, gdt = ctx.bwd(A, C, dt, G.contiguous())
        else:
            gA, gC, gdt = torch.zeros_like(A), torch.zeros_like(C), torch.zeros_like(dt)
        return gA, gC, gdt, None, None


def s4d_kernel_cpu(A, C, dt, L):
    """Numba CPU kernel, forward and backward. Same contract as ``s4d_kernel_ref``."""
    return _S4DKernel.apply(A, C, dt, L, (_fwd_cpu, _bwd_cpu))


def s4d_kernel_cuda(A, C, dt, L):
    """numba.cuda kernel (or the CUDA simulator), forward and backward. Same contract as
    ``s4d_kernel_ref``."""
    return _S4DKernel.apply(A, C, dt, L, (_fwd_cuda, _bwd_cuda))


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": s4d_kernel_ref, "cpu": s4d_kernel_cpu, "cuda": s4d_kernel_cuda}

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def s4d_kernel(A, C, dt, L, *, backend=None):
    """The S4D convolution kernel K[d, l] = 2·Re Σ_n C·(exp(Δ·A) − 1)/A·exp(Δ·A·l).

    Args:
        A: (d, n) complex64 or complex128, the continuous-time diagonal state matrix.
        C: (d, n) same dtype, the output matrix already multiplied by B.
        dt: (d,) float32 for complex64 (float64 for complex128), the step Δ of each channel.
        L: int >= 1, the kernel length.
        backend: "ref", "cpu", "cuda", a callable with this signature, or None.

    Returns:
        K: (d, L) float32 for complex64 input, float64 for complex128. Differentiable in A, C
        and dt on every backend (the kernels' backward is a kernel too).

    Any real dt is accepted and means the formula above on every backend (tested): Δ = 0
    gives K = 0, and Δ < 0 runs the system backward in time, |Ā| = e^{Δ·Re A} > 1 for stable A,
    so K grows geometrically with l (overflowing for long L). It is not rejected because the
    formula is well defined, because checking the values of a CUDA tensor costs a device-to-host
    synchronisation (measured on the H200: 284 instead of 130 us a call in a launch loop), and
    because S4D's Δ = exp(log Δ) is positive by construction.
    """
    if not isinstance(A, torch.Tensor) or A.dtype not in _REAL:
        raise TypeError(f"A must be a complex64 or complex128 tensor of shape (d, n), got "
                        f"{getattr(A, 'dtype', type(A).__name__)}")
    if A.dim() != 2:
        raise ValueError(f"A must have 2 dimensions (d, n), got shape {tuple(A.shape)}")
    if not isinstance(C, torch.Tensor) or C.dtype != A.dtype:
        raise TypeError(f"C must be a {str(A.dtype)[6:]} tensor like A, got "
                        f"{getattr(C, 'dtype', type(C).__name__)}")
    if C.shape != A.shape:
        raise ValueError(f"C must have shape (d, n) = {tuple(A.shape)}, got {tuple(C.shape)}")
    real = _REAL[A.dtype]
    if not isinstance(dt, torch.Tensor) or dt.dtype != real:
        raise TypeError(f"dt must be a {str(real)[6:]} tensor of shape (d,) for "
                        f"{str(A.dtype)[6:]} A, got {getattr(dt, 'dtype', type(dt).__name__)}")
    if dt.shape != A.shape[:1]:
        raise ValueError(f"dt must have shape (d,) = ({A.shape[0]},), got {tuple(dt.shape)}")
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be an int >= 1, got {L!r}")
    return dispatch(IMPLS, A, C, dt, L, backend=backend)


# (rtol, atol) of a backend against ``ref`` in the same dtype on ``example_inputs``, about 10x
# the differences measured at the default size (max |K| ≈ 1): complex64 1.1e-6 (cpu) and 6e-7
# (cuda, H200), both mostly the complex64 reference's own rounding of Δ·A·l; complex128 2e-15
_TOLERANCE = {torch.complex64: (1e-5, 1e-5), torch.complex128: (1e-10, 1e-12)}


def example_inputs(shape=None, *, dtype=torch.complex64, device="cpu", seed=0) -> Example:
    """The canonical call ``s4d_kernel(A, C, dt, L)`` at ``shape = (d, n, L)`` (default the
    benchmark size (1536, 32, 4096)): S4D-Lin A = −1/2 + iπk (every channel), C complex
    standard normal, Δ log-uniform in [1e-3, 1e-1] (S4D's init); drawn in float64 on the CPU
    from ``seed``, then cast to ``dtype`` (complex64 or complex128; dt real of the same
    precision) and moved to ``device``. Tolerances: see ``_TOLERANCE``."""
    if dtype not in _REAL:
        raise TypeError(f"dtype must be torch.complex64 or torch.complex128, got {dtype}")
    d, n, L = shape or (1536, 32, 4096)
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(n, dtype=torch.float64)
    A = torch.complex(torch.full((d, n), -0.5, dtype=torch.float64), math.pi * k.repeat(d, 1))
    C = torch.randn(d, n, dtype=torch.complex128, generator=g)
    u = torch.rand(d, generator=g, dtype=torch.float64)
    dt = torch.exp(math.log(1e-3) + u * (math.log(1e-1) - math.log(1e-3)))  # (d,)
    rtol, atol = _TOLERANCE[dtype]
    return Example((A.to(device, dtype), C.to(device, dtype), dt.to(device, _REAL[dtype]), L),
                   rtol=rtol, atol=atol, sizes={"d_model": d, "n_modes": n, "seqlen": L})
