"""Every CUDA kernel against its reference on a real GPU, at real sizes (what the old
``kernels/*_gpu_check.py`` scripts checked). ``pytest -m cuda tests/test_gpu.py`` on the lent
GPU; skipped without one (CI runs the same kernels at tiny sizes in Numba's simulator, in each
kernel's own tests). Timings of the same kernels: ``python -m minimodels.bench all --device
cuda``."""

import importlib

import pytest
import torch

from minimodels import arena, tasks
from minimodels.backend import cuda_available, cuda_simulated
from minimodels.bench import convert
from minimodels.train import seed_everything

REAL_GPU = cuda_available() and not cuda_simulated()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not REAL_GPU, reason="needs a real CUDA GPU (not the simulator)")]

DEV = "cuda"
OPS = {"scan": "linear_scan", "attention": "attention", "wkv": "wkv",
       "ssm_kernel": "s4d_kernel", "selective_scan": "selective_scan",
       "monarch": "monarch_multiply", "long_conv": "causal_conv",
       "natten": "neighborhood_attention_2d"}


def to64(t: torch.Tensor) -> torch.Tensor:
    """float64 (complex128 for complex tensors): the dtype of the truth."""
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def max_rel(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / (want.abs().max() + 1e-30)).item()


def _depthwise_conv1d(u, k, D=None):
    """causal_conv by torch's depthwise conv1d (a correlation: the filter flipped, l − 1 zeros
    in front): the float64 truth at sizes where the project's reference, a materialised
    (h, l, l) Toeplitz matrix, would need 96 GB."""
    h, lk = k.shape
    y = torch.nn.functional.conv1d(torch.nn.functional.pad(u, (lk - 1, 0)),
                                   k.flip(-1)[:, None], groups=h)
    return y if D is None else y + D[:, None] * u


OUTSIDE = {"long_conv": _depthwise_conv1d}  # references from outside the project, where the
# project's own does not fit the GPU at the benchmark size


@pytest.mark.parametrize("module_name", sorted(OPS))
def test_canonical_size_matches_float64_reference(module_name):
    """Each op's benchmark-size example (``example_inputs(device="cuda")``): the cuda kernel in
    the example's dtype against the reference in float64 on the same GPU, within the example's
    own tolerances."""
    module = importlib.import_module(f"minimodels.kernels.{module_name}")
    op = getattr(module, OPS[module_name])
    ex = module.example_inputs(device=DEV)
    with torch.no_grad():
        got = ex.call(op, backend="cuda")
        ex64 = convert(ex, to64)
        want = (OUTSIDE[module_name](*ex64.args, **ex64.kwargs) if module_name in OUTSIDE
                else ex64.call(op, backend="ref"))
    assert got.is_cuda and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.double(), rtol=ex.rtol, atol=ex.atol)


SIZE_ONE_SHAPES = {"scan": (1, 1, 5), "attention": (1, 1, 3, 8), "wkv": (1, 3, 1),
                   "ssm_kernel": (1, 1, 7), "selective_scan": (1, 1, 6, 1),
                   "monarch": (1, 1, 1, 3, 1, 2), "long_conv": (1, 1, 5, 2),
                   "natten": (1, 1, 3, 3, 1, 3)}
NORMAL_SHAPES = {"scan": (2, 3, 70), "attention": (2, 2, 70, 16), "wkv": (2, 70, 3),
                 "ssm_kernel": (3, 4, 70), "selective_scan": (2, 3, 70, 4),
                 "monarch": (70, 4, 3, 5, 6, 7), "long_conv": (2, 3, 70, 9),
                 "natten": (2, 3, 11, 13, 16, 5)}


@pytest.mark.parametrize("module_name", sorted(OPS))
def test_fast_launch_path_survives_size_one_axes(module_name):
    """A kernel's first call with size-1 axes, then a normal shape of the same kinds: both take
    ``backend.launch``'s fast path (Numba packs the strides of size-1 axes by its own rule; the
    first-call comparison must not switch the path off for the whole shape class), forward and
    backward."""
    from minimodels import backend

    module = importlib.import_module(f"minimodels.kernels.{module_name}")
    op = getattr(module, OPS[module_name])
    backend._LAUNCHERS.clear()
    for shape in (SIZE_ONE_SHAPES[module_name], NORMAL_SHAPES[module_name]):
        ex = module.example_inputs(shape, device=DEV)
        args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in ex.args]
        out = op(*args, **ex.kwargs, backend="cuda")
        out = out[0] if isinstance(out, tuple) else out
        if out.requires_grad:
            out.float().sum().backward()
        torch.cuda.synchronize()
        assert backend._LAUNCHERS, "no kernel went through backend.launch"
        off = [k[0] for k, v in backend._LAUNCHERS.items() if v is None]
        assert not off, f"fast path switched off for {off} at shape {shape}"


# --- attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("b, h, lq, lk, e, causal, std", [
    (2, 3, 1, 1, 64, True, 1), (2, 3, 100, 100, 64, True, 1), (1, 4, 37, 300, 128, True, 1),
    (1, 4, 300, 37, 128, False, 1), (2, 2, 129, 257, 80, False, 1), (1, 2, 65, 65, 7, True, 1),
    (1, 2, 200, 200, 64, True, 30)])
def test_attention_cuda_odd_shapes(b, h, lq, lk, e, causal, std, dtype, tol):
    """Output and log-sum-exp against the float64 reference: lq != lk, lengths off the tile
    size, head dims off the register tile, large logits (std 30)."""
    from minimodels.kernels.attention import attention

    g = torch.Generator(device=DEV).manual_seed(b * lq + lk + e)
    q = torch.randn(b, h, lq, e, device=DEV, dtype=torch.float64, generator=g) * std
    k = torch.randn(b, h, lk, e, device=DEV, dtype=torch.float64, generator=g) * std
    v = torch.randn(b, h, lk, e, device=DEV, dtype=torch.float64, generator=g)
    want, want_lse = attention(q, k, v, causal=causal, return_lse=True, backend="ref")
    out, lse = attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, return_lse=True,
                         backend="cuda")
    err = max((out.double() - want).abs().max().item(),
              (lse.double() - want_lse).abs().max().item() / max(1, std**2))
    assert err < tol * std  # float32 rounding of q and k: logit errors grow with their size


def test_attention_cuda_full_size_vs_sdpa_float64():
    from minimodels.kernels.attention import attention

    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, 16, 16384, 128, device=DEV, generator=g) for _ in range(3))
    out = attention(q, k, v, backend="cuda")
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max().item() < 1e-4


# --- s4d_kernel --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.complex64, 1e-4), (torch.complex128, 1e-10)])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 37), (7, 70, 1000), (16, 32, 4096),
                                   (4, 64, 16384)])
def test_s4d_kernel_cuda_sizes(shape, dtype, tol):
    """Relative error max |K − K64| / max |K64| against the complex128 reference, including
    L = 1 and lengths past the re-anchoring interval."""
    from minimodels.kernels import ssm_kernel as sk

    ex = sk.example_inputs(shape, dtype=dtype, device=DEV)
    K = ex.call(sk.s4d_kernel, backend="cuda")
    h, _, L = shape
    assert K.is_cuda and K.shape == (h, L) and K.dtype == ex.args[2].dtype
    want = convert(ex, to64).call(sk.s4d_kernel, backend="ref")
    assert max_rel(K, want) < tol


# --- selective_scan ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 37, 4), (2, 5, 5000, 16),
                                   (1, 4, 2000, 64)])
@pytest.mark.parametrize("var_B, var_C", [(True, True), (False, True), (True, False),
                                          (False, False)])
@pytest.mark.parametrize("optional, softplus", [(True, True), (False, False)])
def test_selective_scan_cuda_against_autograd_of_reference(shape, var_B, var_C, optional,
                                                            softplus, dtype, tol):
    """y, the last state and the gradients of every input, against autograd of the reference
    on the GPU: both B/C layouts, with and without D, z, delta_bias, with and without softplus,
    lengths over several chunks of the kernel."""
    from minimodels.kernels import selective_scan as ss

    ex = ss.example_inputs(shape, dtype=dtype, device=DEV, seed=sum(shape), var_B=var_B,
                           var_C=var_C)
    xs = list(ex.args)
    if not softplus:  # Δ given directly: positive, as softplus would have made it
        xs[1] = torch.nn.functional.softplus(xs[1])
    if not optional:
        xs[5:8] = [None, None, None]  # D, z, delta_bias
    results = []
    for backend in ("ref", "cuda"):
        args = [x.detach().clone().requires_grad_() if x is not None else None for x in xs]
        live = [a for a in args if a is not None]
        y, last = ss.selective_scan(*args, delta_softplus=softplus, return_last_state=True,
                                    backend=backend)
        g = torch.Generator(device=DEV).manual_seed(1)
        gy = torch.randn(y.shape, device=DEV, dtype=dtype, generator=g)
        gl = torch.randn(last.shape, device=DEV, dtype=dtype, generator=g)
        grads = torch.autograd.grad((y * gy).sum() + (last * gl).sum(), live)
        results.append([y, last, *grads])
    worst = max(max_rel(got, want) for got, want in zip(*reversed(results), strict=True))
    assert worst < tol


# --- wkv ---------------------------------------------------------------------------------------

def _wkv_inputs(b, l, c, k_max, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(c, generator=g, dtype=torch.float64) * 3
    u = torch.randn(c, generator=g, dtype=torch.float64)
    k = (torch.rand(b, l, c, generator=g, dtype=torch.float64) * 2 - 1) * k_max
    v = torch.randn(b, l, c, generator=g, dtype=torch.float64)
    return w, u, k, v


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("b, l, c, k_max", [(1, 1, 1, 1), (2, 37, 19, 5), (3, 200, 130, 40),
                                            (2, 1001, 64, 40)])
def test_wkv_cuda_forward_and_resumption(b, l, c, k_max, dtype, tol):
    """The forward against the float64 reference with |k| up to 40 (exps that overflow
    float32 without the running maximum), lengths off the ITEMS chunk; two calls resumed from
    the state equal one call exactly."""
    from minimodels.kernels.wkv import wkv

    w, u, k, v = _wkv_inputs(b, l, c, k_max)
    want = wkv(w, u, k, v, backend="ref")
    a = [x.to(DEV, dtype) for x in (w, u, k, v)]
    got = wkv(*a, backend="cuda").cpu().double()
    assert torch.isfinite(got).all() and (got - want).abs().max().item() < tol
    cut = max(1, 2 * l // 5)
    y1, s = wkv(a[0], a[1], a[2][:, :cut], a[3][:, :cut], return_state=True, backend="cuda")
    y2 = wkv(a[0], a[1], a[2][:, cut:], a[3][:, cut:], state=s, backend="cuda")
    assert torch.equal(torch.cat([y1, y2], 1), wkv(*a, backend="cuda"))


def test_wkv_cuda_backward_matches_autograd_of_reference():
    from minimodels.kernels.wkv import wkv

    w, u, k, v = _wkv_inputs(2, 300, 48, 10.0)
    gy = torch.randn(k.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a_ref = [x.clone().requires_grad_() for x in (w, u, k, v)]
    want = torch.autograd.grad(wkv(*a_ref, backend="ref"), a_ref, gy)
    a_gpu = [x.to(DEV).requires_grad_() for x in (w, u, k, v)]
    got = torch.autograd.grad(wkv(*a_gpu, backend="cuda"), a_gpu, gy.to(DEV))
    for gw, gg in zip(want, got, strict=True):
        assert (gg.cpu() - gw).abs().max().item() < 1e-9


# --- the benchmarks' GPU paths ----------------------------------------------------------------

@pytest.mark.parametrize("kernel, shape", [("scan", "2,64,1000"), ("attention", "1,2,256,64"),
                                           ("wkv", "1,1000,64"), ("s4d", "16,8,1000"),
                                           ("selective_scan", "1,8,1000,4")])
def test_benchmark_runs_on_the_gpu(kernel, shape, capsys):
    """``python -m minimodels.bench KERNEL --device cuda`` at a small size: every row runs and
    has its GPU time."""
    from minimodels import bench

    assert bench.main([kernel, "--device", "cuda", "--shape", shape]) == 0
    out = capsys.readouterr().out
    assert "minimodels cuda kernel" in out and "GPU ms" in out


# --- the arena's contenders train on the GPU --------------------------------------------------

@pytest.mark.parametrize("name", list(arena.CONTENDERS))
def test_arena_contender_on_cuda_matches_cpu_in_float64(name):
    """The same float64 model on the CPU and the GPU: logits, loss and every gradient agree
    (each goes through its mixers' kernels on both), so the arena's GPU scale trains the same
    models as its CPU scale."""
    seed_everything(0)
    d = arena.width_for(name, 20_000, max_len=64)
    cpu = arena.make(name, d, max_len=64).double()
    gpu = arena.make(name, d, max_len=64).double().to(DEV)
    gpu.load_state_dict(cpu.state_dict())
    x, y, mask = tasks.mqar(3, 40, n_pairs=4, seed=1)
    losses = []
    for model, dev in ((cpu, "cpu"), (gpu, DEV)):
        logits = model(x.to(dev))
        loss = torch.nn.functional.cross_entropy(logits[mask.to(dev)], y.to(dev)[mask.to(dev)])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1].cpu(), losses[0], rtol=1e-9, atol=1e-12)
    for (k, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-7, atol=1e-10, msg=k)
