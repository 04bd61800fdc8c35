"""RWKV-4's WKV operator: a softmax over the past whose weights decay with distance.

References: Peng et al., "RWKV: Reinventing RNNs for the transformer era" (2023), sections 3.1
(the WKV operator, eq. 14), 4.1 (the recurrent form) and appendix (numerical stability);
Zhai et al., "An attention free transformer" (2021), section 3.1 (AFT, its ancestor).

    wkv_t = ( Σ_{i<t} e^{-(t-1-i)·w + k_i} · v_i  +  e^{u + k_t} · v_t )
          / ( Σ_{i<t} e^{-(t-1-i)·w + k_i}        +  e^{u + k_t} )

Glossary (code = paper): ``w`` = w (the per-channel decay rate, ≥ 0), ``u`` = u (the bonus of
the current token), ``k, v`` = k, v. Shapes: ``b`` batch, ``l`` length, ``c`` channels; tensors
are channels-last ``(b, l, c)`` as in RWKV's own code, so one (b, c) pair is one independent
recurrence.

Recurrent form in log space. The state is (a, b, p) with A = e^p·a = Σ_{i<t} e^{-(t-1-i)w+k_i} v_i
and B = e^p·b its denominator; p is a running maximum exponent, so no exp ever sees a positive
argument and nothing overflows even for |k| ≫ 88 in float32. At each step, with q = max(p, u+k_t):

    y_t = (e^{p-q} a + e^{u+k_t-q} v_t) / (e^{p-q} b + e^{u+k_t-q})                  (output)
    p' = max(p - w, k_t):  a ← e^{p-w-p'} a + e^{k_t-p'} v_t,  b ← e^{p-w-p'} b + e^{k_t-p'}

One of the two exps in each line is e^0 = 1, so a step costs two exps. The opaque state tensor
is ``(b, 3, c)`` = (a, b, p); it starts at (0, 0, -1e38).

Backward, with g_t = ∂L/∂y_t and D_t the denominator of y_t (α_{t,i} = e^{-(t-1-i)w+k_i}/D_t,
β_t = e^{u+k_t}/D_t):
    ∂L/∂v_i = g_i β_i + e^{k_i} S1_i,   ∂L/∂k_i = g_i β_i (v_i - y_i) + e^{k_i}(v_i S1_i - S2_i)
    S1_i = Σ_{t>i} e^{-(t-1-i)w} g_t / D_t,  S2_i = same with g_t y_t      (a reverse recurrence)
    ∂L/∂u = Σ g_t β_t (v_t - y_t),   ∂L/∂w = Σ_t g_t (A'_t - y_t B'_t) / D_t with A' = ∂A/∂w,
    A'_{t+1} = e^{-w}(A'_t - A_t)   (a forward recurrence; likewise B').
S1, S2 are kept in log space too (a scale o). The incoming ``state`` is treated as a constant.

Layout: ``ref.py`` the reference (the definition) and the empty state; ``cpu.py`` the Numba
loops; ``cuda.py`` the numba.cuda kernels and their launchers; this file: the autograd
Function, the public entry and ``example_inputs``.
"""

from __future__ import annotations

import torch

from minimodels.backend import dispatch, expect_tensor, resolve
from minimodels.kernels._common import Example, expect_out, randn
from minimodels.kernels.wkv.cpu import _bwd_cpu, _fwd_cpu
from minimodels.kernels.wkv.cuda import _bwd_cuda, _fwd_cuda
from minimodels.kernels.wkv.ref import MIN_LOG, wkv_ref, wkv_state0

__all__ = ["wkv", "wkv_ref", "wkv_cpu", "wkv_cuda", "wkv_state0", "IMPLS", "example_inputs",
           "MIN_LOG"]

# =============================================================================================
# Constants
# =============================================================================================

# example_inputs: the benchmark's size (b, l, c)
EXAMPLE_SHAPE = (1, 4096, 2048)
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-12, 1e-12)}  # (rtol, atol)


# =============================================================================================
# Autograd: forward and backward are both kernels of the chosen backend
# =============================================================================================


def _prepare(w, u, k, v, state):
    """The kernels' inputs: contiguous w, u, k, v and the incoming state (the empty one if None),
    detached: no gradient flows into it."""
    w, u, k, v = (x.contiguous() for x in (w, u, k, v))
    s0 = wkv_state0(k.shape[0], k.shape[2], k.dtype, k.device) if state is None else (
        state.detach().contiguous())
    return w, u, k, v, s0


class _WKV(torch.autograd.Function):
    """Wraps a (forward, backward) kernel pair. Returns (y, state'); state' is not
    differentiable, and no gradient flows into the incoming state."""

    @staticmethod
    def forward(ctx, w, u, k, v, state, kernels):
        fwd, bwd = kernels
        w, u, k, v, s0 = _prepare(w, u, k, v, state)
        s = s0.clone()  # the kernel updates it in place
        y = fwd(w, u, k, v, s) if k.numel() else torch.empty_like(k)
        ctx.save_for_backward(w, u, k, v, s0)
        ctx.bwd = bwd
        ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, gy, _gs):
        w, u, k, v, s0 = ctx.saved_tensors
        if k.numel():
            gw, gu, gk, gv = ctx.bwd(w, u, k, v, s0, gy.contiguous())
        else:
            gw, gu, gk, gv = (torch.zeros_like(x) for x in (w, u, k, v))
        return gw, gu, gk, gv, None, None


def wkv_cpu(w, u, k, v, state=None, return_state=False):
    """Numba CPU kernel, parallel over (b, blocks of channels). Contract of ``wkv_ref``."""
    y, s = _WKV.apply(w, u, k, v, state, (_fwd_cpu, _bwd_cpu))
    return (y, s) if return_state else y


def wkv_cuda(w, u, k, v, state=None, return_state=False):
    """numba.cuda kernel (or the CUDA simulator). Contract of ``wkv_ref``."""
    y, s = _WKV.apply(w, u, k, v, state, (_fwd_cuda, _bwd_cuda))
    return (y, s) if return_state else y


# =============================================================================================
# Public entry
# =============================================================================================

IMPLS = {"ref": wkv_ref, "cpu": wkv_cpu, "cuda": wkv_cuda}


def _into(fwd):
    """A forward kernel as ``(w, u, k, v, state, return_state, out) -> out [, state']`` (no
    autograd): it writes y into ``out``."""

    def run(w, u, k, v, state, return_state, out):
        w, u, k, v, s0 = _prepare(w, u, k, v, state)
        s = s0 if state is None else s0.clone()  # the kernel updates it in place
        if k.numel():
            fwd(w, u, k, v, s, out)
        return (out, s) if return_state else out

    return run


_OUT_IMPLS = {"cpu": _into(_fwd_cpu), "cuda": _into(_fwd_cuda)}


def wkv(w, u, k, v, *, state=None, return_state=False, backend=None, out=None):
    """RWKV-4's WKV: y_t = (Σ_{i<t} e^{-(t-1-i)w+k_i} v_i + e^{u+k_t} v_t) / (same without v).

    Args:
        w: (c,) decay rates, every entry finite and ≥ 0 (RWKV stores w = e^{time_decay}).
        u: (c,) bonus of the current token, finite.
        k, v: (b, l, c) keys and values, channels last; float32 or float64, one dtype and
            device for all four.
        state: (b, 3, c) from an earlier call with ``return_state=True``, or None to start
            from the empty past. Treated as opaque and constant (no gradient flows into it).
        return_state: also return the state after the last step.
        backend: "ref", "cpu", "cuda", a callable with this signature, or None to choose
            from the tensors' device.
        out: a contiguous (b, l, c) tensor of k's dtype and device that receives y (the
            kernels write into it and allocate nothing of that size), or None. For calls
            without autograd (inference, timing the kernel alone): a ValueError if w, u, k or v
            require grad while grad mode is on. It must not overlap the inputs.

    Returns:
        y: (b, l, c) (``out`` itself when given), or (y, state) with ``return_state``.
        Calling ``wkv`` on the rest of a sequence with ``state=`` gives the same result as one
        call on the whole sequence.
        Differentiable in w, u, k and v on every backend (without ``out``).
    """
    expect_tensor("k", k, "b, l, c")
    expect_tensor("v", v, "b, l, c", dtypes=(k.dtype,), shape=k.shape)
    batch, _, c = k.shape
    expect_tensor("w", w, "c", dtypes=(k.dtype,), shape=(c,))
    expect_tensor("u", u, "c", dtypes=(k.dtype,), shape=(c,))
    if state is not None:
        expect_tensor("state", state, "b, 3, c", dtypes=(k.dtype,), shape=(batch, 3, c))
    # one host sync for both checks. Non-finite u or w is a diverged parameter, not a limit to
    # take: the backends would each take it differently (u = +inf: y = v on the CPU's clamped
    # exp, NaN from inf - inf on ref and cuda), and its gradient is NaN anyway.
    w_bad, u_bad = torch.stack([((w < 0) | ~torch.isfinite(w)).any(),
                                (~torch.isfinite(u)).any()]).tolist()
    if w_bad:
        raise ValueError(
            f"w must be >= 0 and finite (a decay rate; RWKV uses w = exp(time_decay)), got "
            f"min {w.min().item():.4g}, max {w.max().item():.4g}"
        )
    if u_bad:
        raise ValueError(f"u must be finite (the current token's bonus), got min "
                         f"{u.min().item():.4g}, max {u.max().item():.4g}")
    if out is None:
        return dispatch(IMPLS, w, u, k, v, state, return_state, backend=backend)
    expect_out(out, k, "b, l, c", (w, u, k, v))
    choice = resolve(backend, w, u, k, v, state)
    if callable(choice) or choice == "ref":
        result = dispatch(IMPLS, w, u, k, v, state, return_state, backend=choice)
        y, s = result if return_state else (result, None)
        out.copy_(y)
        return (out, s) if return_state else out
    return dispatch(_OUT_IMPLS, w, u, k, v, state, return_state, out, backend=choice)


def example_inputs(shape=None, *, dtype=torch.float32, device="cpu", seed=0) -> Example:
    """The canonical inputs of ``wkv``: ``Example(args=(w, u, k, v))``.

    shape: (b, l, c), default (1, 4096, 2048) (the benchmark's). w ~ U[0, 2) (c,) decay rates;
    u ~ N(0, 1) (c,); k, v ~ N(0, 1) (b, l, c). Drawn in float64 on the CPU from ``seed``, then
    cast to ``dtype`` and moved to ``device`` (the same values for every dtype and device).
    rtol = atol = 2e-5 in float32, 1e-12 in float64 (against a float64 truth)."""
    batch, l, c = EXAMPLE_SHAPE if shape is None else shape
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(c, generator=g, dtype=torch.float64) * 2  # (c,)
    u = randn(g, c)  # (c,)
    k = randn(g, batch, l, c)  # (b, l, c)
    v = randn(g, batch, l, c)
    rtol, atol = TOLERANCES[dtype]
    return Example(args=tuple(x.to(dtype=dtype, device=device) for x in (w, u, k, v)),
                   rtol=rtol, atol=atol, sizes={"batch": batch, "seqlen": l, "d_model": c})
