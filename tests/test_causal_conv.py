"""causal_conv (chapter 07): every backend's direct loop and the FFT path against convolutions
outside the project (numpy.convolve, scipy.signal.lfilter with the filter as its FIR
numerator, torch's depthwise F.conv1d with left padding) and against the Toeplitz reference,
in float64 and float32; lengths 1 and primes, filters of 1 tap and of l taps, the padding
(never circular), gradients (gradcheck in float64, float32 against float64), layouts, the
method switch and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ALL, CUDA, KERNELS, device_for

from minimodels import use_backend
from minimodels.kernels import long_conv as LC
from minimodels.kernels.long_conv import causal_conv, example_inputs

signal = pytest.importorskip("scipy.signal")
pytestmark = pytest.mark.ch07

# (b, h, l, lk): one step, one tap, a filter as long as the sequence, primes, tails of THREADS
SHAPES = [(1, 1, 1, 1), (2, 3, 7, 1), (2, 3, 7, 7), (1, 2, 13, 5), (3, 2, 17, 9), (2, 1, 40, 33),
          (0, 2, 5, 3)]


def conv1d_depthwise(u, k, D):
    """torch's depthwise F.conv1d (a cross-correlation, so the filter is flipped), padded on
    the left by lk − 1 so output t sees inputs t − lk + 1 .. t."""
    lk = k.shape[-1]
    y = F.conv1d(F.pad(u, (lk - 1, 0)), k.flip(-1)[:, None], groups=k.shape[0])
    return y + D[:, None] * u


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_numpy_scipy_and_conv1d(backend, method, shape, dtype):
    ex = example_inputs(shape, dtype=dtype, device=device_for(backend), seed=sum(shape))
    u, k = ex.args
    D = ex.kwargs["D"]
    got = causal_conv(u, k, D=D, method=method, backend=backend)
    assert got.dtype == dtype and got.shape == u.shape
    u64, k64, D64 = u.double().cpu(), k.double().cpu(), D.double().cpu()
    want = conv1d_depthwise(u64, k64, D64)
    torch.testing.assert_close(got.double().cpu(), want, rtol=ex.rtol, atol=ex.atol)
    b, h, l, _ = shape
    for bb in range(b):
        for c in range(h):
            row_np = np.convolve(u64[bb, c].numpy(), k64[c].numpy())[:l] + D64[c].item() * u64[
                bb, c].numpy()
            row_sp = signal.lfilter(k64[c].numpy(), [1.0], u64[bb, c].numpy()) + (
                D64[c].item() * u64[bb, c].numpy())
            np.testing.assert_allclose(got[bb, c].double().cpu().numpy(), row_np,
                                       rtol=ex.rtol, atol=ex.atol)
            np.testing.assert_allclose(row_sp, row_np, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", KERNELS)
def test_without_D_and_with_strided_inputs(backend):
    dev = device_for(backend)
    u, k = example_inputs((2, 4, 30, 6), dtype=torch.float64, device=dev, skip=False).args
    ut = u.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    kt = k.t().contiguous().t()
    want = LC.causal_conv_ref(u, k)
    for method in ("direct", "fft"):
        torch.testing.assert_close(causal_conv(ut, kt, method=method, backend=backend), want)


def test_fft_path_is_not_circular():
    """An impulse at the last step must not wrap onto the first ones (a circular convolution of
    length l would put k_1 at y_0)."""
    u = torch.zeros(1, 1, 16, dtype=torch.float64)
    u[..., -1] = 1
    k = torch.arange(1, 17, dtype=torch.float64)[None]
    want = torch.zeros_like(u)
    want[..., -1] = 1
    torch.testing.assert_close(causal_conv(u, k, method="fft"), want)
    circular = torch.fft.irfft(torch.fft.rfft(u) * torch.fft.rfft(k), n=16)
    assert abs(circular[0, 0, 0].item() - 2) < 1e-9  # k_1 wrapped onto y_0: the bug the padding prevents


@pytest.mark.parametrize("L, lk", [(1, 1), (5, 1), (5, 5), (100, 37), (1000, 1000)])
def test_fft_length_covers_the_linear_convolution(L, lk):
    N = LC.fft_length(L, lk)
    assert N >= L + lk - 1 and N & (N - 1) == 0 and N < 2 * (L + lk - 1) + 1


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", [(2, 3, 9, 4), (1, 2, 6, 6), (2, 1, 5, 1)])
def test_gradcheck_direct(backend, shape):
    u, k = example_inputs(shape, dtype=torch.float64, device=device_for(backend)).args
    D = example_inputs(shape, dtype=torch.float64, device=device_for(backend)).kwargs["D"]
    args = [t.clone().requires_grad_() for t in (u, k, D)]
    assert torch.autograd.gradcheck(
        lambda u, k, D: causal_conv(u, k, D=D, method="direct", backend=backend), args)


def test_gradcheck_fft():
    ex = example_inputs((2, 3, 11, 6), dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (*ex.args, ex.kwargs["D"])]
    assert torch.autograd.gradcheck(lambda u, k, D: causal_conv(u, k, D=D, method="fft"), args)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("method", ["direct", "fft"])
def test_float32_gradients_against_float64_autograd(backend, method):
    dev = device_for(backend)
    ex = example_inputs((3, 4, 50, 12), dtype=torch.float64, device=dev, seed=3)
    leaves = [*ex.args, ex.kwargs["D"]]
    g = torch.randn(3, 4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    l64 = [t.clone().requires_grad_() for t in leaves]
    want = torch.autograd.grad(LC.causal_conv_ref(*l64), l64, g.to(dev))
    l32 = [t.float().requires_grad_() for t in leaves]
    y = causal_conv(l32[0], l32[1], D=l32[2], method=method, backend=backend)
    got = torch.autograd.grad(y, l32, g.float().to(dev))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_auto_picks_by_the_filter_length():
    calls = []

    def spy(u, k, D=None):
        calls.append(k.shape[1])
        return LC.causal_conv_ref(u, k, D)

    taps = LC.DIRECT_MAX_TAPS["cpu"]
    u = torch.randn(1, 2, 2 * taps + 2)
    with use_backend(spy):  # a callable backend is used whatever the method
        causal_conv(u, torch.randn(2, 3))
    assert calls == [3]
    short, long = torch.randn(2, taps), torch.randn(2, taps + 1)
    for k in (short, long):  # auto = direct or fft: both equal the reference
        torch.testing.assert_close(causal_conv(u, k), LC.causal_conv_ref(u, k), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", CUDA])
def test_auto_switches_at_the_backends_own_crossover(backend, monkeypatch):
    """method="auto" runs the direct loop up to DIRECT_MAX_TAPS[backend] taps (measured per
    device: the H200's FFT kernel overtakes its loop far earlier than the CPU's pocketfft)."""
    taps = LC.DIRECT_MAX_TAPS[backend]
    ran = []
    monkeypatch.setitem(LC.IMPLS, backend, lambda *a, f=LC.IMPLS[backend]: ran.append("direct")
                        or f(*a))
    monkeypatch.setattr(LC, "causal_fft_conv", lambda *a: ran.append("fft")
                        or LC.causal_conv_ref(*a))
    monkeypatch.setattr(LC, "causal_conv_fft_cuda", lambda *a: ran.append("fft")
                        or LC.causal_conv_ref(*a))
    u = torch.randn(1, 2, taps + 3, dtype=torch.float64)
    for lk in (taps, taps + 1):
        causal_conv(u, torch.randn(2, lk, dtype=torch.float64), backend=backend)
    assert ran == ["direct", "fft"]


def test_example_inputs():
    ex = example_inputs((2, 3, 10, 4), dtype=torch.float64, seed=1)
    u, k = ex.args
    assert u.shape == (2, 3, 10) and k.shape == (3, 4) and ex.kwargs["D"].shape == (3,)
    assert ex.sizes == {"batch": 2, "channels": 3, "seqlen": 10, "taps": 4}
    assert example_inputs((2, 3, 10, 4), skip=False).kwargs == {}
    with pytest.raises(ValueError, match="1 <= lk <= l"):
        example_inputs((1, 1, 4, 5))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.ones(2, 8), torch.ones(2, 3)), {}, ValueError, r"u must have 3 dimensions"),
        ((torch.ones(1, 2, 8), torch.ones(3, 3)), {}, ValueError, r"k must have shape \(h, lk\)"),
        ((torch.ones(1, 2, 8), torch.ones(2, 9)), {}, ValueError, r"1 <= lk <= l = 8"),
        ((torch.ones(1, 2, 8), torch.ones(2, 0)), {}, ValueError, r"1 <= lk <= l = 8"),
        ((torch.ones(1, 2, 8), torch.ones(2, 3).double()), {}, TypeError, "k must be float32"),
        ((torch.ones(1, 2, 8, dtype=torch.int64), torch.ones(2, 3)), {}, TypeError,
         "u must be float32 or float64"),
        ((torch.ones(1, 2, 8), torch.ones(2, 3)), {"D": torch.ones(3)}, ValueError,
         r"D must have shape \(h\) = \(2,\)"),
        ((torch.ones(1, 2, 8), torch.ones(2, 3)), {"method": "winograd"}, ValueError,
         "method must be one of"),
        (([1.0] * 8, torch.ones(2, 3)), {}, TypeError, "u must be a torch.Tensor"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        causal_conv(*args, **kwargs)


# --- the fused FFT kernel: method="fft" on the cuda backend (kernels/long_conv/cuda.py) ------

# (l, lk): every FFT length N = 4 .. 1024 (the plans of one, two and three passes; N = 4 is the
# smallest, taken by l = 1 and l = 2 too), filters shorter than l and as long as l, l prime
FUSED_SIZES = [(1, 1), (2, 1), (3, 2), (3, 3), (9, 8), (16, 5), (16, 16), (37, 12), (37, 37),
               (200, 57), (300, 100), (300, 230)]


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("l, lk", FUSED_SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_fft_against_conv1d_and_the_toeplitz_reference(backend, l, lk, dtype):
    b, h = (2, 3) if l < 100 else (1, 2)
    ex = example_inputs((b, h, l, lk), dtype=dtype, device=device_for(backend), seed=l + lk)
    u, k = ex.args
    D = ex.kwargs["D"]
    assert LC.fused_fft_length(l, lk) <= LC.FFT_MAX_N[np.dtype(str(dtype)[6:])]
    got = causal_conv(u, k, D=D, method="fft", backend=backend)
    assert got.dtype == dtype and got.shape == u.shape
    u64, k64, D64 = u.double().cpu(), k.double().cpu(), D.double().cpu()
    for want in (conv1d_depthwise(u64, k64, D64), LC.causal_conv_ref(u64, k64, D64)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=ex.rtol, atol=ex.atol)


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("dtype, l, lk", [(torch.float32, 4096, 4096), (torch.float32, 2048, 2048),
                                          (torch.float32, 1025, 1000), (torch.float64, 2048, 2048)])
def test_fused_fft_at_the_largest_lengths(backend, dtype, l, lk):
    """One row at each of the GPU's own plans (N = 8192: 16·16·16 complex passes in float32;
    4096 in float64, the largest that fits), against torch's depthwise conv1d in float64."""
    ex = example_inputs((1, 1, l, lk), dtype=dtype, device=device_for(backend), seed=l)
    u, k = ex.args
    D = ex.kwargs["D"]
    got = causal_conv(u, k, D=D, method="fft", backend=backend)
    want = conv1d_depthwise(u.double().cpu(), k.double().cpu(), D.double().cpu())
    torch.testing.assert_close(got.double().cpu(), want, rtol=ex.rtol, atol=ex.atol)


@pytest.mark.parametrize("backend", [CUDA])
def test_fused_fft_writes_every_output(backend):
    """The kernel's output starts as NaN: every element must be written."""
    from minimodels.kernels.long_conv.cuda import _fft_conv_cuda

    u, k = example_inputs((2, 3, 37, 20), dtype=torch.float64, device=device_for(backend)).args
    N = LC.fused_fft_length(37, 20)
    Kf = (torch.fft.rfft(k, n=N) / (2 * N)).contiguous()
    y = _fft_conv_cuda(u, Kf, y=torch.full_like(u, float("nan")))
    torch.testing.assert_close(y, LC.causal_conv_ref(u, k))


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("shape, skip", [((2, 3, 9, 4), True), ((1, 2, 6, 6), True),
                                         ((2, 1, 5, 1), True), ((1, 1, 1, 1), True),
                                         ((2, 2, 7, 3), False)])
def test_gradcheck_fused_fft(backend, shape, skip):
    ex = example_inputs(shape, dtype=torch.float64, device=device_for(backend), skip=skip)
    args = [t.clone().requires_grad_() for t in (*ex.args, *ex.kwargs.values())]
    assert torch.autograd.gradcheck(
        lambda u, k, *D: causal_conv(u, k, D=D[0] if D else None, method="fft", backend=backend),
        args)


@pytest.mark.parametrize("backend", [CUDA])
def test_fused_fft_routing_by_length(backend, monkeypatch):
    """method="fft" on the cuda backend runs the fused kernel while N fits FFT_MAX_N (4096 in
    float64) and torch.fft above it; causal_conv_fft_cuda itself refuses the longer rows."""
    calls = []
    kernel = LC._fft_conv_cuda
    monkeypatch.setattr(LC, "_fft_conv_cuda", lambda *a: calls.append(1) or kernel(*a))
    dev = device_for(backend)
    for l, fused in ((2049, True), (2050, False)):  # l + 2048 − 1 = 4096, then 4097
        ex = example_inputs((1, 1, l, 2048), dtype=torch.float64, device=dev, seed=l)
        u, k = ex.args
        D = ex.kwargs["D"]
        calls.clear()
        got = causal_conv(u, k, D=D, method="fft", backend=backend)
        assert calls == ([1] if fused else [])
        torch.testing.assert_close(got.cpu(), conv1d_depthwise(u.cpu(), k.cpu(), D.cpu()))
    with pytest.raises(ValueError, match="N = 8192 .* exceeds 4096 in float64"):
        LC.causal_conv_fft_cuda(u, k, D)


@pytest.mark.parametrize("backend", [CUDA])
def test_fused_fft_gradients_of_an_empty_batch(backend):
    ex = example_inputs((0, 2, 5, 3), device=device_for(backend))
    leaves = [t.clone().requires_grad_() for t in (*ex.args, ex.kwargs["D"])]
    y = causal_conv(leaves[0], leaves[1], D=leaves[2], method="fft", backend=backend)
    gu, gk, gD = torch.autograd.grad(y.sum(), leaves)
    assert gu.shape == (0, 2, 5) and not gk.any() and not gD.any() and gk.shape == (2, 3)


def test_fft_plans():
    from minimodels.kernels.long_conv.cuda import fft_plan, fft_threads

    for m in range(1, 13):
        plan = fft_plan(1 << m)
        assert int(np.prod(plan)) == 1 << m and len(plan) == -(-m // 4)
        assert set(plan) <= {2, 4, 8, 16} and list(plan) == sorted(plan)
        assert fft_threads(1 << m) == (1 << m) // plan[0]
    assert fft_plan(4096) == (16, 16, 16) and fft_plan(2048) == (8, 16, 16)
    for bad in (1, 3, 8192):
        with pytest.raises(ValueError, match="M must be a power of two"):
            fft_plan(bad)
