"""Checkers for chapter 04 (state-space models): ZOH and bilinear discretisation of a diagonal
system, the causal FFT convolution, and the S4D recurrent step.

They recognise the typical wrong answers: forward Euler (or Mamba's B̄ = Δ·B) where ZOH was
asked, exp(A)·Δ in place of exp(Δ·A), a missing 1/A, swapped bilinear fractions, a circular
convolution (no zero padding), the wrong half kept, a correlation, and in the recurrent step a
missing factor 2, a missing D, an output read from the old state or a complex output (no
`.real`). The structure of a result (a tuple of two tensors) is checked before it is unpacked,
and each element of a pair is reported by its name (Ad, Bd; y, x_new)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from minimodels.check import (
    Case,
    Mistake,
    Verdict,
    _clone,
    _close,
    _diagnose,
    _report,
    check_function,
    pair_problem,
)

__all__ = ["bilinear_diagonal", "causal_fft_conv", "s4d_step", "zoh_diagonal"]


# ---------------------------------------------------------------------------------------------
# Exercise 4.1: ZOH and bilinear for a diagonal A
# ---------------------------------------------------------------------------------------------


def _check_pair(exercise: str, fn: Callable, cases, reference: Callable, mistakes,
                names: tuple[str, str], *, strict: bool | None, atol: float = 1e-5,
                rtol: float = 1e-5) -> Verdict:
    """Like ``check_function`` for a function returning a pair: its structure first, then each
    element by its own name (a message says "Bd: wrong values ... index (3,)", never an index
    into a stacked tensor), and a mistake's hint when the whole pair matches that mistake."""
    prefix = f"Exercise {exercise} ({getattr(fn, '__name__', 'your function')}):"

    def verdict(passed: bool, message: str) -> Verdict:
        return _report(Verdict(passed, f"{prefix} {message}"), strict)

    for case in cases:
        want = reference(*_clone(case.args))
        try:
            got = fn(*_clone(case.args))
        except NotImplementedError:
            return verdict(False, "not implemented yet: replace the `raise NotImplementedError` "
                           "with your code.")
        except Exception as err:  # the learner's bug: report it, do not hide it
            return verdict(False, f"raised {type(err).__name__} on {case.label}: {err}")
        problem = pair_problem(got, names, f"on {case.label}")
        if problem is not None:
            return verdict(False, problem)
        for name, g, w in zip(names, got, want, strict=True):
            if g.is_complex() and not w.is_complex():
                return verdict(False, f"{name} is complex on {case.label}, but A and B are real "
                               f"there: {name} must be real too (do not build a complex tensor "
                               "for a real system; the exponential of a real number is real)")
            problem = _diagnose(g, w, case, case.args, (), atol, rtol)
            if problem is not None:
                message = f"{name}: {problem}"
                for mistake in mistakes:
                    wrong = mistake.wrong(*_clone(case.args))
                    if all(isinstance(x, torch.Tensor) and _close(x, y, atol, rtol)
                           for x, y in zip(got, wrong, strict=True)):
                        message += f". Hint: {mistake.hint}"
                        break
                return verdict(False, message)
    return verdict(True, f"passed {len(cases)} checks.")


def _zoh(A, B, dt):
    dtA = dt * A
    return torch.exp(dtA), torch.expm1(dtA) / A * B


def _bilinear(A, B, dt):
    dtA = dt * A
    return (1 + dtA / 2) / (1 - dtA / 2), dt / (1 - dtA / 2) * B


def _euler(A, B, dt):
    return 1 + dt * A, dt * B


def _diag_cases() -> list[Case]:
    g = torch.Generator().manual_seed(4)
    real = -torch.rand(5, generator=g, dtype=torch.float64) * 4 - 0.2  # stable, no zero
    lin = torch.complex(torch.full((4,), -0.5, dtype=torch.float64),
                        math.pi * torch.arange(4, dtype=torch.float64))  # S4D-Lin
    B = torch.randn(5, generator=g, dtype=torch.float64)
    Bc = torch.randn(4, generator=g, dtype=torch.complex128)
    return [
        Case("real A (5,), dt = 0.1", (real, B, 0.1)),
        Case("real A (5,), large step dt = 0.7", (real, B, 0.7)),
        Case("complex S4D-Lin A (4,), dt = 0.05", (lin, Bc, 0.05)),
        Case("complex A (4,) complex64, dt = 0.2", (lin.to(torch.complex64),
                                                     Bc.to(torch.complex64), 0.2)),
    ]


def _exp_of_A_times_dt(A, B, dt):  # exp(A)·Δ where exp(Δ·A) was meant, in both places
    Ad = torch.exp(A) * dt
    return Ad, (Ad - 1) / A * B


def zoh_diagonal(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 4.1a: ``fn(A, B, dt) -> (Ad, Bd)``, zero-order hold for a diagonal A.

    A, B: (n,) real or complex (A has no zero entry); dt: float. Ad = exp(Δ·A),
    Bd = (exp(Δ·A) − 1)/A · B."""
    mistakes = [
        Mistake("this is forward Euler (Ad = 1 + Δ·A, Bd = Δ·B): ZOH takes the exact "
                "exponential.", _euler),
        Mistake("Ad is right but Bd = Δ·B is Euler's (and Mamba's) rule, not ZOH's: "
                "Bd = (exp(Δ·A) − 1)/A · B.", lambda A, B, dt: (torch.exp(dt * A), dt * B)),
        Mistake("you computed exp(A)·Δ: the exponent is the product Δ·A, exp(Δ·A).",
                _exp_of_A_times_dt),
        Mistake("Bd is missing the division by A.",
                lambda A, B, dt: (torch.exp(dt * A), torch.expm1(dt * A) * B)),
        Mistake("Bd divides by Δ·A instead of A (that is the zoh factor without its Δ).",
                lambda A, B, dt: (torch.exp(dt * A), torch.expm1(dt * A) / (dt * A) * B)),
        Mistake("this is the bilinear rule, not ZOH.", _bilinear),
    ]
    return _check_pair("4.1", fn, _diag_cases(), _zoh, mistakes, ("Ad", "Bd"), strict=strict)


def bilinear_diagonal(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 4.1b: ``fn(A, B, dt) -> (Ad, Bd)``, the bilinear (Tustin) rule for a diagonal A.

    Ad = (1 + Δ/2·A)/(1 − Δ/2·A), Bd = Δ·B/(1 − Δ/2·A)."""
    mistakes = [
        Mistake("this is forward Euler (Ad = 1 + Δ·A, Bd = Δ·B).", _euler),
        Mistake("this is ZOH: the bilinear rule uses no exponential.", _zoh),
        Mistake("numerator and denominator of Ad are swapped: Ad = (1 + Δ/2·A)/(1 − Δ/2·A), "
                "which is stable for Re A < 0.",
                lambda A, B, dt: ((1 - dt * A / 2) / (1 + dt * A / 2),
                                  dt / (1 + dt * A / 2) * B)),
        Mistake("Bd is missing its factor Δ: Bd = Δ·B/(1 − Δ/2·A).",
                lambda A, B, dt: (_bilinear(A, B, dt)[0], B / (1 - dt * A / 2))),
        Mistake("Bd = Δ·B is missing the division by (1 − Δ/2·A).",
                lambda A, B, dt: (_bilinear(A, B, dt)[0], dt * B)),
    ]
    return _check_pair("4.1", fn, _diag_cases(), _bilinear, mistakes, ("Ad", "Bd"),
                       strict=strict)


# ---------------------------------------------------------------------------------------------
# Exercise 4.2: the causal FFT convolution
# ---------------------------------------------------------------------------------------------


def _conv_ref(u, K):
    """Direct causal convolution y_k = Σ_{j<=k} K_j u_{k-j}, O(L²): no FFT in the reference."""
    L = u.shape[-1]
    idx = torch.arange(L)
    lag = idx[:, None] - idx[None, :]  # (L, L): k − i
    T = torch.where(lag >= 0, K[..., lag.clamp(min=0)], torch.zeros((), dtype=K.dtype))
    return (T * u[..., None, :]).sum(-1)  # (..., L)


def _circular(u, K):
    L = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=L) * torch.fft.rfft(K, n=L), n=L)


def _conv_cases() -> list[Case]:
    g = torch.Generator().manual_seed(5)

    def r(*s, dtype=torch.float64):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    return [
        Case("u (16,), K (16,)", (r(16), r(16))),
        Case("u (2, 3, 33), K (3, 33) (odd length, broadcast over batch)", (r(2, 3, 33),
                                                                            r(3, 33))),
        Case("length 1", (r(2, 1), r(1))),
        Case("u (4, 20) float32, K (20,)", (r(4, 20, dtype=torch.float32),
                                            r(20, dtype=torch.float32))),
    ]


def causal_fft_conv(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 4.2: ``fn(u, K) -> y``, y_k = Σ_{j<=k} K_j u_{k−j} through the FFT.

    u: (..., L), K: (..., L) broadcastable -> y: (..., L) in u's dtype."""
    mistakes = [
        Mistake("this is the circular convolution: the FFT wraps the end of the sequence onto "
                "its start. Zero-pad u and K to length 2L before the FFT, keep the first L.",
                _circular),
        Mistake("you kept the last L samples of the padded result: the causal output is the "
                "first L.", lambda u, K: torch.fft.irfft(torch.fft.rfft(u, n=2 * u.shape[-1])
                                                        * torch.fft.rfft(K, n=2 * u.shape[-1]),
                                                        n=2 * u.shape[-1])[..., u.shape[-1]:]),
        Mistake("this is a correlation (K reversed in time): y_k = Σ_j K_j u_{k−j} looks back, "
                "with K_0 applied to the current input.",
                lambda u, K: _conv_ref(u, K.flip(-1))),
    ]
    return check_function("4.2", fn, _conv_cases(), _conv_ref, mistakes, strict=strict)


# ---------------------------------------------------------------------------------------------
# Exercise 4.3: the S4D recurrent step
# ---------------------------------------------------------------------------------------------


def _step_ref(x, u, A, C, D, dt):
    dtA = dt[:, None] * A  # (h, n)
    x = torch.exp(dtA) * x + (torch.expm1(dtA) / A) * u[..., None]  # (b, h, n)
    return 2 * (C * x).sum(-1).real + D * u, x  # (b, h), (b, h, n)


def _rollout(step: Callable) -> Callable:
    """Run ``step`` over u: (b, h, L) from x = 0 and stack the outputs into y: (b, h, L)."""

    @functools.wraps(step)
    def run(u, A, C, D, dt):
        x = torch.zeros(u.shape[:2] + A.shape[1:], dtype=A.dtype)  # (b, h, n)
        ys = []
        for t in range(u.shape[-1]):
            y, x = step(x, u[..., t], A, C, D, dt)
            ys.append(y)
        return torch.stack(ys, -1)  # (b, h, L)

    return run


def _step_structure(fn: Callable, case: Case) -> str | None:
    """What is wrong with the structure of one step's result, checked before any unpacking:
    a tuple (y, x_new), y real (b, h), x_new complex like x. None when it looks right (or
    when the step raises: check_function then reports the error)."""
    u, A, C, D, dt = _clone(case.args)
    x = torch.zeros(u.shape[:2] + A.shape[1:], dtype=A.dtype)  # (b, h, n)
    try:
        out = fn(x, u[..., 0], A, C, D, dt)
    except Exception:
        return None
    problem = pair_problem(out, ("y", "x_new"), f"on {case.label}")
    if problem is not None:
        return problem
    y, x_new = out
    if y.is_complex():
        return (f"y is complex on {case.label}: the output is real, y = 2·Re Σ_n C·x_new + D·u. "
                "Take `.real` of the sum over the modes")
    if x_new.shape != x.shape:
        return (f"x_new has shape {tuple(x_new.shape)} on {case.label}, expected "
                f"{tuple(x.shape)}: the new state is shaped like the state x (b, h, n)")
    if not x_new.is_complex():
        return (f"x_new is real on {case.label}: the state is complex (A is complex); do not "
                "take `.real` of the state, only of the output y")
    return None


def _step_cases() -> list[Case]:
    g = torch.Generator().manual_seed(6)

    def system(b, h, n, L, cdtype=torch.complex128):
        real = {torch.complex128: torch.float64, torch.complex64: torch.float32}[cdtype]
        A = torch.complex(-0.5 - torch.rand(h, n, generator=g, dtype=torch.float64),
                          math.pi * torch.arange(n, dtype=torch.float64).repeat(h, 1))
        C = torch.randn(h, n, generator=g, dtype=torch.complex128)
        D = torch.randn(h, generator=g, dtype=torch.float64)
        dt = 0.05 + 0.15 * torch.rand(h, generator=g, dtype=torch.float64)
        u = torch.randn(b, h, L, generator=g, dtype=torch.float64)
        return (u.to(real), A.to(cdtype), C.to(cdtype), D.to(real), dt.to(real))

    return [
        Case("3 steps, b = 1, h = 1, n = 1", system(1, 1, 1, 3)),
        Case("12 steps, b = 2, h = 3, n = 4", system(2, 3, 4, 12)),
        Case("10 steps in complex64/float32, b = 2, h = 2, n = 3",
             system(2, 2, 3, 10, torch.complex64)),
        Case("a single step, b = 1, h = 2, n = 2", system(1, 2, 2, 1)),
    ]


def _step_with(Ad_fn, Bd_fn, two=2, use_D=True, old_state=False):
    def step(x, u, A, C, D, dt):
        dtA = dt[:, None] * A
        new = Ad_fn(dtA, A, dt) * x + Bd_fn(dtA, A, dt) * u[..., None]
        y = two * (C * (x if old_state else new)).sum(-1).real + (D * u if use_D else 0)
        return y, new

    return _rollout(step)


def s4d_step(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 4.3: ``fn(x, u, A, C, D, dt) -> (y, x_new)``, one ZOH step of S4D.

    x: (b, h, n) complex state; u: (b, h) real input; A, C: (h, n) complex; D, dt: (h,).
    x_new = exp(Δ·A)·x + (exp(Δ·A) − 1)/A·u;  y = 2·Re Σ_n C·x_new + D·u."""
    zoh_A = lambda dtA, A, dt: torch.exp(dtA)
    zoh_B = lambda dtA, A, dt: torch.expm1(dtA) / A
    dt_B = lambda dtA, A, dt: dt[:, None].to(A.dtype)
    mistakes = [
        Mistake("this is forward Euler (Ā = 1 + Δ·A, B̄ = Δ): ZOH takes the exact "
                "exponential.", _step_with(lambda dtA, A, dt: 1 + dtA, dt_B)),
        Mistake("Ā is right but B̄ = Δ is Euler's (Mamba's) rule: ZOH's B̄ is "
                "(exp(Δ·A) − 1)/A.", _step_with(zoh_A, dt_B)),
        Mistake("you computed exp(A)·Δ: the exponent is the product Δ·A.",
                _step_with(lambda dtA, A, dt: torch.exp(A) * dt[:, None],
                           lambda dtA, A, dt: (torch.exp(A) * dt[:, None] - 1) / A)),
        Mistake("the output is missing the factor 2 in y = 2·Re Σ C·x: the conjugate modes "
                "count twice.", _step_with(zoh_A, zoh_B, two=1)),
        Mistake("the skip term D·u is missing from y.", _step_with(zoh_A, zoh_B, use_D=False)),
        Mistake("y is read from the old state: update x first, then y = 2·Re Σ C·x_new + D·u.",
                _step_with(zoh_A, zoh_B, old_state=True)),
    ]
    cases = _step_cases()
    problem = _step_structure(fn, cases[1])
    if problem is not None:
        name = getattr(fn, "__name__", "your function")
        return _report(Verdict(False, f"Exercise 4.3 ({name}): {problem}"), strict)
    return check_function("4.3", _rollout(fn), cases, _rollout(_step_ref), mistakes,
                          atol=1e-4, rtol=1e-4, strict=strict)
