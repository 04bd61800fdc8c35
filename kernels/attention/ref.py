"""Attention's reference (the definition, materialising the scores), its causal mask, and the
log-sum-exp merge of two partial results. The equations and the glossary: the package docstring
(kernels/attention/__init__.py).

References for ``merge_attention``: Milakov & Gimelshein, "Online normalizer calculation for
softmax" (2018), section 3 (two partial normalisers combine); Liu et al., "Ring attention with
blockwise transformers" (2023), section 3 (blocks of keys merged across devices).
"""

from __future__ import annotations

import math

import torch

from minimodels.backend import expect_tensor

__all__ = ["attention_ref", "causal_mask", "merge_attention"]


# =============================================================================================
# Reference (the definition; autograd differentiates it)
# =============================================================================================


def causal_mask(lq: int, lk: int, device=None) -> torch.Tensor:
    """(lq, lk) bool, True where query i may see key j: j ≤ i + (lk - lq) (bottom-right)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def attention_ref(q, k, v, causal=False, scale=None, return_lse=False):
    """softmax(scale · q kᵀ [+ mask]) v, materialising the (lq, lk) scores.

    q: (b, h, lq, e); k, v: (b, h, lk, e) -> out (b, h, lq, e) [, lse (b, h, lq)]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ k.transpose(-2, -1))  # (b, h, lq, lk)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # (b, h, lq)
    out = torch.exp(s - lse[..., None]) @ v  # (b, h, lq, e)
    return (out, lse) if return_lse else out


def merge_attention(out1, lse1, out2, lse2):
    """Attention over the union of two disjoint sets of keys, from the attention over each.

    out1, out2: (b, h, l, e) and lse1, lse2: (b, h, l), as ``attention(q, k_i, v_i,
    return_lse=True)`` returns them for the same queries q and the keys of part i, ->
    (out (b, h, l, e), lse (b, h, l)), the attention over both parts' keys:

        lse = log(e^lse1 + e^lse2),    out = e^(lse1 - lse) · out1 + e^(lse2 - lse) · out2

    The weights e^(lse_i - lse) lie in [0, 1] and sum to 1, so nothing overflows even for
    lse ~ 1e4. A part in which a row sees no key has lse = -inf there and weight 0 (its out must
    be finite, e.g. 0); a row that sees no key in either part gets out = 0, lse = -inf.
    Differentiable (plain PyTorch). Blockwise and ring attention merge partial results this way.
    """
    expect_tensor("out1", out1, "b, h, l, e")
    expect_tensor("out2", out2, "b, h, l, e", dtypes=(out1.dtype,), shape=out1.shape)
    for name, lse in (("lse1", lse1), ("lse2", lse2)):
        expect_tensor(name, lse, "b, h, l", dtypes=(out1.dtype,), shape=out1.shape[:-1])
    for name, x in (("out2", out2), ("lse1", lse1), ("lse2", lse2)):
        if x.device != out1.device:
            raise ValueError(f"{name} must be on {out1.device} like out1, got {x.device}")
    lse = torch.logaddexp(lse1, lse2)  # (b, h, l)
    # a row with no key in either part: lse = -inf, and lse_i - lse would be nan; weights 0
    finite = torch.where(lse == -math.inf, 0.0, lse)  # (b, h, l)
    w1 = torch.exp(lse1 - finite)[..., None]  # (b, h, l, 1)
    w2 = torch.exp(lse2 - finite)[..., None]
    return w1 * out1 + w2 * out2, lse  # (b, h, l, e), (b, h, l)
