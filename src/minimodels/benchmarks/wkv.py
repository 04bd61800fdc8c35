"""Benchmark of ``wkv``: ``python -m minimodels.bench wkv [--device cuda]``.

The floor counts exps as well as bytes. pip's Numba has no vector math library, so each
``math.exp`` is a scalar libm call; the log-space recurrence needs two per element (one of each
pair of exps is e^0 and is skipped). On the CPU the floor is therefore
max(bytes / copy bandwidth, exps / measured scalar exp rate), the "exp-aware floor".
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from minimodels.bench import Row, copy_bandwidth, format_table, machine, timeit
from minimodels.kernels import wkv as W

__all__ = ["exp_rate", "run", "wkv_torch_loop"]

EXPS_PER_ELEMENT = 2  # forward: one exp for the output's weights, one for the state update


def wkv_torch_loop(w, u, k, v):
    """What a user would write in plain PyTorch: the recurrence with the state (A, B) kept in
    linear space (no running maximum), exps taken once up front. Overflows for large k."""
    batch, l, c = k.shape
    decay, ek, euk = torch.exp(-w), torch.exp(k), torch.exp(u + k)  # (c,), (b, l, c) x2
    A = k.new_zeros(batch, c)
    B = k.new_zeros(batch, c)
    y = torch.empty_like(k)
    for t in range(l):
        y[:, t] = (A + euk[:, t] * v[:, t]) / (B + euk[:, t])
        A = decay * A + ek[:, t] * v[:, t]
        B = decay * B + ek[:, t]
    return y


@njit(parallel=True, cache=True)
def _exp_loop(x, out):
    # out[r] = Σ_j exp(x[r, j]): exps in independent chains, as many as the kernel has.
    for r in prange(x.shape[0]):
        s = x[r, 0] - x[r, 0]
        for j in range(x.shape[1]):
            s += math.exp(x[r, j])
        out[r] = s


def exp_rate(dtype=np.float32, n: int = 1 << 24) -> float:
    """Scalar ``math.exp`` calls per second of this machine, all cores, in an njit loop."""
    x = -np.random.default_rng(0).random((256, n // 256)).astype(dtype)
    out = np.empty(256, dtype)
    seconds = timeit(lambda: _exp_loop(x, out), repeat=5)
    return n / seconds


def _inputs(shape, device, dtype):
    batch, l, c = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, device=device, dtype=dtype, generator=gen)

    w = torch.rand(c, device=device, dtype=dtype, generator=gen) * 2  # decay rates in [0, 2)
    return w, rnd(c), rnd(batch, l, c), rnd(batch, l, c)


def run(shape=(1, 4096, 2048), device="cpu", dtype=torch.float32) -> str:
    """Markdown table: ref, a plain PyTorch loop, the cpu kernel (and cuda on a GPU), in
    speed-ups over ref and multiples of the floor (exp-aware on the CPU)."""
    shape = tuple(shape or (1, 4096, 2048))
    w, u, k, v = _inputs(shape, device, dtype)
    n = k.numel()
    nbytes = 3 * n * k.element_size()  # read k, v; write y
    bw = copy_bandwidth(device)
    mem_floor = nbytes / bw
    lines = [f"wkv at {shape} {str(dtype)[6:]} on {device}: {machine(device)}",
             f"memory floor = {nbytes / 1e6:.0f} MB / {bw / 1e9:.0f} GB/s (measured copy) = "
             f"{mem_floor * 1e3:.3g} ms"]
    floor = mem_floor
    if device == "cpu":
        rate = exp_rate(np.dtype(str(dtype)[6:]))
        exp_floor = EXPS_PER_ELEMENT * n / rate
        floor = max(mem_floor, exp_floor)
        lines.append(f"exp floor = {EXPS_PER_ELEMENT} exps x {n / 1e6:.1f} M elements / "
                     f"{rate / 1e9:.3g} G exp/s (measured, scalar libm, all cores) = "
                     f"{exp_floor * 1e3:.3g} ms")
        lines.append(f"exp-aware floor = max of the two = {floor * 1e3:.3g} ms")
    kernel = "cpu" if device == "cpu" else "cuda"
    expected = W.wkv(w.double(), u.double(), k.double(), v.double(), backend=kernel)

    def err(y):
        return f"max err {(y.double() - expected).abs().max().item():.1e}"

    rows = []

    def add(name, fn, note="", **kw):
        seconds = timeit(fn, device=device, **kw)
        rows.append(Row(name, seconds, f"{note}{'; ' if note else ''}{err(fn())}"))

    add("ref (log-space loop over l)", lambda: W.wkv(w, u, k, v, backend="ref"),
        warmup=1, repeat=3)
    add("plain PyTorch loop (linear space)", lambda: wkv_torch_loop(w, u, k, v),
        "overflows once k > ~88", warmup=1, repeat=3)
    add(f"minimodels {kernel} kernel", lambda: W.wkv(w, u, k, v, backend=kernel),
        "forward")
    loop_row = rows[1]
    lines += ["", format_table(rows, reference=rows[0].name, floor_seconds=floor), "",
              f"{kernel} kernel vs plain PyTorch loop: "
              f"{loop_row.seconds / rows[-1].seconds:.1f}x; x floor: "
              f"{rows[-1].seconds / floor:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
