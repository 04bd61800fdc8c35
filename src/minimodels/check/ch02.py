"""Checkers for chapter 02 (attention): causal softmax attention, merging two partial results
by their log-sum-exp, and the bottom-right causal mask of a KV-cache step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from minimodels.check import Case, Mistake, Verdict, _clone, _report, check_function
from minimodels.kernels.attention import attention_ref, causal_mask
from minimodels.kernels.attention import merge_attention as merge_attention_ref

__all__ = ["causal_attention", "kv_step_mask", "merge_attention"]


def _same(got, want) -> bool:
    """Equal to rounding, NaN where NaN (a mistake that overflows must match as NaN)."""
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and torch.allclose(got.double(), want.double(), 1e-5, 1e-5, equal_nan=True))


def _check(exercise: str, fn: Callable, cases: Sequence[Case], reference: Callable,
           mistakes: Sequence[Mistake], strict: bool | None,
           structure: Callable | None = None, raw: Callable | None = None) -> Verdict:
    """``check_function``, but a known mistake is named even when it produces NaN or inf
    (``check_function`` reports those as NaN before it looks for a matching mistake). The
    structure of what the learner's function returns (``raw``, else ``fn``) is checked first
    (``structure(got, case) -> problem or None``), so a tuple where a tensor is expected, or an
    integer mask, is named and never unpacked and misreported."""
    name = getattr(fn, "__name__", "your function")
    if structure is not None and cases:
        case = cases[0]
        try:
            got = (raw or fn)(*_clone(case.args))
        except Exception:  # check_function reports it (not implemented, raised X)
            got = None
        else:
            problem = structure(got, case)
            if problem is not None:
                return _report(Verdict(False, f"Exercise {exercise} ({name}): {problem}"),
                               strict)
    for case in cases:
        try:
            got = fn(*_clone(case.args))
        except Exception:  # check_function reports it
            break
        if _same(got, reference(*_clone(case.args))):
            continue
        matches = [m for m in mistakes if _same(got, m.wrong(*_clone(case.args)))]
        # two mistakes can agree on one case (an inverted mask and a wrong offset at lq = 1):
        # prefer the one that matches the learner's function on every case
        everywhere = [m for m in matches if _matches_everywhere(fn, m, cases)]
        if matches:
            hint = (everywhere or matches)[0].hint
            return _report(Verdict(False, f"Exercise {exercise} ({name}): wrong values on "
                                   f"{case.label}. Hint: {hint}"), strict)
        break
    return check_function(exercise, fn, cases, reference, mistakes, strict=strict)


def _matches_everywhere(fn: Callable, mistake: Mistake, cases: Sequence[Case]) -> bool:
    try:
        return all(_same(fn(*_clone(c.args)), mistake.wrong(*_clone(c.args))) for c in cases)
    except Exception:
        return False


def _randn(g, *shape, std=1.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)


# ---------------------------------------------------------------------------------------------
# Exercise 2.1: causal softmax attention
# ---------------------------------------------------------------------------------------------


def _causal(q, k, v):
    return attention_ref(q, k, v, causal=True)


def _attention_cases() -> list[Case]:
    g = torch.Generator().manual_seed(2)
    cases = []
    for label, (b, h, l, e), std, dtype in [
        ("random (1, 2, 5, 4)", (1, 2, 5, 4), 1.0, torch.float64),
        ("random (2, 3, 7, 8) float32", (2, 3, 7, 8), 1.0, torch.float32),
        ("length 1, (1, 1, 1, 3)", (1, 1, 1, 3), 1.0, torch.float64),
        ("large logits (scores up to ~1e4)", (1, 2, 6, 4), 30.0, torch.float32),
    ]:
        qkv = tuple(_randn(g, b, h, l, e, std=std if i < 2 else 1.0, dtype=dtype)
                    for i in range(3))
        cases.append(Case(label, qkv))
    return cases


def _attention_mistakes() -> list[Mistake]:
    def masked(q, k, v, keep, scale=None):
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        s = (q @ k.transpose(-2, -1)) * scale
        s = s.masked_fill(~keep, -math.inf)
        return torch.softmax(s, -1) @ v

    def diagonal_hidden(q, k, v):  # j < i
        l = q.shape[-2]
        return masked(q, k, v, torch.ones(l, l, dtype=torch.bool).tril(-1))

    def one_ahead(q, k, v):  # j <= i + 1
        l = q.shape[-2]
        return masked(q, k, v, torch.ones(l, l, dtype=torch.bool).tril(1))

    def upper(q, k, v):  # j >= i: the future instead of the past
        l = q.shape[-2]
        return masked(q, k, v, torch.ones(l, l, dtype=torch.bool).triu())

    def no_mask(q, k, v):
        return attention_ref(q, k, v)

    def fill_visible(q, k, v):  # masked_fill(keep, -inf): hides what should be shown
        l = q.shape[-2]
        return masked(q, k, v, ~torch.ones(l, l, dtype=torch.bool).tril())

    def no_scale(q, k, v):
        return attention_ref(q, k, v, causal=True, scale=1.0)

    def sqrt_l(q, k, v):
        return attention_ref(q, k, v, causal=True, scale=1 / math.sqrt(q.shape[-2]))

    def no_max(q, k, v):  # exp without subtracting the row max: overflows for large logits
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        w = torch.exp(s) * causal_mask(s.shape[-2], s.shape[-1])
        return (w / w.sum(-1, keepdim=True)) @ v

    return [
        Mistake("query i must see key i itself: the mask is j <= i (your mask hides the "
                "diagonal, so row 0 sees nothing).", diagonal_hidden),
        Mistake("off by one: query i sees key i + 1, a token from the future. Keep j <= i.",
                one_ahead),
        Mistake("your mask keeps j >= i (the future): keep the lower triangle j <= i.", upper),
        Mistake("no causal mask: every query sees every key.", no_mask),
        Mistake("your mask hides what it should show: masked_fill(mask, -inf) fills where the "
                "mask is True, so pass the positions to HIDE (~keep, j > i), not the visible "
                "ones.", fill_visible),
        Mistake("the scores are not scaled: multiply q kᵀ by 1/sqrt(e), e the head size.",
                no_scale),
        Mistake("scale by 1/sqrt(e) with e = q.shape[-1] (the head size), not the length.",
                sqrt_l),
        Mistake("exp overflowed: subtract each row's max score before exp (softmax does not "
                "change, the numbers stay finite).", no_max),
    ]


def _one_tensor(got, case) -> str | None:
    if isinstance(got, (tuple, list)):
        return (f"returned a {type(got).__name__} of {len(got)} on {case.label}: return one "
                "tensor, out (b, h, l, e), not a tuple (no lse, no weights).")
    return None


def causal_attention(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 2.1: ``fn(q, k, v) -> out``: softmax(q kᵀ / sqrt(e) + causal mask) v.

    q, k, v: (b, h, l, e) -> out: (b, h, l, e); query i sees keys j <= i."""
    return _check("2.1", fn, _attention_cases(), _causal, _attention_mistakes(), strict,
                  _one_tensor)


# ---------------------------------------------------------------------------------------------
# Exercise 2.2: merging two partial attention results by their log-sum-exp
# ---------------------------------------------------------------------------------------------


def _joined(fn):
    """fn's (out, lse) as one tensor (out and lse side by side on the last axis)."""

    def joined(*args):
        result = fn(*args)
        if not (isinstance(result, tuple) and len(result) == 2
                and all(isinstance(x, torch.Tensor) for x in result)):
            raise TypeError(f"return a tuple (out, lse) of two tensors, got "
                            f"{type(result).__name__}")
        out, lse = result
        if lse.shape != out.shape[:-1]:
            raise ValueError(f"lse must have shape (b, h, l) = {tuple(out.shape[:-1])}, got "
                             f"{tuple(lse.shape)}")
        return torch.cat([out, lse[..., None]], -1)

    joined.__name__ = getattr(fn, "__name__", "your function")
    return joined


def _merge_cases() -> list[Case]:
    g = torch.Generator().manual_seed(3)
    cases = []
    for label, (lq, lk1, lk2, e), std, dtype in [
        ("random halves of 6 + 5 keys, (1, 2, 4, 3)", (4, 6, 5, 3), 1.0, torch.float64),
        ("random halves of 1 + 9 keys, (2, 1, 3, 4), float32", (3, 1, 9, 4), 1.0, torch.float32),
        ("large logits (lse ~ 1e4)", (3, 4, 4, 4), 40.0, torch.float64),
    ]:
        q = _randn(g, 1, 2, lq, e, std=std, dtype=dtype)
        k = _randn(g, 1, 2, lk1 + lk2, e, std=std, dtype=dtype)
        v = _randn(g, 1, 2, lk1 + lk2, e, dtype=dtype)
        o1, s1 = attention_ref(q, k[..., :lk1, :], v[..., :lk1, :], return_lse=True)
        o2, s2 = attention_ref(q, k[..., lk1:, :], v[..., lk1:, :], return_lse=True)
        cases.append(Case(label, (o1, s1, o2, s2)))
    return cases


def _merge_mistakes() -> list[Mistake]:
    def joined(out, lse):
        return torch.cat([out, lse[..., None]], -1)

    def average(o1, s1, o2, s2):
        return joined((o1 + o2) / 2, torch.logaddexp(s1, s2))

    def max_lse(o1, s1, o2, s2):
        return joined(merge_attention_ref(o1, s1, o2, s2)[0], torch.maximum(s1, s2))

    def sum_lse(o1, s1, o2, s2):
        return joined(merge_attention_ref(o1, s1, o2, s2)[0], s1 + s2)

    def swapped(o1, s1, o2, s2):
        out, lse = merge_attention_ref(o1, s1, o2, s2)
        w1 = torch.exp(s1 - lse)[..., None]
        return joined((1 - w1) * o1 + w1 * o2, lse)

    def naive_exp(o1, s1, o2, s2):
        z1, z2 = torch.exp(s1), torch.exp(s2)
        out = (z1[..., None] * o1 + z2[..., None] * o2) / (z1 + z2)[..., None]
        return joined(out, torch.log(z1 + z2))

    def unnormalised(o1, s1, o2, s2):
        return joined(torch.exp(s1)[..., None] * o1 + torch.exp(s2)[..., None] * o2,
                      torch.logaddexp(s1, s2))

    return [
        Mistake("a plain average gives both halves the same weight: weight each part by its "
                "share of the total, exp(lse_i - lse).", average),
        Mistake("the merged lse is log(exp(lse1) + exp(lse2)), not the max of the two.",
                max_lse),
        Mistake("the merged lse is log(exp(lse1) + exp(lse2)), not lse1 + lse2.", sum_lse),
        Mistake("the weights are swapped: out1 gets exp(lse1 - lse).", swapped),
        Mistake("exp(lse) overflowed: compute lse = logaddexp(lse1, lse2) first, then use the "
                "weights exp(lse_i - lse), which lie in [0, 1].", naive_exp),
        Mistake("divide by the total: the weights exp(lse_i - lse) must sum to 1.",
                unnormalised),
    ]


def _pair_structure(result, case) -> str | None:
    if isinstance(result, torch.Tensor):
        return (f"returned one tensor on {case.label}: return a tuple (out, lse), the merged "
                "output (b, h, l, e) and its log-sum-exp (b, h, l).")
    if not (isinstance(result, tuple) and len(result) == 2
            and all(isinstance(x, torch.Tensor) for x in result)):
        what = (f"a {type(result).__name__} of {len(result)}"
                if isinstance(result, (tuple, list)) else type(result).__name__)
        return f"returned {what} on {case.label}: return a tuple (out, lse) of two tensors."
    out, lse = result
    if out.dim() + 1 == lse.dim() and lse.shape[:-1] == out.shape:
        return f"returned (lse, out) on {case.label}: return them in the order (out, lse)."
    if lse.shape != out.shape[:-1]:
        return (f"lse must have shape (b, h, l) = {tuple(out.shape[:-1])} on {case.label}, got "
                f"{tuple(lse.shape)}.")
    return None


def merge_attention(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 2.2: ``fn(out1, lse1, out2, lse2) -> (out, lse)``: attention over the union of
    two disjoint key sets from the results over each. out_i: (b, h, l, e); lse_i: (b, h, l)."""
    return _check("2.2", _joined(fn), _merge_cases(), _joined(merge_attention_ref),
                  _merge_mistakes(), strict, _pair_structure, raw=fn)


# ---------------------------------------------------------------------------------------------
# Exercise 2.3: the bottom-right causal mask of a KV-cache step
# ---------------------------------------------------------------------------------------------


def _mask_cases() -> list[Case]:
    return [Case(f"lq={lq}, lk={lk}", (lq, lk)) for lq, lk in
            [(1, 6), (3, 7), (4, 4), (1, 1), (2, 9)]]


def _mask_mistakes() -> list[Mistake]:
    def top_left(lq, lk):  # j <= i
        return torch.ones(lq, lk, dtype=torch.bool).tril()

    def strict(lq, lk):  # j < i + (lk - lq)
        return torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq - 1)

    def one_ahead(lq, lk):
        return torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq + 1)

    def offset_wrong_way(lq, lk):  # j <= i + (lq - lk)
        return torch.ones(lq, lk, dtype=torch.bool).tril(lq - lk)

    def inverted(lq, lk):  # True = hidden
        return ~causal_mask(lq, lk)

    def inverted_top_left(lq, lk):
        return ~torch.ones(lq, lk, dtype=torch.bool).tril()

    return [
        Mistake("your mask hides what it should show: True must mean 'query i may see key j' "
                "(j <= i + lk - lq); yours is True where the key is hidden.", inverted),
        Mistake("your mask hides what it should show (True must mean visible), and it is "
                "top-left aligned: query i sits at position i + (lk - lq).", inverted_top_left),
        Mistake("this is the top-left mask j <= i: with a KV cache the queries are the LAST lq "
                "positions, so query i sits at position i + (lk - lq).", top_left),
        Mistake("the offset goes the other way: query i sits at position i + (lk - lq).",
                offset_wrong_way),
        Mistake("off by one: a query must see its own key (j <= i + lk - lq).", strict),
        Mistake("off by one: query i sees one key from its future.", one_ahead),
    ]


def kv_step_mask(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 2.3: ``fn(lq, lk) -> mask``: (lq, lk) bool, True where query i (the last lq of
    lk positions) may see key j."""
    return _check("2.3", fn, _mask_cases(), causal_mask, _mask_mistakes(), strict,
                  _bool_mask)


def _bool_mask(got, case) -> str | None:
    if isinstance(got, (tuple, list)):
        return f"returned a {type(got).__name__} on {case.label}: return one (lq, lk) tensor."
    if isinstance(got, torch.Tensor) and got.dtype != torch.bool:
        return (f"returned a {str(got.dtype)[6:]} tensor on {case.label}: return a boolean "
                "mask (dtype torch.bool, True where query i may see key j), e.g. from a "
                "comparison such as j <= i + (lk - lq), not ones/zeros.")
    return None
