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
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Row", "copy_bandwidth", "format_table", "machine", "sweep", "timeit"]


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
