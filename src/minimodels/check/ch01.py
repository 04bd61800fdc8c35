"""Checkers for chapter 01 (RNNs): an LSTM cell, a GRU cell, the gradient norm through time."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import torch

from minimodels.check import Case, Mistake, Verdict, check_function
from minimodels.models.rnn import grad_norms as grad_norms_ref
from minimodels.models.rnn import gru_cell as gru_ref
from minimodels.models.rnn import lstm_cell as lstm_ref
from minimodels.models.rnn import rnn_cell

__all__ = ["grad_norms", "gru_cell", "lstm_cell"]

sig, tanh = torch.sigmoid, torch.tanh


def _rand(g, *shape, scale=1.0, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _cell_cases(gates: int, pair: bool) -> list[Case]:
    """(x_t, state, W_ih, W_hh, b_ih, b_hh) at a few sizes; states are non-zero on purpose."""
    g = torch.Generator().manual_seed(1)
    cases = []
    for label, b, d, n, dtype in [
        ("batch 1, input 1, hidden 1", 1, 1, 1, torch.float64),
        ("random (batch 2, input 3, hidden 4)", 2, 3, 4, torch.float64),
        ("random (batch 3, input 5, hidden 2) float32", 3, 5, 2, torch.float32),
    ]:
        x_t, h, c = (_rand(g, b, k, dtype=dtype) for k in (d, n, n))
        W_ih, W_hh = _rand(g, gates * n, d, dtype=dtype), _rand(g, gates * n, n, dtype=dtype)
        b_ih, b_hh = _rand(g, gates * n, dtype=dtype), _rand(g, gates * n, dtype=dtype)
        cases.append(Case(label, (x_t, (h, c) if pair else h, W_ih, W_hh, b_ih, b_hh)))
    return cases


def _reorder(order: str, true: str, *weights):
    """Weights as seen by a learner who unpacks the gate blocks in ``order`` (not ``true``)."""
    out = []
    for w in weights:
        blocks = w.chunk(len(true), dim=0)
        out.append(torch.cat([blocks[order.index(gate)] for gate in true], dim=0))
    return out


# ---------------------------------------------------------------------------------------------
# Exercise 1.1: the LSTM cell
# ---------------------------------------------------------------------------------------------


def _as_pair(fn: Callable) -> Callable:
    """Wrap ``fn -> (h, c)`` so the machinery compares one tensor: stack([h, c]) (2, b, n)."""

    @functools.wraps(fn)
    def run(*args):
        out = fn(*args)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(f"return the new state as a pair (h, c), got {type(out).__name__}")
        h, c = out
        if not (isinstance(h, torch.Tensor) and isinstance(c, torch.Tensor)):
            raise TypeError(f"h and c must be tensors, got {type(h).__name__}, {type(c).__name__}")
        if h.shape != c.shape:
            raise ValueError(f"h and c must have one shape (batch, hidden), got "
                             f"{tuple(h.shape)} and {tuple(c.shape)}")
        return torch.stack([h, c])  # (2, b, n)

    return run


def _lstm_variant(x_t, state, W_ih, W_hh, b_ih, b_hh, *, gate=sig, cand=tanh, forget=True,
                  gated_forget=True, out_tanh=True, use_h=True, use_c=True, b_hh_on=True,
                  swap_out=False):
    h, c = state
    h = h if use_h else torch.zeros_like(h)
    c = c if use_c else torch.zeros_like(c)
    pre = x_t @ W_ih.T + b_ih + h @ W_hh.T + (b_hh if b_hh_on else 0)
    i, f, g, o = pre.chunk(4, dim=-1)
    keep = (gate(f) if gated_forget else 1.0) * c if forget else 0.0
    c = keep + gate(i) * cand(g)
    h = gate(o) * (tanh(c) if out_tanh else c)
    return (c, h) if swap_out else (h, c)


def _lstm_mistakes() -> list[Mistake]:
    m = [
        ("tanh and sigmoid are swapped: the gates i, f, o use σ, the candidate g uses tanh.",
         dict(gate=tanh, cand=sig)),
        ("the candidate g must use tanh, not σ (it can be negative).", dict(cand=sig)),
        ("the gates i, f, o must use σ (values in (0, 1)), not tanh.", dict(gate=tanh)),
        ("c' = i ⊙ g is missing the forget-gate path: c' = f ⊙ c + i ⊙ g.", dict(forget=False)),
        ("c' = c + i ⊙ g: the old cell must be scaled by the forget gate, f ⊙ c.",
         dict(gated_forget=False)),
        ("h' = o ⊙ c': squash the cell first, h' = o ⊙ tanh(c').", dict(out_tanh=False)),
        ("the state is not carried: the old h must enter through W_hh h.", dict(use_h=False)),
        ("the state is not carried: the old cell c must enter through f ⊙ c.", dict(use_c=False)),
        ("the state is not carried: your cell ignores both h and c.",
         dict(use_h=False, use_c=False)),
        ("you returned (c, h): return the pair in the order (h, c).", dict(swap_out=True)),
        ("b_hh is missing: torch adds both biases, W_ih x + b_ih + W_hh h + b_hh.",
         dict(b_hh_on=False)),
    ]
    out = [Mistake(hint, _as_pair(functools.partial(_lstm_variant, **kw))) for hint, kw in m]
    for order in map("".join, itertools.permutations("ifgo")):
        if order != "ifgo":
            def wrong(x_t, state, *w, order=order):
                return lstm_ref(x_t, state, *_reorder(order, "ifgo", *w))

            out.append(Mistake(f"wrong gate order: you unpacked the blocks as "
                               f"({', '.join(order)}); torch stacks them as (i, f, g, o).",
                               _as_pair(wrong)))
    return out


def lstm_cell(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 1.1: ``fn(x_t, (h, c), W_ih, W_hh, b_ih, b_hh) -> (h', c')``, one LSTM step in
    torch.nn's layout (gates i, f, g, o). x_t: (b, d); h, c: (b, n); W_ih: (4n, d);
    W_hh: (4n, n); b_ih, b_hh: (4n,)."""
    return check_function("1.1", _as_pair(fn), _cell_cases(4, pair=True), _as_pair(lstm_ref),
                          _lstm_mistakes(), strict=strict)


# ---------------------------------------------------------------------------------------------
# Exercise 1.2: the GRU cell
# ---------------------------------------------------------------------------------------------


def _gru_variant(x_t, h, W_ih, W_hh, b_ih, b_hh, *, gate=sig, cand=tanh, cho_z=False,
                 r_inside=False, use_h=True, b_hh_on=True):
    h = h if use_h else torch.zeros_like(h)
    b_hh = b_hh if b_hh_on else torch.zeros_like(b_hh)
    xr, xz, xn = (x_t @ W_ih.T + b_ih).chunk(3, dim=-1)
    hr, hz, hn = (h @ W_hh.T + b_hh).chunk(3, dim=-1)
    r, z = gate(xr + hr), gate(xz + hz)
    if r_inside:  # Cho et al.'s form: r gates h before the matrix, and b_hn is outside
        W_hn, b_hn = W_hh.chunk(3, dim=0)[2], b_hh.chunk(3)[2]
        n = cand(xn + (r * h) @ W_hn.T + b_hn)
    else:
        n = cand(xn + r * hn)
    return z * n + (1 - z) * h if cho_z else (1 - z) * n + z * h


def _gru_mistakes() -> list[Mistake]:
    m = [
        ("z and 1 - z are swapped: torch keeps the old state with z, h' = (1 - z) ⊙ n + z ⊙ h "
         "(Cho et al. write it the other way round).", dict(cho_z=True)),
        ("r must multiply (W_hn h + b_hn), torch's form, not h before the matrix.",
         dict(r_inside=True)),
        ("tanh and sigmoid are swapped: r and z use σ, the candidate n uses tanh.",
         dict(gate=tanh, cand=sig)),
        ("the candidate n must use tanh, not σ.", dict(cand=sig)),
        ("the gates r and z must use σ, not tanh.", dict(gate=tanh)),
        ("the state is not carried: the old h must enter the gates and the mix with z.",
         dict(use_h=False)),
        ("b_hh is missing: torch adds both biases.", dict(b_hh_on=False)),
    ]
    out = [Mistake(hint, functools.partial(_gru_variant, **kw)) for hint, kw in m]
    for order in map("".join, itertools.permutations("rzn")):
        if order != "rzn":
            def wrong(x_t, h, *w, order=order):
                return gru_ref(x_t, h, *_reorder(order, "rzn", *w))

            out.append(Mistake(f"wrong gate order: you unpacked the blocks as "
                               f"({', '.join(order)}); torch stacks them as (r, z, n).", wrong))
    return out


def gru_cell(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 1.2: ``fn(x_t, h, W_ih, W_hh, b_ih, b_hh) -> h'``, one GRU step in torch.nn's
    layout (gates r, z, n). x_t: (b, d); h: (b, n); W_ih: (3n, d); W_hh: (3n, n)."""
    return check_function("1.2", fn, _cell_cases(3, pair=False), gru_ref, _gru_mistakes(),
                          strict=strict)


# ---------------------------------------------------------------------------------------------
# Exercise 1.3: the gradient norm through time
# ---------------------------------------------------------------------------------------------


def _norm_cases() -> list[Case]:
    g = torch.Generator().manual_seed(3)
    n = 4
    W = _rand(g, n, n, scale=1.2 / n**0.5)
    rnn_step = lambda x_t, h: rnn_cell(x_t, h, torch.eye(n, dtype=x_t.dtype), W.to(x_t.dtype))
    rnn_step.__name__ = "rnn_step"
    Wl_ih, Wl_hh, bl = _rand(g, 4 * n, n), _rand(g, 4 * n, n, scale=0.5), _rand(g, 4 * n)
    lstm_step = lambda x_t, s: lstm_ref(x_t, s, Wl_ih, Wl_hh, bl, bl)
    state = lambda *shape: _rand(g, *shape).requires_grad_()  # the graph starts at the state
    h0, c0 = state(2, n), state(2, n)
    return [
        Case("an RNN, batch 1, length 1", (rnn_step, _rand(g, 1, 1, n), state(1, n))),
        Case("an RNN, batch 2, length 7", (rnn_step, _rand(g, 2, 7, n), state(2, n))),
        Case("an LSTM (state (h, c)), batch 2, length 6", (lstm_step, _rand(g, 2, 6, n), (h0, c0))),
    ]


def _unrolled(step, x, state, *, carry=True, wrt="h"):
    """The reference's loop with a mistake switched on: state not carried, or another wrt."""
    with torch.enable_grad():
        s0 = tuple(s.detach().requires_grad_() for s in state) if isinstance(state, tuple) else (
            state.detach().requires_grad_())
        x = x.detach().requires_grad_()
        s, hs, xs, cs = s0, [], [], []
        for t in range(x.shape[1]):
            x_t = x[:, t]
            xs.append(x_t)
            s = step(x_t, s if carry else s0)
            h = s[0] if isinstance(s, tuple) else s
            hs.append(h)
            cs.append(s[1] if isinstance(s, tuple) else h)
        wrt_list = {"h": hs, "x": xs, "c": cs}[wrt]
        grads = torch.autograd.grad(hs[-1].sum(), wrt_list, allow_unused=True)
    return torch.stack([torch.zeros((), dtype=x.dtype) if g is None else g.norm() for g in grads])


def _norm_mistakes() -> list[Mistake]:
    ref = grad_norms_ref
    return [
        Mistake("only the last step receives gradient: carry the state from step to step (and "
                "do not detach it), so h_t feeds h_{t+1}.",
                lambda step, x, s: _unrolled(step, x, s, carry=False)),
        Mistake("your norms run backwards: entry t-1 is for h_t (t = 1..l), the last one is "
                "‖∂L/∂h_l‖; flip them for the lag axis only when plotting.",
                lambda step, x, s: ref(step, x, s).flip(0)),
        Mistake("these are squared norms: take .norm(), not the sum of squares.",
                lambda step, x, s: ref(step, x, s) ** 2),
        Mistake("these are normalised by the last entry: return the raw norms ‖∂L/∂h_t‖.",
                lambda step, x, s: ref(step, x, s) / ref(step, x, s)[-1]),
        Mistake("these are gradients with respect to the inputs x_t: take them at the hidden "
                "states h_t.", lambda step, x, s: _unrolled(step, x, s, wrt="x")),
        Mistake("for the LSTM these are gradients at the cell c_t: take them at h_t = state[0].",
                lambda step, x, s: _unrolled(step, x, s, wrt="c")),
        Mistake("shifted by one step: entry t-1 must be h_t (after step t), not the state "
                "before it.", lambda step, x, s: _shifted(step, x, s)),
    ]


def _shifted(step, x, state):
    with torch.enable_grad():
        s = tuple(v.detach().requires_grad_() for v in state) if isinstance(state, tuple) else (
            state.detach().requires_grad_())
        before = []
        for t in range(x.shape[1]):
            before.append(s[0] if isinstance(s, tuple) else s)
            s = step(x[:, t], s)
        h_l = s[0] if isinstance(s, tuple) else s
        grads = torch.autograd.grad(h_l.sum(), before, allow_unused=True)
    return torch.stack([torch.zeros((), dtype=x.dtype) if g is None else g.norm() for g in grads])


def grad_norms(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 1.3: ``fn(step, x, state) -> norms (l,)`` with norms[t-1] = ‖∂L/∂h_t‖ for
    L = h_l.sum(); ``step(x_t, state) -> state`` (state = h, or (h, c) with h first). The
    state passed in already requires grad, so every h_t is part of the autograd graph."""
    return check_function("1.3", _explain_no_grad(fn), _norm_cases(), grad_norms_ref,
                          _norm_mistakes(), atol=1e-8, rtol=1e-6, strict=strict)


def _explain_no_grad(fn: Callable) -> Callable:
    """Add a hint to autograd's "does not require grad" error (a detached state)."""

    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except RuntimeError as err:
            if "does not require grad" not in str(err):
                raise
            raise RuntimeError(f"{err}. Hint: the graph starts at the state you were given: "
                               "did you .detach() the state, or start from a new tensor?") from err

    return run
