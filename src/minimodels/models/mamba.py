"""Mamba: the selective SSM block and a tiny language model built from it.

References: Gu & Dao, "Mamba: linear-time sequence modeling with selective state spaces" (2023),
section 3.2 and Algorithm 2 (selection: Δ, B, C computed from the input), section 3.4 and
figure 3 (the block: input projection, causal depthwise convolution, SiLU, selective SSM, gate,
output projection), section 3.6 (initialisation: S4D-real A, Δ in [dt_min, dt_max]).

Glossary (code = paper): ``d_inner`` = E·D (expand × d_model), ``dt_rank`` = R (the rank of the
projection producing Δ), ``A_log`` stores log(−A) so that A = −exp(A_log) stays negative,
``u`` = the SSM's input x of the paper, ``x`` = its state h. Shapes: ``b`` batch, ``l`` length,
``d`` d_model, ``e`` d_inner, ``n`` d_state, ``r`` dt_rank, ``k`` d_conv.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minimodels.kernels.selective_scan import selective_scan
from minimodels.nn import RMSNorm, generate_greedy

__all__ = ["MambaBlock", "MambaLM", "ResidualBlock"]


class MambaBlock(nn.Module):
    """The Mamba mixer (paper figure 3), a sequence layer: (b, l, d) -> (b, l, d).

        [u, z] = W_in x                        (b, l, 2e)
        u = silu(causal depthwise conv_k(u))    (b, l, e)
        [δ, B, C] = W_x u                       δ: (b, l, r), B, C: (b, l, n)
        Δ = softplus(W_dt δ + b_dt)             (b, l, e)
        y = selective_scan(u, Δ, A, B, C, D) · silu(z)   (b, l, e)
        out = W_out y                           (b, l, d)

    ``forward`` runs the selective-scan kernel (``backend``: see ``minimodels.backend``);
    ``step(x_t, state)`` is the recurrent mode, with state = (the last k-1 conv inputs
    (b, e, k-1), the SSM state x (b, e, n)): constant size, whatever the length so far."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 backend=None):
        super().__init__()
        e = expand * d_model
        r = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.d_model, self.d_inner, self.d_state, self.d_conv, self.dt_rank = (
            d_model, e, d_state, d_conv, r)
        self.backend = backend
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        self.conv = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1)  # depthwise
        self.x_proj = nn.Linear(e, r + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        # Δ = softplus(b_dt) starts log-uniform in [dt_min, dt_max]: b_dt = softplus⁻¹(Δ)
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(e, 1)  # S4D-real: −(1..n)
        self.A_log = nn.Parameter(torch.log(A))  # (e, n)
        self.D = nn.Parameter(torch.ones(e))  # (e,)
        self.out_proj = nn.Linear(e, d_model, bias=False)

    @property
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log)  # (e, n), negative: a decaying state

    def _select(self, u):
        """Δ (before bias and softplus), B, C from u (..., e) -> (..., e), (..., n), (..., n)."""
        delta, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return delta @ self.dt_proj.weight.T, B, C  # (..., e), (..., n), (..., n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, e) each
        u = F.silu(self.conv(u.transpose(1, 2))[..., :l])  # (b, e, l): causal (left padding)
        delta, B, C = self._select(u.transpose(1, 2))  # (b, l, e), (b, l, n), (b, l, n)
        y = selective_scan(
            u, delta.transpose(1, 2), self.A, B.transpose(1, 2), C.transpose(1, 2), self.D,
            z.transpose(1, 2), delta_bias=self.dt_proj.bias, delta_softplus=True,
            backend=self.backend,
        )  # (b, e, l)
        return self.out_proj(y.transpose(1, 2))  # (b, l, d)

    def step(self, x_t: torch.Tensor, state=None):
        """x_t: (b, d) -> (y_t (b, d), state); state = (window (b, e, k-1), x (b, e, n))."""
        u, z = self.in_proj(x_t).chunk(2, dim=-1)  # (b, e) each
        if state is None:
            window = u.new_zeros(u.shape + (self.d_conv - 1,))  # (b, e, k-1)
            x = u.new_zeros(u.shape + (self.d_state,))  # (b, e, n)
        else:
            window, x = state
        window = torch.cat([window, u[..., None]], dim=-1)  # (b, e, k)
        u = F.silu((window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)  # (b, e)
        delta, B, C = self._select(u)  # (b, e), (b, n), (b, n)
        delta = F.softplus(delta + self.dt_proj.bias)[..., None]  # Δ: (b, e, 1)
        x = torch.exp(delta * self.A) * x + delta * B[:, None] * u[..., None]  # (b, e, n)
        y = (x * C[:, None]).sum(-1) + self.D * u  # (b, e)
        y = y * F.silu(z)
        return self.out_proj(y), (window[..., 1:], x)


class ResidualBlock(nn.Module):
    """x + mixer(RMSNorm(x)), with the same forward / step contract as its mixer."""

    def __init__(self, d_model: int, mixer: nn.Module):
        super().__init__()
        self.norm, self.mixer = RMSNorm(d_model), mixer

    def forward(self, x):
        return x + self.mixer(self.norm(x))  # (b, l, d)

    def step(self, x_t, state=None):
        y, state = self.mixer.step(self.norm(x_t), state)
        return x_t + y, state


class MambaLM(nn.Module):
    """Token embedding, ``n_layers`` residual Mamba blocks, RMSNorm, a linear head (tied to the
    embedding, as in the paper's language models). No positional encoding: the recurrence knows
    the order.

    forward: tokens (b, l) int64 -> logits (b, l, vocab). step: token (b,), state -> (logits
    (b, vocab), state), state = [each block's state]: constant size. ``mixer(d_model)`` swaps
    the Mamba block for another sequence layer (say chapter 04's S4D) in the same skeleton."""

    def __init__(self, vocab: int, d_model: int = 32, n_layers: int = 2, d_state: int = 16,
                 mixer: Callable[[int], nn.Module] | None = None, backend=None):
        super().__init__()
        make = mixer or (lambda d: MambaBlock(d, d_state=d_state, backend=backend))
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(ResidualBlock(d_model, make(d_model)) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (b, l, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (b, l, vocab)

    def step(self, token: torch.Tensor, state=None):
        states = [None] * len(self.blocks) if state is None else state
        x = self.embed(token)  # (b, d)
        new = []
        for block, s in zip(self.blocks, states, strict=True):
            x, s = block.step(x, s)
            new.append(s)
        return self.head(self.norm(x)), new

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
        """Greedy continuation of prompt (b, l0) by n_new tokens -> (b, l0 + n_new), one
        ``step`` per token with a constant-size state."""
        return generate_greedy(self.step, prompt, n_new)
