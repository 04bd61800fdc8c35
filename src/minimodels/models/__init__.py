"""The course's models: one ``LM`` (``base.py``) around interchangeable sequence mixers.

``MIXERS`` maps a name to ``factory(d_model, **options) -> nn.Module``, a sequence layer with
``forward(x (b, l, d))`` and ``step(x_t (b, d), state)`` (DESIGN §2.2). ``MLPS`` does the same for
the position-wise layer after a mixer, and ``FAMILY_MLP`` says which MLP a family uses when
``LM(mlp="auto")``. A chapter that adds a family adds its entries here, never another LM class.

    attention  multi-head attention with a KV cache (ch. 02)     n_heads, causal
    rwkv       RWKV-4 time-mix, the WKV kernel (ch. 03)           (its init depends on the layer)
    s4d        S4's block: S4D, GELU, a gated output (ch. 04)     d_state, dt_min, dt_max
    mamba      the Mamba block, the selective scan (ch. 05)       d_state, d_conv, expand
    m2         Monarch Mixer's gated long convolution, FFTs as     max_len, fft, nblocks
               Monarch products (ch. 06); its state is the input history
    hyena      the Hyena operator: implicit long filters and      l_max, order, filter_order
               gates (ch. 07); its state is the input history
               (StripedHyena: a list mixing "hyena" and "attention" with rope, n_kv_heads)
    lstm, gru  the gated RNNs (ch. 01), state width d_model       forget_bias (lstm), fused

MLPS: "mlp" (two dense matrices), "rwkv" (RWKV's channel-mix), "monarch" (M2's MLP: both
matrices Monarch, ``nblocks`` blocks), "moe" (a sparse mixture of MLP experts, Mixtral's top-k
routing: ``n_experts``, ``top_k``, ``d_ff``; ``models.moe.aux_loss`` and ``parameter_counts``).
``LM(mlp=...)`` also takes a list, one per layer (Jamba: ``["mlp", "moe"] * 2``).
"""

from __future__ import annotations

from minimodels.models.attention import MultiHeadAttention
from minimodels.models.base import LM, Residual, state_numel
from minimodels.models.hyena import hyena_mixer
from minimodels.models.mamba import MambaBlock
from minimodels.models.moe import MoE
from minimodels.models.monarch import M2Mixer, MonarchMLP
from minimodels.models.rnn import GRU, LSTM
from minimodels.models.rwkv import RWKVChannelMix, RWKVTimeMix
from minimodels.models.ssm import S4DBlock
from minimodels.nn import MLP

__all__ = ["FAMILY_MLP", "LM", "MIXERS", "MLPS", "Residual", "state_numel"]


def lstm_mixer(d_model: int, *, forget_bias: float | None = None, fused: bool = False) -> LSTM:
    """An LSTM layer of width d_model -> d_model (chapter 01), as a mixer (``fused``: torch's
    fused loop over the same weights)."""
    return LSTM(d_model, d_model, forget_bias=forget_bias, fused=fused)


def gru_mixer(d_model: int, *, fused: bool = False) -> GRU:
    """A GRU layer of width d_model -> d_model (chapter 01), as a mixer."""
    return GRU(d_model, d_model, fused=fused)


MIXERS = {
    "attention": MultiHeadAttention,
    "rwkv": RWKVTimeMix,
    "s4d": S4DBlock,
    "mamba": MambaBlock,
    "m2": M2Mixer,
    "hyena": hyena_mixer,
    "lstm": lstm_mixer,
    "gru": gru_mixer,
}

MLPS = {
    "mlp": MLP,
    "rwkv": RWKVChannelMix,
    "monarch": MonarchMLP,
    "moe": MoE,
}

FAMILY_MLP = {"attention": "mlp", "rwkv": "rwkv", "m2": "monarch", "hyena": "mlp"}
