"""Checkers for the exercise notebooks.

A checker runs the learner's function on tiny, random and edge cases against the reference and
prints one clear verdict: not implemented yet / raised X / wrong type / wrong dtype / wrong
shape (with a hint) / NaN / wrong values (max error, first bad index, small slices, and a hint
when the output matches a known mistake) / passed. It never prints the solution.

In a notebook the verdict is printed and returned. Under pytest (the package's own tests) a
failing verdict raises ``CheckFailed`` instead, so a test can assert the message.

This module holds the machinery (``check_function``, ``Case``, ``Mistake``); each chapter's
checkers live in ``minimodels.check.chNN`` and are re-exported here, so a notebook calls
``check.linear_scan(fn)``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Case", "CheckFailed", "Mistake", "Verdict", "check_function",
    "linear_scan", "loglog_slope", "scan_rows",  # 00
    "grad_norms", "gru_cell", "lstm_cell",  # 01
    "causal_attention", "kv_step_mask", "merge_attention",  # 02
    "time_mix_step", "wkv_log_space", "wkv_weights",  # 03
    "bilinear_diagonal", "causal_fft_conv", "s4d_step", "zoh_diagonal",  # 04
    "combine", "mamba_step", "selective_scan_loop",  # 05
    "block_diag_multiply", "monarch_dense", "monarch_perm",  # 06
    "causal_conv_fft", "hyena_recurrence", "implicit_filter",  # 07
    "edm_loss", "merge_tokens", "split_tokens", "window_starts",  # 08
    "merge_partials", "ring_step", "zigzag_positions",  # 09
    "mqar_layout", "needle_block", "route",  # 10
]


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


# Set by `python -m minimodels.course grade` in the kernel that runs a submission: every verdict
# is appended there as a JSON line, so the grader reads the checker's verdict, not printed text.
GRADE_LOG = "MINIMODELS_GRADE_LOG"


def _log_for_grader(verdict: Verdict) -> None:
    path = os.environ.get(GRADE_LOG)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"passed": verdict.passed, "message": verdict.message}) + "\n")


def _report(verdict: Verdict, strict: bool | None) -> Verdict:
    _log_for_grader(verdict)
    strict = _under_pytest() if strict is None else strict
    if strict and not verdict.passed:
        raise CheckFailed(verdict.message)
    print(verdict.message)
    return verdict


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _fmt(x: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in x.flatten().tolist()) + "]"


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in double precision; complex stays complex (``.double()`` drops the imaginary part)."""
    return x.to(torch.complex128) if x.is_complex() else x.double()


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> bool:
    return got.shape == want.shape and torch.allclose(_wide(got), _wide(want), rtol, atol)


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
    err = (_wide(got) - _wide(want)).abs()
    idx = tuple(torch.nonzero(err > atol + rtol * _wide(want).abs())[0].tolist())
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


def pair_problem(got, names: tuple[str, str], where: str, tensors: int = 2) -> str | None:
    """None when ``got`` is a tuple or list of two items whose first ``tensors`` are tensors,
    else what is wrong with its structure. Checkers call it before unpacking anything, so a
    stacked tensor (or a lone one) is named as such, never split along its first axis."""
    pair = f"a tuple ({names[0]}, {names[1]})"
    if isinstance(got, torch.Tensor):
        return (f"returned one tensor of shape {tuple(got.shape)} {where}: return {pair}, not "
                "one stacked tensor")
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        size = f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""
        return f"returned {type(got).__name__}{size} {where}: return {pair}"
    for name, t in list(zip(names, got, strict=True))[:tensors]:
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__} {where}: return {pair} of tensors"
    return None


# Chapter checkers (imported last: they use the machinery above)
from minimodels.check.ch00 import linear_scan, loglog_slope, scan_rows  # noqa: E402
from minimodels.check.ch01 import grad_norms, gru_cell, lstm_cell  # noqa: E402
from minimodels.check.ch02 import causal_attention, kv_step_mask, merge_attention  # noqa: E402
from minimodels.check.ch03 import time_mix_step, wkv_log_space, wkv_weights  # noqa: E402
from minimodels.check.ch04 import (  # noqa: E402
    bilinear_diagonal,
    causal_fft_conv,
    s4d_step,
    zoh_diagonal,
)
from minimodels.check.ch05 import combine, mamba_step, selective_scan_loop  # noqa: E402
from minimodels.check.ch06 import block_diag_multiply, monarch_dense, monarch_perm  # noqa: E402
from minimodels.check.ch07 import causal_conv_fft, hyena_recurrence, implicit_filter  # noqa: E402
from minimodels.check.ch08 import edm_loss, merge_tokens, split_tokens, window_starts  # noqa: E402
from minimodels.check.ch09 import merge_partials, ring_step, zigzag_positions  # noqa: E402
from minimodels.check.ch10 import mqar_layout, needle_block, route  # noqa: E402
