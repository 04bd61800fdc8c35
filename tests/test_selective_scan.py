"""selective_scan: every backend against the reference and against a reference outside the
kernel (the (b, d, l, n) expansion materialised with cumulative products), gradients of every
input against autograd of the reference in float64, parallel_scan against linear_scan, the
canonical example, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL, KERNELS, device_for

import minimodels.kernels.scan as scan
import minimodels.kernels.selective_scan as ss
import minimodels.kernels.selective_scan.cuda as ss_cuda
from minimodels.backend import cuda_simulated
from minimodels.kernels._common import Example
from minimodels.kernels.scan import combine, linear_scan, parallel_scan
from minimodels.kernels.selective_scan import example_inputs, selective_scan, selective_scan_ref

pytestmark = pytest.mark.ch05

NAMES = "u delta A B C D z delta_bias".split()


def inputs(b, d, l, n, *, var_B=True, var_C=True, dtype=torch.float64, device="cpu", seed=0):
    """[u, delta, A, B, C, D, z, delta_bias] of the canonical (Mamba-style) example, float64 by
    default; the same values for any dtype and device."""
    return list(example_inputs((b, d, l, n), dtype=dtype, device=device, seed=seed, var_B=var_B,
                               var_C=var_C).args)


def test_example_inputs_are_the_canonical_call(monkeypatch):
    ex = example_inputs((2, 3, 5, 4), dtype=torch.float64, seed=1, var_C=False)
    assert isinstance(ex, Example) and ex.kwargs == {"delta_softplus": True}
    u, delta, A, B, C, D, z, bias = ex.args
    assert u.shape == delta.shape == z.shape == (2, 3, 5) and A.shape == (3, 4)
    assert B.shape == (2, 4, 5) and C.shape == (3, 4) and D.shape == bias.shape == (3,)
    assert (A < 0).all() and delta.mean() < -1  # a decaying state; small steps after softplus
    assert ex.sizes == {"batch": 2, "d_model": 3, "seqlen": 5, "d_state": 4}
    assert (ex.rtol, ex.atol) == (1e-12, 1e-12)
    ex32 = example_inputs((2, 3, 5, 4), seed=1, var_C=False)
    assert u.dtype == torch.float64 and ex32.args[0].dtype == torch.float32
    assert (ex32.rtol, ex32.atol) == (2e-5, 2e-5)
    torch.testing.assert_close(ex32.args[2].double(), A, rtol=1e-7, atol=0)  # same values
    torch.testing.assert_close(ex.call(selective_scan, backend="cpu"),
                               expanded(*ex.args, softplus=True)[0], rtol=ex.rtol, atol=ex.atol)
    assert ss.EXAMPLE_SHAPE == (1, 1536, 4096, 16)  # the benchmark's size
    monkeypatch.setattr(ss, "EXAMPLE_SHAPE", (1, 2, 3, 4))
    assert example_inputs().sizes == {"batch": 1, "d_model": 2, "seqlen": 3, "d_state": 4}


def test_public_names_keep_their_import_paths():
    """parallel_scan and combine live in kernels/scan.py; chapter 05 also finds them here."""
    import minimodels

    assert ss.parallel_scan is scan.parallel_scan is minimodels.parallel_scan
    assert ss.combine is scan.combine
    assert minimodels.selective_scan is ss.selective_scan
    assert set(ss.IMPLS) == {"ref", "cpu", "cuda"}
    assert ss.IMPLS["cpu"] is ss.selective_scan_cpu and ss.IMPLS["cuda"] is ss.selective_scan_cuda
    assert not hasattr(scan, "selective_scan")  # no lazy re-export (and no import cycle)


def expanded(u, delta, A, B, C, D, z, delta_bias, softplus):
    """The selective scan written without a loop over time: materialise the (b, d, l, n)
    expansion, x_t = Σ_{s<=t} (Π_{s<k<=t} Ā_k) B̄_s u_s via cumulative sums of Δ A (valid since
    exp(Δ A) factorises over time)."""
    dt = delta + delta_bias[:, None]
    dt = F.softplus(dt) if softplus else dt  # (b, d, l)
    Bt = B.transpose(1, 2)[:, None] if B.dim() == 3 else B[None, :, None]  # (b|1, 1|d, l|1, n)
    Ct = C.transpose(1, 2)[:, None] if C.dim() == 3 else C[None, :, None]
    logA = torch.cumsum(dt[..., None] * A[None, :, None], dim=2)  # (b, d, l, n) Σ_{k<=t} Δ_k A
    w = logA[:, :, :, None] - logA[:, :, None, :]  # (b, d, t, s, n)
    mask = torch.ones(u.shape[-1], u.shape[-1], dtype=torch.bool).tril()[..., None]
    Bbar_u = (dt * u)[..., None] * Bt  # (b, d, l, n)
    x = (torch.exp(torch.where(mask, w, -torch.inf)) * Bbar_u[:, :, None]).sum(3)  # (b,d,l,n)
    y = (x * Ct).sum(-1) + D[:, None] * u
    return y * F.silu(z), x[:, :, -1]


LAYOUTS = [(True, True), (False, True), (True, False), (False, False)]
SHAPES = [(1, 1, 1, 1), (2, 3, 1, 4), (2, 3, 37, 4), (1, 5, 40, 3)]  # l = 1, odd, > 2 chunks


@pytest.mark.parametrize("var_B, var_C", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_equals_materialised_expansion(shape, var_B, var_C):
    args = inputs(*shape, var_B=var_B, var_C=var_C)
    y, last = selective_scan_ref(*args, delta_softplus=True, return_last_state=True)
    want_y, want_last = expanded(*args, softplus=True)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(last, want_last)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("var_B, var_C", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_equal_expansion(backend, shape, var_B, var_C, dtype):
    dev = device_for(backend)
    args = inputs(*shape, var_B=var_B, var_C=var_C, dtype=dtype, device=dev, seed=sum(shape))
    want_y, want_last = expanded(*inputs(*shape, var_B=var_B, var_C=var_C, seed=sum(shape)),
                                 softplus=True)
    y, last = selective_scan(*args, delta_softplus=True, return_last_state=True, backend=backend)
    assert y.dtype == dtype and y.shape == shape[:3] and last.shape == shape[:2] + shape[3:]
    assert y.device.type == dev.type
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(y.cpu().double(), want_y, rtol=tol, atol=tol)
    torch.testing.assert_close(last.cpu().double(), want_last, rtol=tol, atol=tol)


OPTIONS = [  # (D, z, delta_bias, softplus) switched on or off
    dict(D=False, z=False, delta_bias=False, softplus=False),
    dict(D=True, z=False, delta_bias=False, softplus=True),
    dict(D=False, z=True, delta_bias=True, softplus=False),
    dict(D=True, z=True, delta_bias=True, softplus=True),
]


def call(fn, args, opts, **kw):
    u, delta, A, B, C, D, z, bias = args
    return fn(u, delta, A, B, C, D if opts["D"] else None, z if opts["z"] else None,
              bias if opts["delta_bias"] else None, opts["softplus"], **kw)


def positive_delta(args, opts):
    """Without softplus, delta is Δ itself: pass the example's Δ = softplus(delta) (positive)."""
    if not opts["softplus"]:
        args[1] = F.softplus(args[1])
    return args


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("opts", OPTIONS)
def test_optional_arguments(backend, opts):
    args = positive_delta(inputs(2, 3, 21, 4, var_C=False, device=device_for(backend), seed=3),
                          opts)
    got = call(selective_scan, args, opts, return_last_state=True, backend=backend)
    want = call(selective_scan_ref, args, opts, return_last_state=True)
    for x, w in zip(got, want, strict=True):
        torch.testing.assert_close(x, w)
    y = call(selective_scan, args, opts, backend=backend)  # return_last_state=False: y only
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, want[0])


@pytest.mark.parametrize("backend", KERNELS)
def test_growing_states_with_positive_A(backend):
    """Some A > 0 (a state that grows): the CPU kernel leaves its vectorised exp for e^x ≤ 1
    and must still match the reference, forward and backward."""
    args = inputs(2, 3, 23, 5, device=device_for(backend), seed=5)
    args[2] = args[2].abs() * 0.2 * torch.where(torch.arange(5, device=args[2].device) % 2 == 0,
                                                 1.0, -1.0)  # A: alternating signs
    want = grads(selective_scan_ref, args, OPTIONS[-1])
    got = grads(lambda *a, **k: selective_scan(*a, **k, backend=backend), args, OPTIONS[-1])
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"∂{n}: {m}")
    y, last = call(selective_scan, args, OPTIONS[-1], return_last_state=True, backend=backend)
    want_y, want_last = call(selective_scan_ref, args, OPTIONS[-1], return_last_state=True)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(last, want_last)
    assert (args[2] > 0).any()


@pytest.mark.parametrize("backend", KERNELS)
def test_large_delta_passes_through_softplus_like_torch(backend):
    u, delta, A, B, C, D, z, bias = inputs(1, 2, 9, 3, device=device_for(backend))
    delta = (delta + 2.0) * 30  # some entries above softplus's threshold of 20, some far below
    assert (delta > 20).any() and (delta < 0).any()
    got = selective_scan(u, delta, A, B, C, delta_softplus=True, backend=backend)
    torch.testing.assert_close(got, selective_scan_ref(u, delta, A, B, C, delta_softplus=True))


def overflow_inputs(l, dtype, device, delta):
    """u, delta, A, B, C (b = 1, d = 2, n = 2) with u, B, C in [0.5, 1.5) and A = -100 in
    float32 (-1000 in float64): a step with Δ = -1 has Δ A = 100 (1000), e^{Δ A} = inf."""
    g = torch.Generator().manual_seed(l)
    u, B, C = (torch.rand(1, 2, l, generator=g, dtype=torch.float64) + 0.5 for _ in range(3))
    A = torch.full((2, 2), -100.0 if dtype == torch.float32 else -1000.0, dtype=torch.float64)
    return [x.to(dtype=dtype, device=device) for x in (u, delta, A, B, C)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overflow_of_a_growing_state_is_inf_on_every_backend(backend, dtype):
    """Issue #13: without softplus Δ < 0 is allowed, so Δ A > 0 although A ≤ 0. The exact
    state overflows (e^100 x in float32, e^1000 x in float64): every backend returns -inf
    there (the CPU's exp_neg gave finite garbage), and the exact, finite first step (x_{-1} = 0
    is not decayed: ref and cuda gave NaN from inf · 0)."""
    if backend == "cuda" and dtype == torch.float64 and cuda_simulated():
        pytest.skip("the simulator's math.exp raises OverflowError in float64")
    dev = device_for(backend)
    u, delta, A, B, C = overflow_inputs(6, dtype, dev, -torch.ones(1, 2, 6))
    y, last = selective_scan(u, delta, A, B, C, return_last_state=True, backend=backend)
    y0 = -(B[:, None, :, 0] * C[:, None, :, 0]).sum(-1) * u[..., 0]  # Δ = -1: x_0 = -B u
    torch.testing.assert_close(y[..., 0], y0)
    assert torch.isneginf(y[..., 1:]).all() and torch.isneginf(last).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overflowing_decay_at_the_first_step_only_stays_finite(backend, dtype):
    """Δ_0 = -2 (e^{Δ_0 A} = inf) multiplies x_{-1} = 0, then small Δ: the exact result is
    finite, forward and backward, on every backend (l = 40 crosses chunks and, in the
    simulator, the cuda forward's segments, whose composition skips segment 0's decay)."""
    dev = device_for(backend)
    delta = torch.full((1, 2, 40), 0.05, dtype=torch.float64)
    delta[..., 0] = -2.0
    args = overflow_inputs(40, dtype, dev, delta)
    zero, gate = torch.zeros(2, dtype=torch.float64), torch.ones(1, 2, 40, dtype=torch.float64)
    want_y, want_last = expanded(*(x.cpu().double() for x in args), zero, gate, zero,
                                 softplus=False)
    want_y = want_y / F.silu(gate)  # expanded always gates; undo it
    y, last = selective_scan(*args, return_last_state=True, backend=backend)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y.cpu().double(), want_y, rtol=tol, atol=tol)
    torch.testing.assert_close(last.cpu().double(), want_last, rtol=tol, atol=tol)
    if dtype == torch.float64:  # gradients: finite, and equal to autograd of the reference
        opts = dict(D=False, z=False, delta_bias=False, softplus=False)
        off = torch.zeros(2, dtype=dtype, device=dev)
        full = [*args, off, args[0], off]  # D, z, delta_bias: placeholders that opts leave out
        got = grads(lambda *a, **k: selective_scan(*a, **k, backend=backend), full, opts)
        ref = grads(selective_scan_ref, full, opts)
        for name in ref:
            assert torch.isfinite(ref[name]).all(), name
            torch.testing.assert_close(got[name], ref[name], msg=lambda m, n=name: f"∂{n}: {m}")


def grads(fn, args, opts, seed=1):
    args = [a.detach().clone().requires_grad_() for a in args]
    y, last = call(fn, args, opts, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)
    gl = torch.randn(last.shape, generator=g, dtype=y.dtype).to(y.device)
    used = [a for a, name in zip(args, NAMES, strict=True)
            if opts.get(name, True)]
    return dict(zip([n for n in NAMES if opts.get(n, True)],
                    torch.autograd.grad((y * gy).sum() + (last * gl).sum(), used), strict=True))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("var_B, var_C", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 37, 4)])
def test_backward_kernel_equals_autograd_of_reference(backend, shape, var_B, var_C):
    args = inputs(*shape, var_B=var_B, var_C=var_C, device=device_for(backend), seed=7)
    opts = OPTIONS[-1]
    got = grads(lambda *a, **k: selective_scan(*a, **k, backend=backend), args, opts)
    want = grads(selective_scan_ref, args, opts)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"∂{n}: {m}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("opts", OPTIONS[:3])
def test_backward_without_optional_arguments(backend, opts):
    args = positive_delta(inputs(2, 2, 19, 3, var_B=False, device=device_for(backend), seed=11),
                          opts)
    got = grads(lambda *a, **k: selective_scan(*a, **k, backend=backend), args, opts)
    want = grads(selective_scan_ref, args, opts)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"∂{n}: {m}")


@pytest.mark.parametrize("backend", KERNELS)
def test_gradcheck_float64(backend):
    """Finite differences on every input; fast mode (random projections) in the simulator."""
    args = [a.requires_grad_() for a in inputs(1, 2, 5, 2, var_C=False,
                                                device=device_for(backend))]
    fn = lambda *a: selective_scan(*a, delta_softplus=True, return_last_state=True,
                                   backend=backend)
    assert torch.autograd.gradcheck(fn, args, fast_mode=backend == "cuda")


@pytest.mark.parametrize("backend", KERNELS)
def test_only_last_state_used_in_loss(backend):
    args = [a.requires_grad_() for a in inputs(1, 2, 6, 2, device=device_for(backend))]
    _, last = selective_scan(*args[:5], return_last_state=True, backend=backend)
    _, last_ref = selective_scan_ref(*args[:5], return_last_state=True)
    got = torch.autograd.grad(last.sum(), args[:4])  # C does not reach x_L
    want = torch.autograd.grad(last_ref.sum(), args[:4])
    for x, w in zip(got, want, strict=True):
        torch.testing.assert_close(x, w)


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_inputs(backend):
    u, delta, A, B, C, D, z, bias = inputs(2, 4, 11, 3, device=device_for(backend))
    u_t = u.transpose(1, 2).contiguous().transpose(1, 2)  # (b, d, l) view of (b, l, d) storage
    B_t = B.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (u_t.is_contiguous() or B_t.is_contiguous())
    torch.testing.assert_close(selective_scan(u_t, delta, A, B_t, C, D, z, bias, True,
                                              backend=backend),
                               selective_scan_ref(u, delta, A, B, C, D, z, bias, True))


def test_float32_long_sequence_stays_accurate():
    ex = example_inputs((1, 3, 2000, 4))
    want = example_inputs((1, 3, 2000, 4), dtype=torch.float64).call(selective_scan_ref)
    err = (ex.call(selective_scan, backend="cpu").double() - want).abs().max()
    assert err < 1e-4 * want.abs().max()


def test_empty_sequence():
    u, delta, A, B, C, *_ = inputs(2, 3, 0, 4)
    y, last = selective_scan(u, delta, A, B, C, return_last_state=True, backend="cpu")
    assert y.shape == (2, 3, 0) and last.shape == (2, 3, 4) and not last.any()


@pytest.mark.parametrize("l", [1, 2, 5, 8, 13, 64])
def test_parallel_scan_equals_linear_scan(l):
    a, b, _ = scan.example_inputs((2, 3, l), dtype=torch.float64, seed=l).args
    a = a * 2 - 1  # decays in [0, 1)
    torch.testing.assert_close(parallel_scan(a, b), linear_scan(a, b, backend="ref"))


def test_parallel_scan_is_differentiable():
    a = torch.rand(1, 2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(parallel_scan, (a, b))


def test_combine_is_associative_with_identity():
    g = torch.Generator().manual_seed(0)
    p, q, r = [(torch.rand(4, generator=g), torch.randn(4, generator=g)) for _ in range(3)]
    left, right = combine(combine(p, q), r), combine(p, combine(q, r))
    for x, y in zip(left, right, strict=True):
        torch.testing.assert_close(x, y)
    one = (torch.ones(4), torch.zeros(4))
    for x, y in zip(combine(one, p), p, strict=True):
        torch.testing.assert_close(x, y)


def test_the_selective_scan_contains_the_linear_scan():
    """n = 1, A = log a / Δ, B = C = 1: x_t = a_t x_{t-1} + Δ_t u_t is linear_scan(a, Δ u)."""
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 3, 17, generator=g, dtype=torch.float64)
    delta = torch.full_like(u, 0.5)
    A = -torch.rand(3, 1, generator=g, dtype=torch.float64)
    ones = torch.ones(3, 1, dtype=torch.float64)
    a = torch.exp(0.5 * A[:, 0])[None, :, None].expand_as(u)
    want = linear_scan(a, 0.5 * u, backend="ref")
    torch.testing.assert_close(selective_scan(u, delta, A, ones, ones, backend="cpu"), want)


GOOD = inputs(1, 2, 3, 4)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(u=torch.ones(2, 3)), ValueError, r"u must have 3 dimensions \(b, d, l\)"),
        (dict(u=[[1.0]]), TypeError, "u must be a torch.Tensor"),
        (dict(delta=GOOD[1].float()), TypeError, "delta must be float64"),
        (dict(delta=torch.ones(1, 2, 4, dtype=torch.float64)), ValueError, "delta must have shape"),
        (dict(A=torch.ones(3, 4, dtype=torch.float64)), ValueError, r"A must have shape \(d, n\)"),
        (dict(B=torch.ones(1, 5, 3, dtype=torch.float64)), ValueError, r"B must have shape \(b, n, l\)"),
        (dict(C=torch.ones(2, 5, dtype=torch.float64)), ValueError, r"C must have shape \(d, n\)"),
        (dict(C=torch.ones(4, dtype=torch.float64)), ValueError, "C must have 3 dimensions"),
        (dict(D=torch.ones(3, dtype=torch.float64)), ValueError, r"D must have shape \(d\)"),
        (dict(z=torch.ones(1, 2, 3)), TypeError, "z must be float64"),
        (dict(delta_bias=torch.ones(2, 1, dtype=torch.float64)), ValueError, "delta_bias must have 1"),
    ],
)
def test_bad_input_names_the_argument(change, error, message):
    kw = dict(zip(NAMES, GOOD, strict=True)) | change
    with pytest.raises(error, match=message):
        selective_scan(**kw, backend="cpu")


def test_cuda_refuses_a_too_large_state():
    from minimodels.backend import cuda_available
    from minimodels.kernels.selective_scan.cuda import N_MAX, _fwd_cuda

    if not cuda_available():
        pytest.skip("no cuda backend")
    args = inputs(1, 1, 2, N_MAX + 1)
    with pytest.raises(ValueError, match="d_state"):
        _fwd_cuda(*args[:3], args[3], args[3][0], args[4], args[4][0], *args[5:],
                  (True, True, True, False))


@pytest.mark.cuda
@pytest.mark.parametrize("var_B, var_C", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 29, 6), (1, 5, 1, 2), (1, 2, 70, 9)])
def test_cuda_forward_tiles_and_lanes(shape, var_B, var_C):
    """The CUDA forward's block holds CHANNELS channels x LANES lanes and walks TILE steps at a
    time: a spare channel in the last block, idle lanes (n < LANES), several states per lane,
    and tails of tiles and checkpoint chunks all give y, x_L and (through the checkpoints the
    backward starts from) the gradients of the reference."""
    from minimodels.backend import cuda_available

    if not cuda_available():
        pytest.skip("no cuda backend")
    args = inputs(*shape, var_B=var_B, var_C=var_C, device=device_for("cuda"), seed=3)
    y, last = selective_scan(*args, True, return_last_state=True, backend="cuda")
    want_y, want_last = selective_scan_ref(*args, True, return_last_state=True)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(last, want_last)
    grads = torch.autograd.grad(
        selective_scan(*[a.requires_grad_() for a in args], True, backend="cuda").sum(), args)
    want = torch.autograd.grad(selective_scan_ref(*args, True).sum(), args)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("l", [16, 37, 70])
def test_cuda_forward_segments_equal_one_pass(l, monkeypatch):
    """The CUDA forward splits the sequence into segments when b·d gives too few blocks (pass 1
    runs each segment from zero; pass 2 restarts each from the composed earlier segments).
    One segment and as many as there are chunks give the same y, x_L and gradients."""
    from minimodels.backend import cuda_available

    if not cuda_available():
        pytest.skip("no cuda backend")
    args = inputs(1, 3, l, 5, var_B=True, var_C=False, device=device_for("cuda"), seed=4)
    kernel, first_passes = ss_cuda._forward_kernel, []

    def spy(*a):
        first_passes.append(len(a) == 7 and a[6] is True)  # first_pass=True: segments > 1
        return kernel(*a)

    monkeypatch.setattr(ss_cuda, "_forward_kernel", spy)
    results, split = [], []
    for target in (1, 10**6):  # one segment; one segment per chunk
        monkeypatch.setattr(ss_cuda, "TARGET_BLOCKS", target)
        first_passes.clear()
        params = [a.detach().clone().requires_grad_() for a in args]
        y, last = selective_scan(*params, True, return_last_state=True, backend="cuda")
        grads = torch.autograd.grad((y.sum() + last.sum()), params)
        results.append((y, last, *grads))
        split.append(any(first_passes))
    assert split == [False, l > ss_cuda.CHUNK]  # the patch reached the launcher
    want_y, want_last = selective_scan_ref(*args, True, return_last_state=True)
    torch.testing.assert_close(results[1][0], want_y)
    torch.testing.assert_close(results[1][1], want_last)
    for one, many in zip(*results, strict=True):
        torch.testing.assert_close(many, one)


@pytest.mark.cuda
@pytest.mark.parametrize("var_B, var_C", [(True, True), (False, False)])
def test_cuda_backward_with_fewer_channels_per_block(var_B, var_C, monkeypatch):
    """The backward's plan halves a block's channels while its shared arrays do not fit (on the
    GPU: float64 at n = 64): blocks of fewer channels than the forward's (so a grid of its own
    for each pass) and ∂B_t, ∂C_t summed over more blocks still give the gradients of the
    reference. (A spare channel in the last block: test_cuda_forward_tiles_and_lanes.)"""
    import numpy as np

    from minimodels.backend import cuda_available

    if not cuda_available():
        pytest.skip("no cuda backend")
    caches = (ss_cuda._bwd_plan, ss_cuda._backward_kernel, ss_cuda._forward_kernel)
    for cache in caches:
        cache.cache_clear()
    words = ss_cuda._bwd_words(5, ss_cuda.CHANNELS, 8, var_B, var_C, True, True)
    monkeypatch.setattr(ss_cuda, "SMEM_BYTES", (words - 1) * 8)  # no tile of CHANNELS fits
    try:
        BT, CH = ss_cuda._bwd_plan(np.dtype(np.float64), 5, var_B, var_C, True, True)
        assert CH < ss_cuda.CHANNELS and BT <= ss_cuda.TILE
        args = inputs(1, 3, 21, 5, var_B=var_B, var_C=var_C, device=device_for("cuda"), seed=5)
        opts = OPTIONS[-1]
        got = grads(lambda *a, **k: selective_scan(*a, **k, backend="cuda"), args, opts)
        want = grads(selective_scan_ref, args, opts)
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"∂{n}: {m}")
    finally:
        for cache in caches:
            cache.cache_clear()
