"""Checkers for chapter 05 (selective state spaces, Mamba): the sequential selective scan, the
associative combine operator of the parallel scan, the recurrent step of the Mamba block.

Each keeps its list of typical mistakes beside it (``_scan_mistakes``, ``_combine_mistakes``,
``_step_mistakes``) and names the one it recognises. The structure of a result (a tuple where a
tuple is expected) is checked before it is unpacked: a stacked tensor is never misread."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from minimodels.check import Case, Mistake, Verdict, _report, check_function, pair_problem
from minimodels.kernels.selective_scan import parallel_scan, selective_scan_ref

__all__ = ["combine", "mamba_step", "selective_scan_loop"]


def _structure_verdict(exercise: str, fn: Callable, problem: str | None,
                       strict: bool | None) -> Verdict | None:
    if problem is None:
        return None
    name = getattr(fn, "__name__", "your function")
    return _report(Verdict(False, f"Exercise {exercise} ({name}): {problem}"), strict)


# =============================================================================================
# Exercise 5.1: the sequential selective scan
# =============================================================================================


def _scan_cases() -> list[Case]:
    g = torch.Generator().manual_seed(5)

    def case(label, b, d, l, n, dtype=torch.float64):
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        u, delta = r(b, d, l), 1.5 * r(b, d, l)  # Δ before softplus, both signs
        A = -(torch.rand(d, n, generator=g, dtype=torch.float64) * 2 + 0.2)
        args = (u, delta, A, r(b, n, l), r(b, n, l), r(d))
        return Case(label, tuple(x.to(dtype) for x in args))

    return [case("length 1, shape (1, 1, 1), n = 1", 1, 1, 1, 1),
            case("random b=2, d=3, l=7, n=4", 2, 3, 7, 4),
            case("random b=1, d=2, l=12, n=3, float32", 1, 2, 12, 3, torch.float32)]


def _loop(u, delta, A, B, C, D, *, softplus=True, discretise="zoh", delta_on="B", use_D=True,
          B_rule="mamba", old_state=False):
    """The selective scan with switches that reproduce typical mistakes."""
    delta = F.softplus(delta) if softplus else delta
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[..., t, None]  # (b, d, 1)
        Abar = {"zoh": torch.exp(dt * A), "no exp": dt * A, "euler": 1 + dt * A,
                "exp(A)": torch.exp(A).expand_as(dt * A), "exp(A)·Δ": torch.exp(A) * dt}[discretise]
        Bt, Ct = B[:, None, :, t], C[:, None, :, t]  # (b, 1, n)
        if delta_on != "B":
            Bbar = Bt
        elif B_rule == "zoh":  # (exp(Δ·A) − 1)/A · B: ZOH's B̄, not Mamba's
            Bbar = torch.expm1(dt * A) / A * Bt
        else:
            Bbar = dt * Bt
        old = x
        x = Abar * x + Bbar * u[..., t, None]
        y = ((old if old_state else x) * Ct).sum(-1)
        ys.append(y * delta[..., t] if delta_on == "C" else y)
    y = torch.stack(ys, -1)
    return y + D[:, None] * u if use_D else y


def _scan_mistakes() -> list[Mistake]:
    return [
        Mistake("this is the scan with Δ = delta: apply softplus to delta first (Δ must be "
                "positive).", lambda *a: _loop(*a, softplus=False)),
        Mistake("Ā = Δ·A: the exp is missing. Zero-order hold gives Ā = exp(Δ·A).",
                lambda *a: _loop(*a, discretise="no exp")),
        Mistake("Ā = 1 + Δ·A is Euler's first-order approximation: use exp(Δ·A).",
                lambda *a: _loop(*a, discretise="euler")),
        Mistake("Ā = exp(A): the exponent is the product Δ_t·A (chapter 04's mistake: "
                "exp(A) for exp(Δ·A)); without Δ the step size cannot select.",
                lambda *a: _loop(*a, discretise="exp(A)")),
        Mistake("Ā = exp(A)·Δ: the exponent is the product, exp(Δ_t·A).",
                lambda *a: _loop(*a, discretise="exp(A)·Δ")),
        Mistake("B̄ = (exp(Δ·A) − 1)/A · B is ZOH's B̄ (chapter 04): Mamba's rule keeps ZOH's "
                "Ā = exp(Δ·A) but takes B̄ = Δ·B.", lambda *a: _loop(*a, B_rule="zoh")),
        Mistake("Δ multiplies C here, not B: B̄ = Δ·B enters the state; C only reads it out.",
                lambda *a: _loop(*a, delta_on="C")),
        Mistake("y_t is read from the previous state x_{t−1}: update the state first, then "
                "y_t = C_t·x_t + D·u_t.", lambda *a: _loop(*a, old_state=True)),
        Mistake("the skip connection D·u is missing.", lambda *a: _loop(*a, use_D=False)),
    ]


def _scan_reference(u, delta, A, B, C, D):
    return selective_scan_ref(u, delta, A, B, C, D, delta_softplus=True)


def selective_scan_loop(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 5.1: ``fn(u, delta, A, B, C, D) -> y``: Δ = softplus(delta),
    x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t, y_t = C_t·x_t + D u_t.

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l); D: (d,) -> y: (b, d, l)."""
    return check_function("5.1", fn, _scan_cases(), _scan_reference, _scan_mistakes(),
                          strict=strict)


# =============================================================================================
# Exercise 5.2: the associative combine operator
# =============================================================================================


def _combine_cases() -> list[Case]:
    g = torch.Generator().manual_seed(6)
    cases = []
    for label, shape in [("length 1", (1, 1, 1)), ("length 2", (1, 2, 2)),
                         ("length 7 (padded to 8)", (2, 3, 7)), ("length 16", (1, 2, 16))]:
        a = torch.rand(*shape, generator=g, dtype=torch.float64) * 0.6 + 0.4
        cases.append(Case(f"a Blelloch scan of {label}",
                          (a, torch.randn(*shape, generator=g, dtype=torch.float64))))
    return cases


def _scan_with(op):
    def run(a, b):
        return parallel_scan(a, b, op=op)

    run.__name__ = getattr(op, "__name__", "your function")
    return run


def _combine_mistakes() -> list[Mistake]:
    def wrong(op):
        return lambda a, b: parallel_scan(a, b, op=op)

    return [
        Mistake("the state coming from the left part is lost, as if it were reset between "
                "chunks: the offset b1 of the left map must flow on, decayed by a2.",
                wrong(lambda L, R: (L[0] * R[0], R[1]))),
        Mistake("you applied the right map first: (a1, b1) • (a2, b2) means 'first left, then "
                "right', so the left offset b1 is the one decayed (by a2).",
                wrong(lambda L, R: (L[0] * R[0], L[0] * R[1] + L[1]))),
        Mistake("b1 + b2 forgets that the left part's offset decays through the right map: "
                "multiply b1 by a2.", wrong(lambda L, R: (L[0] * R[0], L[1] + R[1]))),
        Mistake("decays compose by product, not sum: a = a1·a2.",
                wrong(lambda L, R: (L[0] + R[0], R[0] * L[1] + R[1]))),
    ]


def combine(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 5.2: ``fn(left, right) -> (a, b)``: the composition of the maps h -> a1 h + b1
    (first, ``left``) and h -> a2 h + b2 (then, ``right``). Checked by running Blelloch's scan
    (``parallel_scan``) with it and comparing with the sequential scan."""
    verdict = _structure_verdict("5.2", fn, _combine_structure(fn), strict)
    if verdict is not None:
        return verdict
    return check_function("5.2", _scan_with(fn), _combine_cases(),
                          _scan_with(_reference_combine), _combine_mistakes(), strict=strict)


def _combine_structure(fn: Callable) -> str | None:
    """Call ``fn`` once on two maps of shape (2, 3) and look at what came back before anything
    unpacks it (None when it raises: check_function then reports the error)."""
    g = torch.Generator().manual_seed(7)

    def r():
        return torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5

    left, right = (r(), r()), (r(), r())
    try:
        got = fn(left, right)
    except Exception:
        return None
    where = "for left = (a1, b1), right = (a2, b2) of shape (2, 3)"
    problem = pair_problem(got, ("a", "b"), where)
    if problem is None and any(t.shape != (2, 3) for t in got):
        shapes = ", ".join(str(tuple(t.shape)) for t in got)
        problem = (f"returned tensors of shapes {shapes} {where}: a and b keep the shape of "
                   "the inputs (everything is elementwise)")
    return problem


def _reference_combine(left, right):
    return left[0] * right[0], right[0] * left[1] + right[1]


# =============================================================================================
# Exercise 5.3: the recurrent step of the Mamba block
# =============================================================================================


def _step(block, x_t, state, *, softplus=True, reset=False, gate=True, window=True):
    """MambaBlock.step with switches that reproduce typical mistakes."""
    u, z = block.in_proj(x_t).chunk(2, dim=-1)  # (b, e)
    if state is None or reset:
        win = u.new_zeros(u.shape + (block.d_conv - 1,))
        x = u.new_zeros(u.shape + (block.d_state,))
        if state is not None:
            win = state[0]
    else:
        win, x = state
    if not window:
        win = torch.zeros_like(win)
    win = torch.cat([win, u[..., None]], dim=-1)  # (b, e, k)
    u = F.silu((win * block.conv.weight[:, 0]).sum(-1) + block.conv.bias)
    delta, B, C = block.x_proj(u).split([block.dt_rank, block.d_state, block.d_state], dim=-1)
    delta = block.dt_proj(delta)  # W_dt δ + b_dt: (b, e)
    delta = (F.softplus(delta) if softplus else delta)[..., None]  # (b, e, 1)
    x = torch.exp(delta * block.A) * x + delta * B[:, None] * u[..., None]
    y = (x * C[:, None]).sum(-1) + block.D * u
    if gate:
        y = y * F.silu(z)
    return block.out_proj(y), (win[..., 1:], x)


def _run_steps(step):
    def run(block, xs):
        state, out = None, []
        with torch.no_grad():
            for t in range(xs.shape[1]):
                y, state = step(block, xs[:, t], state)
                out.append(y)
        return torch.stack(out, dim=1)  # (b, l, d)

    run.__name__ = getattr(step, "__name__", "your function")
    return run


def _step_cases() -> list[Case]:
    from minimodels.models.mamba import MambaBlock

    cases = []
    for label, (b, l, d, n, k, seed) in [("one step, d_model=4", (1, 1, 4, 2, 4, 0)),
                                         ("12 steps, d_model=8, d_state=4", (2, 12, 8, 4, 4, 1)),
                                         ("9 steps, d_conv=2", (2, 9, 6, 3, 2, 2))]:
        torch.manual_seed(seed)
        block = MambaBlock(d, d_state=n, d_conv=k).double()
        with torch.no_grad():  # make every part matter: a trained-looking block
            block.D.normal_()
            block.dt_proj.bias.normal_()
        xs = torch.randn(b, l, d, dtype=torch.float64)
        cases.append(Case(label, (block, xs)))
    return cases


def _step_mistakes() -> list[Mistake]:
    return [
        Mistake("Δ must go through softplus (after adding dt_proj.bias).",
                _run_steps(lambda *a: _step(*a, softplus=False))),
        Mistake("the SSM state restarts from zeros at every step (a state reset): carry x "
                "from the state you are given.", _run_steps(lambda *a: _step(*a, reset=True))),
        Mistake("the gate y · silu(z) is missing.", _run_steps(lambda *a: _step(*a, gate=False))),
        Mistake("the convolution only sees the current input: keep the last d_conv - 1 inputs "
                "in the state and slide the window.",
                _run_steps(lambda *a: _step(*a, window=False))),
    ]


def mamba_step(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 5.3: ``fn(block, x_t, state) -> (y_t, state)``, the recurrent mode of a
    ``MambaBlock``: x_t (b, d_model); state None or (window (b, e, d_conv-1), x (b, e, n)).
    Run over whole sequences, carrying the state, against ``MambaBlock.step``."""
    cases = _step_cases()
    verdict = _structure_verdict("5.3", fn, _step_structure(fn, *cases[1].args), strict)
    if verdict is not None:
        return verdict
    return check_function("5.3", _run_steps(fn), cases,
                          _run_steps(lambda block, x_t, s: block.step(x_t, s)),
                          _step_mistakes(), atol=1e-9, rtol=1e-9, strict=strict)


def _step_structure(fn: Callable, block, xs) -> str | None:
    """Two steps of ``fn`` from state None, looked at before anything unpacks them: a tuple
    (y_t, state), state a tuple (window, x) of the right shapes. None when it raises."""
    b, e = xs.shape[0], block.d_inner
    want = {"window": (b, e, block.d_conv - 1), "x": (b, e, block.d_state)}
    state = None
    for t in range(2):
        where = f"at step {t} (state {'None' if state is None else '(window, x)'})"
        try:
            with torch.no_grad():
                got = fn(block, xs[:, t].clone(), state)
        except Exception:
            return None
        problem = pair_problem(got, ("y_t", "state"), where, tensors=1)
        if problem is None and not isinstance(got[1], (tuple, list)):
            problem = (f"the state is a {type(got[1]).__name__} {where}: return (y_t, (window, "
                       "x)), the state as a tuple")
        if problem is not None:
            return problem
        y, state = got
        problem = pair_problem(state, ("window", "x"), "as the state " + where)
        if problem is not None:
            return problem
        if y.shape != xs[:, t].shape:
            return (f"y_t has shape {tuple(y.shape)} {where}, expected {tuple(xs[:, t].shape)} "
                    "(b, d_model): did you forget block.out_proj?")
        for name, tensor in zip(want, state, strict=True):
            if tuple(tensor.shape) != want[name]:
                return (f"the state's {name} has shape {tuple(tensor.shape)} {where}, expected "
                        f"{want[name]}")
    return None
