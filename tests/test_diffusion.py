"""Diffusion and HDiT: the EDM preconditioning and loss against their formulas (and the loss
equal to λ(σ)‖D − x_0‖²), the σ schedule, Euler and Heun on a denoiser whose ODE has a closed
form (Gaussian data), the images drawn in code, the autoencoder's shapes, DiT and HDiT shapes
and gradients, token merge/split against torch's pixel_unshuffle, axial RoPE's relative
property, and HDiT's FLOPs count linear in the pixels when a level is added per doubling."""

import math

import pytest
import torch
import torch.nn.functional as F

from minimodels.models.diffusion import (
    ConvAutoencoder,
    Denoiser,
    DiT,
    add_noise,
    denoiser_loss,
    edm_scalings,
    karras_sigmas,
    make_shapes,
    sample,
)
from minimodels.models.hdit import AxialRoPE, HDiT, level_kernel, merge_tokens, split_tokens

pytestmark = pytest.mark.ch08


def test_scalings_and_noise():
    sigma = torch.tensor([0.1, 0.5, 3.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, 0.5)
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in**2 * (sigma**2 + 0.25), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    x0, n = torch.ones(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    torch.testing.assert_close(add_noise(x0, sigma.float(), n)[:, 0, 0, 0], 1 + sigma.float())


def test_loss_is_weighted_denoising_error():
    torch.manual_seed(0)
    inner = DiT(image_size=4, patch=2, d=32, depth=1).double()
    torch.nn.init.normal_(inner.unembed.weight)  # not the zero init: a real F
    D = Denoiser(inner)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    n = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2  # EDM's λ(σ) = 1 / c_out²
    want = (lam[:, None, None, None] * (D(add_noise(x0, sigma, n), sigma) - x0) ** 2).mean()
    torch.testing.assert_close(denoiser_loss(D, x0, sigma, n), want)


def test_karras_sigmas():
    s = karras_sigmas(10, 0.01, 20.0)
    assert s.shape == (11,) and s[-1] == 0 and (s[:-1].diff() < 0).all()
    torch.testing.assert_close(s[[0, 9]], torch.tensor([20.0, 0.01]))


def test_sampler_on_gaussian_data():
    """Data N(0, s²): the exact denoiser is D(x; σ) = s²/(s² + σ²) x and the ODE carries
    x(σ_max) to x(0) = x(σ_max) · s / √(s² + σ_max²). Heun is second order, Euler first."""
    s = 0.7

    def D(x, sigma):
        return (s**2 / (s**2 + sigma**2)).reshape(-1, 1, 1, 1) * x

    x = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sig = karras_sigmas(30).double()
    want = x * sig[0] * s / math.sqrt(s**2 + sig[0] ** 2)
    err = {m: ((sample(D, None, sigmas=sig, x=x * sig[0], method=m) / want) - 1).abs().max()
           for m in ("euler", "heun")}
    assert err["euler"] < 0.1 and err["heun"] < 0.02 and err["heun"] < err["euler"] / 5
    with pytest.raises(ValueError, match="method must be"):
        sample(D, None, sigmas=sig, x=x, method="rk4")


def test_shapes_images():
    x = make_shapes(30, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == (30, 1, 16, 16) and set(x.unique().tolist()) == {-1.0, 1.0}
    lit = (x > 0).flatten(1).sum(1)
    assert (lit > 0).all() and (lit < 256).all()
    torch.testing.assert_close(x, make_shapes(30, 16, generator=torch.Generator().manual_seed(0)))


def test_autoencoder_is_4x_down():
    ae = ConvAutoencoder(1, latent=4)
    z = ae.encode(torch.zeros(2, 1, 16, 16))
    assert z.shape == (2, 4, 4, 4) and ae.decode(z).shape == (2, 1, 16, 16)


def test_merge_split_against_pixel_unshuffle():
    x = torch.randn(2, 6, 4, 3)
    m = merge_tokens(x)
    assert m.shape == (2, 3, 2, 12)
    # pixel_unshuffle orders channels (c, dy, dx); ours (dy, dx, c)
    ref = F.pixel_unshuffle(x.permute(0, 3, 1, 2), 2).reshape(2, 3, 2, 2, 3, 2)
    torch.testing.assert_close(m, ref.permute(0, 4, 5, 2, 3, 1).reshape(2, 3, 2, 12))
    torch.testing.assert_close(split_tokens(m), x)


def test_axial_rope_is_relative():
    """q·k after RoPE depends only on the offset between the two tokens (per axis)."""
    rope = AxialRoPE(8).double()
    g = torch.Generator().manual_seed(0)
    qv, kv = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g,
                                                                              dtype=torch.float64)
    q = qv.expand(1, 1, 5, 5, 8).clone()
    k = kv.expand(1, 1, 5, 5, 8).clone()
    rq, rk = rope(q, k)
    a = (rq[0, 0, 1, 2] * rk[0, 0, 3, 1]).sum()  # offset (2, -1)
    b = (rq[0, 0, 2, 3] * rk[0, 0, 4, 2]).sum()
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="divisible by 4"):
        AxialRoPE(6)


@pytest.mark.parametrize("model", [lambda: DiT(image_size=8, patch=2, d=32, depth=1),
                                   lambda: HDiT(levels=((16, 1), (32, 1)), d_head=8,
                                                kernel_size=3)])
def test_models_shapes_and_gradients(model):
    torch.manual_seed(0)
    net = model()
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    y = net(x, torch.tensor([0.1, -0.3]))
    assert y.shape == x.shape
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else None
    net(x, torch.tensor([0.1, -0.3])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hdit_input_size_checked_and_level_kernel():
    with pytest.raises(ValueError, match="multiples of patch"):
        HDiT(levels=((16, 1), (32, 1)), d_head=8)(torch.zeros(1, 1, 6, 7), torch.zeros(1))
    assert [level_kernel(7, n, n) for n in (16, 7, 6, 2, 1)] == [7, 7, 5, 1, 1]


def test_hdit_flops_linear_with_a_level_per_doubling():
    """Each doubling of the side adds a neighbourhood level on top: FLOPs grow 4x per doubling
    (linear in pixels) apart from the one extra level; DiT's attention grows 16x."""
    f = []
    for n_levels, size in ((2, 16), (3, 32), (4, 64)):
        levels = tuple((32, 1) for _ in range(n_levels))
        f.append(HDiT(levels=levels, d_head=8, kernel_size=7).flops(size))
    assert 3.5 < f[1] / f[0] < 6 and 3.5 < f[2] / f[1] < 6
    dit = DiT(image_size=64, patch=2, d=32, depth=2)
    assert dit.flops(64)["attention"] / dit.flops(32)["attention"] == 16
