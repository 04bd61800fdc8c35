"""Selective scan (Mamba's S6 recurrence): x_t = exp(Δ_t A) ⊙ x_{t-1} + Δ_t B_t u_t, y_t = C_t x_t.

References: Gu & Dao, "Mamba: linear-time sequence modeling with selective state spaces" (2023),
section 3.2 (selection: Δ, B, C depend on the input), section 3.3 and Algorithm 2 (the
hardware-aware scan: the expanded state never leaves fast memory); Blelloch, "Prefix sums and
their applications" (1990) for ``parallel_scan`` (kernels/scan.py, re-exported here).

Layout: ``ref.py`` the reference (the definition), ``cpu.py`` the Numba loops, ``cuda.py`` the
numba.cuda kernels and their launchers; this file: the autograd Function, the public entry and
``example_inputs``.

Arguments follow ``mamba_ssm``'s ``selective_scan_fn`` for real A. Glossary (code = paper):
``u`` = the input x of the paper, ``delta`` = Δ, ``x`` = the hidden state h (so that the input
can be called u, as in mamba_ssm), ``A, B, C, D`` as in the paper, ``z`` = the gate branch.
Shapes: ``b`` batch, ``d`` width, ``l`` length, ``n`` state size.

    Δ   = softplus(delta + delta_bias)   (softplus only if delta_softplus)     (b, d, l)
    Ā_t = exp(Δ_t A)                      zero-order hold for A                 (b, d, n) per t
    B̄_t = Δ_t B_t                         Euler for B, as Mamba does            (b, d, n) per t
    x_t = Ā_t ⊙ x_{t-1} + B̄_t u_t         x_{-1} = 0                            (b, d, n)
    y_t = C_t · x_t + D u_t,   then  y ← y · silu(z)                             (b, d)

Backward (g = ∂L/∂y before the gate is turned into dy = ∂L/∂(C·x + D u)), with
dx_t = ∂L/∂x_t accumulated from the end (dx_{l-1} includes ∂L/∂x_L):
    dx_t = C_t dy_t + Ā_{t+1} ⊙ dx_{t+1}
    ∂Ā_t = dx_t ⊙ x_{t-1}  ->  ∂Δ_t += Σ_n (∂Ā_t Ā_t A + dx_t B_t u_t),  ∂A += Σ_{b,t} ∂Ā_t Ā_t Δ_t
    ∂B_t += dx_t Δ_t u_t,   ∂C_t += dy_t x_t,   ∂u_t = D dy_t + Σ_n dx_t Δ_t B_t,   ∂D = Σ dy u
"""

from __future__ import annotations

import torch

from minimodels.backend import dispatch, expect_tensor
from minimodels.kernels._common import Example, randn
from minimodels.kernels.scan import combine, parallel_scan
from minimodels.kernels.selective_scan.cpu import _bwd_cpu, _fwd_cpu
from minimodels.kernels.selective_scan.cuda import CHUNK, N_MAX, _bwd_cuda, _fwd_cuda
from minimodels.kernels.selective_scan.ref import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_cpu", "selective_scan_cuda",
           "parallel_scan", "combine", "IMPLS", "example_inputs", "CHUNK", "N_MAX"]

# =============================================================================================
# Constants
# =============================================================================================

# example_inputs: the benchmark's size (b, d, l, n): Mamba-130m's d_inner, at l = 4096
EXAMPLE_SHAPE = (1, 1536, 4096, 16)
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-12, 1e-12)}  # (rtol, atol)


# =============================================================================================
# Autograd: forward and backward are both kernels of the chosen backend
# =============================================================================================


class _SelectiveScan(torch.autograd.Function):
    """Wraps a (forward, backward) pair of kernels as one differentiable op."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernels):
        fwd, bwd = kernels
        batch, d, l = u.shape
        n = A.shape[1]
        dummy3, dummy2 = u.new_zeros(1, 1, 1), u.new_zeros(1, 1)
        var_B, var_C = B.dim() == 3, C.dim() == 3
        args = (
            u.contiguous(), delta.contiguous(), A.contiguous(),
            B.contiguous() if var_B else dummy3, dummy2 if var_B else B.contiguous(),
            C.contiguous() if var_C else dummy3, dummy2 if var_C else C.contiguous(),
            u.new_zeros(d) if D is None else D.contiguous(),
            dummy3 if z is None else z.contiguous(),
            u.new_zeros(d) if delta_bias is None else delta_bias.contiguous(),
        )
        flags = (var_B, var_C, z is not None, bool(delta_softplus))
        if l == 0:
            out, last, saved = torch.empty_like(u), u.new_zeros(batch, d, n), None
        else:
            out, last, saved = fwd(*args, flags)
        ctx.save_for_backward(*args, saved)
        ctx.bwd, ctx.flags = bwd, flags
        ctx.given = (D is not None, z is not None, delta_bias is not None)
        return out, last

    @staticmethod
    def backward(ctx, g, glast):
        args = ctx.saved_tensors[:10]
        saved = ctx.saved_tensors[10]
        u = args[0]
        if u.shape[-1] == 0:
            grads = [torch.zeros_like(a) for a in args]
            du, ddelta, dA, dB3, dB2, dC3, dC2, dD, dz, dbias = grads
        else:
            g = torch.zeros_like(u) if g is None else g.contiguous()
            glast = (u.new_zeros(u.shape[0], u.shape[1], args[2].shape[1]) if glast is None
                     else glast.contiguous())
            du, ddelta, dA, dB3, dB2, dC3, dC2, dD, dz, dbias = ctx.bwd(
                *args, ctx.flags, saved, g, glast)
        var_B, var_C = ctx.flags[:2]
        has_D, has_z, has_bias = ctx.given
        return (du, ddelta, dA, dB3 if var_B else dB2, dC3 if var_C else dC2,
                dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
                None, None)


def _apply(kernels, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    y, last = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernels)
    return (y, last) if return_last_state else y


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """Numba CPU kernel, parallel over the b·d rows. Same contract as ``selective_scan_ref``."""
    return _apply((_fwd_cpu, _bwd_cpu), u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                  return_last_state)


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False, return_last_state=False):
    """numba.cuda kernel (or the CUDA simulator). Same contract as ``selective_scan_ref``."""
    return _apply((_fwd_cuda, _bwd_cuda), u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                  return_last_state)


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": selective_scan_ref, "cpu": selective_scan_cpu, "cuda": selective_scan_cuda}


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend=None):
    """Mamba's selective scan (see the module docstring for the equations).

    Args:
        u, delta: (b, d, l) float32 or float64, same dtype and device.
        A: (d, n) real (negative for a decaying state).
        B, C: (b, n, l) input-dependent, or (d, n) fixed; told apart by rank.
        D: (d,) skip connection, or None. z: (b, d, l) gate, or None.
        delta_bias: (d,) added to delta, or None. delta_softplus: apply softplus to Δ.
        return_last_state: also return x_L.
        backend: "ref", "cpu", "cuda", a callable with this signature, or None (by device).

    Returns:
        y: (b, d, l), and x_L: (b, d, n) when return_last_state. Differentiable everywhere.
    """
    expect_tensor("u", u, "b, d, l")
    batch, d, l = u.shape
    expect_tensor("delta", delta, "b, d, l", dtypes=(u.dtype,), shape=u.shape)
    expect_tensor("A", A, "d, n", dtypes=(u.dtype,))
    if A.shape[0] != d:
        raise ValueError(f"A must have shape (d, n) with d = {d}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if isinstance(M, torch.Tensor) and M.dim() == 2:
            expect_tensor(name, M, "d, n", dtypes=(u.dtype,), shape=(d, n))
        else:
            expect_tensor(name, M, "b, n, l", dtypes=(u.dtype,), shape=(batch, n, l))
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None:
            expect_tensor(name, v, "d", dtypes=(u.dtype,), shape=(d,))
    if z is not None:
        expect_tensor("z", z, "b, d, l", dtypes=(u.dtype,), shape=u.shape)
    return dispatch(IMPLS, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                    return_last_state, backend=backend)


def example_inputs(shape=None, *, dtype=torch.float32, device="cpu", seed=0, var_B=True,
                   var_C=True) -> Example:
    """The canonical inputs of ``selective_scan``, as in a Mamba block:
    ``Example(args=(u, delta, A, B, C, D, z, delta_bias), kwargs={"delta_softplus": True})``.

    shape: (b, d, l, n), default (1, 1536, 4096, 16) (the benchmark's). A = -exp(0.5·N(0, 1))
    (d, n), a decaying state as Mamba's A = -exp(A_log); u, z ~ N(0, 1) (b, d, l); delta ~
    N(-2, 1) (b, d, l), so that Δ = softplus(delta + delta_bias) is ~0.13 typically; B, C ~
    N(0, 1), (b, n, l) when ``var_B``/``var_C`` (input-dependent), else (d, n) (fixed); D ~
    N(0, 1) (d,); delta_bias ~ N(0, 0.1²) (d,). Drawn in float64 on the CPU from ``seed``, then
    cast to ``dtype`` and moved to ``device`` (the same values for every dtype and device).
    rtol = atol = 2e-5 in float32, 1e-12 in float64 (against a float64 truth)."""
    batch, d, l, n = EXAMPLE_SHAPE if shape is None else shape
    g = torch.Generator().manual_seed(seed)
    A = -torch.exp(0.5 * randn(g, d, n))  # (d, n)
    u = randn(g, batch, d, l)  # (b, d, l)
    delta = randn(g, batch, d, l) - 2.0  # (b, d, l)
    B = randn(g, batch, n, l) if var_B else randn(g, d, n)  # (b, n, l) or (d, n)
    C = randn(g, batch, n, l) if var_C else randn(g, d, n)
    D = randn(g, d)  # (d,)
    z = randn(g, batch, d, l)  # (b, d, l)
    delta_bias = 0.1 * randn(g, d)  # (d,)
    args = tuple(x.to(dtype=dtype, device=device) for x in (u, delta, A, B, C, D, z, delta_bias))
    rtol, atol = TOLERANCES[dtype]
    return Example(args=args, kwargs={"delta_softplus": True}, rtol=rtol, atol=atol,
                   sizes={"batch": batch, "d_model": d, "seqlen": l, "d_state": n})
