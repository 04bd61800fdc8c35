"""s4d_kernel: every backend against the float64 reference (itself checked against the
materialised Vandermonde product of the generic ``ssm_kernel``), long-L accuracy of the power
recurrence, and bad input."""

import math

import pytest
import torch
from helpers import ALL, KERNELS, device_for

from minimodels.kernels.ssm_kernel import s4d_kernel, s4d_kernel_ref
from minimodels.models.ssm import discretize, s4d_inv, s4d_lin, ssm_kernel

pytestmark = pytest.mark.ch04

REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def inputs(h, n, dtype=torch.complex128, seed=0, init=s4d_lin, device="cpu"):
    """S4D-style inputs: A from an S4D init, random C, log-uniform dt in [1e-3, 1e-1]."""
    g = torch.Generator().manual_seed(seed)
    A = init(n).repeat(h, 1)  # (h, n)
    C = torch.randn(h, n, dtype=torch.complex128, generator=g)
    u = torch.rand(h, generator=g, dtype=torch.float64)
    dt = torch.exp(math.log(1e-3) + u * (math.log(1e-1) - math.log(1e-3)))
    return A.to(device, dtype), C.to(device, dtype), dt.to(device, REAL[dtype])


def rel_error(K, want):
    return ((K.cpu().double() - want).abs().max() / want.abs().max()).item()


def test_reference_equals_vandermonde_of_discretised_system():
    A, C, dt = inputs(3, 4)
    K = s4d_kernel_ref(A, C, dt, 50)
    for c in range(3):
        Ad, Bd = discretize(A[c], torch.ones(4, dtype=A.dtype), dt[c].item(), "zoh")
        want = 2 * ssm_kernel(Ad, Bd, C[c], 50).real
        torch.testing.assert_close(K[c], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (2, 5, 37), (3, 9, 70)])
def test_backends_equal_float64_reference(backend, dtype, shape):
    h, n, L = shape
    A, C, dt = inputs(h, n, dtype, seed=h + n + L, device=device_for(backend))
    want = s4d_kernel_ref(*inputs(h, n, seed=h + n + L), L)
    if dtype == torch.complex64:  # the same float32-rounded inputs, evaluated in float64
        want = s4d_kernel_ref(A.cpu().to(torch.complex128), C.cpu().to(torch.complex128),
                              dt.cpu().double(), L)
    K = s4d_kernel(A, C, dt, L, backend=backend)
    assert K.dtype == REAL[dtype] and K.shape == (h, L) and K.device.type == A.device.type
    assert rel_error(K, want) < (1e-12 if dtype == torch.complex128 else 2e-6)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_cpu_kernel_long_sequence_relative_error(dtype):
    """L = 4096 crosses 32 blocks and 4 exact re-anchors: the measured error stays < 1e-4."""
    A, C, dt = inputs(8, 32, dtype, init=s4d_inv)
    want = s4d_kernel_ref(A.to(torch.complex128), C.to(torch.complex128), dt.double(), 4096)
    err = rel_error(s4d_kernel(A, C, dt, 4096, backend="cpu"), want)
    assert err < (1e-4 if dtype == torch.complex64 else 1e-12), err


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_handle_zero_eigenvalue_and_odd_length(backend):
    A, C, dt = inputs(2, 3, device=device_for(backend))
    A[0, 1] = 0  # B̄ = Δ in the limit A -> 0
    K = s4d_kernel(A, C, dt, 23, backend=backend)
    torch.testing.assert_close(K.cpu(), s4d_kernel_ref(A.cpu(), C.cpu(), dt.cpu(), 23))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_accept_non_contiguous_inputs(backend):
    A, C, dt = inputs(4, 6, device=device_for(backend))
    At, Ct = A.T.contiguous().T, C[:, ::1].T.contiguous().T
    assert not At.is_contiguous()
    torch.testing.assert_close(s4d_kernel(At, Ct, dt, 9, backend=backend).cpu(),
                               s4d_kernel_ref(A.cpu(), C.cpu(), dt.cpu(), 9))


def test_reference_is_differentiable():
    A, C, dt = (x.requires_grad_() for x in inputs(2, 3))
    s4d_kernel(A, C, dt, 10, backend="ref").sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (A, C, dt))


def test_bad_input_names_the_argument():
    A, C, dt = inputs(2, 3, torch.complex64)
    with pytest.raises(TypeError, match="A must be"):
        s4d_kernel(A.real, C, dt, 4)
    with pytest.raises(ValueError, match="A must have 2"):
        s4d_kernel(A[0], C, dt, 4)
    with pytest.raises(TypeError, match="C must be"):
        s4d_kernel(A, C.to(torch.complex128), dt, 4)
    with pytest.raises(ValueError, match="C must have shape"):
        s4d_kernel(A, C[:, :2], dt, 4)
    with pytest.raises(TypeError, match="dt must be a float32"):
        s4d_kernel(A, C, dt.double(), 4)
    with pytest.raises(ValueError, match="dt must have shape"):
        s4d_kernel(A, C, dt[:1], 4)
    for L in (0, 2.5, True):
        with pytest.raises(ValueError, match="L must be"):
            s4d_kernel(A, C, dt, L)
