"""linear_scan: every backend against references outside the kernel (a materialised dense
matrix, in float64), gradients against autograd of the reference, ``out=``, the canonical
example, and bad input."""

import pytest
import torch
from helpers import ALL, KERNELS, device_for

import minimodels.kernels.scan as scan
from minimodels.kernels._common import Example
from minimodels.kernels.scan import example_inputs, linear_scan, linear_scan_ref

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
    """[a, b, h0] of the canonical example (a: decays in [0.5, 1)), in float64 by default."""
    return list(example_inputs(shape, dtype=dtype, device=device, seed=seed).args)


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
    ex = example_inputs(shape, dtype=dtype)
    torch.testing.assert_close(h.cpu().double(), want, rtol=ex.rtol, atol=ex.atol)


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


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("with_h0", [False, True])
def test_empty_sequence(backend, with_h0):
    """Issue #13: l = 0 gives an empty (b, d, 0) on every backend (ref raised IndexError, or
    torch.stack's error with h0), and the gradients are zeros of the inputs' shapes."""
    dev = device_for(backend)
    a, b = (torch.ones(2, 3, 0, dtype=torch.float64, device=dev, requires_grad=True)
            for _ in range(2))
    h0 = torch.ones(2, 3, dtype=torch.float64, device=dev, requires_grad=True)
    args = (a, b, h0) if with_h0 else (a, b)
    h = linear_scan(*args, backend=backend)
    assert h.shape == (2, 3, 0) and h.dtype == torch.float64 and h.device.type == dev.type
    grads = torch.autograd.grad(h.sum(), args, allow_unused=True)
    for x, g in zip(args, grads, strict=True):
        assert g is None or (g.shape == x.shape and not g.any())
    assert grads[0] is not None and grads[1] is not None


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
@pytest.mark.parametrize("dtype, big", [(torch.float32, 1e30), (torch.float64, 1e200)])
def test_a_composed_map_that_overflows(backend, dtype, big):
    """a = big for 30 steps with a zero state: the recurrence stays at 0, but the map of two
    steps, a·a, overflows, and a parallel scan's jump A·h = inf·0 would give nan (found by the
    fuzzer on an H200). Then a tiny input that the big a's carry up to a finite state. Output
    and gradients equal the reference's step-by-step result, infs and nans included."""
    dev = device_for(backend)
    l = 70
    a = torch.full((2, 1, l), 0.5, dtype=dtype)
    a[0, 0, :30] = big
    a[1, 0, 20:50:2] = big  # every other step: a·a overflows, a·0.5 does not
    b = torch.zeros(2, 1, l, dtype=dtype)
    b[0, 0, 28], b[1, 0, 47] = 1 / big, 1 / big  # the next big a lifts it to 1
    b[:, 0, 60] = 1.0
    a, b = a.to(dev).requires_grad_(), b.to(dev).requires_grad_()
    g = torch.ones(2, 1, l, dtype=dtype, device=dev)
    want = linear_scan_ref(a, b)
    got = linear_scan(a, b, backend=backend)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name, x, y in zip("ab", torch.autograd.grad(got, (a, b), g),
                          torch.autograd.grad(want, (a, b), g), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0, equal_nan=True,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


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


def test_example_inputs_are_the_canonical_call(monkeypatch):
    ex = example_inputs((2, 3, 5), dtype=torch.float64, seed=4)
    assert isinstance(ex, Example) and ex.kwargs == {}
    a, b, h0 = ex.args
    assert a.shape == b.shape == (2, 3, 5) and h0.shape == (2, 3) and a.dtype == torch.float64
    assert ((a >= 0.5) & (a < 1)).all()
    assert ex.sizes == {"batch": 2, "d_model": 3, "seqlen": 5}
    assert (ex.rtol, ex.atol) == (1e-12, 1e-12)
    ex32 = example_inputs((2, 3, 5), seed=4)  # float32 by default: the same values, rounded
    assert ex32.args[0].dtype == torch.float32 and (ex32.rtol, ex32.atol) == (1e-5, 1e-5)
    torch.testing.assert_close(ex32.args[0].double(), a, rtol=1e-7, atol=0)
    assert not torch.equal(example_inputs((2, 3, 5), seed=5).args[1], ex32.args[1])
    torch.testing.assert_close(ex.call(linear_scan, backend="cpu"), dense_scan(*ex.args),
                               rtol=ex.rtol, atol=ex.atol)
    assert scan.EXAMPLE_SHAPE == (8, 1024, 4096)  # the benchmark's size
    monkeypatch.setattr(scan, "EXAMPLE_SHAPE", (1, 2, 3))
    assert example_inputs().sizes == {"batch": 1, "d_model": 2, "seqlen": 3}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("with_h0", [True, False])
def test_out_receives_the_result(backend, with_h0):
    dev = device_for(backend)
    a, b, h0 = inputs((2, 3, 37), device=dev, seed=2)
    h0 = h0 if with_h0 else None
    out = torch.full_like(a, torch.nan)
    got = linear_scan(a, b, h0, backend=backend, out=out)
    assert got is out
    torch.testing.assert_close(out, linear_scan_ref(a, b, h0))


def test_out_with_a_callable_backend_and_non_contiguous_inputs():
    a, b, h0 = inputs((2, 5, 4), seed=3)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.empty_like(a)
    assert linear_scan(a_t, b, h0, backend=linear_scan_ref, out=out) is out
    torch.testing.assert_close(out, linear_scan_ref(a, b, h0))
    assert linear_scan(a_t, b, h0, backend="cpu", out=out.zero_()) is out
    torch.testing.assert_close(out, linear_scan_ref(a, b, h0))


def test_out_refuses_inputs_that_require_grad_unless_no_grad():
    a, b, h0 = inputs((1, 2, 3))
    a.requires_grad_()
    out = torch.empty_like(b)
    with pytest.raises(ValueError, match="out= is for calls without autograd"):
        linear_scan(a, b, h0, backend="cpu", out=out)
    with torch.no_grad():
        linear_scan(a, b, h0, backend="cpu", out=out)
    torch.testing.assert_close(out, linear_scan_ref(a, b, h0).detach())


@pytest.mark.parametrize(
    "out, error, message",
    [
        (torch.empty(1, 2, 4, dtype=torch.float64), ValueError, r"out must have shape .* \(1, 2, 3\)"),
        (torch.empty(1, 2, 3), TypeError, "out must be float64"),
        (torch.empty(1, 3, 2, dtype=torch.float64).transpose(1, 2), ValueError, "out must be contiguous"),
        (torch.empty(1, 2, 3, dtype=torch.float64, device="meta"), ValueError, "out must be on cpu"),
        ([[0.0]], TypeError, "out must be a torch.Tensor"),
    ],
)
def test_bad_out_names_the_argument(out, error, message):
    a, b, h0 = inputs((1, 2, 3))
    with pytest.raises(error, match=message):
        linear_scan(a, b, h0, backend="cpu", out=out)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (([1.0], torch.ones(1)), TypeError, "a must be a torch.Tensor"),
        ((torch.ones(3), None), TypeError, "b must be a torch.Tensor"),
        ((torch.ones(3, dtype=torch.int64),) * 2, TypeError, "a must be float32 or float64"),
        ((torch.tensor(0.5), torch.tensor(1.0)), ValueError, "a must have at least one dim"),
        ((torch.ones(2, 3), torch.ones(2, 3).double()), TypeError, "b must be float32 like a"),
        ((torch.ones(2, 3), torch.ones(3)), ValueError, r"b must have the shape of a, .* \(2, 3\)"),
        ((torch.ones(2, 1), torch.ones(2, 3)), ValueError, r"b must have the shape of a"),
        ((torch.ones(2, 3), torch.ones(2, 3, device="meta")), ValueError, "b must be on cpu"),
    ],
)
def test_parallel_scan_bad_input_names_the_argument(args, error, message):
    """Issue #13: parallel_scan checked nothing (int tensors and broadcast shapes passed)."""
    with pytest.raises(error, match=message):
        scan.parallel_scan(*args)
