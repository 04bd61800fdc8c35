"""Checkers for chapter 09 (ring attention): the log-sum-exp merge of two partials, one step of
the ring on virtual devices, and the zig-zag assignment of positions to ranks.

Each keeps its list of typical mistakes beside it (``_merge_mistakes``, ``_step_mistakes``,
``_zigzag_mistakes``) and names the one it recognises: a missing max-shift (exp(lse)
overflows), lse not updated, a partial with no visible keys turned into NaN, the block sent the
wrong way round the ring, the block passed before it was used, the zig-zag's second chunk not
mirrored, a contiguous or striped layout instead."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from minimodels.check import Case, Mistake, Verdict, check_function
from minimodels.check.ch02 import _check, _joined, _pair_structure
from minimodels.kernels.attention import attention_ref, merge_attention
from minimodels.models.ring import shard_positions

__all__ = ["merge_partials", "ring_step", "zigzag_positions"]


def _randn(g, *shape, std=1.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)


# =============================================================================================
# Exercise 9.1: merge two partial results over disjoint keys
# =============================================================================================


def _merge_cases() -> list[Case]:
    g = torch.Generator().manual_seed(91)
    cases = []
    for label, std, hide in [("random halves of 4 + 3 keys", 1.0, None),
                             ("large logits (lse ~ 1e3)", 30.0, None),
                             ("rows 0-1 see no key of part 1 (lse1 = -inf, out1 = 0)", 1.0, 1),
                             ("row 0 sees no key at all (both lse = -inf)", 1.0, 2)]:
        q = _randn(g, 1, 2, 3, 4, std=std)
        k = _randn(g, 1, 2, 7, 4, std=std)
        v = _randn(g, 1, 2, 7, 4)
        o1, s1 = attention_ref(q, k[:, :, :4], v[:, :, :4], return_lse=True)
        o2, s2 = attention_ref(q, k[:, :, 4:], v[:, :, 4:], return_lse=True)
        if hide:  # a causal ring: some rows have no visible key in a block
            o1[:, :, :2], s1[:, :, :2] = 0.0, -math.inf
            if hide == 2:
                o2[:, :, :1], s2[:, :, :1] = 0.0, -math.inf
        cases.append(Case(label, (o1, s1, o2, s2)))
    return cases


def _merge_mistakes() -> list[Mistake]:
    def joined(out, lse):
        return torch.cat([out, lse[..., None]], -1)

    def no_max_shift(o1, s1, o2, s2):
        z1, z2 = torch.exp(s1), torch.exp(s2)
        return joined((z1[..., None] * o1 + z2[..., None] * o2) / (z1 + z2)[..., None],
                      torch.log(z1 + z2))

    def lse_not_updated(o1, s1, o2, s2):
        return joined(merge_attention(o1, s1, o2, s2)[0], s1)

    def lse_max(o1, s1, o2, s2):
        return joined(merge_attention(o1, s1, o2, s2)[0], torch.maximum(s1, s2))

    def nan_when_empty(o1, s1, o2, s2):
        lse = torch.logaddexp(s1, s2)
        w1, w2 = torch.exp(s1 - lse)[..., None], torch.exp(s2 - lse)[..., None]
        return joined(w1 * o1 + w2 * o2, lse)

    def swapped(o1, s1, o2, s2):
        lse = torch.logaddexp(s1, s2)
        finite = torch.where(lse == -math.inf, 0.0, lse)
        w1, w2 = torch.exp(s1 - finite)[..., None], torch.exp(s2 - finite)[..., None]
        return joined(w2 * o1 + w1 * o2, lse)

    return [
        Mistake("no max-shift: exp(lse) overflows for large logits. Compute lse = "
                "logaddexp(lse1, lse2) (or subtract the max first), then weight each part by "
                "exp(lse_i - lse), which lies in [0, 1].", no_max_shift),
        Mistake("lse not updated: the merged lse must be log(exp(lse1) + exp(lse2)), or the "
                "next merge in the ring weights this result wrongly.", lse_not_updated),
        Mistake("lse not updated correctly: the merged lse is log(exp(lse1) + exp(lse2)), not "
                "the max of the two.", lse_max),
        Mistake("a row that sees no key in either part (both lse = -inf) gives -inf - (-inf) = "
                "NaN: use weights 0 there (replace an lse of -inf by 0 before subtracting), so "
                "out = 0 and lse = -inf.", nan_when_empty),
        Mistake("the weights are swapped: out1 gets exp(lse1 - lse).", swapped),
    ]


def merge_partials(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 9.1: ``fn(out1, lse1, out2, lse2) -> (out, lse)``: out (b, h, l, e), lse
    (b, h, l), the attention over the union of two disjoint key sets; exact for large logits
    and for partials with lse = -inf (no visible key: out = 0)."""
    return _check("9.1", _joined(fn), _merge_cases(), _joined(merge_attention),
                  _merge_mistakes(), strict, structure=_pair_structure, raw=fn)


# =============================================================================================
# Exercise 9.2: one step of the ring on W virtual devices
# =============================================================================================


def _step(q, k, v, out, lse, *, direction=1, pass_first=False, keep_lse=False, replace=False):
    """One non-causal ring step with switches for typical mistakes. Every tensor has a leading
    rank axis W: q, k, v, out (W, b, h, c, e), lse (W, b, h, c)."""
    if pass_first:
        k, v = torch.roll(k, direction, 0), torch.roll(v, direction, 0)
    outs, lses = [], []
    for r in range(q.shape[0]):
        o, s = attention_ref(q[r], k[r], v[r], return_lse=True)
        if not replace:
            o, s = merge_attention(out[r], lse[r], o, s)
        outs.append(o)
        lses.append(lse[r] if keep_lse else s)
    if not pass_first:
        k, v = torch.roll(k, direction, 0), torch.roll(v, direction, 0)
    return torch.stack(outs), torch.stack(lses), k, v


def _step_joined(fn: Callable) -> Callable:
    def run(*args):
        out, lse, k, v = fn(*args)
        return torch.cat([out, lse[..., None], k, v], -1)

    run.__name__ = getattr(fn, "__name__", "your function")
    return run


def _step_structure(got, case) -> str | None:
    names = "(out, lse, k, v)"
    if not isinstance(got, (tuple, list)) or len(got) != 4:
        size = f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""
        return f"returned {type(got).__name__}{size} on {case.label}: return a tuple {names}"
    if not all(isinstance(x, torch.Tensor) for x in got):
        return f"returned a tuple with a non-tensor on {case.label}: return {names} of tensors"
    out, lse, k, v = got
    q = case.args[0]
    for name, x, want in (("out", out, q.shape), ("lse", lse, q.shape[:-1]),
                          ("k", k, q.shape), ("v", v, q.shape)):
        if x.shape != want:
            return (f"{name} has shape {tuple(x.shape)} on {case.label}, expected {tuple(want)} "
                    "(a leading rank axis W, then (b, h, c, e)); return them in the order "
                    f"{names}")
    return None


def _step_cases() -> list[Case]:
    g = torch.Generator().manual_seed(92)
    cases = []
    for label, (W, c), started in [("W = 3 ranks, c = 2, first step", (3, 2), False),
                                   ("W = 4 ranks, c = 3, a later step", (4, 3), True),
                                   ("W = 2 ranks, c = 1, a later step", (2, 1), True)]:
        q, k, v = (_randn(g, W, 1, 2, c, 4) for _ in range(3))
        if started:  # what earlier steps merged: a real partial over 5 other keys
            kk, vv = _randn(g, W, 1, 2, 5, 4), _randn(g, W, 1, 2, 5, 4)
            pairs = [attention_ref(q[r], kk[r], vv[r], return_lse=True) for r in range(W)]
            out = torch.stack([p[0] for p in pairs])
            lse = torch.stack([p[1] for p in pairs])
        else:
            out, lse = torch.zeros_like(q), torch.full(q.shape[:-1], -math.inf,
                                                       dtype=q.dtype)
        cases.append(Case(label, (q, k, v, out, lse)))
    return cases


def _step_mistakes() -> list[Mistake]:
    def joined(**kw):
        return lambda *a: torch.cat([(x[..., None] if i == 1 else x)
                                     for i, x in enumerate(_step(*a, **kw))], -1)

    return [
        Mistake("the block was sent the wrong way: rank r passes its K/V block to rank r + 1 "
                "(and receives from r - 1), i.e. torch.roll(k, 1, dims=0).",
                joined(direction=-1)),
        Mistake("the block was passed before it was used: attend to the block you hold, then "
                "pass it on.", joined(pass_first=True)),
        Mistake("the block was passed the wrong way, and before it was used.",
                joined(direction=-1, pass_first=True)),
        Mistake("lse not updated: return the merged lse, or the next step weights this "
                "step's result wrongly.", joined(keep_lse=True)),
        Mistake("the new block's result replaced the running one: merge it with (out, lse) "
                "by their log-sum-exps.", joined(replace=True)),
    ]


def ring_step(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 9.2: ``fn(q, k, v, out, lse) -> (out, lse, k, v)``: one non-causal ring step
    on W virtual ranks (a leading axis W on every tensor): rank r attends q[r] to the block it
    holds, merges into (out[r], lse[r]), then passes its block to rank r + 1."""
    return _check("9.2", _step_joined(fn), _step_cases(), _step_joined(_step),
                  _step_mistakes(), strict, structure=_step_structure, raw=fn)


# =============================================================================================
# Exercise 9.3: the zig-zag assignment
# =============================================================================================


def _zigzag(seqlen, world_size, *, second="mirrored", reverse=False):
    m = seqlen // (2 * world_size)
    chunks = torch.arange(seqlen).reshape(2 * world_size, m)
    rows = []
    for r in range(world_size):
        late = {"mirrored": 2 * world_size - 1 - r, "shifted": world_size + r,
                "off_by_one": (2 * world_size - r) % (2 * world_size)}[second]
        tail = chunks[late].flip(0) if reverse else chunks[late]
        rows.append(torch.cat([chunks[r], tail]))
    return torch.stack(rows)


def _zigzag_cases() -> list[Case]:
    return [Case("seqlen 8, world_size 2", (8, 2)), Case("seqlen 12, world_size 3", (12, 3)),
            Case("seqlen 16, world_size 4", (16, 4)), Case("seqlen 2, world_size 1", (2, 1)),
            Case("seqlen 24, world_size 2", (24, 2))]


def _zigzag_mistakes() -> list[Mistake]:
    return [
        Mistake("this is the contiguous layout: rank r holds [r·c, (r+1)·c), and under a "
                "causal mask the last rank does most of the work.",
                lambda l, W: shard_positions(l, W, "contiguous")),
        Mistake("this is the striped layout (r, r + W, ...): zig-zag cuts 2W chunks and gives "
                "rank r the chunks r and 2W - 1 - r.", lambda l, W: shard_positions(l, W,
                                                                                  "striped")),
        Mistake("the second chunk is not mirrored: rank r takes chunk 2W - 1 - r (late chunks "
                "in reverse rank order), not W + r.",
                lambda l, W: _zigzag(l, W, second="shifted")),
        Mistake("the second chunk is off by one: of 2W chunks numbered 0 .. 2W - 1, rank r "
                "takes chunk 2W - 1 - r.", lambda l, W: _zigzag(l, W, second="off_by_one")),
        Mistake("the positions inside the second chunk are reversed: keep each chunk in "
                "increasing order (only the chunk index is mirrored).",
                lambda l, W: _zigzag(l, W, reverse=True)),
    ]


def _int64(fn: Callable) -> Callable:
    def run(*args):
        got = fn(*args)
        if isinstance(got, torch.Tensor) and got.dtype != torch.int64 and \
                not got.is_floating_point():
            return got.to(torch.int64)  # any integer dtype names its positions
        return got

    run.__name__ = getattr(fn, "__name__", "your function")
    return run


def zigzag_positions(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 9.3: ``fn(seqlen, world_size) -> positions`` (world_size, seqlen /
    world_size) int64: rank r holds chunks r and 2W - 1 - r of 2W equal chunks, in order."""
    return check_function("9.3", _int64(fn), _zigzag_cases(), _zigzag, _zigzag_mistakes(),
                          strict=strict)
