"""Hyena: long implicit convolutions interleaved with element-wise gates (the ``"hyena"`` mixer).

References: Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon, Ré, "Hyena hierarchy:
towards larger convolutional language models" (ICML 2023), section 3.1 (the Hyena recurrence,
definition 3.1), section 3.3 (implicit filters: a positional encoding, an FFN with sine
activations, an exponential decay window), and its reference implementation's short depthwise
convolutions on the projections and filter bias D; Poli et al., "StripedHyena: moving beyond
transformers with hybrid signal processing models" (Together AI, 2023) (Hyena blocks striped
with grouped-query rotary attention: ``LM`` with a list of mixers).

Glossary (code = paper): ``x[n]`` = the gates x^n (n = 1..N, N = ``order``), ``v`` = the value
projection, ``z`` = the recurrence's z^n, ``h`` = the long filters h^n (``HyenaFilter``),
``D`` = the filters' bias (the skip of each convolution), ``short`` = the short depthwise
convolution on the projections. Shapes: ``b`` batch, ``l`` length, ``d`` d_model, ``N`` order,
``e`` the positional encoding's width, ``f`` the FFN's width (``filter_order``).

    (x¹, …, x^N, v) = short(W_in u)          each (b, l, d)
    z¹ = v;   z^{n+1}_t = x^n_t · ((h^n * z^n)_t + D^n·z^n_t),   n = 1..N
    y = W_out z^{N+1}
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minimodels.backend import expect_tensor
from minimodels.kernels.long_conv import causal_conv

__all__ = ["HyenaFilter", "HyenaOperator", "Sin", "positional_encoding"]


def positional_encoding(l: int, bands: int, l_max: int, *, dtype=torch.float32,
                        device=None) -> torch.Tensor:
    """z_t = [t / l_max, cos(2π f_1 t / l_max), sin(2π f_1 t / l_max), …] for the frequencies
    f_k = 1..bands: (l, e) with e = 1 + 2·bands. Position t is the same row at any length."""
    t = torch.arange(l, dtype=dtype, device=device)[:, None] / l_max  # (l, 1)
    f = torch.arange(1, bands + 1, dtype=dtype, device=device)[None]  # (1, bands)
    return torch.cat([t, torch.cos(2 * math.pi * f * t), torch.sin(2 * math.pi * f * t)], -1)


class Sin(nn.Module):
    """sin(ω ⊙ x) with a learned frequency per feature, initialised to ``freq``: the FFN's
    activation, which lets a small network draw filters with high frequencies."""

    def __init__(self, width: int, freq: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((width,), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """An implicit long filter: h_t = window(t) ⊙ FFN(z_t) for every channel (paper §3.3).

    FFN: e -> f -> f -> channels with ``Sin`` activations (frequency ``freq``); the window
    e^{−α_c t / l_max} decays at a rate α_c per channel, spread log-evenly so that it falls to
    1% at a fraction ``reach`` = (fast, slow) of l_max, plus ``shift``. Parameters do not grow
    with the length: ``forward(l)`` evaluates any l <= l_max. -> h (channels, l)."""

    def __init__(self, channels: int, l_max: int, *, filter_order: int = 32, bands: int = 4,
                 freq: float = 1.0, reach: tuple[float, float] = (0.3, 1.5),
                 shift: float = 0.0):
        super().__init__()
        if not 0 < reach[0] <= reach[1]:
            raise ValueError(f"reach must be (fast, slow) with 0 < fast <= slow, got {reach}")
        self.channels, self.l_max, self.bands, self.shift = channels, l_max, bands, shift
        e = 1 + 2 * bands
        self.ffn = nn.Sequential(nn.Linear(e, filter_order), Sin(filter_order, freq),
                                 nn.Linear(filter_order, filter_order), Sin(filter_order, freq),
                                 nn.Linear(filter_order, channels, bias=False))
        alpha = -math.log(1e-2) / torch.tensor(reach, dtype=torch.float64)  # falls to 1% there
        self.register_buffer("alpha", torch.exp(torch.linspace(
            math.log(alpha[1]), math.log(alpha[0]), channels)).float())  # (channels,) slow..fast

    def window(self, l: int) -> torch.Tensor:
        """e^{−α_c t / l_max} + shift: (channels, l)."""
        t = torch.arange(l, dtype=self.alpha.dtype, device=self.alpha.device) / self.l_max
        return torch.exp(-self.alpha[:, None] * t) + self.shift

    def forward(self, l: int) -> torch.Tensor:
        if not 1 <= l <= self.l_max:
            raise ValueError(f"filter length l must be in [1, l_max = {self.l_max}], got {l}")
        w = self.ffn[0].weight
        z = positional_encoding(l, self.bands, self.l_max, dtype=w.dtype, device=w.device)
        h = self.ffn(z).T  # (channels, l)
        return h * self.window(l).to(h.dtype)  # (channels, l)


class HyenaOperator(nn.Module):
    """The Hyena operator of order N (paper definition 3.1), a sequence layer.

        (x¹ … x^N, v) = short(W_in u)            (b, d, l) each: N + 1 projections
        z = v;  for n = 1..N:  z = x^n ⊙ causal_conv(z, h^n, D^n)      (b, d, l)
        y = W_out z                               (b, l, d)

    The gates come *after* each convolution. ``forward`` uses ``causal_conv`` (the FFT for long
    filters, the direct loop for short ones; backend: ``minimodels.use_backend``). ``step(u_t,
    state)`` is the recurrent mode: state = (the short convolution's last inputs
    (b, (N+1)·d, s−1), the inputs of each long convolution so far, N x (b, d, t)): like a KV
    cache it grows with t, because a free-form filter of length l has no smaller state."""

    def __init__(self, d_model: int, l_max: int = 1024, order: int = 2, *,
                 filter_order: int = 32, short_filter: int = 3, freq: float = 1.0,
                 reach: tuple[float, float] = (0.3, 1.5)):
        super().__init__()
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.d_model, self.l_max, self.order, self.s = d_model, l_max, order, short_filter
        width = (order + 1) * d_model
        self.in_proj = nn.Linear(d_model, width)
        self.short = nn.Conv1d(width, width, short_filter, groups=width,
                               padding=short_filter - 1)  # depthwise, causal after cropping
        self.filter = HyenaFilter(order * d_model, l_max, filter_order=filter_order, freq=freq,
                                  reach=reach)
        self.D = nn.Parameter(torch.randn(order, d_model))  # (N, d): each filter's bias
        self.out_proj = nn.Linear(d_model, d_model)

    def filters(self, l: int) -> torch.Tensor:
        """h^1 … h^N: (N, d, l)."""
        return self.filter(l).view(self.order, self.d_model, l)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        expect_tensor("u", u, "b, l, d")
        l = u.shape[1]
        p = self.short(self.in_proj(u).transpose(1, 2))[..., :l]  # (b, (N+1)·d, l): causal
        *x, z = p.split(self.d_model, dim=1)  # N gates and v, (b, d, l) each
        h = self.filters(l).to(u.dtype)  # (N, d, l)
        # [core] hyena recurrence
        for n in range(self.order):  # z^{n+1} = x^n ⊙ (h^n * z^n + D^n z^n)
            z = x[n] * causal_conv(z, h[n], D=self.D[n].to(u.dtype))  # (b, d, l)
        # [/core]
        return self.out_proj(z.transpose(1, 2))  # (b, l, d)

    def step(self, u_t: torch.Tensor, state=None):
        """u_t (b, d) -> (y_t (b, d), state), state = (window, [history of z^n])."""
        expect_tensor("u_t", u_t, "b, d")
        p = self.in_proj(u_t)  # (b, (N+1)·d)
        if state is None:
            window = p.new_zeros(p.shape + (self.s - 1,))
            hist = [p.new_zeros(p.shape[0], self.d_model, 0) for _ in range(self.order)]
        else:
            window, hist = state
        window = torch.cat([window, p[..., None]], -1)  # (b, (N+1)·d, s)
        p = (window * self.short.weight[:, 0]).sum(-1) + self.short.bias  # (b, (N+1)·d)
        *x, z = p.split(self.d_model, dim=1)  # (b, d) each
        t = hist[0].shape[-1] + 1
        h = self.filters(t).to(u_t.dtype)  # (N, d, t)
        new = []
        for n in range(self.order):
            past = torch.cat([hist[n], z[..., None]], -1)  # (b, d, t): z^n_0 .. z^n_t
            new.append(past)
            conv = (past * h[n].flip(-1)).sum(-1) + self.D[n] * z  # Σ_j h_j z_{t−j} + D z_t
            z = x[n] * conv
        return self.out_proj(z), (window[..., 1:], new)


def hyena_mixer(d_model: int, *, l_max: int = 1024, order: int = 2, filter_order: int = 32,
                short_filter: int = 3) -> HyenaOperator:
    """``MIXERS["hyena"]``: a ``HyenaOperator`` (its options by name)."""
    return HyenaOperator(d_model, l_max, order, filter_order=filter_order,
                         short_filter=short_filter)


__all__ += ["hyena_mixer"]
