"""The selective scan's reference (the definition): a Python loop over time in PyTorch.

The equations, references and glossary: the package docstring (kernels/selective_scan/__init__.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SOFTPLUS_THRESHOLD", "selective_scan_ref"]

# =============================================================================================
# Constants
# =============================================================================================

SOFTPLUS_THRESHOLD = 20.0  # as torch.nn.functional.softplus: softplus(v) = v above it


# =============================================================================================
# Reference (the definition; autograd differentiates it)
# =============================================================================================


def _discretise(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]  # (b, d, l)
    return F.softplus(delta) if delta_softplus else delta


def _at(M, t):
    """B or C at step t, broadcastable against the state (b, d, n)."""
    return M[:, None, :, t] if M.dim() == 3 else M  # (b, 1, n) or (d, n)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """The selective scan as a Python loop over time (see the module docstring).

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l) or (d, n); D, delta_bias: (d,);
    z: (b, d, l) -> y: (b, d, l) [, x_L: (b, d, n)]."""
    delta = _discretise(delta, delta_bias, delta_softplus)  # Δ: (b, d, l)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[..., t, None]  # (b, d, 1)
        Bu = dt * _at(B, t) * u[..., t, None]  # (b, d, n)
        if t == 0:  # x_{-1} = 0: nothing to decay (e^{Δ A} · 0 is NaN where e^{Δ A} overflows);
            x = Bu + 0 * (dt * A)  # 0 · Δ A keeps Δ and A in autograd's graph when l = 1
        else:
            x = torch.exp(dt * A) * x + Bu  # (b, d, n)
        ys.append((x * _at(C, t)).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1) if ys else u.clone()  # (b, d, l)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, x) if return_last_state else y
