"""Checkers for the exercise notebooks.

A checker runs the learner's function on tiny, random and edge cases against the reference and
prints one clear verdict: not implemented yet / raised X / wrong type / wrong dtype / wrong
shape (with a hint) / NaN / wrong values (max error, first bad index, small slices, and a hint
when the output matches a known mistake) / passed. It never prints the solution.

In a notebook the verdict is printed and returned. Under pytest (the package's own tests) a
failing verdict raises ``CheckFailed`` instead, so a test can assert the message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minimodels.kernels.scan import linear_scan_ref

__all__ = ["CheckFailed", "Verdict", "check_function", "linear_scan"]


class CheckFailed(AssertionError):
    """A checker's failing verdict, raised under pytest."""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed


@dataclass(frozen=True)
class Case:
    """One input to try: a label for messages and the positional arguments."""

    label: str
    args: tuple


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: ``wrong(*args)`` computes what it returns; ``hint`` explains."""

    hint: str
    wrong: Callable


def _under_pytest() -> bool:
    return "pytest" in sys.modules and "PYTEST_CURRENT_TEST" in os.environ


def _report(verdict: Verdict, strict: bool | None) -> Verdict:
    strict = _under_pytest() if strict is None else strict
    if strict and not verdict.passed:
        raise CheckFailed(verdict.message)
    print(verdict.message)
    return verdict


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _fmt(x: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in x.flatten().tolist()) + "]"


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> bool:
    return got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol, atol)


def _diagnose(
    got, want, case: Case, args: tuple, mistakes: Sequence[Mistake], atol: float, rtol: float
) -> str | None:
    """None when ``got`` is right, else the reason (without the exercise prefix)."""
    where = f"on {case.label}"
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__} {where}: expected a torch.Tensor"
    if got.dtype != want.dtype:
        return (
            f"wrong dtype {where}: got {str(got.dtype)[6:]}, expected {str(want.dtype)[6:]} "
            "(keep the dtype of the inputs; avoid creating tensors without dtype=)"
        )
    if got.shape != want.shape:
        msg = f"wrong shape {where}: got {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dim() == want.dim() and sorted(got.shape) == sorted(want.shape):
            msg += ". Hint: same sizes in another order: did you swap two axes (say l and d)?"
        return msg
    bad = ~torch.isfinite(got) & torch.isfinite(want)
    if bad.any():
        idx = tuple(torch.nonzero(bad)[0].tolist())
        return f"NaN or inf {where}: first at index {idx} (expected {want[idx].item():.4g})"
    if _close(got, want, atol, rtol):
        return None
    err = (got.double() - want.double()).abs()
    idx = tuple(torch.nonzero(err > atol + rtol * want.double().abs())[0].tolist())
    head = idx[:-1] + (slice(0, 6),) if got.dim() else ()
    msg = (
        f"wrong values {where}: max |error| {err.max().item():.3g}, first bad index {idx}; "
        f"yours{list(idx[:-1])}[:6] = {_fmt(got[head])}, expected {_fmt(want[head])}"
    )
    for mistake in mistakes:
        if _close(got, mistake.wrong(*_clone(args)), atol, rtol):
            return msg + f". Hint: {mistake.hint}"
    return msg


def check_function(
    exercise: str,
    fn: Callable,
    cases: Sequence[Case],
    reference: Callable,
    mistakes: Sequence[Mistake] = (),
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    strict: bool | None = None,
) -> Verdict:
    """Run ``fn`` on every case, compare with ``reference``, print (or raise) one verdict."""
    name = getattr(fn, "__name__", "your function")
    prefix = f"Exercise {exercise} ({name}):"
    for case in cases:
        want = reference(*_clone(case.args))
        try:
            got = fn(*_clone(case.args))
        except NotImplementedError:
            return _report(
                Verdict(False, f"{prefix} not implemented yet: replace the "
                        "`raise NotImplementedError` with your code."),
                strict,
            )
        except Exception as err:  # the learner's bug: report it, do not hide it
            return _report(
                Verdict(False, f"{prefix} raised {type(err).__name__} on {case.label}: {err}"),
                strict,
            )
        problem = _diagnose(got, want, case, case.args, mistakes, atol, rtol)
        if problem is not None:
            return _report(Verdict(False, f"{prefix} {problem}"), strict)
    return _report(Verdict(True, f"{prefix} passed {len(cases)} checks."), strict)


# =============================================================================================
# Chapter 00
# =============================================================================================


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
