"""Checkers for chapter 08 (diffusion, HDiT, neighbourhood attention): the noising step and
the preconditioned denoiser loss, the clamped window starts, token merge and token split.

Each keeps its list of typical mistakes beside it (``_loss_mistakes``, ``_window_mistakes``,
``_merge_mistakes``, ``_split_mistakes``) and names the one it recognises: σ and σ² confused
(in the noise or the preconditioning), the clean image as the target, c_in or c_noise left
out; the window centred without clamping, clamped on one side only, or off by one at the
far border; a
merge by plain reshape or in channel-first order; a split that is not merge's inverse."""

from __future__ import annotations

from collections.abc import Callable

import torch

from minimodels.check import Case, Mistake, Verdict, check_function
from minimodels.models.hdit import merge_tokens as _merge_ref
from minimodels.models.hdit import split_tokens as _split_ref

__all__ = ["edm_loss", "merge_tokens", "split_tokens", "window_starts"]

SIGMA_DATA = 0.5


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# =============================================================================================
# Exercise 8.1: the noising step and the denoiser loss
# =============================================================================================


def toy_network(x, c_noise):
    """A fixed stand-in for the network F (no parameters), sensitive to its input's scale and to
    c_noise: F(x, c) = tanh(x) / 2 + c, c broadcast over (c, H, W)."""
    return torch.tanh(x) / 2 + c_noise.reshape(-1, *([1] * (x.dim() - 1)))


def _loss(F, x0, sigma, noise, *, noise_sq=False, c_in_var=False, c_out_sq=False,
          target_x0=False, no_c_in=False, c_noise_sigma=False):
    """EDM's loss with switches that reproduce typical mistakes."""
    sd = SIGMA_DATA
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
    x = x0 + (s**2 if noise_sq else s) * noise
    var = s**2 + sd**2
    c_skip = sd**2 / var
    c_out = (s**2 if c_out_sq else s) * sd / var.sqrt()
    c_in = 1 / var if c_in_var else 1 / var.sqrt()
    c_noise = sigma if c_noise_sigma else sigma.log() / 4
    out = F(x if no_c_in else c_in * x, c_noise)
    target = x0 if target_x0 else (x0 - c_skip * x) / c_out
    return (out - target).pow(2).mean()


def _loss_cases() -> list[Case]:
    g = torch.Generator().manual_seed(81)
    return [Case("one image (1, 1, 2, 2), σ = 0.3", (toy_network, _rand(g, 1, 1, 2, 2),
                                                      torch.tensor([0.3], dtype=torch.float64),
                                                      _rand(g, 1, 1, 2, 2))),
            Case("a batch (3, 2, 4, 4), σ = (0.05, 2, 30)",
                 (toy_network, _rand(g, 3, 2, 4, 4),
                  torch.tensor([0.05, 2.0, 30.0], dtype=torch.float64), _rand(g, 3, 2, 4, 4)))]


def _loss_mistakes() -> list[Mistake]:
    return [
        Mistake("the noise is scaled by σ²: σ is the noise's standard deviation, x_σ = x_0 + σ·n "
                "(σ² is its variance).", lambda *a: _loss(*a, noise_sq=True)),
        Mistake("c_in = 1/(σ² + σ_d²) is missing its square root: c_in = 1/√(σ² + σ_d²) makes "
                "the network's input unit-variance (σ and σ² confused).",
                lambda *a: _loss(*a, c_in_var=True)),
        Mistake("c_out uses σ² instead of σ: c_out = σ·σ_d/√(σ² + σ_d²).",
                lambda *a: _loss(*a, c_out_sq=True)),
        Mistake("the target is the clean image x_0: F's target is (x_0 − c_skip·x_σ)/c_out, the "
                "part of x_0 that the skip does not already give.",
                lambda *a: _loss(*a, target_x0=True)),
        Mistake("F got x_σ itself: feed it c_in·x_σ.", lambda *a: _loss(*a, no_c_in=True)),
        Mistake("F got σ as its noise level: feed it c_noise = ln(σ)/4.",
                lambda *a: _loss(*a, c_noise_sigma=True)),
    ]


def edm_loss(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 8.1: ``fn(F, x0, sigma, noise) -> loss`` (a scalar tensor): EDM's preconditioned
    denoiser loss with σ_d = 0.5. x0, noise: (b, c, H, W); sigma: (b,)."""
    return check_function("8.1", fn, _loss_cases(), _loss, _loss_mistakes(), atol=1e-9,
                          rtol=1e-9, strict=strict)


# =============================================================================================
# Exercise 8.2: the clamped window starts
# =============================================================================================


def _starts(n, kernel_size, *, clamp="both", top=None):
    i = torch.arange(n)
    s = i - kernel_size // 2
    if clamp == "none":
        return s
    if clamp == "low":
        return s.clamp(min=0)
    return s.clamp(0, (n - kernel_size) if top is None else top)


def _window_cases() -> list[Case]:
    # K = n first: there each mistake differs from the others (and from the right answer)
    return [Case("n = 5, kernel_size = 5", (5, 5)), Case("n = 7, kernel_size = 3", (7, 3)),
            Case("n = 4, kernel_size = 1", (4, 1)), Case("n = 12, kernel_size = 7", (12, 7))]


def _window_mistakes() -> list[Mistake]:
    return [
        Mistake("the window is centred without clamping: near the border its start is negative "
                "or its end passes n; NATTEN shifts it inside: clamp(i − K//2, 0, n − K).",
                lambda n, K: _starts(n, K, clamp="none")),
        Mistake("clamped at 0 only: at the far border the window must also be shifted back, "
                "start <= n − K, so that it keeps K keys (shifted, not truncated).",
                lambda n, K: _starts(n, K, clamp="low")),
        Mistake("off by one at the far border: the last start is n − K (the window then "
                "holds positions n − K .. n − 1), not n − K + 1.",
                lambda n, K: _starts(n, K, top=n - K + 1)),
    ]


def window_starts(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 8.2: ``fn(n, kernel_size) -> starts`` (int64, (n,)): the first row of each
    query's window along an axis of n, clamp(i − kernel_size//2, 0, n − kernel_size)."""
    return check_function("8.2", fn, _window_cases(), _starts, _window_mistakes(),
                          strict=strict)


# =============================================================================================
# Exercises 8.3 and 8.4: token merge and split
# =============================================================================================


def _merge_plain(x):
    b, H, W, d = x.shape
    return x.reshape(b, H // 2, W // 2, 4 * d)


def _merge_channels_first(x):
    b, H, W, d = x.shape
    x = x.reshape(b, H // 2, 2, W // 2, 2, d)  # (b, i, dy, j, dx, d)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, H // 2, W // 2, 4 * d)


def _merge_swapped(x):
    b, H, W, d = x.shape
    x = x.reshape(b, H // 2, 2, W // 2, 2, d)
    return x.permute(0, 1, 3, 4, 2, 5).reshape(b, H // 2, W // 2, 4 * d)  # dx before dy


def _split_swapped(x):
    b, H, W, d4 = x.shape
    x = x.reshape(b, H, W, 2, 2, d4 // 4)  # read as (dx, dy): not merge's inverse
    return x.permute(0, 1, 4, 2, 3, 5).reshape(b, 2 * H, 2 * W, d4 // 4)


def _split_plain(x):
    b, H, W, d4 = x.shape
    return x.reshape(b, 2 * H, 2 * W, d4 // 4)


def _merge_cases() -> list[Case]:
    g = torch.Generator().manual_seed(83)
    return [Case("x (1, 2, 2, 1)", (_rand(g, 1, 2, 2, 1),)),
            Case("x (2, 4, 6, 3)", (_rand(g, 2, 4, 6, 3),)),
            Case("x (1, 6, 2, 2)", (_rand(g, 1, 6, 2, 2),))]


def _merge_mistakes() -> list[Mistake]:
    return [
        Mistake("a plain reshape merges 4 consecutive tokens of one row (or parts of two rows), "
                "not a 2 x 2 square: reshape to (b, H/2, 2, W/2, 2, d) and bring the two 2s "
                "next to d.", _merge_plain),
        Mistake("the channels come out in (d, dy, dx) order: token (2i + dy, 2j + dx) goes to "
                "channels (2·dy + dx)·d .. (2·dy + dx + 1)·d, so d stays the last axis.",
                _merge_channels_first),
        Mistake("dy and dx are swapped: token (2i + dy, 2j + dx) goes to the block 2·dy + dx "
                "(the row offset first).", _merge_swapped),
    ]


def _split_cases() -> list[Case]:
    g = torch.Generator().manual_seed(84)
    return [Case("x (1, 1, 1, 4)", (_rand(g, 1, 1, 1, 4),)),
            Case("x (2, 2, 3, 12)", (_rand(g, 2, 2, 3, 12),)),
            Case("x (1, 3, 1, 8)", (_rand(g, 1, 3, 1, 8),))]


def _split_mistakes() -> list[Mistake]:
    hint = ("so split_tokens(merge_tokens(x)) does not give x back: the split must read the "
            "channel blocks in the order merge wrote them, block 2·dy + dx to token "
            "(2i + dy, 2j + dx).")
    return [Mistake("your split is not the inverse of the merge: it reads the blocks as "
                    "(dx, dy), " + hint, _split_swapped),
            Mistake("your split is not the inverse of the merge: a plain reshape spreads a "
                    "token's channels along a row, " + hint, _split_plain)]


def merge_tokens(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 8.3: ``fn(x) -> merged``: (b, H, W, d) -> (b, H/2, W/2, 4·d), the 2 x 2 tokens
    (2i + dy, 2j + dx) at channels (2·dy + dx)·d onwards."""
    return check_function("8.3", fn, _merge_cases(), _merge_ref, _merge_mistakes(),
                          strict=strict)


def split_tokens(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 8.4: ``fn(x) -> split``: (b, H, W, 4·d) -> (b, 2H, 2W, d), the inverse of
    ``merge_tokens``: split_tokens(merge_tokens(x)) == x."""
    return check_function("8.4", fn, _split_cases(), _split_ref, _split_mistakes(),
                          strict=strict)
