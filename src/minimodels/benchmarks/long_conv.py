"""Benchmark of ``causal_conv``: ``python -m minimodels.bench long_conv [--device cuda]``.

Two tables. **FFT path** at a long filter (lk = l; default (1, 768, 16384) on the CPU,
(64, 768, 4096) on a GPU), float32: the op (``method="fft"``, with the skip D) against a plain
``torch.fft`` causal convolution (rfft of both to 2l, multiply, irfft, no D), the peer it
must stay within 1.2x of. On a GPU the op's FFT is the fused kernel (one block per row), timed
beside ``causal_fft_conv`` (the same convolution by torch.fft, with D); the target there is
under 3 ms at (64, 768, 4096). **Direct path** at (8, 768, 4096) with short filters (4 .. 256 taps):
the op's direct loop against torch's depthwise ``F.conv1d`` (left-padded) and the FFT path,
which gives the crossover ``method="auto"`` uses (``DIRECT_MAX_TAPS``). The floor: bytes (read
u and k, write y) over the measured copy bandwidth. Implementations are timed interleaved,
round after round, and the median of the rounds is kept (the machine is shared).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from minimodels.backend import cuda_simulated
from minimodels.bench import (
    Row,
    copy_bandwidth,
    format_table,
    gpu_time,
    interleaved,
    machine,
    real_gpu,
    tensor_device,
)
from minimodels.kernels import long_conv as LC

__all__ = ["conv1d_causal", "plain_fft_conv", "run"]

TAPS = (4, 16, 64, 128, 256)


def plain_fft_conv(u, k):
    """The causal convolution as a user writes it with torch.fft (k as long as u, no skip)."""
    L = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[
        ..., :L]


def conv1d_causal(u, k, D):
    """torch's depthwise ``F.conv1d`` (a cross-correlation: the filter flipped), left-padded by
    lk − 1 so it is causal, plus the skip D·u."""
    lk = k.shape[-1]
    return F.conv1d(F.pad(u, (lk - 1, 0)), k.flip(-1)[:, None], groups=k.shape[0]) + (
        D[:, None] * u)


def _median(fns, dev, rounds):
    with torch.no_grad():
        return {n: statistics.median(t) for n, t in
                interleaved(fns, rounds=rounds, device=dev).items()}


def run(shape=None, device="cpu", dtype=None) -> str:
    """Markdown tables: the FFT path vs plain torch.fft; the direct loop vs F.conv1d and FFT."""
    dev = tensor_device(device)
    sim = device == "cuda" and cuda_simulated()
    dtype = dtype or torch.float32
    kernel = "cpu" if device == "cpu" else "cuda"
    fft_shape = shape or ((1, 4, 64) if sim else (1, 768, 16384) if device == "cpu"
                          else (64, 768, 4096))
    b, h, l = fft_shape[:3]
    ex = LC.example_inputs((b, h, l, l), dtype=dtype, device=dev)
    u, k = ex.args
    D = ex.kwargs["D"]
    bw = copy_bandwidth(dev)
    nbytes = (2 * u.numel() + k.numel()) * u.element_size()
    floor = nbytes / bw
    rounds = 1 if sim else 7
    plain, ours = "plain torch.fft (rfft to 2l, no D)", "minimodels causal_conv, method='fft'"
    fns = {plain: lambda: plain_fft_conv(u, k),
           ours: lambda: LC.causal_conv(u, k, D=D, method="fft", backend=kernel)}
    if kernel == "cuda":  # method='fft' is the fused kernel there; torch.fft's path beside it
        op, ours = fns.pop(ours), "minimodels causal_conv, method='fft' (fused kernel)"
        fns = {plain: fns[plain], "minimodels causal_fft_conv (torch.fft, with D)":
               lambda: LC.causal_fft_conv(u, k, D), ours: op}
    secs = _median(fns, dev, rounds)
    gpu = {n: gpu_time(fn) for n, fn in fns.items()} if device == "cuda" and real_gpu() else {}
    ratio = secs[ours] / secs[plain]
    lines = [f"causal_conv FFT path at u {tuple(u.shape)}, k {tuple(k.shape)}, {str(dtype)[6:]} "
             f"on {device}: {machine(device)}",
             f"memory floor = {nbytes / 1e6:.0f} MB / {bw / 1e9:.0f} GB/s = {floor * 1e3:.3g} ms;"
             f" timed interleaved, median of {rounds} rounds", "",
             format_table([Row(n, t, gpu_seconds=gpu.get(n)) for n, t in secs.items()],
                          reference=plain, floor_seconds=floor),
             "", f"fft path / plain torch.fft: {ratio:.2f} (target <= 1.2)"
             + ("" if device == "cpu" else f"; the op {secs[ours] * 1e3:.3g} ms wall"
                + (f", {gpu[ours] * 1e3:.3g} ms GPU" if gpu else "")
                + " (target < 3 ms at (64, 768, 4096))")]

    b, h, l = (1, 4, 64) if sim else (8, 768, 4096)
    taps = (1, 4, 16) if sim else TAPS
    lines += ["", f"causal_conv direct path at u ({b}, {h}, {l}), {str(dtype)[6:]}: time (ms) "
              "against the filter's taps", "",
              f"| taps | direct ({kernel}) | F.conv1d depthwise | FFT path | direct / conv1d |"
              " direct / FFT |", "|---:|---:|---:|---:|---:|---:|"]
    crossover = None
    for lk in taps:
        u, k = LC.example_inputs((b, h, l, lk), dtype=dtype, device=dev).args
        D = LC.example_inputs((b, h, l, lk), dtype=dtype, device=dev).kwargs["D"]
        t = _median({"direct": lambda u=u, k=k, D=D: LC.causal_conv(
                         u, k, D=D, method="direct", backend=kernel),
                     "conv1d": lambda u=u, k=k, D=D: conv1d_causal(u, k, D),
                     "fft": lambda u=u, k=k, D=D: LC.causal_conv(u, k, D=D, method="fft")},
                    dev, 1 if sim else 3)
        if crossover is None and t["direct"] > t["fft"]:
            crossover = lk
        lines.append(f"| {lk} | {t['direct'] * 1e3:.3g} | {t['conv1d'] * 1e3:.3g} | "
                     f"{t['fft'] * 1e3:.3g} | {t['direct'] / t['conv1d']:.2f} | "
                     f"{t['direct'] / t['fft']:.2f} |")
    lines += ["", "target (on the CPU): direct faster than F.conv1d up to 64 taps (direct / "
              f"conv1d < 1); the FFT path overtakes the direct loop at "
              f"{crossover or f'> {taps[-1]}'} taps (method='auto' switches above "
              f"DIRECT_MAX_TAPS[{kernel!r}] = {LC.DIRECT_MAX_TAPS[kernel]})"]
    return "\n".join(lines)
