"""selective_scan: the fused kernels against the reference loop and a pscan-style baseline.

    python -m minimodels.bench selective_scan                       # CPU, (1, 1536, 4096, 16)
    python -m minimodels.bench selective_scan --device cuda

The baseline "expanded + Blelloch scan" is what a pure-PyTorch port of Mamba does (the approach
of ``mambapy``'s ``pscan``, written here from the algorithm): materialise Ā = exp(Δ A) and
B̄u = Δ B u as (b, d, l, n) tensors and scan them in log2(l) vectorised levels. Every row is a
speed-up over the reference and a multiple of two floors: bytes (every input of
``selective_scan.example_inputs`` read once: u, Δ, z, B, C and the small A, D, bias; y written
once, over the bandwidth of a large copy measured in the same run) and exps (b·d·l·n of
them, over the exp rate of a scalar loop measured in the same run: on the CPU, pip's Numba calls
libm's scalar exp, so the CPU kernel is exp-bound).

The peer a user would pick instead is ``mambapy`` itself (Mamba in pure PyTorch, its ``pscan``):
with the optional extra installed (``pip install -e '.[bench]'``) the table has a row of its own
code, forward and forward + backward; without it the table says that the peer is missing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from minimodels.bench import convert, copy_bandwidth, exp_rate, machine, measure, tensor_device
from minimodels.kernels import selective_scan as ss

__all__ = ["mambapy_pscan", "run", "selective_scan_mambapy", "selective_scan_pscan"]

MISSING_MAMBAPY = "mambapy not installed: pip install -e '.[bench]' for its pscan row"


def mambapy_pscan():
    """mambapy's own ``pscan(A, X)`` (inputs (b, l, d, n)), or None when it is not installed."""
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None
    return pscan


def selective_scan_pscan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False):
    """The selective scan with the (b, d, l, n) expansion materialised and scanned by
    Blelloch's algorithm (``parallel_scan``). Input-dependent B, C (b, n, l) only."""
    from minimodels.kernels.scan import parallel_scan

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


def selective_scan_mambapy(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False):
    """The selective scan as mambapy computes it (its ``selective_scan``: Ā and B̄u materialised
    channels-last, then its ``pscan``). Input-dependent B, C (b, n, l) only."""
    pscan = mambapy_pscan()
    if pscan is None:
        raise ImportError(MISSING_MAMBAPY)
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    delta = F.softplus(delta) if delta_softplus else delta  # (b, d, l)
    dt = delta.transpose(1, 2)  # (b, l, d)
    dA = torch.exp(dt[..., None] * A)  # (b, l, d, n)
    BX = (dt * u.transpose(1, 2))[..., None] * B.transpose(1, 2)[:, :, None, :]  # (b, l, d, n)
    hs = pscan(dA, BX)  # (b, l, d, n)
    y = (hs @ C.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)  # (b, d, l)
    if D is not None:
        y = y + D[:, None] * u
    return y * F.silu(z) if z is not None else y


def run(shape=None, device="cpu", dtype=None) -> str:
    """Time the forward (and forward+backward for the kernels; on a GPU also for the
    pscan-style baseline) at ``shape`` = (b, d, l, n), default ``selective_scan.example_inputs``'
    (1, 1536, 4096, 16) float32, with Δ through softplus as in a Mamba block."""
    dev = tensor_device(device)
    ex = ss.example_inputs(shape, device=dev, **({"dtype": dtype} if dtype else {}))
    ex = dataclasses.replace(ex, kwargs={**ex.kwargs, "delta_softplus": True})
    u, A = ex.args[0], ex.args[2]  # (b, d, l), (d, n)
    (b, d, l), n, dtype = u.shape, A.shape[1], u.dtype
    shape = (b, d, l, n)
    size = u.element_size()
    inputs = [x for x in (*ex.args, *ex.kwargs.values()) if isinstance(x, torch.Tensor)]
    nbytes = sum(x.numel() for x in inputs) * size + u.numel() * size  # every input; y
    floor_bytes = nbytes / copy_bandwidth(dev)
    exps = b * d * l * n
    floor_exp = exps / exp_rate(np.float32 if dtype == torch.float32 else np.float64) if (
        device == "cpu") else 0.0
    kernel = "cpu" if device == "cpu" else "cuda"
    with torch.no_grad():
        expected = convert(ex, torch.Tensor.double).call(ss.selective_scan, backend=kernel)

    def err(y):
        return f"max err {(y.double() - expected).abs().max().item():.1e}"

    rows = []

    def add(name, fn, note="", **t):
        with torch.no_grad():
            row = measure(name, fn, device, note, **t)
            row.note = f"{note}{'; ' if note else ''}{err(fn())}"
            rows.append(row)

    add("ref (Python loop over l)", lambda: ex.call(ss.selective_scan, backend="ref"),
        warmup=0, repeat=1, gpu_repeat=1)
    add("expanded + Blelloch scan (pscan-style)", lambda: ex.call(selective_scan_pscan),
        f"materialises {exps * size / 1e6:.0f} MB tensors", warmup=0, repeat=1, gpu_repeat=3)
    has_mambapy = mambapy_pscan() is not None
    if has_mambapy:
        add("mambapy pscan (its own code)", lambda: ex.call(selective_scan_mambapy),
            "the pure-PyTorch peer", warmup=1, repeat=3, gpu_repeat=5)
    add(f"minimodels {kernel} kernel", lambda: ex.call(ss.selective_scan, backend=kernel),
        repeat=5 if device == "cpu" else 20, warmup=2 if device == "cpu" else 3)

    def fwd_bwd(op, **kw):
        params = convert(ex, lambda t: t.detach().clone().requires_grad_())
        leaves = [x for x in (*params.args, *params.kwargs.values())
                  if isinstance(x, torch.Tensor)]

        def call():
            with torch.enable_grad():
                y = params.call(op, **kw)
                torch.autograd.grad(y.sum(), leaves)
            return y.detach()
        return call

    rows.append(measure(f"minimodels {kernel} kernel, forward+backward",
                        fwd_bwd(ss.selective_scan, backend=kernel), device, "not a forward",
                        repeat=5 if device == "cpu" else 20))
    if device == "cuda":
        rows.append(measure("pscan-style forward+backward", fwd_bwd(selective_scan_pscan),
                            device, "not a forward", repeat=5, gpu_repeat=3))
    if has_mambapy:
        rows.append(measure("mambapy pscan forward+backward", fwd_bwd(selective_scan_mambapy),
                            device, "not a forward", warmup=1, repeat=3, gpu_repeat=3))
    ref = rows[0].seconds
    gpu = any(r.gpu_seconds is not None for r in rows)
    lines = [
        f"selective_scan forward at (b, d, l, n) = {shape} {str(dtype)[6:]} on {device}: "
        f"{machine(device)}",
        f"bytes floor = {nbytes / 1e6:.0f} MB / measured copy bandwidth = "
        f"{floor_bytes * 1e3:.3g} ms" + (
            f"; exp floor = {exps / 1e6:.0f} M exps / measured scalar exp rate = "
            f"{floor_exp * 1e3:.3g} ms" if floor_exp else ""),
        "" if has_mambapy else MISSING_MAMBAPY,
        "",
        "| implementation | ms | speed-up vs ref | x bytes floor | x exp floor |"
        + (" GPU ms | GPU x bytes floor |" if gpu else "") + " note |",
        "|---|---:|---:|---:|---:|" + ("---:|---:|" if gpu else "") + "---|",
    ]
    for r in rows:
        x_exp = f"{r.seconds / floor_exp:.2f}" if floor_exp else "-"
        gpu_cells = ""
        if gpu:
            gpu_cells = (" - | - |" if r.gpu_seconds is None else
                         f" {r.gpu_seconds * 1e3:.3g} | {r.gpu_seconds / floor_bytes:.1f} |")
        lines.append(f"| {r.name} | {r.seconds * 1e3:.3g} | {ref / r.seconds:.3g}x | "
                     f"{r.seconds / floor_bytes:.1f} | {x_exp} |{gpu_cells} {r.note} |")
    return "\n".join(lines)
