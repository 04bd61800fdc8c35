"""Pieces shared by several kernels, under public names (no kernel imports another kernel's
private names): the canonical-example record every op's ``example_inputs`` returns, the
torch -> NumPy dtype mapping the kernel factories are keyed by, and the CUDA block scan of
affine maps h -> A h + B (``scan_maps``) with its launch layout, used by kernels/scan.py's
kernels and by the selective scan's backward."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from numba import cuda

from minimodels.backend import cuda_simulated, expect_tensor

__all__ = ["Example", "SCAN_CHUNK", "SCAN_ITEMS", "SCAN_THREADS", "expect_out", "numpy_dtype",
           "randn", "scan_maps"]

# =============================================================================================
# Constants: the layout of a chunked block scan (kernels/scan.py, selective_scan's backward)
# =============================================================================================

# One block walks one row in chunks of SCAN_THREADS * SCAN_ITEMS steps; thread i owns
# SCAN_ITEMS consecutive steps of each chunk. The simulator (CI) uses a smaller block so that
# its tests cross many chunk boundaries at tiny sizes.
SCAN_THREADS = 8 if cuda_simulated() else 256  # 256 x 2 measured best of 128..1024 x 1..8 (H200)
SCAN_ITEMS = 2
SCAN_CHUNK = SCAN_THREADS * SCAN_ITEMS


# =============================================================================================
# Canonical inputs of an op
# =============================================================================================


@dataclass(frozen=True)
class Example:
    """One canonical call of an op, ``op(*args, **kwargs)``, and how close another backend must
    come to ``ref`` on it (``torch.testing.assert_close(got, want, rtol=rtol, atol=atol)``).

    ``sizes`` names the sizes (``{"batch": 1, "d_model": 1536, "seqlen": 4096, ...}``) for
    tables and floors. Tests, benchmarks, GPU checks and chapters all build inputs through an
    op's ``example_inputs(shape=None, *, dtype, device, seed)``, so there is one spec per op."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    rtol: float = 1e-5
    atol: float = 1e-6
    sizes: dict = field(default_factory=dict)

    def call(self, op, **overrides):
        """``op(*args, **kwargs, **overrides)``, e.g. ``ex.call(attention, backend="cpu")``."""
        return op(*self.args, **{**self.kwargs, **overrides})


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal float64 values on the CPU from ``generator``: examples draw in float64 on
    the CPU, then cast and move, so one seed gives the same values in every dtype and device."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def expect_out(out, like: torch.Tensor, dims: str, inputs) -> torch.Tensor:
    """Check an op's ``out=`` argument: a contiguous tensor of ``like``'s shape, dtype and
    device, and no tensor of ``inputs`` that needs its gradient (a kernel writing into ``out``
    is outside autograd). Raises ``TypeError``/``ValueError`` naming ``out``."""
    expect_tensor("out", out, dims, dtypes=(like.dtype,), shape=like.shape)
    if out.device != like.device:
        raise ValueError(f"out must be on {like.device} like the inputs, got {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        raise ValueError("out= is for calls without autograd, but an input requires grad: call "
                         "without out=, or under torch.no_grad()")
    return out


@functools.cache
def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch dtype (kernel factories are cached per NumPy dtype)."""
    return np.dtype(str(dtype).removeprefix("torch."))


# =============================================================================================
# CUDA: the block scan of affine maps
# =============================================================================================


# [core] scan_maps
@cuda.jit(device=True)
def scan_maps(sA, sB, A, B, i):
    """Inclusive scan over the block of the maps h -> A h + B (thread order = time order).

    sA, sB: (2, SCAN_THREADS) ping-pong buffers, so each of the log2(SCAN_THREADS) steps needs
    one barrier. Returns p: thread i's composition of maps 0..i is in sA[p, i], sB[p, i]."""
    p = 0
    sA[p, i] = A
    sB[p, i] = B
    cuda.syncthreads()
    offset = 1
    while offset < SCAN_THREADS:
        if i >= offset:  # (A, B) after (Ap, Bp):  h -> A (Ap h + Bp) + B
            B = A * sB[p, i - offset] + B
            A = A * sA[p, i - offset]
        p = 1 - p
        sA[p, i] = A
        sB[p, i] = B
        cuda.syncthreads()
        offset *= 2
    return p
# [/core]
