"""Ring attention: a long sequence sharded over devices that pass key/value blocks in a ring.

References: Liu, Zaharia & Abbeel, "Ring attention with blockwise transformers for
near-infinite context" (2023), section 3 and algorithm 1 (the ring, overlap when the block size
c ≥ F/B); Brandon et al., "Striped attention" (2023), section 3 (the striped layout for causal
balance); the zig-zag layout of Zhu's ring-flash-attention and Llama 3 (Dubey et al., 2024,
section 3.3.2: each rank holds chunks r and 2W-1-r).

Glossary (code = paper): ``world_size`` = the number of devices N (W here); ``c`` = the block
size (tokens per device, ``seqlen / world_size``); ``out, lse`` = a partial attention result and
its log-sum-exp, merged by ``merge_partials``. Shapes: ``b`` batch, ``h`` heads, ``l`` length,
``c`` block length, ``e`` head dim; inputs and outputs are always in natural sequence order.

Rank r holds the queries of its shard for the whole run. At step t it holds the key/value block
of rank src = (r - t) mod W, attends its queries to it, merges the result into its running
(out, lse), and passes the block to rank r + 1 (the send is posted before the compute, so it
travels while the rank works). After W steps every query has seen every key:

    out_r = merge over t of attention(q_r, k_src(t), v_src(t)),   src(t) = (r - t) mod W.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass

import torch

from minimodels.backend import expect_tensor
from minimodels.kernels.attention import attention, merge_attention

__all__ = ["LAYOUTS", "RingStats", "block_plan", "merge_partials", "ring_attention",
           "ring_attention_simulated", "ring_stats", "run_ring_attention", "profile_ring",
           "shard_positions", "time_ring_step"]

LAYOUTS = ("contiguous", "striped", "zigzag")
TIMEOUT_S = 60.0  # every wait on a ring message gives up after this long

merge_partials = merge_attention  # the exact log-sum-exp merge (kernels/attention/ref.py)


# =============================================================================================
# Who holds what: layouts and the visible sub-blocks of a ring step
# =============================================================================================


def _check_layout(seqlen: int, world_size: int, layout: str) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = 2 * world_size if layout == "zigzag" else world_size
    if seqlen % parts:
        raise ValueError(f"seqlen {seqlen} must be divisible by {parts} for layout {layout!r} "
                         f"over world_size {world_size}"
                         + (" (2·world_size chunks)" if layout == "zigzag" else ""))


def shard_positions(seqlen: int, world_size: int, layout: str = "contiguous") -> torch.Tensor:
    """The global positions each rank holds, (world_size, c) int64 with c = seqlen / world_size.

    contiguous: rank r holds [r·c, (r+1)·c); striped: r, r + W, r + 2W, ...; zigzag: of 2W
    equal chunks, chunks r and 2W - 1 - r (an early one and a late one)."""
    _check_layout(seqlen, world_size, layout)
    W = world_size
    pos = torch.arange(seqlen)
    if layout == "contiguous":
        return pos.reshape(W, seqlen // W)  # (W, c)
    if layout == "striped":
        return pos.reshape(seqlen // W, W).T.contiguous()  # (W, c)
    chunks = pos.reshape(2 * W, seqlen // (2 * W))  # (2W, c/2)
    return torch.cat([chunks[:W], chunks[W:].flip(0)], dim=1)  # (W, c): chunks r, 2W-1-r


def block_plan(layout: str, world_size: int, rank: int, src: int, c: int, causal: bool
               ) -> list[tuple[slice, slice, bool]]:
    """The sub-blocks rank ``rank`` computes when it holds the keys of rank ``src``: a list of
    (query slice, key slice, causal) of local indices, each a call of ``attention``. Together
    they cover exactly the (query, key) pairs with key position ≤ query position (all pairs when
    not ``causal``); ``causal`` in an entry is the usual mask j ≤ i on a square sub-block."""
    every = slice(0, c)
    if not causal:
        return [(every, every, False)]
    if layout == "striped":  # query r + iW sees key src + jW iff j ≤ i (src ≤ r) or j < i
        if src <= rank:
            return [(every, every, True)]
        return [(slice(1, c), slice(0, c - 1), True)] if c > 1 else []
    chunks = {"contiguous": lambda r: [r],
              "zigzag": lambda r: [r, 2 * world_size - 1 - r]}[layout]
    m = c // len(chunks(rank))  # tokens per chunk
    plan = []
    for a, qa in enumerate(chunks(rank)):
        for b, kb in enumerate(chunks(src)):
            if kb <= qa:  # an earlier chunk is seen whole, the same chunk causally
                plan.append((slice(a * m, (a + 1) * m), slice(b * m, (b + 1) * m), kb == qa))
    return plan


def _attend(q, k, v, out, lse, plan):
    """Merge the attention of q's rows to the planned sub-blocks of (k, v) into (out, lse)."""
    for qs, ks, causal in plan:
        o, s = attention(q[:, :, qs], k[:, :, ks], v[:, :, ks], causal=causal,
                         return_lse=True)  # (b, h, |qs|, e), (b, h, |qs|)
        o, s = merge_partials(out[:, :, qs], lse[:, :, qs], o, s)
        out = torch.cat([out[:, :, :qs.start], o, out[:, :, qs.stop:]], dim=2)  # (b, h, c, e)
        lse = torch.cat([lse[:, :, :qs.start], s, lse[:, :, qs.stop:]], dim=2)  # (b, h, c)
    return out, lse


def _pairs(plan) -> int:
    """(query, key) pairs a plan computes (per head)."""
    total = 0
    for qs, ks, causal in plan:
        n, m = qs.stop - qs.start, ks.stop - ks.start
        total += n * (n + 1) // 2 if causal else n * m
    return total


def _check_qkv(q, k, v):
    expect_tensor("q", q, "b, h, l, e")
    expect_tensor("k", k, "b, h, l, e", dtypes=(q.dtype,), shape=q.shape)
    expect_tensor("v", v, "b, h, l, e", dtypes=(q.dtype,), shape=q.shape)
    if q.shape[-1] == 0 or q.shape[-2] == 0:
        raise ValueError(f"q must have l >= 1 and e >= 1, got shape {tuple(q.shape)}")


# =============================================================================================
# The ring on one process: W virtual devices
# =============================================================================================


@dataclass(frozen=True)
class RingStats:
    """Per-rank, per-step work of a ring run. ``src[r, t]``: whose block rank r holds at step
    t; ``pairs[r, t]``: (query, key) pairs it computes then (per head); ``bytes_sent``: what
    one rank sends per step (its K and V block)."""

    src: torch.Tensor  # (W, W) int64
    pairs: torch.Tensor  # (W, W) int64
    bytes_sent: int

    @property
    def step_pairs(self) -> torch.Tensor:
        """(W,): a synchronous ring's step lasts as long as its busiest rank."""
        return self.pairs.max(dim=0).values

    @property
    def efficiency(self) -> float:
        """Useful work / (ranks × the time the ring takes): 1 when every rank is always busy."""
        W = self.pairs.shape[0]
        return float(self.pairs.sum()) / float(W * self.step_pairs.sum())


def ring_stats(seqlen: int, world_size: int, *, causal: bool = False,
               layout: str = "contiguous", batch: int = 1, n_heads: int = 1, d_head: int = 1,
               itemsize: int = 4) -> RingStats:
    """The work of a ring run, counted without computing it (for timelines at any size)."""
    pos = shard_positions(seqlen, world_size, layout)  # (W, c)
    W, c = pos.shape
    src = torch.tensor([[(r - t) % W for t in range(W)] for r in range(W)])  # (W, W)
    pairs = torch.tensor([[_pairs(block_plan(layout, W, r, int(s), c, causal)) for s in row]
                          for r, row in enumerate(src)])
    return RingStats(src, pairs, 2 * batch * n_heads * c * d_head * itemsize)


def ring_attention_simulated(q, k, v, world_size: int, *, causal: bool = False,
                             layout: str = "contiguous"):
    """Ring attention with ``world_size`` virtual devices in one process.

    q, k, v: (b, h, l, e), l divisible by world_size (by 2·world_size for zigzag) ->
    (out (b, h, l, e), RingStats). ``out`` equals ``attention(q, k, v, causal=causal)``."""
    _check_qkv(q, k, v)
    b, h, l, e = q.shape
    pos = shard_positions(l, world_size, layout)  # (W, c)
    W, c = pos.shape
    qs = [q[:, :, p] for p in pos]  # W × (b, h, c, e)
    blocks = [(k[:, :, p], v[:, :, p]) for p in pos]
    outs = [q.new_zeros(b, h, c, e) for _ in range(W)]
    lses = [q.new_full((b, h, c), -math.inf) for _ in range(W)]
    src = torch.zeros(W, W, dtype=torch.int64)
    pairs = torch.zeros(W, W, dtype=torch.int64)
    for t in range(W):
        for r in range(W):
            s = (r - t) % W  # rank r holds rank s's block at step t
            plan = block_plan(layout, W, r, s, c, causal)
            outs[r], lses[r] = _attend(qs[r], *blocks[s], outs[r], lses[r], plan)
            src[r, t], pairs[r, t] = s, _pairs(plan)
    out = torch.empty_like(q)
    out[:, :, pos.flatten()] = torch.cat(outs, dim=2)  # natural order again
    return out, RingStats(src, pairs, 2 * b * h * c * e * q.element_size())


# =============================================================================================
# The ring over real processes (torch.distributed)
# =============================================================================================


def _peers(group):
    import torch.distributed as dist

    W, r = dist.get_world_size(group), dist.get_rank(group)
    glob = (lambda i: i) if group is None else (lambda i: dist.get_global_rank(group, i))
    return W, r, glob((r + 1) % W), glob((r - 1) % W)


def _post_pass(x, group, tag):
    """Post the send of ``x`` to the next rank and the receive of the previous rank's, without
    waiting: returns (received buffer, works). A ring of one passes the block to itself."""
    import torch.distributed as dist

    W, _, nxt, prv = _peers(group)
    if W == 1:
        return x, []
    got = torch.empty_like(x)
    # one batch: NCCL runs the pair as one group call (separate calls can deadlock in a ring)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, group, tag),
                                    dist.P2POp(dist.irecv, got, prv, group, tag)])
    return got, works


def _wait(works) -> float:
    """Wait for posted messages (each at most TIMEOUT_S); return the seconds spent waiting."""
    start = time.perf_counter()
    for w in works:
        w.wait(datetime.timedelta(seconds=TIMEOUT_S))
    return time.perf_counter() - start


def _agree(q, k, v, causal, layout, group) -> None:
    """Every rank checks its inputs, then all ranks compare what they hold: a bad input or a
    mismatch between ranks raises the same clear ValueError on every rank (never a hang)."""
    import torch.distributed as dist

    problem = ""
    try:
        _check_qkv(q, k, v)
        W = dist.get_world_size(group)
        _check_layout(q.shape[2] * W, W, layout)
    except (TypeError, ValueError) as err:
        problem = str(err)
    dtype = {torch.float32: 1, torch.float64: 2}.get(getattr(q, "dtype", None), 0)
    shape = list(q.shape) if isinstance(q, torch.Tensor) and q.dim() == 4 else [0] * 4
    mine = torch.tensor([int(not problem), *shape, dtype, int(causal), LAYOUTS.index(layout)
                         if layout in LAYOUTS else -1], dtype=torch.int64)
    if isinstance(q, torch.Tensor) and q.is_cuda:
        mine = mine.to(q.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    everyone = [x.cpu() for x in everyone]
    if problem:
        raise ValueError(problem)
    for rank, theirs in enumerate(everyone):
        if theirs[0] == 0:
            raise ValueError(f"rank {rank} rejected its input (see its error)")
    names = ["ok", "b", "h", "c", "e", "dtype", "causal", "layout"]
    for rank, theirs in enumerate(everyone):
        diff = [n for n, a, b in zip(names, everyone[0].tolist(), theirs.tolist(), strict=True)
                if a != b]
        if diff:
            raise ValueError(f"ranks disagree on {', '.join(diff)}: rank 0 has "
                             f"{everyone[0][1:].tolist()}, rank {rank} has {theirs[1:].tolist()}"
                             " ([b, h, c, e, dtype, causal, layout]); every rank must hold an "
                             "equal shard of one problem")


class _RingAttention(torch.autograd.Function):
    """Forward: K/V blocks go round the ring. Backward: K/V go round again with their dK/dV
    accumulators, which arrive home after W passes (Liu et al., 2023, algorithm 1)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, layout, group, timeline):
        W, r, _, _ = _peers(group)
        c = q.shape[2]
        out = torch.zeros_like(q)  # (b, h, c, e)
        lse = q.new_full(q.shape[:-1], -math.inf)  # (b, h, c)
        kv = torch.stack([k, v]).contiguous()  # (2, b, h, c, e): one message per step
        # [core] ring_forward
        for t in range(W):
            src = (r - t) % W  # this step's block came from rank src
            nxt, works = _post_pass(kv, group, tag=0) if t < W - 1 else (kv, [])
            start = time.perf_counter()  # the block travels while we compute
            plan = block_plan(layout, W, r, src, c, causal)
            out, lse = _attend(q, kv[0], kv[1], out, lse, plan)
            compute = time.perf_counter() - start
            waited = _wait(works)
            kv = nxt
            if timeline is not None:
                timeline.append({"step": t, "src": src, "pairs": _pairs(plan),
                                 "compute_s": compute, "wait_s": waited})
        # [/core]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.layout, ctx.group = causal, layout, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        W, r, _, _ = _peers(ctx.group)
        c = q.shape[2]
        dout = dout.contiguous()
        D = (dout * out).sum(-1)  # (b, h, c): D_i = dO_i · out_i
        dq = torch.zeros_like(q)
        kv = torch.stack([k, v]).contiguous()  # (2, b, h, c, e)
        dkv = torch.zeros_like(kv)  # dK, dV of the block we hold, summed over the ranks so far
        for t in range(W):
            src = (r - t) % W
            nxt, works = _post_pass(kv, ctx.group, tag=0) if t < W - 1 else (kv, [])
            for qs, ks, causal in block_plan(ctx.layout, W, r, src, c, ctx.causal):
                g = _block_grads(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], causal,
                                 lse[:, :, qs], dout[:, :, qs], D[:, :, qs])
                dq[:, :, qs] += g[0]
                dkv[0][:, :, ks] += g[1]
                dkv[1][:, :, ks] += g[2]
            sent = dkv  # kept alive until its send completes
            dkv, dworks = _post_pass(sent, ctx.group, tag=1)  # dK/dV move on with their block
            _wait(works + dworks)
            kv = nxt
        return dq, dkv[0], dkv[1], None, None, None, None  # dK/dV are home after W passes


def _block_grads(q, k, v, causal, lse, dout, D):
    """dq, dk, dv of one sub-block, from the final lse and D = dO·out (FlashAttention-2's
    backward): the block's own (out_b, lse_b) are recomputed by the attention kernel and its
    backward is driven with the gradients the merge gives them,

        ∂L/∂out_b = w dO,   ∂L/∂lse_b = w (dO·out_b - D),   w = exp(lse_b - lse),

    so that inside the kernel dS = exp(s - lse) (dO·v - D), exactly the global formula."""
    with torch.enable_grad():
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out_b, lse_b = attention(q, k, v, causal=causal, return_lse=True)
        w = torch.exp(lse_b - lse).detach()  # (b, h, n): this block's share of the softmax
        g_out = w[..., None] * dout
        g_lse = w * ((dout * out_b.detach()).sum(-1) - D)
        return torch.autograd.grad((out_b, lse_b), (q, k, v), (g_out, g_lse))


def ring_attention(q, k, v, *, causal: bool = False, layout: str = "contiguous", group=None,
                   timeline: list | None = None):
    """This rank's share of ring attention, inside an initialised process group.

    q, k, v: (b, h, c, e), the rows of this rank's shard (``shard_positions(l, W,
    layout)[rank]``), the same shape and dtype on every rank -> out (b, h, c, e), this rank's
    rows of ``attention(Q, K, V, causal=causal)`` over the whole sequence. Differentiable: the
    backward sends dK/dV around the ring. ``timeline``: a list to append one record per step
    (src, pairs, compute_s, wait_s). Bad or mismatched inputs raise ValueError on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("ring_attention runs inside a process group: call it from a function "
                         "started by minimodels.distributed.launch (or init_process_group)")
    _agree(q, k, v, causal, layout, group)
    return _RingAttention.apply(q, k, v, bool(causal), layout, group, timeline)


# =============================================================================================
# From a notebook: shard, run on W processes, gather
# =============================================================================================


def _device(rank):
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ring_worker(rank, world_size, cases):
    """One rank of ``run_ring_attention``: for each case (q, k, v, grad_out, causal, layout),
    take my shard, run the ring (and its backward). A case's q, k, v may also be lists of
    per-rank shards (grad_out then None): the rank takes its own, as given."""
    results = []
    for q, k, v, grad_out, causal, layout in cases:
        dev = _device(rank)
        if isinstance(q, (list, tuple)):
            q, k, v = q[rank], k[rank], v[rank]
        else:
            mine = shard_positions(q.shape[2], world_size, layout)[rank]
            q, k, v = (x[:, :, mine] for x in (q, k, v))
            grad_out = None if grad_out is None else grad_out[:, :, mine]
        q, k, v = (x.to(dev).requires_grad_(grad_out is not None) for x in (q, k, v))
        out = ring_attention(q, k, v, causal=causal, layout=layout)
        if grad_out is None:
            results.append(out.detach().cpu())
            continue
        out.backward(grad_out.to(dev))
        results.append((out.detach().cpu(), q.grad.cpu(), k.grad.cpu(), v.grad.cpu()))
    return results


def _run_cases(cases, world_size: int, backend: str = "gloo") -> list:
    """Run several ring problems in one launch (process start-up costs seconds): a list of
    (q, k, v, grad_out, causal, layout) -> per case, what ``run_ring_attention`` returns."""
    from minimodels.distributed import launch

    cpu = [tuple(x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in case)
           for case in cases]
    per_rank = launch(_ring_worker, world_size, backend, args=(cpu,))
    gathered = []
    for i, (q, _, _, grad_out, _, layout) in enumerate(cases):
        order = shard_positions(q.shape[2], world_size, layout).flatten()
        parts = [per_rank[r][i] for r in range(world_size)]

        def gather(j, parts=parts, order=order, q=q):
            x = torch.empty(q.shape, dtype=q.dtype)
            x[:, :, order] = torch.cat([p if j is None else p[j] for p in parts], dim=2)
            return x.to(q.device)

        gathered.append(gather(None) if grad_out is None
                        else (gather(0), (gather(1), gather(2), gather(3))))
    return gathered


def run_ring_attention(q, k, v, grad_out=None, *, world_size: int, causal: bool = False,
                       layout: str = "contiguous", backend: str = "gloo"):
    """Shard q, k, v (b, h, l, e) over ``world_size`` processes, run ``ring_attention`` (and its
    backward with ``grad_out`` (b, h, l, e)) and gather: out (b, h, l, e), or (out, (dq, dk,
    dv)) with ``grad_out``, in the input dtype and natural sequence order."""
    _check_qkv(q, k, v)
    _check_layout(q.shape[2], world_size, layout)
    if grad_out is not None:
        expect_tensor("grad_out", grad_out, "b, h, l, e", dtypes=(q.dtype,), shape=q.shape)
    return _run_cases([(q, k, v, grad_out, causal, layout)], world_size, backend)[0]


def _profile_worker(rank, world_size, q, k, v, runs, repeats):
    """Time each (causal, layout) run ``repeats`` times, interleaved; keep every timeline."""
    mine = {}
    for _ in range(repeats):
        for causal, layout in runs:
            pos = shard_positions(q.shape[2], world_size, layout)[rank]
            timeline = []
            with torch.no_grad():
                ring_attention(q[:, :, pos], k[:, :, pos], v[:, :, pos], causal=causal,
                               layout=layout, timeline=timeline)
            mine.setdefault((causal, layout), []).append(timeline)
    return mine


def profile_ring(q, k, v, *, world_size: int, runs=((True, "contiguous"), (True, "zigzag")),
                 repeats: int = 3, backend: str = "gloo") -> dict:
    """Run ring attention on ``world_size`` processes for each (causal, layout) in ``runs``,
    ``repeats`` times interleaved (one launch), and return {(causal, layout): tensor (repeats,
    W ranks, W steps, 3)} of per-step [compute_s, wait_s, pairs]."""
    from minimodels.distributed import launch

    _check_qkv(q, k, v)
    for _, layout in runs:
        _check_layout(q.shape[2], world_size, layout)
    per_rank = launch(_profile_worker, world_size, backend,
                      args=(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), tuple(runs),
                            repeats))
    result = {}
    for run in runs:
        result[run] = torch.tensor(
            [[[[s["compute_s"], s["wait_s"], s["pairs"]] for s in per_rank[r][run][i]]
              for r in range(world_size)] for i in range(repeats)], dtype=torch.float64)
    return result


def _step_worker(rank, world_size, block_sizes, n_heads, d_head, dtype, repeats):
    """Per block size c: seconds of one local block (attention of c queries to c keys) and of
    one ring pass of a K/V block (send to the next rank, receive from the previous), each
    timed ``repeats`` times, interleaved over the sizes, the ranks lined up by a barrier."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(rank)
    compute = {c: [] for c in block_sizes}
    comm = {c: [] for c in block_sizes}
    for _ in range(repeats):
        for c in block_sizes:
            q, k, v = (torch.randn(1, n_heads, c, d_head, generator=g).to(dtype)
                       for _ in range(3))  # (1, h, c, e)
            kv = torch.stack([k, v])  # (2, 1, h, c, e)
            dist.barrier()
            start = time.perf_counter()
            _, works = _post_pass(kv, None, tag=2)
            _wait(works)
            comm[c].append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            attention(q, k, v, return_lse=True)
            compute[c].append(time.perf_counter() - start)
    return compute, comm


def time_ring_step(block_sizes, *, world_size: int = 2, n_heads: int = 4, d_head: int = 64,
                   dtype=torch.float32, repeats: int = 5, backend: str = "gloo") -> dict:
    """Measure, on ``world_size`` processes, the two halves of a ring step for each block size
    c: compute (attention of a (1, h, c, e) block to one K/V block) and communication (one pass
    of a (2, 1, h, c, e) K/V block round the ring). Returns {"compute_s": tensor (len(sizes),
    repeats · world_size), "comm_s": the same}: every rank's every repeat, for medians and
    spreads."""
    from minimodels.distributed import launch

    sizes = [int(c) for c in block_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"block_sizes must be positive ints, got {block_sizes!r}")
    per_rank = launch(_step_worker, world_size, backend,
                      args=(sizes, n_heads, d_head, dtype, repeats))
    return {key: torch.tensor([[x for r in range(world_size) for x in per_rank[r][i][c]]
                               for c in sizes], dtype=torch.float64)
            for i, key in enumerate(("compute_s", "comm_s"))}
