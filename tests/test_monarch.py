"""monarch_multiply: every backend against the materialised dense matrix (built from the blocks
and the permutations by explicit index loops, outside the kernels' reshapes), the DFT against
torch.fft, gradients against autograd of the reference (gradcheck in float64), float32 against
a float64 truth, leading axes and strides, bad input; the models: MonarchLinear against
F.linear of its dense matrix, the Monarch-FFT causal convolution against direct convolution,
M2Mixer's step against its forward, causality, and LM(mixer="m2", mlp="monarch")."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ALL, CUDA, KERNELS, device_for, run_steps
from numba import cuda

import minimodels.kernels.monarch as M
import minimodels.kernels.monarch.cuda as MC
from minimodels.backend import cuda_simulated, launch
from minimodels.kernels._common import Example, mma_tf32, tf32_split, wgmma_tf32x3
from minimodels.kernels.monarch import example_inputs, monarch_dft, monarch_multiply
from minimodels.models import LM, MIXERS, MLPS, state_numel
from minimodels.models.monarch import (
    M2Mixer,
    MonarchLinear,
    MonarchMLP,
    default_blocks,
    monarch_causal_conv,
)

pytestmark = pytest.mark.ch06

# (b, k, q, p, l, s): square, rectangular blocks, l != k, one block, one token, tails of TILE
SHAPES = [(1, 1, 1, 1, 1, 1), (5, 4, 4, 4, 4, 4), (3, 4, 3, 5, 6, 7), (33, 2, 6, 3, 4, 5),
          (2, 1, 8, 3, 2, 3), (0, 3, 2, 2, 2, 2)]


def dense_by_loops(w1, w2):
    """M = P2 · BD(w2) · P1 · BD(w1) from its definition: BD(w) placed block by block, P1 and
    P2 as permutation matrices written entry by entry (float64)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    bd1 = torch.zeros(k * q, k * p, dtype=torch.float64)
    for kk in range(k):
        bd1[kk * q:(kk + 1) * q, kk * p:(kk + 1) * p] = w1[kk].double()
    bd2 = torch.zeros(l * s, l * r, dtype=torch.float64)
    for j in range(l):
        bd2[j * s:(j + 1) * s, j * r:(j + 1) * r] = w2[j].double()
    P1 = torch.zeros(l * r, k * q, dtype=torch.float64)
    for i in range(r):
        for j in range(l):
            P1[j * r + i, i * l + j] = 1  # index i·l + j goes to j·r + i
    P2 = torch.zeros(l * s, l * s, dtype=torch.float64)
    for j in range(l):
        for t in range(s):
            P2[t * l + j, j * s + t] = 1  # index j·s + t goes to t·l + j
    return P2 @ bd2 @ P1 @ bd1


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_the_dense_matrix(backend, shape, dtype):
    ex = example_inputs(shape, dtype=dtype, device=device_for(backend), seed=1)
    x, w1, w2 = ex.args
    want = x.double().cpu() @ dense_by_loops(w1.cpu(), w2.cpu()).T
    got = monarch_multiply(x, w1, w2, backend=backend)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double().cpu(), want, rtol=ex.rtol, atol=ex.atol)


def test_monarch_matrix_is_the_dense_matrix():
    x, w1, w2 = example_inputs((4, 3, 4, 5, 2, 3), dtype=torch.float64).args
    torch.testing.assert_close(M.monarch_matrix(w1, w2), dense_by_loops(w1, w2))


@pytest.mark.parametrize("backend", KERNELS)
def test_leading_axes_and_strides(backend):
    dev = device_for(backend)
    x, w1, w2 = example_inputs((24, 4, 4, 4, 4, 4), dtype=torch.float64, device=dev).args
    x3 = x.reshape(2, 3, 4, 16).transpose(0, 1)  # non-contiguous, leading axes (3, 2, 4)
    w1t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    got = monarch_multiply(x3, w1t, w2, backend=backend)
    torch.testing.assert_close(got, monarch_multiply(x3, w1, w2, backend="ref"))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16])
def test_dft_is_a_monarch_product(m):
    w1, w2, perm = monarch_dft(m)
    assert w1.dtype == w2.dtype == torch.complex128 and perm.dtype == torch.int64
    assert sorted(perm.tolist()) == list(range(m * m))  # a permutation
    x = torch.randn(3, 2, m * m, dtype=torch.complex128, generator=torch.Generator().manual_seed(m))
    got = monarch_multiply(x[..., perm], w1, w2, backend="ref")
    torch.testing.assert_close(got, torch.fft.fft(x), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", [(3, 2, 3, 2, 3, 2), (9, 3, 2, 4, 2, 5)])
def test_gradcheck(backend, shape):
    """Gradients against finite differences in float64; the simulated CUDA kernel in gradcheck's
    fast mode (vᵀ J u for random u and v instead of every column of J: the full check took 64 s
    in the simulator; a 1% error in gx still fails it)."""
    args = [t.clone().requires_grad_() for t in
            example_inputs(shape, dtype=torch.float64, device=device_for(backend)).args]
    assert torch.autograd.gradcheck(lambda *a: monarch_multiply(*a, backend=backend), args,
                                    fast_mode=backend == CUDA and MC.cuda_simulated())


@pytest.mark.parametrize("backend", KERNELS)
def test_float32_gradients_against_float64_autograd(backend):
    dev = device_for(backend)
    ex = example_inputs((40, 4, 4, 4, 4, 4), dtype=torch.float64, device=dev, seed=3)
    g = torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaves64 = [t.clone().requires_grad_() for t in ex.args]
    want = torch.autograd.grad(monarch_multiply(*leaves64, backend="ref"), leaves64, g.to(dev))
    leaves32 = [t.float().requires_grad_() for t in ex.args]
    got = torch.autograd.grad(monarch_multiply(*leaves32, backend=backend), leaves32,
                              g.float().to(dev))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_example_inputs():
    ex = example_inputs((3, 4, 2, 5, 8, 3), dtype=torch.float64, seed=2)
    assert isinstance(ex, Example)
    x, w1, w2 = ex.args
    assert x.shape == (3, 20) and w1.shape == (4, 2, 5) and w2.shape == (8, 3, 1)
    assert ex.sizes == {"batch": 3, "n": 20, "nblocks": 4, "d_out": 24}
    same = example_inputs((3, 4, 2, 5, 8, 3), dtype=torch.float32, seed=2).args[0]
    torch.testing.assert_close(same.double(), x, rtol=1e-7, atol=1e-7)  # one seed, one draw
    with pytest.raises(ValueError, match="l must divide k·q"):
        example_inputs((1, 2, 3, 1, 4, 1))


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.ones(2, 12), torch.ones(4, 2, 4), torch.ones(2, 4, 4)), ValueError,
         r"k·p = n: 4·4 = 16 != n = 12"),
        ((torch.ones(2, 16), torch.ones(4, 2, 4), torch.ones(3, 4, 4)), ValueError,
         r"l·r = k·q .*3·4 = 12 != 4·2 = 8"),
        ((torch.ones(2, 16), torch.ones(4, 4), torch.ones(2, 4, 4)), ValueError,
         r"w1 must have 3 dimensions \(k, q, p\)"),
        ((torch.ones(2, 16), torch.ones(4, 2, 4), torch.ones(8, 4)), ValueError,
         r"w2 must have 3 dimensions \(l, s, r\)"),
        ((torch.ones(2, 16), torch.ones(4, 2, 4).double(), torch.ones(2, 4, 4)), TypeError,
         "w1 must have x's dtype float32"),
        ((torch.ones(2, 16, dtype=torch.int64), torch.ones(4, 2, 4), torch.ones(2, 4, 4)),
         TypeError, "x must be float32 or float64"),
        (([1.0] * 16, torch.ones(4, 2, 4), torch.ones(2, 4, 4)), TypeError,
         "x must be a torch.Tensor"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        monarch_multiply(*args)


def test_complex_runs_on_ref_only():
    w1, w2, perm = monarch_dft(3)
    x = torch.randn(2, 9, dtype=torch.complex128)
    with pytest.raises(TypeError, match="complex inputs run on backend='ref' only"):
        monarch_multiply(x, w1, w2, backend="cpu")


# =============================================================================================
# Models
# =============================================================================================


def test_default_blocks():
    assert [default_blocks(d) for d in (1, 16, 64, 256, 48, 4096)] == [1, 4, 8, 16, 8, 64]


@pytest.mark.parametrize("d_in, d_out, nblocks", [(16, 16, 4), (16, 64, 4), (48, 12, 3)])
def test_monarch_linear_is_a_linear_layer(d_in, d_out, nblocks):
    torch.manual_seed(0)
    layer = MonarchLinear(d_in, d_out, nblocks).double()
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    want = F.linear(x, layer.dense(), layer.bias)
    torch.testing.assert_close(layer(x), want)
    q = max(d_in, d_out) // nblocks
    assert layer.n_params == nblocks * q * (d_in // nblocks + d_out // nblocks) + d_out
    assert layer.flops(10) == 2 * 10 * (layer.n_params - d_out)
    assert layer.dense().shape == (d_out, d_in)
    with pytest.raises(ValueError, match="nblocks must divide"):
        MonarchLinear(16, 12, 5)


def test_square_monarch_linear_counts_n_to_the_1_5():
    layer = MonarchLinear(4096, 4096, 64, bias=False)
    assert layer.n_params == 2 * 4096 * 64  # 2·n·√n, vs n² = 16.8 M dense


def test_monarch_mlp_shape_and_grad():
    torch.manual_seed(0)
    mlp = MonarchMLP(16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = mlp(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())


def direct_causal_conv(u, K):
    """y[..., t] = Σ_{s<=t} K[..., t-s] u[..., s] by explicit loops (float64)."""
    l = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(l):
        for s in range(t + 1):
            y[..., t] += K[..., t - s] * u[..., s]
    return y


@pytest.mark.parametrize("l", [1, 2, 7, 18, 33])
def test_monarch_causal_conv_is_direct_convolution(l):
    g = torch.Generator().manual_seed(l)
    u = torch.randn(2, 3, l, dtype=torch.float64, generator=g)
    K = torch.randn(3, l, dtype=torch.float64, generator=g)
    torch.testing.assert_close(monarch_causal_conv(u, K), direct_causal_conv(u, K))
    with pytest.raises(ValueError, match="wrap around"):
        monarch_causal_conv(u, K, m=1) if l > 1 else monarch_causal_conv(u, K, m=0)


@pytest.mark.parametrize("fft", ["monarch", "torch"])
def test_m2_mixer_step_equals_forward(fft):
    torch.manual_seed(0)
    mixer = M2Mixer(8, max_len=32, fft=fft).double()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    y_steps, state = run_steps(mixer, x)
    torch.testing.assert_close(y_steps, mixer(x))
    assert state.shape == (2, 8, 13)  # the input history, like a KV cache


def test_m2_mixer_matches_an_independent_reference():
    torch.manual_seed(1)
    mixer = M2Mixer(4, max_len=16).double()
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    a, b, v = mixer.in_proj(x).chunk(3, -1)
    u = (a * v).transpose(1, 2)  # (b, d, l)
    y = direct_causal_conv(u, mixer.kernel(9)).transpose(1, 2)
    torch.testing.assert_close(mixer(x), mixer.out_proj(b * y))
    torch.testing.assert_close(mixer(x), M2Mixer.forward(_with_torch_fft(mixer), x))


def _with_torch_fft(mixer):
    mixer.fft = "torch"
    return mixer


def test_m2_mixer_is_causal():
    torch.manual_seed(2)
    mixer = M2Mixer(6, max_len=40).double()
    x = torch.randn(1, 20, 6, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 12:] += torch.randn(1, 8, 6, dtype=torch.float64)  # change the future only
    torch.testing.assert_close(mixer(x)[:, :12], mixer(x2)[:, :12])
    assert (mixer(x)[:, 12:] - mixer(x2)[:, 12:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="max_len"):
        mixer(torch.randn(1, 41, 6, dtype=torch.float64))


def test_lm_with_m2_and_monarch_mlp():
    assert MIXERS["m2"] is M2Mixer and MLPS["monarch"] is MonarchMLP
    torch.manual_seed(3)
    lm = LM(11, 16, 2, mixer="m2", mlp="monarch", max_len=24, nblocks=4).double()
    assert isinstance(lm.blocks[0].mlp, MonarchMLP) and lm.blocks[0].mlp.W1.nblocks == 4
    tokens = torch.randint(0, 11, (2, 10))
    logits = lm(tokens)
    state, steps = None, []
    for t in range(10):
        out, state = lm.step(tokens[:, t], state)
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), logits)
    assert state_numel(state) == 2 * 2 * 16 * 10  # per layer the (b, d, t) history
    auto = LM(11, 16, 1, mixer="m2", max_len=8)  # mlp="auto": M2's family MLP is Monarch
    assert isinstance(auto.blocks[0].mlp, MonarchMLP)


# =============================================================================================
# The CUDA kernel's tiles: every edge, other tile shapes, every output written
# =============================================================================================

# (b, k, q, p, l, s) off every simulator tile: 7 tokens, groups 3 and 5, outputs 5 and 3, C 3
ODD = (7, 3, 5, 3, 5, 3)


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("tiles", [None, (1, 2, 3, 3, 2, 2), (4, 2, 1, 1, 4, 2)],
                         ids=["default", "jb1-rm3-tx3", "jb4-tx1"])
def test_cuda_tiles_forward_and_gradients(backend, tiles, monkeypatch):
    """(JB, TY, TX, RM, RN, BK) for both launch kinds: odd tiles (3 tokens and 3 threads a row,
    no 16-byte runs), 4 groups per block with one thread column; forward and all three
    gradients against autograd of ref (float64)."""
    if tiles is not None:
        monkeypatch.setattr(MC, "_tiles", lambda itemsize, kind: (tiles, 1))
    ex = example_inputs(ODD, dtype=torch.float64, device=device_for(backend), seed=5)
    g = torch.randn(ODD[0], ODD[4] * ODD[5], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(6)).to(ex.args[0].device)
    grads = []
    for b in ("ref", backend):
        leaves = [t.clone().requires_grad_() for t in ex.args]
        y = monarch_multiply(*leaves, backend=b)
        grads.append((y.detach(), *torch.autograd.grad(y, leaves, g)))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [CUDA])
def test_cuda_float32_runs_of_four(backend, monkeypatch):
    """The register-tiled (SIMT) kernel in float32, as on GPUs older than sm_80, with tiles
    whose threads read 4 numbers (16 bytes) at a time, as on the GPU: tokens in runs of 4,
    outputs strided by TX and staged next to each other (the weight layout's permutation)."""
    tiles = {"flat": (1, 4, 4, 4, 4, 4), "grouped": (2, 2, 4, 4, 4, 4)}
    monkeypatch.setattr(MC, "_tiles", lambda itemsize, kind: (tiles[kind], 1))
    with MC.forced_engine("simt"):
        _float32_against_float64(backend, seed=7)


def _float32_against_float64(backend, seed, shape=(19, 6, 5, 7, 6, 10)):
    """By default 19 tokens, 6 groups of 7 -> 5 and 6 groups of 10 -> 6, across every
    simulator tile's edge: float32 forward and all three gradients within 1e-5 of autograd of
    ref in float64."""
    ex = example_inputs(shape, dtype=torch.float64, device=device_for(backend), seed=seed)
    b, _, _, _, l, s_ = shape
    g = torch.randn(b, l * s_, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed + 1))
    leaves = [t.clone().requires_grad_() for t in ex.args]
    y = monarch_multiply(*leaves, backend="ref")
    want = (y.detach(), *torch.autograd.grad(y, leaves, g.to(y.device)))
    leaves = [t.float().requires_grad_() for t in ex.args]
    y = monarch_multiply(*leaves, backend=backend)
    got = (y.detach(), *torch.autograd.grad(y, leaves, g.float().to(y.device)))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (9, 2, 6, 3, 4, 5), ODD, (3, 2, 0, 2, 2, 2),
                                   (5, 3, 2, 1, 2, 3)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["simt-float64", "mma-float32"])
def test_cuda_writes_every_output(backend, shape, dtype, tol):
    """y poisoned with NaN beforehand: every entry written, none past the edges of a tile; with
    q = 0 the first factor is empty and y = 0; with p = 1 the first factor's groups are
    neighbours in x (a "grouped" launch over x). Both kernels: SIMT (float64), tensor cores
    (float32)."""
    x, w1, w2 = example_inputs(shape, dtype=dtype, device=device_for(backend)).args
    y = torch.full((shape[0], shape[4] * shape[5]), float("nan"), dtype=dtype, device=x.device)
    MC._fwd_cuda(x, w1, w2, y)
    want = monarch_multiply(x.double(), w1.double(), w2.double(), backend="ref")
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


def test_cuda_tiles_that_do_not_divide_raise():
    with pytest.raises(ValueError, match=r"tiles \(JB, TY, TX, RM, RN, BK\)"):
        MC._bgemm_kernel(np.dtype(np.float64), (2, 2, 2, 2, 2, 3))


# =============================================================================================
# Tensor cores: the two inline-PTX instructions, and the float32 kernel built on them
# =============================================================================================


def _tf32_by_frexp(x: np.ndarray) -> np.ndarray:
    """x rounded to 11 significant bits, ties away from zero, by frexp (not by bit masks)."""
    m, e = np.frexp(x.astype(np.float64))
    return np.ldexp(np.sign(m) * np.floor(np.abs(m) * 2.0**11 + 0.5) / 2.0**11, e)


@pytest.mark.parametrize("backend", [CUDA])
def test_tf32_split_rounds_to_nearest_ties_away_and_keeps_nans(backend):
    """big = x rounded to 11 significant bits, exactly; small = x - big exactly, so that big +
    small, as the tensor core reads small (its low 13 bits cleared), is within 2⁻²¹ of x. An
    infinite or NaN x (a GPU's NaN is 0x7FFFFFFF, which rounding by bits + 2¹² would turn into
    -0) leaves a small that the tensor core still reads as a NaN."""
    @cuda.jit
    def kernel(x, big, small):
        i = cuda.grid(1)
        if i < x.shape[0]:
            big[i], small[i] = tf32_split(x[i])

    rng = np.random.default_rng(0)
    ties = (1 + (2 * np.arange(1, 9) + 1) * 2.0**-11).astype(np.float32)  # halfway cases
    x = np.concatenate([rng.standard_normal(200) * 10.0 ** rng.integers(-20, 20, 200), ties,
                        -ties, [0.0, -0.0, 1.0, 2.0**-126, 3.0e38]]).astype(np.float32)
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001], np.uint32).view(np.float32)
    odd = np.concatenate([nans, np.array([np.inf, -np.inf], np.float32)])
    xt = torch.from_numpy(np.concatenate([x, odd])).to(device_for(backend))
    big, small = torch.empty_like(xt), torch.empty_like(xt)
    launch(kernel, -(-len(xt) // 64), 64, xt, big, small)
    big, small = big.cpu().numpy(), small.cpu().numpy()
    read = (small.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
    n = len(x)
    np.testing.assert_array_equal(big[:n].astype(np.float64), _tf32_by_frexp(x))
    np.testing.assert_array_equal(small[:n], x - big[:n])  # exact in float32
    err = np.abs(big[:n].astype(np.float64) + read[:n] - x.astype(np.float64))
    assert np.all(err <= 2.0**-21 * np.abs(x))
    assert np.all(np.isnan(read[n:])), read[n:]


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("inputs", ["integers", "tf32", "float32"])
def test_mma_tf32_is_a_16x8x8_matrix_product(backend, inputs):
    """One warp: A (16 x 8), B (8 x 8), C (16 x 8) handed out in the PTX ISA's fragment layout,
    D = A·B + C read back from it. Small integers are exact in any order of summation; random
    TF32 numbers agree with float64 to float32's rounding; float32 numbers are read as TF32 by
    dropping their low 13 bits (what tf32_split's small piece relies on)."""
    @cuda.jit
    def kernel(A, B, C, D):
        lane = cuda.threadIdx.x
        g, t = lane // 4, lane % 4
        d = mma_tf32(A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4], B[t, g], B[t + 4, g],
                     C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1])
        D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1] = d

    rng = np.random.default_rng(1)
    if inputs == "integers":
        A, B, C = (rng.integers(-8, 9, s).astype(np.float32) for s in ((16, 8), (8, 8), (16, 8)))
    else:
        A, B, C = (rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (8, 8), (16, 8)))
        if inputs == "tf32":
            A, B = (_tf32_by_frexp(M).astype(np.float32) for M in (A, B))
    dev = device_for(backend)
    At, Bt, Ct = (torch.from_numpy(M).to(dev) for M in (A, B, C))
    D = torch.full((16, 8), float("nan"), device=dev)
    launch(kernel, 1, 32, At, Bt, Ct, D)
    read = [(M.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)
            for M in (A, B)]  # as the tensor core reads them
    want = read[0] @ read[1] + C.astype(np.float64)
    if inputs == "float32":  # and not as rounded to the nearest TF32 number
        rounded = _tf32_by_frexp(A) @ _tf32_by_frexp(B) + C.astype(np.float64)
        assert np.abs(rounded - want).max() > 1e-4
    tol = 0 if inputs == "integers" else 4e-7
    np.testing.assert_allclose(D.cpu().numpy(), want, rtol=tol, atol=tol)


def _needs_sm90(backend):
    if not cuda_simulated() and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("wgmma needs sm_90")


def wgmma_probe(MT: int, NN: int):
    """A kernel of one warpgroup: D = A·B + C, A (64·MT x 8), B (8 x 8·NN), C and D (64·MT x
    8·NN), through wgmma_tf32x3: B split and staged in its canonical layout, A and C handed
    out in the fragment layouts (also .gpu's probe of the descriptor's offsets)."""
    N, WORDS = 8 * NN, 128 * NN
    product = wgmma_tf32x3(MT, NN)

    @cuda.jit
    def kernel(A, B, C, D):
        sm = cuda.shared.array(WORDS, np.float32)  # B's TF32 parts, then its remainders
        af = cuda.local.array((MT, 8), np.float32)
        acc = cuda.local.array((MT, NN, 4), np.float32)
        tid = cuda.threadIdx.x
        w, r, k = tid // 32, tid % 32 // 4, tid % 4
        for i in range(tid, 8 * N, 128):
            kb, o = i // N, i % N
            at = (o // 8) * 64 + (kb // 4) * 32 + (o % 8) * 4 + kb % 4
            sm[at], sm[8 * N + at] = tf32_split(B[kb, o])
        cuda.syncthreads()
        for m in range(MT):
            row = 64 * m + 16 * w + r
            af[m, 0], af[m, 1] = A[row, k], A[row + 8, k]
            af[m, 2], af[m, 3] = A[row, k + 4], A[row + 8, k + 4]
            for i in range(4):
                af[m, i], af[m, i + 4] = tf32_split(af[m, i])
            for n in range(NN):
                for i in range(4):
                    acc[m, n, i] = C[row + 8 * (i // 2), 8 * n + 2 * k + i % 2]
        product(acc, af, sm, 0, 8 * N)
        for m in range(MT):
            row = 64 * m + 16 * w + r
            for n in range(NN):
                for i in range(4):
                    D[row + 8 * (i // 2), 8 * n + 2 * k + i % 2] = acc[m, n, i]

    return kernel


def run_wgmma_probe(MT, NN, A, B, C, device):
    D = torch.full((64 * MT, 8 * NN), float("nan"), device=device)
    args = [torch.from_numpy(M).to(device) for M in (A, B, C)]
    launch(wgmma_probe(MT, NN), 1, 128, *args, D)
    return D.cpu().numpy()


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("MT, NN", [(1, 8), (2, 2)])
@pytest.mark.parametrize("inputs", ["integers", "float32"])
def test_wgmma_tf32x3_is_a_float32_matrix_product(backend, MT, NN, inputs):
    """One warpgroup's 3xTF32 product on sm_90 (in the simulator its twin): small integers
    exactly, float32 numbers to float32's accuracy (the three TF32 products of each pair lose at
    most 5·2⁻²² of it), so the descriptor, the canonical layout of B and the fragment layouts
    of A and the sums are the PTX ISA's."""
    _needs_sm90(backend)
    rng = np.random.default_rng(2)
    shapes = ((64 * MT, 8), (8, 8 * NN), (64 * MT, 8 * NN))
    if inputs == "integers":
        A, B, C = (rng.integers(-8, 9, s).astype(np.float32) for s in shapes)
    else:
        A, B, C = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    D = run_wgmma_probe(MT, NN, A, B, C, device_for(backend))
    want = A.astype(np.float64) @ B.astype(np.float64) + C
    tol = 0 if inputs == "integers" else 2e-6
    np.testing.assert_allclose(D, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("tiles", [None, (1, 2, 2, 1, 8), (2, 1, 1, 2, 16), (1, 4, 1, 1, 8)],
                         ids=["default", "jb1-wm2-mt2-nn1", "jb2-ck16", "jb1-wm4"])
def test_mma_tiles_forward_and_gradients(backend, tiles, monkeypatch):
    """(JB, WM, MT, NN, CK) of the tensor-core kernel: two warps on one group (64 tokens a
    block, one output tile), chunks of 16 (two k-steps), four warps sharing 64 words of staged
    weights (fewer than threads); float32 forward and all three gradients within float32's
    accuracy of autograd of ref in float64 (3xTF32)."""
    if tiles is not None:
        monkeypatch.setattr(MC, "_mma_tiles", lambda kind: (tiles, 1))
    _float32_against_float64(backend, seed=9)


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("tiles", [None, (2, 4, 1, 1, 8), (1, 4, 2, 2, 16), (1, 8, 1, 2, 8),
                                   "flat only"],
                         ids=["default", "jb2-nn1", "mt2-ck16", "two-warpgroups", "flat-only"])
def test_wgmma_tiles_forward_and_gradients(backend, tiles, monkeypatch):
    """(JB, WM, MT, NN, CK) of the kernel on wgmma (sm_90): two groups of one warpgroup each
    and one output tile of 8, two 64-token tiles a warpgroup and chunks of two k-steps, two
    warpgroups on one group (128 tokens); and, as shipped on a GPU, wgmma tiles for the flat
    launches only, the grouped ones on mma.sync; float32 forward and all three gradients
    within float32's accuracy of autograd of ref in float64 (3xTF32), across every tile edge."""
    _needs_sm90(backend)
    if tiles == "flat only":
        default = MC._wgmma_tiles("flat")
        monkeypatch.setattr(MC, "_wgmma_tiles",
                            lambda kind: default if kind == "flat" else None)
    elif tiles is not None:
        monkeypatch.setattr(MC, "_wgmma_tiles", lambda kind: (tiles, 1))
    with MC.forced_engine("wgmma"):
        _float32_against_float64(backend, seed=11)


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), ODD, (70, 3, 8, 17, 2, 24)])
def test_wgmma_writes_every_output(backend, shape):
    """y poisoned with NaN beforehand, the forward on wgmma: every entry written, none past
    the edges (one token; odd sizes; 70 tokens, past a 64-token tile, 24 outputs)."""
    _needs_sm90(backend)
    x, w1, w2 = example_inputs(shape, dtype=torch.float32, device=device_for(backend)).args
    y = torch.full((shape[0], shape[4] * shape[5]), float("nan"), device=x.device)
    with MC.forced_engine("wgmma"):
        MC._fwd_cuda(x, w1, w2, y)
    want = monarch_multiply(x.double(), w1.double(), w2.double(), backend="ref")
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [CUDA])
def test_mma_whole_blocks_store_unguarded(backend):
    """Blocks of the tensor-core kernel without an edge (here 16 tokens, 2 groups and 16
    outputs, two output passes, in both factors) store their sums unguarded, stepping one
    address; the rest (the 17th token) guard each store: float32 forward and gradients against
    float64."""
    _float32_against_float64(backend, seed=10, shape=(17, 2, 16, 8, 2, 16))


@pytest.mark.parametrize("backend", [CUDA])
def test_weights_split_once_a_block_give_the_same_bits(backend, monkeypatch):
    """Two warps on one group (WM = 2) stage the weights already split into TF32 parts; one
    warp (WM = 1) splits them in the product: the same parts, so the same output to the bit."""
    ex = example_inputs((19, 6, 5, 7, 6, 10), device=device_for(backend), seed=13)
    outs = []
    for tiles in ((1, 2, 1, 1, 8), (1, 1, 1, 1, 8)):
        monkeypatch.setattr(MC, "_mma_tiles", lambda kind, tiles=tiles: (tiles, 1))
        with MC.forced_engine("mma"):
            outs.append(monarch_multiply(*ex.args, backend=backend))
    assert torch.equal(outs[0], outs[1])


def _clusters_or_skip():
    if not cuda.is_available() and not MC.cuda_simulated():
        pytest.skip("no CUDA device or simulator")
    if not MC.cuda_simulated() and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need sm_90")


# (b, k, q, p, l, s) with k = q = l: one token, tiles crossed at a token count that is not a
# multiple of the cluster's T, p and s other than the groups, two groups a block or more
FUSED_SHAPES = [(1, 8, 8, 8, 8, 8), (21, 8, 8, 16, 8, 16), (19, 16, 16, 8, 16, 8)]


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_fused_forward_matches_float64(backend, shape):
    """The fused forward (one launch, z in the cluster's shared memory; in the simulator a
    cluster is one block): float32 within float32's accuracy of ref in float64, on shapes it
    takes; its backward is the two-launch one (gradients checked beside)."""
    _clusters_or_skip()
    b, k, q, p, l, s = shape
    assert MC._fused_plan(k, p, q, l, s) is not None, "the fused kernel must take this shape"
    ex = example_inputs(shape, dtype=torch.float64, device=device_for(backend), seed=11)
    want = monarch_multiply(*ex.args, backend="ref")
    leaves = [t.float().requires_grad_() for t in ex.args]
    with MC.forced_engine("fused"):
        y = monarch_multiply(*leaves, backend=backend)
        grads = torch.autograd.grad(y.sum(), leaves)
    torch.testing.assert_close(y.detach().double(), want, rtol=1e-5, atol=1e-5)
    leaves64 = [t.clone().requires_grad_() for t in ex.args]
    want_grads = torch.autograd.grad(monarch_multiply(*leaves64, backend="ref").sum(), leaves64)
    for a, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [CUDA])
@pytest.mark.parametrize("k, q, p, l, s", [(8, 8, 8, 16, 4), (8, 16, 8, 8, 8), (12, 12, 8, 12, 8),
                                           (8, 8, 12, 8, 8), (8, 8, 8, 8, 72)])
def test_fused_plan_declines_shapes_it_cannot_take(backend, k, q, p, l, s):
    """q != l, k != q, groups or widths not multiples of 8, more than 64 outputs a group: the
    forward takes two launches there, even when "fused" is forced (checked against ref)."""
    assert MC._fused_plan(k, p, q, l, s) is None
    ex = example_inputs((5, k, q, p, l, s), device=device_for(backend), seed=12)
    with MC.forced_engine("fused"):
        y = monarch_multiply(*ex.args, backend=backend)
    torch.testing.assert_close(y, monarch_multiply(*ex.args, backend="ref"), rtol=1e-5,
                               atol=1e-5)


def test_fused_kernel_names_what_does_not_fit():
    with pytest.raises(ValueError, match=r"fused tiles .* need p, k, q and s multiples of 8"):
        MC._fused_kernel(12, 8, 12, 8, (2, 1, 1))
    with pytest.raises(ValueError, match="need the cluster size dividing k"):
        MC._fused_kernel(8, 8, 8, 8, (3, 1, 1))


def test_cluster_launch_is_refused_in_the_simulator():
    if not MC.cuda_simulated():
        pytest.skip("the simulator's refusal")
    kernel = MC._fused_kernel(8, 8, 8, 8, MC.SIMULATOR_FUSED_TILES)[0]
    with pytest.raises(ValueError, match="cluster must be 1 in the simulator"):
        launch(kernel, 2, 64, cluster=2)


def test_forced_engine_names_the_choices():
    with pytest.raises(ValueError, match="engine must be 'fused', 'wgmma', 'mma' or 'simt'"):
        with MC.forced_engine("tensor"):
            pass


def test_mma_tiles_that_do_not_divide_raise():
    with pytest.raises(ValueError, match=r"mma tiles \(JB, WM, MT, NN, CK\)"):
        MC._mma_kernel((2, 1, 1, 2, 12), 1, False, False)
