"""Shared layers: RMSNorm, the position-wise MLP of a transformer block, greedy generation.

References: Zhang & Sennrich, "Root mean square layer normalization" (2019); Vaswani et al.,
"Attention is all you need" (2017), section 3.3 (position-wise feed-forward networks).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "RMSNorm", "generate_greedy"]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight over the last axis. x: (..., d) -> (..., d)."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MLP(nn.Module):
    """FFN(x) = W2 gelu(W1 x): two matrices, d_ff = 4·d_model by default. (..., d) -> (..., d)."""

    def __init__(self, d_model: int, d_ff: int | None = None):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.W1 = nn.Linear(d_model, d_ff, bias=False)
        self.W2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W2(nn.functional.gelu(self.W1(x)))  # (..., d)


@torch.no_grad()
def generate_greedy(step, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy continuation of ``prompt`` (b, l0) by ``n_new`` tokens -> (b, l0 + n_new), one
    ``step(token (b,), state) -> (logits (b, vocab), state)`` per token: the prompt is read
    token by token, then each new token is the argmax of the last logits."""
    state, tokens = None, prompt
    for t in range(prompt.shape[1]):
        logits, state = step(prompt[:, t], state)
    for _ in range(n_new):
        nxt = logits.argmax(-1)  # (b,)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        logits, state = step(nxt, state)
    return tokens
