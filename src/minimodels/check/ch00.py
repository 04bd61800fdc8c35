"""Checkers for chapter 00 (welcome): the linear scan in PyTorch (0.1) and compiled by Numba
(0.2), and the slope of a log-log fit (0.3). Each keeps its list of typical mistakes beside it."""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable

import numpy as np
import torch

from minimodels.check import Case, Mistake, Verdict, _report, check_function
from minimodels.kernels.scan import linear_scan_ref
from minimodels.plots import fit_slope

__all__ = ["linear_scan", "loglog_slope", "scan_rows"]


def _scan_cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float64, lo=-1.0):
        return (torch.rand(*shape, generator=g, dtype=dtype) * (1 - lo) + lo)

    cases = [
        Case("length 1, shape (1, 1, 1), with h0", (rand(1, 1, 1), rand(1, 1, 1), rand(1, 1))),
        Case("random (2, 3, 7), with h0", (rand(2, 3, 7, lo=0.5), rand(2, 3, 7), rand(2, 3))),
        Case("random (2, 4, 5), h0=None", (rand(2, 4, 5, lo=0.5), rand(2, 4, 5), None)),
    ]
    a, b, h0 = rand(3, 2, 9, lo=0.5), rand(3, 2, 9), rand(3, 2)
    cases.append(Case("random (3, 2, 9) float32, with h0", (a.float(), b.float(), h0.float())))
    return cases


def _scan_mistakes() -> list[Mistake]:
    def zeros_h0(a, b, h0):
        return linear_scan_ref(a, b, None)

    def stored_before_update(a, b, h0):
        h = linear_scan_ref(a, b, h0)
        start = torch.zeros_like(a[..., :1]) if h0 is None else h0[..., None]
        return torch.cat([start, h[..., :-1]], dim=-1)

    def b_inside(a, b, h0):  # h_t = a_t (h_{t-1} + b_t)
        return linear_scan_ref(a, a * b, h0)

    def swapped_ab(a, b, h0):
        return linear_scan_ref(b, a, h0)

    def reversed_time(a, b, h0):
        return linear_scan_ref(a.flip(-1), b.flip(-1), h0).flip(-1)

    return [
        Mistake("this is the scan started from zeros: did you ignore h0?", zeros_h0),
        Mistake("your h_t equals the expected h_{t-1}: store the state after updating it, "
                "not before.", stored_before_update),
        Mistake("this is a_t·(h_{t-1} + b_t): decay the old state first, then add b_t.",
                b_inside),
        Mistake("this is b_t·h_{t-1} + a_t: a is the decay, b the input.", swapped_ab),
        Mistake("this runs the recurrence from the end of the sequence: time starts at t = 0.",
                reversed_time),
    ]


def linear_scan(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 0.1: ``fn(a, b, h0) -> h`` computing h_t = a_t * h_{t-1} + b_t.

    a, b: (batch, d, l); h0: (batch, d) or None (zeros) -> h: (batch, d, l)."""
    return check_function(
        "0.1", fn, _scan_cases(), linear_scan_ref, _scan_mistakes(), strict=strict
    )


# ---------------------------------------------------------------------------------------------
# Exercise 0.2: the loop compiled by Numba, over NumPy rows, writing h in place
# ---------------------------------------------------------------------------------------------


def _rows_cases() -> list[Case]:
    g = torch.Generator().manual_seed(2)

    def rand(*shape, lo=-1.0):
        return torch.rand(*shape, generator=g, dtype=torch.float64) * (1 - lo) + lo

    cases = [Case("1 row, 1 step", (rand(1, 1, lo=0.5), rand(1, 1), rand(1)))]
    for r, l in [(3, 7), (4, 5), (1, 12)]:
        cases.append(Case(f"random ({r} rows, {l} steps)", (rand(r, l, lo=0.5), rand(r, l),
                                                            rand(r))))
    a, b, h0 = rand(3, 9, lo=0.5), rand(3, 9), rand(3)
    cases.append(Case("random (3 rows, 9 steps) float32", (a.float(), b.float(), h0.float())))
    return cases


def _rows_ref(a, b, h0):
    """(r, l), (r, l), (r,) -> (r, l): linear_scan_ref treats the rows as its batch."""
    return linear_scan_ref(a, b, h0)


def _state_across_rows(a, b, h0):
    """The state set once, before the loop over rows: row r starts where row r-1 ended."""
    rows = []
    state = h0[0]
    for r in range(a.shape[0]):
        h = linear_scan_ref(a[r:r + 1], b[r:r + 1], state[None])[0]
        rows.append(h)
        state = h[-1]
    return torch.stack(rows)


def _rows_mistakes() -> list[Mistake]:
    return [
        Mistake("this is the scan started from zeros: start each row from state = h0[r].",
                lambda a, b, h0: linear_scan_ref(a, b, None)),
        Mistake("each row starts where the previous row ended: set state = h0[r] inside the "
                "loop over rows, not once before it.", _state_across_rows),
        Mistake("your h[r, t] equals the expected h[r, t-1]: update the state first, then "
                "store it.", lambda a, b, h0: torch.cat(
                    [h0[:, None], linear_scan_ref(a, b, h0)[:, :-1]], dim=-1)),
        Mistake("this is a_t·(h_{t-1} + b_t): decay the old state first, then add b_t.",
                lambda a, b, h0: linear_scan_ref(a, a * b, h0)),
        Mistake("this is b_t·h_{t-1} + a_t: a is the decay, b the input.",
                lambda a, b, h0: linear_scan_ref(b, a, h0)),
        Mistake("this runs the recurrence from the last step: time starts at t = 0.",
                lambda a, b, h0: linear_scan_ref(a.flip(-1), b.flip(-1), h0).flip(-1)),
    ]


def _is_compiled(fn) -> bool:
    from numba.core.dispatcher import Dispatcher

    return isinstance(fn, Dispatcher)


def _in_place(fn: Callable) -> Callable:
    """Run ``fn(a, b, h0, h)`` on NumPy copies of torch (r, l) inputs with ``h`` filled with NaN,
    and return what it wrote into ``h`` as a tensor; raise a clear error when it wrote nothing,
    returned an array instead, left rows or steps unwritten, or did not compile."""

    @functools.wraps(fn)
    def run(a, b, h0):
        from numba.core.errors import TypingError

        an, bn, h0n = (x.numpy().copy() for x in (a, b, h0))
        h = np.full_like(an, np.nan)
        try:
            out = fn(an, bn, h0n, h)
        except TypingError as err:
            first = " ".join(str(err).strip().splitlines()[:3])[:300]
            raise TypeError("Numba could not compile your function (it takes loops, scalars and "
                            "NumPy arrays; no torch, no lists). Its message begins: "
                            f"{first}") from None
        unwritten = np.isnan(h)
        if unwritten.all() and h.size:
            if out is not None:
                raise TypeError(f"you returned {type(out).__name__} and left h unwritten: write "
                                "each state into the array h you were given, h[r, t] = state "
                                "(the function returns nothing).")
            raise ValueError("h was never written: store each state with h[r, t] = state, "
                             "for every row r and every step t (starting at t = 0).")
        if unwritten.any():
            rows = np.flatnonzero(unwritten.all(axis=1))
            if rows.size:
                raise ValueError(f"row {rows[0]} of h was never written: loop over every row "
                                 "r in range(a.shape[0]).")
            r, t = np.argwhere(unwritten)[0]
            raise ValueError(f"h[{r}, {t}] was never written: loop over every step "
                             "t in range(a.shape[1]), starting at 0.")
        return torch.from_numpy(h)

    return run


def scan_rows(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 0.2: ``fn(a, b, h0, h)``, a ``numba.njit`` function that writes
    h[r, t] = a[r, t] * h[r, t-1] + b[r, t] (h[r, -1] = h0[r]) into ``h`` in place.

    a, b, h: (r, l) NumPy arrays; h0: (r,). Checked on float64 and float32 rows; it must also be
    compiled (a plain Python loop gets the right values far too slowly)."""
    with contextlib.redirect_stdout(io.StringIO()):  # one verdict, printed below
        verdict = check_function("0.2", _in_place(fn), _rows_cases(), _rows_ref,
                                 _rows_mistakes(), strict=False)
    name = getattr(fn, "__name__", "your function")
    if verdict.passed and not _is_compiled(fn):
        verdict = Verdict(False, f"Exercise 0.2 ({name}): right values, but {name} is a plain "
                          "Python function: put @numba.njit on the line above its def, so "
                          "Numba compiles it.")
    return _report(verdict, strict)


# ---------------------------------------------------------------------------------------------
# Exercise 0.3: the slope of a log-log fit
# ---------------------------------------------------------------------------------------------


def _slope_cases() -> list[Case]:
    rng = np.random.default_rng(3)
    x = np.array([256.0, 512, 1024, 2048, 4096, 8192])
    return [
        Case("y = 3·x² (an exact power law)", (x, 3 * x**2)),
        Case("y = 0.5·√x", (x[:4], 0.5 * np.sqrt(x[:4]))),
        Case("noisy timings y = 2e-6·x·noise", (x, 2e-6 * x * rng.lognormal(0, 0.3, x.size))),
        Case("y = 1e-3 + 1e-6·x (an overhead at small x)", (x, 1e-3 + 1e-6 * x)),
    ]


def _as_number(fn: Callable) -> Callable:
    """``fn(x, y) -> slope`` as a (1,) float64 tensor, after checking it returned one number."""

    @functools.wraps(fn)
    def run(x, y):
        out = fn(x.copy(), y.copy())  # NumPy arrays: copies, so scribbling cannot leak
        size = (len(out) if isinstance(out, tuple | list) else
                int(np.prod(out.shape)) if isinstance(out, np.ndarray | torch.Tensor) else 1)
        if size != 1:
            raise TypeError(f"return one number, the slope; you returned a "
                            f"{type(out).__name__} of {size} numbers (np.polyfit(..., 1) returns "
                            "[slope, intercept]: take element [0]).")
        try:
            value = float(out)
        except (TypeError, ValueError):
            raise TypeError(f"return one number, the slope; you returned "
                            f"{type(out).__name__}") from None
        return torch.tensor([value], dtype=torch.float64)

    return run


def _slope_mistakes() -> list[Mistake]:
    def fit(u, v, k=0):
        return torch.tensor([float(np.polyfit(u, v, 1)[k])], dtype=torch.float64)

    return [
        Mistake("this is the slope of y against x: take logs of both before fitting, "
                "np.polyfit(np.log(x), np.log(y), 1).", lambda x, y: fit(x, y)),
        Mistake("only y is in logs (a semi-log fit): take the log of x as well.",
                lambda x, y: fit(x, np.log(y))),
        Mistake("only x is in logs: take the log of y as well.", lambda x, y: fit(np.log(x), y)),
        Mistake("you fitted log x against log y: the slope is d(log y)/d(log x), so log x goes "
                "first in np.polyfit.", lambda x, y: fit(np.log(y), np.log(x))),
        Mistake("this is the intercept: np.polyfit(..., 1) returns [slope, intercept]; take "
                "element [0].", lambda x, y: fit(np.log(x), np.log(y), 1)),
        Mistake("this uses only the first and last points: fit a line through all of them by "
                "least squares (np.polyfit), which averages out the noise.",
                lambda x, y: torch.tensor([float((np.log(y[-1]) - np.log(y[0]))
                                                 / (np.log(x[-1]) - np.log(x[0])))],
                                          dtype=torch.float64)),
        Mistake("this is 10**slope (or e**slope), a factor, not the exponent: return the slope "
                "itself.", lambda x, y: 10 ** fit(np.log(x), np.log(y))),
        Mistake("this is e**slope, a factor, not the exponent: return the slope itself.",
                lambda x, y: torch.exp(fit(np.log(x), np.log(y)))),
    ]


def loglog_slope(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 0.3: ``fn(x, y) -> s``, the least-squares slope of log y against log x (so that
    y ∝ x^s), for NumPy arrays x, y of one length; returns one number."""
    return check_function("0.3", _as_number(fn), _slope_cases(), _as_number(fit_slope),
                          _slope_mistakes(), atol=1e-9, rtol=1e-7, strict=strict)
