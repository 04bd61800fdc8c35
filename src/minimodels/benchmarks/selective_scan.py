"""selective_scan: the fused kernels against the reference loop and a pscan-style baseline.

    python -m minimodels.bench selective_scan                       # CPU, (1, 1536, 4096, 16)
    python -m minimodels.bench selective_scan --device cuda

The baseline "expanded + Blelloch scan" is what a pure-PyTorch port of Mamba does (the approach
of ``mambapy``'s ``pscan``, written here from the algorithm): materialise Ā = exp(Δ A) and
B̄u = Δ B u as (b, d, l, n) tensors and scan them in log2(l) vectorised levels. Every row is a
speed-up over the reference and a multiple of two floors: bytes (u, Δ, z, B, C read once, y
written once, over the bandwidth of a large copy measured in the same run) and exps (b·d·l·n of
them, over the exp rate of a scalar loop measured in the same run: on the CPU, pip's Numba calls
libm's scalar exp, so the CPU kernel is exp-bound).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from minimodels.bench import copy_bandwidth, exp_rate, machine, timeit

__all__ = ["run", "selective_scan_pscan"]


def selective_scan_pscan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False):
    """The selective scan with the (b, d, l, n) expansion materialised and scanned by
    Blelloch's algorithm (``parallel_scan``). Input-dependent B, C (b, n, l) only."""
    from minimodels.kernels.selective_scan import parallel_scan

    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    delta = F.softplus(delta) if delta_softplus else delta  # (b, d, l)
    Abar = torch.exp(delta[:, :, None, :] * A[None, :, :, None])  # (b, d, n, l)
    Bu = (delta * u)[:, :, None, :] * B[:, None]  # (b, d, n, l)
    x = parallel_scan(Abar, Bu)  # (b, d, n, l)
    y = torch.einsum("bdnl,bnl->bdl", x, C)
    if D is not None:
        y = y + D[:, None] * u
    return y * F.silu(z) if z is not None else y


def _inputs(shape, device, dtype):
    b, d, l, n = shape
    g = torch.Generator(device=device).manual_seed(0)

    def r(*s):
        return torch.randn(*s, device=device, dtype=dtype, generator=g)

    A = -torch.exp(0.5 * r(d, n))
    return dict(u=r(b, d, l), delta=r(b, d, l) - 2.0, A=A, B=r(b, n, l), C=r(b, n, l), D=r(d),
                z=r(b, d, l), delta_bias=0.1 * r(d))


def run(shape=(1, 1536, 4096, 16), device="cpu", dtype=torch.float32) -> str:
    """Time the forward (and forward+backward for the kernels) at ``shape`` = (b, d, l, n)."""
    from minimodels.kernels.selective_scan import selective_scan

    if shape is None:
        shape = (1, 1536, 4096, 16)
    if isinstance(shape, str):
        shape = tuple(int(s) for s in shape.split(","))
    if dtype is None:
        dtype = torch.float32
    b, d, l, n = shape
    kw = _inputs(shape, device, dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    nbytes = (4 * b * d * l + 2 * b * n * l) * size  # u, Δ, z, y; B, C
    floor_bytes = nbytes / copy_bandwidth(device)
    exps = b * d * l * n
    floor_exp = exps / exp_rate(np.float32 if dtype == torch.float32 else np.float64) if (
        device == "cpu") else 0.0
    kernel = "cpu" if device == "cpu" else "cuda"
    with torch.no_grad():
        expected = selective_scan(**{k: v.double() for k, v in kw.items()}, delta_softplus=True,
                                  backend=kernel).to(dtype)

    def err(y):
        return f"max err {(y.double() - expected.double()).abs().max().item():.1e}"

    rows = []

    def add(name, fn, note="", **t):
        with torch.no_grad():
            seconds = timeit(fn, device=device, **t)
            rows.append((name, seconds, f"{note}{'; ' if note else ''}{err(fn())}"))

    add("ref (Python loop over l)", lambda: selective_scan(**kw, delta_softplus=True,
                                                            backend="ref"), warmup=0, repeat=1)
    add("expanded + Blelloch scan (pscan-style)", lambda: selective_scan_pscan(
        **kw, delta_softplus=True), f"materialises {exps * size / 1e6:.0f} MB tensors",
        warmup=0, repeat=1)
    add(f"minimodels {kernel} kernel", lambda: selective_scan(**kw, delta_softplus=True,
                                                              backend=kernel), repeat=5)
    params = {k: v.requires_grad_() for k, v in kw.items()}

    def fwd_bwd():
        with torch.enable_grad():
            y = selective_scan(**params, delta_softplus=True, backend=kernel)
            torch.autograd.grad(y.sum(), list(params.values()))
        return y.detach()

    seconds = timeit(fwd_bwd, device=device, repeat=5)
    rows.append((f"minimodels {kernel} kernel, forward+backward", seconds, "not a forward"))
    ref = rows[0][1]
    lines = [
        f"selective_scan forward at (b, d, l, n) = {tuple(shape)} {str(dtype)[6:]} on {device}: "
        f"{machine(device)}",
        f"bytes floor = {nbytes / 1e6:.0f} MB / measured copy bandwidth = "
        f"{floor_bytes * 1e3:.3g} ms" + (
            f"; exp floor = {exps / 1e6:.0f} M exps / measured scalar exp rate = "
            f"{floor_exp * 1e3:.3g} ms" if floor_exp else ""),
        "",
        "| implementation | ms | speed-up vs ref | x bytes floor | x exp floor | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, s, note in rows:
        x_exp = f"{s / floor_exp:.2f}" if floor_exp else "-"
        lines.append(f"| {name} | {s * 1e3:.3g} | {ref / s:.3g}x | {s / floor_bytes:.1f} | "
                     f"{x_exp} | {note} |")
    return "\n".join(lines)
