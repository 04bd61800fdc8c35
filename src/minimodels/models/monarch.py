"""Monarch Mixer: Monarch matrices along the feature axis and along the sequence.

References: Dao et al., "Monarch: expressive structured matrices for efficient and accurate
training" (ICML 2022), section 3; Fu et al., "Monarch Mixer: a simple sub-quadratic GEMM-based
architecture" (NeurIPS 2023), sections 3 (the M2 layer), 4.1 (the sequence mixer: a gated long
convolution computed with Monarch FFTs) and 5.2 (causality by zero-padding to 2L).

Glossary (code = paper): ``MonarchLinear`` = a Monarch matrix used as a dense layer's weight
(M = P2 BD(w2) P1 BD(w1), kernels/monarch); ``MonarchMLP`` = M2's feature mixer, the MLP with
both matrices Monarch; ``M2Mixer`` = M2's sequence mixer: y = out(b ⊙ (K * (a ⊙ v))) with a
learned long convolution K per channel, its FFT evaluated as a Monarch product (the DFT of
length N = m², ``monarch_dft``). Shapes: ``b`` batch, ``l`` length, ``d`` d_model, ``N`` the
padded FFT length (N >= 2l - 1: a circular convolution of zero-padded inputs is the causal
linear one).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minimodels.kernels.monarch import monarch_dft, monarch_matrix, monarch_multiply

__all__ = ["M2Mixer", "MonarchLinear", "MonarchMLP", "default_blocks", "monarch_fft",
           "monarch_causal_conv"]


def default_blocks(d: int) -> int:
    """The power of two nearest √d that divides d (Monarch's square case when d is a square
    of a power of two): the number of blocks a layer of width d uses by default."""
    best = 1
    for b in (2 ** i for i in range(int(math.log2(max(d, 1))) + 1)):
        if d % b == 0 and abs(math.log(b) - 0.5 * math.log(d)) < abs(
                math.log(best) - 0.5 * math.log(d)):
            best = b
    return best


class MonarchLinear(nn.Module):
    """A drop-in for ``nn.Linear(d_in, d_out)`` whose weight is a Monarch matrix.

    ``nblocks`` blocks in each factor: w1 (nblocks, q, d_in/nblocks), w2 (nblocks,
    d_out/nblocks, q) with q = max(d_in, d_out)/nblocks. (..., d_in) -> (..., d_out).
    ``n_params`` and ``flops(tokens)`` count it; ``dense()`` is its matrix (d_out, d_in)."""

    def __init__(self, d_in: int, d_out: int, nblocks: int | None = None, bias: bool = True):
        super().__init__()
        nblocks = default_blocks(math.gcd(d_in, d_out)) if nblocks is None else nblocks
        if nblocks < 1 or d_in % nblocks or d_out % nblocks:
            raise ValueError(f"nblocks must divide d_in = {d_in} and d_out = {d_out}, got "
                             f"{nblocks}")
        self.d_in, self.d_out, self.nblocks = d_in, d_out, nblocks
        p, s = d_in // nblocks, d_out // nblocks
        q = max(p, s)
        # uniform(±1/√fan_in) like nn.Linear, per factor: the product keeps the input's scale
        self.w1 = nn.Parameter(torch.empty(nblocks, q, p).uniform_(-1, 1) / math.sqrt(p))
        self.w2 = nn.Parameter(torch.empty(nblocks, s, q).uniform_(-1, 1) / math.sqrt(q))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    @property
    def n_params(self) -> int:
        """Numbers in the layer: nblocks·q·(p + s) (+ d_out of bias), vs d_in·d_out dense."""
        return sum(p.numel() for p in self.parameters())

    def flops(self, tokens: int = 1) -> int:
        """Multiply-adds x 2 for ``tokens`` tokens: 2·(w1.numel() + w2.numel()) per token."""
        return 2 * tokens * (self.w1.numel() + self.w2.numel())

    def dense(self) -> torch.Tensor:
        """The weight as a dense (d_out, d_in) matrix (for checks and pictures)."""
        return monarch_matrix(self.w1, self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = monarch_multiply(x, self.w1, self.w2)  # (..., d_out); backend: use_backend
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, nblocks={self.nblocks}"


class MonarchMLP(nn.Module):
    """M2's feature mixer: FFN(x) = W2 gelu(W1 x) with both W Monarch matrices
    (``MonarchLinear``), d_ff = 4·d_model by default. (..., d) -> (..., d)."""

    def __init__(self, d_model: int, d_ff: int | None = None, nblocks: int | None = None):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        nblocks = default_blocks(math.gcd(d_model, d_ff)) if nblocks is None else nblocks
        self.W1 = MonarchLinear(d_model, d_ff, nblocks, bias=False)
        self.W2 = MonarchLinear(d_ff, d_model, nblocks, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W2(nn.functional.gelu(self.W1(x)))  # (..., d)


# =============================================================================================
# The FFT as a Monarch product, and the causal convolution it computes
# =============================================================================================


def monarch_fft(x: torch.Tensor, factors) -> torch.Tensor:
    """The DFT along the last axis as a Monarch product: x (..., N) -> X (..., N) complex,
    ``factors = monarch_dft(m)`` with N = m² (the reference backend: complex einsum)."""
    w1, w2, perm = factors
    x = x.to(w1.dtype) if not x.is_complex() else x
    return monarch_multiply(x[..., perm], w1.to(x.dtype), w2.to(x.dtype), backend="ref")


def monarch_causal_conv(u: torch.Tensor, K: torch.Tensor, m: int | None = None) -> torch.Tensor:
    """y[..., t] = Σ_{s <= t} K[..., t - s] u[..., s], by FFTs that are Monarch products.

    u: (..., l) real; K: (..., l) real (broadcast against u) -> y (..., l). Both are
    zero-padded to N = m² >= 2l - 1 (m = ceil(√(2l)) by default), so the circular convolution
    of length N is the causal linear one; the inverse DFT is conj(DFT(conj(X))) / N."""
    l = u.shape[-1]
    m = math.ceil(math.sqrt(2 * l)) if m is None else m
    N = m * m
    if N < 2 * l - 1:
        raise ValueError(f"m = {m} gives N = m² = {N} < 2l - 1 = {2 * l - 1}: the circular "
                         "convolution would wrap around (not causal)")
    complex_dtype = torch.complex128 if u.dtype == torch.float64 else torch.complex64
    w1, w2, perm = monarch_dft(m, device=u.device)
    factors = (w1.to(complex_dtype), w2.to(complex_dtype), perm)
    pad = N - l
    U = monarch_fft(nn.functional.pad(u, (0, pad)), factors)  # (..., N)
    Kf = monarch_fft(nn.functional.pad(K, (0, pad)), factors)  # (..., N)
    y = monarch_fft((U * Kf).conj(), factors).conj() / N  # the inverse DFT
    return y.real[..., :l].to(u.dtype)  # (..., l)


# =============================================================================================
# M2's sequence mixer
# =============================================================================================


class M2Mixer(nn.Module):
    """M2's causal sequence mixer: a gated long convolution, its FFTs computed as Monarch
    products.

        a, b, v = in_proj(x)                    (b, l, d) each
        u = a ⊙ v;  y = b ⊙ (K * u);  out = out_proj(y)

    K (d, max_len) is one learned causal filter per channel of up to ``max_len`` taps, made of
    a learned (d, max_len) pattern times an exponential decay e^{-α_c t} (α_c spread over
    [decay_min, decay_max] across channels, learned in log space): long filters that start
    smooth. ``fft``: "monarch" (the DFT as a Monarch product, M2's way) or "torch"
    (``torch.fft``), the same convolution. With ``monarch_proj`` the input and output
    projections are Monarch matrices too (``nblocks`` blocks), as in M2-BERT.

    forward: (b, l, d) -> (b, l, d), l <= max_len. step: x_t (b, d), state -> (y_t, state);
    the state is the history of u so far, (b, d, t): like a KV cache, it grows with t (a long
    convolution has no constant-size state)."""

    def __init__(self, d_model: int, *, max_len: int = 1024, fft: str = "monarch",
                 decay_min: float = 1e-3, decay_max: float = 0.3, monarch_proj: bool = False,
                 nblocks: int | None = None):
        super().__init__()
        if fft not in ("monarch", "torch"):
            raise ValueError(f"fft must be 'monarch' or 'torch', got {fft!r}")
        self.d_model, self.max_len, self.fft = d_model, max_len, fft
        Proj = ((lambda i, o: MonarchLinear(i, o, nblocks)) if monarch_proj
                else (lambda i, o: nn.Linear(i, o)))
        self.in_proj = Proj(d_model, 3 * d_model)
        self.out_proj = Proj(d_model, d_model)
        self.pattern = nn.Parameter(torch.randn(d_model, max_len) / math.sqrt(max_len) * 4)
        log_alpha = torch.linspace(math.log(decay_min), math.log(decay_max), d_model)
        self.log_decay = nn.Parameter(log_alpha)  # (d,)
        self.bias = nn.Parameter(torch.randn(d_model))  # the filter's tap 0 (a skip)

    def kernel(self, l: int) -> torch.Tensor:
        """The first l taps of every channel's filter: K (d, l)."""
        if l > self.max_len:
            raise ValueError(f"sequence length {l} > max_len = {self.max_len}: the filters "
                             "have max_len taps")
        t = torch.arange(l, dtype=self.pattern.dtype, device=self.pattern.device)
        K = self.pattern[:, :l] * torch.exp(-self.log_decay.exp()[:, None] * t)  # (d, l)
        return K + nn.functional.pad(self.bias[:, None], (0, l - 1))  # tap 0 += bias

    def _gates(self, x: torch.Tensor):
        a, b, v = self.in_proj(x).chunk(3, dim=-1)  # (..., d) each
        return a * v, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l = x.shape[1]
        u, b = self._gates(x)  # (b, l, d)
        K = self.kernel(l)  # (d, l)
        u = u.transpose(1, 2)  # (b, d, l)
        if self.fft == "monarch":
            y = monarch_causal_conv(u, K)  # (b, d, l)
        else:
            N = 2 * l
            y = torch.fft.irfft(torch.fft.rfft(u, n=N) * torch.fft.rfft(K, n=N), n=N)[..., :l]
        return self.out_proj(b * y.transpose(1, 2))  # (b, l, d)

    def step(self, x_t: torch.Tensor, state=None):
        """x_t (b, d) -> (y_t (b, d), state (b, d, t)): y_t = Σ_{s<=t} K[t - s] u_s."""
        u, b = self._gates(x_t)  # (b, d)
        hist = u[..., None] if state is None else torch.cat([state, u[..., None]], -1)
        t = hist.shape[-1]
        K = self.kernel(t).flip(-1)  # (d, t): K[t-1-s] against u_s
        y = (hist * K).sum(-1)  # (b, d)
        return self.out_proj(b * y), hist
