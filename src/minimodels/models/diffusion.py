"""Diffusion in the σ parameterisation: noising, the preconditioned denoiser and its loss, an
ODE sampler (Euler or Heun), images drawn in code, a tiny convolutional autoencoder (latent
diffusion) and a tiny DiT.

References: Karras, Aittala, Aila, Laine, "Elucidating the design space of diffusion-based
generative models" (EDM, NeurIPS 2022), table 1 (preconditioning c_skip, c_out, c_in, c_noise;
the loss weight λ(σ); the σ schedule with ρ = 7; Heun's second-order sampler, algorithm 1);
Rombach et al., "High-resolution image synthesis with latent diffusion models" (CVPR 2022),
section 3 (a diffusion model in an autoencoder's latent space); Peebles & Xie, "Scalable
diffusion models with transformers" (DiT, ICCV 2023), section 3 (patches, a transformer,
conditioning by adaptive normalisation). Crowson's k-diffusion uses the same σ view.

    x_σ = x_0 + σ·n,  n ~ N(0, I)                           (noising: σ is the noise's std)
    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ))
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),
    c_noise = ln(σ) / 4
    loss = E ‖F(c_in x_σ, c_noise) − (x_0 − c_skip x_σ) / c_out‖²   (= λ(σ) ‖D − x_0‖²)
    dx/dσ = (x − D(x; σ)) / σ                                (the probability-flow ODE)

Glossary (code = paper): ``sigma`` = σ, ``sigma_data`` = σ_d, ``inner`` = F (the network),
``P_mean``, ``P_std`` = EDM's log-normal σ distribution for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn

from minimodels.kernels.attention import attention

__all__ = ["AdaRMSNorm", "ConvAutoencoder", "DiT", "Denoiser", "FourierFeatures", "add_noise",
           "denoiser_loss", "edm_scalings", "karras_sigmas", "make_shapes", "sample",
           "token_params", "train_sigmas"]

SIGMA_DATA = 0.5  # σ_d: the std of the data (EDM's default; our images in [-1, 1] are close)


# =============================================================================================
# Images drawn in code
# =============================================================================================


SHAPE_KINDS = ("disc", "square", "line")


def make_shapes(n: int, size: int, *, generator: torch.Generator | None = None,
                kinds: tuple[str, ...] = SHAPE_KINDS) -> torch.Tensor:
    """n greyscale images (n, 1, size, size) in [-1, 1]: on a dark background, one bright
    shape each, drawn from ``kinds``: a disc, a square or a thin line (1 pixel wide), at a
    random place and size."""
    if not kinds or any(k not in SHAPE_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty tuple of {SHAPE_KINDS}, got {kinds!r}")
    g = generator or torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = torch.full((n, 1, size, size), -1.0)
    pick = torch.randint(0, len(kinds), (n,), generator=g)
    u = torch.rand(n, 4, generator=g)
    for m in range(n):
        r = size * (0.15 + 0.15 * u[m, 0].item())  # radius / half side
        cy = r + (size - 2 * r) * u[m, 1].item()
        cx = r + (size - 2 * r) * u[m, 2].item()
        kind = kinds[pick[m]]
        if kind == "disc":
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif kind == "square":
            inside = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        else:  # a thin line through the centre at an angle
            a = math.pi * u[m, 3].item()
            dist = ((yy - cy) * math.cos(a) - (xx - cx) * math.sin(a)).abs()
            along = ((yy - cy) * math.sin(a) + (xx - cx) * math.cos(a)).abs()
            inside = (dist <= 0.5) & (along <= 1.6 * r)
        out[m, 0][inside] = 1.0
    return out


# =============================================================================================
# Noise, preconditioning, loss, sampler
# =============================================================================================


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_σ = x_0 + σ·n. x0, noise: (b, ...); sigma: (b,) the noise's standard deviation."""
    return x0 + sigma.reshape(-1, *([1] * (x0.dim() - 1))) * noise


def edm_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise), each shaped like sigma (b,). EDM table 1."""
    s2 = sigma**2 + sigma_data**2
    return sigma_data**2 / s2, sigma * sigma_data / s2.sqrt(), 1 / s2.sqrt(), sigma.log() / 4


class Denoiser(nn.Module):
    """D(x; σ) = c_skip x + c_out F(c_in x, c_noise) around a network ``inner(x, c_noise)``
    with x: (b, c, H, W), c_noise: (b,) -> (b, c, H, W)."""

    def __init__(self, inner: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.inner, self.sigma_data = inner, sigma_data

    def _bcast(self, c, x):
        return c.reshape(-1, *([1] * (x.dim() - 1)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        F = self.inner(self._bcast(c_in, x) * x, c_noise)
        return self._bcast(c_skip, x) * x + self._bcast(c_out, x) * F


def denoiser_loss(denoiser: Denoiser, x0: torch.Tensor, sigma: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """EDM's loss: mean ‖F(c_in x_σ, c_noise) − (x_0 − c_skip x_σ) / c_out‖², which is
    λ(σ) ‖D(x_σ; σ) − x_0‖² with λ = 1 / c_out². x0, noise: (b, ...); sigma: (b,)."""
    x = add_noise(x0, sigma, noise)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, denoiser.sigma_data)
    b = denoiser._bcast
    F = denoiser.inner(b(c_in, x) * x, c_noise)
    target = (x0 - b(c_skip, x) * x) / b(c_out, x)
    return (F - target).pow(2).mean()


def train_sigmas(n: int, generator: torch.Generator, P_mean: float = -1.2,
                 P_std: float = 1.2) -> torch.Tensor:
    """σ for training: ln σ ~ N(P_mean, P_std²) (EDM). -> (n,)."""
    return (P_mean + P_std * torch.randn(n, generator=generator)).exp()


def karras_sigmas(steps: int, sigma_min: float = 0.01, sigma_max: float = 20.0,
                  rho: float = 7.0) -> torch.Tensor:
    """EDM's schedule σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then 0.
    -> (steps + 1,), decreasing."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)]).float()


@torch.no_grad()
def sample(denoiser: nn.Module, shape, steps: int = 20, *, method: str = "heun",
           generator: torch.Generator | None = None, sigmas: torch.Tensor | None = None,
           x: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dσ = (x − D(x; σ)) / σ from σ_max to 0 (EDM algorithm 1 without churn):
    Euler, or Heun (a second evaluation at the next σ, except the last step to σ = 0).
    shape: (b, c, H, W); returns x (b, c, H, W)."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    sigmas = karras_sigmas(steps) if sigmas is None else sigmas
    if x is None:
        x = torch.randn(*shape, generator=generator) * sigmas[0]
    ones = torch.ones(x.shape[0])
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = (x - denoiser(x, s * ones)) / s  # dx/dσ at σ
        x_next = x + (s_next - s) * d  # Euler
        if method == "heun" and s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next * ones)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2  # the trapezoid
        x = x_next
    return x


# =============================================================================================
# Conditioning on σ: Fourier features and adaptive RMSNorm
# =============================================================================================


class FourierFeatures(nn.Module):
    """c_noise (b,) -> (b, d): [cos(2π f c), sin(2π f c)] with fixed random frequencies f."""

    def __init__(self, d: int, std: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("f", torch.randn(d // 2, generator=g) * std)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        a = 2 * math.pi * c[:, None] * self.f  # (b, d/2)
        return torch.cat([a.cos(), a.sin()], dim=-1)  # (b, d)


class AdaRMSNorm(nn.Module):
    """RMSNorm whose gain comes from the condition: x / rms(x) · (1 + W cond).
    x: (b, ..., d); cond: (b, d_cond) -> (b, ..., d). The gain starts at 1 (W = 0)."""

    def __init__(self, d: int, d_cond: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.W = nn.Linear(d_cond, d, bias=False)
        nn.init.zeros_(self.W.weight)

    def forward(self, x, cond):
        gain = 1 + self.W(cond).reshape(cond.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * gain


class Block(nn.Module):
    """A pre-norm transformer block on a grid of tokens: x + attn(norm(x)), x + mlp(norm(x)),
    both norms adaptive on the condition. ``attn``: (b, H, W, d) -> (b, H, W, d)."""

    def __init__(self, d: int, d_cond: int, attn: nn.Module, mlp_ratio: int = 2):
        super().__init__()
        self.norm1, self.attn = AdaRMSNorm(d, d_cond), attn
        self.norm2 = AdaRMSNorm(d, d_cond)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(),
                                 nn.Linear(mlp_ratio * d, d))
        nn.init.zeros_(self.mlp[-1].weight)  # each block starts as the identity

    def forward(self, x, cond):
        x = x + self.attn(self.norm1(x, cond))
        return x + self.mlp(self.norm2(x, cond))


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all the tokens of a grid (b, H, W, d), by the course's
    attention kernel (chapter 02). ``rope``: an optional callable (q, k) -> (q, k) on
    (b, h, H, W, e) tensors that adds positions (HDiT's axial RoPE)."""

    def __init__(self, d: int, d_head: int = 32, rope=None):
        super().__init__()
        if d % d_head:
            raise ValueError(f"d must be a multiple of d_head: {d} % {d_head} != 0")
        self.h, self.e, self.rope = d // d_head, d_head, rope
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.out.weight)

    def heads(self, x):
        """(b, H, W, d) -> q, k, v each (b, h, H, W, e), with the positions applied."""
        b, H, W, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, H, W, 3, self.h, self.e).permute(3, 0, 4, 1, 2, 5)
        if self.rope is not None:
            q, k = self.rope(q, k)
        return q, k, v

    def forward(self, x):
        b, H, W, d = x.shape
        q, k, v = (t.reshape(b, self.h, H * W, self.e) for t in self.heads(x))  # (b, h, l, e)
        o = attention(q, k, v)  # (b, h, l, e)
        return self.out(o.permute(0, 2, 1, 3).reshape(b, H, W, d))


# =============================================================================================
# A tiny DiT: patches, global attention, adaptive norms
# =============================================================================================


class DiT(nn.Module):
    """Patchify (patch x patch pixels -> one token), learned positions, ``depth`` blocks of
    global attention, unpatchify. F(x (b, c, H, W), c_noise (b,)) -> (b, c, H, W)."""

    def __init__(self, channels: int = 1, image_size: int = 16, patch: int = 2, d: int = 64,
                 depth: int = 4, d_head: int = 32):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size must be a multiple of patch: {image_size} % {patch}")
        self.c, self.p, self.n = channels, patch, image_size // patch
        self.embed = nn.Linear(channels * patch * patch, d)
        self.pos = nn.Parameter(torch.randn(self.n, self.n, d) * 0.02)
        self.cond = nn.Sequential(FourierFeatures(d), nn.Linear(d, d), nn.GELU())
        self.blocks = nn.ModuleList(Block(d, d, GlobalAttention(d, d_head)) for _ in range(depth))
        self.norm = AdaRMSNorm(d, d)
        self.unembed = nn.Linear(d, channels * patch * patch)
        nn.init.zeros_(self.unembed.weight)

    def forward(self, x, c_noise):
        b, c, H, W = x.shape
        p = self.p
        t = Fn.pixel_unshuffle(x, p).permute(0, 2, 3, 1)  # (b, H/p, W/p, c·p²)
        t = self.embed(t) + self.pos[: H // p, : W // p]  # (b, H/p, W/p, d)
        cond = self.cond(c_noise)  # (b, d)
        for block in self.blocks:
            t = block(t, cond)
        t = self.unembed(self.norm(t, cond)).permute(0, 3, 1, 2)  # (b, c·p², H/p, W/p)
        return Fn.pixel_shuffle(t, p)  # (b, c, H, W)

    def flops(self, image_size: int) -> dict[str, int]:
        """FLOPs of one forward at image_size²: {"linear": ..., "attention": ...}."""
        tokens = (image_size // self.p) ** 2
        d = self.embed.out_features
        return {"linear": 2 * tokens * token_params(self),
                "attention": 4 * len(self.blocks) * tokens**2 * d}


def token_params(module: nn.Module) -> int:
    """Weights of the linear maps applied to every token (those of the σ conditioning and the
    adaptive norms act once per image and are left out)."""
    return sum(m.weight.numel() for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and "norm" not in name and not name.startswith("cond"))


# =============================================================================================
# A tiny convolutional autoencoder: 4x down in each direction (latent diffusion)
# =============================================================================================


class ConvAutoencoder(nn.Module):
    """encode: (b, c, H, W) -> (b, z, H/4, W/4); decode back. Two stride-2 convolutions each
    way with GELUs; the latent is what a latent diffusion model denoises."""

    def __init__(self, channels: int = 1, latent: int = 4, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GELU(),  # H/2
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GELU(),  # H/4
            nn.Conv2d(width, latent, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, width, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.GELU(),  # H/2
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.GELU(),  # H
            nn.Conv2d(width, channels, 3, padding=1))

    def encode(self, x):
        return self.encoder(x)  # (b, z, H/4, W/4)

    def decode(self, z):
        return self.decoder(z)  # (b, c, H, W)

    def forward(self, x):
        return self.decode(self.encode(x))
