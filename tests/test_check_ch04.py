"""The chapter-04 checkers against the mistakes learners make: each gets its verdict."""

import pytest
import torch

from minimodels import check
from minimodels.kernels.long_conv import causal_fft_conv

pytestmark = pytest.mark.ch04


def not_implemented(*args):
    raise NotImplementedError


# Exercise 4.1 ---------------------------------------------------------------------------------

def zoh(A, B, dt):
    return torch.exp(dt * A), (torch.exp(dt * A) - 1) / A * B


def bilinear(A, B, dt):
    return (1 + dt / 2 * A) / (1 - dt / 2 * A), dt * B / (1 - dt / 2 * A)


@pytest.mark.parametrize("fn, message", [
    (zoh, "passed 4 checks"),
    (lambda A, B, dt: (zoh(A, B, dt)[0], zoh(A, B, dt)[1].conj()), "Bd: wrong values"),
    (lambda A, B, dt: (zoh(A, B, dt)[0].conj(), zoh(A, B, dt)[1]), "Ad: wrong values"),
    (not_implemented, "not implemented yet"),
    (lambda A, B, dt: (1 + dt * A, dt * B), "forward Euler"),
    (lambda A, B, dt: (torch.exp(dt * A), dt * B), "Euler's (and Mamba's) rule"),
    (lambda A, B, dt: (torch.exp(A) * dt, (torch.exp(A) * dt - 1) / A * B), "exp(A)·Δ"),
    (lambda A, B, dt: (torch.exp(dt * A), (torch.exp(dt * A) - 1) * B), "division by A"),
    (bilinear, "bilinear rule, not ZOH"),
    (lambda A, B, dt: torch.exp(dt * A), "return a tuple (Ad, Bd), not one"),
    (lambda A, B, dt: torch.stack(zoh(A, B, dt)), "not one stacked tensor"),
    (lambda A, B, dt: (torch.exp(dt * A),), "tuple of length 1"),
    (lambda A, B, dt: (torch.exp(dt * A), 1.0), "Bd is a float"),
    (lambda A, B, dt: (torch.exp(dt * A), B.sum()), "Bd: wrong shape"),
    (lambda A, B, dt: zoh(A.to(torch.complex128), B, dt), "Ad is complex on real A"),
])
def test_zoh_diagonal(fn, message):
    verdict = check.zoh_diagonal(fn, strict=False)
    assert message in verdict.message and verdict.passed == message.startswith("passed")


@pytest.mark.parametrize("fn, message", [
    (bilinear, "passed 4 checks"),
    (lambda A, B, dt: (1 + dt * A, dt * B), "forward Euler"),
    (zoh, "this is ZOH"),
    (lambda A, B, dt: ((1 - dt / 2 * A) / (1 + dt / 2 * A), dt * B / (1 + dt / 2 * A)),
     "swapped"),
    (lambda A, B, dt: (bilinear(A, B, dt)[0], B / (1 - dt / 2 * A)), "missing its factor Δ"),
    (lambda A, B, dt: (bilinear(A, B, dt)[0], dt * B), "missing the division"),
])
def test_bilinear_diagonal(fn, message):
    verdict = check.bilinear_diagonal(fn, strict=False)
    assert message in verdict.message and verdict.passed == message.startswith("passed")


# Exercise 4.2 ---------------------------------------------------------------------------------

def fft_conv(u, K, pad=2, keep="first"):
    L = u.shape[-1]
    n = pad * L
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)
    return y[..., :L] if keep == "first" else y[..., -L:]


@pytest.mark.parametrize("fn, message", [
    (fft_conv, "passed 4 checks"),
    (lambda u, K: fft_conv(u, K, pad=1), "circular convolution"),
    (lambda u, K: fft_conv(u, K, keep="last"), "last L samples"),
    (lambda u, K: fft_conv(u, K.flip(-1)), "correlation"),
    (lambda u, K: fft_conv(u, K).double(), "wrong dtype"),
    (lambda u, K: torch.fft.irfft(torch.fft.rfft(u, n=2 * u.shape[-1])
                                  * torch.fft.rfft(K, n=2 * u.shape[-1])), "wrong shape"),
    (not_implemented, "not implemented yet"),
])
def test_causal_fft_conv(fn, message):
    verdict = check.causal_fft_conv(fn, strict=False)
    assert message in verdict.message and verdict.passed == message.startswith("passed")


# Exercise 4.3 ---------------------------------------------------------------------------------

def make_step(Ad="zoh", Bd="zoh", two=2.0, D_term=True, old=False):
    def step(x, u, A, C, D, dt):
        dtA = dt[:, None] * A
        a = {"zoh": torch.exp(dtA), "euler": 1 + dtA, "expAdt": torch.exp(A) * dt[:, None]}[Ad]
        b = {"zoh": (torch.exp(dtA) - 1) / A, "dt": dt[:, None] + 0 * A,
             "expAdt": (torch.exp(A) * dt[:, None] - 1) / A}[Bd]
        new = a * x + b * u[..., None]
        y = two * (C * (x if old else new)).sum(-1).real + (D * u if D_term else 0)
        return y, new
    return step


@pytest.mark.parametrize("fn, message", [
    (make_step(), "passed 4 checks"),
    (make_step("euler", "dt"), "forward Euler"),
    (make_step("zoh", "dt"), "Euler's (Mamba's) rule"),
    (make_step("expAdt", "expAdt"), "exp(A)·Δ"),
    (make_step(two=1.0), "factor 2"),
    (make_step(D_term=False), "D·u is missing"),
    (make_step(old=True), "old state"),
    (lambda x, u, A, C, D, dt: make_step()(x, u, A, C, D, dt)[0],
     "return a tuple (y, x_new), not one stacked tensor"),
    (lambda x, u, A, C, D, dt: torch.stack([*make_step()(x, u, A, C, D, dt)[1:],
                                            make_step()(x, u, A, C, D, dt)[1]]),
     "not one stacked tensor"),
    (lambda x, u, A, C, D, dt: (2 * (C * make_step()(x, u, A, C, D, dt)[1]).sum(-1) + D * u,
                                make_step()(x, u, A, C, D, dt)[1]), "Take `.real`"),
    (lambda x, u, A, C, D, dt: (make_step()(x, u, A, C, D, dt)[0],
                                make_step()(x, u, A, C, D, dt)[1].real), "x_new is real"),
    (not_implemented, "not implemented yet"),
])
def test_s4d_step(fn, message):
    verdict = check.s4d_step(fn, strict=False)
    assert message in verdict.message and verdict.passed == message.startswith("passed")


def test_checkers_raise_under_pytest():
    """strict=None means strict under pytest: a wrong answer raises, a right one returns its
    passed verdict (and the package's own causal_fft_conv is a right answer)."""
    with pytest.raises(check.CheckFailed, match="circular"):
        check.causal_fft_conv(lambda u, K: fft_conv(u, K, pad=1))
    verdict = check.causal_fft_conv(causal_fft_conv)
    assert verdict.passed and "passed 4 checks" in verdict.message
