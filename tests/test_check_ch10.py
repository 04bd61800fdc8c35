"""Chapter 10 checkers: the right answers pass, each typical wrong answer fails with its hint (the
answer leaked into MQAR's input, keys then values, targets one position late, the mask missing
or everywhere, unpicked queries; gates not renormalised, the load counted over n instead of n·k,
P from the gates, no factor e, no gradient; the needle off by one block), and the checkers'
references agree with the package (``tasks.mqar``, ``MoE``, ``tasks.needle_block``)."""

import math

import numpy as np
import pytest
import torch

from minimodels import check, tasks
from minimodels.check import CheckFailed
from minimodels.check.ch10 import (
    NEEDLE_CASES,
    _from_batch,
    _layout,
    _layout_cases,
    _layout_mistakes,
    _needle_mistakes,
    _route,
    _route_cases,
    _route_mistakes,
)
from minimodels.models.moe import MoE

pytestmark = pytest.mark.ch10


# ---------------------------------------------------------------------------------------------
# Right answers, written as a learner would
# ---------------------------------------------------------------------------------------------


def right_layout(keys, values, pick, where, seqlen):
    b, n = keys.shape
    x = torch.zeros(b, seqlen, dtype=torch.long)
    x[:, :2 * n] = torch.stack([keys, values], dim=2).reshape(b, 2 * n)
    x.scatter_(1, where, keys.gather(1, pick))
    y = torch.zeros_like(x).scatter_(1, where, values.gather(1, pick))
    mask = torch.zeros(b, seqlen, dtype=torch.bool).scatter_(1, where, True)
    return x, y, mask


def loop_layout(keys, values, pick, where, seqlen):
    """The same with Python loops (and a list, not a tuple)."""
    b, n = keys.shape
    x = torch.zeros(b, seqlen, dtype=torch.int64)
    y = torch.zeros(b, seqlen, dtype=torch.int64)
    mask = torch.zeros(b, seqlen, dtype=torch.bool)
    for r in range(b):
        for i in range(n):
            x[r, 2 * i], x[r, 2 * i + 1] = keys[r, i], values[r, i]
        for j in range(pick.shape[1]):
            t, p = where[r, j], pick[r, j]
            x[r, t], y[r, t], mask[r, t] = keys[r, p], values[r, p], True
    return [x, y, mask]


def right_route(logits, k):
    n, e = logits.shape
    top, idx = logits.topk(k, dim=-1)
    gates = torch.zeros_like(logits).scatter(1, idx, torch.softmax(top, dim=-1))
    f = torch.bincount(idx.flatten(), minlength=e).to(logits.dtype) / (n * k)
    P = logits.softmax(dim=-1).mean(dim=0)
    return gates, e * (f * P).sum()


def masked_route(logits, k):
    """Mixtral's way: -inf outside the top k, then one softmax; f by one-hot counts."""
    n, e = logits.shape
    idx = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
    gates = logits.masked_fill(~keep, -math.inf).softmax(dim=-1)
    f = keep.to(logits.dtype).sum(0) / (n * k)
    return gates, e * (f * logits.softmax(-1).mean(0)).sum()


def test_right_answers_pass():
    assert check.mqar_layout(right_layout, strict=True)
    assert check.mqar_layout(loop_layout, strict=True)
    assert check.route(right_route, strict=True)
    assert check.route(masked_route, strict=True)
    assert check.needle_block(lambda d, n: round(d * (n - 1)), strict=True)
    assert check.needle_block(lambda d, n: int(d * (n - 1) + 0.5), strict=True)  # no ties here
    assert check.needle_block(tasks.needle_block, strict=True)


def not_yet(*args):
    raise NotImplementedError("Exercise")


@pytest.mark.parametrize("checker", [check.mqar_layout, check.route, check.needle_block])
def test_not_implemented(checker):
    verdict = checker(not_yet, strict=False)
    assert not verdict and "not implemented yet" in verdict.message


def test_a_crash_is_reported_not_hidden():
    def crashes(keys, values, pick, where, seqlen):
        return keys.gather(1, pick + 100), None, None

    verdict = check.mqar_layout(crashes, strict=False)
    assert not verdict and "raised RuntimeError" in verdict.message


# ---------------------------------------------------------------------------------------------
# 10.1: MQAR's layout
# ---------------------------------------------------------------------------------------------


def leak_value(keys, values, pick, where, seqlen):
    x, y, mask = right_layout(keys, values, pick, where, seqlen)
    return x.scatter(1, where, values.gather(1, pick)), y, mask


def value_after_query(keys, values, pick, where, seqlen):
    x, y, mask = right_layout(keys, values, pick, where, seqlen)
    for r in range(x.shape[0]):
        for j in range(where.shape[1]):
            if where[r, j] + 1 < seqlen:
                x[r, where[r, j] + 1] = values[r, pick[r, j]]
    return x, y, mask


def keys_then_values(keys, values, pick, where, seqlen):
    x, y, mask = right_layout(keys, values, pick, where, seqlen)
    x[:, :2 * keys.shape[1]] = torch.cat([keys, values], dim=1)
    return x, y, mask


def one_late(keys, values, pick, where, seqlen):
    x, _, _ = right_layout(keys, values, pick, where, seqlen)
    y = torch.zeros_like(x).scatter_(1, where + 1, values.gather(1, pick))  # IndexError at the end
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(1, where + 1, True)
    return x, y, mask


def first_keys(keys, values, pick, where, seqlen):
    m = where.shape[1]
    return right_layout(keys, values, torch.arange(m).expand_as(pick), where, seqlen)


def first_values_only(keys, values, pick, where, seqlen):
    x, _, mask = right_layout(keys, values, pick, where, seqlen)
    y = torch.zeros_like(x).scatter_(1, where, values[:, :where.shape[1]])
    return x, y, mask


def with_mask(rule):
    def wrong(keys, values, pick, where, seqlen):
        x, y, mask = right_layout(keys, values, pick, where, seqlen)
        return x, y, rule(x, mask)

    return wrong


@pytest.mark.parametrize("wrong, hint", [
    (leak_value, "leaked into the input: at a query position x holds the queried KEY"),
    (value_after_query, "leaked into the input: the value was also written right after"),
    (keys_then_values, "keys then values"),
    (lambda *a: _layout(*a, order="value first"), "value first"),
    (one_late, "one position late"),
    (lambda *a: _layout(*a, y_shift=1), "one position late"),
    (lambda *a: _layout(*a, mask_shift=1), "one position late"),
    (first_keys, r"first m keys \(keys\[:, :m\]\)"),
    (first_values_only, r"first m values"),
    (lambda *a: _layout(*a, y_holds="key"), "y holds the queried key"),
    (with_mask(lambda x, mask: torch.zeros_like(mask)), "mask is missing"),
    (with_mask(lambda x, mask: torch.ones_like(mask)), "mask is True everywhere"),
    (with_mask(lambda x, mask: x != 0), "every non-zero token"),
    (lambda *a: _layout(*a, mask_rule="after pairs"), "whole tail"),
    (lambda *a: right_layout(*a)[:2], "of length 2"),
    (lambda *a: torch.stack(right_layout(*a)[:2]), "one stacked tensor"),
    (lambda *a: (right_layout(*a)[0].int(), *right_layout(*a)[1:]), "x has dtype int32"),
    (lambda *a: (*right_layout(*a)[:2], right_layout(*a)[2].long()), "mask has dtype int64"),
    (lambda *a: tuple(t.T for t in right_layout(*a)), "swap batch and seqlen"),
])
def test_layout_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.mqar_layout(wrong, strict=True)


def test_layout_without_a_known_mistake_shows_where():
    def one_token_off(*a):
        x, y, mask = right_layout(*a)
        x[0, 0] = 0
        return x, y, mask

    with pytest.raises(CheckFailed, match=r"wrong x .*1 wrong entry.*row 0, position 0") as err:
        check.mqar_layout(one_token_off, strict=True)
    assert "Hint" not in str(err.value)


@pytest.mark.parametrize("batch, seqlen, n_pairs, n_queries, seed", [
    (64, 100, 6, 5, 1), (8, 40, 8, None, 0), (5, 11, 3, 5, 3), (3, 3, 1, 1, 4), (4, 57, 7, 2, 5),
])
def test_layout_reference_reproduces_tasks_mqar(batch, seqlen, n_pairs, n_queries, seed):
    """The checker's reference is the layout inside tasks.mqar: from a batch, recover the
    draws (keys, values, pick, where) and rebuild the batch exactly."""
    want = tasks.mqar(batch, seqlen, n_pairs=n_pairs, n_queries=n_queries, seed=seed)
    keys, values, pick, where = _from_batch(want, n_pairs)
    m = n_pairs if n_queries is None else n_queries
    assert keys.shape == values.shape == (batch, n_pairs)
    assert pick.shape == where.shape == (batch, m)
    assert bool((where >= 2 * n_pairs).all()) and bool((where < seqlen).all())
    assert bool(((0 <= pick) & (pick < n_pairs)).all())
    for got, expected in zip(_layout(keys, values, pick, where, seqlen), want, strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_layout_cases_meet_the_contract_and_expose_every_mistake():
    cases = _layout_cases()
    for case in cases:
        keys, values, pick, where, seqlen = case.args
        n = keys.shape[1]
        assert bool((where >= 2 * n).all()) and bool((where < seqlen).all()), case.label
        assert all(len(set(row)) == len(row) for row in where.tolist()), case.label
        assert all(len(set(row)) == len(row) for row in keys.tolist()), case.label
    keys, values, pick, where, seqlen = cases[0].args  # the first case separates the mistakes
    assert not torch.equal(pick, torch.arange(pick.shape[1]).expand_as(pick))
    assert bool((where.diff(dim=1) > 1).all()) and bool((where + 1 < seqlen).all())
    want = _layout(*cases[0].args)
    wrongs = [m.wrong(*cases[0].args) for m in _layout_mistakes()]
    for mistake, wrong in zip(_layout_mistakes(), wrongs, strict=True):
        assert any(not torch.equal(a, b) for a, b in zip(wrong, want, strict=True)), mistake.hint
    assert any(not torch.equal(*torch.broadcast_tensors(c.args[3], c.args[3].sort(1).values))
               for c in cases)  # one case has query positions out of order
    assert any(c.args[4] == 2 * c.args[0].shape[1] + c.args[2].shape[1] for c in cases)  # packed
    assert any(c.args[2].shape[1] > c.args[0].shape[1] for c in cases)  # more queries than pairs


# ---------------------------------------------------------------------------------------------
# 10.2: top-k routing and the balance loss
# ---------------------------------------------------------------------------------------------


def not_renormalised(logits, k):
    probs = logits.softmax(dim=-1)
    idx = probs.topk(k, dim=-1).indices
    return torch.zeros_like(probs).scatter(1, idx, probs.gather(1, idx)), right_route(logits, k)[1]


def raw_logits(logits, k):
    top, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(1, idx, top), right_route(logits, k)[1]


def f_over_n(logits, k):
    n, e = logits.shape
    gates, _ = right_route(logits, k)
    f = (gates > 0).to(logits.dtype).sum(0) / n
    return gates, e * (f * logits.softmax(-1).mean(0)).sum()


def P_from_gates(logits, k):
    n, e = logits.shape
    gates, _ = right_route(logits, k)
    f = (gates > 0).to(logits.dtype).sum(0) / (n * k)
    return gates, e * (f * gates.mean(0)).sum()


def no_factor_e(logits, k):
    gates, aux = right_route(logits, k)
    return gates, aux / logits.shape[1]


def aux_under_no_grad(logits, k):
    gates, _ = right_route(logits, k)
    with torch.no_grad():
        _, aux = right_route(logits, k)
    return gates, aux


def gates_detached(logits, k):
    gates, aux = right_route(logits, k)
    return gates.detach(), aux


def naive_exp(logits, k):
    top, idx = logits.topk(k, dim=-1)
    z = top.exp()
    return (torch.zeros_like(logits).scatter(1, idx, z / z.sum(-1, keepdim=True)),
            right_route(logits, k)[1])


@pytest.mark.parametrize("wrong, hint", [
    (not_renormalised, "not renormalised over the top k"),
    (raw_logits, "raw top-k logits"),
    (lambda l, k: _route(l, k, gates="softmax over tokens"), "over the tokens"),
    (lambda l, k: _route(l, k, gates="first k experts"), "experts 0 .. k-1"),
    (lambda l, k: _route(l, k, smallest=True), "SMALLEST"),
    (f_over_n, "k times too large"),
    (lambda l, k: _route(l, k, f_over="counts"), "f must be a share"),
    (lambda l, k: _route(l, k, f_over="gates"), "hard assignments"),
    (P_from_gates, "P comes from the top-k gates"),
    (lambda l, k: _route(l, k, P_sum=True), "MEAN over tokens"),
    (no_factor_e, "factor e"),
    (aux_under_no_grad, r"aux has no gradient .*no_grad"),
    (lambda l, k: (right_route(l, k)[0], right_route(l, k)[1].detach()), "aux has no gradient"),
    (gates_detached, "gates have no gradient"),
    (naive_exp, "overflows"),
    (lambda l, k: (right_route(l, k)[0], right_route(l, k)[1].item()), "Python number"),
    (lambda l, k: (right_route(l, k)[0], right_route(l, k)[1][None]), r"aux has shape \(1,\)"),
    (lambda l, k: (l.topk(k).values.softmax(-1), right_route(l, k)[1]), "dense"),
    (lambda l, k: (right_route(l, k)[0].float(), right_route(l, k)[1].float()),
     "gates has dtype float32"),
    (lambda l, k: right_route(l, k)[0], "one stacked tensor"),
])
def test_route_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.route(wrong, strict=True)


def test_route_wrong_gradient_is_named():
    """Values right, gradient wrong: aux's gradient flows through f (a soft count) too."""
    def soft_f(logits, k):
        n, e = logits.shape
        gates, aux = right_route(logits, k)
        hard = (gates > 0).to(logits.dtype)
        soft = hard + (gates - gates.detach())  # the same values, a gradient through the gates
        f = soft.sum(0) / (n * k)
        return gates, e * (f * logits.softmax(-1).mean(0)).sum()

    with pytest.raises(CheckFailed, match="gradient of aux with respect to the logits"):
        check.route(soft_f, strict=True)


def _moe_for(logits: torch.Tensor, k: int) -> tuple[MoE, torch.Tensor]:
    """An MoE whose router maps x = logits to the logits themselves (W_r = I)."""
    n, e = logits.shape
    moe = MoE(d_model=e, n_experts=e, top_k=k, d_ff=4).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(e, dtype=torch.float64))
    return moe, logits.double().clone()


@pytest.mark.parametrize("case", _route_cases(), ids=lambda c: c.label)
def test_route_reference_agrees_with_the_moe_module(case):
    """The checker's reference reproduces MoE.gates() and MoE.aux_loss (and its gradient) for a
    router that outputs the case's logits."""
    logits, k = case.args
    moe, x = _moe_for(logits, k)
    x.requires_grad_(True)
    gates, aux = _route(x, k)
    torch.testing.assert_close(gates, moe.gates(x), rtol=1e-12, atol=1e-12)
    moe(x)
    torch.testing.assert_close(aux, moe.aux_loss, rtol=1e-12, atol=1e-12)
    (g_ref,) = torch.autograd.grad(aux, x)
    (g_moe,) = torch.autograd.grad(moe.aux_loss, x)
    torch.testing.assert_close(g_ref, g_moe, rtol=1e-12, atol=1e-12)


def test_route_cases_avoid_ties_and_reach_the_edges():
    cases = _route_cases()
    for case in cases:
        logits, k = case.args
        e = logits.shape[1]
        if k < e:
            s = logits.double().sort(dim=-1, descending=True).values
            assert bool((s[:, k - 1] - s[:, k] > 0.05).all()), case.label
    shapes = [(c.args[0].shape, c.args[1]) for c in cases]
    assert any(k == 1 for _, k in shapes) and any(k == s[1] for s, k in shapes)
    assert any(s[0] == 1 for s, _ in shapes)
    assert any(c.args[0].dtype == torch.float32 and c.args[0].max() > 89 for c in cases)  # exp overflows
    _, aux = _route(*next(c for c in cases if c.args[1] == c.args[0].shape[1]).args)
    assert abs(aux.item() - 1) < 1e-12  # k = e: every expert gets n tokens, aux = Σ_i P_i = 1
    want = _route(*cases[0].args)
    for mistake in _route_mistakes():  # every mistake is visible on the first case
        wrong = mistake.wrong(*cases[0].args)
        assert not all(torch.allclose(a, b) for a, b in zip(wrong, want, strict=True)), mistake.hint


# ---------------------------------------------------------------------------------------------
# 10.3: the needle's depth
# ---------------------------------------------------------------------------------------------


def floor_block(depth, n_blocks):
    return math.floor(depth * (n_blocks - 1))


@pytest.mark.parametrize("wrong, hint", [
    (lambda d, n: int(d * n), r"off by one block.*int\(depth · n_blocks\)"),
    (lambda d, n: round(d * n), r"off by one block.*round\(depth · n_blocks\)"),
    (floor_block, r"off by one block.*truncated"),
    (lambda d, n: int(d * (n - 1)), r"off by one block.*truncated"),
    (lambda d, n: math.ceil(d * (n - 1)), r"off by one block.*rounded up"),
    (lambda d, n: n - 1 - round(d * (n - 1)), "counted from the question backwards"),
    (lambda d, n: round(d * (n - 1)) + 1, r"off by one block.*counted from 1"),
    (lambda d, n: d * (n - 1), "returned float"),
    (lambda d, n: float(round(d * (n - 1))), "returned float"),
    (lambda d, n: torch.tensor(d * (n - 1)).round(), "returned a torch.Tensor"),
    (lambda d, n: torch.tensor(round(d * (n - 1))), "returned a torch.Tensor"),
    (lambda d, n: np.int64(round(d * (n - 1))), "returned numpy.int64"),
    (lambda d, n: d == 1, "returned bool"),
])
def test_needle_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.needle_block(wrong, strict=True)


def test_needle_two_blocks_away_is_not_called_off_by_one():
    with pytest.raises(CheckFailed, match="yours 2, expected 0$"):
        check.needle_block(lambda d, n: round(d * (n - 1)) + 2, strict=True)


def test_needle_past_the_end_is_named():
    with pytest.raises(CheckFailed, match="index 10 is outside the haystack: its sentences are 0 .. 9"):
        check.needle_block(lambda d, n: int(d * n), strict=True)


def test_needle_cases_have_no_ties_and_expose_every_mistake():
    """No value is within 0.05 of a half (so any rounding of halves is right), and every mistake
    is wrong on some case and differs from every other mistake on some case."""
    for depth, n in NEEDLE_CASES:
        for x in (depth * (n - 1), depth * n):
            assert abs(x - math.floor(x) - 0.5) > 0.05, (depth, n)
        assert tasks.needle_block(depth, n) == round(depth * (n - 1))
    answers = [[m.wrong(d, n) for d, n in NEEDLE_CASES] for m in _needle_mistakes()]
    right = [tasks.needle_block(d, n) for d, n in NEEDLE_CASES]
    assert all(a != right for a in answers)
    assert len({tuple(a) for a in answers}) == len(answers)
    assert {(0.0, 10), (1.0, 10), (1.0, 1)} <= set(NEEDLE_CASES)  # both ends; a single block


def test_needle_block_reference_places_the_needle():
    """tasks.needle_block is where needle_in_haystack puts the needle, at both ends too."""
    secret = tasks.WORDS.index("secret")
    for seqlen in (11, 47, 60):
        n_blocks, pad = (seqlen - 5) // 6, (seqlen - 5) % 6
        for depth in (0.0, 0.3, 1.0):
            x = tasks.needle_in_haystack(2, seqlen, depth=depth, seed=seqlen).x
            blocks = x[:, pad:pad + 6 * n_blocks].reshape(2, n_blocks, 6)
            found = (blocks[:, :, 1] == secret).nonzero()[:, 1]
            assert found.tolist() == [tasks.needle_block(depth, n_blocks)] * 2
