"""The chapter-02 checkers against the mistakes learners make: each gets its verdict."""

import math

import pytest
import torch

from minimodels import check

pytestmark = pytest.mark.ch02


def attend(q, k, v, keep, scale=None, subtract_max=True):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    s = s.masked_fill(~keep, -math.inf)
    if subtract_max:
        s = s - s.amax(-1, keepdim=True)
    w = torch.exp(s)
    return (w / w.sum(-1, keepdim=True)) @ v


def tril(q, offset=0):
    l = q.shape[-2]
    return torch.ones(l, l, dtype=torch.bool).tril(offset)


def good_attention(q, k, v):
    return attend(q, k, v, tril(q))


@pytest.mark.parametrize(
    "fn, message",
    [
        (good_attention, "passed 4 checks"),
        (lambda q, k, v: (_ for _ in ()).throw(NotImplementedError()), "not implemented yet"),
        (lambda q, k, v: attend(q, k, v, tril(q, -1)), "hides the diagonal"),
        (lambda q, k, v: attend(q, k, v, tril(q, 1)), "off by one"),
        (lambda q, k, v: attend(q, k, v, tril(q).T), "keeps j >= i"),
        (lambda q, k, v: attend(q, k, v, tril(q, 99)), "no causal mask"),
        (lambda q, k, v: attend(q, k, v, ~tril(q)), "your mask hides what it should show"),
        (lambda q, k, v: (good_attention(q, k, v), None), "not a tuple"),
        (lambda q, k, v: attend(q, k, v, tril(q), scale=1.0), "not scaled"),
        (lambda q, k, v: attend(q, k, v, tril(q), subtract_max=False), "subtract each row's max"),
        (lambda q, k, v: good_attention(q, k, v).double(), "wrong dtype"),
        (lambda q, k, v: good_attention(q, k, v).transpose(-1, -2), "wrong shape"),
        (lambda q, k, v: good_attention(q, k, v) + 1e-3, "wrong values"),
    ],
)
def test_causal_attention_checker(fn, message):
    verdict = check.causal_attention(fn, strict=False)
    assert message in verdict.message and verdict.passed == message.startswith("passed")


def good_merge(out1, lse1, out2, lse2):
    lse = torch.logaddexp(lse1, lse2)
    return torch.exp(lse1 - lse)[..., None] * out1 + torch.exp(lse2 - lse)[..., None] * out2, lse


def naive_merge(out1, lse1, out2, lse2):
    z1, z2 = torch.exp(lse1)[..., None], torch.exp(lse2)[..., None]
    return (z1 * out1 + z2 * out2) / (z1 + z2), torch.log(z1 + z2)[..., 0]


@pytest.mark.parametrize(
    "fn, message",
    [
        (good_merge, "passed 3 checks"),
        (lambda o1, s1, o2, s2: ((o1 + o2) / 2, torch.logaddexp(s1, s2)), "plain average"),
        (lambda o1, s1, o2, s2: (good_merge(o1, s1, o2, s2)[0], torch.maximum(s1, s2)), "not the max"),
        (lambda o1, s1, o2, s2: (good_merge(o1, s1, o2, s2)[0], s1 + s2), "not lse1 + lse2"),
        (lambda o1, s1, o2, s2: good_merge(o2, s1, o1, s2), "swapped"),
        (naive_merge, "exp(lse) overflowed"),
        (lambda o1, s1, o2, s2: good_merge(o1, s1, o2, s2)[0], "return a tuple (out, lse)"),
        (lambda o1, s1, o2, s2: good_merge(o1, s1, o2, s2)[::-1], "in the order (out, lse)"),
        (lambda o1, s1, o2, s2: list(good_merge(o1, s1, o2, s2)) + [None], "a list of 3"),
        (lambda o1, s1, o2, s2: (o1, s1[..., None]), "lse must have shape"),
    ],
)
def test_merge_attention_checker(fn, message):
    verdict = check.merge_attention(fn, strict=False)
    assert message in verdict.message and verdict.passed == message.startswith("passed")


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), "passed 5 checks"),
        (lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril(), "top-left mask"),
        (lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq - 1), "see its own key"),
        (lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq + 1), "from its future"),
        (lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril(lq - lk), "the other way"),
        (lambda lq, lk: torch.ones(lq, lk).tril(lk - lq), "a boolean mask"),
        (lambda lq, lk: torch.ones(lq, lk, dtype=torch.long).tril(lk - lq), "a boolean mask"),
        (lambda lq, lk: ~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq),
         "your mask hides what it should show"),
        (lambda lq, lk: ~torch.ones(lq, lk, dtype=torch.bool).tril(), "hides what it should show"),
        (lambda lq, lk: (torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq),), "one (lq, lk) tensor"),
    ],
)
def test_kv_step_mask_checker(fn, message):
    verdict = check.kv_step_mask(fn, strict=False)
    assert message in verdict.message and verdict.passed == message.startswith("passed")


def test_failing_check_raises_under_pytest():
    with pytest.raises(check.CheckFailed, match="top-left"):
        check.kv_step_mask(lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril())
