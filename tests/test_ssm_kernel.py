"""s4d_kernel: every backend (ref included) against references outside the kernel module (a
NumPy loop in complex128 and the materialised Vandermonde product of the generic ``ssm_kernel``
of a ZOH-discretised system), long-L accuracy of the power recurrence, the backward kernels
against finite differences (gradcheck) and autograd of the reference, the edge cases of issue
#13 (tiny |A|, conjugate views, negative dt), example_inputs, and bad input."""

import cmath
import math
import sys

import numpy as np
import pytest
import torch
from helpers import ALL, CUDA, KERNELS, device_for

from minimodels.backend import cuda_simulated
from minimodels.kernels.ssm_kernel import example_inputs, s4d_kernel, s4d_kernel_ref
from minimodels.models.ssm import discretize, s4d_inv, s4d_lin, ssm_kernel

pytestmark = pytest.mark.ch04

REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def inputs(d, n, dtype=torch.complex128, seed=0, init=s4d_lin, device="cpu"):
    """S4D-style inputs: A from an S4D init, random C, log-uniform dt in [1e-3, 1e-1]."""
    g = torch.Generator().manual_seed(seed)
    A = init(n).repeat(d, 1)  # (d, n)
    C = torch.randn(d, n, dtype=torch.complex128, generator=g)
    u = torch.rand(d, generator=g, dtype=torch.float64)
    dt = torch.exp(math.log(1e-3) + u * (math.log(1e-1) - math.log(1e-3)))
    return A.to(device, dtype), C.to(device, dtype), dt.to(device, REAL[dtype])


def numpy_kernel(A, C, dt, L):
    """K[d, l] = 2·Re Σ_n C·(e^{ΔA} − 1)/A·(e^{ΔA})^l in complex128, a plain NumPy loop over
    (d, n) with powers by numpy's complex power; B̄ = Δ where A = 0."""
    A, C, dt = (x.detach().cpu().to(torch.complex128).numpy() for x in (A, C, dt))
    K = np.zeros((A.shape[0], L))
    l = np.arange(L)
    for c in range(A.shape[0]):
        for k in range(A.shape[1]):
            a, step = A[c, k], dt[c].real
            Bd = np.expm1(step * a) / a if a != 0 else step
            K[c] += 2 * (C[c, k] * Bd * np.exp(step * a) ** l).real
    return torch.from_numpy(K)


def rel_error(K, want):
    return ((K.detach().cpu().double() - want).abs().max() / want.abs().max()).item()


def as_complex128(*xs):
    return [x.detach().cpu().to(torch.complex128 if x.is_complex() else torch.float64)
            for x in xs]


def test_numpy_reference_equals_vandermonde_of_discretised_system():
    """The two independent references agree, so a test against either one can fail."""
    A, C, dt = inputs(3, 4)
    A[1, 2] = 0  # B̄ = Δ in the limit A -> 0
    K = numpy_kernel(A, C, dt, 50)
    for c in range(3):
        Ad, Bd = discretize(A[c], torch.ones(4, dtype=A.dtype), dt[c].item(), "zoh")
        want = 2 * ssm_kernel(Ad, Bd, C[c], 50).real
        torch.testing.assert_close(K[c], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (2, 5, 37), (3, 9, 70)])
def test_backends_equal_numpy_reference(backend, dtype, shape):
    d, n, L = shape
    A, C, dt = inputs(d, n, dtype, seed=d + n + L, device=device_for(backend))
    want = numpy_kernel(A, C, dt, L)  # the same (float32-rounded) inputs, in complex128
    K = s4d_kernel(A, C, dt, L, backend=backend)
    assert K.dtype == REAL[dtype] and K.shape == (d, L) and K.device.type == A.device.type
    assert rel_error(K, want) < (1e-12 if dtype == torch.complex128 else 2e-6)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_cpu_kernel_long_sequence_relative_error(dtype):
    """L = 4096 crosses 32 blocks and 4 exact re-anchors. complex64: the O(d·n) setup runs in
    float64 (measured 1.3e-7; 4.7e-7 when it was float32 for complex64 inputs)."""
    A, C, dt = inputs(8, 32, dtype, init=s4d_inv)
    want = s4d_kernel_ref(*as_complex128(A, C, dt), 4096)
    err = rel_error(s4d_kernel(A, C, dt, 4096, backend="cpu"), want)
    assert err < (3e-7 if dtype == torch.complex64 else 1e-12), err


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_handle_zero_eigenvalue_and_odd_length(backend):
    A, C, dt = inputs(2, 3, device=device_for(backend))
    A[0, 1] = 0  # B̄ = Δ in the limit A -> 0
    K = s4d_kernel(A, C, dt, 23, backend=backend)
    torch.testing.assert_close(K.cpu(), numpy_kernel(A, C, dt, 23), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_accept_non_contiguous_inputs(backend):
    A, C, dt = inputs(4, 6, device=device_for(backend))
    At, Ct = A.T.contiguous().T, C.T.contiguous().T
    assert not At.is_contiguous() and not Ct.is_contiguous()
    torch.testing.assert_close(s4d_kernel(At, Ct, dt, 9, backend=backend).cpu(),
                               s4d_kernel_ref(A.cpu(), C.cpu(), dt.cpu(), 9))


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_gradcheck_complex128(backend):
    """Finite differences in complex128 (PyTorch's convention for complex gradients); the
    simulator is slow, so it gets gradcheck's fast mode (random projections). The cuda
    backward adds its partial sums with atomics, in an order that varies from run to run (seen:
    1 gradcheck in 30 differed in the last bit), hence nondet_tol."""
    A, C, dt = (x.requires_grad_() for x in inputs(2, 3, device=device_for(backend), seed=1))
    fn = lambda a, c, t: s4d_kernel(a, c, t, 11, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (A, C, dt), fast_mode=backend == "cuda",
                                    nondet_tol=1e-12 if backend == "cuda" else 0.0)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 37), (2, 9, 70)])
def test_backward_kernel_equals_autograd_of_reference(backend, shape):
    d, n, L = shape
    dev = device_for(backend)
    A, C, dt = inputs(d, n, device=dev, seed=sum(shape))
    A[0, 0] = 0  # the series branch of φ1 and φ1'
    A[-1, -1] = 1e-3 - 2e-3j  # |Δ·A| < 1/2: φ1' by its Taylor series
    G = torch.randn(d, L, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad(s4d_kernel(*(x.requires_grad_() for x in (A, C, dt)), L,
                                         backend=backend), (A, C, dt), G.to(dev))
    ref = [x.detach().cpu().requires_grad_() for x in (A, C, dt)]
    want = torch.autograd.grad(s4d_kernel_ref(*ref, L), ref, G)
    for name, a, b in zip("A C dt".split(), got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_cpu_backward_long_sequence(dtype):
    """L = 4096: the backward's anchors and block sums against autograd of the complex128
    reference on the same inputs."""
    A, C, dt = inputs(4, 16, dtype, init=s4d_inv, seed=3)
    G = torch.randn(4, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    leaves = [x.requires_grad_() for x in (A, C, dt)]
    got = torch.autograd.grad(s4d_kernel(*leaves, 4096, backend="cpu"), leaves, G.to(REAL[dtype]))
    ref = [x.requires_grad_() for x in as_complex128(A, C, dt)]
    want = torch.autograd.grad(s4d_kernel_ref(*ref, 4096), ref, G)
    for name, a, b, leaf in zip("A C dt".split(), got, want, leaves, strict=True):
        assert a.dtype == leaf.dtype, name
        err = ((a.to(b.dtype) - b).abs().max() / b.abs().max()).item()
        assert err < (1e-5 if dtype == torch.complex64 else 1e-11), (name, err)


@pytest.mark.parametrize("backend", KERNELS)
def test_complex64_gradients_close_to_complex128(backend):
    A, C, dt = inputs(3, 6, torch.complex64, device=device_for(backend), seed=4)
    G = torch.randn(3, 50, generator=torch.Generator().manual_seed(9))
    leaves = [x.requires_grad_() for x in (A, C, dt)]
    got = torch.autograd.grad(s4d_kernel(*leaves, 50, backend=backend), leaves, G.to(A.device))
    ref = [x.requires_grad_() for x in as_complex128(A, C, dt)]
    want = torch.autograd.grad(s4d_kernel_ref(*ref, 50), ref, G.double())
    for a, b in zip(got, want, strict=True):
        assert ((a.cpu().to(b.dtype) - b).abs().max() / b.abs().max()).item() < 1e-5


@pytest.mark.parametrize("backend", KERNELS)
def test_empty_sizes_forward_and_backward(backend):
    for d, n in [(0, 3), (2, 0)]:
        dev = device_for(backend)
        A, C = (torch.zeros(d, n, dtype=torch.complex128, device=dev, requires_grad=True)
                for _ in range(2))
        dt = torch.full((d,), 0.1, dtype=torch.float64, device=dev, requires_grad=True)
        K = s4d_kernel(A, C, dt, 5, backend=backend)
        assert K.shape == (d, 5) and not K.any()
        grads = torch.autograd.grad(K.sum(), (A, C, dt), allow_unused=True)
        assert all(g is None or not g.any() for g in grads)


# ---------------------------------------------------------------------------------------------
# Issue #13: edge cases, on every backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype, size", [(torch.complex128, 5e-162), (torch.complex64, 3e-23),
                                         (torch.complex128, 1e-9), (torch.complex64, 1e-5)])
def test_tiny_eigenvalue_gives_B_bar_equal_dt(backend, dtype, size):
    """|A|² subnormal (or tiny): B̄ = (e^{ΔA} − 1)/A → Δ, so K_l → 2·Re(C)·Δ for every l. The
    old quotient gave K = 0 (complex128, |A| = 5e-162) and a 36% error (complex64, 3e-23)."""
    dev = device_for(backend)
    A = torch.tensor([[complex(-size, size), -0.5 + 3j]], dtype=dtype, device=dev)
    C = torch.tensor([[0.8 - 0.3j, 0j]], dtype=dtype, device=dev)
    dt = torch.tensor([0.01], dtype=REAL[dtype], device=dev)
    K = s4d_kernel(A, C, dt, 6, backend=backend).cpu().double()
    want = 2 * 0.8 * dt.cpu().double()
    rtol = max(1e-12 if dtype == torch.complex128 else 1e-6, 10 * size)  # the limit's O(ΔA·l)
    torch.testing.assert_close(K, want.expand(1, 6), rtol=rtol, atol=0)
    leaves = [x.requires_grad_() for x in (A, C, dt)]
    grads = torch.autograd.grad(s4d_kernel(*leaves, 6, backend=backend).sum(), leaves)
    assert all(torch.isfinite(torch.view_as_real(g) if g.is_complex() else g).all()
               for g in grads)
    torch.testing.assert_close(grads[1][0, 0].cpu(), torch.tensor(12 * 0.01, dtype=dtype),
                               rtol=1e-5, atol=0)  # ∂K_l/∂C = 2·B̄ = 2·Δ, summed over 6 l


@pytest.mark.parametrize("backend", ALL)
def test_conjugate_views(backend):
    """A.conj() and C.conj() are lazy views in torch; the kernels resolve them."""
    A, C, dt = inputs(3, 4, device=device_for(backend), seed=5)
    Ac, Cc = A.conj(), C.conj()
    assert Ac.is_conj() and Cc.is_conj()
    K = s4d_kernel(Ac, Cc, dt, 13, backend=backend)
    torch.testing.assert_close(K.cpu(), numpy_kernel(Ac.resolve_conj(), Cc.resolve_conj(), dt,
                                                     13), rtol=1e-12, atol=1e-12)
    a, c = A.clone().requires_grad_(), C.clone().requires_grad_()
    got = torch.autograd.grad(s4d_kernel(a.conj(), c.conj(), dt, 13, backend=backend).sum(),
                              (a, c))
    a0, c0 = A.cpu().requires_grad_(), C.cpu().requires_grad_()
    want = torch.autograd.grad(s4d_kernel_ref(a0.conj(), c0.conj(), dt.cpu(), 13).sum(),
                               (a0, c0))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
def test_negative_and_zero_dt_follow_the_formula(backend):
    """dt is not checked for sign (a CUDA tensor's values cost a synchronisation to read): Δ < 0
    means the same formula on every backend (a growing kernel), and Δ = 0 gives K = 0."""
    A, C, dt = inputs(3, 4, device=device_for(backend), seed=6)
    dt = dt.clone()
    dt[0], dt[1] = -0.1, 0
    K = s4d_kernel(A, C, dt, 40, backend=backend).cpu()
    torch.testing.assert_close(K, numpy_kernel(A, C, dt, 40), rtol=1e-12, atol=1e-12)
    assert not K[1].any() and K[2].abs().min() > 0


# ---------------------------------------------------------------------------------------------
# example_inputs, input checks
# ---------------------------------------------------------------------------------------------


def test_example_inputs_default_is_the_benchmark_size():
    ex = example_inputs()
    A, C, dt, L = ex.args
    assert (A.shape, C.shape, dt.shape, L) == ((1536, 32), (1536, 32), (1536,), 4096)
    assert A.dtype == C.dtype == torch.complex64 and dt.dtype == torch.float32
    assert ex.sizes == {"d_model": 1536, "n_modes": 32, "seqlen": 4096}
    S4D_Lin = (math.pi * torch.arange(32, dtype=torch.float64)).float()
    assert (A.real == -0.5).all() and torch.equal(A.imag[3], S4D_Lin)
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 1e-1 * (1 + 1e-6)
    again = example_inputs(dtype=torch.complex128, seed=0).args
    torch.testing.assert_close(again[1].to(torch.complex64), C)  # one draw, cast per dtype
    assert not torch.equal(example_inputs((4, 5, 6), seed=1).args[1],
                           example_inputs((4, 5, 6), seed=2).args[1])
    with pytest.raises(TypeError, match="dtype"):
        example_inputs((2, 2, 2), dtype=torch.float32)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_example_tolerances_hold(backend, dtype):
    ex = example_inputs((4, 16, 700), dtype=dtype, device=device_for(backend))
    want = ex.call(s4d_kernel, backend="ref")
    torch.testing.assert_close(ex.call(s4d_kernel, backend=backend), want, rtol=ex.rtol,
                               atol=ex.atol)


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


@pytest.mark.parametrize("backend", ["ref", "cpu", CUDA])
def test_a_growing_kernel_is_finite_until_its_value_overflows(backend):
    # Re(Δ·A) > 0 (Δ < 0): e^{Δ·A·l} alone overflows from l = 905, the kernel only after 909
    # (|2·C·B̄| < 1); the truth from logarithms, Re exp(log w + Δ·A·l), w = 2·C·B̄. Found by the fuzzer.
    A = torch.tensor([[-30.0 + 0.0j]], dtype=torch.complex128)
    C = torch.tensor([[0.2774 - 0.1581j]], dtype=torch.complex128)
    dt = torch.tensor([-0.02615], dtype=torch.float64)
    z = complex(dt[0] * A[0, 0])
    w = 2 * complex(C[0, 0]) * (cmath.exp(z) - 1) / complex(A[0, 0])
    assert math.ceil(math.log(sys.float_info.max) / z.real) == 905
    if backend == "cuda" and cuda_simulated():
        pytest.skip("the simulator's math.exp raises OverflowError where a GPU gives inf")
    K = s4d_kernel(A, C, dt, 1000, backend=backend)[0]
    for l in (900, 905, 909):
        want = cmath.exp(cmath.log(w) + z * l).real
        assert abs(K[l].item() - want) <= 1e-12 * abs(want), (l, K[l].item(), want)
    assert torch.isinf(K[910:]).all() and (K[910:] < 0).all()


@pytest.mark.parametrize("backend", ["ref", "cpu", CUDA])
def test_a_tiny_growing_kernel_stays_finite_across_an_exact_re_anchor(backend):
    # |w| ~ 1e-300: w·e^{Δ·A·l} is finite up to l ~ 1780 while e^{Δ·A·l} alone overflows from
    # l = 905. An anchor formed as w·(e^{Δ·A·l}) gave NaN at the cpu kernel's exact re-anchor
    # (l = 1024; e·sin(0) with e = inf); formed as ((w·e^{i·Im(Δ·A)·l})·h)·h with
    # h = e^{Re(Δ·A)·l/2}, it is the value. Found by the fuzzer.
    A = torch.tensor([[-30.0 + 0.0j, -30.0 + 0.5j]], dtype=torch.complex128)
    C = torch.tensor([[1e-300 * (0.2774 - 0.1581j), 1e-300 * (0.1 + 0.3j)]],
                     dtype=torch.complex128)
    dt = torch.tensor([-0.02615], dtype=torch.float64)
    K = s4d_kernel(A, C, dt, 1300, backend=backend)[0]
    assert torch.isfinite(K).all()
    for l in (0, 1, 905, 1023, 1024, 1025, 1100, 1299):
        want = 0.0
        for a, c in zip(A[0].tolist(), C[0].tolist(), strict=True):
            z = complex(dt[0]) * a
            w = 2 * c * (cmath.exp(z) - 1) / a
            want += cmath.exp(cmath.log(w) + z * l).real  # the truth from logarithms
        assert abs(K[l].item() - want) <= 1e-11 * abs(want), (l, K[l].item(), want)
