"""Benchmark of ``linear_scan``: ``python -m minimodels.bench scan [--device cuda]``."""

from __future__ import annotations

import torch

from minimodels.bench import convert, copy_bandwidth, format_table, machine, measure, tensor_device
from minimodels.kernels import scan

__all__ = ["run", "scan_torch_associative", "scan_torch_chunked"]


# =============================================================================================
# Peers for linear_scan: what a user would write in plain PyTorch instead of a kernel
# =============================================================================================


def scan_torch_chunked(a, b, h0=None, chunk: int = 32):
    """h_t = a_t h_{t-1} + b_t with torch ops only: within chunks of ``chunk`` steps,
    h = A ⊙ (carry + cumsum(b / A)) with A = cumprod(a); a Python loop carries across chunks.
    Exact in exact arithmetic; for a ≈ 0 the division by A loses accuracy (why kernels exist)."""
    batch, d, l = a.shape
    pad = (-l) % chunk
    a = torch.nn.functional.pad(a, (0, pad), value=1.0).view(batch, d, -1, chunk)
    b = torch.nn.functional.pad(b, (0, pad)).view(batch, d, -1, chunk)
    A = torch.cumprod(a, dim=-1)  # (b, d, nc, chunk)
    local = A * torch.cumsum(b / A, dim=-1)  # chunk scans started from zero
    carry = torch.zeros(batch, d, dtype=a.dtype, device=a.device) if h0 is None else h0
    out = torch.empty_like(local)
    for c in range(local.shape[2]):
        out[:, :, c] = local[:, :, c] + A[:, :, c] * carry[..., None]
        carry = out[:, :, c, -1]
    return out.view(batch, d, -1)[..., :l]


def scan_torch_associative(a, b, h0=None):
    """torch's own higher-order ``associative_scan`` over the pairs (a, b), combine
    (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2). ``generic`` mode runs eagerly on any device."""
    from torch._higher_order_ops.associative_scan import associative_scan

    if h0 is not None:
        b = b.clone()
        b[..., 0] += a[..., 0] * h0

    def combine(x, y):
        return x[0] * y[0], y[0] * x[1] + y[1]

    mode = "pointwise" if a.is_cuda else "generic"
    return associative_scan(combine, (a, b), dim=-1, combine_mode=mode)[1]


GPU_SHAPE = (8, 4096, 8192)  # --device cuda default: large enough to fill an H200


def run(shape=None, device="cpu", dtype=None) -> str:
    """linear_scan vs its reference and plain-PyTorch peers at (batch, d, l), default
    ``scan.example_inputs``' (8, 1024, 4096) on the CPU and (8, 4096, 8192) on a GPU, float32,
    as speed-ups and multiples of the memory floor."""
    if shape is None and device == "cuda":
        shape = GPU_SHAPE
    ex = scan.example_inputs(shape, device=tensor_device(device),
                             **({"dtype": dtype} if dtype else {}))
    a = ex.args[0]  # (b, d, l)
    shape, dtype = tuple(a.shape), a.dtype
    nbytes = 3 * a.numel() * a.element_size()  # read a, b; write h
    floor = nbytes / copy_bandwidth(tensor_device(device))
    kernel = "cpu" if device == "cpu" else "cuda"
    expected = convert(ex, torch.Tensor.double).call(scan.linear_scan, backend=kernel)

    def error(h):
        return f"max err {(h.double() - expected).abs().max().item():.1e}"

    rows = []

    def add(name, fn, note="", exact=True, **kw):
        row = measure(name, fn, device, note, **kw)
        if exact:  # a scan: report its error against the float64 kernel
            row.note = f"{note}{'; ' if note else ''}{error(fn())}"
        rows.append(row)

    add("ref (Python loop over l)", lambda: ex.call(scan.linear_scan, backend="ref"),
        warmup=1, repeat=3, gpu_repeat=2)
    add("torch associative_scan", lambda: ex.call(scan_torch_associative), warmup=1, repeat=3,
        gpu_repeat=2)
    add("torch chunked cumprod/cumsum", lambda: ex.call(scan_torch_chunked))
    add(f"minimodels {kernel} kernel", lambda: ex.call(scan.linear_scan, backend=kernel),
        "output allocated per call")
    out = torch.empty_like(a)
    add(f"minimodels {kernel} kernel, preallocated out",
        lambda: ex.call(scan.linear_scan, backend=kernel, out=out), "kernel alone")
    b = ex.args[1]
    add("torch.addcmul(b, a, a)", lambda: torch.addcmul(b, a, a),
        "not a scan: one out-of-place op moving the same bytes", exact=False)
    header = (
        f"linear_scan at {shape} {str(dtype)[6:]} on {device}: {machine(device)}\n"
        f"memory floor = {nbytes / 1e6:.0f} MB / {nbytes / floor / 1e9:.0f} GB/s (measured "
        f"copy) = {floor * 1e3:.3g} ms\n\n"
    )
    return header + format_table(rows, reference=rows[0].name, floor_seconds=floor)
