"""Pieces shared by several kernels, under public names (no kernel imports another kernel's
private names): the canonical-example record every op's ``example_inputs`` returns, and the
torch -> NumPy dtype mapping the kernel factories are keyed by."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Example", "numpy_dtype"]


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


@functools.cache
def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch dtype (kernel factories are cached per NumPy dtype)."""
    return np.dtype(str(dtype).removeprefix("torch."))
