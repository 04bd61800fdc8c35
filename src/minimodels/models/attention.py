"""Multi-head attention with a KV cache (the ``"attention"`` mixer; ``minimodels.models.LM`` makes
it a transformer), and a cost model of where a transformer's FLOPs and bytes go.

References: Vaswani et al., "Attention is all you need" (2017), sections 3.2.2 (multi-head
attention) and 3.3; Xiong et al., "On layer normalization in the transformer architecture"
(2020) (pre-norm); Pope et al., "Efficiently scaling transformer inference" (2022), section 2
(the KV cache, FLOPs and memory of decoding); Su et al., "RoFormer: enhanced transformer with
rotary position embedding" (2021), section 3.4 (rope); Ainslie et al., "GQA: training
generalized multi-query transformer models from multi-head checkpoints" (2023) (n_kv_heads).

Glossary: ``Wq, Wk, Wv, Wo`` = W^Q, W^K, W^V, W^O; the KV cache is the pair (K, V) of
shape (b, h, t, e) holding every past token's keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minimodels.backend import expect_tensor
from minimodels.kernels.attention import attention

__all__ = ["AttentionCost", "MultiHeadAttention", "attention_cost", "rotary"]


def rotary(x: torch.Tensor, start: int = 0, base: float = 10000.0) -> torch.Tensor:
    """Rotary positions (RoPE, Su et al. 2021, section 3.4.2): the pair (x_i, x_{i+e/2}) of
    position p is rotated by the angle p·θ_i, θ_i = base^{−2i/e}, so q·k depends on positions
    only through their difference. x: (b, h, l, e) with e even, positions start .. start+l−1."""
    e = x.shape[-1]
    half = e // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / e)
    p = torch.arange(start, start + x.shape[-2], dtype=torch.float64, device=x.device)
    angle = (p[:, None] * theta).to(x.dtype)  # (l, e/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:]], -1)


class MultiHeadAttention(nn.Module):
    """MultiHead(x) = Concat(head_1..head_h) Wo, head_i = attention(x Wq_i, x Wk_i, x Wv_i).

    forward: x (b, l, d) -> (b, l, d). step: x_t (b, d), state = KV cache (K, V) each
    (b, h_kv, t, e) or None -> (y_t (b, d), (K', V') with t + 1 positions). With ``causal`` the
    step's query is the last of t + 1 positions and sees all of them: the bottom-right mask
    with lq = 1. The kernel's backend: ``minimodels.use_backend``.

    ``rope``: rotary positions on q and k (StripedHyena's, Llama's), so the model needs no
    learned positions. ``n_kv_heads``: grouped-query attention (Ainslie et al. 2023): h_kv
    key/value heads, each shared by h / h_kv query heads; the KV cache shrinks by h / h_kv."""

    def __init__(self, d_model: int, n_heads: int = 4, causal: bool = True, *,
                 rope: bool = False, n_kv_heads: int | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        if rope and self.d_head % 2:
            raise ValueError(f"rope rotates pairs: the head size d_model / n_heads must be "
                             f"even, got {self.d_head}")
        self.causal, self.rope, self.n_kv_heads = causal, rope, n_kv_heads
        self.Wq = nn.Linear(d_model, d_model, bias=False)
        self.Wk = nn.Linear(d_model, n_kv_heads * self.d_head, bias=False)
        self.Wv = nn.Linear(d_model, n_kv_heads * self.d_head, bias=False)
        self.Wo = nn.Linear(d_model, d_model, bias=False)

    def _heads(self, x, n):  # (b, l, n·e) -> (b, n, l, e)
        b, l, _ = x.shape
        return x.view(b, l, n, self.d_head).transpose(1, 2)

    def _qkv(self, x, start):
        q = self._heads(self.Wq(x), self.n_heads)  # (b, h, l, e)
        k = self._heads(self.Wk(x), self.n_kv_heads)  # (b, h_kv, l, e)
        v = self._heads(self.Wv(x), self.n_kv_heads)
        if self.rope:
            q, k = rotary(q, start), rotary(k, start)
        return q, k, v

    def _attend(self, q, k, v):
        group = self.n_heads // self.n_kv_heads  # query heads per key/value head
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (b, h, t, e)
        return attention(q, k, v, causal=self.causal)  # (b, h, lq, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_tensor("x", x, "b, l, d")
        b, l, d = x.shape
        y = self._attend(*self._qkv(x, 0))  # (b, h, l, e)
        return self.Wo(y.transpose(1, 2).reshape(b, l, d))  # (b, l, d)

    def step(self, x_t: torch.Tensor, state=None):
        expect_tensor("x_t", x_t, "b, d")
        t = 0 if state is None else state[0].shape[2]  # positions so far
        q, k, v = self._qkv(x_t[:, None], t)  # (b, h, 1, e), (b, h_kv, 1, e) x 2
        if state is not None:
            k = torch.cat([state[0], k], dim=2)  # (b, h_kv, t+1, e)
            v = torch.cat([state[1], v], dim=2)
        y = self._attend(q, k, v)  # (b, h, 1, e)
        return self.Wo(y.reshape(x_t.shape)), (k, v)


# =============================================================================================
# Cost model
# =============================================================================================


@dataclass(frozen=True)
class AttentionCost:
    """FLOPs and bytes of one forward pass, split between attention's token mixing (q kᵀ and
    p v: the part that grows with context) and the rest (the Wq, Wk, Wv, Wo projections and
    the MLP: fixed per token). Bytes: the weights read once, and the KV cache read (decode) or
    written (prefill)."""

    flops_attention: float
    flops_linear: float
    bytes_kv: float
    bytes_weights: float

    @property
    def attention_flop_share(self) -> float:
        return self.flops_attention / (self.flops_attention + self.flops_linear)

    @property
    def kv_byte_share(self) -> float:
        return self.bytes_kv / (self.bytes_kv + self.bytes_weights)


def attention_cost(d_model: int, context: int, *, n_layers: int = 32, d_ff: int | None = None,
                   batch: int = 1, mode: str = "decode", bytes_per_value: int = 2
                   ) -> AttentionCost:
    """Cost of a decoder-only transformer (multi-head attention, 2-matrix MLP of width d_ff,
    4·d_model by default; 7B-class: d_model=4096, n_layers=32) at a given context length.

    mode="decode": one new token per sequence with ``context`` tokens in the KV cache;
    mode="prefill": ``context`` tokens at once with a causal mask. A multiply-add is 2 FLOPs.

        per layer and token: linear 2·(4d² + 2·d·d_ff);  attention 2·2·t·d over t visible keys
        KV cache: 2·context·d values per layer and sequence; weights 4d² + 2·d·d_ff per layer.
    """
    if mode not in ("decode", "prefill"):
        raise ValueError(f"mode must be 'decode' or 'prefill', got {mode!r}")
    for name, value in [("d_model", d_model), ("context", context), ("n_layers", n_layers),
                        ("batch", batch)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    d, L = d_model, context
    d_ff = 4 * d if d_ff is None else d_ff
    weights = 4 * d * d + 2 * d * d_ff  # per layer
    tokens = 1 if mode == "decode" else L
    keys_seen = L if mode == "decode" else L * (L + 1) / 2  # Σ over the new tokens
    return AttentionCost(
        flops_attention=n_layers * batch * 4 * keys_seen * d,
        flops_linear=n_layers * batch * tokens * 2 * weights,
        bytes_kv=n_layers * batch * 2 * L * d * bytes_per_value,
        bytes_weights=n_layers * weights * bytes_per_value,
    )
