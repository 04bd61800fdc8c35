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
