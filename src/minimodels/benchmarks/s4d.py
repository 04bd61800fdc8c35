"""Benchmark of ``s4d_kernel``: the materialised reference against the power-recurrence kernels.

    run()                                   # CPU, (h, n, L) = (1536, 32, 4096), complex64
    run(device="cuda")                      # adds the numba.cuda kernel

Inputs come from ``ssm_kernel.example_inputs``. The floor counts the work each approach cannot
avoid. The reference evaluates one complex exp per (h, n, l); on the CPU pip's Numba and torch
call a scalar exp, cos and sin for it, so its floor is h·n·L complex exps over the measured
complex-exp rate (a tiny njit loop, times the threads). The kernels need
h·n·(2 + L/(BLOCK·REANCHOR)) exps, h·n·L complex multiply-adds (4 FLOPs each:
K += Re(a)·Re(t) − Im(a)·Im(t)) and one write of K; their floor is the largest of exps / exp
rate, FLOPs / matmul rate and bytes / copy bandwidth, all measured in the same run.
"""

from __future__ import annotations

import cmath
import math

import numpy as np
import torch
from numba import get_num_threads, njit

from minimodels.bench import (
    copy_bandwidth,
    format_table,
    machine,
    measure,
    tensor_device,
    timeit,
)
from minimodels.benchmarks.attention import matmul_rate  # the attainable FLOP rate
from minimodels.kernels import ssm_kernel as sk

__all__ = ["complex_exp_rate", "run"]

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


@njit(cache=True)
def _cexp_loop(z, out):
    for i in range(z.size):
        out[i] = cmath.exp(z[i])


def complex_exp_rate(size: int = 1 << 20) -> float:
    """Complex exps per second on this CPU: one thread's rate in a scalar njit loop (no vector
    math library in pip's Numba), times Numba's thread count."""
    rng = np.random.default_rng(0)
    z = (rng.uniform(-2, 0, size) + 1j * rng.uniform(-50, 50, size)).astype(np.complex128)
    out = np.empty_like(z)
    seconds = timeit(lambda: _cexp_loop(z, out), repeat=5)
    return size / seconds * get_num_threads()


def run(shape=None, device="cpu", dtype=None) -> str:
    """Markdown table: reference, cpu kernel (and cuda kernel on ``device="cuda"``), with
    time, speed-up over the reference, multiple of the floor and relative error (max |K − K64|
    / max |K64| against the float64 reference, on the first 64 channels). Defaults:
    ``ssm_kernel.example_inputs``' (h, n, L) = (1536, 32, 4096), complex64."""
    dev = tensor_device(device)
    ex = sk.example_inputs(shape, device=dev, **({"dtype": dtype} if dtype else {}))
    A, C, dt = ex.args[:3]  # (h, n), (h, n), (h,)
    L = ex.args[3] if len(ex.args) > 3 else ex.kwargs["L"]
    (h, n), dtype = A.shape, A.dtype
    shape = (h, n, L)
    check = min(h, 64)
    want = sk.s4d_kernel(A[:check].to(torch.complex128), C[:check].to(torch.complex128),
                         dt[:check].double(), L, backend="ref")

    def rel_error(K):
        return ((K[:check].double() - want).abs().max() / want.abs().max()).item()

    rows = []

    def add(name, backend, note, **kw):
        K = ex.call(sk.s4d_kernel, backend=backend)
        row = measure(name, lambda: ex.call(sk.s4d_kernel, backend=backend), device,
                      f"{note}; rel. error {rel_error(K):.1e}", **kw)
        rows.append(row)
        del K

    # the reference materialises (h, n, L) complex: a few GB at full size, so time it once
    add("ref (materialised, one complex exp per element)", "ref",
        f"{h * n * L * torch.empty((), dtype=dtype).element_size() / 1e9:.1f} GB of powers",
        warmup=0, repeat=1, gpu_repeat=1)
    kernel_exps = h * n * (2 + math.ceil(L / (sk.BLOCK * sk.REANCHOR)))
    if device == "cpu":
        add("minimodels cpu kernel", "cpu", f"{kernel_exps / 1e6:.2f} M exps", warmup=1,
            repeat=5)
    else:
        add("minimodels cuda kernel", "cuda",
            f"grid ({math.ceil(L / (sk.THREADS * sk.ITEMS))}, {h}) x {sk.THREADS} threads",
            warmup=10, repeat=200)
    # forward + backward: the gradients of A, C and Δ for a fixed cotangent of K (issue #15:
    # within 3x the forward); the kernel's own backward, no reference in the loop
    backend = "cpu" if device == "cpu" else "cuda"
    leaves = [t.detach().requires_grad_() for t in (A, C, dt)]
    K = sk.s4d_kernel(*leaves, L, backend=backend)
    cot = torch.randn(K.shape, dtype=K.dtype, device=K.device, generator=torch.Generator(
        K.device).manual_seed(1))

    def fwd_bwd():
        return torch.autograd.grad(sk.s4d_kernel(*leaves, L, backend=backend), leaves, cot)

    del K
    both = measure(f"minimodels {backend} kernel, forward+backward", fwd_bwd, device,
                   "not a forward", warmup=1 if device == "cpu" else 5,
                   repeat=5 if device == "cpu" else 50)
    fwd = rows[-1]
    ratio = (both.gpu_seconds / fwd.gpu_seconds if both.gpu_seconds and fwd.gpu_seconds
             else both.seconds / fwd.seconds)
    both.note += f"; {ratio:.2f}x the forward's {'GPU ' if both.gpu_seconds else ''}time"
    rows.append(both)
    flops = 4 * h * n * L
    nbytes = h * L * torch.empty((), dtype=_REAL[dtype]).element_size()
    rate, bandwidth = matmul_rate(dev, _REAL[dtype]), copy_bandwidth(dev, 1 << 28)
    lines = [f"s4d_kernel at (h, n, L) = {shape} {str(dtype)[6:]} on {device}: {machine(device)}"]
    if device == "cpu":
        exp_rate = complex_exp_rate()
        floor_ref = h * n * L / exp_rate
        floors = {"exps": kernel_exps / exp_rate, "FLOPs": flops / rate,
                  "bytes": nbytes / bandwidth}
        lines.append(f"complex exp rate {exp_rate / 1e6:.0f} M/s ({get_num_threads()} threads, "
                     f"scalar njit loop): the reference's exp floor is {floor_ref * 1e3:.0f} ms")
    else:
        floors = {"FLOPs": flops / rate, "bytes": nbytes / bandwidth}
    floor = max(floors.values())
    lines.append("kernel floor = max(" + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in
                                                  floors.items())
                 + f") with {flops / 1e9:.2f} GFLOP at {rate / 1e9:.0f} GFLOP/s (matmul), "
                 f"{nbytes / 1e6:.0f} MB at {bandwidth / 1e9:.0f} GB/s (copy)")
    lines += ["", format_table(rows, reference=rows[0].name, floor_seconds=floor)]
    return "\n".join(lines)
