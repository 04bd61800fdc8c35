"""Benchmark of ``linear_scan``: ``python -m minimodels.bench scan [--device cuda]``."""

from __future__ import annotations

import torch

from minimodels.bench import Row, copy_bandwidth, format_table, machine, timeit
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


def run(shape=None, device="cpu", dtype=None) -> str:
    """linear_scan vs its reference and plain-PyTorch peers at (batch, d, l), default
    (8, 1024, 4096) float32, as speed-ups and multiples of the memory floor."""
    shape = tuple(shape or (8, 1024, 4096))
    dtype = dtype or torch.float32

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.empty(shape, dtype=dtype, device=device).uniform_(0.5, 1.0, generator=gen)
    b = torch.empty(shape, dtype=dtype, device=device).normal_(generator=gen)
    h0 = torch.randn(shape[:2], dtype=dtype, device=device, generator=gen)
    nbytes = 3 * a.numel() * a.element_size()  # read a, b; write h
    floor = nbytes / copy_bandwidth(device)
    expected = scan.linear_scan(a.double(), b.double(), h0.double(), backend="cpu"
                                if device == "cpu" else "cuda")

    def error(h):
        return f"max err {(h.double() - expected).abs().max().item():.1e}"

    rows = []

    def add(name, fn, note="", exact=True, **kw):
        seconds = timeit(fn, device=device, **kw)
        if exact:  # a scan: report its error against the float64 kernel
            note = f"{note}{'; ' if note else ''}{error(fn())}"
        rows.append(Row(name, seconds, note))

    add("ref (Python loop over l)", lambda: scan.linear_scan(a, b, h0, backend="ref"),
        warmup=1, repeat=3)
    add("torch associative_scan", lambda: scan_torch_associative(a, b, h0), warmup=1, repeat=3)
    add("torch chunked cumprod/cumsum", lambda: scan_torch_chunked(a, b, h0))
    backends = ["cpu"] if device == "cpu" else ["cuda"]
    for name in backends:
        add(f"minimodels {name} kernel", lambda n=name: scan.linear_scan(a, b, h0, backend=n),
            "output allocated per call")
    if device == "cpu":
        out_np = torch.empty_like(a).view(-1, shape[-1])
        args = [t.contiguous().view(-1, shape[-1]).numpy() for t in (a, b)]
        args.insert(2, h0.reshape(-1).numpy())

        def prealloc():
            scan._linear_scan_cpu_fwd(*args, out_np.numpy())
            return out_np.view(shape)

        add("minimodels cpu kernel, preallocated out", prealloc, "kernel alone")
    add("torch.addcmul(b, a, a)", lambda: torch.addcmul(b, a, a),
        "not a scan: one out-of-place op moving the same bytes", exact=False)
    header = (
        f"linear_scan at {tuple(shape)} {str(dtype)[6:]} on {device}: {machine(device)}\n"
        f"memory floor = {nbytes / 1e6:.0f} MB / {nbytes / floor / 1e9:.0f} GB/s (measured "
        f"copy) = {floor * 1e3:.3g} ms\n\n"
    )
    return header + format_table(rows, reference=rows[0].name, floor_seconds=floor)
