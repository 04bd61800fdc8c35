"""RWKV-4 and its ancestor, the attention-free transformer (AFT).

References: Zhai et al., "An attention free transformer" (2021), section 3.1 (AFT-full and
AFT-simple); Peng et al., "RWKV: Reinventing RNNs for the transformer era" (2023), sections 3
(token shift, time-mixing, channel-mixing: eqs. 11-17) and 4.1-4.2 (the recurrent mode).

Glossary (code = paper): ``mu_r, mu_k, mu_v`` = μ_r, μ_k, μ_v (the token-shift interpolation);
``Wr, Wk, Wv, Wo`` = W_r, W_k, W_v, W_o; ``time_decay`` = log w, so that w = e^{time_decay} ≥ 0
is the decay rate the WKV kernel takes; ``time_first`` = u (the bonus). The recurrent state of a
time-mix is (x_{t-1}, WKV state); of a channel-mix, x_{t-1}: its size never grows with t.
Shapes: ``b`` batch, ``l`` length, ``d`` width (= the WKV kernel's channels ``c``).
"""

from __future__ import annotations

import torch
from torch import nn

from minimodels.backend import expect_tensor
from minimodels.kernels.wkv import wkv

__all__ = ["RWKVChannelMix", "RWKVTimeMix", "aft_simple", "token_shift"]


def aft_simple(q, k, v, causal: bool = True):
    """AFT-simple: Y_t = σ(q_t) ⊙ Σ_i softmax_i(k)_i ⊙ v_i, per channel, over i ≤ t if causal.

    q, k, v: (b, l, d) -> (b, l, d). No query-key product: the weights a token gives its past
    depend on the keys only, and are the same for every query (up to the causal cut-off)."""
    if not causal:
        return torch.sigmoid(q) * (torch.softmax(k, dim=1) * v).sum(1, keepdim=True)
    m = k.amax(dim=1, keepdim=True)  # (b, 1, d): subtract the max so exp cannot overflow
    ek = torch.exp(k - m)  # (b, l, d)
    return torch.sigmoid(q) * torch.cumsum(ek * v, dim=1) / torch.cumsum(ek, dim=1)


def token_shift(x, mu, x_prev=None):
    """μ ⊙ x_t + (1 - μ) ⊙ x_{t-1} along the sequence (x_{-1} = x_prev, or zeros).

    x: (b, l, d); mu: (d,); x_prev: (b, d) or None -> (b, l, d)."""
    first = torch.zeros_like(x[:, :1]) if x_prev is None else x_prev[:, None]
    shifted = torch.cat([first, x[:, :-1]], dim=1)  # (b, l, d): x_{t-1}
    return mu * x + (1 - mu) * shifted


def _ratio(layer: int, n_layers: int) -> float:
    return 1.0 - layer / max(n_layers, 1)  # 1 for the first layer, towards 0 for the last


class RWKVTimeMix(nn.Module):
    """Time-mixing (the attention of RWKV):

        r_t = W_r (μ_r x_t + (1-μ_r) x_{t-1}),  likewise k_t (μ_k, W_k) and v_t (μ_v, W_v)
        o_t = W_o (σ(r_t) ⊙ wkv_t),  wkv_t = WKV(w, u, k, v)_t   (``minimodels.kernels.wkv``)

    forward: x (b, l, d) -> (b, l, d). step: x_t (b, d), state (x_{t-1} (b, d), WKV state
    (b, 3, d)) or None -> (y_t (b, d), state'). ``layer`` of ``n_layers`` sets the initial
    decays and shifts (deeper layers mix more of the present token)."""

    def __init__(self, d_model: int, layer: int = 0, n_layers: int = 1):
        super().__init__()
        self.d_model = d_model
        i = torch.arange(d_model) / max(d_model - 1, 1)  # 0..1 across channels
        ratio = _ratio(layer, n_layers)
        # RWKV's initialisation: decays spread from slow (w ≈ e^-5) to fast (w ≈ e^3) across
        # channels, so some channels remember long and others only the last few tokens
        self.time_decay = nn.Parameter(-5 + 8 * i ** (0.7 + 1.3 * (1 - ratio)))  # log w, (d,)
        zigzag = 0.5 * ((torch.arange(d_model) + 1) % 3 - 1)
        self.time_first = nn.Parameter(torch.full((d_model,), 0.3).log() + zigzag)  # u, (d,)
        self.mu_k = nn.Parameter(i ** ratio)
        self.mu_v = nn.Parameter(i ** ratio + 0.3 * (1 - ratio))
        self.mu_r = nn.Parameter(i ** (0.5 * ratio))
        self.Wk = nn.Linear(d_model, d_model, bias=False)
        self.Wv = nn.Linear(d_model, d_model, bias=False)
        self.Wr = nn.Linear(d_model, d_model, bias=False)
        self.Wo = nn.Linear(d_model, d_model, bias=False)

    @property
    def w(self) -> torch.Tensor:
        """The decay rates w = e^{time_decay} ≥ 0, (d,)."""
        return torch.exp(self.time_decay)

    def _rkv(self, x, x_prev=None):
        r = self.Wr(token_shift(x, self.mu_r, x_prev))  # (b, l, d)
        k = self.Wk(token_shift(x, self.mu_k, x_prev))
        v = self.Wv(token_shift(x, self.mu_v, x_prev))
        return r, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_tensor("x", x, "b, l, d")
        r, k, v = self._rkv(x)
        y = wkv(self.w, self.time_first, k, v)  # (b, l, d)
        return self.Wo(torch.sigmoid(r) * y)

    def step(self, x_t: torch.Tensor, state=None):
        expect_tensor("x_t", x_t, "b, d")
        x_prev, s = (None, None) if state is None else state
        r, k, v = self._rkv(x_t[:, None], x_prev)  # (b, 1, d)
        y, s = wkv(self.w, self.time_first, k, v, state=s, return_state=True)  # (b,1,d), (b,3,d)
        return self.Wo(torch.sigmoid(r) * y)[:, 0], (x_t, s)


class RWKVChannelMix(nn.Module):
    """Channel-mixing (the feed-forward of RWKV), with a token shift:

        r_t = W_r (μ_r x_t + (1-μ_r) x_{t-1}),  k_t = W_k (μ_k x_t + (1-μ_k) x_{t-1})
        o_t = σ(r_t) ⊙ W_v max(k_t, 0)²

    forward: x (b, l, d) -> (b, l, d). step: x_t (b, d), state x_{t-1} (b, d) or None."""

    def __init__(self, d_model: int, layer: int = 0, n_layers: int = 1,
                 d_ff: int | None = None):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        i = torch.arange(d_model) / max(d_model - 1, 1)
        ratio = _ratio(layer, n_layers)
        self.mu_k = nn.Parameter(i ** ratio)
        self.mu_r = nn.Parameter(i ** ratio)
        self.Wk = nn.Linear(d_model, d_ff, bias=False)
        self.Wv = nn.Linear(d_ff, d_model, bias=False)
        self.Wr = nn.Linear(d_model, d_model, bias=False)

    def _mix(self, x, x_prev=None):
        r = self.Wr(token_shift(x, self.mu_r, x_prev))  # (b, l, d)
        k = self.Wk(token_shift(x, self.mu_k, x_prev))  # (b, l, d_ff)
        return torch.sigmoid(r) * self.Wv(torch.relu(k) ** 2)  # (b, l, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_tensor("x", x, "b, l, d")
        return self._mix(x)

    def step(self, x_t: torch.Tensor, state=None):
        expect_tensor("x_t", x_t, "b, d")
        return self._mix(x_t[:, None], state)[:, 0], x_t
