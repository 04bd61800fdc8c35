"""Multi-head attention with a KV cache, a pre-norm transformer block, a tiny language model,
and a cost model of where a transformer's FLOPs and bytes go.

References: Vaswani et al., "Attention is all you need" (2017), sections 3.2.2 (multi-head
attention) and 3.3; Xiong et al., "On layer normalization in the transformer architecture"
(2020) (pre-norm); Pope et al., "Efficiently scaling transformer inference" (2022), section 2
(the KV cache, FLOPs and memory of decoding).

Glossary: ``Wq, Wk, Wv, Wo`` = W^Q, W^K, W^V, W^O; the KV cache is the pair (K, V) of
shape (b, h, t, e) holding every past token's keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minimodels.backend import expect_tensor
from minimodels.kernels.attention import attention
from minimodels.nn import MLP, RMSNorm, generate_greedy

__all__ = ["AttentionCost", "MultiHeadAttention", "TransformerBlock", "TransformerLM",
           "attention_cost"]


class MultiHeadAttention(nn.Module):
    """MultiHead(x) = Concat(head_1..head_h) Wo, head_i = attention(x Wq_i, x Wk_i, x Wv_i).

    forward: x (b, l, d) -> (b, l, d). step: x_t (b, d), state = KV cache (K, V) each
    (b, h, t, e) or None -> (y_t (b, d), (K', V') with t + 1 positions). With ``causal`` the
    step's query is the last of t + 1 positions and sees all of them: the bottom-right mask
    with lq = 1. ``backend`` is passed to ``minimodels.kernels.attention``."""

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, backend=None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.causal, self.backend = causal, backend
        self.Wq = nn.Linear(d_model, d_model, bias=False)
        self.Wk = nn.Linear(d_model, d_model, bias=False)
        self.Wv = nn.Linear(d_model, d_model, bias=False)
        self.Wo = nn.Linear(d_model, d_model, bias=False)

    def _heads(self, x):  # (b, l, d) -> (b, h, l, e)
        b, l, _ = x.shape
        return x.view(b, l, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect_tensor("x", x, "b, l, d")
        b, l, d = x.shape
        q, k, v = (self._heads(W(x)) for W in (self.Wq, self.Wk, self.Wv))  # (b, h, l, e)
        y = attention(q, k, v, causal=self.causal, backend=self.backend)  # (b, h, l, e)
        return self.Wo(y.transpose(1, 2).reshape(b, l, d))  # (b, l, d)

    def step(self, x_t: torch.Tensor, state=None):
        expect_tensor("x_t", x_t, "b, d")
        q, k, v = (self._heads(W(x_t)[:, None]) for W in (self.Wq, self.Wk, self.Wv))  # (b,h,1,e)
        if state is not None:
            k = torch.cat([state[0], k], dim=2)  # (b, h, t+1, e)
            v = torch.cat([state[1], v], dim=2)
        y = attention(q, k, v, causal=self.causal, backend=self.backend)  # (b, h, 1, e)
        return self.Wo(y.reshape(x_t.shape)), (k, v)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + MHA(RMSNorm(x)), then + MLP(RMSNorm(·)). Same forward/step contract
    as ``MultiHeadAttention`` (the state is its KV cache)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, causal=True,
                 backend=None):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, causal, backend)
        self.mlp = MLP(d_model, d_ff)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))  # (b, l, d)
        return x + self.mlp(self.norm2(x))

    def step(self, x_t, state=None):
        y, state = self.attn.step(self.norm1(x_t), state)  # (b, d)
        x_t = x_t + y
        return x_t + self.mlp(self.norm2(x_t)), state


class TransformerLM(nn.Module):
    """Token embedding + learned positions, ``n_layers`` causal blocks, RMSNorm, a linear head.

    forward: tokens (b, l) int64 -> logits (b, l, vocab). step: token (b,), state -> (logits
    (b, vocab), state) with state = (position, [KV cache of each block])."""

    def __init__(self, vocab: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 max_len: int = 512, backend=None):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, backend=backend) for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        l = tokens.shape[1]
        if l > self.max_len:
            raise ValueError(f"tokens has length {l} > max_len={self.max_len}")
        x = self.embed(tokens) + self.pos(torch.arange(l, device=tokens.device))  # (b, l, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (b, l, vocab)

    def step(self, token: torch.Tensor, state=None):
        t, caches = (0, [None] * len(self.blocks)) if state is None else state
        if t >= self.max_len:
            raise ValueError(f"position {t} >= max_len={self.max_len}")
        x = self.embed(token) + self.pos.weight[t]  # (b, d)
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.step(x, cache)
            new.append(cache)
        return self.head(self.norm(x)), (t + 1, new)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, use_cache: bool = True):
        """Greedy continuation of prompt (b, l0) by n_new tokens -> (b, l0 + n_new). With
        ``use_cache`` each new token costs one ``step``; without, a full forward pass."""
        if use_cache:
            return generate_greedy(self.step, prompt, n_new)
        tokens = prompt
        for _ in range(n_new):
            nxt = self(tokens)[:, -1].argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return tokens


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
