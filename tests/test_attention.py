"""attention: every backend against torch's scaled_dot_product_attention (in float64), the
log-sum-exp against torch.logsumexp of materialised scores, gradients against autograd of the
reference, large logits, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL, KERNELS, device_for

from minimodels.kernels.attention import attention, attention_ref, causal_mask

# (b, h, lq, lk, e): lq = 1, lk = 1, lengths off the tile sizes, lq != lk
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 1, 9, 4), (1, 2, 9, 9, 3), (2, 1, 5, 13, 8), (1, 2, 13, 6, 2)]


def qkv(shape, dtype=torch.float64, device="cpu", seed=0, std=1.0):
    b, h, lq, lk, e = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, e, generator=g, dtype=torch.float64) * std
    k = torch.randn(b, h, lk, e, generator=g, dtype=torch.float64) * std
    v = torch.randn(b, h, lk, e, generator=g, dtype=torch.float64)
    return [x.to(dtype=dtype, device=device) for x in (q, k, v)]


def sdpa(q, k, v, causal=False, scale=None):
    """torch's SDPA with our bottom-right causal mask given explicitly (as a boolean mask)."""
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def test_bottom_right_mask_equals_sdpa_is_causal_when_square():
    q, k, v = qkv((1, 2, 7, 7, 4))
    torch.testing.assert_close(sdpa(q, k, v, causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_equal_sdpa(backend, shape, causal, dtype):
    if causal and shape[2] > shape[3]:
        pytest.skip("causal needs lq <= lk")
    dev = device_for(backend)
    q, k, v = qkv(shape, dtype, dev, seed=sum(shape))
    out, lse = attention(q, k, v, causal=causal, return_lse=True, backend=backend)
    q64, k64, v64 = qkv(shape, seed=sum(shape))
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.cpu().double(), sdpa(q64, k64, v64, causal), rtol=tol, atol=tol)
    s = (q64 @ k64.transpose(-2, -1)) / math.sqrt(shape[-1])
    if causal:
        s = s.masked_fill(~causal_mask(shape[2], shape[3]), -math.inf)
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(s, -1), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", KERNELS)
def test_many_tiles_and_explicit_scale(backend):
    """Longer than the CPU tiles (128 queries, 64 keys) and the simulator's, with short last
    tiles and e and tile lengths off the CPU kernel's blocks of 4; a scale other than
    1/sqrt(e)."""
    shape = (2, 1, 300, 330, 6) if backend == "cpu" else (1, 1, 17, 23, 4)
    q, k, v = qkv(shape, device=device_for(backend), seed=3)
    for causal in (False, True):
        got = attention(q, k, v, causal=causal, scale=0.3, backend=backend)
        torch.testing.assert_close(got.cpu(), sdpa(q.cpu(), k.cpu(), v.cpu(), causal, scale=0.3))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_stay_finite(backend, dtype):
    """Scores of order ±1e4: a softmax without max-subtraction overflows to inf/NaN."""
    q, k, v = qkv((1, 2, 9, 11, 4), dtype, device_for(backend), seed=5, std=100.0)
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend=backend)
    want, want_lse = attention_ref(q.double(), k.double(), v.double(), True, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert lse.abs().max() > 1e3  # the test really has large logits
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(out.cpu().double(), want.cpu(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu().double(), want_lse.cpu(), rtol=1e-6, atol=tol)


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_inputs(backend):
    q, k, v = qkv((2, 6, 3, 5, 4), device=device_for(backend))  # views of (b, l, h, e) storage
    q, k, v = (x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for x in (q, k, v))
    assert not q.is_contiguous()
    torch.testing.assert_close(attention(q, k, v, causal=True, backend=backend),
                               attention_ref(q, k, v, causal=True))


def test_empty_query():
    q, k, v = qkv((1, 2, 0, 3, 4))
    assert attention(q, k, v, backend="cpu").shape == (1, 2, 0, 4)


@pytest.mark.parametrize("backend", KERNELS)
def test_gradcheck_float64(backend):
    q, k, v = (x.requires_grad_() for x in qkv((1, 2, 3, 4, 2), device=device_for(backend)))
    fn = lambda *x: attention(*x, causal=True, return_lse=True, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=backend == "cuda")


@pytest.mark.parametrize("backend", KERNELS)
def test_grad_equals_autograd_of_sdpa(backend):
    dev = device_for(backend)
    q, k, v = (x.requires_grad_() for x in qkv((2, 2, 5, 7, 3), device=dev, seed=1))
    g = torch.randn(2, 2, 5, 3, dtype=torch.float64, device=dev)
    want = torch.autograd.grad(sdpa(q, k, v, causal=True), (q, k, v), g)
    got = torch.autograd.grad(attention(q, k, v, causal=True, backend=backend), (q, k, v), g)
    for name, x, y in zip("q k v".split(), got, want, strict=True):
        torch.testing.assert_close(x, y, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_callable_backend_gets_the_arguments():
    q, k, v = qkv((1, 1, 2, 2, 2))
    seen = {}
    attention(q, k, v, causal=True, backend=lambda *a, **kw: seen.update(kw))
    assert seen == {"causal": True, "scale": None, "return_lse": False}


T = torch.ones


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((T(1, 2, 3), T(1, 2, 3, 4), T(1, 2, 3, 4)), {}, ValueError, r"q must have 4 dimensions \(b, h, lq, e\)"),
        (([[1.0]], T(1, 1, 1, 1), T(1, 1, 1, 1)), {}, TypeError, "q must be a torch.Tensor"),
        ((T(1, 1, 2, 2, dtype=torch.int64),) * 3, {}, TypeError, "q must be float32 or float64"),
        ((T(1, 1, 2, 2), T(1, 1, 2, 2).double(), T(1, 1, 2, 2)), {}, TypeError, "k must be float32"),
        ((T(1, 1, 2, 2), T(1, 1, 2, 3), T(1, 1, 2, 3)), {}, ValueError, r"k must have shape .* b, h, e = \(1, 1, 2\)"),
        ((T(1, 2, 2, 2), T(1, 1, 2, 2), T(1, 1, 2, 2)), {}, ValueError, "k must have shape"),
        ((T(1, 1, 2, 2), T(1, 1, 3, 2), T(1, 1, 2, 2)), {}, ValueError, r"v must have shape .* \(1, 1, 3, 2\)"),
        ((T(1, 1, 3, 2), T(1, 1, 2, 2), T(1, 1, 2, 2)), {"causal": True}, ValueError, "causal attention needs lq <= lk"),
        ((T(1, 1, 3, 2), T(1, 1, 0, 2), T(1, 1, 0, 2)), {}, ValueError, "at least one key"),
        ((T(1, 1, 2, 2),) * 3, {"scale": "x"}, TypeError, "scale must be a number"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        attention(*args, backend="cpu", **kwargs)
