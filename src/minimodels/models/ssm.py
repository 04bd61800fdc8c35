"""Linear state-space models: discretisation, HiPPO, S4D, convolution and recurrence.

References: Gu et al., "HiPPO: Recurrent memory with optimal polynomial projections" (2020),
section 3 and appendix D (LegS); Gu, Goel & Ré, "Efficiently modeling long sequences with
structured state spaces" (S4, 2022), sections 2.2-2.4 (discretisation, kernel K);
Gu, Gupta, Goel & Ré, "On the parameterization and initialization of diagonal state space
models" (S4D, 2022), sections 3-4 (the Vandermonde kernel, S4D-Lin and S4D-Inv);
Gu & Dao, "Mamba" (2023), section 2 (the rule Ā = exp(ΔA), B̄ = ΔB).

The continuous system  x'(t) = A x(t) + B u(t),  y(t) = C x(t) + D u(t)  becomes, with step Δ,

    x_k = Ā x_{k-1} + B̄ u_k,   y_k = C x_k + D u_k,   K = (C B̄, C Ā B̄, ..., C Ā^{L-1} B̄),

so y = K * u + D u: the recurrence and the causal convolution are one system.

Glossary (code = paper): ``dt`` = Δ, ``Ad`` = Ā, ``Bd`` = B̄, ``K`` = the SSM kernel K̄,
``log_dt`` = log Δ. Shapes: ``n`` state, ``m`` inputs, ``l``/``L`` length, ``d`` channels,
``b`` batch. ``causal_fft_conv`` lives in ``minimodels.kernels.long_conv`` (re-exported here).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minimodels.kernels.long_conv import causal_fft_conv
from minimodels.kernels.ssm_kernel import s4d_kernel

__all__ = [
    "METHODS",
    "S4D",
    "S4DBlock",
    "causal_fft_conv",
    "discretize",
    "hippo_legs",
    "legs_decode",
    "legs_encode",
    "s4d_inv",
    "s4d_lin",
    "ssm_convolutional",
    "ssm_kernel",
    "ssm_recurrent",
]

METHODS = ("zoh", "bilinear", "euler", "mamba")


# =============================================================================================
# Discretisation
# =============================================================================================


def _as_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must be a float or complex tensor, got {x.dtype}")
    return x


def _check_system(A, B, dt, method):
    _as_tensor("A", A)
    _as_tensor("B", B)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if A.dim() not in (1, 2) or (A.dim() == 2 and A.shape[0] != A.shape[1]):
        raise ValueError(f"A must be (n, n) dense or (n,) diagonal, got shape {tuple(A.shape)}")
    n = A.shape[0]
    if B.dim() not in (1, 2) or B.shape[0] != n:
        raise ValueError(f"B must have shape ({n},) or ({n}, m), got {tuple(B.shape)}")
    if isinstance(dt, torch.Tensor):
        if dt.numel() != 1:
            raise ValueError(f"dt must be a scalar step, got shape {tuple(dt.shape)}")
        dt = dt.item()
    if not isinstance(dt, (int, float)) or not dt > 0:
        raise ValueError(f"dt must be a positive number, got {dt!r}")
    return float(dt)


def discretize(A, B, dt, method: str = "zoh"):
    """Continuous (A, B) -> discrete (Ad, Bd) for x_k = Ad x_{k-1} + Bd u_k.

    A: (n, n) dense or (n,) diagonal (told apart by ``A.dim()``); B: (n,) or (n, m); dt > 0.

        zoh       Ad = exp(Δ A)             Bd = A⁻¹ (exp(Δ A) − I) B       (exact for held u)
        bilinear  Ad = (I − Δ/2 A)⁻¹ (I + Δ/2 A)   Bd = (I − Δ/2 A)⁻¹ Δ B   (S4, scipy)
        euler     Ad = I + Δ A              Bd = Δ B                        (forward Euler)
        mamba     Ad = exp(Δ A)             Bd = Δ B                        (Mamba, section 2)

    Dense zoh takes the exponential of the block matrix [[A, B], [0, 0]]·Δ, so a singular A is
    fine; diagonal zoh uses Δ where an eigenvalue is 0. Returns Ad like A and Bd like B."""
    dt = _check_system(A, B, dt, method)
    dtype = torch.promote_types(A.dtype, B.dtype)
    A, B = A.to(dtype), B.to(dtype)
    n = A.shape[0]
    if A.dim() == 1:  # diagonal: every operation is elementwise over the n modes
        dtA = dt * A  # (n,)
        if method in ("zoh", "mamba"):
            Ad = torch.exp(dtA)
        elif method == "bilinear":
            Ad = (1 + dtA / 2) / (1 - dtA / 2)
        else:
            Ad = 1 + dtA
        if method == "zoh":
            safe = torch.where(A == 0, torch.ones_like(A), A)
            scale = torch.where(A == 0, torch.full_like(A, dt), (Ad - 1) / safe)  # (n,)
        elif method == "bilinear":
            scale = dt / (1 - dtA / 2)
        else:
            scale = torch.full_like(A, dt)
        Bd = scale * B if B.dim() == 1 else scale[:, None] * B  # (n,) or (n, m)
        return Ad, Bd
    I = torch.eye(n, dtype=dtype, device=A.device)
    B2 = B[:, None] if B.dim() == 1 else B  # (n, m)
    if method == "zoh":
        m = B2.shape[1]
        M = torch.zeros(n + m, n + m, dtype=dtype, device=A.device)
        M[:n, :n], M[:n, n:] = A, B2
        E = torch.linalg.matrix_exp(dt * M)  # [[exp(ΔA), ∫₀^Δ exp(sA) ds B], [0, I]]
        Ad, Bd = E[:n, :n], E[:n, n:]
    elif method == "mamba":
        Ad, Bd = torch.linalg.matrix_exp(dt * A), dt * B2
    elif method == "bilinear":
        inv = torch.linalg.inv(I - dt / 2 * A)
        Ad, Bd = inv @ (I + dt / 2 * A), inv @ (dt * B2)
    else:
        Ad, Bd = I + dt * A, dt * B2
    return Ad, (Bd[:, 0] if B.dim() == 1 else Bd)


# =============================================================================================
# Initialisations: HiPPO-LegS, S4D-Lin, S4D-Inv
# =============================================================================================


def _check_n(n):
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


def hippo_legs(n: int):
    """HiPPO-LegS (HiPPO, eq. 2 / theorem 2): the continuous system whose state holds the
    Legendre coefficients of the whole history u[0, t], for  c'(t) = (1/t)(A c + B u).

        A[i, k] = −√(2i+1)·√(2k+1)  (i > k),   −(i+1)  (i = k),   0  (i < k);   B[i] = √(2i+1)

    Returns A: (n, n), B: (n, 1), float64."""
    _check_n(n)
    q = torch.sqrt(2 * torch.arange(n, dtype=torch.float64) + 1)  # (n,)
    A = -torch.tril(q[:, None] * q[None, :], diagonal=-1)  # (n, n) strictly lower
    A -= torch.diag(torch.arange(1, n + 1, dtype=torch.float64))
    return A, q[:, None]  # (n, n), (n, 1)


def s4d_lin(n: int):
    """S4D-Lin (S4D, section 4): A_k = −1/2 + iπk, k = 0..n−1. Returns (n,) complex128."""
    _check_n(n)
    k = torch.arange(n, dtype=torch.float64)
    return torch.complex(torch.full_like(k, -0.5), math.pi * k)


def s4d_inv(n: int):
    """S4D-Inv (S4D, section 4): A_k = −1/2 + i·(N/π)·(N/(2k+1) − 1), N = n (the number of
    complex modes). Returns (n,) complex128."""
    _check_n(n)
    k = torch.arange(n, dtype=torch.float64)
    return torch.complex(torch.full_like(k, -0.5), n / math.pi * (n / (2 * k + 1) - 1))


def legs_encode(u: torch.Tensor, n: int) -> torch.Tensor:
    """Run HiPPO-LegS online over samples u: (l,) (time t = 1..l), bilinear steps of
    c'(t) = (1/t)(A c + B u) as in the HiPPO code. Returns c: (l, n), the state after each
    sample: the Legendre coefficients of u[0, t] on the scaled window [0, t]."""
    _check_n(n)
    _as_tensor("u", u)
    A, B = hippo_legs(n)
    I = torch.eye(n, dtype=torch.float64)
    c = torch.zeros(n, dtype=torch.float64)
    out = []
    for k, u_k in enumerate(u.double().tolist(), start=1):
        left = I - A / (2 * k)  # bilinear with Δ/t = 1/k
        c = torch.linalg.solve_triangular(left, ((I + A / (2 * k)) @ c + B[:, 0] / k * u_k)
                                          [:, None], upper=False)[:, 0]
        out.append(c)
    return torch.stack(out)  # (l, n)


def legs_decode(c: torch.Tensor, l: int) -> torch.Tensor:
    """Reconstruct l samples of the history from LegS coefficients c: (n,):
    u(s) ≈ Σ_i c_i √(2i+1) P_i(2s/t − 1) on s ∈ [0, t], sampled at the l step midpoints."""
    n = c.shape[-1]
    x = (2 * (torch.arange(l, dtype=torch.float64) + 0.5) / l) - 1  # (l,) in (−1, 1)
    P = [torch.ones_like(x), x]  # Legendre polynomials by Bonnet's recursion
    for i in range(1, n - 1):
        P.append(((2 * i + 1) * x * P[i] - i * P[i - 1]) / (i + 1))
    basis = torch.stack(P[:n]) * torch.sqrt(2 * torch.arange(n, dtype=torch.float64) + 1)[:, None]
    return c.double() @ basis  # (l,)


# =============================================================================================
# Kernel, recurrence, convolution (single input, single output)
# =============================================================================================


def _mat(Ad, v):
    return Ad @ v if Ad.dim() == 2 else Ad * v


def ssm_kernel(Ad, Bd, C, L: int) -> torch.Tensor:
    """K_j = C · Ad^j · Bd for j = 0..L−1 (S4, eq. 4). Ad: (n, n) or (n,) diagonal;
    Bd, C: (n,). Returns K: (L,) (complex if any input is complex)."""
    for name, x in (("Ad", Ad), ("Bd", Bd), ("C", C)):
        _as_tensor(name, x)
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be a positive int, got {L!r}")
    if Ad.dim() == 1:  # Vandermonde: K_j = Σ_n C_n Bd_n Ad_n^j
        powers = Ad[:, None] ** torch.arange(L, device=Ad.device)  # (n, L)
        return (C * Bd) @ powers  # (L,)
    out, v = [], Bd
    for _ in range(L):
        out.append(C @ v)
        v = Ad @ v  # (n,)
    return torch.stack(out)  # (L,)


def ssm_recurrent(Ad, Bd, C, u) -> torch.Tensor:
    """y_k = C x_k with x_k = Ad x_{k−1} + Bd u_k, x_{−1} = 0. u: (..., L) -> y: (..., L)."""
    x = torch.zeros(u.shape[:-1] + Bd.shape, dtype=torch.promote_types(Bd.dtype, u.dtype))
    ys = []
    for k in range(u.shape[-1]):
        x = (x @ Ad.T if Ad.dim() == 2 else x * Ad) + Bd * u[..., k, None]  # (..., n)
        ys.append(x @ C)
    return torch.stack(ys, dim=-1)  # (..., L)


def ssm_convolutional(Ad, Bd, C, u) -> torch.Tensor:
    """The same map as ``ssm_recurrent`` as y = K * u (causal FFT convolution).
    u: (..., L) -> y: (..., L)."""
    return causal_fft_conv(u, ssm_kernel(Ad, Bd, C, u.shape[-1]))


# =============================================================================================
# The S4D layer
# =============================================================================================


class S4D(nn.Module):
    """Diagonal SSM layer (S4D): per channel d, n = d_state // 2 complex modes, ZOH with B = 1,

        Ā = exp(Δ A),  B̄ = (exp(Δ A) − 1) / A,  y = 2·Re(C x) + D u  (conjugate pairs halved),
        K[d, l] = 2·Re Σ_n C[d,n] B̄[d,n] Ā[d,n]^l      (``minimodels.kernels.ssm_kernel``).

    A = −exp(log_A_real) + i·A_imag (S4D-Lin init), Δ = exp(log_dt) with log Δ uniform in
    [log dt_min, log dt_max]. forward: x (b, l, d) -> (b, l, d) by FFT convolution with the
    kernel ``s4d_kernel`` (its backend: ``minimodels.use_backend``, else the tensors' device;
    every backend has a backward kernel, so this is what trains);
    step: x_t (b, d), state (b, d, n) complex -> (y_t (b, d), state)."""

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, *, seed: int | None = None):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2, got {d_state!r}")
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        d, n = d_model, d_state // 2
        self.d_model, self.d_state = d_model, d_state
        A = s4d_lin(n)
        self.log_A_real = nn.Parameter(torch.log(-A.real).repeat(d, 1).float())  # (d, n)
        self.A_imag = nn.Parameter(A.imag.repeat(d, 1).float())  # (d, n)
        C = torch.randn(d, n, 2, generator=g) * math.sqrt(0.5)
        self.C = nn.Parameter(C)  # (d, n, 2): real and imaginary parts
        u = torch.rand(d, generator=g)
        self.log_dt = nn.Parameter(math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min)))
        self.D = nn.Parameter(torch.randn(d, generator=g))  # (d,)

    def ssm(self):
        """(A, C, dt): A, C (d, n) complex in the parameters' precision, dt (d,)."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        return A, torch.view_as_complex(self.C), torch.exp(self.log_dt)

    def kernel(self, L: int) -> torch.Tensor:
        """K: (d, L), differentiable: ``s4d_kernel`` (its backend: ``use_backend``)."""
        return s4d_kernel(*self.ssm(), L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.transpose(1, 2)  # (b, d, l)
        y = causal_fft_conv(u, self.kernel(u.shape[-1])) + self.D[:, None] * u  # (b, d, l)
        return y.transpose(1, 2)  # (b, l, d)

    def step(self, x_t: torch.Tensor, state: torch.Tensor | None = None):
        A, C, dt = self.ssm()
        dtA = dt[:, None] * A  # (d, n)
        Ad, Bd = torch.exp(dtA), torch.expm1(dtA) / A  # ZOH with B = 1
        if state is None:
            state = torch.zeros(x_t.shape + (A.shape[1],), dtype=A.dtype, device=x_t.device)
        state = Ad * state + Bd * x_t[..., None]  # (b, d, n)
        y = 2 * (C * state).sum(-1).real + self.D * x_t  # (b, d)
        return y, state


class S4DBlock(nn.Module):
    """S4's block around the S4D layer (S4, section 3.4; the ``"s4d"`` mixer): the SSM, a GELU,
    then a gated linear output (GLU), with no selection:

        y = GLU(W · gelu(S4D(x))),   W: d -> 2d,   GLU([a, g]) = a ⊙ σ(g)

    forward: x (b, l, d) -> (b, l, d); step: x_t (b, d), the S4D state -> (y_t (b, d), state)."""

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3,
                 dt_max: float = 1e-1):
        super().__init__()
        self.s4d = S4D(d_model, d_state, dt_min, dt_max)
        self.out = nn.Linear(d_model, 2 * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.glu(self.out(nn.functional.gelu(self.s4d(x))))  # (b, l, d)

    def step(self, x_t: torch.Tensor, state=None):
        y, state = self.s4d.step(x_t, state)  # (b, d)
        return nn.functional.glu(self.out(nn.functional.gelu(y))), state
