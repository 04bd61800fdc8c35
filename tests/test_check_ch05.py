"""Chapter 05 checkers: the right answers pass, and each typical wrong answer fails with its
hint (a missing softplus, exp forgotten, Δ applied to C, the state reset between chunks, ...)."""

import pytest
import torch
import torch.nn.functional as F

from minimodels import check
from minimodels.check import CheckFailed
from minimodels.check.ch05 import _loop, _step
from minimodels.kernels.selective_scan import combine as right_combine

pytestmark = pytest.mark.ch05


def right_scan(u, delta, A, B, C, D):
    return _loop(u, delta, A, B, C, D)


def test_right_answers_pass():
    assert check.selective_scan_loop(right_scan, strict=True)
    assert check.combine(right_combine, strict=True)
    assert check.mamba_step(lambda block, x_t, s: block.step(x_t, s), strict=True)
    assert check.mamba_step(_step, strict=True)


def not_yet(*args):
    raise NotImplementedError("Exercise")


@pytest.mark.parametrize("checker", [check.selective_scan_loop, check.combine, check.mamba_step])
def test_not_implemented(checker):
    verdict = checker(not_yet, strict=False)
    assert not verdict and "not implemented yet" in verdict.message


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda *a: _loop(*a, softplus=False), "softplus"),
        (lambda *a: _loop(*a, discretise="no exp"), "the exp is missing"),
        (lambda *a: _loop(*a, discretise="euler"), "Euler"),
        (lambda *a: _loop(*a, delta_on="C"), "Δ multiplies C"),
        (lambda *a: _loop(*a, use_D=False), "D·u is missing"),
        (lambda *a: _loop(*a, discretise="exp(A)"), r"exp\(A\) for exp\(Δ·A\)"),
        (lambda *a: _loop(*a, discretise="exp(A)·Δ"), r"Ā = exp\(A\)·Δ"),
        (lambda *a: _loop(*a, B_rule="zoh"), "ZOH's B̄"),
        (lambda *a: _loop(*a, old_state=True), "previous state"),
    ],
)
def test_scan_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.selective_scan_loop(wrong, strict=True)


def test_scan_wrong_dtype_and_shape():
    with pytest.raises(CheckFailed, match="wrong dtype"):
        check.selective_scan_loop(lambda *a: right_scan(*a).double(), strict=True)
    with pytest.raises(CheckFailed, match="wrong shape"):
        check.selective_scan_loop(lambda *a: right_scan(*a).transpose(1, 2), strict=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda L, R: (L[0] * R[0], R[1]), "reset between chunks"),
        (lambda L, R: (L[0] * R[0], L[0] * R[1] + L[1]), "applied the right map first"),
        (lambda L, R: (L[0] * R[0], L[1] + R[1]), "multiply b1 by a2"),
        (lambda L, R: (L[0] + R[0], R[0] * L[1] + R[1]), "compose by product"),
    ],
)
def test_combine_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.combine(wrong, strict=True)


@pytest.mark.parametrize(
    "switch, hint",
    [
        (dict(softplus=False), "softplus"),
        (dict(reset=True), "state reset"),
        (dict(gate=False), "gate"),
        (dict(window=False), "window"),
    ],
)
def test_step_mistakes_get_their_hint(switch, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.mamba_step(lambda *a: _step(*a, **switch), strict=True)


@pytest.mark.parametrize(
    "wrong, message",
    [
        (lambda L, R: torch.stack(right_combine(L, R)), "not one stacked tensor"),
        (lambda L, R: right_combine(L, R)[1], "return a tuple (a, b), not"),
        (lambda L, R: (*right_combine(L, R), L[0]), "tuple of length 3"),
        (lambda L, R: (right_combine(L, R)[0].sum(), right_combine(L, R)[1]),
         "keep the shape of the inputs"),
    ],
)
def test_combine_structure_is_checked_first(wrong, message):
    verdict = check.combine(wrong, strict=False)
    assert not verdict and message in verdict.message


@pytest.mark.parametrize(
    "wrong, message",
    [
        (lambda block, x_t, s: block.step(x_t, s)[0], "not one stacked tensor"),
        (lambda block, x_t, s: torch.stack([block.step(x_t, s)[0]] * 2),
         "return a tuple (y_t, state)"),
        (lambda block, x_t, s: (block.step(x_t, s)[0], block.step(x_t, s)[1][1]),
         "the state as a tuple"),
        (lambda block, x_t, s: (block.step(x_t, s)[0], (block.step(x_t, s)[1][1],
                                                        block.step(x_t, s)[1][0])),
         "the state's window has shape"),
        (lambda block, x_t, s: (block.step(x_t, s)[1][1].sum(-1), block.step(x_t, s)[1]),
         "block.out_proj"),
    ],
)
def test_step_structure_is_checked_first(wrong, message):
    verdict = check.mamba_step(wrong, strict=False)
    assert not verdict and message in verdict.message


def test_step_uses_only_public_pieces():
    import inspect

    from minimodels.check import ch05

    assert "._select" not in inspect.getsource(ch05)


def test_checkers_print_when_not_strict(capsys):
    check.combine(lambda L, R: (L[0] * R[0], F.relu(R[1])), strict=False)
    assert "Exercise 5.2" in capsys.readouterr().out
