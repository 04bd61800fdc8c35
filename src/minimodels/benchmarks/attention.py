"""Benchmark of ``attention``: ``python -m minimodels.bench attention [--device cuda]``."""

from __future__ import annotations

import statistics

import torch

from minimodels.backend import cuda_simulated
from minimodels.bench import (
    Row,
    format_table,
    interleaved,
    machine,
    measure,
    tensor_device,
    timeit,
)
from minimodels.kernels import attention as A
from minimodels.kernels.attention import cuda as attention_cuda

__all__ = ["FWD_BWD_SHAPE", "GPU_SHAPE", "fwd_bwd_rows", "matmul_rate", "run"]

GPU_SHAPE = (1, 16, 16384, 128)  # --device cuda default (b, h, l, e)
# forward + backward defaults: issue #15's target sizes
FWD_BWD_SHAPE = {"cpu": (1, 8, 2048, 64), "cuda": (1, 16, 8192, 128)}
ROUNDS = 5  # forward + backward: rounds of interleaved calls, the median of each kept


def matmul_rate(device="cpu", dtype=torch.float32, n: int = 2048) -> float:
    """FLOP/s of one large square matmul (2·n³ FLOPs) on ``device``: the attainable rate."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ a, device=device, repeat=5)


def run(shape=None, device="cpu", dtype=None) -> str:
    """CPU: kernel vs SDPA vs ref at ``attention.example_inputs``' (1, 8, 4096, 64), causal and
    not; then forward + backward (``fwd_bwd_rows``) at (1, 8, 2048, 64). CUDA: kernel vs SDPA
    float32 and bf16 at (1, 16, 16384, 128), causal and not, each row also in TFLOP/s; then
    forward + backward, kernel (both ways of making dq: ``fwd_bwd_rows``) vs SDPA, at
    (1, 16, 8192, 128). A given ``shape`` is used for both. The floor is 4·b·h·lq·lk·e FLOPs
    (halved when causal) over the measured matmul rate of the same device and dtype, 3.5 times
    that for forward + backward (the backward's five products to the forward's two)."""
    F = torch.nn.functional
    bwd_shape = FWD_BWD_SHAPE[device] if shape is None else shape
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
    bwd_ex = A.example_inputs(bwd_shape, device=dev, **({"dtype": dtype} if dtype else {}))
    out.append("")
    out.append(fwd_bwd_rows(bwd_ex, device, rate))
    return "\n".join(out)


def _with_threads(n: int, fn):
    def call():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(before)
    return call


def _with_bwd_dq(mode: str, fn):
    """fn with the CUDA backward's dq made the ``mode`` way (``attention_cuda.BWD_DQ``)."""
    def call():
        before = attention_cuda.BWD_DQ
        attention_cuda.BWD_DQ = mode
        try:
            fn()
        finally:
            attention_cuda.BWD_DQ = before
    return call


def fwd_bwd_rows(ex, device: str, rate: float) -> str:
    """Forward + backward (the gradients of q, k, v for a fixed cotangent of out), causal and
    not: SDPA (on the CPU at its best torch thread count, 1 or 2), the minimodels kernel
    (FlashAttention-2's backward; on CUDA both ways of making dq, ``attention_cuda.BWD_DQ``:
    its own kernel, and atomic adds from the dkv kernel) and, on the CPU, the reference
    (materialised scores). Interleaved rounds; each row's median, its spread (min-max) in the
    note."""
    F = torch.nn.functional
    q, k, v = ex.args[:3]
    (b, h, lq, e), lk = q.shape, k.shape[2]
    kernel = "cpu" if device == "cpu" else "cuda"
    g = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1)).to(
        q.device)  # (b, h, lq, e)
    simulated = device == "cuda" and cuda_simulated()

    def fwd_bwd(fn):
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        torch.autograd.grad(fn(*xs), xs, g)

    lines = [f"forward + backward at {tuple(q.shape)}: interleaved, median of {ROUNDS} rounds"
             + ("" if device != "cpu" else "; SDPA at its best torch thread count")]
    for causal in (False, True):
        sdpa = lambda *x, c=causal: F.scaled_dot_product_attention(*x, is_causal=c)
        fns = {}
        threads = (1, 2) if device == "cpu" else (torch.get_num_threads(),)
        for n in threads:
            fns[f"SDPA {n}"] = _with_threads(n, lambda f=sdpa: fwd_bwd(f))
        fns["kernel"] = lambda c=causal: fwd_bwd(
            lambda *x: A.attention(*x, causal=c, backend=kernel))
        if device == "cuda":  # both ways of making dq, interleaved with the rest
            fns["atomic"] = _with_bwd_dq("atomic", fns["kernel"])
            fns["kernel"] = _with_bwd_dq("separate", fns["kernel"])
        if device == "cpu":
            fns["ref"] = lambda c=causal: fwd_bwd(
                lambda *x: A.attention(*x, causal=c, backend="ref"))
        times = interleaved(fns, device=tensor_device(device), rounds=1 if simulated else ROUNDS)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        best = min(threads, key=lambda n: med[f"SDPA {n}"])

        def spread(name, times=times):
            return f"spread {min(times[name]) * 1e3:.3g}-{max(times[name]) * 1e3:.3g} ms"

        rows = [Row("SDPA fwd+bwd", med[f"SDPA {best}"], (
            f"{best} torch thread{'s' if best > 1 else ''}; " if device == "cpu" else "")
            + spread(f"SDPA {best}"))]
        rows.append(Row(f"minimodels {kernel} kernel fwd+bwd", med["kernel"],
                        f"{med['kernel'] / rows[0].seconds:.2f}x SDPA's time; "
                        + spread("kernel")))
        if device == "cuda":
            rows.append(Row("minimodels cuda kernel fwd+bwd (atomic dq)", med["atomic"],
                            f"{med['atomic'] / rows[0].seconds:.2f}x SDPA's time; "
                            + spread("atomic")))
        if device == "cpu":
            rows.append(Row("ref fwd+bwd (materialised scores)", med["ref"],
                            f"{med['ref'] / rows[0].seconds:.2f}x SDPA's time; " + spread("ref")))
        floor = 3.5 * 4 * b * h * lq * lk * e / (2 if causal else 1) / rate
        lines += ["", f"causal={causal}, forward + backward: FLOP floor {floor * 1e3:.3g} ms; "
                  "ratios are against SDPA", "",
                  format_table(rows, reference="SDPA fwd+bwd", floor_seconds=floor)]
    return "\n".join(lines)
