"""Benchmark of ``attention``: ``python -m minimodels.bench attention [--device cuda]``."""

from __future__ import annotations

import torch

from minimodels.bench import format_table, machine, measure, tensor_device, timeit
from minimodels.kernels import attention as A

__all__ = ["GPU_SHAPE", "matmul_rate", "run"]

GPU_SHAPE = (1, 16, 16384, 128)  # --device cuda default (b, h, l, e)


def matmul_rate(device="cpu", dtype=torch.float32, n: int = 2048) -> float:
    """FLOP/s of one large square matmul (2·n³ FLOPs) on ``device``: the attainable rate."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ a, device=device, repeat=5)


def run(shape=None, device="cpu", dtype=None) -> str:
    """CPU: kernel vs SDPA vs ref at ``attention.example_inputs``' (1, 8, 4096, 64), causal and
    not. CUDA: kernel vs SDPA float32 and bf16 at (1, 16, 16384, 128), causal and not, each row
    also in TFLOP/s. The floor is 4·b·h·lq·lk·e FLOPs (halved when causal) over the measured
    matmul rate of the same device and dtype."""
    F = torch.nn.functional
    if shape is None and device == "cuda":
        shape = GPU_SHAPE
    dev = tensor_device(device)
    ex = A.example_inputs(shape, device=dev, **({"dtype": dtype} if dtype else {}))
    q, k, v = ex.args[:3]  # (b, h, l, e)
    (b, h, lq, e), lk, dtype = q.shape, k.shape[2], q.dtype
    rate = matmul_rate(dev, dtype)
    out = [f"attention at {tuple(q.shape)} {str(dtype)[6:]} on {device}: {machine(device)}",
           f"matmul rate {rate / 1e9:.0f} GFLOP/s (2048² {str(dtype)[6:]})"]
    kernel = "cpu" if device == "cpu" else "cuda"
    for causal in (False, True):
        flops = 4 * b * h * lq * lk * e / (2 if causal else 1)
        floor = flops / rate
        rows = [measure("SDPA", lambda c=causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=c), device, repeat=3)]
        rows.append(measure(f"minimodels {kernel} kernel", lambda c=causal: ex.call(
            A.attention, causal=c, backend=kernel), device, "tiled, online softmax", repeat=3))
        if device == "cpu":
            rows.append(measure("ref (materialised scores)", lambda c=causal: ex.call(
                A.attention, causal=c, backend="ref"), device, warmup=1, repeat=3))
        else:
            qkv = tuple(x.bfloat16() for x in (q, k, v))
            rows.append(measure("SDPA bf16", lambda c=causal, x=qkv: F.scaled_dot_product_attention(
                *x, is_causal=c), device, "tensor cores, other dtype"))
        for row in rows[1:]:  # the column "speed-up vs ref" is relative to SDPA here
            ratio = f"{row.seconds / rows[0].seconds:.2f}x SDPA's time"
            row.note = f"{row.note}; {ratio}" if row.note else ratio
        if device == "cuda":  # the GPU's usual unit: attained FLOP rate
            for row in rows:
                seconds, clock = ((row.seconds, "wall") if row.gpu_seconds is None else
                                  (row.gpu_seconds, "GPU time"))
                rate_note = f"{flops / seconds / 1e12:.1f} TFLOP/s ({clock})"
                row.note = f"{row.note}; {rate_note}" if row.note else rate_note
        out += ["", f"causal={causal}: FLOP floor {floor * 1e3:.3g} ms; ratios are against SDPA",
                "", format_table(rows, reference="SDPA", floor_seconds=floor)]
    return "\n".join(out)
