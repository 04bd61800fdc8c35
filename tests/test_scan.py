"""linear_scan: every backend against references outside the kernel (a materialised dense
matrix, in float64), gradients against autograd of the reference, and bad input."""

import pytest
import torch
from helpers import ALL, KERNELS, device_for

from minimodels.kernels.scan import linear_scan, linear_scan_ref

SHAPES = [(1, 1, 1), (2, 3, 1), (2, 3, 37), (1, 33, 70), (3, 5, 64)]  # 33 rows / 70 steps: tails


def dense_scan(a, b, h0):
    """h = M b + m h0 with M[t, s] = prod_{s < k <= t} a_k: the recurrence as one matrix."""
    l = a.shape[-1]
    log_free = torch.cumprod(torch.cat([torch.ones_like(a[..., :1]), a], -1), -1)  # P_0..P_l
    t = torch.arange(l)
    mask = t[:, None] >= t[None, :]  # (l, l) lower triangle
    M = torch.where(mask, log_free[..., 1:, None] / log_free[..., None, 1:], 0.0)  # (b, d, l, l)
    h = torch.einsum("bdts,bds->bdt", M, b)
    return h + log_free[..., 1:] * h0[..., None]


def inputs(shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64) * 0.5 + 0.5  # decays in [0.5, 1)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    h0 = torch.randn(shape[:2], generator=g, dtype=torch.float64)
    return [x.to(dtype=dtype, device=device) for x in (a, b, h0)]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_dense_matrix(shape):
    a, b, h0 = inputs(shape)
    torch.testing.assert_close(linear_scan_ref(a, b, h0), dense_scan(a, b, h0))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_equal_dense_matrix(backend, shape, dtype):
    dev = device_for(backend)
    a, b, h0 = inputs(shape, dtype, dev, seed=sum(shape))
    want = dense_scan(*inputs(shape, seed=sum(shape)))
    h = linear_scan(a, b, h0, backend=backend)
    assert h.dtype == dtype and h.shape == shape and h.device.type == dev.type
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(h.cpu().double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_match_reference_bitwise_in_float64_without_h0(backend):
    a, b, _ = inputs((2, 4, 45), device=device_for(backend))
    torch.testing.assert_close(linear_scan(a, b, backend=backend), linear_scan_ref(a, b))


@pytest.mark.parametrize("backend", KERNELS)
def test_long_float32_sequence_stays_accurate(backend):
    a, b, h0 = inputs((1, 2, 1500), torch.float32, device_for(backend))
    want = linear_scan_ref(a.double(), b.double(), h0.double())
    err = (linear_scan(a, b, h0, backend=backend).double() - want).abs().max()
    assert err < 1e-4 * want.abs().max()


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_inputs(backend):
    dev = device_for(backend)
    a, b, h0 = inputs((2, 40, 6), device=dev)  # (b, l, d) storage, viewed as (b, d, l)
    a_t, b_t, h0_t = a.transpose(1, 2), b.transpose(1, 2), torch.randn(2, 6, 3)[..., 0]
    assert not (a_t.is_contiguous() or b_t.is_contiguous() or h0_t.is_contiguous())
    torch.testing.assert_close(
        linear_scan(a_t, b_t, h0_t.double().to(dev), backend=backend),
        linear_scan_ref(a_t, b_t, h0_t.double().to(dev)),
    )


def test_empty_sequence():
    a = torch.ones(2, 3, 0)
    assert linear_scan(a, a, backend="cpu").shape == (2, 3, 0)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("with_h0", [True, False])
def test_gradcheck_float64(backend, with_h0):
    """Finite differences; the simulator is slow, so it gets gradcheck's fast mode (random
    projections). The exact comparison below checks every gradient element on both."""
    a, b, h0 = (x.requires_grad_() for x in inputs((2, 3, 7), device=device_for(backend)))
    args = (a, b, h0) if with_h0 else (a, b)
    fn = lambda *x: linear_scan(*x, backend=backend)
    assert torch.autograd.gradcheck(fn, args, fast_mode=backend == "cuda")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 33, 70)])
def test_backward_kernel_equals_autograd_of_reference(backend, shape):
    dev = device_for(backend)
    a, b, h0 = (x.requires_grad_() for x in inputs(shape, device=dev))
    g = torch.randn(shape, dtype=torch.float64, device=dev)
    want = torch.autograd.grad(linear_scan_ref(a, b, h0), (a, b, h0), g)
    got = torch.autograd.grad(linear_scan(a, b, h0, backend=backend), (a, b, h0), g)
    for name, x, y in zip("a b h0".split(), got, want, strict=True):
        torch.testing.assert_close(x, y, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((torch.ones(2, 3), torch.ones(2, 3)), ValueError, r"a must have 3 dimensions \(batch, d, l\)"),
        (([[1.0]], torch.ones(1, 1, 1)), TypeError, "a must be a torch.Tensor"),
        ((torch.ones(1, 1, 2, dtype=torch.int64),) * 2, TypeError, "a must be float32 or float64"),
        ((torch.ones(1, 2, 3), torch.ones(1, 3, 2)), ValueError, r"b must have shape .* \(1, 2, 3\)"),
        ((torch.ones(1, 2, 3), torch.ones(1, 2, 3).double()), TypeError, "b must be float32"),
        ((torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(2, 1)), ValueError, r"h0 must have shape \(batch, d\) = \(1, 2\)"),
        ((torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(1, 2, 1)), ValueError, "h0 must have 2 dimensions"),
    ],
)
def test_bad_input_names_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        linear_scan(*args, backend="cpu")
