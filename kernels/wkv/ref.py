"""WKV's reference (the definition, in log space) and its empty state. The equations and the
glossary: the package docstring (kernels/wkv/__init__.py)."""

from __future__ import annotations

import torch

__all__ = ["MIN_LOG", "wkv_ref", "wkv_state0"]

# =============================================================================================
# Constants
# =============================================================================================

MIN_LOG = -1e38  # p of the empty state: e^(MIN_LOG - anything finite) = 0, and it stays finite


def wkv_state0(batch: int, c: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The empty state (a, b, p) = (0, 0, MIN_LOG): (batch, 3, c)."""
    s = torch.zeros(batch, 3, c, dtype=dtype, device=device)
    s[:, 2] = MIN_LOG
    return s


# =============================================================================================
# Reference (the definition, in log space; autograd differentiates it)
# =============================================================================================


def wkv_ref(w, u, k, v, state=None, return_state=False):
    """WKV by a loop over time in PyTorch, in log space (see the module docstring).

    w, u: (c,); k, v: (b, l, c); state: (b, 3, c) or None -> y: (b, l, c) [, state']."""
    batch, l, c = k.shape
    s = wkv_state0(batch, c, k.dtype, k.device) if state is None else state
    a, b, p = s[:, 0], s[:, 1], s[:, 2]  # (b, c) each
    ys = []
    for t in range(l):
        kt, vt = k[:, t], v[:, t]  # (b, c)
        q = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        ys.append((e1 * a + e2 * vt) / (e1 * b + e2))  # the bonus term e^{u+k_t} v_t
        p_new = torch.maximum(p - w, kt)  # decay the state, then add token t
        e1, e2 = torch.exp(p - w - p_new), torch.exp(kt - p_new)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, p_new
    y = torch.stack(ys, dim=1) if ys else torch.empty_like(k)  # (b, l, c)
    return (y, torch.stack([a, b, p], dim=1)) if return_state else y
