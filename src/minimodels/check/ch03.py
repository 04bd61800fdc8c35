"""Checkers for chapter 03 (RWKV): the WKV recurrence in log space, the recurrent step of the
time-mix, and the weights a token gives its past."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from minimodels.check import Case, Mistake, Verdict, _report, check_function
from minimodels.kernels.wkv import wkv_ref

__all__ = ["time_mix_step", "wkv_log_space", "wkv_weights"]

BIG = "float32 keys of size 60 and u = 30 (a naive e^k overflows: keep a running maximum)"


def _weights(w, u, k, *, shift=1, bonus=True, causal=True):
    """Weights token t gives token i, in float64: softmax over i of -(t-shift-i)·w + k_i
    (i < t) and u + k_t (i = t; k_t without u when ``bonus`` is False). k: (..., l, c) ->
    (..., l, l, c) indexed [t, i, c]."""
    w, u, k = (x.double() for x in (w, u, k))
    l = k.shape[-2]
    t = torch.arange(l)
    dist = (t[:, None] - shift - t[None, :]).double()[..., None]  # (l, l, 1)
    z = -dist * w + k.unsqueeze(-3)  # (..., t, i, c)
    diag = torch.eye(l, dtype=torch.bool)[..., None]
    now = (u + k) if bonus else k  # (..., l, c)
    z = torch.where(diag, now.unsqueeze(-2).expand_as(z), z)
    if causal:
        z = z.masked_fill(~(t[:, None] >= t[None, :])[..., None], -torch.inf)
    return torch.softmax(z, dim=-2)


def _dense_wkv(w, u, k, v, **kw):
    return (_weights(w, u, k, **kw) * v.double().unsqueeze(-3)).sum(-2).to(k.dtype)


def _rand(g, *shape, scale=1.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# =============================================================================================
# Exercise 3.1: the WKV recurrence in log space
# =============================================================================================


def _wkv_cases() -> list[Case]:
    g = torch.Generator().manual_seed(3)

    def case(label, b, l, c, dtype=torch.float64, k_scale=1.0, u_shift=0.0):
        w = torch.rand(c, generator=g, dtype=torch.float64) * 2
        u = _rand(g, c) + u_shift
        args = (w, u, _rand(g, b, l, c, scale=k_scale), _rand(g, b, l, c))
        return Case(label, tuple(x.to(dtype) for x in args))

    big = case(BIG, 2, 9, 4, torch.float32, k_scale=60.0, u_shift=30.0)
    return [case("length 1, shape (1, 1, 2)", 1, 1, 2), case("random (2, 7, 3)", 2, 7, 3),
            case("random (1, 12, 5) float32", 1, 12, 5, torch.float32), big]


def _wkv_mistakes() -> list[Mistake]:
    return [
        Mistake("the current token got e^{k_t}, not e^{u + k_t}: add the bonus u for token t "
                "(only for t itself, not for the state).",
                lambda w, u, k, v: wkv_ref(w, torch.zeros_like(u), k, v)),
        Mistake("token i < t got e^{-(t-i)·w}: one decay too many. The newest past token "
                "(i = t-1) is not decayed: output first, then decay the state and add token t.",
                lambda w, u, k, v: _dense_wkv(w, u, k, v, shift=0)),
        Mistake("token i < t got e^{-(t-2-i)·w}: one decay too few. Decay the state once per "
                "step, before adding the new token.",
                lambda w, u, k, v: _dense_wkv(w, u, k, v, shift=2)),
        Mistake("token t is counted twice: it is in the state and in the bonus term (you "
                "updated the state before reading it). Compute y_t from the state of tokens "
                "< t, then decay the state and add token t.",
                lambda w, u, k, v: _twice(w, u, k, v)),
    ]


def _twice(w, u, k, v):
    # the state was updated with token t (weight e^{k_t}, older tokens decayed once more)
    # before y_t was formed with the bonus
    wts = _weights(w, u, k, shift=0)  # (b, t, i, c)
    diag = torch.eye(k.shape[1], dtype=torch.bool)[None, :, :, None]
    wts = torch.where(diag, wts * (1 + torch.exp(-u.double())), wts)  # e^{u+k_t} + e^{k_t}
    wts = wts / wts.sum(2, keepdim=True)
    return (wts * v.double()[:, None]).sum(2).to(k.dtype)


def wkv_log_space(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 3.1: ``fn(w, u, k, v) -> y``, the WKV operator by a loop over time in log
    space. w, u: (c,); k, v: (b, l, c) -> y: (b, l, c), the dtype of k."""
    return check_function("3.1", fn, _wkv_cases(), wkv_ref, _wkv_mistakes(), strict=strict,
                          atol=2e-5, rtol=2e-5)


# =============================================================================================
# Exercise 3.2: the recurrent step of the time-mix
# =============================================================================================


def _step_structure(step: Callable, case: Case) -> str | None:
    """What is wrong with the structure of ``step``'s return on the first two steps of
    ``case``, or None (also None when it raises: ``check_function`` reports that). Checked
    before anything is unpacked: ``y, state = tensor`` would split the batch and misreport."""
    tm, x = case.args
    state = None
    for t in range(min(2, x.shape[1])):
        try:
            result = step(tm, x[:, t].clone(), state)
        except Exception:
            return None
        if isinstance(result, torch.Tensor):
            return (f"returned one tensor of shape {tuple(result.shape)} at step {t} on "
                    f"{case.label}: return a tuple (y_t, state), the output (b, d) and the new "
                    "state your next call receives.")
        if not (isinstance(result, tuple) and len(result) == 2):
            what = (f"a {type(result).__name__} of {len(result)}"
                    if isinstance(result, (tuple, list)) else type(result).__name__)
            return (f"returned {what} at step {t} on {case.label}: return a tuple "
                    "(y_t, state) of two items.")
        y, state = result
        if not isinstance(y, torch.Tensor):
            return (f"the first item returned at step {t} on {case.label} is a "
                    f"{type(y).__name__}: return (y_t, state) with y_t the output tensor (b, d)"
                    " first.")
        if y.shape != x[:, t].shape:
            return (f"y_t has shape {tuple(y.shape)} at step {t} on {case.label}, expected "
                    f"{tuple(x[:, t].shape)} (b, d): one token in, one token out.")
        if state is None:
            return (f"the state returned at step {t} on {case.label} is None: return what the "
                    "next step needs (x_t for the token shift, and a, b, p).")
    return None


def _run_steps(step: Callable) -> Callable:
    def run(tm, x):
        state, ys = None, []
        for t in range(x.shape[1]):
            y, state = step(tm, x[:, t], state)
            ys.append(y)
        return torch.stack(ys, 1)  # (b, l, d)

    run.__name__ = getattr(step, "__name__", "your step")
    return run


def _time_mix(tm, x, *, shift=True, bonus=True, decay_shift=1, gate=True, exp_decay=True):
    """tm's forward written out, with one thing changed (for the mistakes)."""
    x_prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1) if shift else x
    r, k, v = (W(mu * x + (1 - mu) * x_prev) for W, mu in
               ((tm.Wr, tm.mu_r), (tm.Wk, tm.mu_k), (tm.Wv, tm.mu_v)))
    w = torch.exp(tm.time_decay) if exp_decay else tm.time_decay
    u = tm.time_first if bonus else torch.zeros_like(tm.time_first)
    y = _dense_wkv(w, u, k, v, shift=decay_shift)
    return tm.Wo(torch.sigmoid(r) * y if gate else y)


def _time_mix_cases() -> list[Case]:
    from minimodels.models.rwkv import RWKVTimeMix

    torch.manual_seed(0)
    tm = RWKVTimeMix(6, 0, 2).double().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    tm32 = copy.deepcopy(tm).float()
    big = copy.deepcopy(tm32)
    big.Wk.weight.mul_(150.0)  # keys of size 100 and more
    big.time_first.add_(30.0)
    return [Case("one step, x (2, 1, 6)", (tm, _rand(g, 2, 1, 6))),
            Case("x (3, 8, 6)", (tm, _rand(g, 3, 8, 6))),
            Case("x (2, 5, 6) float32", (tm32, _rand(g, 2, 5, 6, dtype=torch.float32))),
            Case("float32, W_k scaled so keys reach 100 (a naive e^k overflows: keep a "
                 "running maximum)",
                 (big, _rand(g, 2, 7, 6, dtype=torch.float32)))]


def _time_mix_mistakes() -> list[Mistake]:
    return [
        Mistake("this is the time-mix without the token shift: mix x_t with x_{t-1} from the "
                "state (zeros at t = 0), and return x_t in the new state.",
                lambda tm, x: _time_mix(tm, x, shift=False)),
        Mistake("the bonus u is missing: the current token's weight is e^{u + k_t}.",
                lambda tm, x: _time_mix(tm, x, bonus=False)),
        Mistake("the decay is applied one step too early: form y_t from the state, then decay "
                "the state and add token t.",
                lambda tm, x: _time_mix(tm, x, decay_shift=0)),
        Mistake("the decay is applied one step too late: decay the state at every step.",
                lambda tm, x: _time_mix(tm, x, decay_shift=2)),
        Mistake("the receptance gate σ(r_t) is missing: o_t = W_o(σ(r_t) ⊙ wkv_t).",
                lambda tm, x: _time_mix(tm, x, gate=False)),
        Mistake("you used time_decay as w: the decay rate is w = exp(time_decay).",
                lambda tm, x: _time_mix(tm, x, exp_decay=False)),
    ]


def time_mix_step(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 3.2: ``fn(tm, x_t, state) -> (y_t, state)``, one recurrent step of the
    ``RWKVTimeMix`` ``tm``. x_t: (b, d); state: None at t = 0, else what your last call
    returned. The checker runs it over a sequence and compares with ``tm(x)``."""
    with torch.no_grad():
        cases = _time_mix_cases()
        problem = _step_structure(fn, cases[1])
        if problem is not None:
            name = getattr(fn, "__name__", "your step")
            return _report(Verdict(False, f"Exercise 3.2 ({name}): {problem}"), strict)
        return check_function("3.2", _run_steps(fn), cases,
                              lambda tm, x: tm(x), _time_mix_mistakes(), strict=strict,
                              atol=1e-4, rtol=1e-4)


# =============================================================================================
# Exercise 3.3: the weights a token gives its past (WKV read as attention)
# =============================================================================================


def _weights_cases() -> list[Case]:
    g = torch.Generator().manual_seed(5)

    def case(label, l, c, dtype=torch.float64, k_scale=1.0, u_shift=0.0):
        w = torch.rand(c, generator=g, dtype=torch.float64) * 2
        args = (w, _rand(g, c) + u_shift, _rand(g, l, c, scale=k_scale))
        return Case(label, tuple(x.to(dtype) for x in args))

    return [case("length 1", 1, 2), case("l = 6, c = 3", 6, 3),
            case("l = 5, c = 2 float32", 5, 2, torch.float32),
            case(BIG, 7, 3, torch.float32, k_scale=60.0, u_shift=30.0)]


def _ref_weights(w, u, k):
    return _weights(w, u, k).to(k.dtype)


def wkv_weights(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 3.3: ``fn(w, u, k) -> P``, the weights token t gives token i in WKV:
    P[t, i, c] for i ≤ t (0 for i > t; each row sums to 1). w, u: (c,); k: (l, c) ->
    (l, l, c)."""
    mistakes = [
        Mistake("token t's own weight lacks the bonus: use u + k_t on the diagonal.",
                lambda w, u, k: _weights(w, u, k, bonus=False).to(k.dtype)),
        Mistake("one decay too many: token i < t has exponent -(t-1-i)·w + k_i.",
                lambda w, u, k: _weights(w, u, k, shift=0).to(k.dtype)),
        Mistake("one decay too few: token i < t has exponent -(t-1-i)·w + k_i.",
                lambda w, u, k: _weights(w, u, k, shift=2).to(k.dtype)),
        Mistake("future tokens got weight: set P[t, i] = 0 for i > t before normalising.",
                lambda w, u, k: _weights(w, u, k, causal=False).to(k.dtype)),
    ]
    return check_function("3.3", fn, _weights_cases(), _ref_weights, mistakes, strict=strict,
                          atol=1e-5, rtol=1e-5)
