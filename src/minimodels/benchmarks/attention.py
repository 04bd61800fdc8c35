"""Benchmark of ``attention``: ``python -m minimodels.bench attention [--device cuda]``."""

from __future__ import annotations

import torch

from minimodels.bench import Row, format_table, machine, timeit
from minimodels.kernels.attention import attention

__all__ = ["matmul_rate", "run"]


def matmul_rate(device="cpu", dtype=torch.float32, n: int = 2048) -> float:
    """FLOP/s of one large square matmul (2·n³ FLOPs) on ``device``: the attainable rate."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ a, device=device, repeat=5)


def run(shape=None, device="cpu", dtype=None) -> str:
    """CPU: kernel vs SDPA vs ref at (1, 8, 4096, 64), causal and not. CUDA: kernel vs SDPA
    float32 and bf16 at (1, 16, 16384, 128), non-causal. The floor is 4·b·h·lq·lk·e FLOPs
    (halved when causal) over the measured matmul rate of the same device and dtype."""
    dtype = dtype or torch.float32
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
