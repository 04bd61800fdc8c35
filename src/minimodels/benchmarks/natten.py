"""Benchmark of ``neighborhood_attention_2d``: ``python -m minimodels.bench natten [--device
cuda]``.

At the canonical size (1, 4, 128, 128, 64), 7 x 7 windows, float32 (on a GPU: batch 8), against
the peers a user would write: the windows gathered by ``unfold`` then a batched softmax (the
plain-PyTorch formulation, K² copies of every key), and masked full attention (SDPA with the
window mask, head by head: it does all (H·W)² scores, the work neighbourhood attention saves).
The ratio full / kernel is compared with the FLOP ratio H·W / K². The floor: the FLOPs
(4·H·W·K²·e per head) over the rate of one large matmul on the same device; the bytes (q, k,
v, o) over the copy bandwidth are printed beside it. Timed interleaved, median of the rounds.
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
from minimodels.kernels import natten as N

__all__ = ["masked_full_attention", "run", "unfold_natten"]


def unfold_natten(q, k, v, kernel_size):
    """Neighbourhood attention in plain PyTorch: each query's K² keys gathered with clamped
    index grids (the window of ``window_start``), then softmax. q, k, v: (b, h, H, W, e)."""
    b, h, H, W, e = q.shape
    K = kernel_size
    rows = N.window_start(torch.arange(H, device=q.device), H, K)[:, None] + torch.arange(
        K, device=q.device)  # (H, K)
    cols = N.window_start(torch.arange(W, device=q.device), W, K)[:, None] + torch.arange(
        K, device=q.device)  # (W, K)
    idx = (rows[:, None, :, None] * W + cols[None, :, None, :]).reshape(H * W * K * K)
    kw = k.reshape(b, h, H * W, e)[:, :, idx].reshape(b, h, H, W, K * K, e)
    vw = v.reshape(b, h, H * W, e)[:, :, idx].reshape(b, h, H, W, K * K, e)
    s = torch.einsum("bhije,bhijne->bhijn", q, kw) / e**0.5  # (b, h, H, W, K²)
    return torch.einsum("bhijn,bhijne->bhije", s.softmax(-1), vw)


def masked_full_attention(q, k, v, mask):
    """SDPA over all H·W pixels with the window mask, one head at a time (the (H·W)² scores of
    one head at once). mask: (H·W, H·W) bool, True = attend."""
    b, h, H, W, e = q.shape
    out = torch.empty_like(q)
    for bb in range(b):
        for hh in range(h):
            o = F.scaled_dot_product_attention(*(t[bb, hh].reshape(1, H * W, e)
                                                 for t in (q, k, v)), attn_mask=mask)
            out[bb, hh] = o.reshape(H, W, e)
    return out


def matmul_rate(device, dtype=torch.float32, n: int = 2048) -> float:
    """FLOP/s of an n x n matmul on ``device`` (the machine's practical compute rate)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    secs = statistics.median(interleaved({"mm": lambda: a @ a}, rounds=5, device=device)["mm"])
    return 2 * n**3 / secs


def run(shape=None, device="cpu", dtype=None) -> str:
    """Markdown table: unfold + softmax, the kernel (cpu or cuda), masked full attention."""
    dev = tensor_device(device)
    if shape is None and device == "cuda":
        shape = (8, 4, 128, 128, 64, 7)
    ex = N.example_inputs(shape, device=dev, **({"dtype": dtype} if dtype else {}))
    q, k, v = ex.args
    K = ex.kwargs["kernel_size"]
    b, h, H, W, e = q.shape
    kernel = "cpu" if device == "cpu" else "cuda"
    mask = N.neighborhood_mask(H, W, K, device=dev)
    full_name = "masked full attention (SDPA, per head)"
    with torch.no_grad():
        truth = unfold_natten(q.double(), k.double(), v.double(), K)
        fns = {"unfold + softmax (torch)": lambda: unfold_natten(q, k, v, K),
               f"minimodels {kernel} kernel": lambda: ex.call(N.neighborhood_attention_2d,
                                                              backend=kernel),
               full_name: lambda: masked_full_attention(q, k, v, mask)}
        secs = {name: statistics.median(t)
                for name, t in interleaved(fns, rounds=3, device=dev).items()}
        errs = {name: (fn().double() - truth).abs().max().item() for name, fn in fns.items()}
        ours_name = f"minimodels {kernel} kernel"
        gpu_secs, ours_runs = {}, None
        if device == "cuda" and real_gpu():  # the kernel in 5 profiles: its spread
            gpu_secs = {name: gpu_time(fn, repeat=3) for name, fn in fns.items()
                        if name != ours_name}
            ours_runs = gpu_times(fns[ours_name], rounds=5, repeat=10)
            gpu_secs[ours_name] = statistics.median(ours_runs)
    flops = N.flops(b, h, H, W, e, K)
    rate = matmul_rate(dev, q.dtype)
    floor = flops / rate
    nbytes = 4 * q.numel() * q.element_size()
    bw = copy_bandwidth(dev)
    t = gpu_secs or secs  # judged on the GPU time where there is one (the kernels alone)
    ours = t[ours_name]
    predicted = N.flops(b, h, H, W, e) / flops  # H·W / K²
    measured = t[full_name] / ours
    rows = [Row(name, wall, f"max err {errs[name]:.1e}", gpu_secs.get(name))
            for name, wall in secs.items()]
    target = 0.5e-3 if device == "cuda" else 30e-3
    lines = [f"neighborhood_attention_2d at q {tuple(q.shape)}, {K} x {K} windows, "
             f"{str(q.dtype)[6:]} on {device}: {machine(device)}",
             f"{flops / 1e9:.2f} GFLOP; compute floor = {flops / 1e9:.2f} GFLOP / "
             f"{rate / 1e9:.0f} GFLOP/s (matmul) = {floor * 1e3:.3g} ms; memory "
             f"{nbytes / 1e6:.0f} MB / {bw / 1e9:.0f} GB/s = {nbytes / bw * 1e3:.3g} ms; timed "
             "interleaved, median of 3 rounds", "",
             format_table(rows, reference="unfold + softmax (torch)", floor_seconds=floor), "",
             f"kernel {spread(ours_runs) if ours_runs else f'{ours * 1e3:.3g} ms'} "
             f"{'GPU time' if gpu_secs else 'wall'} (target < {target * 1e3:g} ms: "
             f"{verdict(ours_runs or [ours], target)}); masked full / kernel {measured:.0f}x vs "
             f"the FLOP ratio H·W/K² = {predicted:.0f}x: measured/predicted "
             f"{measured / predicted:.2f} (target within 2x: "
             f"{'met' if 0.5 <= measured / predicted <= 2 else 'missed'})"]
    return "\n".join(lines)
