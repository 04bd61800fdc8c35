"""Benchmarks: time kernels against their reference and the peers a user would pick instead.

    python -m minimodels.bench scan                  # CPU, (8, 1024, 4096) float32
    python -m minimodels.bench scan --device cuda --shape 8,4096,8192

Every row is reported as milliseconds, as a ratio to the reference and as a multiple of the
memory floor: the bytes the op must move (each input read once, each output written once)
over the bandwidth of a large copy measured on the same device in the same run. Absolute
times mean little on shared machines; ratios in one run do.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Row", "bench_attention", "copy_bandwidth", "format_table", "matmul_rate", "sweep",
           "timeit"]


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeat: int = 7,
    max_seconds: float = 10.0,
) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` calls (JIT compilation, caches),
    synchronising CUDA around each call. Stops repeating early once ``max_seconds`` is spent."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times, spent = [], 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if spent > max_seconds:
            break
    return statistics.median(times)


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 1 << 30) -> float:
    """Bytes per second of a large copy into a preallocated buffer (bytes read + written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timeit(lambda: dst.copy_(src), device=device, repeat=9)
    return 2 * nbytes / seconds


def sweep(
    fn: Callable[[int], Callable[[], object]],
    lengths: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    **timeit_kwargs,
) -> list[float]:
    """Seconds for ``fn(l)()`` at each sequence length ``l`` (``fn`` builds inputs, returns the
    call to time)."""
    return [timeit(fn(l), device=device, **timeit_kwargs) for l in lengths]


@dataclass
class Row:
    name: str
    seconds: float
    note: str = ""


def format_table(rows: Sequence[Row], *, reference: str, floor_seconds: float) -> str:
    """A Markdown table: ms, speed-up over ``reference`` and multiple of the floor."""
    ref = next(r.seconds for r in rows if r.name == reference)
    lines = [
        "| implementation | ms | speed-up vs ref | x floor | note |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.seconds * 1e3:.3g} | {ref / r.seconds:.3g}x | "
            f"{r.seconds / floor_seconds:.2f} | {r.note} |"
        )
    return "\n".join(lines)


def machine(device: str) -> str:
    """A one-line description of where the numbers were taken."""
    if torch.device(device).type == "cuda":
        what = torch.cuda.get_device_name()
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


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


def bench_scan(shape=(8, 1024, 4096), device="cpu", dtype=torch.float32) -> str:
    from minimodels.kernels import scan

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


# =============================================================================================
# attention: the tiled kernels against SDPA and the reference, in multiples of the FLOP floor
# =============================================================================================


def matmul_rate(device="cpu", dtype=torch.float32, n: int = 2048) -> float:
    """FLOP/s of one large square matmul (2·n³ FLOPs) on ``device``: the attainable rate."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ a, device=device, repeat=5)


def bench_attention(shape=None, device="cpu", dtype=torch.float32) -> str:
    """CPU: kernel vs SDPA vs ref at (1, 8, 4096, 64), causal and not. CUDA: kernel vs SDPA
    float32 and bf16 at (1, 16, 16384, 128), non-causal. The floor is 4·b·h·lq·lk·e FLOPs
    (halved when causal) over the measured matmul rate of the same device and dtype."""
    from minimodels.kernels.attention import attention

    F = torch.nn.functional
    shape = shape or ((1, 8, 4096, 64) if device == "cpu" else (1, 16, 16384, 128))
    b, h, l, e = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
    rate = matmul_rate(device, dtype)
    out = [f"attention at {shape} {str(dtype)[6:]} on {device}: {machine(device)}",
           f"matmul rate {rate / 1e9:.0f} GFLOP/s (2048² {str(dtype)[6:]})"]
    kernel = "cpu" if device == "cpu" else "cuda"
    for causal in ([False, True] if device == "cpu" else [False]):
        floor = 4 * b * h * l * l * e / (2 if causal else 1) / rate
        rows = [Row("SDPA", timeit(lambda c=causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=c), device=device, repeat=3))]
        rows.append(Row(f"minimodels {kernel} kernel", timeit(
            lambda c=causal: attention(q, k, v, causal=c, backend=kernel), device=device,
            repeat=3), "tiled, online softmax"))
        if device == "cpu":
            rows.append(Row("ref (materialised scores)", timeit(
                lambda c=causal: attention(q, k, v, causal=c, backend="ref"), device=device,
                warmup=1, repeat=3)))
        else:
            qb, kb, vb = (x.bfloat16() for x in (q, k, v))
            rows.append(Row("SDPA bf16", timeit(
                lambda a=qb, b_=kb, c=vb: F.scaled_dot_product_attention(a, b_, c),
                device=device),
                "tensor cores, other dtype"))
        for row in rows[1:]:  # the column "speed-up vs ref" is relative to SDPA here
            ratio = f"{row.seconds / rows[0].seconds:.2f}x SDPA's time"
            row.note = f"{row.note}; {ratio}" if row.note else ratio
        out += ["", f"causal={causal}: FLOP floor {floor * 1e3:.3g} ms; ratios are against SDPA",
                "", format_table(rows, reference="SDPA", floor_seconds=floor)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimodels.bench")
    parser.add_argument("kernel", choices=["scan", "attention"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default=None, help="batch,d,l (default 8,1024,4096)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    if args.kernel == "attention":
        shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else None
        print(bench_attention(shape, args.device, getattr(torch, args.dtype)))
        return 0
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else (8, 1024, 4096)
    print(bench_scan(shape, args.device, getattr(torch, args.dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
