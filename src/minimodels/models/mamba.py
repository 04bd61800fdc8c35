"""Mamba: the selective SSM block (the ``"mamba"`` mixer of ``minimodels.models.LM``).

References: Gu & Dao, "Mamba: linear-time sequence modeling with selective state spaces" (2023),
section 3.2 and Algorithm 2 (selection: Δ, B, C computed from the input), section 3.4 and
figure 3 (the block: input projection, causal depthwise convolution, SiLU, selective SSM, gate,
output projection), section 3.6 (initialisation: S4D-real A, Δ in [dt_min, dt_max]).

Glossary (code = paper): ``d_inner`` = E·D (expand × d_model), ``dt_rank`` = R (the rank of the
projection producing Δ), ``A_log`` stores log(−A) so that A = −exp(A_log) stays negative,
``u`` = the SSM's input x of the paper, ``x`` = its state h. Shapes: ``b`` batch, ``l`` length,
``d`` d_model, ``c`` d_inner (the
channels the scan sees), ``n`` d_state, ``r`` dt_rank, ``k`` d_conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minimodels.kernels.selective_scan import selective_scan

__all__ = ["MambaBlock"]


class MambaBlock(nn.Module):
    """The Mamba mixer (paper figure 3), a sequence layer: (b, l, d) -> (b, l, d).

        [u, z] = W_in x                        (b, l, 2c)
        u = silu(causal depthwise conv_k(u))    (b, l, c)
        [δ, B, C] = W_x u                       δ: (b, l, r), B, C: (b, l, n)
        Δ = softplus(W_dt δ + b_dt)             (b, l, c)
        y = selective_scan(u, Δ, A, B, C, D) · silu(z)   (b, l, c)
        out = W_out y                           (b, l, d)

    ``forward`` runs the selective-scan kernel (its backend: ``minimodels.use_backend``);
    ``step(x_t, state)`` is the recurrent mode, with state = (the last k-1 conv inputs
    (b, c, k-1), the SSM state x (b, c, n)): constant size, whatever the length so far."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        c = expand * d_model
        r = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.d_model, self.d_inner, self.d_state, self.d_conv, self.dt_rank = (
            d_model, c, d_state, d_conv, r)
        self.in_proj = nn.Linear(d_model, 2 * c, bias=False)
        self.conv = nn.Conv1d(c, c, d_conv, groups=c, padding=d_conv - 1)  # depthwise
        self.x_proj = nn.Linear(c, r + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(r, c, bias=True)
        # Δ = softplus(b_dt) starts log-uniform in [dt_min, dt_max]: b_dt = softplus⁻¹(Δ)
        dt = torch.exp(torch.rand(c) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(c, 1)  # S4D-real: −(1..n)
        self.A_log = nn.Parameter(torch.log(A))  # (c, n)
        self.D = nn.Parameter(torch.ones(c))  # (c,)
        self.out_proj = nn.Linear(c, d_model, bias=False)

    @property
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log)  # (c, n), negative: a decaying state

    def _select(self, u):
        """Δ (before bias and softplus), B, C from u (..., c) -> (..., c), (..., n), (..., n)."""
        delta, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return delta @ self.dt_proj.weight.T, B, C  # (..., c), (..., n), (..., n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, c) each
        u = F.silu(self.conv(u.transpose(1, 2))[..., :l])  # (b, c, l): causal (left padding)
        delta, B, C = self._select(u.transpose(1, 2))  # (b, l, c), (b, l, n), (b, l, n)
        y = selective_scan(
            u, delta.transpose(1, 2), self.A, B.transpose(1, 2), C.transpose(1, 2), self.D,
            z.transpose(1, 2), delta_bias=self.dt_proj.bias, delta_softplus=True,
        )  # (b, c, l)
        return self.out_proj(y.transpose(1, 2))  # (b, l, d)

    def step(self, x_t: torch.Tensor, state=None):
        """x_t: (b, d) -> (y_t (b, d), state); state = (window (b, c, k-1), x (b, c, n))."""
        u, z = self.in_proj(x_t).chunk(2, dim=-1)  # (b, c) each
        if state is None:
            window = u.new_zeros(u.shape + (self.d_conv - 1,))  # (b, c, k-1)
            x = u.new_zeros(u.shape + (self.d_state,))  # (b, c, n)
        else:
            window, x = state
        window = torch.cat([window, u[..., None]], dim=-1)  # (b, c, k)
        u = F.silu((window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)  # (b, c)
        delta, B, C = self._select(u)  # (b, c), (b, n), (b, n)
        delta = F.softplus(delta + self.dt_proj.bias)[..., None]  # Δ: (b, c, 1)
        x = torch.exp(delta * self.A) * x + delta * B[:, None] * u[..., None]  # (b, c, n)
        y = (x * C[:, None]).sum(-1) + self.D * u  # (b, c)
        y = y * F.silu(z)
        return self.out_proj(y), (window[..., 1:], x)
