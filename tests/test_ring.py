"""Ring attention (minimodels.models.ring): the layouts and the plan of visible sub-blocks, the
log-sum-exp merge at its edges, the simulated ring against scaled_dot_product_attention, and the
ring over real gloo processes (4 ranks, float32 to 1e-5 and float64 to 1e-12 in outputs and
gradients), world size 1, and clear errors instead of hangs."""

import math
import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimodels.distributed import free_port, launch
from minimodels.kernels.attention import attention_ref
from minimodels.models.ring import (
    LAYOUTS,
    _run_cases,
    block_plan,
    merge_partials,
    ring_attention,
    ring_attention_simulated,
    run_ring_attention,
    shard_positions,
)

pytestmark = pytest.mark.ch09


def qkv(b, h, l, e, *, seed=0, dtype=torch.float64, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(b, h, l, e, generator=g, dtype=torch.float64) * std).to(dtype)
                 for _ in range(3))


# ---------------------------------------------------------------------------------------------
# Layouts and plans
# ---------------------------------------------------------------------------------------------


def test_shard_positions_by_hand():
    assert shard_positions(8, 2, "contiguous").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert shard_positions(8, 2, "striped").tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert shard_positions(8, 2, "zigzag").tolist() == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert shard_positions(12, 3, "zigzag").tolist() == [[0, 1, 10, 11], [2, 3, 8, 9],
                                                         [4, 5, 6, 7]]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_shard_positions_is_a_partition(layout, W):
    pos = shard_positions(24, W, layout)
    assert pos.shape == (W, 24 // W) and pos.dtype == torch.int64
    assert sorted(pos.flatten().tolist()) == list(range(24))
    assert all(bool((row[1:] > row[:-1]).all()) for row in pos)  # each shard in order


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_block_plan_covers_exactly_the_visible_pairs(layout, W, causal):
    """The sub-blocks of every (rank, src) pair cover each visible (query, key) pair once and
    no hidden one: the plan against the mask built from the global positions."""
    pos = shard_positions(24, W, layout)
    c = pos.shape[1]
    for r in range(W):
        for src in range(W):
            want = (pos[src][None, :] <= pos[r][:, None]) if causal else torch.ones(c, c)
            got = torch.zeros(c, c, dtype=torch.int64)
            for qs, ks, diag in block_plan(layout, W, r, src, c, causal):
                n, m = qs.stop - qs.start, ks.stop - ks.start
                sub = torch.ones(n, m, dtype=torch.int64)
                got[qs, ks] += sub.tril() if diag else sub
            assert torch.equal(got, want.to(torch.int64)), (layout, W, r, src)


@pytest.mark.parametrize("seqlen, W, layout, match", [
    (10, 4, "contiguous", "divisible by 4"), (12, 4, "zigzag", "divisible by 8"),
    (8, 0, "contiguous", "world_size"), (8, 2, "diagonal", "layout must be one of")])
def test_bad_layout_arguments(seqlen, W, layout, match):
    with pytest.raises(ValueError, match=match):
        shard_positions(seqlen, W, layout)


# ---------------------------------------------------------------------------------------------
# The merge
# ---------------------------------------------------------------------------------------------


def test_merge_partials_large_logits_and_empty_partial():
    q, k, v = qkv(1, 2, 5, 4, std=40.0)  # scores ~ 1e3: a missing max-shift overflows
    o1, s1 = attention_ref(q, k[:, :, :2], v[:, :, :2], return_lse=True)
    o2, s2 = attention_ref(q, k[:, :, 2:], v[:, :, 2:], return_lse=True)
    out, lse = merge_partials(o1, s1, o2, s2)
    want, want_lse = attention_ref(q, k, v, return_lse=True)
    assert s1.abs().max() > 500
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    empty_out, empty_lse = torch.zeros_like(o1), torch.full_like(s1, -math.inf)  # no keys
    out, lse = merge_partials(empty_out, empty_lse, o2, s2)
    assert torch.equal(out, o2) and torch.equal(lse, s2)


# ---------------------------------------------------------------------------------------------
# The ring on one process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_ring_equals_sdpa(layout, W, causal):
    q, k, v = qkv(2, 2, 24, 5, seed=W)
    out, stats = ring_attention_simulated(q, k, v, W, causal=causal, layout=layout)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert stats.pairs.sum() == (24 * 25 // 2 if causal else 24 * 24)  # each pair once
    assert torch.equal(stats.src[:, 0], torch.arange(W))  # step 0: every rank its own block


def test_simulated_ring_stats_causal_balance():
    """Contiguous causal: rank r works on r full blocks and its diagonal, so the ring takes
    1/2 + (W - 1) block-times for W/2 blocks of work per rank; zig-zag balances it."""
    q, k, v = qkv(1, 1, 64, 2)
    W, c = 4, 16
    _, st = ring_attention_simulated(q, k, v, W, causal=True, layout="contiguous")
    diag, full = c * (c + 1) // 2, c * c
    assert st.pairs[:, 0].tolist() == [diag] * W
    assert st.pairs[W - 1].tolist() == [diag] + [full] * (W - 1)
    assert st.pairs[0, 1:].tolist() == [0] * (W - 1)
    assert st.efficiency == pytest.approx((W * diag + 6 * full) / (W * (diag + 3 * full)))
    _, zz = ring_attention_simulated(q, k, v, W, causal=True, layout="zigzag")
    assert zz.efficiency > 0.97 and st.efficiency < 0.6
    assert st.bytes_sent == 2 * 1 * 1 * c * 2 * 8


def test_simulated_ring_gradients():
    """The simulated ring is plain differentiable PyTorch around the attention kernel."""
    x = [t.requires_grad_() for t in qkv(1, 2, 12, 3)]
    ring_attention_simulated(*x, 2, causal=True, layout="striped")[0].square().sum().backward()
    y = [t.detach().clone().requires_grad_() for t in x]
    attention_ref(*y, causal=True).square().sum().backward()
    for a, b in zip(x, y, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_simulated_ring_rejects_bad_input():
    q, k, v = qkv(1, 1, 8, 2)
    with pytest.raises(ValueError, match="divisible by 3"):
        ring_attention_simulated(q, k, v, 3)
    with pytest.raises(ValueError, match="k must have shape"):
        ring_attention_simulated(q, k[:, :, :4], v, 2)
    with pytest.raises(TypeError, match="k must be float64"):
        ring_attention_simulated(q, k.float(), v, 2)


# ---------------------------------------------------------------------------------------------
# The ring over real processes
# ---------------------------------------------------------------------------------------------


def _reference(q, k, v, g, causal):
    x = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    out = attention_ref(*x, causal=causal)
    out.backward(g.double())
    return out.detach(), tuple(t.grad for t in x)


def test_ring_over_four_gloo_processes():
    """The issue's target: 4 gloo ranks match full attention to 1e-5 (float32) in outputs and
    gradients, for every layout; float64 to 1e-12. One launch for all cases."""
    cases, wants = [], []
    for i, (causal, layout, dtype) in enumerate([
            (True, "zigzag", torch.float32), (True, "striped", torch.float32),
            (True, "contiguous", torch.float32), (False, "contiguous", torch.float32),
            (True, "zigzag", torch.float64)]):
        q, k, v = qkv(1, 2, 32, 8, seed=i, dtype=dtype)
        g = qkv(1, 2, 32, 8, seed=100 + i, dtype=dtype)[0]
        cases.append((q, k, v, g, causal, layout))
        wants.append(_reference(q, k, v, g, causal))
    for (q, *_), (out, grads), (want, want_grads) in zip(cases, _run_cases(cases, 4), wants,
                                                         strict=True):
        tol = 1e-5 if q.dtype == torch.float32 else 1e-12
        assert out.dtype == q.dtype and out.shape == q.shape
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
        for got, w in zip(grads, want_grads, strict=True):
            assert got.dtype == q.dtype
            torch.testing.assert_close(got.double(), w, rtol=tol, atol=tol)


def test_ring_world_size_one_is_the_same_path():
    q, k, v = qkv(1, 1, 6, 4)
    out = run_ring_attention(q, k, v, world_size=1, causal=True, layout="zigzag")
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True), rtol=1e-12,
                               atol=1e-12)


def test_ring_gradcheck_in_a_group_of_one():
    """gradcheck of the ring's own backward (the dK/dV pass) in a process group of one."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        x = [t.requires_grad_() for t in qkv(1, 2, 6, 3)]
        assert torch.autograd.gradcheck(
            lambda q, k, v: ring_attention(q, k, v, causal=True, layout="zigzag"), x)
    finally:
        dist.destroy_process_group()


def test_ring_errors_are_clear_on_every_rank():
    q, k, v = qkv(1, 1, 10, 2)
    with pytest.raises(ValueError, match="divisible by 4"):  # before any process starts
        run_ring_attention(q, k, v, world_size=4)
    with pytest.raises(ValueError, match="inside a process group"):
        ring_attention(q, k, v)
    start = time.monotonic()
    a, b = qkv(1, 1, 4, 2), qkv(1, 1, 6, 2)  # rank 1 holds a longer shard than rank 0
    with pytest.raises(ValueError, match="rank 0: ranks disagree on c"):
        _run_cases([([a[0], b[0]], [a[1], b[1]], [a[2], b[2]], None, False, "contiguous")], 2)
    odd = qkv(1, 1, 3, 2)  # zig-zag needs two chunks per rank: an odd shard is refused
    with pytest.raises(ValueError, match="divisible by 4"):
        _run_cases([([odd[0]] * 2, [odd[1]] * 2, [odd[2]] * 2, None, True, "zigzag")], 2)
    assert time.monotonic() - start < 60  # clear errors, not a timeout
    assert not multiprocessing.active_children()  # the launcher joined or killed every rank


def test_launch_returns_by_rank_and_raises_a_rank_error_here():
    """shard_positions(seqlen=rank, world_size=2): rank 0 succeeds, rank 1 raises ValueError,
    which the launcher raises in this process with the rank's name."""
    with pytest.raises(ValueError, match="rank 1: seqlen 1 must be divisible by 2"):
        launch(shard_positions, 2)
    assert [x.shape for x in launch(shard_positions, 1)] == [(1, 0)]
    assert not multiprocessing.active_children()


def test_launch_refuses_what_cannot_be_spawned():
    with pytest.raises(ValueError, match="importable"):
        launch(lambda rank, world_size: rank, 2)
    with pytest.raises(ValueError, match="backend"):
        launch(shard_positions, 2, backend="mpi")
    with pytest.raises(ValueError, match="world_size"):
        launch(shard_positions, 0)


def test_ring_benchmark_runs_from_the_command_line(capsys):
    """``python -m minimodels.bench ring --shape b,h,l,e`` at a tiny size: one process and the
    ring in every layout, each as a fraction of ideal throughput; the cuda path says why it
    cannot run without two real GPUs."""
    from minimodels import bench

    assert bench.main(["ring", "--shape", "1,1,16,4"]) == 0
    out = capsys.readouterr().out
    [(_, rows, floor)] = bench.parse_tables(out)
    assert [name for name, _ in rows] == ["one process, attention kernel, whole sequence"] + [
        f"ring, 2 ranks, {layout}" for layout in LAYOUTS]
    assert floor > 0 and all(ms > 0 for _, ms in rows) and "of ideal throughput" in out
    from minimodels.benchmarks import ring as ring_bench

    assert "needs 2 or more real GPUs" in ring_bench.run((1, 1, 16, 4), "cuda") or \
        torch.cuda.device_count() >= 2
