"""Monarch matrices: a product of two block-diagonal matrices and two fixed permutations.

References: Dao et al., "Monarch: expressive structured matrices for efficient and accurate
training" (ICML 2022), section 3 (definition 3.1, the DFT as a Monarch product in 3.2); Fu et
al., "Monarch Mixer: a simple sub-quadratic GEMM-based architecture" (NeurIPS 2023), section 3.
The factor layout is the one of HazyResearch's ``blockdiag_butterfly_multiply``.

    y = P2 · BD(w2) · P1 · BD(w1) · x

Glossary (code = paper): ``w1`` = the first block-diagonal factor's blocks (the paper's R in
M = P L Pᵀ R, k blocks of q x p), ``w2`` = the second's (L, l blocks of s x r), ``BD(w)`` the
block-diagonal matrix of w's blocks. Sizes: x: (..., n) with n = k·p; w1: (k, q, p);
w2: (l, s, r) with l·r = k·q; y: (..., l·s).

- P1 regroups the intermediate: its index i·l + j (i < r, j < l) becomes j·r + i, so block j of
  the second factor takes every l-th number, starting at j (a reshape (r, l) -> transpose).
- P2 regroups the output: index j·s + t (j < l, t < s) becomes t·l + j.

With k = l = √n and p = q = r = s = √n the matrix has 2·n·√n numbers and a product costs
4·n·√n multiply-adds: O(n^1.5) where a dense matrix has n² of both.

Backward, with g = ∂L/∂y, z = BD(w1) x and gz = P1ᵀ BD(w2)ᵀ P2ᵀ g:
    ∂L/∂x = BD(w1)ᵀ gz,  ∂L/∂w1[kk] = Σ_tokens gz_kk x_kkᵀ,  ∂L/∂w2[j] = Σ_tokens g_j (P1 z)_jᵀ.
The kernels compute ∂L/∂x, z and gz (the CPU's fused per tile of tokens, the GPU's as three
token-tiled batched products); the two weight gradients are sums over tokens of outer
products, batched matrix products done by torch.

Layout: ``ref.py`` the reference (einsum), the dense matrix and the DFT's factors; ``cpu.py``
the Numba loops; ``cuda.py`` the numba.cuda kernels and their launchers; this file: the
autograd Function, the public entry and ``example_inputs``.
"""

from __future__ import annotations

import torch

from minimodels.backend import dispatch, resolve
from minimodels.kernels._common import Example, randn
from minimodels.kernels.monarch.cpu import _bwd_cpu, _fwd_cpu
from minimodels.kernels.monarch.cuda import _bwd_cuda, _fwd_cuda
from minimodels.kernels.monarch.ref import monarch_dft, monarch_matrix_ref, monarch_ref

__all__ = ["monarch_multiply", "monarch_ref", "monarch_cpu", "monarch_cuda", "monarch_matrix",
           "monarch_dft", "check_factors", "IMPLS", "example_inputs"]

# =============================================================================================
# Constants
# =============================================================================================

# example_inputs: the benchmark's size (b, k, q, p, l, s): 4096 tokens, n = 4096, 64 blocks
EXAMPLE_SHAPE = (4096, 64, 64, 64, 64, 64)
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-12, 1e-12)}  # (rtol, atol)
REAL = (torch.float32, torch.float64)
COMPLEX = (torch.complex64, torch.complex128)


# =============================================================================================
# Autograd: the forward and ∂L/∂x are kernels of the chosen backend
# =============================================================================================


class _Monarch(torch.autograd.Function):
    """Wraps a (forward, backward) kernel pair on x (b, n) and contiguous w1, w2."""

    @staticmethod
    def forward(ctx, x, w1, w2, kernels):
        fwd, bwd = kernels
        ctx.save_for_backward(x, w1, w2)
        ctx.bwd = bwd
        return fwd(x, w1, w2)

    @staticmethod
    def backward(ctx, g):
        x, w1, w2 = ctx.saved_tensors
        k, q, p = w1.shape
        l, s, r = w2.shape
        gx, z, gz = ctx.bwd(x, g.contiguous(), w1, w2)
        b = x.shape[0]
        gw1 = torch.einsum("bkq,bkp->kqp", gz.view(b, k, q), x.view(b, k, p))
        gw2 = torch.einsum("bsl,brl->lsr", g.reshape(b, s, l), z.view(b, r, l))
        return gx, gw1, gw2, None


def _flat(x, w1, w2, kernels):
    """Leading axes folded into one, contiguous inputs, the autograd Function, axes back."""
    l, s, _ = w2.shape
    lead = x.shape[:-1]
    y = _Monarch.apply(x.reshape(-1, x.shape[-1]).contiguous(), w1.contiguous(),
                       w2.contiguous(), kernels)  # (b, l·s)
    return y.reshape(*lead, l * s)


def monarch_cpu(x, w1, w2):
    """Numba CPU kernel, parallel over tiles of tokens. Contract of ``monarch_ref``."""
    return _flat(x, w1, w2, (_fwd_cpu, _bwd_cpu))


def monarch_cuda(x, w1, w2):
    """numba.cuda kernels (or the CUDA simulator): each factor a token-tiled batched matrix
    product on tensor cores in float32 (mma.sync; on sm_90 wgmma where it is faster), the
    intermediate through global memory (or, forced, the forward fused in one launch in
    thread-block clusters: ``cuda.forced_engine("fused")``). Contract of ``monarch_ref``."""
    return _flat(x, w1, w2, (_fwd_cuda, _bwd_cuda))


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": monarch_ref, "cpu": monarch_cpu, "cuda": monarch_cuda}


def check_factors(w1, w2, n: int | None = None) -> None:
    """Raise TypeError/ValueError unless w1 (k, q, p) and w2 (l, s, r) are Monarch factors
    (l·r = k·q), and, when ``n`` is given, of an input of size n = k·p."""
    for name, w in (("w1", w1), ("w2", w2)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 3:
            dims = "k, q, p" if name == "w1" else "l, s, r"
            raise ValueError(f"{name} must have 3 dimensions ({dims}), got shape "
                             f"{tuple(w.shape)}")
    k, q, p = w1.shape
    l, s, r = w2.shape
    if n is not None and k * p != n:
        raise ValueError(f"w1 (k, q, p) = {tuple(w1.shape)} needs k·p = n: {k}·{p} = {k * p} "
                         f"!= n = {n} (the last axis of x)")
    if l * r != k * q:
        raise ValueError(f"w2 (l, s, r) = {tuple(w2.shape)} needs l·r = k·q (the first "
                         f"factor's output size): {l}·{r} = {l * r} != {k}·{q} = {k * q}")


def _check(x, w1, w2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., n), got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., n), got a scalar")
    check_factors(w1, w2, x.shape[-1])
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        if t.dtype not in REAL + COMPLEX:
            raise TypeError(f"{name} must be float32 or float64 (complex on backend='ref'), "
                            f"got {str(t.dtype).removeprefix('torch.')}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {str(x.dtype).removeprefix('torch.')},"
                            f" got {str(t.dtype).removeprefix('torch.')}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def monarch_multiply(x, w1, w2, *, backend=None):
    """The Monarch product y = P2 · BD(w2) · P1 · BD(w1) · x (see the module docstring).

    Args:
        x: (..., n), float32 or float64 (complex64/complex128 on backend="ref" only).
        w1: (k, q, p) with k·p = n: k blocks, each q x p, of the first factor.
        w2: (l, s, r) with l·r = k·q: l blocks, each s x r, of the second factor.
        backend: "ref", "cpu", "cuda", a callable with this signature, or None to choose from
            the tensors' device.

    Returns:
        y: (..., l·s), x's dtype. Differentiable in x, w1 and w2 on every backend.
    """
    _check(x, w1, w2)
    choice = resolve(backend, x, w1, w2)
    if x.is_complex() and not (callable(choice) or choice == "ref"):
        raise TypeError(f"complex inputs run on backend='ref' only (the einsum reference); the "
                        f"{choice} kernel takes float32 and float64")
    return dispatch(IMPLS, x, w1, w2, backend=choice)


def monarch_matrix(w1, w2):
    """The dense (l·s, n) matrix M with M @ x = monarch_multiply(x, w1, w2) (n = k·p)."""
    check_factors(w1, w2)
    return monarch_matrix_ref(w1, w2)


def example_inputs(shape=None, *, dtype=torch.float32, device="cpu", seed=0) -> Example:
    """The canonical inputs of ``monarch_multiply``: ``Example(args=(x, w1, w2))``.

    shape: (b, k, q, p, l, s) with l dividing k·q (r = k·q / l), default (4096, 64, 64, 64,
    64, 64): 4096 tokens of n = 4096, 64 blocks (the benchmark's). x ~ N(0, 1) (b, k·p);
    w1 ~ N(0, 1/p) (k, q, p); w2 ~ N(0, 1/r) (l, s, r): each factor keeps the scale of its
    input. Drawn in float64 on the CPU from ``seed``, then cast to ``dtype`` and moved to
    ``device``. rtol 1e-4, atol 1e-5 in float32, 1e-12 in float64 (against a float64 truth)."""
    b, k, q, p, l, s = EXAMPLE_SHAPE if shape is None else shape
    if l < 1 or (k * q) % l:
        raise ValueError(f"example shape (b, k, q, p, l, s) = {shape}: l must divide k·q")
    r = k * q // l
    g = torch.Generator().manual_seed(seed)
    x = randn(g, b, k * p)  # (b, n)
    w1 = randn(g, k, q, p) / max(p, 1) ** 0.5  # (k, q, p)
    w2 = randn(g, l, s, r) / max(r, 1) ** 0.5  # (l, s, r)
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float64])
    return Example(args=tuple(t.to(dtype=dtype, device=device) for t in (x, w1, w2)),
                   rtol=rtol, atol=atol,
                   sizes={"batch": b, "n": k * p, "nblocks": k, "d_out": l * s})
