"""Benchmarks: time kernels against their reference and the peers a user would pick instead.

    python -m minimodels.bench scan                  # CPU, (8, 1024, 4096) float32
    python -m minimodels.bench scan --device cuda --shape 8,4096,8192
    python -m minimodels.bench attention             # one module per kernel: minimodels.benchmarks

Every row is reported as milliseconds, as a ratio to the reference and as a multiple of the
memory floor: the bytes the op must move (each input read once, each output written once)
over the bandwidth of a large copy measured on the same device in the same run. Absolute
times mean little on shared machines; ratios in one run do.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from minimodels.kernels.fastexp import exp_neg

__all__ = ["Row", "copy_bandwidth", "exp_neg_rate", "exp_rate", "format_table", "machine",
           "sweep", "timeit"]


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


def gpu_time(fn: Callable[[], object], repeat: int = 10) -> float:
    """Mean GPU time of ``fn()`` in seconds: the summed device time of every kernel it launches
    (torch.profiler / CUPTI), without the host's launch overhead. For sub-millisecond kernels,
    report it beside the wall time of ``timeit``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()) / repeat / 1e6


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 1 << 30) -> float:
    """Bytes per second of a large copy into a preallocated buffer (bytes read + written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timeit(lambda: dst.copy_(src), device=device, repeat=9)
    return 2 * nbytes / seconds


@njit(parallel=True, cache=True)
def _exp_loop(x, out):
    # out[r] = Σ_j exp(x[r, j]): one chain of scalar libm calls per row, rows in parallel.
    for r in prange(x.shape[0]):
        s = x[r, 0] - x[r, 0]
        for j in range(x.shape[1]):
            s += math.exp(x[r, j])
        out[r] = s


def exp_rate(dtype=np.float32, n: int = 1 << 24) -> float:
    """Scalar ``math.exp`` calls per second on the CPU, all cores, in an njit loop: pip's Numba
    has no vector math library, so this is the exp ceiling of a kernel that calls libm."""
    x = -np.random.default_rng(0).random((256, n // 256)).astype(dtype)
    out = np.empty(256, dtype)
    return n / timeit(lambda: _exp_loop(x, out), repeat=5)


@njit(parallel=True, cache=True)
def _exp_neg_loop(x, out, reps):
    # out[r] = exp_neg(x[r]) reps times per row: the vectorised exp alone, in cache.
    for i in prange(reps * x.shape[0]):
        r = i % x.shape[0]
        for j in range(x.shape[1]):
            out[r, j] = exp_neg(x[r, j])


def exp_neg_rate(dtype=np.float32, n: int = 1 << 24) -> float:
    """``kernels.fastexp.exp_neg`` evaluations per second on the CPU, all cores, in a vectorised
    njit loop over rows of 1024 arguments that stay in the L1 cache."""
    x = -np.random.default_rng(0).random((16, 1024)).astype(dtype)
    out = np.empty_like(x)
    reps = n // x.size
    return n / timeit(lambda: _exp_neg_loop(x, out, reps), repeat=9)


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


def main(argv: list[str] | None = None) -> int:
    import importlib
    import pkgutil

    import minimodels.benchmarks

    names = sorted(m.name for m in pkgutil.iter_modules(minimodels.benchmarks.__path__))
    parser = argparse.ArgumentParser(prog="python -m minimodels.bench")
    parser.add_argument("kernel", choices=names)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default=None, help="comma-separated sizes (kernel's default)")
    parser.add_argument("--dtype", default=None, help="torch dtype name (kernel's default)")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    module = importlib.import_module(f"minimodels.benchmarks.{args.kernel}")
    print(module.run(shape, args.device, dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
