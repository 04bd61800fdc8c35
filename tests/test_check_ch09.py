"""Chapter 09 checkers: the right answers pass, and each typical wrong answer fails with its hint
(a missing max-shift, lse not updated, NaN for a row with no keys, a block sent the wrong way or
passed before use, the zig-zag's second chunk not mirrored, ...)."""

import math

import pytest
import torch

from minimodels import check
from minimodels.check import CheckFailed
from minimodels.check.ch09 import _step, _zigzag
from minimodels.kernels.attention import attention, merge_attention
from minimodels.models.ring import shard_positions

pytestmark = pytest.mark.ch09


def right_merge(o1, s1, o2, s2):
    lse = torch.logaddexp(s1, s2)
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    return (torch.exp(s1 - safe)[..., None] * o1 + torch.exp(s2 - safe)[..., None] * o2, lse)


def right_step(q, k, v, out, lse):
    outs, lses = [], []
    for r in range(q.shape[0]):
        o, s = attention(q[r], k[r], v[r], return_lse=True)
        o, s = merge_attention(out[r], lse[r], o, s)
        outs.append(o)
        lses.append(s)
    return torch.stack(outs), torch.stack(lses), k.roll(1, 0), v.roll(1, 0)


def right_zigzag(seqlen, world_size):
    chunks = torch.arange(seqlen).reshape(2 * world_size, -1)
    return torch.cat([chunks[:world_size], chunks[world_size:].flip(0)], 1)


def test_right_answers_pass():
    assert check.merge_partials(right_merge, strict=True)
    assert check.merge_partials(merge_attention, strict=True)
    assert check.ring_step(right_step, strict=True)
    assert check.zigzag_positions(right_zigzag, strict=True)
    assert check.zigzag_positions(lambda l, W: shard_positions(l, W, "zigzag").int(),
                                  strict=True)  # any integer dtype


def not_yet(*args):
    raise NotImplementedError("Exercise")


@pytest.mark.parametrize("checker", [check.merge_partials, check.ring_step,
                                     check.zigzag_positions])
def test_not_implemented(checker):
    verdict = checker(not_yet, strict=False)
    assert not verdict and "not implemented yet" in verdict.message


def no_max_shift(o1, s1, o2, s2):
    z1, z2 = s1.exp(), s2.exp()
    return (z1[..., None] * o1 + z2[..., None] * o2) / (z1 + z2)[..., None], (z1 + z2).log()


def nan_when_empty(o1, s1, o2, s2):
    lse = torch.logaddexp(s1, s2)
    return torch.exp(s1 - lse)[..., None] * o1 + torch.exp(s2 - lse)[..., None] * o2, lse


@pytest.mark.parametrize("wrong, hint", [
    (no_max_shift, "no max-shift"),
    (lambda o1, s1, o2, s2: (right_merge(o1, s1, o2, s2)[0], s1), "lse not updated"),
    (lambda o1, s1, o2, s2: (right_merge(o1, s1, o2, s2)[0], torch.maximum(s1, s2)),
     "not the max"),
    (nan_when_empty, "NaN"),
    (lambda o1, s1, o2, s2: right_merge(o2, s1, o1, s2), "swapped"),
    (lambda o1, s1, o2, s2: right_merge(o1, s1, o2, s2)[0], "one tensor"),
    (lambda o1, s1, o2, s2: right_merge(o1, s1, o2, s2)[::-1], r"\(lse, out\)"),
])
def test_merge_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.merge_partials(wrong, strict=True)


@pytest.mark.parametrize("wrong, hint", [
    (lambda *a: _step(*a, direction=-1), "sent the wrong way"),
    (lambda *a: _step(*a, pass_first=True), "passed before it was used"),
    (lambda *a: _step(*a, keep_lse=True), "lse not updated"),
    (lambda *a: _step(*a, replace=True), "replaced the running one"),
    (lambda *a: _step(*a)[:2], "of length 2"),
    (lambda q, k, v, out, lse: (out, lse, k[0], v), "k has shape"),
])
def test_step_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.ring_step(wrong, strict=True)


@pytest.mark.parametrize("wrong, hint", [
    (lambda l, W: shard_positions(l, W, "contiguous"), "contiguous layout"),
    (lambda l, W: shard_positions(l, W, "striped"), "striped layout"),
    (lambda l, W: _zigzag(l, W, second="shifted"), "not mirrored"),
    (lambda l, W: _zigzag(l, W, second="off_by_one"), "off by one"),
    (lambda l, W: _zigzag(l, W, reverse=True), "reversed"),
    (lambda l, W: right_zigzag(l, W).T, "swap two axes"),
    (lambda l, W: right_zigzag(l, W).double(), "wrong dtype"),
])
def test_zigzag_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.zigzag_positions(wrong, strict=True)


def test_merge_cases_reach_the_edges():
    """The cases hold what the hints talk about: logits large enough to overflow exp, and
    partials with lse = -inf in one part and in both."""
    from minimodels.check.ch09 import _merge_cases

    cases = _merge_cases()
    assert any(bool((c.args[1] > 100).any()) for c in cases)
    assert any(bool((c.args[1] == -math.inf).any() & (c.args[3] == -math.inf).any())
               for c in cases)
