"""The chapter-00 checker against the mistakes learners make: each must get its verdict."""

import numpy as np
import pytest
import torch

from minimodels import check
from minimodels.kernels.scan import linear_scan_ref


def correct(a, b, h0):
    h = torch.zeros_like(a[..., 0]) if h0 is None else h0
    out = torch.empty_like(a)
    for t in range(a.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out[..., t] = h
    return out


def not_implemented(a, b, h0):
    raise NotImplementedError("Exercise 0.1")


def crashes(a, b, h0):
    return a[..., 99]


def ignores_h0(a, b, h0):
    return correct(a, b, None)


def stores_before_update(a, b, h0):
    h = torch.zeros_like(a[..., 0]) if h0 is None else h0
    out = torch.empty_like(a)
    for t in range(a.shape[-1]):
        out[..., t] = h
        h = a[..., t] * h + b[..., t]
    return out


def b_inside(a, b, h0):
    return correct(a, a * b, h0)


def transposed(a, b, h0):  # stacks time on the wrong axis: (batch, l, d)
    return correct(a, b, h0).transpose(1, 2)


def nan_at_end(a, b, h0):
    out = correct(a, b, h0)
    out[..., -1] = float("nan")
    return out


def float64_state(a, b, h0):  # builds its state in the default dtype, whatever the inputs
    h = torch.zeros(a.shape[:2], dtype=torch.float64) if h0 is None else h0.double()
    return correct(a.double(), b.double(), h)


def returns_numpy(a, b, h0):
    return correct(a, b, h0).numpy()


def reversed_time(a, b, h0):
    return correct(a.flip(-1), b.flip(-1), h0).flip(-1)


def off_by_a_little(a, b, h0):
    return correct(a, b, h0) + 1e-3


@pytest.mark.parametrize(
    "fn, message",
    [
        (not_implemented, "not implemented yet"),
        (crashes, "raised IndexError on length 1"),
        (ignores_h0, "Hint: this is the scan started from zeros: did you ignore h0?"),
        (stores_before_update, "Hint: your h_t equals the expected h_{t-1}"),
        (b_inside, r"Hint: this is a_t·\(h_{t-1} \+ b_t\)"),
        (transposed, r"wrong shape on random \(2, 3, 7\).*got \(2, 7, 3\).*swap two axes"),
        (nan_at_end, r"NaN or inf on length 1.*first at index \(0, 0, 0\)"),
        (float64_state, r"wrong dtype on random \(3, 2, 9\) float32.*got float64, expected float32"),
        (returns_numpy, "returned ndarray on length 1"),
        (reversed_time, "Hint: this runs the recurrence from the end"),
        (off_by_a_little, r"wrong values on length 1.*max \|error\| 0.001, first bad index"),
    ],
)
def test_wrong_answers_get_their_verdict(fn, message):
    with pytest.raises(check.CheckFailed, match=message):
        check.linear_scan(fn)


def test_wrong_values_show_small_slices_not_the_solution():
    with pytest.raises(check.CheckFailed) as err:
        check.linear_scan(off_by_a_little)
    assert "yours[0, 0][:6] = [" in str(err.value) and "expected [" in str(err.value)
    assert "def " not in str(err.value) and "for t in" not in str(err.value)


def test_correct_answer_passes_and_prints_in_notebooks(capsys):
    verdict = check.linear_scan(correct, strict=False)
    assert verdict.passed and bool(verdict)
    assert capsys.readouterr().out.strip() == "Exercise 0.1 (correct): passed 4 checks."


def test_failure_prints_instead_of_raising_outside_pytest(capsys):
    verdict = check.linear_scan(ignores_h0, strict=False)
    assert not verdict.passed
    assert "did you ignore h0?" in capsys.readouterr().out


def test_reference_passes_its_own_checker():
    assert check.linear_scan(linear_scan_ref).passed


def test_inputs_are_not_shared_with_the_learner():
    """A function that scribbles on its inputs must not corrupt later cases or the reference."""

    def scribbles(a, b, h0):
        out = correct(a, b, h0)
        a.fill_(np.nan)
        return out

    assert check.linear_scan(scribbles).passed


# ---------------------------------------------------------------------------------------------
# Exercise 0.2: the scan as a Numba loop over NumPy rows, writing h in place
# ---------------------------------------------------------------------------------------------

numba = pytest.importorskip("numba")


def rows_plain(a, b, h0, h):
    for r in range(a.shape[0]):
        state = h0[r]
        for t in range(a.shape[1]):
            state = a[r, t] * state + b[r, t]
            h[r, t] = state


rows_ok = numba.njit(rows_plain)


@numba.njit
def rows_zero_start(a, b, h0, h):
    for r in range(a.shape[0]):
        state = 0.0
        for t in range(a.shape[1]):
            state = a[r, t] * state + b[r, t]
            h[r, t] = state


@numba.njit
def rows_state_across_rows(a, b, h0, h):
    state = h0[0]
    for r in range(a.shape[0]):
        for t in range(a.shape[1]):
            state = a[r, t] * state + b[r, t]
            h[r, t] = state


@numba.njit
def rows_store_first(a, b, h0, h):
    for r in range(a.shape[0]):
        state = h0[r]
        for t in range(a.shape[1]):
            h[r, t] = state
            state = a[r, t] * state + b[r, t]


@numba.njit
def rows_b_inside(a, b, h0, h):
    for r in range(a.shape[0]):
        state = h0[r]
        for t in range(a.shape[1]):
            state = a[r, t] * (state + b[r, t])
            h[r, t] = state


@numba.njit
def rows_swapped(a, b, h0, h):
    for r in range(a.shape[0]):
        state = h0[r]
        for t in range(a.shape[1]):
            state = b[r, t] * state + a[r, t]
            h[r, t] = state


@numba.njit
def rows_backwards(a, b, h0, h):
    for r in range(a.shape[0]):
        state = h0[r]
        for t in range(a.shape[1] - 1, -1, -1):
            state = a[r, t] * state + b[r, t]
            h[r, t] = state


@numba.njit
def rows_first_row_only(a, b, h0, h):
    state = h0[0]
    for t in range(a.shape[1]):
        state = a[0, t] * state + b[0, t]
        h[0, t] = state


@numba.njit
def rows_skips_step_0(a, b, h0, h):
    for r in range(a.shape[0]):
        state = h0[r]
        for t in range(1, a.shape[1]):
            state = a[r, t] * state + b[r, t]
            h[r, t] = state


@numba.njit
def rows_returns_new(a, b, h0, h):
    out = np.empty_like(a)
    for r in range(a.shape[0]):
        state = h0[r]
        for t in range(a.shape[1]):
            state = a[r, t] * state + b[r, t]
            out[r, t] = state
    return out


@numba.njit
def rows_uses_a_list(a, b, h0, h):
    for r in range(a.shape[0]):
        h[r] = [0.0] * 3 + a[r]


@numba.njit
def rows_not_implemented(a, b, h0, h):
    raise NotImplementedError("Exercise 0.2")


@pytest.mark.parametrize(
    "fn, message",
    [
        (rows_not_implemented, "Exercise 0.2 .*not implemented yet"),
        (rows_zero_start, r"Hint: this is the scan started from zeros: start each row from "
                          r"state = h0\[r\]"),
        (rows_state_across_rows, "Hint: each row starts where the previous row ended"),
        (rows_store_first, r"Hint: your h\[r, t\] equals the expected h\[r, t-1\]"),
        (rows_b_inside, r"Hint: this is a_t·\(h_{t-1} \+ b_t\)"),
        (rows_swapped, "Hint: this is b_t·h_{t-1} \\+ a_t"),
        (rows_backwards, "Hint: this runs the recurrence from the last step"),
        (rows_first_row_only, r"raised ValueError on random \(3 rows, 7 steps\): row 1 of h was "
                              "never written: loop over every row"),
        (rows_skips_step_0, r"h was never written: .*every step t \(starting at t = 0\)"),
        (rows_returns_new, "raised TypeError .*you returned ndarray and left h unwritten"),
        (rows_uses_a_list, "raised TypeError .*Numba could not compile your function"),
        (rows_plain, "right values, but rows_plain is a plain Python function: put @numba.njit"),
    ],
)
def test_scan_rows_wrong_answers(fn, message):
    with pytest.raises(check.CheckFailed, match=message):
        check.scan_rows(fn)


def test_scan_rows_correct_passes_and_prints_once(capsys):
    assert check.scan_rows(rows_ok, strict=False).passed
    assert capsys.readouterr().out.strip() == "Exercise 0.2 (rows_plain): passed 5 checks."


def test_scan_rows_failure_prints_one_verdict_outside_pytest(capsys):
    assert not check.scan_rows(rows_zero_start, strict=False).passed
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "state = h0[r]" in out[0]


# ---------------------------------------------------------------------------------------------
# Exercise 0.3: the slope of a log-log fit
# ---------------------------------------------------------------------------------------------


def slope_ok(x, y):
    return np.polyfit(np.log(x), np.log(y), 1)[0]


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda x, y: np.polyfit(x, y, 1)[0], "Hint: this is the slope of y against x: take logs"),
        (lambda x, y: np.polyfit(x, np.log(y), 1)[0], "Hint: only y is in logs"),
        (lambda x, y: np.polyfit(np.log(x), y, 1)[0], "Hint: only x is in logs"),
        (lambda x, y: np.polyfit(np.log(y), np.log(x), 1)[0], "Hint: you fitted log x against log y"),
        (lambda x, y: np.polyfit(np.log(x), np.log(y), 1)[1], "Hint: this is the intercept"),
        (lambda x, y: (np.log(y[-1]) - np.log(y[0])) / (np.log(x[-1]) - np.log(x[0])),
         r"wrong values on noisy timings.*Hint: this uses only the first and last points"),
        (lambda x, y: 10 ** slope_ok(x, y), r"Hint: this is 10\*\*slope"),
        (lambda x, y: np.polyfit(np.log(x), np.log(y), 1),
         r"raised TypeError .*return one number, the slope; you returned a ndarray of 2 numbers"),
        (lambda x, y: (slope_ok(x, y), 0.0), "raised TypeError .*return one number"),
        (lambda x, y: "steep", "raised TypeError .*return one number, the slope; you returned str"),
    ],
)
def test_loglog_slope_wrong_answers(fn, message):
    with pytest.raises(check.CheckFailed, match=message):
        check.loglog_slope(fn)


def test_loglog_slope_correct_passes():
    assert check.loglog_slope(slope_ok).passed
    assert check.loglog_slope(lambda x, y: np.polyfit(np.log10(x), np.log10(y), 1)[0]).passed
    assert check.loglog_slope(lambda x, y: torch.tensor(slope_ok(x, y))).passed
