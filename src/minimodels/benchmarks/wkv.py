"""Benchmark of ``wkv``: ``python -m minimodels.bench wkv [--device cuda]``.

The floor counts exps as well as bytes. pip's Numba has no vector math library, so each
``math.exp`` is a scalar libm call; the log-space recurrence needs two per element (one of each
pair of exps is e^0 and is skipped). On the CPU the floor is therefore
max(bytes / copy bandwidth, exps / measured scalar exp rate), the "exp-aware floor" (issue #5's
definition, kept as the table's floor). The CPU kernel no longer calls libm: its exp is
``minimodels.kernels.fastexp.exp_neg``, which vectorises, so it can run below that floor. The
floor of the kernel as written is printed too: the same exps at the measured rate of
``exp_neg`` in a vectorised loop ("vectorised-exp floor").
"""

from __future__ import annotations

import numpy as np
import torch

from minimodels.bench import (
    convert,
    copy_bandwidth,
    exp_neg_rate,
    exp_rate,
    format_table,
    machine,
    measure,
    real_gpu,
    tensor_device,
)
from minimodels.kernels import wkv as W

__all__ = ["batch_sweep", "run", "wkv_torch_loop"]

EXPS_PER_ELEMENT = 2  # forward: one exp for the output's weights, one for the state update
FLA_EMPTY_LOG = -1e38  # p of fla's empty state (a, b, p) = (0, 0, -inf), kept finite


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


def _fla_peer():
    """flash-linear-attention's Triton ``fused_recurrent_rwkv4``, or None where ``fla`` is not
    importable (or on the CUDA simulator: Triton needs a real GPU). fla 0.1.2 has it; its one
    file ``fla/ops/rwkv4/fused_recurrent.py`` plus empty package ``__init__``s on PYTHONPATH
    suffice, which is how it was carried to the H200."""
    if not real_gpu():
        return None
    try:
        from fla.ops.rwkv4 import fused_recurrent_rwkv4
    except ImportError:
        return None
    return fused_recurrent_rwkv4


def batch_sweep(shape, device="cuda", factors=(1, 2, 4, 8, 16)) -> str:
    """The kernel at (f·b, l, c) for each factor f, as multiples of the memory floor (read k,
    v; write y, over the measured copy bandwidth), with fla's ``fused_recurrent_rwkv4`` beside
    it when importable. fla takes log w (it decays by e^{-e^w}) and a state (b, 3, 1, c) of
    (a, b, p); it also writes the state of every step (for its backward)."""
    dev = tensor_device(device)
    kernel = "cpu" if device == "cpu" else "cuda"
    bw = copy_bandwidth(dev)
    fla = _fla_peer()
    lines = ["flash-linear-attention (fla.ops.rwkv4) " + (
        "beside the kernel" if fla else "not importable here: no Triton peer"), "",
        "| b | forward ms (wall) | GPU ms | memory floor ms | x floor | fla GPU ms | fla wall ms |"
        " max abs diff |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    batch, l, c = shape
    for f in factors:
        ex = W.example_inputs((f * batch, l, c), device=dev)
        w, u, k, v = ex.args[:4]
        w = w + 0.01  # fla needs log w
        row = measure("ours", lambda x=(w, u, k, v): W.wkv(*x, backend=kernel), device,
                      warmup=3, repeat=30)
        floor = 3 * k.numel() * k.element_size() / bw
        gpu = "-" if row.gpu_seconds is None else f"{row.gpu_seconds * 1e3:.3f}"
        line = (f"| {f * batch} | {row.seconds * 1e3:.3f} | {gpu} | {floor * 1e3:.3f} | "
                f"{row.seconds / floor:.1f} |")
        if fla is not None:
            s0 = torch.zeros(k.shape[0], 3, 1, c, device=k.device)  # (b, 3, 1, c): (a, b, p)
            s0[:, 2] = FLA_EMPTY_LOG

            def peer(w=w, u=u, k=k, v=v, s0=s0):
                return fla(torch.log(w), u, k, v, s0)[0]

            diff = (peer() - W.wkv(w, u, k, v, backend=kernel)).abs().max().item()
            theirs = measure("fla", peer, device, warmup=3, repeat=30)
            line += (f" {theirs.gpu_seconds * 1e3:.3f} | {theirs.seconds * 1e3:.3f} | "
                     f"{diff:.1e} |")
        else:
            line += " - | - | - |"
        lines.append(line)
    return "\n".join(lines)


def run(shape=None, device="cpu", dtype=None) -> str:
    """Markdown table: ref, a plain PyTorch loop, the cpu kernel (cuda on a GPU, with its
    forward+backward and a batch sweep), in speed-ups over ref and multiples of the floor
    (exp-aware on the CPU). Default shape: ``wkv.example_inputs``' (1, 4096, 2048) float32."""
    dev = tensor_device(device)
    ex = W.example_inputs(shape, device=dev, **({"dtype": dtype} if dtype else {}))
    w, u, k, v = ex.args[:4]  # (c,), (c,), (b, l, c), (b, l, c)
    shape, dtype = tuple(k.shape), k.dtype
    n = k.numel()
    nbytes = 3 * n * k.element_size()  # read k, v; write y
    bw = copy_bandwidth(dev)
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
        vec_rate = exp_neg_rate(np.dtype(str(dtype)[6:]))
        vec_floor = max(mem_floor, EXPS_PER_ELEMENT * n / vec_rate)
        lines.append(f"vectorised-exp floor = max(memory floor, {EXPS_PER_ELEMENT} exps x "
                     f"{n / 1e6:.1f} M / {vec_rate / 1e9:.3g} G exp/s (measured, fastexp."
                     f"exp_neg, all cores)) = {vec_floor * 1e3:.3g} ms")
    kernel = "cpu" if device == "cpu" else "cuda"
    expected = convert(ex, torch.Tensor.double).call(W.wkv, backend=kernel)

    def err(y):
        return f"max err {(y.double() - expected).abs().max().item():.1e}"

    rows = []

    def add(name, fn, note="", exact=True, **kw):
        row = measure(name, fn, device, note, **kw)
        if exact:
            row.note = f"{note}{'; ' if note else ''}{err(fn())}"
        rows.append(row)

    add("ref (log-space loop over l)", lambda: ex.call(W.wkv, backend="ref"),
        warmup=1, repeat=3, gpu_repeat=2)
    add("plain PyTorch loop (linear space)", lambda: wkv_torch_loop(w, u, k, v),
        "overflows once k > ~88", warmup=1, repeat=3, gpu_repeat=2)
    add(f"minimodels {kernel} kernel", lambda: ex.call(W.wkv, backend=kernel), "forward",
        **({} if device == "cpu" else {"warmup": 3, "repeat": 50}))
    loop_row, kernel_row = rows[1], rows[2]
    y = torch.empty_like(k)  # first touched (page faults) during warm-up, not timed
    add(f"minimodels {kernel} kernel, preallocated y",
        lambda: ex.call(W.wkv, backend=kernel, out=y), "kernel alone")
    if device == "cuda":
        params = convert(ex, lambda t: t.detach().clone().requires_grad_())
        y_grad = params.call(W.wkv, backend=kernel)
        gy = torch.randn_like(y_grad)
        add(f"minimodels {kernel} kernel, backward", lambda: torch.autograd.grad(
            y_grad, params.args[:4], gy, retain_graph=True), "backward alone, not a forward",
            exact=False, warmup=3, repeat=50)
    summary = (f"{kernel} kernel vs plain PyTorch loop: "
               f"{loop_row.seconds / kernel_row.seconds:.1f}x; x "
               f"{'exp-aware (scalar libm) ' if device == 'cpu' else ''}floor: "
               f"{kernel_row.seconds / floor:.2f}")
    if device == "cpu":  # the kernel's exps are exp_neg: the table uses that floor
        summary += (f"; x vectorised-exp floor: {kernel_row.seconds / vec_floor:.2f} (kernel "
                    f"alone: {rows[3].seconds / vec_floor:.2f})")
        floor = vec_floor
        lines.append("the table's floor: the vectorised-exp floor")
    lines += ["", format_table(rows, reference=rows[0].name, floor_seconds=floor), "", summary]
    if device == "cuda":
        lines += ["", f"batch sweep at (b, {shape[1]}, {shape[2]}) float32 on {device}:",
                  batch_sweep(shape, device)]
    return "\n".join(lines)
