"""Chapter 03 checkers: the solutions pass, and each typical wrong answer gets its hint."""

import copy

import pytest
import torch

from minimodels import check
from minimodels.kernels.wkv import wkv_ref

pytestmark = pytest.mark.ch03

MIN = -1e38


# --------------------------------------------------------------------------------------------
# Exercise 3.1
# --------------------------------------------------------------------------------------------


def wkv_loop(w, u, k, v, *, bonus=True, log_space=True, decay_first=False):
    batch, l, c = k.shape
    a, b = torch.zeros(batch, c, dtype=k.dtype), torch.zeros(batch, c, dtype=k.dtype)
    p = torch.full((batch, c), MIN if log_space else 0.0, dtype=k.dtype)
    uu = u if bonus else torch.zeros_like(u)
    y = torch.empty_like(k)
    for t in range(l):
        kt, vt = k[:, t], v[:, t]
        if decay_first and not log_space:
            a, b = torch.exp(-w) * a, torch.exp(-w) * b
        if log_space:
            wd = w
            if decay_first:  # the state decays before y_t is formed
                p, wd = p - w, 0.0
            q = torch.maximum(p, uu + kt)
            e1, e2 = torch.exp(p - q), torch.exp(uu + kt - q)
            y[:, t] = (e1 * a + e2 * vt) / (e1 * b + e2)
            pn = torch.maximum(p - wd, kt)
            e1, e2 = torch.exp(p - wd - pn), torch.exp(kt - pn)
            a, b, p = e1 * a + e2 * vt, e1 * b + e2, pn
        else:
            y[:, t] = (a + torch.exp(uu + kt) * vt) / (b + torch.exp(uu + kt))
            d = 1.0 if decay_first else torch.exp(-w)
            a, b = d * a + torch.exp(kt) * vt, d * b + torch.exp(kt)
    return y


def test_wkv_solution_passes():
    assert check.wkv_log_space(wkv_loop, strict=False).passed


def test_wkv_not_implemented():
    def stub(w, u, k, v):
        raise NotImplementedError("Exercise 3.1")

    v = check.wkv_log_space(stub, strict=False)
    assert not v and "not implemented yet" in v.message


@pytest.mark.parametrize("wrong, hint", [
    (lambda *a: wkv_loop(*a, bonus=False), "add the bonus u"),
    (lambda *a: wkv_loop(*a, log_space=False, decay_first=True), "one decay too many"),
    (lambda w, u, k, v: wkv_loop(w, u, k, v, decay_first=True), "one decay too many"),
])
def test_wkv_mistakes_get_hints(wrong, hint):
    v = check.wkv_log_space(wrong, strict=False)
    assert not v and hint in v.message, v.message


def test_wkv_naive_overflow_is_caught():
    v = check.wkv_log_space(lambda *a: wkv_loop(*a, log_space=False), strict=False)
    assert not v and "NaN or inf" in v.message and "running maximum" in v.message


def test_wkv_token_counted_twice():
    def twice(w, u, k, v):
        y = torch.empty_like(k)
        for t in range(k.shape[1]):  # the state holds token t when y_t is formed
            dist = (t - torch.arange(t + 1))[:, None].to(k.dtype)  # decayed before reading
            wts = torch.exp(-dist * w + k[:, :t + 1])
            wts = torch.cat([wts[:, :t], wts[:, t:] + torch.exp(u + k[:, t:t + 1])], 1)
            y[:, t] = (wts * v[:, :t + 1]).sum(1) / wts.sum(1)
        return y

    v = check.wkv_log_space(twice, strict=False)
    assert not v and "counted twice" in v.message, v.message


def test_wkv_strict_raises():
    with pytest.raises(check.CheckFailed):
        check.wkv_log_space(lambda *a: wkv_loop(*a, bonus=False))


# --------------------------------------------------------------------------------------------
# Exercise 3.2
# --------------------------------------------------------------------------------------------


def make_step(*, shift=True, bonus=True, gate=True, exp_decay=True, decay_first=False):
    def time_mix_step(tm, x_t, state):
        if state is None:
            z = torch.zeros_like(x_t)
            state = (z, z, z, torch.full_like(x_t, MIN))
        x_prev, a, b, p = state
        xp = x_prev if shift else x_t
        r, k, v = (W(mu * x_t + (1 - mu) * xp) for W, mu in
                   ((tm.Wr, tm.mu_r), (tm.Wk, tm.mu_k), (tm.Wv, tm.mu_v)))
        w = torch.exp(tm.time_decay) if exp_decay else tm.time_decay
        u = tm.time_first if bonus else torch.zeros_like(tm.time_first)
        if decay_first:
            p = p - w
        q = torch.maximum(p, u + k)
        e1, e2 = torch.exp(p - q), torch.exp(u + k - q)
        y = (e1 * a + e2 * v) / (e1 * b + e2)
        pn = torch.maximum(p - (0 if decay_first else w), k)
        e1, e2 = torch.exp(p - (0 if decay_first else w) - pn), torch.exp(k - pn)
        out = torch.sigmoid(r) * y if gate else y
        return tm.Wo(out), (x_t, e1 * a + e2 * v, e1 * b + e2, pn)

    return time_mix_step


def test_time_mix_solution_passes():
    assert check.time_mix_step(make_step(), strict=False).passed


@pytest.mark.parametrize("kw, hint", [
    ({"shift": False}, "without the token shift"),
    ({"bonus": False}, "bonus u is missing"),
    ({"gate": False}, "receptance gate"),
    ({"exp_decay": False}, "w = exp(time_decay)"),
    ({"decay_first": True}, "one step too early"),
])
def test_time_mix_mistakes_get_hints(kw, hint):
    v = check.time_mix_step(make_step(**kw), strict=False)
    assert not v and hint in v.message, v.message


def test_time_mix_naive_overflow_is_caught():
    def naive(tm, x_t, state):
        x_prev, A, B = (torch.zeros_like(x_t),) * 3 if state is None else state
        r, k, v = (W(mu * x_t + (1 - mu) * x_prev) for W, mu in
                   ((tm.Wr, tm.mu_r), (tm.Wk, tm.mu_k), (tm.Wv, tm.mu_v)))
        w, u = torch.exp(tm.time_decay), tm.time_first
        y = (A + torch.exp(u + k) * v) / (B + torch.exp(u + k))
        A, B = torch.exp(-w) * A + torch.exp(k) * v, torch.exp(-w) * B + torch.exp(k)
        return tm.Wo(torch.sigmoid(r) * y), (x_t, A, B)

    v = check.time_mix_step(naive, strict=False)
    assert not v and "NaN or inf" in v.message and "running maximum" in v.message


def test_time_mix_checker_leaves_models_untouched():
    from minimodels.check import ch03

    cases = ch03._time_mix_cases()
    before = copy.deepcopy(cases[1].args[0].state_dict())
    check.time_mix_step(make_step(), strict=False)
    after = ch03._time_mix_cases()[1].args[0].state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


# --------------------------------------------------------------------------------------------
# Exercise 3.3
# --------------------------------------------------------------------------------------------


def weights(w, u, k, *, bonus=True, shift=1, causal=True, naive=False):
    l, c = k.shape
    t = torch.arange(l)
    dist = (t[:, None] - shift - t[None, :]).to(k.dtype)[..., None]
    z = -dist * w + k[None]
    z[t, t] = (u + k) if bonus else k
    if causal:
        z = z.masked_fill((t[:, None] < t[None, :])[..., None], -torch.inf)
    if naive:
        e = torch.exp(z)
        return e / e.sum(1, keepdim=True)
    return torch.softmax(z, dim=1)


def test_weights_solution_passes_and_matches_kernel():
    assert check.wkv_weights(weights, strict=False).passed
    g = torch.Generator().manual_seed(0)
    w, u = torch.rand(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g,
                                                                         dtype=torch.float64)
    k, v = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))
    y = (weights(w, u, k) * v[None]).sum(1)
    torch.testing.assert_close(y, wkv_ref(w, u, k[None], v[None])[0])


@pytest.mark.parametrize("kw, hint", [
    ({"bonus": False}, "lacks the bonus"),
    ({"shift": 0}, "one decay too many"),
    ({"shift": 2}, "one decay too few"),
    ({"causal": False}, "future tokens"),
])
def test_weights_mistakes_get_hints(kw, hint):
    v = check.wkv_weights(lambda w, u, k: weights(w, u, k, **kw), strict=False)
    assert not v and hint in v.message, v.message


def test_weights_naive_overflow_is_caught():
    v = check.wkv_weights(lambda w, u, k: weights(w, u, k, naive=True), strict=False)
    assert not v and "NaN or inf" in v.message and "running maximum" in v.message


@pytest.mark.parametrize("wrap, hint", [
    (lambda step: lambda tm, x_t, state: step(tm, x_t, state)[0], "return a tuple (y_t, state)"),
    (lambda step: lambda tm, x_t, state: step(tm, x_t, state)[::-1], "y_t the output tensor"),
    (lambda step: lambda tm, x_t, state: (*step(tm, x_t, state), None), "a tuple of 3"),
    (lambda step: lambda tm, x_t, state: (step(tm, x_t, state)[0], None), "state returned"),
    (lambda step: lambda tm, x_t, state: (lambda y, s: (y[:, None], s))(*step(tm, x_t, state)),
     "one token in, one token out"),
])
def test_time_mix_structure_is_checked_before_unpacking(wrap, hint):
    # a tensor where a tuple is expected must not be unpacked along the batch and misreported
    v = check.time_mix_step(wrap(make_step()), strict=False)
    assert not v and hint in v.message and "wrong values" not in v.message, v.message
