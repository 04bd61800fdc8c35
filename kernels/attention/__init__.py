"""Scaled dot-product attention, computed tile by tile with the online softmax (FlashAttention).

References: Vaswani et al., "Attention is all you need" (2017), section 3.2.1 (scaled
dot-product attention); Milakov & Gimelshein, "Online normalizer calculation for softmax"
(2018), algorithm 3; Dao et al., "FlashAttention" (2022), algorithm 1 (tiling, rescaling).

Glossary (code = paper): ``q, k, v`` = Q, K, V; ``scale`` = 1/sqrt(d_k) (``e`` = d_k here);
``s`` = the scores S = scale·QKᵀ; ``m`` = the running row max m(x); ``ssum`` = the running
normaliser ℓ(x) (the paper's l: ``l`` is a length here); ``acc`` = the unnormalised output Õ;
``lse`` = m + log ℓ, the log-sum-exp of a row. Shapes: ``b`` batch, ``h`` heads, ``lq``/``lk``
query and key lengths, ``e`` head dim; the kernels see ``(r, l, e)`` with ``r = b·h`` heads.

    out_i = Σ_j softmax_j(s_ij) v_j,   s_ij = scale · q_i·k_j,   lse_i = log Σ_j exp(s_ij)

over the keys j that query i may see: all of them, or with ``causal=True`` those with
j ≤ i + (lk - lq) (bottom-right aligned, as FlashAttention: the last query sees every key).

The online softmax: after a tile of keys J with scores s_J, a row's state (m, ℓ, Õ) becomes

    m' = max(m, max_J s),   ℓ' = e^(m - m') ℓ + Σ_J e^(s_J - m'),
    Õ' = e^(m - m') Õ + Σ_J e^(s_J - m') v_J,          and at the end out = Õ / ℓ.

Non-finite scores give what the definition gives (``attention_ref``) on every backend: a row
whose visible scores are all -inf has out = nan and lse = -inf, a +inf score gives out = nan
and lse = +inf (nan on the kernels if the row also has a nan score), a nan score nan. A
non-finite value v_j at a key hidden from query i (causal) is unspecified for row i: ref and the
kernels' diagonal tile multiply it by the weight 0 (0·inf = nan), while key tiles a query tile
never sees are not read at all (its output keeps the value without v_j, as causality requires).

Backward (Dao, "FlashAttention-2" (2023), algorithm 2; Dao et al. (2022), algorithm 4):
``attention`` with the ``cpu``/``cuda`` backend is a ``torch.autograd.Function`` that keeps q,
k, v, out and lse, and whose backward kernels recompute the scores tile by tile from lse, never
holding an (lq, lk) array (memory O((lq + lk)·e), as in the forward). With dO = ∂L/∂out and
dlse = ∂L/∂lse (zero unless the caller uses lse):

    P_ij = e^(s_ij - lse_i),   D_i = dO_i·out_i - dlse_i,   dP_ij = dO_i·v_j,
    dS_ij = P_ij (dP_ij - D_i),
    dv_j = Σ_i P_ij dO_i,   dq_i = scale · Σ_j dS_ij k_j,   dk_j = scale · Σ_i dS_ij q_i

(∂lse_i/∂s_ij = P_ij, so dlse only shifts D). Non-finite scores: where ref's autograd has a
nan gradient the kernels have nan or inf there too, except that a hidden (causal) key gets 0 from
a row with lse = -inf where ref's dv gets nan (0 · nan through the mask).

Two partial results over disjoint sets of keys merge into the whole by their log-sum-exps:
``merge_attention`` (blockwise and ring attention).

Layout: ``ref.py`` the reference (the definition), the causal mask and ``merge_attention``;
``cpu.py`` the Numba loops (forward, backward); ``cuda.py`` the numba.cuda kernels and their
launchers; this file: the autograd Function, the public entry and ``example_inputs``.
"""

from __future__ import annotations

import math

import torch

from minimodels.backend import dispatch, expect_tensor
from minimodels.kernels._common import Example, randn
from minimodels.kernels.attention.cpu import BLOCK_K, BLOCK_Q, _bwd_cpu, _fwd_cpu
from minimodels.kernels.attention.cuda import _bwd_cuda, _fwd_cuda
from minimodels.kernels.attention.ref import attention_ref, causal_mask, merge_attention

__all__ = ["attention", "attention_ref", "attention_cpu", "attention_cuda", "IMPLS",
           "causal_mask", "merge_attention", "example_inputs", "BLOCK_Q", "BLOCK_K"]

# =============================================================================================
# Constants
# =============================================================================================

# example_inputs: the CPU benchmark's size (b, h, l, e), non-causal
EXAMPLE_SHAPE = (1, 8, 4096, 64)
TOLERANCES = {torch.float32: (2e-6, 2e-6), torch.float64: (1e-12, 1e-12)}  # (rtol, atol)


# =============================================================================================
# Autograd: forward and backward are kernels (FlashAttention-2's backward)
# =============================================================================================


class _Attention(torch.autograd.Function):
    """Forward and backward by tiled kernels; autograd keeps q, k, v, out and lse (O(l·e)), and
    whatever else ``fwd`` returns after them (the CPU kernel: a byte per row, its one-hot flag),
    which ``bwd`` gets after its other arguments."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, fwd, bwd):
        b, h, lq, e = q.shape
        lk = k.shape[2]
        rows = b * h
        q_r = q.contiguous().view(rows, lq, e)  # (r, lq, e)
        k_r = k.contiguous().view(rows, lk, e)  # (r, lk, e)
        v_r = v.contiguous().view(rows, lk, e)
        if q.numel():
            out, lse, *extra = fwd(q_r, k_r, v_r, causal, scale)
        else:
            out, lse, extra = torch.empty_like(q_r), q_r.new_empty(q_r.shape[:2]), []
        out, lse = out.view(b, h, lq, e), lse.view(b, h, lq)
        ctx.save_for_backward(q_r, k_r, v_r, out, lse, *extra)
        ctx.causal, ctx.scale, ctx.bwd = causal, scale, bwd
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, out, lse, *extra = ctx.saved_tensors
        rows, lq, e = q.shape
        b, h = out.shape[:2]
        if not q.numel():
            return (q.new_zeros(b, h, lq, e), k.new_zeros(b, h, *k.shape[1:]),
                    v.new_zeros(b, h, *v.shape[1:]), None, None, None, None)
        g_out = g_out.contiguous().view(rows, lq, e)  # (r, lq, e)
        g_lse = g_lse.contiguous().view(rows, lq)  # (r, lq)
        dq, dk, dv = ctx.bwd(q, k, v, out.view(rows, lq, e), lse.view(rows, lq), g_out, g_lse,
                             ctx.causal, ctx.scale, *extra)
        return (dq.view(b, h, lq, e), dk.view(b, h, *k.shape[1:]), dv.view(b, h, *v.shape[1:]),
                None, None, None, None)


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_cpu(q, k, v, causal=False, scale=None, return_lse=False):
    """Numba CPU kernel, parallel over heads × query tiles. Same contract as ``attention_ref``."""
    out, lse = _Attention.apply(q, k, v, causal, _scale(q, scale), _fwd_cpu, _bwd_cpu)
    return (out, lse) if return_lse else out


def attention_cuda(q, k, v, causal=False, scale=None, return_lse=False):
    """numba.cuda kernel (or the CUDA simulator). Same contract as ``attention_ref``."""
    out, lse = _Attention.apply(q, k, v, causal, _scale(q, scale), _fwd_cuda, _bwd_cuda)
    return (out, lse) if return_lse else out


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": attention_ref, "cpu": attention_cpu, "cuda": attention_cuda}


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, backend=None):
    """Scaled dot-product attention softmax(scale · q kᵀ) v without forming the scores.

    Args:
        q: (b, h, lq, e) queries; k, v: (b, h, lk, e) keys and values; float32 or float64,
            one dtype and device; e >= 1.
        causal: if True, query i sees key j only when j ≤ i + (lk - lq) (bottom-right
            aligned, as FlashAttention; equal to SDPA's ``is_causal`` when lq == lk).
            Needs lq ≤ lk.
        scale: multiplies the scores; default 1 / sqrt(e).
        return_lse: also return lse = log Σ_j exp(s_ij) over the visible keys, (b, h, lq).
        backend: "ref", "cpu", "cuda", a callable with this signature, or None to choose from
            the tensors' device (see ``minimodels.backend.resolve``).

    Returns:
        out (b, h, lq, e) in the dtype of q, or (out, lse) with ``return_lse``. Differentiable
        on every backend (the kernels' backward: FlashAttention-2's, tile by tile).
    """
    expect_tensor("q", q, "b, h, lq, e")
    expect_tensor("k", k, "b, h, lk, e", dtypes=(q.dtype,))
    expect_tensor("v", v, "b, h, lk, e", dtypes=(q.dtype,), shape=k.shape)
    b, h, lq, e = q.shape
    if e == 0:  # no features to compare: the scores, the default scale 1/sqrt(e) are undefined
        raise ValueError(f"q must have a head dimension e >= 1 (its last dimension), got shape "
                         f"{tuple(q.shape)}")
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, e):
        raise ValueError(
            f"k must have shape (b, h, lk, e) with b, h, e = {(b, h, e)} from q, got "
            f"{tuple(k.shape)}"
        )
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one key (lk >= 1)")
    if causal and lq > k.shape[2]:
        raise ValueError(
            f"causal attention needs lq <= lk (bottom-right aligned mask), got lq={lq}, "
            f"lk={k.shape[2]}"
        )
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    return dispatch(IMPLS, q, k, v, causal=causal, scale=scale, return_lse=return_lse,
                    backend=backend)


def example_inputs(shape=None, *, dtype=torch.float32, device="cpu", seed=0) -> Example:
    """The canonical inputs of ``attention``: ``Example(args=(q, k, v), kwargs={"causal": False})``.

    shape: (b, h, l, e) with as many keys as queries, or (b, h, lq, lk, e); default
    (1, 8, 4096, 64) (the CPU benchmark's). q (b, h, lq, e), k and v (b, h, lk, e) ~ N(0, 1),
    drawn in float64 on the CPU from ``seed``, then cast to ``dtype`` and moved to ``device``
    (the same values for every dtype and device). rtol = atol = 2e-6 in float32, 1e-12 in
    float64 (against a float64 truth)."""
    shape = EXAMPLE_SHAPE if shape is None else tuple(shape)
    if len(shape) == 4:
        b, h, lq, e = shape
        lk = lq
    else:
        b, h, lq, lk, e = shape
    g = torch.Generator().manual_seed(seed)
    q = randn(g, b, h, lq, e)  # (b, h, lq, e)
    k = randn(g, b, h, lk, e)  # (b, h, lk, e)
    v = randn(g, b, h, lk, e)
    rtol, atol = TOLERANCES[dtype]
    return Example(args=tuple(x.to(dtype=dtype, device=device) for x in (q, k, v)),
                   kwargs={"causal": False}, rtol=rtol, atol=atol,
                   sizes={"batch": b, "n_heads": h, "seqlen": lq, "seqlen_k": lk, "d_head": e})
