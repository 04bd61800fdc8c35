"""Benchmark of ``monarch_multiply``: ``python -m minimodels.bench monarch [--device cuda]``.

On the CPU at the canonical size (4096 tokens, n = 4096, 64 blocks of 64 x 64, float32), on a
GPU at issue #16's (32768 tokens, same blocks), against the peers a user would write: the
reference (einsum), the torch.bmm formulation (two batched matrix products with the
permutations as copies in between; on a GPU also in bf16, inputs cast once outside the timing,
its error against the float64 truth in its note, and in float32 with cuBLAS allowed TF32), the
course's own kernel on the CUDA cores (as on GPUs before sm_80) and, on sm_90 (where the kernel
multiplies by the warpgroup instruction wgmma where it is faster), by mma.sync alone (as on
sm_80) and fused in one launch (thread-block clusters: z never in global memory), and the dense
F.linear of the same size (n² weights). The floor: the bytes (read x, write y)
over the measured copy bandwidth; the FLOPs (2·n·√n multiply-adds per token) are printed
beside it. Implementations are timed interleaved, round after round, and the median of the
rounds is kept (the machine is shared). Targets (#16): CPU, kernel <= 1.5x torch.bmm and >= 3x
faster than dense; GPU, kernel under 1 ms and faster than the bf16 bmm formulation.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from minimodels.bench import (
    Row,
    copy_bandwidth,
    format_table,
    gpu_time,
    gpu_times,
    interleaved,
    machine,
    real_gpu,
    spread,
    tensor_device,
    verdict,
)
from minimodels.kernels import monarch as M

__all__ = ["GPU_SHAPE", "bmm_monarch", "run"]

# issue #16's GPU size (b, k, q, p, l, s): 32768 tokens, n = 4096, 64 blocks of 64 x 64
GPU_SHAPE = (32768, 64, 64, 64, 64, 64)


def bmm_monarch(x, w1, w2):
    """The Monarch product as two ``torch.bmm`` calls and three copies: x (b, n) -> y (b, l·s)."""
    b = x.shape[0]
    k, q, p = w1.shape
    l, s, r = w2.shape
    xb = x.reshape(b, k, p).transpose(0, 1)  # (k, b, p)
    z = torch.bmm(xb, w1.transpose(1, 2))  # (k, b, q)
    z = z.transpose(0, 1).reshape(b, r, l).permute(2, 0, 1)  # P1: (l, b, r)
    y = torch.bmm(z, w2.transpose(1, 2))  # (l, b, s)
    return y.permute(1, 2, 0).reshape(b, s * l)  # P2: (b, l·s)


def _tf32(fn, *args):
    """``fn(*args)`` with cuBLAS allowed to round float32 inputs to TF32 (one TF32 product: ~10
    bits of precision, the speed a user gets from ``allow_tf32``)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return fn(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _on(engine, x, w1, w2):
    """The CUDA kernel on another engine: "simt" (the CUDA cores, as GPUs before sm_80 run it),
    "mma" (mma.sync alone, as sm_80 runs it) or "fused" (one launch in thread-block clusters,
    sm_90)."""
    from minimodels.kernels.monarch.cuda import forced_engine

    with forced_engine(engine):
        return M.monarch_multiply(x, w1, w2, backend="cuda")


def run(shape=None, device="cpu", dtype=None) -> str:
    """Markdown table: ref, torch.bmm (and in bf16 on cuda), the kernel (cpu, or cuda on a GPU),
    dense F.linear; then the targets of #16 for the device."""
    dev = tensor_device(device)
    gpu = device == "cuda"
    shape = GPU_SHAPE if shape is None and gpu else shape
    ex = M.example_inputs(shape, device=dev, **({"dtype": dtype} if dtype else {}))
    x, w1, w2 = ex.args
    b, n = x.shape
    l, s, _ = w2.shape
    kernel = "cuda" if gpu else "cpu"
    # the CPU kernel fuses both factors per token; the GPU's runs each factor token-tiled, in
    # float32 on tensor cores (3xTF32) where the GPU has them
    ours_name = f"minimodels {kernel} kernel ({'token-tiled' if gpu else 'fused'})"
    dense = M.monarch_matrix(w1, w2)  # (l·s, n): the same map as a dense weight
    with torch.no_grad():
        truth = M.monarch_multiply(x.double(), w1.double(), w2.double(), backend="ref")
        fns = {"ref (einsum)": lambda: M.monarch_multiply(x, w1, w2, backend="ref"),
               "torch.bmm formulation": lambda: bmm_monarch(x, w1, w2)}
        if gpu:  # cast once, outside the timing
            x16, w1_16, w2_16 = (t.bfloat16() for t in (x, w1, w2))
            fns["torch.bmm formulation, bf16"] = lambda: bmm_monarch(x16, w1_16, w2_16)
            fns["torch.bmm formulation, TF32"] = lambda: _tf32(bmm_monarch, x, w1, w2)
            fns["minimodels cuda kernel, CUDA cores (SIMT)"] = lambda: _on("simt", x, w1, w2)
            if real_gpu() and torch.cuda.get_device_capability() >= (9, 0):
                fns["minimodels cuda kernel, mma.sync only (as on sm_80)"] = lambda: _on(
                    "mma", x, w1, w2)
                fns["minimodels cuda kernel, fused in clusters"] = lambda: _on("fused", x, w1, w2)
        fns[ours_name] = lambda: M.monarch_multiply(x, w1, w2, backend=kernel)
        fns["dense F.linear (n² weights)"] = lambda: F.linear(x, dense)
        secs = {name: statistics.median(t)
                for name, t in interleaved(fns, rounds=7, device=dev).items()}
        errs = {name: (fn().double() - truth).abs().max().item() for name, fn in fns.items()}
        gpu_secs, ours_runs = {}, None
        if real_gpu() and gpu:  # the kernel in 5 profiles: its spread
            gpu_secs = {name: gpu_time(fn) for name, fn in fns.items() if name != ours_name}
            ours_runs = gpu_times(fns[ours_name], rounds=5, repeat=10)
            gpu_secs[ours_name] = statistics.median(ours_runs)
    flops = 2 * b * (w1.numel() + w2.numel())
    nbytes = (x.numel() + b * l * s) * x.element_size()
    bw = copy_bandwidth(dev)
    floor = nbytes / bw
    rows = [Row(name, t, f"max err {errs[name]:.1e}", gpu_secs.get(name))
            for name, t in secs.items()]
    ours = secs[ours_name]
    if gpu:  # judged on the GPU time where there is one (the kernels alone), else the wall
        t = gpu_secs or secs
        ours, bf16 = t[ours_name], t["torch.bmm formulation, bf16"]
        kind = "GPU time" if gpu_secs else "wall"
        said = (f"GPU targets, by {kind}: kernel < 1 ms: "
                f"{spread(ours_runs) if ours_runs else f'{ours * 1e3:.3g} ms'} "
                f"({verdict(ours_runs or [ours], 1e-3)}); kernel faster than bf16 bmm: bf16 "
                f"bmm / kernel = {bf16 / ours:.2f} (target > 1: "
                f"{verdict(ours_runs or [ours], bf16)})")
    else:
        said = (f"kernel / torch.bmm: {ours / secs['torch.bmm formulation']:.2f} (target <= "
                f"1.5); dense F.linear / kernel: "
                f"{secs['dense F.linear (n² weights)'] / ours:.1f}x (target >= 3)")
    lines = [f"monarch_multiply at x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 "
             f"{tuple(w2.shape)}, {str(x.dtype)[6:]} on {device}: {machine(device)}",
             f"{flops / 1e9:.2f} GFLOP; memory floor = {nbytes / 1e6:.0f} MB / {bw / 1e9:.0f} "
             f"GB/s = {floor * 1e3:.3g} ms; timed interleaved, median of 7 rounds", "",
             format_table(rows, reference="ref (einsum)", floor_seconds=floor), "",
             f"{said}; kernel {flops / ours / 1e9:.1f} GFLOP/s"]
    return "\n".join(lines)
