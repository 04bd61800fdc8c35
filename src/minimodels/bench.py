"""Benchmarks: time kernels against their reference and the peers a user would pick instead.

    python -m minimodels.bench scan                  # CPU, (8, 1024, 4096) float32
    python -m minimodels.bench scan --device cuda --shape 8,4096,8192
    python -m minimodels.bench attention             # one module per kernel: minimodels.benchmarks
    python -m minimodels.bench all --save            # every kernel; tables and a plot saved
                                                     # under kernels/results/ (make bench)
    python -m minimodels.bench all --device cuda --save   # the same on a GPU: results/cuda/

Every row is reported as milliseconds, as a ratio to the reference and as a multiple of the
memory floor: the bytes the op must move (each input read once, each output written once)
over the bandwidth of a large copy measured on the same device in the same run. Absolute
times mean little on shared machines; ratios in one run do. On a real GPU each row also has
its GPU time (``gpu_time``: the kernels alone, without the host's launch overhead).

Inputs come from each op's ``example_inputs`` (``minimodels.kernels.<op>``), so benchmarks,
tests and chapters time and check the same tensors. Under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) ``--device cuda`` runs every row of a benchmark on CPU tensors
through the simulated kernels at whatever ``--shape`` is given: a test of the code paths, not a
measurement (``--save`` refuses it).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numba import njit, prange

from minimodels.backend import cuda_available, cuda_simulated
from minimodels.kernels.fastexp import exp_neg

__all__ = ["Row", "convert", "copy_bandwidth", "exp_neg_rate", "exp_rate", "format_table",
           "gpu_time", "gpu_times", "interleaved", "machine", "measure", "real_gpu", "spread",
           "sweep", "tensor_device", "timeit", "verdict"]


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 5, warmup: int = 1,
                device="cpu") -> dict[str, list[float]]:
    """{name: [seconds of one call, per round]}: each round calls every ``fns[name]()`` once, in
    turn, after ``warmup`` calls each, synchronising a CUDA device around every call. On a shared
    machine a slow spell then hits every implementation alike; take the median of each list."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


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


def gpu_times(fn: Callable[[], object], rounds: int = 5, repeat: int = 10) -> list[float]:
    """``gpu_time(fn, repeat)`` in each of ``rounds`` separate profiles: its spread says whether
    a verdict near a target could flip between runs."""
    return [gpu_time(fn, repeat=repeat) for _ in range(rounds)]


def spread(seconds: Sequence[float]) -> str:
    """"0.475 ms (median of 5, 0.471-0.480)": a list of times as its median and range, three
    digits each, trailing zeros kept (1.00, not 1: a time next to a 1 ms target)."""
    ms = sorted(t * 1e3 for t in seconds)

    def three(t: float) -> str:  # 1.00 and 0.480, but 100, not "100."
        return f"{t:#.3g}".rstrip(".")

    median, low, high = (three(t) for t in (statistics.median(ms), ms[0], ms[-1]))
    return f"{median} ms (median of {len(ms)}, {low}-{high})"


def verdict(seconds: Sequence[float], target: float) -> str:
    """"met" when every time in ``seconds`` is under ``target``, "missed" when none is, else
    "within the spread" (the runs disagree: the verdict would flip with noise)."""
    below = sum(t < target for t in seconds)
    return "met" if below == len(seconds) else "missed" if below == 0 else "within the spread"


def real_gpu() -> bool:
    """True when a real CUDA GPU runs the ``cuda`` backend (not Numba's simulator)."""
    return cuda_available() and not cuda_simulated()


def tensor_device(device: str) -> str:
    """Where a benchmark's tensors live: ``device``, except that the CUDA simulator runs the
    ``cuda`` backend on CPU tensors (torch has no GPU there)."""
    return "cpu" if device == "cuda" and cuda_simulated() else device


def convert(example, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A copy of an op's ``Example`` with ``fn`` applied to every tensor among its args and
    kwargs (``convert(ex, torch.Tensor.double)``; ``lambda t: t.detach().requires_grad_()``)."""
    import dataclasses

    def apply(x):
        return fn(x) if isinstance(x, torch.Tensor) else x

    return dataclasses.replace(example, args=tuple(apply(x) for x in example.args),
                               kwargs={k: apply(v) for k, v in example.kwargs.items()})


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
    """One implementation's time: ``seconds`` of wall clock (``timeit``), and on a real GPU
    ``gpu_seconds``, the device time of its kernels alone (``gpu_time``)."""

    name: str
    seconds: float
    note: str = ""
    gpu_seconds: float | None = None


def measure(name: str, fn: Callable[[], object], device: str = "cpu", note: str = "", *,
            gpu_repeat: int = 10, **timeit_kwargs) -> Row:
    """A ``Row`` for ``fn()``: its median wall time (``timeit(fn, **timeit_kwargs)``) and, on a
    real GPU, its GPU time. Under the CUDA simulator every call is slow and meaningless as a
    time: ``fn`` runs once after one warm-up."""
    if device == "cuda" and cuda_simulated():
        timeit_kwargs.update(warmup=1, repeat=1)
    seconds = timeit(fn, device=tensor_device(device), **timeit_kwargs)
    gpu = gpu_time(fn, repeat=gpu_repeat) if device == "cuda" and real_gpu() else None
    return Row(name, seconds, note, gpu)


def format_table(rows: Sequence[Row], *, reference: str, floor_seconds: float) -> str:
    """A Markdown table: ms, speed-up over ``reference`` and multiple of the floor (and a column
    of GPU ms when a row has its GPU time)."""
    ref = next(r.seconds for r in rows if r.name == reference)
    gpu = any(r.gpu_seconds is not None for r in rows)
    lines = [
        "| implementation | ms | speed-up vs ref | x floor |" + (" GPU ms |" if gpu else "")
        + " note |",
        "|---|---:|---:|---:|" + ("---:|" if gpu else "") + "---|",
    ]
    for r in rows:
        gpu_ms = "-" if r.gpu_seconds is None else f"{r.gpu_seconds * 1e3:.3g}"
        lines.append(
            f"| {r.name} | {r.seconds * 1e3:.3g} | {ref / r.seconds:.3g}x | "
            f"{r.seconds / floor_seconds:.2f} |" + (f" {gpu_ms} |" if gpu else "")
            + f" {r.note} |"
        )
    return "\n".join(lines)


def machine(device: str) -> str:
    """A one-line description of where the numbers were taken."""
    if torch.device(device).type == "cuda" and cuda_simulated():
        what = "Numba's CUDA simulator on the CPU (times are not measurements)"
    elif torch.device(device).type == "cuda":
        what = torch.cuda.get_device_name()
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


RESULTS = Path(__import__("minimodels.kernels").kernels.__file__).parent / "results"


def parse_tables(text: str) -> list[tuple[str, list[tuple[str, float]], float | None]]:
    """The Markdown tables of a benchmark's output: (title, [(implementation, ms)], floor in ms
    or None). The title is the output's first line plus the last line of text above the table;
    the floor comes from the first column whose header says "floor" (ms / multiple)."""
    lines = text.splitlines()
    tables, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("| implementation |"):
            i += 1
            continue
        header = [c.strip() for c in lines[i].strip("|").split("|")]
        above = [ln for ln in lines[1:i] if ln.strip() and not ln.startswith("|")]
        title = lines[0] + ("\n" + above[-1] if above else "")
        col = next((j for j, h in enumerate(header) if "floor" in h), None)
        rows, floor = [], None
        i += 2  # header and rule
        while i < len(lines) and lines[i].startswith("|"):
            cells = [c.strip() for c in lines[i].strip("|").split("|")]
            ms = float(cells[1])
            rows.append((cells[0], ms))
            if floor is None and col is not None and cells[col] not in ("", "-"):
                floor = ms / float(cells[col])
            i += 1
        tables.append((title, rows, floor))
    return tables


def plot_results(device: str, folder: Path = RESULTS) -> Path:
    """Draw every saved table of ``folder/device/*.md`` (``--save``) as horizontal bars of ms on
    a log scale, the package's kernels in colour and the floor dashed; returns the PNG's path."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    tables = [t for path in sorted((folder / device).glob("*.md"))
              for t in parse_tables(path.read_text())]
    if not tables:
        raise FileNotFoundError(f"no saved results in {folder / device}: run with --save first")
    fig = Figure(figsize=(9, 1.0 + sum(0.32 * len(rows) + 1.1 for _, rows, _ in tables)))
    axes = fig.subplots(len(tables), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [len(rows) + 2 for _, rows, _ in tables]})
    for ax, (title, rows, floor) in zip(axes[:, 0], tables, strict=True):
        names = [name for name, _ in rows][::-1]
        ms = [t for _, t in rows][::-1]
        colours = ["tab:orange" if name.startswith("minimodels") else "tab:blue" for name in names]
        ax.barh(names, ms, color=colours)
        for y, t in enumerate(ms):
            ax.text(t, y, f" {t:.3g} ms", va="center", fontsize=7)
        if floor:
            ax.axvline(floor, color="k", ls="--", lw=1)
            ax.text(floor, -0.45, " floor", fontsize=7, va="bottom")
        ax.set_xscale("log")
        ax.set_xlim(min(ms + [floor or min(ms)]) / 4, max(ms) * 8)  # bars comparable in length
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title("\n".join(textwrap.fill(t, 95) for t in title.split("\n")), fontsize=8,
                     loc="left")
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("ms (log scale; shorter is faster)")
    fig.tight_layout()
    out = folder / f"{device}.png"
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    import importlib
    import pkgutil

    import minimodels.benchmarks

    names = sorted(m.name for m in pkgutil.iter_modules(minimodels.benchmarks.__path__))
    parser = argparse.ArgumentParser(prog="python -m minimodels.bench")
    parser.add_argument("kernel", choices=[*names, "all", "plot"],
                        help="a kernel's benchmark, all of them, or only redraw the plot")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default=None, help="comma-separated sizes (kernel's default)")
    parser.add_argument("--dtype", default=None, help="torch dtype name (kernel's default)")
    parser.add_argument("--save", action="store_true",
                        help=f"write each table to {RESULTS.name}/DEVICE/KERNEL.md under kernels/"
                             " and redraw kernels/results/DEVICE.png")
    args = parser.parse_args(argv)
    if args.kernel == "plot":  # only the saved tables: no device needed
        print("wrote", plot_results(args.device, RESULTS))
        return 0
    if args.device == "cuda" and not cuda_available():
        from minimodels.backend import BackendUnavailable, resolve

        try:
            resolve("cuda")
        except BackendUnavailable as err:  # says why: no GPU, no driver, numba-cuda broken
            parser.error(f"--device cuda: {err}")
    if args.device == "cuda" and args.save and cuda_simulated():
        parser.error("--save with --device cuda under the CUDA simulator would overwrite the GPU's"
                     " results with simulated times: unset NUMBA_ENABLE_CUDASIM on a real GPU")
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    for name in names if args.kernel == "all" else [args.kernel]:
        module = importlib.import_module(f"minimodels.benchmarks.{name}")
        text = module.run(shape, args.device, dtype)
        print(text, end="\n\n")
        if args.save:
            (RESULTS / args.device).mkdir(parents=True, exist_ok=True)
            (RESULTS / args.device / f"{name}.md").write_text(text + "\n")
    if args.save:
        print("wrote", plot_results(args.device, RESULTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
