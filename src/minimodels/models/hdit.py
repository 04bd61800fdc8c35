"""The Hourglass Diffusion Transformer (HDiT): a pure transformer that works in pixel space at
high resolution by attending locally at the fine levels and globally only at the coarsest.

Reference: Crowson, Baumann, Birch, Abraham, Kaplan, Shippole, "Scalable High-Resolution
Pixel-Space Image Synthesis with Hourglass Diffusion Transformers" (ICML 2024): section 3
(the hourglass: patching, levels joined by token merge and split, learned skip interpolation),
3.1 (neighbourhood attention at the fine levels, global attention at the coarsest; axial RoPE;
adaptive RMSNorm conditioning on σ), figure 1. Neighbourhood attention: Hassani et al. 2023
(``minimodels.kernels.natten``).

    patch:  (b, c, H, W) -> (b, H/p, W/p, d_0)                      pixel unshuffle + linear
    level i (encoder): blocks of neighbourhood attention (K x K window) at (H/p/2^i)² tokens
    merge:  (b, n, n, d_i) -> (b, n/2, n/2, 4·d_i) -> linear -> d_{i+1}   (2 x 2 tokens -> 1)
    bottom: blocks of global attention
    split:  linear d_{i+1} -> 4·d_i -> (b, 2n, 2n, d_i);  x = lerp(skip_i, x, f_i)
    level i (decoder): blocks of neighbourhood attention;  unpatch to (b, c, H, W)

Cost: the fine levels cost O(pixels · K²), the bottom O((pixels / 4^{L−1})²): at a fixed number
of levels the bottom's share grows, so HDiT adds a level per doubling of the resolution, which
keeps the whole model linear in the pixels.

Glossary (code = paper): ``levels`` = (width, depth) per level, finest first (the last one is
global); ``kernel_size`` = the neighbourhood's K; ``skip_f`` = the learned interpolation factor
of each skip (HDiT's "lerp"); ``merge_tokens`` / ``split_tokens`` = TokenMerge / TokenSplit's
pixel unshuffle / shuffle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from minimodels.kernels.natten import neighborhood_attention_2d
from minimodels.models.diffusion import (
    AdaRMSNorm,
    Block,
    FourierFeatures,
    GlobalAttention,
    token_params,
)

__all__ = ["AxialRoPE", "HDiT", "NeighborhoodAttention", "merge_tokens", "split_tokens"]


# =============================================================================================
# Token merge and split: 2 x 2 neighbouring tokens <-> one token of 4x the width
# =============================================================================================


# [core] merge_split
def merge_tokens(x: torch.Tensor) -> torch.Tensor:
    """(b, H, W, d) -> (b, H/2, W/2, 4·d): token (i, j) of the output holds tokens
    (2i + dy, 2j + dx) of the input at channels (2·dy + dx)·d .. (2·dy + dx + 1)·d."""
    b, H, W, d = x.shape
    x = x.reshape(b, H // 2, 2, W // 2, 2, d)  # (b, i, dy, j, dx, d)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, H // 2, W // 2, 4 * d)


def split_tokens(x: torch.Tensor) -> torch.Tensor:
    """(b, H, W, 4·d) -> (b, 2H, 2W, d): the inverse of ``merge_tokens``."""
    b, H, W, d4 = x.shape
    x = x.reshape(b, H, W, 2, 2, d4 // 4)  # (b, i, j, dy, dx, d)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * H, 2 * W, d4 // 4)
# [/core]


# =============================================================================================
# Axial RoPE and the two attentions
# =============================================================================================


class AxialRoPE(nn.Module):
    """Rotary positions along both axes: the first half of each head's e dims is rotated by the
    token's row, the second half by its column (pairs (m, m + e/4) within each half), with
    frequencies base^(−2m/(e/2)). Positions are in units of the finest token grid (a token at
    level i covers 2^i of them), so every level sees the same geometry. q, k: (b, h, H, W, e)."""

    def __init__(self, d_head: int, stride: int = 1, base: float = 100.0):
        super().__init__()
        if d_head % 4:
            raise ValueError(f"axial RoPE needs d_head divisible by 4, got {d_head}")
        self.stride = stride
        m = d_head // 4
        self.register_buffer("freqs", base ** (-torch.arange(m, dtype=torch.float64) / m))

    def angles(self, H: int, W: int, dtype) -> torch.Tensor:
        rows = (torch.arange(H, dtype=torch.float64) + 0.5) * self.stride
        cols = (torch.arange(W, dtype=torch.float64) + 0.5) * self.stride
        a_r = (rows[:, None] * self.freqs).expand(H, -1)[:, None].expand(H, W, -1)  # (H, W, e/4)
        a_c = (cols[:, None] * self.freqs)[None].expand(H, W, -1)  # (H, W, e/4)
        return torch.cat([a_r, a_c], dim=-1).to(dtype)  # (H, W, e/2)

    def rotate(self, x, theta):
        x1, x2 = x.chunk(2, dim=-1)  # (..., e/2) each: pairs (m, m + e/2)
        cos, sin = theta.cos(), theta.sin()
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def forward(self, q, k):
        theta = self.angles(q.shape[2], q.shape[3], q.dtype)
        return self.rotate(q, theta), self.rotate(k, theta)


def level_kernel(kernel_size: int, H: int, W: int) -> int:
    """The window side at a level: kernel_size, or the largest odd size that fits."""
    fit = min(H, W) - (1 - min(H, W) % 2)
    return min(kernel_size, fit)


class NeighborhoodAttention(GlobalAttention):
    """Multi-head neighbourhood self-attention on a grid (b, H, W, d) with axial RoPE: each
    token attends to the K x K window around it (``minimodels.kernels.natten``)."""

    def __init__(self, d: int, d_head: int, kernel_size: int, rope=None):
        super().__init__(d, d_head, rope)
        self.kernel_size = kernel_size

    def forward(self, x):
        b, H, W, d = x.shape
        q, k, v = self.heads(x)  # (b, h, H, W, e)
        o = neighborhood_attention_2d(q, k, v, level_kernel(self.kernel_size, H, W))
        return self.out(o.permute(0, 2, 3, 1, 4).reshape(b, H, W, d))


# =============================================================================================
# The hourglass
# =============================================================================================


class HDiT(nn.Module):
    """F(x (b, c, H, W), c_noise (b,)) -> (b, c, H, W), an hourglass of ``levels`` =
    ((width, depth), ...) from the finest level (neighbourhood attention, ``depth`` blocks on
    the way down and as many on the way up) to the coarsest (``depth`` blocks of global
    attention). H and W must be multiples of patch · 2^(len(levels) − 1)."""

    def __init__(self, channels: int = 1, patch: int = 1,
                 levels: tuple = ((32, 1), (64, 1), (64, 2)), d_head: int = 16,
                 kernel_size: int = 7, mlp_ratio: int = 2):
        super().__init__()
        self.c, self.p, self.levels, self.kernel_size = channels, patch, tuple(levels), kernel_size
        widths = [w for w, _ in levels]
        d_cond = widths[0]
        self.cond = nn.Sequential(FourierFeatures(d_cond), nn.Linear(d_cond, d_cond), nn.GELU())
        self.embed = nn.Linear(channels * patch * patch, widths[0])

        def blocks(i, n, kind):
            attn = (NeighborhoodAttention(widths[i], d_head, kernel_size, AxialRoPE(d_head, 2**i))
                    if kind == "local" else GlobalAttention(widths[i], d_head,
                                                            AxialRoPE(d_head, 2**i)))
            return nn.ModuleList(Block(widths[i], d_cond, attn, mlp_ratio) for _ in range(n))

        L = len(levels)
        self.down = nn.ModuleList(blocks(i, levels[i][1], "local") for i in range(L - 1))
        self.merge = nn.ModuleList(nn.Linear(4 * widths[i], widths[i + 1], bias=False)
                                   for i in range(L - 1))
        self.mid = blocks(L - 1, levels[-1][1], "global")
        self.split = nn.ModuleList(nn.Linear(widths[i + 1], 4 * widths[i], bias=False)
                                   for i in range(L - 1))
        self.skip_f = nn.Parameter(torch.full((max(L - 1, 0),), 0.5))
        self.up = nn.ModuleList(blocks(i, levels[i][1], "local") for i in range(L - 1))
        self.norm = AdaRMSNorm(widths[0], d_cond)
        self.unembed = nn.Linear(widths[0], channels * patch * patch)
        nn.init.zeros_(self.unembed.weight)

    def forward(self, x, c_noise):
        b, c, H, W = x.shape
        unit = self.p * 2 ** (len(self.levels) - 1)
        if H % unit or W % unit:
            raise ValueError(f"H and W must be multiples of patch · 2^(levels − 1) = {unit}, "
                             f"got {H} x {W}")
        cond = self.cond(c_noise)  # (b, d_cond)
        t = self.embed(Fn.pixel_unshuffle(x, self.p).permute(0, 2, 3, 1))  # (b, H/p, W/p, d_0)
        skips = []
        for i, level in enumerate(self.down):
            for block in level:
                t = block(t, cond)
            skips.append(t)
            t = self.merge[i](merge_tokens(t))  # (b, n/2, n/2, d_{i+1})
        for block in self.mid:
            t = block(t, cond)
        for i in reversed(range(len(self.up))):
            t = split_tokens(self.split[i](t))  # (b, 2n, 2n, d_i)
            t = torch.lerp(skips[i], t, self.skip_f[i].to(t.dtype))  # learned skip interpolation
            for block in self.up[i]:
                t = block(t, cond)
        t = self.unembed(self.norm(t, cond)).permute(0, 3, 1, 2)  # (b, c·p², H/p, W/p)
        return Fn.pixel_shuffle(t, self.p)  # (b, c, H, W)

    def flops_by_level(self, image_size: int) -> list[dict[str, int]]:
        """FLOPs of one forward at image_size², per level (finest first): {"tokens", "linear",
        "attention"} (merge and split counted at the finer of the two levels they join)."""
        out = []
        L = len(self.levels)
        for i, (width, _) in enumerate(self.levels):
            n = image_size // self.p // 2**i
            T = n * n
            if i < L - 1:
                params = token_params(self.down[i]) + token_params(self.up[i])
                params += self.merge[i].weight.numel() / 4 + self.split[i].weight.numel() / 4
                K = level_kernel(self.kernel_size, n, n)
                attn = 4 * T * K * K * width * (len(self.down[i]) + len(self.up[i]))
            else:
                params = token_params(self.mid)
                attn = 4 * T * T * width * len(self.mid)
            if i == 0:
                params += self.embed.weight.numel() + self.unembed.weight.numel()
            out.append({"tokens": T, "linear": int(2 * T * params), "attention": int(attn)})
        return out

    def flops(self, image_size: int) -> int:
        return sum(v["linear"] + v["attention"] for v in self.flops_by_level(image_size))
