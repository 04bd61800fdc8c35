"""wkv: every backend against the WKV formula materialised as a dense causal softmax in float64
(a reference outside the kernels' log-space recurrence), large keys in float32, state
resumption, gradients against autograd of the reference, ``out=``, the canonical example, and
bad input."""

import pytest
import torch
from helpers import ALL, KERNELS, device_for

import minimodels.kernels.wkv as W
import minimodels.kernels.wkv.cpu as W_cpu
from minimodels.kernels._common import Example
from minimodels.kernels.wkv import example_inputs, wkv, wkv_ref, wkv_state0

pytestmark = pytest.mark.ch03

SHAPES = [(1, 1, 1), (2, 1, 5), (2, 37, 19), (1, 70, 33), (3, 16, 16)]  # tails of CB, ITEMS


def dense_wkv(w, u, k, v):
    """y_t = Σ_{i≤t} softmax_i(z_{t,i}) v_i with z_{t,i} = -(t-1-i)·w + k_i (i < t) and
    z_{t,t} = u + k_t: the formula as one masked softmax per channel, in float64."""
    w, u, k, v = (x.double() for x in (w, u, k, v))
    l = k.shape[1]
    t = torch.arange(l)
    dist = (t[:, None] - 1 - t[None, :]).double()  # (t, i): t - 1 - i
    z = -dist[None, :, :, None] * w + k[:, None, :, :]  # (b, t, i, c)
    diag = torch.eye(l, dtype=torch.bool)[None, :, :, None]
    z = torch.where(diag, (u + k)[:, :, None, :].expand_as(z), z)
    z = z.masked_fill(~(t[:, None] >= t[None, :])[None, :, :, None], -torch.inf)
    return (torch.softmax(z, dim=2) * v[:, None]).sum(2)  # (b, t, c)


def inputs(shape, dtype=torch.float64, device="cpu", seed=0, k_scale=2.0):
    """[w, u, k, v] of the canonical example (decay rates in [0, 2)), float64 by default, with
    w[0] = 0 and k scaled by ``k_scale`` (the same values for any dtype and device)."""
    w, u, k, v = example_inputs(shape, dtype=torch.float64, seed=seed).args
    w[0] = 0.0  # no decay at all: a plain causal average weighted by e^k
    return [x.to(dtype=dtype, device=device) for x in (w, u, k * k_scale, v)]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_dense_softmax(shape):
    w, u, k, v = inputs(shape)
    torch.testing.assert_close(wkv_ref(w, u, k, v), dense_wkv(w, u, k, v))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_equal_dense_softmax(backend, shape, dtype):
    dev = device_for(backend)
    args = inputs(shape, dtype, dev, seed=sum(shape))
    want = dense_wkv(*inputs(shape, seed=sum(shape)))
    y = wkv(*args, backend=backend)
    assert y.dtype == dtype and y.shape == shape and y.device.type == dev.type
    ex = example_inputs(shape, dtype=dtype)
    torch.testing.assert_close(y.cpu().double(), want, rtol=ex.rtol, atol=ex.atol)


@pytest.mark.parametrize("backend", ALL)
def test_large_keys_stay_finite_and_accurate_in_float32(backend):
    """|k| = 60: e^60 ≈ 1e26 and sums of such overflow float32 (max 3e38) once doubled up to
    e^88; with k = ±60 and u = 30 a linear-space sum overflows. Log space does not."""
    shape = (2, 23, 9)
    w, u, k, v = inputs(shape, seed=3)
    k = 60.0 * torch.sign(k)
    u = u + 30.0
    want = dense_wkv(w, u, k, v)
    dev = device_for(backend)
    y = wkv(*(x.float().to(dev) for x in (w, u, k, v)), backend=backend).cpu()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("split", [1, 7, 20])
def test_state_resumption_equals_one_call(backend, split):
    dev = device_for(backend)
    w, u, k, v = inputs((2, 21, 17), device=dev, seed=5)
    whole, s_whole = wkv(w, u, k, v, return_state=True, backend=backend)
    y1, s = wkv(w, u, k[:, :split], v[:, :split], return_state=True, backend=backend)
    y2, s2 = wkv(w, u, k[:, split:], v[:, split:], state=s, return_state=True, backend=backend)
    assert s.shape == (2, 3, 17)
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(s2, s_whole, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", KERNELS)
def test_one_token_at_a_time_equals_one_call(backend):
    dev = device_for(backend)
    w, u, k, v = inputs((2, 9, 5), device=dev, seed=6)
    s, ys = None, []
    for t in range(9):
        y, s = wkv(w, u, k[:, t:t + 1], v[:, t:t + 1], state=s, return_state=True,
                   backend=backend)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), wkv_ref(w, u, k, v))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_match_reference_with_state_in_float32(backend):
    dev = device_for(backend)
    w, u, k, v = inputs((2, 30, 20), torch.float32, dev, seed=7)
    _, s = wkv_ref(w, u, k, v, return_state=True)
    y = wkv(w, u, k, v, state=s, backend=backend)
    torch.testing.assert_close(y, wkv_ref(w, u, k, v, state=s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_gradcheck_backward_kernel(backend):
    dev = device_for(backend)
    w, u, k, v = inputs((2, 6, 4), device=dev, seed=8)
    args = [x.requires_grad_() for x in (w + 0.5, u, k, v)]  # w > 0: finite differences stay legal
    assert torch.autograd.gradcheck(lambda *a: wkv(*a, backend=backend), args)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("with_state", [False, True])
def test_backward_kernel_equals_autograd_of_reference(backend, with_state):
    dev = device_for(backend)
    w, u, k, v = inputs((3, 19, 17), device=dev, seed=9)
    state = wkv_ref(w, u, k, v, return_state=True)[1] if with_state else None
    gy = torch.randn(k.shape, dtype=k.dtype, generator=torch.Generator().manual_seed(1)).to(dev)
    grads = []
    for be in ("ref", backend):
        args = [x.clone().requires_grad_() for x in (w, u, k, v)]
        grads.append(torch.autograd.grad(wkv(*args, state=state, backend=be), args, gy))
    for name, want, got in zip("wukv", *grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", KERNELS)
def test_backward_with_large_keys_in_float32(backend):
    dev = device_for(backend)
    w, u, k, v = inputs((1, 15, 6), seed=10, k_scale=30.0)
    gy = torch.randn(k.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a64 = [x.clone().requires_grad_() for x in (w, u, k, v)]
    want = torch.autograd.grad(wkv_ref(*a64), a64, gy)
    a32 = [x.float().to(dev).requires_grad_() for x in (w, u, k, v)]
    got = torch.autograd.grad(wkv(*a32, backend=backend), a32, gy.float().to(dev))
    for g, wnt in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.cpu().double(), wnt, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ALL)
def test_w_gradient_with_large_decay_and_keys_in_float32(backend):
    """Issue #13: w = 16, k = ±60: one token dominates each state and ∂L/∂w is ~1e-7 in some
    channels. Summing g (∂a/∂w - y ∂b/∂w) / den in float32 cancelled two nearly equal terms
    (errors of 1e-6, 230%); the kernels now carry ∂a/∂w - m ∂b/∂w about the state's mean."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(13)
    c, l = 16, 100
    w = torch.full((c,), 16.0, dtype=torch.float64)
    u = torch.randn(c, generator=g, dtype=torch.float64)
    k = 60.0 * torch.sign(torch.randn(1, l, c, generator=g, dtype=torch.float64))
    v = torch.randn(1, l, c, generator=g, dtype=torch.float64)
    gy = torch.randn(1, l, c, generator=g, dtype=torch.float64)
    a64 = [x.clone().requires_grad_() for x in (w, u, k, v)]
    want = torch.autograd.grad(wkv_ref(*a64), a64, gy)
    assert want[0].abs().min() < 1e-6  # the channels that went wrong
    a32 = [x.float().to(dev).requires_grad_() for x in (w, u, k, v)]
    got = torch.autograd.grad(wkv(*a32, backend=backend), a32, gy.float().to(dev))
    torch.testing.assert_close(got[0].cpu().double(), want[0], rtol=1e-4, atol=1e-7)
    for name, x, y in zip("ukv", got[1:], want[1:], strict=True):
        torch.testing.assert_close(x.cpu().double(), y, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_inputs(backend):
    dev = device_for(backend)
    w, u, k, v = inputs((2, 12, 7), device=dev)
    k_t = k.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    v_t = v[:, :, ::1].transpose(1, 2).contiguous().transpose(1, 2)
    assert not (k_t.is_contiguous() or v_t.is_contiguous())
    torch.testing.assert_close(wkv(w, u, k_t, v_t, backend=backend), wkv_ref(w, u, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_cpu_kernel_blocks_of_channels(dtype, threads, monkeypatch):
    """The CPU forward splits channels into blocks by thread count (small calls use one block):
    force the split of a large call, with a short last block, against the dense softmax."""
    block, calls = W_cpu._block, []
    assert [block(b, 2048, t) for b, t in [(1, 2), (3, 2), (4, 2), (1, 1)]] == [1024] * 2 + [2048] * 2
    shape = (3, 9, 37)  # 37 channels: blocks of 16 or 32 leave a short last block
    monkeypatch.setattr(W_cpu, "_block", lambda b, c, t: calls.append(t) or block(b, c, threads))
    w, u, k, v = inputs(shape, dtype, seed=11)
    y, s = wkv(w, u, k, v, return_state=True, backend="cpu")
    assert calls  # the patch reached the kernel's wrapper
    ex = example_inputs(shape, dtype=dtype)
    tol = ex.rtol
    torch.testing.assert_close(y.double(), dense_wkv(*inputs(shape, seed=11)), rtol=tol, atol=tol)
    torch.testing.assert_close(s, wkv_ref(w, u, k, v, return_state=True)[1], rtol=tol, atol=tol)
    if dtype == torch.float64:  # the backward kernel uses the same blocks
        gy = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
        grads = []
        for be in ("ref", "cpu"):
            args = [x.clone().requires_grad_() for x in (w, u, k, v)]
            grads.append(torch.autograd.grad(wkv(*args, state=s, backend=be), args, gy))
        for want, got in zip(*grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_empty_sequence():
    w, u, k, v = inputs((2, 1, 3))
    y, s = wkv(w, u, k[:, :0], v[:, :0], return_state=True, backend="cpu")
    assert y.shape == (2, 0, 3)
    torch.testing.assert_close(s, wkv_state0(2, 3, torch.float64))


def test_negative_decay_is_a_value_error():
    w, u, k, v = inputs((1, 4, 3))
    w[1] = -0.1
    with pytest.raises(ValueError, match="w must be >= 0"):
        wkv(w, u, k, v)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name, value", [("u", torch.inf), ("u", -torch.inf), ("u", torch.nan),
                                         ("w", torch.inf), ("w", torch.nan)])
def test_non_finite_u_or_w_is_a_value_error(backend, name, value):
    """Issue #13: u = +inf gave y = v on the CPU and NaN on ref and cuda. A non-finite decay or
    bonus is a diverged parameter: every backend refuses it, naming the argument."""
    args = dict(zip("wukv", inputs((1, 4, 3), device=device_for(backend)), strict=True))
    args[name][1] = value
    with pytest.raises(ValueError, match=f"{name} must be .*finite"):
        wkv(*args.values(), backend=backend)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("step, value", [(1, torch.inf), (0, -torch.inf), (2, -torch.inf)])
def test_infinite_key_agrees_with_ref(backend, dtype, step, value):
    """Found by the fuzzer: k = +inf (e^(inf - inf) in the definition) gave y = v from that
    step on, and k = -inf at the first step (an empty past: 0/0) gave y = v_0, on the CPU,
    whose exp clamped e^-inf to 1.6e-38; ref and cuda give nan. k = -inf after a non-empty
    past is a token of weight 0: y = the past's mean, finite. Only channel 1 is hit."""
    dev = device_for(backend)
    w, u, k, v = inputs((2, 5, 3), dtype, dev)
    k[0, step, 1] = value
    y, s = wkv(w, u, k, v, return_state=True, backend=backend)
    want, want_s = wkv(*(x.cpu() for x in (w, u, k, v)), return_state=True, backend="ref")
    tol = {torch.float32: 2e-6, torch.float64: 1e-12}[dtype]
    assert not torch.isfinite(want).all() or step == 2
    torch.testing.assert_close(y.cpu(), want, rtol=tol, atol=tol, equal_nan=True)
    # the state: a and b (nan after k = +inf, as ref's); p only scales them
    torch.testing.assert_close(s[:, :2].cpu(), want_s[:, :2], rtol=tol, atol=tol, equal_nan=True)
    if step == 2:  # finite: the backward agrees with autograd of the reference too
        args = [x.detach().requires_grad_() for x in (w, u, k, v)]
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        got = torch.autograd.grad(wkv(*args, backend=backend), args, g.to(dev))
        ref = [x.cpu().detach().requires_grad_() for x in args]
        wanted = torch.autograd.grad(wkv_ref(*ref), ref, g)
        for a, b in zip(got, wanted, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "k": a["k"][0]}, ValueError, "k must have 3 dimensions"),
        (lambda a: {**a, "v": a["v"][:, :2]}, ValueError, "v must have shape"),
        (lambda a: {**a, "w": a["w"][:2]}, ValueError, "w must have shape"),
        (lambda a: {**a, "u": a["u"].float()}, TypeError, "u must be float64"),
        (lambda a: {**a, "k": a["k"].long()}, TypeError, "k must be float32 or float64"),
        (lambda a: {**a, "w": a["w"].tolist()}, TypeError, "w must be a torch.Tensor"),
        (lambda a: {**a, "state": torch.zeros(2, 2, 3, dtype=torch.float64)}, ValueError,
         "state must have shape"),
    ],
)
def test_bad_input(change, error, match):
    w, u, k, v = inputs((2, 4, 3))
    args = change({"w": w, "u": u, "k": k, "v": v, "state": None})
    with pytest.raises(error, match=match):
        wkv(args["w"], args["u"], args["k"], args["v"], state=args["state"], backend="cpu")


def test_example_inputs_are_the_canonical_call(monkeypatch):
    ex = example_inputs((2, 5, 3), dtype=torch.float64, seed=6)
    assert isinstance(ex, Example) and ex.kwargs == {}
    w, u, k, v = ex.args
    assert w.shape == u.shape == (3,) and k.shape == v.shape == (2, 5, 3)
    assert ((w >= 0) & (w < 2)).all()
    assert ex.sizes == {"batch": 2, "seqlen": 5, "d_model": 3}
    assert (ex.rtol, ex.atol) == (1e-12, 1e-12)
    ex32 = example_inputs((2, 5, 3), seed=6)
    assert ex32.args[2].dtype == torch.float32 and (ex32.rtol, ex32.atol) == (2e-5, 2e-5)
    torch.testing.assert_close(ex32.args[2].double(), k, rtol=1e-7, atol=0)  # same values
    torch.testing.assert_close(ex.call(wkv, backend="cpu"), dense_wkv(*ex.args),
                               rtol=ex.rtol, atol=ex.atol)
    assert W.EXAMPLE_SHAPE == (1, 4096, 2048)  # the benchmark's size
    monkeypatch.setattr(W, "EXAMPLE_SHAPE", (1, 2, 3))
    assert example_inputs().sizes == {"batch": 1, "seqlen": 2, "d_model": 3}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("with_state", [False, True])
def test_out_receives_the_result(backend, with_state):
    dev = device_for(backend)
    w, u, k, v = inputs((2, 11, 6), device=dev, seed=12)
    state = wkv_ref(w, u, k, v, return_state=True)[1] if with_state else None
    state_before = None if state is None else state.clone()
    out = torch.full_like(k, torch.nan)
    y, s = wkv(w, u, k, v, state=state, return_state=True, backend=backend, out=out)
    assert y is out
    want, want_s = wkv_ref(w, u, k, v, state=state, return_state=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(s, want_s)
    if state is not None:
        assert torch.equal(state, state_before)  # the caller's state is not updated in place
    assert wkv(w, u, k, v, state=state, backend=backend, out=out.zero_()) is out
    torch.testing.assert_close(out, want)


def test_out_with_a_callable_backend():
    w, u, k, v = inputs((1, 4, 3), seed=13)
    out = torch.empty_like(k)
    assert wkv(w, u, k, v, backend=wkv_ref, out=out) is out
    torch.testing.assert_close(out, wkv_ref(w, u, k, v))


def test_out_refuses_inputs_that_require_grad_unless_no_grad():
    w, u, k, v = inputs((1, 4, 3))
    v.requires_grad_()
    out = torch.empty_like(k)
    with pytest.raises(ValueError, match="out= is for calls without autograd"):
        wkv(w, u, k, v, backend="cpu", out=out)
    with torch.no_grad():
        wkv(w, u, k, v, backend="cpu", out=out)
    torch.testing.assert_close(out, wkv_ref(w, u, k, v).detach())


@pytest.mark.parametrize(
    "out, error, message",
    [
        (torch.empty(2, 4, 2, dtype=torch.float64), ValueError, r"out must have shape \(b, l, c\) = \(2, 4, 3\)"),
        (torch.empty(2, 4, 3), TypeError, "out must be float64"),
        (torch.empty(2, 3, 4, dtype=torch.float64).transpose(1, 2), ValueError, "out must be contiguous"),
        (torch.empty(2, 4, 3, dtype=torch.float64, device="meta"), ValueError, "out must be on cpu"),
    ],
)
def test_bad_out_names_the_argument(out, error, message):
    w, u, k, v = inputs((2, 4, 3))
    with pytest.raises(error, match=message):
        wkv(w, u, k, v, backend="cpu", out=out)


@pytest.mark.parametrize("backend", KERNELS)
def test_k_gradient_of_a_token_that_dominates_every_later_output(backend):
    """Issue #13 (the fuzzer, 2026-12-06): token 1's key is so large that every later output
    equals its value; then ∂L/∂k_1 = Σ_t g_t w_t1 (v_1 - y_t) is 0. The backward summed
    v_1 Σ g·w - Σ g·w·y, two numbers of size |v|·|g| that cancel, and returned 2⁻²¹; it now sums
    g·w·(y - c) about the last output c, which is exact here."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(7)
    k = torch.tensor([[[330.0], [2574.0], [-348.0], [-601.0], [-166.0], [394.0], [734.0]]],
                     dtype=torch.float64)
    w, u = torch.zeros(1, dtype=torch.float64), torch.full((1,), 0.26, dtype=torch.float64)
    v = 4 * torch.randn(1, 7, 1, generator=g, dtype=torch.float64)
    gy = torch.randn(1, 7, 1, generator=g, dtype=torch.float64)
    a64 = [x.clone().requires_grad_() for x in (w, u, k, v)]
    want = torch.autograd.grad(wkv_ref(*a64), a64, gy)[2]
    assert want[0, 1, 0].abs() < 1e-12  # token 1 dominates: no gradient for its key
    a32 = [x.float().to(dev).requires_grad_() for x in (w, u, k, v)]
    got = torch.autograd.grad(wkv(*a32, backend=backend), a32, gy.float().to(dev))[2]
    torch.testing.assert_close(got.cpu().double(), want, rtol=0,
                               atol=16 * 2.0**-23 * want.abs().max().item())
