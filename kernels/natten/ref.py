"""Neighbourhood attention's reference (the definition: full attention with a mask) and the
clamped window. The equations and the glossary: the package docstring
(kernels/natten/__init__.py)."""

from __future__ import annotations

import torch

__all__ = ["neighborhood_attention_2d_ref", "neighborhood_mask", "window_start"]


# =============================================================================================
# The window: NATTEN's clamp (a window near the border is shifted inside, never truncated)
# =============================================================================================


# [core] window_start
def window_start(i, n: int, kernel_size: int):
    """First row (or column) of the window of query i along an axis of n: the window is centred
    on i and shifted to stay inside, start = clamp(i − kernel_size // 2, 0, n − kernel_size).
    ``i`` is an int or an integer tensor."""
    if isinstance(i, torch.Tensor):
        return (i - kernel_size // 2).clamp(0, n - kernel_size)
    return min(max(i - kernel_size // 2, 0), n - kernel_size)
# [/core]


def neighborhood_mask(H: int, W: int, kernel_size: int, device=None) -> torch.Tensor:
    """(H·W, H·W) bool: entry [i·W + j, a·W + c] is True when key (a, c) lies in the
    kernel_size x kernel_size window of query (i, j)."""
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    r0 = window_start(rows, H, kernel_size)  # (H,)
    c0 = window_start(cols, W, kernel_size)  # (W,)
    in_r = (rows[None, :] >= r0[:, None]) & (rows[None, :] < r0[:, None] + kernel_size)  # (H, H)
    in_c = (cols[None, :] >= c0[:, None]) & (cols[None, :] < c0[:, None] + kernel_size)  # (W, W)
    return (in_r[:, None, :, None] & in_c[None, :, None, :]).reshape(H * W, H * W)


# =============================================================================================
# Reference (the definition; autograd differentiates it)
# =============================================================================================


# [core] natten_ref
def neighborhood_attention_2d_ref(q, k, v, kernel_size, scale):
    """softmax(scale · q kᵀ + mask) v with the mask of the clamped windows: full attention over
    the H·W pixels where every key outside the window scores −∞.

    q, k, v: (b, h, H, W, e) -> (b, h, H, W, e)."""
    b, h, H, W, e = q.shape
    mask = neighborhood_mask(H, W, kernel_size, q.device)  # (H·W, H·W)
    qf, kf, vf = (t.reshape(b, h, H * W, e) for t in (q, k, v))  # (b, h, H·W, e)
    s = scale * qf @ kf.transpose(-1, -2)  # (b, h, H·W, H·W)
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vf).reshape(b, h, H, W, e)  # (b, h, H, W, e)
# [/core]
