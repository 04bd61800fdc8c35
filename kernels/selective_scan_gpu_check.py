"""Check and time the selective-scan CUDA kernels on a real GPU (not the simulator).

    python kernels/selective_scan_gpu_check.py            # correctness, then timings

1. Correctness against autograd of the reference (float64 and float32, random inputs, both B/C
   layouts, with and without D, z, delta_bias, softplus; forward, x_L and all gradients).
2. Timings at (b, d, l, n) = (1, 1536, 4096, 16) float32: forward and forward+backward of the
   kernel, the pscan-style PyTorch baseline and the reference, with CUDA events (median).
"""

from __future__ import annotations

import os
import sys

import torch

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    sys.exit("unset NUMBA_ENABLE_CUDASIM: this script is for a real GPU")

from minimodels.bench import copy_bandwidth, gpu_time, timeit  # noqa: E402
from minimodels.benchmarks.selective_scan import selective_scan_pscan  # noqa: E402
from minimodels.kernels.selective_scan import (  # noqa: E402
    CHUNK,
    THREADS,
    selective_scan,
    selective_scan_ref,
)

DEV = "cuda"


def inputs(b, d, l, n, var_B, var_C, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, dtype=dtype, generator=g)
    A = -torch.exp(0.5 * r(d, n))
    return [r(b, d, l), r(b, d, l) - 1.0, A, r(b, n, l) if var_B else r(d, n),
            r(b, n, l) if var_C else r(d, n), r(d), r(b, d, l), 0.1 * r(d)]


def check(shape, var_B, var_C, dtype, optional, softplus):
    xs = inputs(*shape, var_B, var_C, dtype, seed=sum(shape))
    if not optional:
        xs[5] = xs[6] = xs[7] = None
    results = []
    for backend in ("ref", "cuda"):
        args = [x.detach().clone().requires_grad_() if x is not None else None for x in xs]
        live = [a for a in args if a is not None]
        y, last = selective_scan(*args, delta_softplus=softplus, return_last_state=True,
                                 backend=backend)
        g = torch.Generator(device=DEV).manual_seed(1)
        gy = torch.randn(y.shape, device=DEV, dtype=dtype, generator=g)
        gl = torch.randn(last.shape, device=DEV, dtype=dtype, generator=g)
        grads = torch.autograd.grad((y * gy).sum() + (last * gl).sum(), live)
        results.append([y, last, *grads])
    worst = 0.0
    for got, want in zip(*results, strict=True):
        scale = want.abs().max().item() + 1e-30
        worst = max(worst, (got - want).abs().max().item() / scale)
    return worst


def correctness() -> bool:
    ok = True
    print(f"THREADS={THREADS}, CHUNK={CHUNK}")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        for shape in ((1, 1, 1, 1), (2, 3, 37, 4), (2, 5, 3 * CHUNK + 17, 16), (1, 4, 2000, 64)):
            for var_B, var_C in ((True, True), (False, True), (True, False), (False, False)):
                for optional, softplus in ((True, True), (False, False)):
                    err = check(shape, var_B, var_C, dtype, optional, softplus)
                    good = err < tol
                    ok &= good
                    if not good or shape[2] > 100:
                        print(f"{str(dtype)[6:]:8} {shape} B {'sel' if var_B else 'fix'} "
                              f"C {'sel' if var_C else 'fix'} opt={optional} sp={softplus}: "
                              f"max rel err {err:.2e} {'ok' if good else 'FAIL'}")
    print("correctness:", "all passed" if ok else "FAILURES")
    return ok


def cuda_time(fn, repeat=20, warmup=3) -> float:
    """Median milliseconds of fn() on the GPU (minimodels.bench.timeit, synchronised)."""
    return 1e3 * timeit(fn, device="cuda", warmup=warmup, repeat=repeat)


def timings(shape=(1, 1536, 4096, 16)):
    b, d, l, n = shape
    xs = inputs(*shape, True, True, torch.float32)
    u, delta, A, B, C, D, z, bias = xs
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    nbytes = (4 * b * d * l + 2 * b * n * l) * 4
    bw = copy_bandwidth("cuda")
    floor = nbytes / bw * 1e3
    print(f"\n{torch.cuda.get_device_name()}: (b, d, l, n) = {shape} float32; copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; bytes floor {floor * 1e3:.1f} us")
    with torch.no_grad():
        y_ref = selective_scan_ref(u.double(), delta.double(), A.double(), B.double(),
                                   C.double(), D.double(), z.double(), bias.double(), True)
        y = selective_scan(u, delta, A, B, C, **kw, backend="cuda")
        print(f"forward max abs err vs float64 ref: {(y.double() - y_ref).abs().max().item():.2e}")
        rows = [
            ("cuda kernel forward", cuda_time(
                lambda: selective_scan(u, delta, A, B, C, **kw, backend="cuda"))),
            ("pscan-style PyTorch forward", cuda_time(
                lambda: selective_scan_pscan(u, delta, A, B, C, **kw), repeat=5)),
            ("ref (Python loop) forward", cuda_time(
                lambda: selective_scan(u, delta, A, B, C, **kw, backend="ref"), repeat=2,
                warmup=1)),
        ]
    params = [x.detach().clone().requires_grad_() for x in xs]

    def fwd_bwd(fn):
        def run():
            y = fn(*params)
            torch.autograd.grad(y.sum(), params)
        return run

    rows.append(("cuda kernel forward+backward", cuda_time(fwd_bwd(
        lambda u, dl, A, B, C, D, z, bb: selective_scan(u, dl, A, B, C, D, z, bb, True,
                                                        backend="cuda")))))
    rows.append(("pscan-style forward+backward", cuda_time(fwd_bwd(
        lambda u, dl, A, B, C, D, z, bb: selective_scan_pscan(u, dl, A, B, C, D, z, bb, True)),
        repeat=5)))
    k = rows[0][1]
    print("| implementation | ms (wall) | x bytes floor | kernel speed-up |\n|---|---:|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {ms / floor:.1f} | {ms / k:.1f}x |")
    # GPU time (kernels only): at this size the host's launch overhead is as long as the kernel
    with torch.no_grad():
        ours = 1e3 * gpu_time(lambda: selective_scan(u, delta, A, B, C, **kw, backend="cuda"))
        peer = 1e3 * gpu_time(lambda: selective_scan_pscan(u, delta, A, B, C, **kw), repeat=3)
    print(f"GPU time: cuda kernel forward {ours:.3f} ms ({ours / floor:.1f}x the bytes floor), "
          f"pscan-style forward {peer:.3f} ms: {peer / ours:.1f}x the kernel's")


if __name__ == "__main__":
    good = correctness()
    timings()
    sys.exit(0 if good else 1)
