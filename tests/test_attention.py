"""attention: every backend against torch's scaled_dot_product_attention (in float64), the
log-sum-exp against torch.logsumexp of materialised scores, gradients (the FlashAttention-2
backward kernels) against autograd of the reference, memory linear in the length forward and
backward, large logits, merging partial results by their log-sum-exp, the canonical example,
and bad input."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL, CUDA, KERNELS, device_for

import minimodels.kernels.attention as A
import minimodels.kernels.attention.cpu as attention_cpu
import minimodels.kernels.attention.cuda as attention_cuda
from minimodels import lab
from minimodels.backend import available_backends, cuda_simulated
from minimodels.kernels._common import Example
from minimodels.kernels.attention import (
    attention,
    attention_ref,
    causal_mask,
    example_inputs,
    merge_attention,
)

# (b, h, lq, lk, e): lq = 1, lk = 1, lengths off the tile sizes, lq != lk
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 1, 9, 4), (1, 2, 9, 9, 3), (2, 1, 5, 13, 8), (1, 2, 13, 6, 2)]


def qkv(shape, dtype=torch.float64, device="cpu", seed=0, std=1.0):
    """[q, k, v] of the canonical example at (b, h, lq, lk, e), float64 by default; q and k
    scaled by ``std`` (the same values for any dtype and device)."""
    q, k, v = example_inputs(shape, dtype=torch.float64, seed=seed).args
    return [x.to(dtype=dtype, device=device) for x in (q * std, k * std, v)]


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
    ex = example_inputs(shape, dtype=dtype)
    tol = ex.rtol
    assert ex.rtol == ex.atol
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


@pytest.fixture(params=["cpu", CUDA, pytest.param("cuda separate dq", marks=CUDA.marks)])
def bwd_backend(request, monkeypatch):
    """The backward's fast paths: "cpu", "cuda" (by default dq added by atomics from the dkv
    kernel) and "cuda" with dq by its own kernel (``attention_cuda.BWD_DQ = "separate"``)."""
    if request.param == "cuda separate dq":
        monkeypatch.setattr(attention_cuda, "BWD_DQ", "separate")
        return "cuda"
    return request.param


def test_grad_equals_autograd_of_sdpa(bwd_backend):
    backend = bwd_backend
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


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kwargs", [{}, {"scale": 0.5, "return_lse": True}, {"causal": True}])
def test_empty_head_dimension_is_a_value_error(backend, kwargs):
    """Issue #13: e = 0 raised a bare ZeroDivisionError (default scale 1/sqrt(e)), or with a
    scale returned uninitialised memory as the lse on cpu and cuda. Every backend refuses it."""
    q, k, v = (torch.ones(1, 2, 3, 0, device=device_for(backend)) for _ in range(3))
    with pytest.raises(ValueError, match=r"q must have a head dimension e >= 1 \(its last"):
        attention(q, k, v, backend=backend, **kwargs)


def test_example_inputs_are_the_canonical_call(monkeypatch):
    ex = example_inputs((2, 3, 5, 4), dtype=torch.float64, seed=2)
    assert isinstance(ex, Example) and ex.kwargs == {"causal": False}
    q, k, v = ex.args
    assert q.shape == k.shape == v.shape == (2, 3, 5, 4) and q.dtype == torch.float64
    assert ex.sizes == {"batch": 2, "n_heads": 3, "seqlen": 5, "seqlen_k": 5, "d_head": 4}
    assert (ex.rtol, ex.atol) == (1e-12, 1e-12)
    ex32 = example_inputs((2, 3, 5, 7, 4), seed=2)  # (b, h, lq, lk, e): other key length
    assert ex32.args[1].shape == (2, 3, 7, 4) and ex32.args[0].dtype == torch.float32
    assert (ex32.rtol, ex32.atol) == (2e-6, 2e-6)
    torch.testing.assert_close(ex32.args[0].double(), q, rtol=1e-7, atol=0)  # same values
    torch.testing.assert_close(ex.call(attention, backend="cpu"), sdpa(*ex.args),
                               rtol=ex.rtol, atol=ex.atol)
    assert A.EXAMPLE_SHAPE == (1, 8, 4096, 64)  # the CPU benchmark's size
    monkeypatch.setattr(A, "EXAMPLE_SHAPE", (1, 2, 3, 4))
    assert example_inputs().sizes["seqlen"] == 3


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape, k1", [((2, 3, 5, 11, 4), 6), ((1, 2, 1, 9, 3), 1),
                                       ((1, 1, 7, 7, 2), 6)])
def test_merge_of_two_key_sets_equals_attention_over_all(backend, shape, k1):
    """Attention over keys [0, k1) merged with attention over [k1, lk) is attention over all
    keys (SDPA in float64): out and lse."""
    dev = device_for(backend)
    q, k, v = qkv(shape, device=dev, seed=k1)
    part1 = attention(q, k[:, :, :k1], v[:, :, :k1], return_lse=True, backend=backend)
    part2 = attention(q, k[:, :, k1:], v[:, :, k1:], return_lse=True, backend=backend)
    out, lse = merge_attention(*part1, *part2)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    torch.testing.assert_close(out.cpu(), sdpa(q, k, v), rtol=1e-12, atol=1e-12)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(shape[-1])
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lq, lk, k1", [(4, 10, 3), (1, 5, 4), (5, 5, 0)])
def test_merge_of_a_cache_and_a_causal_chunk_equals_causal_attention(lq, lk, k1):
    """A KV-cache step: the first k1 keys are seen by every query (k1 <= lk - lq), the rest
    under the bottom-right causal mask; merged, they are causal attention over all lk keys."""
    q, k, v = qkv((2, 2, lq, lk, 3), seed=lk)
    want, want_lse = attention_ref(q, k, v, causal=True, return_lse=True)
    part2 = attention(q, k[:, :, k1:], v[:, :, k1:], causal=True, return_lse=True)
    if k1 == 0:  # nothing cached: an empty part has lse = -inf and out = 0
        part1 = (torch.zeros_like(q), torch.full(q.shape[:3], -math.inf, dtype=q.dtype))
    else:
        part1 = attention(q, k[:, :, :k1], v[:, :, :k1], return_lse=True)
    out, lse = merge_attention(*part1, *part2)
    torch.testing.assert_close(out, sdpa(q, k, v, causal=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_merge_with_fully_masked_parts_and_large_logits():
    """A row that sees no key of a part (lse = -inf, out = 0) takes the other part unchanged;
    rows with no key in either part give out = 0, lse = -inf (no NaN); lse ~ 1e4 stays finite."""
    q, k, v = qkv((1, 2, 4, 8, 3), seed=9, std=60.0)
    out1, lse1 = attention(q, k[:, :, :5], v[:, :, :5], return_lse=True, backend="cpu")
    out2, lse2 = attention(q, k[:, :, 5:], v[:, :, 5:], return_lse=True, backend="cpu")
    assert lse1.abs().max() > 1e3  # the test really has large logits
    out, lse = merge_attention(out1, lse1, out2, lse2)
    torch.testing.assert_close(out, sdpa(q, k, v), rtol=1e-10, atol=1e-10)
    masked = torch.zeros_like(lse2).bool()
    masked[:, :, 1:3] = True  # rows 1 and 2 see no key of part 2
    out2m = out2.masked_fill(masked[..., None], 0.0)
    lse2m = lse2.masked_fill(masked, -math.inf)
    out, lse = merge_attention(out1, lse1, out2m, lse2m)
    torch.testing.assert_close(out[:, :, 1:3], out1[:, :, 1:3], rtol=0, atol=0)
    torch.testing.assert_close(lse[:, :, 1:3], lse1[:, :, 1:3], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 0], merge_attention(out1, lse1, out2, lse2)[0][:, :, 0])
    lse1m = lse1.masked_fill(masked, -math.inf)
    out, lse = merge_attention(out1.masked_fill(masked[..., None], 0.0), lse1m, out2m, lse2m)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :, 1:3] == 0).all() and (lse[:, :, 1:3] == -math.inf).all()
    assert torch.isfinite(lse[:, :, [0, 3]]).all()


def test_merge_is_differentiable():
    q, k, v = (x.requires_grad_() for x in qkv((1, 1, 3, 5, 2), seed=4))
    fn = lambda q, k, v: merge_attention(*attention_ref(q, k[:, :, :2], v[:, :, :2], return_lse=True),
                                         *attention_ref(q, k[:, :, 2:], v[:, :, 2:], return_lse=True))
    assert torch.autograd.gradcheck(fn, (q, k, v))


O, L = torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((O[0], L, O, L), ValueError, r"out1 must have 4 dimensions \(b, h, l, e\)"),
        ((O, L, O[..., :2], L), ValueError, r"out2 must have shape \(b, h, l, e\) = \(1, 2, 3, 4\)"),
        ((O, L[..., :2], O, L), ValueError, r"lse1 must have shape \(b, h, l\) = \(1, 2, 3\)"),
        ((O, L, O, L.double()), TypeError, "lse2 must be float32"),
        ((O, L, O, L[None]), ValueError, "lse2 must have 3 dimensions"),
        ((O, L.tolist(), O, L), TypeError, "lse1 must be a torch.Tensor"),
        ((O, L, O, L.to("meta")), ValueError, "lse2 must be on cpu"),
    ],
)
def test_merge_bad_input_names_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        merge_attention(*args)


# =============================================================================================
# Non-finite scores (found by the fuzzer, tests/test_fuzz.py): every backend agrees with ref on
# where out and lse are nan or ±inf. A row whose visible scores are all -inf has out = nan
# (e^(s - lse) = e^nan) and lse = -inf; a +inf score gives out = nan, lse = +inf; a nan score
# gives nan. The CPU kernel raised SystemError (ZeroDivisionError in Numba) on the first.
# =============================================================================================


def _non_finite_case(name, dtype):
    """(q, k, v, kwargs) of one case, built in float64 then cast to ``dtype``."""
    ones = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    if name == "causal row sees only -inf":  # row 0 sees key 0 only (-inf), row 1 both
        q, k, v = ones.expand(1, 1, 2, 1), torch.tensor([[[[-math.inf], [1.0]]]]), ones.expand(
            1, 1, 2, 1)
        return q, k.double(), v, {"causal": True}
    if name in ("overflow to -inf", "overflow to +inf"):  # float32 scores of ±1e60
        q, k, v = example_inputs((1, 1, 1, 1, 1), dtype=torch.float64, seed=0).args
        return q * 1e30, k * 1e30, v, {"scale": 1.0 if name.endswith("-inf") else -1.0}
    q, k, v = qkv((1, 1, 3, 70, 2), seed=2)
    if name == "+inf score":  # key 5 = +inf · q: +inf for the queries with q > 0, else -inf
        k[..., 5, :] = math.inf
        q = q.abs() * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)[:, None]
    elif name == "nan score":
        k[..., 7, 1] = math.nan
    elif name == "first key tile all -inf":  # past BLOCK_K = 64 (CPU) and BN (CUDA) keys
        k[..., :66, :] = -math.inf
    return q, k, v, {}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["causal row sees only -inf", "overflow to -inf",
                                  "overflow to +inf", "+inf score", "nan score",
                                  "first key tile all -inf"])
def test_non_finite_scores_agree_with_ref(backend, dtype, name):
    if name.startswith("overflow") and dtype == torch.float64:
        pytest.skip("1e60 is finite in float64")
    dev = device_for(backend)
    q, k, v, kwargs = (x.to(dtype=dtype, device=dev) if isinstance(x, torch.Tensor) else x
                       for x in _non_finite_case(name, dtype))
    out, lse = attention(q, k, v, **kwargs, return_lse=True, backend=backend)
    want, want_lse = attention(q.cpu(), k.cpu(), v.cpu(), **kwargs, return_lse=True,
                               backend="ref")
    assert not torch.isfinite(want_lse).all() or name == "first key tile all -inf"
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.cpu(), want, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=tol, atol=tol, equal_nan=True)


# =============================================================================================
# Backward (issue #15): FlashAttention-2's backward kernels, tile by tile from the saved lse,
# against autograd of the reference. Lengths 1, primes and past the tiles (CPU: 128 queries x 64
# keys; simulator: 4 x 4), lq != lk, both masks, an explicit scale, a cotangent on lse too.
# =============================================================================================

GRAD_SHAPES = [(1, 1, 1, 1, 1), (1, 2, 3, 7, 2), (2, 1, 5, 3, 3), (1, 1, 7, 11, 2)]


@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_backward_gradcheck_float64(bwd_backend, shape, causal):
    """gradcheck of (out, lse) in float64: the Jacobian of lse is checked too (d lse_i adds
    P_ij · dlse_i to dS_ij)."""
    backend = bwd_backend
    if causal and shape[2] > shape[3]:
        pytest.skip("causal needs lq <= lk")
    q, k, v = (x.requires_grad_() for x in qkv(shape, device=device_for(backend), seed=7))
    fn = lambda *x: attention(*x, causal=causal, scale=0.7, return_lse=True, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=backend == "cuda")


def _grads(backend, shape, dtype, causal, seed=4, scale=0.3):
    """Gradients of Σ out·G + Σ lse·g (G, g standard normal, seeded) w.r.t. q, k, v."""
    q, k, v = qkv(shape, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(q.shape, dtype=torch.float64, generator=gen)  # (b, h, lq, e)
    g = torch.randn(q.shape[:3], dtype=torch.float64, generator=gen)  # (b, h, lq)
    dev = device_for(backend)
    xs = [x.to(dtype=dtype, device=dev).requires_grad_() for x in (q, k, v)]
    out, lse = attention(*xs, causal=causal, scale=scale, return_lse=True, backend=backend)
    cot = (G.to(dtype=dtype, device=dev), g.to(dtype=dtype, device=dev))
    return [x.cpu() for x in torch.autograd.grad((out, lse), xs, cot)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_across_tiles_equals_autograd_of_ref(bwd_backend, dtype, causal):
    """Many query and key tiles with short last ones, lq != lk. float64 within 1e-12 of
    autograd of ref; float32 against that float64 truth within 2x the float32 output
    tolerance, relative to each gradient's largest magnitude (measured: <= 0.6x, as ref's own
    float32 gradients)."""
    backend = bwd_backend
    shape = (2, 1, 300, 331, 6) if backend == "cpu" else (1, 1, 13, 17, 3)
    want = _grads("ref", shape, torch.float64, causal)
    got = _grads(backend, shape, dtype, causal)
    tol = 1e-12 if dtype == torch.float64 else 2 * example_inputs(shape, dtype=dtype).rtol
    for name, x, y in zip("q k v".split(), got, want, strict=True):
        assert x.dtype == dtype
        torch.testing.assert_close(x.double(), y, rtol=0, atol=tol * max(1.0, y.abs().max()),
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.skipif(not cuda_simulated(), reason="sizes chosen for the simulator's tiles")
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_cuda_z_chunks_shorter_than_a_walk_tile(monkeypatch, causal, dq_mode):
    """The CUDA backward's step C stages Z (dO and Q in dkv, K in dq) VK walk rows at a time, as
    the GPU's float32 dkv does (VK = 16 of BC = 64), which the simulator's tiles never need. A
    smaller shared-memory budget makes VK = 1 (dkv) and 2 (dq) of BC = 4 there, at e = 17; and
    dkv_atomic's step D stages K_J in KW = 2 keys of BR = 4."""
    small = functools.partial(attention_cuda._bwd_tiles, shared_bytes=760)
    monkeypatch.setattr(attention_cuda, "_bwd_tiles", small)
    monkeypatch.setattr(attention_cuda, "BWD_DQ", dq_mode)
    attention_cuda._attention_bwd_kernel.cache_clear()
    try:
        assert [small(8, 17, kind)["VK"] for kind in ("dkv", "dq", "dkv_atomic")] == [1, 2, 1]
        assert small(8, 17, "dkv")["BC"] == 4
        assert (small(8, 17, "dkv_atomic")["KW"], small(8, 17, "dkv_atomic")["BR"]) == (2, 4)
        want = _grads("ref", (1, 2, 6, 7, 17), torch.float64, causal)
        got = _grads("cuda", (1, 2, 6, 7, 17), torch.float64, causal)
    finally:
        attention_cuda._attention_bwd_kernel.cache_clear()  # the usual budget's kernels next
    for name, x, y in zip("q k v".split(), got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("itemsize", [4, 8])
def test_backward_cuda_gpu_tiles_fit_shared_memory(monkeypatch, itemsize):
    """The GPU's tiles (not the simulator's): for head dims from 1 to 512, every backward kernel's
    layout fits the 48 KB of static shared memory, its Z chunks divide a walk tile, a group is
    two whole warps and the accumulators cover e; a head dim that cannot fit is a ValueError."""
    monkeypatch.setattr(attention_cuda, "cuda_simulated", lambda: False)
    for e in (1, 2, 3, 17, 64, 100, 128, 255, 256, 512):
        for kind in ("dkv", "dq", "dkv_atomic"):
            T = attention_cuda._bwd_tiles(itemsize, e, kind)
            assert T["SMEM"] * itemsize <= attention_cuda.SHARED_BYTES, (e, kind, T)
            assert T["VK"] >= 1 and T["BC"] % T["VK"] == 0, (e, kind, T)
            assert T["TY"] * T["TX"] == 64 and T["EB"] * T["TXC"] >= e, (e, kind, T)
        # dkv_atomic's step D: K_J chunks over step A's buffers, its grid covering the queries
        T = attention_cuda._bwd_tiles(itemsize, e, "dkv_atomic")
        assert T["BR"] % T["KW"] == 0 and T["KW"] * T["EB"] * T["TXC"] <= T["MO"], (e, T)
        assert T["TYD"] * T["TX"] == 128 and T["TYD"] * T["RMD"] == T["BC"], (e, T)
    with pytest.raises(ValueError, match="head dim e=100000"):
        attention_cuda._bwd_tiles(itemsize, 100000, "dkv")


@pytest.mark.skipif("cuda" not in available_backends(), reason="needs the cuda backend")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_cuda_ddot_is_flash_attention_2s_D(dtype):
    """ddot, a thread per query row: D_i = dO_i·o_i - dlse_i, for 37 rows (past one block of
    32 in the simulator, 128 on a GPU: a partial block) of e = 5; against torch in float64."""
    gen = torch.Generator().manual_seed(3)
    do, out = (torch.randn(37, 5, dtype=torch.float64, generator=gen) for _ in range(2))
    dlse = torch.randn(37, dtype=torch.float64, generator=gen)
    dev = device_for("cuda")
    args = [x.to(dtype=dtype, device=dev) for x in (do, out, dlse)]
    D = torch.full((37,), math.nan, dtype=dtype, device=dev)
    kernel, rows, threads = attention_cuda._attention_bwd_kernel(
        attention_cuda.numpy_dtype(dtype), 5, "ddot")
    attention_cuda.launch(kernel, (-(-37 // rows),), threads, *(x.view(-1) for x in args),
                          D, 37)
    want = (do * out).sum(-1) - dlse
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(D.cpu().double(), want, rtol=tol, atol=tol)


@pytest.mark.skipif("cuda" not in available_backends(), reason="needs the cuda backend")
@pytest.mark.cuda
def test_backward_cuda_dq_switch_picks_the_kernels(monkeypatch):
    """BWD_DQ = "separate" runs ddot, dkv, dq; "atomic" runs ddot and dkv_atomic only (which
    adds dq): both give ref's gradients (float64). Any other value is a ValueError."""
    kinds, compile_kernel = [], attention_cuda._attention_bwd_kernel
    monkeypatch.setattr(attention_cuda, "_attention_bwd_kernel",
                        lambda dtype, e, kind: kinds.append(kind) or compile_kernel(dtype, e, kind))
    want = _grads("ref", (1, 1, 5, 6, 3), torch.float64, True)
    for mode, launched in (("separate", ["ddot", "dkv", "dq"]), ("atomic", ["ddot", "dkv_atomic"])):
        monkeypatch.setattr(attention_cuda, "BWD_DQ", mode)
        kinds.clear()
        got = _grads("cuda", (1, 1, 5, 6, 3), torch.float64, True)
        assert kinds == launched, mode
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(attention_cuda, "BWD_DQ", "atomics")
    with pytest.raises(ValueError, match="BWD_DQ must be 'separate' or 'atomic'"):
        _grads("cuda", (1, 1, 2, 2, 1), torch.float64, False)


@pytest.mark.parametrize("groups", [1, 3])
def test_backward_cpu_key_groups_agree(monkeypatch, groups):
    """The CPU backward splits a head's key tiles into G groups with partial dQ (G = 2 with 2
    threads and 2 heads); any G gives the reference's gradients."""
    monkeypatch.setattr(attention_cpu, "_groups", lambda rows, lk: groups)
    want = _grads("ref", (1, 2, 200, 260, 5), torch.float64, True)
    got = _grads("cpu", (1, 2, 200, 260, 5), torch.float64, True)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_backward_non_contiguous_inputs(bwd_backend):
    backend = bwd_backend
    dev = device_for(backend)
    q, k, v = qkv((2, 3, 5, 6, 4), device=dev, seed=8)  # views of (b, l, h, e) storage
    q, k, v = (x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).requires_grad_()
               for x in (q, k, v))
    assert not q.is_contiguous()
    g = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(attention(q, k, v, causal=True, backend=backend), (q, k, v),
                              g.to(dev))
    want = torch.autograd.grad(attention_ref(q, k, v, causal=True), (q, k, v), g.to(dev))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_backward_of_an_empty_query():
    q, k, v = (x.requires_grad_() for x in qkv((1, 2, 0, 3, 4)))
    dq, dk, dv = torch.autograd.grad(attention(q, k, v, backend="cpu").sum(), (q, k, v))
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all()


def _fwd_bwd_peak(backend, length, e=16):
    """Peak bytes torch allocates for a causal forward and backward at lq = lk = length."""
    q, k, v = (x.requires_grad_() for x in qkv((1, 2, length, length, e)))
    g = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def fwd_bwd():
        with torch.enable_grad():
            out = attention(q, k, v, causal=True, backend=backend)
            torch.autograd.grad(out, (q, k, v), g)

    return lab.peak_memory(fwd_bwd)


def test_forward_and_backward_memory_is_linear_in_length():
    """The kernels' forward + backward hold O(l·e) bytes (the backward recomputes the scores
    tile by tile): doubling l doubles the peak; the reference's (l x l) scores quadruple it.
    (Measured at l = 256, 512, 1024, e = 16, float64: cpu 0.54, 1.07, 2.15 MB; ref 5.4, 21.4,
    85 MB.) Numba's scratch inside the kernel is invisible here: a constant per task."""
    cpu = [_fwd_bwd_peak("cpu", n) for n in (256, 512, 1024)]
    ref = [_fwd_bwd_peak("ref", n) for n in (256, 512)]
    assert cpu[1] / cpu[0] < 2.5 and cpu[2] / cpu[1] < 2.5, cpu
    assert ref[1] / ref[0] > 3.5, ref
    assert cpu[1] < ref[1] / 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["causal row sees only -inf", "overflow to -inf",
                                  "overflow to +inf", "+inf score", "nan score",
                                  "first key tile all -inf"])
def test_backward_of_non_finite_scores(bwd_backend, dtype, name):
    """The backward runs on the non-finite cases above (the forward's nan rows included): where
    ref's gradient is finite, the kernel's is finite and equal; where ref's is nan the kernel
    may give nan (a hidden key gets 0 from a row of nan, where ref's dv gets 0 · nan)."""
    backend = bwd_backend
    if name.startswith("overflow") and dtype == torch.float64:
        pytest.skip("1e60 is finite in float64")
    dev = device_for(backend)
    q, k, v, kwargs = _non_finite_case(name, dtype)
    got, want = [], []
    for be, d, result in ((backend, dev, got), ("ref", "cpu", want)):
        xs = [x.to(dtype=dtype, device=d).requires_grad_() for x in (q, k, v)]
        out, lse = attention(*xs, **kwargs, return_lse=True, backend=be)
        result += torch.autograd.grad((out, lse), xs, (torch.ones_like(out), torch.ones_like(lse)))
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for x, y in zip(got, want, strict=True):
        finite = torch.isfinite(y)
        assert torch.isfinite(x.cpu()[finite]).all()
        torch.testing.assert_close(x.cpu()[finite], y[finite], rtol=tol, atol=tol)


# =============================================================================================
# The backward's D (issue #15): FlashAttention-2's D_i = dO_i·o_i from the saved output. The CPU
# kernel: for most rows, the exact Σ_j P_ij dP_ij pass only for one-hot rows; lse's rounding
# (lse_lo). The CUDA kernels: for every row, as the chain of FMAs that forms dP_ij.
# =============================================================================================


def _grads_of(backend, q, k, v, dtype, **kwargs):
    """Gradients of Σ out·G (G standard normal, seeded) w.r.t. q, k, v, inputs cast to dtype
    (and moved to ``backend``'s device); float64 on the CPU."""
    dev = device_for(backend) if isinstance(backend, str) and backend != "ref" else "cpu"
    G = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xs = [x.to(dtype=dtype, device=dev).requires_grad_() for x in (q, k, v)]
    out = attention(*xs, **kwargs, backend=backend)
    return [g.double().cpu() for g in torch.autograd.grad(out, xs, G.to(dtype=dtype, device=dev))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_flags_one_hot_rows_and_keeps_lse_rounding(dtype):
    """``_fwd_cpu``'s extras: onehot = 1 exactly where ℓ = 1 (a row that sees one key, or whose
    other weights round away), and lse + lse_lo = log Σ_j e^(s_ij) in float64."""
    q, k, v = qkv((1, 1, 130, 130, 4), dtype=dtype, seed=3, std=1.0)
    q[..., :3, :] *= 1e3  # rows 0-2: one-hot (logits ~1e6 apart)
    rows = [x.reshape(1, 130, 4).contiguous() for x in (q, k, v)]
    out, lse, lse_lo, onehot = attention_cpu._fwd_cpu(*rows, True, 0.5)
    assert onehot.dtype == torch.uint8 and onehot[0, :3].tolist() == [1, 1, 1]
    assert onehot[0, 3:].sum() < 127 - 3  # most other rows see many keys with weight
    s = 0.5 * (q[0, 0].double() @ k[0, 0].double().T)  # (lq, lk), from the dtype's values
    s = s.masked_fill(~causal_mask(130, 130), -math.inf)
    want = torch.logsumexp(s, -1)
    err_hi = (lse[0].double() - want).abs().max().item()
    err = (lse[0].double() + lse_lo[0].double() - want).abs().max().item()
    assert err <= err_hi
    if dtype == torch.float32:  # the scores' own float32 rounding stays (|s| ~ 1e3 in rows 0-2)
        assert (lse_lo != 0).any() and err < 1e-4 * want.abs().max().item() * 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_one_hot_rows_give_exact_zeros_beside_ordinary_rows(bwd_backend, dtype):
    """In one query tile: rows whose softmax is one-hot (logits ~1e4 apart) and ordinary rows.
    ref's dq of a one-hot row is exactly 0 (every dS_ij is: P = 0, or P = 1 and dP_ij = D_i);
    the kernels' is exactly 0 too: the CPU's D from the exact pass for those rows, bit for bit;
    CUDA's D = dO_i·o_i by the very chain of FMAs that forms dP_ij, with o_i = v_j to the bit.
    Every gradient matches ref elsewhere (D = dO·o for the ordinary rows)."""
    q, k, v = qkv((1, 1, 9, 9, 3), seed=5)
    q[..., :4, :] *= 1e2
    k[..., :4, :] *= 1e2  # rows 0-3 see keys 0-3 only (causal) at logits ~1e4: one-hot
    got = _grads_of(bwd_backend, q, k, v, dtype, causal=True)
    want = _grads_of("ref", q, k, v, torch.float64, causal=True)
    zeros = want[0] == 0
    assert zeros[..., :4, :].all()
    assert (got[0][zeros] == 0).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * max(1.0, y.abs().max().item()))


def test_backward_near_one_hot_row_with_large_values_within_the_fuzzers_tolerance(bwd_backend):
    """The long fuzz's finding (2026-12-05), made by hand: one query, two keys 18.5 apart in
    logit (P = 1 - 9e-9, 9e-9: ℓ rounds to 1 in float32), |v| = 1000 and dO ⟂ v_ref, so that
    dP_ref = 0 and the whole D = Σ_j P_j dP_j = 2e-5 is the far key's term. In float32 o rounds
    to v_ref, so FlashAttention-2's D = dO·o is 0: CUDA's dq and dk were wrong by 100% before
    the forward flagged the row (ℓ = 1) and ``dfix`` formed its D from the keys (the CPU's
    exact pass does the same). Every backend now within the fuzzer's tolerance: 8x the float32
    reference's own error from the float64 truth + 16 eps of the gradient's scale (on an H100,
    whose backward takes e^x by ex2.approx, dk is 5.6x ref's error: 4.8e-7 of its scale)."""
    from test_fuzz import FLOOR32, REF_FACTOR

    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[20.0, 0.0], [1.5, 0.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1000.0, 1000.0], [1000.0, -1000.0]]]], dtype=torch.float64)
    G = torch.tensor([[[[1.0, -1.0]]]], dtype=torch.float64)

    def grads(backend, dtype):
        dev = device_for(backend) if backend != "ref" else "cpu"
        xs = [x.to(dtype=dtype, device=dev).requires_grad_() for x in (q, k, v)]
        out = attention(*xs, scale=1.0, backend=backend)
        return [g.double().cpu() for g in torch.autograd.grad(out, xs, G.to(dtype=dtype,
                                                                            device=dev))]

    truth, ref32 = grads("ref", torch.float64), grads("ref", torch.float32)
    got = grads(bwd_backend, torch.float32)
    assert truth[0].abs().max() > 1e-4  # dq = Σ_j dS_j k_j is ~3e-4, all of it from D
    for name, x, y, y32 in zip("qkv", got, truth, ref32, strict=True):
        err, err32 = (x - y).abs().max().item(), (y32 - y).abs().max().item()
        assert err <= REF_FACTOR * err32 + FLOOR32 * y.abs().max().item(), (name, err, err32)


def test_backward_large_logits_float32_within_the_fuzzers_tolerance(bwd_backend):
    """The fuzzer's large-logit float32 case (logits ~1e3, a few rows with two competing keys):
    the gradients stay within 8x the float32 reference's own error from the float64 truth (its
    rule), with a margin of 2. CPU: subtracting lse's rounding lse_lo in the backward took grad
    q from 1.0x that tolerance (the exact-D kernel, where lse's ulp/2 = 6e-5 scaled each row's
    P) to 0.24x. CUDA (D = dO·o, no lse_lo): the rounding of lse scales a row's dS by e^(-lse_lo)
    as a whole, so its rows still sum to 0. The simulator takes 2 heads of 24 queries."""
    backend = bwd_backend
    n = 82 if backend == "cpu" or not cuda_simulated() else 24
    ex = example_inputs((1, 2, n, n, 3), dtype=torch.float64, seed=82)
    q, k, v = (x.float().double() for x in ex.args)
    q, k = q * 10.0, k * 10.0
    kwargs = {"causal": True, "scale": 10.0}
    truth = _grads_of("ref", q, k, v, torch.float64, **kwargs)
    ref32 = _grads_of("ref", q, k, v, torch.float32, **kwargs)
    got = _grads_of(backend, q, k, v, torch.float32, **kwargs)
    for name, x, y, y32 in zip("qkv", got, truth, ref32, strict=True):
        err, err32 = (x - y).abs().max().item(), (y32 - y).abs().max().item()
        assert err <= 0.5 * 8 * err32, (name, err, err32)
