"""long_conv: the direct O(L²) reference and the FFT path against convolutions outside the
project (numpy.convolve, scipy.signal.convolve, truncated to the first L outputs) and against
the direct sum written as a Python loop, in float64 and complex128; broadcasting, gradients,
dispatch and bad input."""

import numpy as np
import pytest
import torch
from helpers import ALL, device_for

from minimodels import use_backend
from minimodels.kernels.long_conv import causal_conv_ref, causal_fft_conv, long_conv

signal = pytest.importorskip("scipy.signal")
pytestmark = pytest.mark.ch04

LENGTHS = [1, 2, 7, 13, 64, 97, 100, 257]  # 1, primes, powers of two and neither


def rand(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(shape, dtype=torch.float64, generator=g))
    return x.to(dtype)


def direct_loop(u, K):
    """y_k = Σ_{j ≤ k} K_j u_{k−j}, one Python loop per output (1-D)."""
    L = len(u)
    return np.array([sum(K[j] * u[k - j] for j in range(k + 1)) for k in range(L)])


@pytest.mark.parametrize("fn", [causal_conv_ref, causal_fft_conv])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_equals_numpy_and_scipy_convolve_truncated(fn, L, dtype):
    u, K = rand((3, L), dtype, seed=L), rand((3, L), dtype, seed=L + 1)
    y = fn(u, K)
    assert y.shape == (3, L) and y.dtype == dtype
    for i in range(3):
        want_np = np.convolve(u[i].numpy(), K[i].numpy())[:L]
        want_sp = signal.convolve(u[i].numpy(), K[i].numpy(), method="direct")[:L]
        np.testing.assert_allclose(y[i].numpy(), want_np, rtol=1e-10, atol=1e-11 * L)
        np.testing.assert_allclose(y[i].numpy(), want_sp, rtol=1e-10, atol=1e-11 * L)


@pytest.mark.parametrize("L", [1, 5, 31])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_equals_the_direct_sum(L, dtype):
    u, K = rand(L, dtype, seed=3), rand(L, dtype, seed=4)
    want = direct_loop(u.tolist(), K.tolist())
    for fn in (causal_conv_ref, causal_fft_conv):
        np.testing.assert_allclose(fn(u, K).numpy(), want, rtol=1e-12, atol=1e-12)


def test_fft_path_is_not_circular():
    """An impulse at the last position must not wrap onto the start (a circular convolution,
    the learner's classic mistake, would put K_1 at y_0)."""
    u = torch.zeros(16, dtype=torch.float64)
    u[-1] = 1
    K = torch.arange(1, 17, dtype=torch.float64)
    want = torch.zeros(16, dtype=torch.float64)
    want[-1] = 1
    torch.testing.assert_close(causal_fft_conv(u, K), want)


def test_broadcasting_and_mixed_dtypes():
    u, K = rand((2, 3, 40)), rand((3, 40), seed=1)  # one kernel per channel, shared over batch
    y = causal_fft_conv(u, K)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, causal_conv_ref(u, K))
    torch.testing.assert_close(y[1, 2], causal_conv_ref(u[1, 2], K[2]))
    yc = causal_fft_conv(u.float(), rand((3, 40), torch.complex128, seed=2))  # real * complex
    assert yc.dtype == torch.complex128
    torch.testing.assert_close(yc, causal_conv_ref(u.float(), rand((3, 40), torch.complex128,
                                                                     seed=2)))
    assert causal_fft_conv(u.float(), K.float()).dtype == torch.float32


def test_empty_sequence():
    u, K = torch.zeros(2, 0), torch.zeros(2, 0)
    for fn in (causal_conv_ref, causal_fft_conv):
        assert fn(u, K).shape == (2, 0)


@pytest.mark.parametrize("backend", ALL)  # cpu and cuda: the FFT path (torch's on the device)
def test_long_conv_backends_and_gradients(backend):
    dev = device_for(backend)
    u, K = rand((2, 3, 37)).to(dev).requires_grad_(), rand((3, 37), seed=1).to(dev).requires_grad_()
    y = long_conv(u, K, backend=backend)
    u0, K0 = u.detach().cpu().requires_grad_(), K.detach().cpu().requires_grad_()
    want = causal_conv_ref(u0, K0)
    torch.testing.assert_close(y.detach().cpu(), want.detach())
    gy = rand((2, 3, 37), seed=5)
    got = torch.autograd.grad(y, (u, K), gy.to(dev))
    expected = torch.autograd.grad(want, (u0, K0), gy)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.cpu(), b)


def test_use_backend_selects_the_direct_sum():
    calls = []

    def spy(u, K):
        calls.append(u.shape)
        return causal_conv_ref(u, K)

    u, K = rand((2, 9)), rand((2, 9), seed=1)
    with use_backend(spy):
        y = long_conv(u, K)
    assert calls == [(2, 9)]
    torch.testing.assert_close(y, causal_fft_conv(u, K))


def test_gradcheck_fft_path():
    u, K = rand((2, 11)).requires_grad_(), rand((2, 11), seed=1).requires_grad_()
    assert torch.autograd.gradcheck(causal_fft_conv, (u, K))
    uc = rand((11,), torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(causal_fft_conv, (uc, K.detach()[0].requires_grad_()))


def test_bad_input_names_the_argument():
    u, K = rand((2, 8)), rand((2, 8))
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        causal_fft_conv(u.numpy(), K)
    with pytest.raises(TypeError, match="k must be a float or complex"):
        causal_fft_conv(u, K.long())
    with pytest.raises(ValueError, match="k must have 1 <= lk <= L = 5"):
        causal_fft_conv(u[..., :5], K)
    with pytest.raises(ValueError, match="K must have length L = 8"):
        long_conv(u, K[..., :5])
    with pytest.raises(ValueError, match="broadcastable"):
        causal_fft_conv(rand((3, 8)), K)
    with pytest.raises(ValueError, match="u must have at least 1 dimension"):
        long_conv(torch.tensor(1.0), K)
    with pytest.raises(ValueError, match="k must have 1 <= lk"):
        causal_conv_ref(u[..., :5], K)
