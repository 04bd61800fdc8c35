"""Neighbourhood attention in 2-D: each pixel attends to the kernel_size x kernel_size window of
pixels around it, shifted to stay inside the image.

References: Hassani, Walton, Li, Li, Shi, "Neighborhood Attention Transformer" (CVPR 2023),
section 3.1 (the window and its clamp at the borders); Crowson, Baumann, Birch, Abraham,
Kaplan, Shippole, "Scalable High-Resolution Pixel-Space Image Synthesis with Hourglass
Diffusion Transformers" (ICML 2024), section 3 (neighbourhood attention at HDiT's fine levels).

For query pixel (i, j) with window rows ρ(i) .. ρ(i) + K − 1 and columns ρ(j) .. ρ(j) + K − 1,
ρ(i) = clamp(i − ⌊K/2⌋, 0, H − K) (NATTEN's convention: a window at the border is shifted
inside, never truncated, so every query sees exactly K² keys):

    o_ij = Σ_{(a, c) ∈ window(i, j)} softmax_{(a, c)}(scale · q_ij · k_ac) v_ac

Cost: b·h·H·W·K²·e multiply-adds for the scores and as many for the output, linear in the
pixels, where full attention over H·W pixels costs (H·W)² · e.

Backward, with g = ∂L/∂o, P the softmax weights (recomputed from the window's scores, as the
forward computes them, so a one-hot row gets dS = 0 exactly) and D_ij = Σ P dP:
dP = g · v, dS = P ∘ (dP − D), ∂L/∂q_ij = scale Σ dS k, ∂L/∂k_ac = scale Σ dS q over the
queries whose window holds (a, c), ∂L/∂v_ac = Σ P g likewise.

Glossary (code = paper): ``kernel_size`` = K (the window side, NATTEN's ``kernel_size``),
``window_start`` = ρ, shapes (b, h, H, W, e) = (batch, heads, height, width, head dim).

Layout: ``ref.py`` the reference (masked full attention) and the window; ``cpu.py`` the Numba
loops; ``cuda.py`` the numba.cuda kernels and their launchers; this file: the autograd
Function, the public entry and ``example_inputs``.
"""

from __future__ import annotations

import math

import torch

from minimodels.backend import dispatch, expect_tensor, resolve
from minimodels.kernels._common import Example, randn
from minimodels.kernels.natten.cpu import _bwd_cpu, _fwd_cpu
from minimodels.kernels.natten.cuda import _bwd_cuda, _fwd_cuda
from minimodels.kernels.natten.ref import (
    neighborhood_attention_2d_ref,
    neighborhood_mask,
    window_start,
)

__all__ = ["neighborhood_attention_2d", "neighborhood_attention_2d_ref", "natten_cpu",
           "natten_cuda", "neighborhood_mask", "window_start", "flops", "IMPLS",
           "example_inputs"]

# =============================================================================================
# Constants
# =============================================================================================

# example_inputs: the benchmark's size (b, h, H, W, e, kernel_size)
EXAMPLE_SHAPE = (1, 4, 128, 128, 64, 7)
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-12, 1e-12)}  # (rtol, atol)


# =============================================================================================
# Autograd: the forward and the backward are kernels of the chosen backend
# =============================================================================================


class _Natten(torch.autograd.Function):
    """Wraps a (forward, backward) kernel pair on contiguous (r, H, W, e) tensors."""

    @staticmethod
    def forward(ctx, q, k, v, kernel_size, scale, kernels):
        fwd, bwd = kernels
        out, _ = fwd(q, k, v, kernel_size, scale)  # the lse is for callers that merge
        ctx.save_for_backward(q, k, v)
        ctx.args = (kernel_size, scale, bwd)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors
        kernel_size, scale, bwd = ctx.args
        dq, dk, dv = bwd(q, k, v, g.contiguous(), kernel_size, scale)
        return dq, dk, dv, None, None, None


def _flat(q, k, v, kernel_size, scale, kernels):
    b, h, H, W, e = q.shape
    flat = [t.reshape(b * h, H, W, e).contiguous() for t in (q, k, v)]  # (b·h, H, W, e)
    return _Natten.apply(*flat, kernel_size, scale, kernels).reshape(b, h, H, W, e)


def natten_cpu(q, k, v, kernel_size, scale):
    """Numba CPU kernel, parallel over (head, row of queries). Contract of the reference."""
    return _flat(q, k, v, kernel_size, scale, (_fwd_cpu, _bwd_cpu))


def natten_cuda(q, k, v, kernel_size, scale):
    """numba.cuda kernel (or the CUDA simulator): tiles of queries with their key halo in shared
    memory; kernel_size <= cuda.MAX_KERNEL. Contract of the reference."""
    return _flat(q, k, v, kernel_size, scale, (_fwd_cuda, _bwd_cuda))


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": neighborhood_attention_2d_ref, "cpu": natten_cpu, "cuda": natten_cuda}


def neighborhood_attention_2d(q, k, v, kernel_size, *, scale=None, backend=None):
    """2-D neighbourhood attention (see the module docstring).

    Args:
        q, k, v: (b, h, H, W, e), float32 or float64, one dtype, shape and device.
        kernel_size: the window side K, an odd int with 1 <= K <= min(H, W).
        scale: multiplies the scores; default 1 / sqrt(e).
        backend: "ref", "cpu", "cuda", a callable with the signature
            ``fn(q, k, v, kernel_size, scale)``, or None to choose from the tensors' device.

    Returns:
        o: (b, h, H, W, e) in q's dtype. Differentiable in q, k and v on every backend.
    """
    expect_tensor("q", q, "b, h, H, W, e")
    expect_tensor("k", k, "b, h, H, W, e", dtypes=(q.dtype,), shape=q.shape)
    expect_tensor("v", v, "b, h, H, W, e", dtypes=(q.dtype,), shape=q.shape)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    _, _, H, W, e = q.shape
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int (the window is centred on its "
                         f"query), got {kernel_size}")
    if kernel_size > min(H, W):
        raise ValueError(f"kernel_size must be <= H and W (the window stays inside the image), "
                         f"got {kernel_size} for H, W = {H}, {W}")
    if scale is None:
        scale = 1 / math.sqrt(e) if e else 1.0
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return dispatch(IMPLS, q, k, v, kernel_size, float(scale), backend=resolve(backend, q, k, v))


def flops(b: int, h: int, H: int, W: int, e: int, kernel_size: int | None = None) -> int:
    """Multiply-adds x 2 of the scores and the weighted sum: 4·b·h·H·W·K²·e for neighbourhood
    attention, 4·b·h·(H·W)²·e for full attention (``kernel_size=None``)."""
    keys = H * W if kernel_size is None else kernel_size * kernel_size
    return 4 * b * h * H * W * keys * e


def example_inputs(shape=None, *, dtype=torch.float32, device="cpu", seed=0) -> Example:
    """The canonical inputs of ``neighborhood_attention_2d``: ``Example(args=(q, k, v),
    kwargs={"kernel_size": K})``.

    shape: (b, h, H, W, e, kernel_size), default (1, 4, 128, 128, 64, 7) (the benchmark's).
    q, k, v ~ N(0, 1), drawn in float64 on the CPU from ``seed``, then cast to ``dtype`` and
    moved to ``device``. rtol 1e-4, atol 1e-5 in float32, 1e-12 in float64."""
    b, h, H, W, e, K = EXAMPLE_SHAPE if shape is None else shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (randn(g, b, h, H, W, e) for _ in range(3))  # (b, h, H, W, e)
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float64])
    return Example(args=tuple(t.to(dtype=dtype, device=device) for t in (q, k, v)),
                   kwargs={"kernel_size": K}, rtol=rtol, atol=atol,
                   sizes={"batch": b, "n_heads": h, "height": H, "width": W, "d_head": e,
                          "kernel_size": K})
