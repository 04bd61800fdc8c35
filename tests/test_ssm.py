"""models.ssm: discretisations against scipy.signal.cont2discrete, HiPPO-LegS, the kernel
against materialised matrix powers, recurrence = convolution, and the S4D layer's two modes."""

import numpy as np
import pytest
import torch
from helpers import ALL, device_for, run_steps

from minimodels import use_backend
from minimodels.models.ssm import (
    METHODS,
    S4D,
    causal_fft_conv,
    discretize,
    hippo_legs,
    legs_decode,
    legs_encode,
    s4d_inv,
    s4d_lin,
    ssm_convolutional,
    ssm_kernel,
    ssm_recurrent,
)

signal = pytest.importorskip("scipy.signal")
pytestmark = pytest.mark.ch04

SCIPY = {"zoh": "zoh", "bilinear": "bilinear", "euler": "euler"}


def system(n=4, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=torch.float64, generator=g) - 2 * torch.eye(n, dtype=torch.float64)
    B = torch.randn(n, m, dtype=torch.float64, generator=g)
    return A, B


@pytest.mark.parametrize("method", list(SCIPY))
@pytest.mark.parametrize("m", [1, 3])
def test_dense_matches_scipy_cont2discrete(method, m):
    A, B = system(m=m)
    dt = 0.07
    n = A.shape[0]
    Ad_s, Bd_s, *_ = signal.cont2discrete(
        (A.numpy(), B.numpy(), np.eye(n), np.zeros((n, m))), dt, method=SCIPY[method])
    Ad, Bd = discretize(A, B, dt, method)
    assert Ad.dtype == torch.float64 and Bd.shape == B.shape
    np.testing.assert_allclose(Ad.numpy(), Ad_s, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(Bd.numpy(), Bd_s, rtol=1e-10, atol=1e-12)


def test_zoh_handles_singular_A():
    A = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # double integrator
    B = torch.tensor([0.0, 1.0], dtype=torch.float64)
    Ad, Bd = discretize(A, B, 0.5, "zoh")
    torch.testing.assert_close(Ad, torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(Bd, torch.tensor([0.125, 0.5], dtype=torch.float64))
    Ad_s, Bd_s, *_ = signal.cont2discrete((A.numpy(), B[:, None].numpy(), np.eye(2),
                                           np.zeros((2, 1))), 0.5, method="zoh")
    np.testing.assert_allclose(Bd.numpy(), Bd_s[:, 0], atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_equals_dense_of_diag(method):
    A = s4d_inv(5)  # complex diagonal
    A[2] = 0  # a zero eigenvalue: the zoh limit B̄ = Δ·B
    B = torch.randn(5, 2, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    Ad, Bd = discretize(A, B, 0.03, method)
    Ad_dense, Bd_dense = discretize(torch.diag(A), B, 0.03, method)
    torch.testing.assert_close(torch.diag(Ad), Ad_dense)
    torch.testing.assert_close(Bd, Bd_dense)
    Ad1, Bd1 = discretize(A, B[:, 0], 0.03, method)  # B as (n,) keeps its shape
    assert Bd1.shape == (5,)
    torch.testing.assert_close(Bd1, Bd[:, 0])


def test_mamba_rule_is_exp_and_dt_B():
    A, B = torch.tensor([-1.0, -3.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    Ad, Bd = discretize(A, B, 0.1, "mamba")
    torch.testing.assert_close(Ad, torch.exp(0.1 * A))
    torch.testing.assert_close(Bd, 0.1 * B)


def test_discretize_bad_input():
    A, B = system()
    with pytest.raises(ValueError, match="method"):
        discretize(A, B, 0.1, "rk4")
    with pytest.raises(ValueError, match="dt"):
        discretize(A, B, -0.1)
    with pytest.raises(ValueError, match="B must have shape"):
        discretize(A, B[:3], 0.1)
    with pytest.raises(ValueError, match="A must be"):
        discretize(A[:3], B, 0.1)
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        discretize(A.numpy(), B, 0.1)


def test_hippo_legs_closed_form():
    A, B = hippo_legs(3)
    s3, s5 = np.sqrt(3), np.sqrt(5)
    want = -np.array([[1, 0, 0], [s3, 2, 0], [s5, s5 * s3, 3]])
    np.testing.assert_allclose(A.numpy(), want)
    np.testing.assert_allclose(B[:, 0].numpy(), [1, s3, s5])


def test_legs_reconstructs_a_polynomial():
    t = (torch.arange(400, dtype=torch.float64) + 0.5) / 400
    u = 1 - 2 * t + 3 * t**2  # degree 2: a few coefficients represent it
    err = (legs_decode(legs_encode(u, 8)[-1], 400) - u).abs()
    assert err.mean() < 0.01 and err.max() < 0.1  # the largest error: the first steps, O(1/l)


def test_s4d_inits():
    torch.testing.assert_close(s4d_lin(3), torch.tensor([-0.5, -0.5 + np.pi * 1j,
                                                         -0.5 + 2 * np.pi * 1j], dtype=torch.complex128))
    A = s4d_inv(4)
    torch.testing.assert_close(A.imag, 4 / np.pi * (4 / (2 * torch.arange(4.0).double() + 1) - 1))
    assert (A.real == -0.5).all()


@pytest.mark.parametrize("diagonal", [False, True])
def test_kernel_equals_materialised_powers(diagonal):
    if diagonal:
        Ad, Bd = discretize(s4d_lin(4), torch.ones(4, dtype=torch.complex128), 0.1)
        Ad_m = torch.diag(Ad)
        C = torch.randn(4, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    else:
        A, B = hippo_legs(4)
        Ad, Bd = discretize(A, B[:, 0], 0.05, "bilinear")
        Ad_m, C = Ad, torch.ones(4, dtype=torch.float64)
    want = torch.stack([C @ torch.linalg.matrix_power(Ad_m, j) @ Bd for j in range(30)])
    torch.testing.assert_close(ssm_kernel(Ad, Bd, C, 30), want)


@pytest.mark.parametrize("L", [1, 7, 64])
def test_recurrent_equals_convolutional(L):
    A, B = hippo_legs(6)
    Ad, Bd = discretize(A, B[:, 0], 0.1, "zoh")
    C = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    u = torch.randn(3, 2, L, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ssm_convolutional(Ad, Bd, C, u), ssm_recurrent(Ad, Bd, C, u))


def test_causal_fft_conv_is_reexported_from_the_kernel_module():
    """Chapters import it from models.ssm; it lives in kernels/long_conv/ (tested there)."""
    from minimodels.kernels import long_conv

    assert causal_fft_conv is long_conv.causal_fft_conv
    with pytest.raises(ValueError, match="k must have 1 <= lk <= L = 5"):
        causal_fft_conv(torch.zeros(2, 5), torch.zeros(2, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_s4d_step_equals_forward(dtype):
    layer = S4D(5, 8, seed=0)
    if dtype == torch.float64:
        layer = layer.double()
    x = torch.randn(2, 40, 5, dtype=dtype, generator=torch.Generator().manual_seed(5))
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    state, ys = None, []
    for t in range(x.shape[1]):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t)
    assert state.shape == (2, 5, 4) and ys[0].dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=tol, atol=tol)


def test_s4d_learns_gradients_and_bad_d_state():
    layer = S4D(3, 4, seed=0)
    layer(torch.randn(1, 10, 3)).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    with pytest.raises(ValueError, match="d_state"):
        S4D(3, 5)


def old_s4d_forward(layer, x):
    """The layer's forward before it called s4d_kernel: its kernel in PyTorch (real arithmetic
    for the powers), then the FFT convolution and D·u. x (b, l, d) -> (b, l, d)."""
    A, C, dt = layer.ssm()
    dtA = dt[:, None] * A  # (d, n)
    w = 2 * C * torch.expm1(dtA) / A  # (d, n): 2·C·B̄
    l = torch.arange(x.shape[1], dtype=dt.dtype, device=dt.device)
    mag = torch.exp(dtA.real[..., None] * l)  # (d, n, l)
    phase = dtA.imag[..., None] * l  # (d, n, l)
    K = (mag * (w.real[..., None] * torch.cos(phase) - w.imag[..., None] * torch.sin(phase))
         ).sum(1)  # (d, l)
    u = x.transpose(1, 2)  # (b, d, l)
    return (causal_fft_conv(u, K) + layer.D[:, None] * u).transpose(1, 2)


@pytest.mark.parametrize("backend", ALL)
def test_s4d_forward_on_each_backend_equals_the_old_formula(backend):
    """float64; the cuda backend (the simulator in CI) at a tiny size."""
    dev = device_for(backend)
    layer = S4D(3, 6, seed=1).double().to(dev)
    x = torch.randn(2, 29, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = x.to(dev)
    with use_backend(backend):
        y = layer(x)
    want = old_s4d_forward(layer, x)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    g = torch.randn(y.shape, dtype=torch.float64, device=dev)
    got = torch.autograd.grad(y, list(layer.parameters()), g)
    expected = torch.autograd.grad(want, list(layer.parameters()), g)
    for (name, _), a, b in zip(layer.named_parameters(), got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    ys, _ = run_steps(layer, x)
    torch.testing.assert_close(ys, y, rtol=1e-10, atol=1e-11)


def test_s4d_parameters_unchanged_by_the_kernel_switch():
    """Parameter names, shapes, creation order and the RNG draws are the chapter's."""
    layer = S4D(4, 8, seed=3)
    names = [name for name, _ in layer.named_parameters()]
    assert names == ["log_A_real", "A_imag", "C", "log_dt", "D"]
    g = torch.Generator().manual_seed(3)
    C = torch.randn(4, 4, 2, generator=g) * 0.5 ** 0.5
    u = torch.rand(4, generator=g)
    D = torch.randn(4, generator=g)
    torch.testing.assert_close(layer.C.data, C)
    torch.testing.assert_close(layer.log_dt.data, torch.log(torch.tensor(1e-3))
                               + u * (torch.log(torch.tensor(1e-1)) - torch.log(torch.tensor(1e-3))))
    torch.testing.assert_close(layer.D.data, D)
