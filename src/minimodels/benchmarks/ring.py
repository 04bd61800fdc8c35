"""Benchmark of ring attention: ``python -m minimodels.bench ring [--device cuda]``.

Causal attention over (b, h, l, e) = (1, 4, 8192, 64), float32 (``--shape b,h,l,e[,W]``), on
W ranks: W = 2 gloo processes on the CPU (one thread each), every GPU of the machine over NCCL
with ``--device cuda``. Peers: the same attention kernel on one process over the whole
sequence (one thread on the CPU), and the ring with each layout (contiguous, striped, zig-zag).
The floor is perfect scaling: the one-process time / W (the ring does the same FLOPs, W ways).
"x floor" is then 1 / (fraction of ideal throughput); the issue's GPU target is a balanced
layout at >= 80% of ideal (x floor <= 1.25). Each ring time: from a barrier to the slowest
rank's end, median of the repeats (the first dropped as warm-up).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from minimodels.bench import Row, format_table, interleaved, machine, tensor_device
from minimodels.kernels.attention import attention
from minimodels.models.ring import LAYOUTS, ring_attention, shard_positions

__all__ = ["run"]

SHAPE = (1, 4, 8192, 64)
REPEATS = 4


def _worker(rank, world_size, q, k, v, repeats):
    """Seconds of each causal ring forward on this rank, per layout, after a barrier."""
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    times = {layout: [] for layout in LAYOUTS}
    for _ in range(repeats):
        for layout in LAYOUTS:
            pos = shard_positions(q.shape[2], world_size, layout)[rank]
            qr, kr, vr = (x[:, :, pos].to(dev) for x in (q, k, v))
            dist.barrier()
            start = time.perf_counter()
            with torch.no_grad():
                ring_attention(qr, kr, vr, causal=True, layout=layout)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[layout].append(time.perf_counter() - start)
    return times


def run(shape=None, device="cpu", dtype=None) -> str:
    """Markdown table: one process vs the ring in each layout, against perfect scaling."""
    from minimodels.backend import cuda_simulated
    from minimodels.distributed import launch

    shape = SHAPE if shape is None else tuple(shape)
    b, h, l, e = shape[:4]
    if device == "cuda":
        if cuda_simulated() or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
            return (f"ring attention at {(b, h, l, e)} on cuda: needs 2 or more real GPUs "
                    f"(NCCL); {machine(device)} has none to spare, skipped")
        world_size, backend = torch.cuda.device_count(), "nccl"
    else:
        world_size, backend = 2, "gloo"
    if len(shape) == 5:
        world_size = shape[4]
    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, l, e, generator=g).to(dtype) for _ in range(3))  # (b, h, l, e)
    dev = tensor_device(device)
    qd, kd, vd = (x.to(dev) for x in (q, k, v))
    one = statistics.median(_one_process(lambda: attention(qd, kd, vd, causal=True), dev))
    per_rank = launch(_worker, world_size, backend, args=(q, k, v, REPEATS + 1))
    ring_s = {layout: statistics.median(
        max(per_rank[r][layout][i] for r in range(world_size)) for i in range(1, REPEATS + 1))
        for layout in LAYOUTS}
    ideal = one / world_size
    rows = [Row("one process, attention kernel, whole sequence", one,
                "1 thread" if device == "cpu" else "one GPU")]
    rows += [Row(f"ring, {world_size} ranks, {layout}", t,
                 f"{ideal / t:.0%} of ideal throughput") for layout, t in ring_s.items()]
    flops = 4 * b * h * l * l * e / 2
    best = min(ring_s.values())
    lines = [f"ring attention, causal, at {(b, h, l, e)}, {str(dtype)[6:]} on {device}, "
             f"{world_size} ranks over {backend}: {machine(device)}",
             f"{flops / 1e9:.1f} GFLOP; floor = perfect scaling = one process / {world_size} = "
             f"{ideal * 1e3:.3g} ms; ring times from a barrier to the slowest rank, median of "
             f"{REPEATS}" + (f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                              "cores (W ranks need W idle cores)" if device == "cpu" else ""),
             "",
             format_table(rows, reference="one process, attention kernel, whole sequence",
                          floor_seconds=ideal), "",
             f"best layout at {ideal / best:.0%} of ideal throughput (GPU target >= 80%); "
             f"zig-zag vs contiguous: {ring_s['contiguous'] / ring_s['zigzag']:.2f}x faster"]
    return "\n".join(lines)


def _one_process(fn, dev) -> list[float]:
    """Seconds per call of ``fn`` (interleaved rounds), on one thread on the CPU like a rank."""
    import numba

    threads = torch.get_num_threads(), numba.get_num_threads()
    if torch.device(dev).type == "cpu":
        torch.set_num_threads(1)
        numba.set_num_threads(1)
    try:
        with torch.no_grad():
            return interleaved({"one": fn}, rounds=REPEATS, device=dev)["one"]
    finally:
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])
