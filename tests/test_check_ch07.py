"""Chapter 07 checkers: the right answers pass, and each typical wrong answer fails with its
hint (the circular wrap-around, one sample too little padding, the filter reversed, the skip
forgotten, the window's time unscaled or growing, a gate before instead of after its
convolution, the gates or filters swapped)."""

import math

import pytest
import torch

from minimodels import check
from minimodels.check import CheckFailed
from minimodels.check.ch07 import _fft_conv, _filter, _hyena2
from minimodels.kernels.long_conv import causal_conv

pytestmark = pytest.mark.ch07


def right_conv(u, k, D):
    l = u.shape[-1]
    n = 2 * l  # any n >= l + lk − 1 is right (lk <= l)
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :l] + (
        D[:, None] * u)


def right_filter(l, ffn, alpha, l_max, bands):
    t = torch.arange(l, dtype=torch.float64) / l_max  # (l,)
    f = torch.arange(1, bands + 1, dtype=torch.float64)
    ang = 2 * math.pi * t[:, None] * f
    z = torch.cat([t[:, None], ang.cos(), ang.sin()], -1)
    return ffn(z).T * torch.exp(-alpha[:, None] * t)


def right_recurrence(x1, x2, v, h, D):
    z = x1 * causal_conv(v, h[0], D=D[0])
    return x2 * causal_conv(z, h[1], D=D[1])


def test_right_answers_pass():
    assert check.causal_conv_fft(right_conv, strict=True)
    assert check.implicit_filter(right_filter, strict=True)
    assert check.hyena_recurrence(right_recurrence, strict=True)
    assert check.hyena_recurrence(_hyena2, strict=True)


def not_yet(*args):
    raise NotImplementedError("Exercise")


@pytest.mark.parametrize("checker", [check.causal_conv_fft, check.implicit_filter,
                                     check.hyena_recurrence])
def test_not_implemented(checker):
    verdict = checker(not_yet, strict=False)
    assert not verdict and "not implemented yet" in verdict.message


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda u, k, D: _fft_conv(u, k, D, n=u.shape[-1]), "circular convolution"),
        (lambda u, k, D: _fft_conv(u, k, D, n=u.shape[-1] + k.shape[-1] - 2),
         "one sample of wrap-around"),
        (lambda u, k, D: _fft_conv(u, k, D, flip=True), "reversed in time"),
        (lambda u, k, D: _fft_conv(u, k, D, skip=False), "skip term is missing"),
        (lambda u, k, D: right_conv(u, k, D).double(), "wrong dtype"),
        (lambda u, k, D: right_conv(u, k, D).transpose(-1, -2), "wrong shape"),
    ],
)
def test_conv_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.causal_conv_fft(wrong, strict=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda *a: _filter(*a, scale=False), "not divided by l_max"),
        (lambda *a: _filter(*a, reverse=True), "filter is reversed in time"),
        (lambda *a: _filter(*a, window=False), "window is missing"),
        (lambda *a: _filter(*a, grow=True), "window grows"),
        (lambda *a: _filter(*a).T, "wrong shape"),
    ],
)
def test_filter_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.implicit_filter(wrong, strict=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda *a: _hyena2(*a, gate_first=True), "applied before its convolution"),
        (lambda *a: _hyena2(*a, swap_gates=True), "gates are swapped"),
        (lambda *a: _hyena2(*a, swap_filters=True), "filters are swapped"),
        (lambda *a: _hyena2(*a, skip=False), "skip terms D"),
        (lambda *a: (_hyena2(*a), None), "returned tuple"),
    ],
)
def test_recurrence_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.hyena_recurrence(wrong, strict=True)
