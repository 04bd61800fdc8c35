"""Checkers for chapter 00 (welcome): the linear scan."""

from __future__ import annotations

from collections.abc import Callable

import torch

from minimodels.check import Case, Mistake, Verdict, check_function
from minimodels.kernels.scan import linear_scan_ref

__all__ = ["linear_scan"]


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
