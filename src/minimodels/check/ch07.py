"""Checkers for chapter 07 (Hyena): the causal FFT convolution with a short filter and a skip,
the implicit filter, and the order-2 Hyena recurrence.

Each keeps its list of typical mistakes beside it (``_conv_mistakes``, ``_filter_mistakes``,
``_recurrence_mistakes``) and names the one it recognises: the circular wrap-around (no
padding, or one sample too little), the filter reversed in time, the skip D forgotten, the
window's time not divided by l_max, the window growing instead of decaying, a gate applied
before instead of after its convolution, the gates or the filters swapped."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from minimodels.check import Case, Mistake, Verdict, check_function
from minimodels.kernels.long_conv import causal_conv_ref

__all__ = ["causal_conv_fft", "hyena_recurrence", "implicit_filter"]


def _rand(g, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# =============================================================================================
# Exercise 7.1: the causal FFT convolution with a short filter and a skip
# =============================================================================================


def _fft_conv(u, k, D, *, n=None, flip=False, skip=True):
    """y = k * u + D u by FFTs of length n (default l + lk − 1: exact), with switches for the
    typical mistakes. u (b, h, l), k (h, lk), D (h,)."""
    l, lk = u.shape[-1], k.shape[-1]
    n = l + lk - 1 if n is None else n
    k = k.flip(-1) if flip else k
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :l]
    return y + D[:, None] * u if skip else y


def _conv_cases() -> list[Case]:
    g = torch.Generator().manual_seed(71)
    return [Case("u (1, 1, 8), k (1, 8): a filter as long as u", (_rand(g, 1, 1, 8),
                                                                  _rand(g, 1, 8), _rand(g, 1))),
            Case("u (2, 3, 20), k (3, 5): a short filter", (_rand(g, 2, 3, 20), _rand(g, 3, 5),
                                                          _rand(g, 3))),
            Case("u (1, 2, 1), k (2, 1): one step", (_rand(g, 1, 2, 1), _rand(g, 2, 1),
                                                     _rand(g, 2))),
            Case("u (2, 2, 17) float32, k (2, 9)",
                 (_rand(g, 2, 2, 17, dtype=torch.float32), _rand(g, 2, 9, dtype=torch.float32),
                  _rand(g, 2, dtype=torch.float32)))]


def _conv_mistakes() -> list[Mistake]:
    return [
        Mistake("this is the circular convolution: an FFT of length l wraps the filter's tail "
                "onto the first outputs. Zero-pad u and k to n >= l + lk − 1, keep the first l.",
                lambda u, k, D: _fft_conv(u, k, D, n=u.shape[-1])),
        Mistake("one sample of wrap-around: n = l + lk − 2 is one too short; the linear "
                "convolution has l + lk − 1 outputs, so n >= l + lk − 1.",
                lambda u, k, D: _fft_conv(u, k, D, n=max(u.shape[-1] + k.shape[-1] - 2, 1))),
        Mistake("the filter is reversed in time: y_t = Σ_j k_j u_{t−j} applies k_0 to the "
                "current input (a convolution, not F.conv1d's cross-correlation).",
                lambda u, k, D: _fft_conv(u, k, D, flip=True)),
        Mistake("the skip term is missing: add D·u_t (D per channel: D[:, None] * u).",
                lambda u, k, D: _fft_conv(u, k, D, skip=False)),
    ]


def causal_conv_fft(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 7.1: ``fn(u, k, D) -> y``, y_t = Σ_{j=0}^{min(t, lk−1)} k_j u_{t−j} + D u_t,
    through torch.fft. u: (b, h, l); k: (h, lk); D: (h,) -> y: (b, h, l), u's dtype."""
    return check_function("7.1", fn, _conv_cases(), lambda u, k, D: causal_conv_ref(u, k, D),
                          _conv_mistakes(), atol=1e-4, rtol=1e-4, strict=strict)


# =============================================================================================
# Exercise 7.2: the implicit filter h_t = window(t) · FFN(z_t)
# =============================================================================================


def _filter(l, ffn, alpha, l_max, bands, *, scale=True, reverse=False, window=True, grow=False):
    """h (c, l) from the positional encoding, with switches for the typical mistakes."""
    t = torch.arange(l, dtype=torch.float64)[:, None]  # (l, 1)
    tn = t / l_max if scale else t
    f = torch.arange(1, bands + 1, dtype=torch.float64)[None]  # (1, bands)
    z = torch.cat([t / l_max, torch.cos(2 * math.pi * f * t / l_max),
                   torch.sin(2 * math.pi * f * t / l_max)], -1)  # (l, 1 + 2·bands)
    h = ffn(z).T  # (c, l)
    if window:
        w = torch.exp((1 if grow else -1) * alpha[:, None] * tn.T)  # (c, l)
        h = h * w
    return h.flip(-1) if reverse else h


def _ffn(seed, e, c):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(e, 8), nn.Linear(8, c, bias=False)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return lambda z: net(z).detach()


def _filter_cases() -> list[Case]:
    return [Case("l = 6, 2 channels, l_max = 8, 1 band",
                 (6, _ffn(1, 3, 2), torch.tensor([1.0, 4.0], dtype=torch.float64), 8, 1)),
            Case("l = 1, 1 channel, l_max = 4, 2 bands",
                 (1, _ffn(2, 5, 1), torch.tensor([2.0], dtype=torch.float64), 4, 2)),
            Case("l = 16, 3 channels, l_max = 16, 2 bands",
                 (16, _ffn(3, 5, 3), torch.tensor([0.5, 3.0, 9.0], dtype=torch.float64), 16, 2))]


def _filter_mistakes() -> list[Mistake]:
    return [
        Mistake("the window's time is not divided by l_max: the decay is e^{−α t / l_max}, so "
                "α says how many e-foldings happen over l_max positions.",
                lambda *a: _filter(*a, scale=False)),
        Mistake("the filter is reversed in time: h[:, 0] is the tap applied to the current "
                "input and must be where the window is 1.", lambda *a: _filter(*a, reverse=True)),
        Mistake("the window is missing: multiply the FFN's output by e^{−α_c t / l_max}.",
                lambda *a: _filter(*a, window=False)),
        Mistake("the window grows: the exponent is −α t / l_max (a decay), not +α t / l_max.",
                lambda *a: _filter(*a, grow=True)),
    ]


def implicit_filter(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 7.2: ``fn(l, ffn, alpha, l_max, bands) -> h`` (c, l): z_t = [t/l_max,
    cos(2π f t/l_max), sin(2π f t/l_max) for f = 1..bands] (l, 1 + 2·bands);
    h = ffn(z)ᵀ ⊙ e^{−α_c t / l_max}. ``ffn`` maps (l, e) -> (l, c); alpha: (c,)."""
    return check_function("7.2", fn, _filter_cases(), _filter, _filter_mistakes(),
                          strict=strict)


# =============================================================================================
# Exercise 7.3: the order-2 Hyena recurrence
# =============================================================================================


def _hyena2(x1, x2, v, h, D, *, gate_first=False, swap_gates=False, swap_filters=False,
            skip=True):
    """z³ from z¹ = v: z^{n+1} = x^n ⊙ (h^n * z^n + D^n z^n), with switches for mistakes."""
    gates = (x2, x1) if swap_gates else (x1, x2)
    order = (1, 0) if swap_filters else (0, 1)
    z = v
    for x, n in zip(gates, order, strict=True):
        Dn = D[n] if skip else torch.zeros_like(D[n])
        if gate_first:
            z = causal_conv_ref(x * z, h[n], Dn)
        else:
            z = x * causal_conv_ref(z, h[n], Dn)
    return z


def _recurrence_cases() -> list[Case]:
    g = torch.Generator().manual_seed(73)

    def case(b, d, l):
        return (_rand(g, b, d, l), _rand(g, b, d, l), _rand(g, b, d, l), _rand(g, 2, d, l),
                _rand(g, 2, d))

    return [Case("b = 1, d = 1, l = 5", case(1, 1, 5)), Case("b = 2, d = 3, l = 12",
                                                              case(2, 3, 12)),
            Case("one step: l = 1", case(2, 2, 1))]


def _recurrence_mistakes() -> list[Mistake]:
    return [
        Mistake("each gate is applied before its convolution: the recurrence is z^{n+1} = "
                "x^n ⊙ (h^n * z^n + D^n z^n), the convolution first, then the gate.",
                lambda *a: _hyena2(*a, gate_first=True)),
        Mistake("the gates are swapped: x¹ gates the first convolution's output, x² the second's.",
                lambda *a: _hyena2(*a, swap_gates=True)),
        Mistake("the filters are swapped: h[0] (with D[0]) is the first convolution's, h[1] the "
                "second's.", lambda *a: _hyena2(*a, swap_filters=True)),
        Mistake("the skip terms D^n z^n are missing (causal_conv(z, h[n], D=D[n])).",
                lambda *a: _hyena2(*a, skip=False)),
    ]


def hyena_recurrence(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 7.3: ``fn(x1, x2, v, h, D) -> z3``: z¹ = v, z^{n+1} = x^n ⊙ (h^n * z^n +
    D^n z^n) for n = 1, 2. x1, x2, v: (b, d, l); h: (2, d, l); D: (2, d) -> z3 (b, d, l)."""
    return check_function("7.3", fn, _recurrence_cases(), _hyena2, _recurrence_mistakes(),
                          strict=strict)
