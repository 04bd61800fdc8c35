"""fastexp.exp_neg, the vectorisable exp of the CPU kernels: accuracy against exp in long double
and against ``math.exp`` over the whole range the kernels use, 0 below it, and the dtype."""

import math

import numpy as np
import pytest
from numba import njit

from minimodels.kernels.fastexp import EXP_MIN32, EXP_MIN64, exp_neg, exp_rows


@njit(cache=True)
def _libm(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = math.exp(x[i])
    return out


@pytest.mark.parametrize("dtype, lo, max_rel", [(np.float32, EXP_MIN32, 1.1e-7),
                                                (np.float64, EXP_MIN64, 2.2e-16)])
def test_exp_neg_is_accurate_to_an_ulp(dtype, lo, max_rel):
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(lo, 0, 200_001), -rng.random(100_000) * 5,
                        [0.0, -1e-30, lo]]).astype(dtype)
    y = x.copy()
    exp_rows(y, y.size)
    assert y.dtype == dtype
    exact = np.exp(x.astype(np.longdouble))
    rel = np.abs((y.astype(np.longdouble) - exact) / exact).astype(np.float64)
    assert rel.max() < max_rel  # under one eps (measured 0.66 eps in both dtypes)
    libm = _libm(x)
    assert (np.abs(y.astype(np.float64) - libm) <= np.spacing(libm).astype(np.float64)).all()


@pytest.mark.parametrize("dtype, lo", [(np.float32, EXP_MIN32), (np.float64, EXP_MIN64)])
def test_arguments_below_the_minimum_give_zero_and_nan_stays_nan(dtype, lo):
    """e^-inf = 0 exactly (it was clamped to e^EXP_MIN = 1.6e-38, which WKV's CPU kernel then
    returned as the whole weight of an empty past: the fuzzer's finding); e^EXP_MIN itself is
    still a normal number; nan propagates (the kernels rely on it to report nan inputs)."""
    x = np.array([lo - 1, -1e30, -np.inf, np.nan, lo], dtype)
    exp_rows(x, x.size)
    assert (x[:3] == 0).all() and np.isnan(x[3])
    assert x[4] == pytest.approx(math.exp(lo), rel=1e-6) and x[4] >= np.finfo(dtype).tiny
    assert exp_neg(-math.inf) == 0.0 and exp_neg(lo) == math.exp(lo)  # the Python stand-in


def test_scalar_exp_neg_keeps_the_dtype():
    @njit
    def f(x):
        return exp_neg(x)

    assert f(np.float32(-1.0)) == pytest.approx(math.exp(-1.0), rel=1e-7)
    assert str(f.nopython_signatures[0].return_type) == "float32"  # no float64 in between
    assert f(np.float64(-1.0)) == pytest.approx(math.exp(-1.0), rel=1e-15)
    assert exp_neg(-1.0) == math.exp(-1.0)  # the Python stand-in
