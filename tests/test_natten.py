"""neighborhood_attention_2d: every backend against the materialised masked attention (ref) and
against an independent slow loop over the windows written from NATTEN's definition (window
starts clamped, not truncated), kernel_size = H (full attention, checked against torch's
scaled_dot_product_attention), kernel_size = 1 (o = v), gradients against autograd of the
reference (gradcheck in float64), float32 against a float64 truth, strides, bad input."""

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL, KERNELS, device_for

import minimodels.kernels.natten as N
from minimodels.kernels._common import Example
from minimodels.kernels.natten import example_inputs, neighborhood_attention_2d, window_start

pytestmark = pytest.mark.ch08

# (b, h, H, W, e, K): one pixel, K = H, rectangles, sizes off the CUDA tile (4 columns in the
# simulator, 16 on a GPU; its rows depend on K), e off the chunk of head dims (4 in the
# simulator), borders on every side, and every number of queries per CUDA thread (4 at K <= 3,
# 2 at K = 5 and 7, 1 at K = 9); the CUDA chunk of head dims divides e (4 in the simulator):
# e = 8 stages two whole chunks of 4, e = 6 three of 2, odd e chunks of 1
SHAPES = [(1, 1, 1, 1, 1, 1), (1, 2, 5, 5, 3, 5), (2, 1, 6, 9, 4, 3), (1, 1, 9, 5, 9, 5),
          (1, 2, 7, 10, 2, 1), (1, 1, 11, 13, 3, 7), (1, 1, 10, 11, 5, 9), (1, 1, 6, 7, 8, 3),
          (1, 1, 5, 9, 6, 5)]


def windows_by_loops(q, k, v, K, scale):
    """The definition, pixel by pixel: the window of (i, j) starts at row
    max(0, min(i - K//2, H - K)), likewise for the column (float64, no mask, no softmax call)."""
    b, h, H, W, e = q.shape
    out = torch.zeros(b, h, H, W, e, dtype=torch.float64)
    for i in range(H):
        r0 = i - K // 2
        r0 = 0 if r0 < 0 else (H - K if r0 > H - K else r0)
        for j in range(W):
            c0 = j - K // 2
            c0 = 0 if c0 < 0 else (W - K if c0 > W - K else c0)
            keys = k[:, :, r0:r0 + K, c0:c0 + K].reshape(b, h, K * K, e).double()
            vals = v[:, :, r0:r0 + K, c0:c0 + K].reshape(b, h, K * K, e).double()
            s = scale * torch.einsum("bhe,bhne->bhn", q[:, :, i, j].double(), keys)
            w = (s - s.amax(-1, keepdim=True)).exp()
            out[:, :, i, j] = torch.einsum("bhn,bhne->bhe", w / w.sum(-1, keepdim=True), vals)
    return out


def test_window_start_is_clamped_not_truncated():
    assert [window_start(i, 7, 3) for i in range(7)] == [0, 0, 1, 2, 3, 4, 4]
    assert [window_start(i, 5, 5) for i in range(5)] == [0] * 5
    assert window_start(torch.arange(6), 6, 3).tolist() == [0, 0, 1, 2, 3, 3]
    mask = N.neighborhood_mask(6, 5, 3)
    assert mask.sum(1).tolist() == [9] * 30  # every query sees exactly K² keys


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_the_window_loops(backend, shape, dtype):
    ex = example_inputs(shape, dtype=dtype, device=device_for(backend), seed=1)
    q, k, v = ex.args
    K = shape[-1]
    want = windows_by_loops(q.cpu(), k.cpu(), v.cpu(), K, shape[4] ** -0.5)
    got = ex.call(neighborhood_attention_2d, backend=backend)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double().cpu(), want, rtol=ex.rtol, atol=ex.atol)


@pytest.mark.parametrize("backend", ALL)
def test_full_window_is_sdpa_and_one_pixel_is_v(backend):
    dev = device_for(backend)
    q, k, v = example_inputs((2, 2, 5, 5, 4, 5), dtype=torch.float64, device=dev).args
    sdpa = F.scaled_dot_product_attention(*(t.reshape(2, 2, 25, 4) for t in (q, k, v)))
    got = neighborhood_attention_2d(q, k, v, 5, backend=backend)
    torch.testing.assert_close(got, sdpa.reshape(q.shape), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(neighborhood_attention_2d(q, k, v, 1, backend=backend), v,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNELS)
def test_scale_and_strides(backend):
    dev = device_for(backend)
    q, k, v = example_inputs((1, 2, 7, 6, 3, 3), dtype=torch.float64, device=dev).args
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    got = neighborhood_attention_2d(qt, k, v, 3, scale=0.3, backend=backend)
    torch.testing.assert_close(got, neighborhood_attention_2d(q, k, v, 3, scale=0.3,
                                                              backend="ref"))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", [(1, 2, 5, 6, 3, 3), (1, 1, 4, 4, 2, 1), (1, 1, 5, 5, 2, 5)])
def test_gradcheck(backend, shape):
    ex = example_inputs(shape, dtype=torch.float64, device=device_for(backend))
    args = [t.clone().requires_grad_() for t in ex.args]
    # the simulator runs every numerical-derivative call thread by thread: the fast mode (a few
    # random directions) there; the full Jacobian on the CPU. The CUDA backward adds dk, dv with
    # atomics, in any order: the same call may differ by rounding (nondet_tol)
    cuda = backend == "cuda"
    assert torch.autograd.gradcheck(
        lambda *a: neighborhood_attention_2d(*a, shape[-1], backend=backend), args,
        fast_mode=cuda, nondet_tol=1e-12 if cuda else 0.0)


@pytest.mark.parametrize("backend", KERNELS)
def test_float32_gradients_against_float64_autograd(backend):
    dev = device_for(backend)
    ex = example_inputs((1, 2, 9, 7, 5, 3), dtype=torch.float64, device=dev, seed=3)
    g = torch.randn(1, 2, 9, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaves64 = [t.clone().requires_grad_() for t in ex.args]
    want = torch.autograd.grad(neighborhood_attention_2d(*leaves64, 3, backend="ref"), leaves64,
                               g.to(dev))
    leaves32 = [t.float().requires_grad_() for t in ex.args]
    got = torch.autograd.grad(neighborhood_attention_2d(*leaves32, 3, backend=backend), leaves32,
                              g.float().to(dev))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_example_inputs_and_flops():
    ex = example_inputs((1, 2, 4, 5, 3, 3), dtype=torch.float64, seed=2)
    assert isinstance(ex, Example) and ex.kwargs == {"kernel_size": 3}
    assert all(t.shape == (1, 2, 4, 5, 3) for t in ex.args)
    same = example_inputs((1, 2, 4, 5, 3, 3), dtype=torch.float32, seed=2).args[0]
    torch.testing.assert_close(same.double(), ex.args[0], rtol=1e-7, atol=1e-7)
    assert N.flops(1, 4, 128, 128, 64) / N.flops(1, 4, 128, 128, 64, 7) == 128 * 128 / 49


@pytest.mark.parametrize("itemsize", [4, 8])
def test_cuda_forward_chunk_divides_e_and_fits_shared_memory(itemsize):
    """The CUDA forward stages EC head dims at a time with no partial chunk: EC is a power of
    2 that divides e, at most E_CHUNK, and its buffers fit SHARED_BYTES (every K it accepts)."""
    from minimodels.kernels.natten import cuda as nc
    for K in range(1, nc.MAX_KERNEL + 1, 2):
        for e in (1, 2, 3, 6, 8, 12, 32, 48, 64, 96, 128, 130):
            T = nc._tiles(K, e, itemsize)
            EC = T.chunk
            assert EC & (EC - 1) == 0 and e % EC == 0 and EC <= nc.E_CHUNK, (K, e, EC)
            pixels = T.shared_words // (EC + 1)  # the largest such chunk
            assert (2 * EC > nc.E_CHUNK or e % (2 * EC)
                    or pixels * (2 * EC + 1) * itemsize > nc.SHARED_BYTES), (K, e, EC)
            assert T.shared_words * itemsize <= nc.SHARED_BYTES, (K, e, T)


def test_cuda_rejects_a_window_beyond_its_registers():
    from minimodels.kernels.natten.cuda import MAX_KERNEL, _fwd_cuda
    q = torch.zeros(1, 16, 16, 1)
    with pytest.raises(ValueError, match=f"kernel_size must be <= {MAX_KERNEL}"):
        _fwd_cuda(q, q, q, MAX_KERNEL + 2, 1.0)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.ones(1, 1, 5, 5, 2),) * 3, {"kernel_size": 4}, ValueError, "positive odd int"),
        ((torch.ones(1, 1, 5, 5, 2),) * 3, {"kernel_size": 0}, ValueError, "positive odd int"),
        ((torch.ones(1, 1, 5, 3, 2),) * 3, {"kernel_size": 5}, ValueError,
         r"kernel_size must be <= H and W .*5 for H, W = 5, 3"),
        ((torch.ones(1, 1, 5, 5, 2),) * 3, {"kernel_size": 3.0}, TypeError,
         "kernel_size must be an int"),
        ((torch.ones(1, 5, 5, 2),) * 3, {"kernel_size": 3}, ValueError,
         r"q must have 5 dimensions \(b, h, H, W, e\)"),
        ((torch.ones(1, 1, 5, 5, 2), torch.ones(1, 1, 5, 4, 2), torch.ones(1, 1, 5, 5, 2)),
         {"kernel_size": 3}, ValueError, "k must have shape"),
        ((torch.ones(1, 1, 5, 5, 2), torch.ones(1, 1, 5, 5, 2).double(),
          torch.ones(1, 1, 5, 5, 2)), {"kernel_size": 3}, TypeError, "k must be float32"),
        ((torch.ones(1, 1, 5, 5, 2, dtype=torch.int64),) * 3, {"kernel_size": 3}, TypeError,
         "q must be float32 or float64"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        neighborhood_attention_2d(*args, **kwargs)


def test_benchmark_peers_compute_neighbourhood_attention():
    from minimodels.benchmarks.natten import masked_full_attention, unfold_natten
    q, k, v = example_inputs((2, 2, 7, 6, 4, 5), dtype=torch.float64).args
    want = neighborhood_attention_2d(q, k, v, 5, backend="ref")
    torch.testing.assert_close(unfold_natten(q, k, v, 5), want)
    torch.testing.assert_close(masked_full_attention(q, k, v, N.neighborhood_mask(7, 6, 5)), want)


def test_benchmark_runs_from_the_command_line(capsys):
    from minimodels import bench
    assert bench.main(["natten", "--shape", "1,1,8,8,4,3"]) == 0
    out = capsys.readouterr().out
    assert "(1, 1, 8, 8, 4)" in out and "minimodels cpu kernel" in out
    assert "masked full / kernel" in out
    for _, rows, floor in bench.parse_tables(out):
        assert len(rows) == 3 and floor and all(ms > 0 for _, ms in rows)
