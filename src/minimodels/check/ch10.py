"""Checkers for chapter 10 (the long-context arena): MQAR's key-value layout, top-k routing with
the load-balancing loss, and the needle's depth placement.

References: Arora et al., "Zoology" (2023), section 3 (multi-query associative recall); Fedus
et al., "Switch Transformers" (2021), section 2.2, eq. 4 (aux = N · Σ_i f_i · P_i); Jiang et
al., "Mixtral of experts" (2024), section 2.1 (gates = softmax over the top-k logits); Kamradt,
"Needle in a haystack" (2023) and Gemini Team, "Gemini 1.5" (2024), section 5.2.1 (depth).

Each keeps its list of typical mistakes beside it (``_layout_mistakes``, ``_route_mistakes``,
``_needle_mistakes``) and names the one it recognises: the answer leaked into the input, keys
then values instead of interleaved pairs, targets one position late, the mask missing or
everywhere, the first m keys queried instead of the picked ones; gates not renormalised over
the top k, raw logits as gates, the load counted over n tokens instead of n·k assignments, P
from the top-k gates, a missing factor e, an aux loss without gradient; the needle's block
scaled by n_blocks, truncated instead of rounded, or counted back from the question.

Glossary: ``b`` batch, ``l`` = seqlen, ``n`` pairs (10.1) or tokens (10.2), ``m`` queries,
``e`` experts, ``k`` top_k. The references are ``minimodels.tasks.mqar``'s layout (``_layout``,
tested to reproduce ``tasks.mqar``), ``minimodels.models.moe``'s equations (``_route``, tested
against an ``MoE`` module) and ``minimodels.tasks.needle_block``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from minimodels import tasks
from minimodels.check import Case, Mistake, Verdict, _clone, _report

__all__ = ["mqar_layout", "needle_block", "route"]


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", "your function")


def _call(fn: Callable, case: Case):
    """fn on a copy of the case's arguments; ("ok", result) or ("raised", exception)."""
    try:
        return "ok", fn(*_clone(case.args))
    except Exception as err:  # the learner's bug, or a mistake that cannot run on this case
        return "raised", err


def _raised(prefix: str, err: Exception, case: Case) -> str:
    if isinstance(err, NotImplementedError):
        return (f"{prefix} not implemented yet: replace the `raise NotImplementedError` with "
                "your code.")
    return f"{prefix} raised {type(err).__name__} on {case.label}: {err}"


def _check_parts(
    exercise: str,
    fn: Callable,
    cases: Sequence[Case],
    reference: Callable,
    mistakes: Sequence[Mistake],
    names: tuple[str, ...],
    *,
    structure: Callable,
    same: Callable,
    describe: Callable,
    after: Callable | None = None,
    strict: bool | None = None,
) -> Verdict:
    """Run ``fn`` on every case; its result is a tuple of parts called ``names``.

    For each case: the structure of what ``fn`` returned (``structure(got, want, case) ->
    problem or None``) comes first, then each part in order. The first wrong part is compared
    with the same part of every mistake (``mistake.wrong`` returns the whole tuple, right
    except where the mistake is); a mistake that matches on every case is preferred, so one
    verdict names one mistake even when two coincide on a case. ``after(fn) -> problem or
    None`` runs once every value is right (a gradient check)."""
    prefix = f"Exercise {exercise} ({_name(fn)}):"

    def verdict(ok: bool, text: str) -> Verdict:
        return _report(Verdict(ok, text if ok else f"{prefix} {text}"), strict)

    for case in cases:
        want = reference(*_clone(case.args))
        status, got = _call(fn, case)
        if status == "raised":
            return _report(Verdict(False, _raised(prefix, got, case)), strict)
        problem = structure(got, want, case)
        if problem is not None:
            return verdict(False, problem)
        for i, part in enumerate(names):
            if same(got[i], want[i]):
                continue
            hint = _hint(fn, i, got[i], want[i], case, cases, mistakes, same)
            text = describe(part, got[i], want[i], case)
            return verdict(False, text + (f". Hint: {hint}" if hint else ""))
    if after is not None:
        problem = after(fn)
        if problem is not None:
            return verdict(False, problem)
    return verdict(True, f"{prefix} passed {len(cases)} checks.")


def _hint(fn, i, got_i, want_i, case, cases, mistakes, same) -> str | None:
    matches = []
    for mistake in mistakes:
        status, wrong = _call(mistake.wrong, case)
        if status == "ok" and not same(wrong[i], want_i) and same(got_i, wrong[i]):
            matches.append(mistake)
    if not matches:
        return None

    def everywhere(mistake: Mistake) -> bool:
        for c in cases:
            s1, got = _call(fn, c)
            s2, wrong = _call(mistake.wrong, c)
            if s1 != "ok" or s2 != "ok" or not same(got[i], wrong[i]):
                return False
        return True

    return next((m for m in matches if everywhere(m)), matches[0]).hint


def _parts_structure(got, names: tuple[str, ...], case: Case) -> str | None:
    """None when got is a tuple (or list) of len(names) tensors, else what is wrong."""
    want = "a tuple (" + ", ".join(names) + ")"
    if isinstance(got, torch.Tensor):
        return (f"returned one tensor of shape {tuple(got.shape)} on {case.label}: return {want}, "
                "not one stacked tensor")
    if not isinstance(got, (tuple, list)) or len(got) != len(names):
        size = f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""
        return f"returned {type(got).__name__}{size} on {case.label}: return {want}"
    for name, t in zip(names, got, strict=True):
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__} on {case.label}: return {want} of tensors"
    return None


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# =============================================================================================
# Exercise 10.1: MQAR's key-value layout
# =============================================================================================

LAYOUT_PARTS = ("x", "y", "mask")


def _layout(keys, values, pick, where, seqlen, *, order="interleaved", x_at_query="key",
            value_after_query=False, first_keys=False, first_values=False, y_shift=0,
            y_holds="value", mask_rule="where", mask_shift=0):
    """MQAR's layout (as in ``tasks.mqar``) with switches that reproduce typical mistakes.

    keys, values (b, n) int64; pick, where (b, m) int64 -> x, y (b, seqlen) int64, mask
    (b, seqlen) bool:  x = k_1 v_1 … k_n v_n 0 … with x[where_j] = keys[pick_j];
    y[where_j] = values[pick_j]; mask True exactly at where."""
    b, n = keys.shape
    m = pick.shape[1]
    qk = keys[:, :m] if first_keys else keys.gather(1, pick)  # (b, m) the queried keys
    qv = values[:, :m] if first_values else values.gather(1, pick)  # (b, m) their values
    x = torch.zeros(b, seqlen, dtype=torch.long)
    if order == "interleaved":
        x[:, :2 * n] = torch.stack([keys, values], 2).reshape(b, 2 * n)  # k_1 v_1 k_2 v_2 …
    elif order == "blocks":
        x[:, :2 * n] = torch.cat([keys, values], 1)  # k_1 … k_n v_1 … v_n
    else:  # "value first"
        x[:, :2 * n] = torch.stack([values, keys], 2).reshape(b, 2 * n)
    if value_after_query:  # the value written right after its query (where it fits)
        after = where + 1
        fits = after < seqlen
        x[torch.arange(b)[:, None].expand_as(after)[fits], after[fits]] = qv[fits]
    x.scatter_(1, where, qk if x_at_query == "key" else qv)
    y = torch.zeros(b, seqlen, dtype=torch.long)
    at = where + y_shift
    fits = at < seqlen
    rows = torch.arange(b)[:, None].expand_as(at)
    y[rows[fits], at[fits]] = (qv if y_holds == "value" else qk)[fits]
    mask = torch.zeros(b, seqlen, dtype=torch.bool)
    if mask_rule == "where":
        at = where + mask_shift
        fits = at < seqlen
        mask[rows[fits], at[fits]] = True
    elif mask_rule == "everywhere":
        mask[:] = True
    elif mask_rule == "nonzero x":
        mask = x != 0
    elif mask_rule == "after pairs":
        mask[:, 2 * n:] = True
    # mask_rule "none": all False
    return x, y, mask


def _from_batch(batch: tasks.Batch, n_pairs: int):
    """Recover (keys, values, pick, where) from a ``tasks.mqar`` batch: keys and values are the
    first 2n tokens (interleaved), where the scored positions in order, pick the index of each
    queried key among the (distinct) keys."""
    x, _, mask = batch
    b = x.shape[0]
    keys, values = x[:, 0:2 * n_pairs:2], x[:, 1:2 * n_pairs:2]  # (b, n), (b, n)
    where = mask.nonzero()[:, 1].reshape(b, -1)  # (b, m) row-major order, so sorted per row
    pick = (x.gather(1, where)[..., None] == keys[:, None, :]).long().argmax(-1)  # (b, m)
    return keys.clone(), values.clone(), pick, where


def _layout_cases() -> list[Case]:
    g = torch.Generator().manual_seed(101)

    def pairs(b, n):
        keys = torch.rand(b, 24, generator=g).argsort(1)[:, :n] + 1  # distinct keys 1..24
        values = torch.randint(25, 49, (b, n), generator=g)  # values 25..48
        return keys, values

    # first: sparse queries, none adjacent, none at the end, pick != arange(m) (every mistake
    # differs from the right answer and from the others here)
    keys, values = pairs(2, 4)
    pick = torch.tensor([[2, 0, 2], [3, 1, 0]])
    where = torch.tensor([[9, 12, 16], [10, 14, 17]])
    cases = [Case("2 rows, 4 pairs, 3 queries, seqlen 20", (keys, values, pick, where, 20))]
    for label, (b, l, n, m, seed) in [
        ("tasks.mqar(3, 32, n_pairs=6, n_queries=4, seed=10)", (3, 32, 6, 4, 10)),
        ("tasks.mqar(2, 11, n_pairs=3, n_queries=5): more queries than pairs, no blanks",
         (2, 11, 3, 5, 1)),
        ("tasks.mqar(1, 3, n_pairs=1, n_queries=1): one pair, one query", (1, 3, 1, 1, 2)),
    ]:
        batch = tasks.mqar(b, l, n_pairs=n, n_queries=m, seed=seed)
        cases.append(Case(label, (*_from_batch(batch, n), l)))
    keys, values = pairs(2, 5)
    pick = torch.tensor([[4, 1, 1, 3], [0, 2, 4, 4]])
    where = torch.tensor([[23, 11, 17, 14], [12, 20, 15, 24]])  # not in increasing order
    cases.append(Case("query positions not in increasing order, seqlen 25",
                      (keys, values, pick, where, 25)))
    return cases


def _layout_mistakes() -> list[Mistake]:
    def wrong(**kw):
        return lambda *a: _layout(*a, **kw)

    late = ("targets one position late: y[t] is what the model must say after reading x[t], "
            "and the query's answer is due as soon as the query is read: put y and the mask at "
            "the query's own position, not the next one.")
    return [
        Mistake("the answer leaked into the input: at a query position x holds the queried "
                "KEY; its value is the target y, which the model must recall.",
                wrong(x_at_query="value")),
        Mistake("the answer leaked into the input: the value was also written right after its "
                "query. After the pairs, x holds only the queried keys (0 elsewhere).",
                wrong(value_after_query=True)),
        Mistake("keys then values (k_1 … k_n v_1 … v_n): the pairs are interleaved, "
                "k_1 v_1 k_2 v_2 …, so each value sits right after its key.",
                wrong(order="blocks")),
        Mistake("each pair is written value first: the layout is k_1 v_1 k_2 v_2 … (key, "
                "then its value).", wrong(order="value first")),
        Mistake("the queries use the first m keys (keys[:, :m]): query j asks for pair "
                "pick[:, j], i.e. keys.gather(1, pick).", wrong(first_keys=True)),
        Mistake("the targets are the first m values (values[:, :m]): query j's answer is the "
                "value of pair pick[:, j], i.e. values.gather(1, pick).", wrong(first_values=True)),
        Mistake(late, wrong(y_shift=1)),
        Mistake(late, wrong(mask_shift=1)),
        Mistake("y holds the queried key: the target is the key's value.",
                wrong(y_holds="key")),
        Mistake("the mask is missing (all False): nothing would be scored. It is True exactly "
                "at the query positions.", wrong(mask_rule="none")),
        Mistake("the mask is True everywhere: only the query positions are scored (the model "
                "cannot predict the random pairs).", wrong(mask_rule="everywhere")),
        Mistake("the mask is True at every non-zero token, pairs included: only the query "
                "positions are scored.", wrong(mask_rule="nonzero x")),
        Mistake("the mask covers the whole tail after the pairs: only the query positions are "
                "scored, not the blanks between them.", wrong(mask_rule="after pairs")),
    ]


def _layout_structure(got, want, case) -> str | None:
    problem = _parts_structure(got, LAYOUT_PARTS, case)
    if problem is not None:
        return problem
    for name, t, w in zip(LAYOUT_PARTS, got, want, strict=True):
        if t.dtype != w.dtype:
            fix = ("a bool tensor, True where y is scored (dtype=torch.bool)" if name == "mask"
                   else "int64 token ids, like keys (dtype=torch.long)")
            return f"{name} has dtype {_dtype(t)} on {case.label}, expected {_dtype(w)}: {fix}"
        if t.shape != w.shape:
            msg = (f"{name} has shape {tuple(t.shape)} on {case.label}, expected "
                   f"{tuple(w.shape)} = (batch, seqlen)")
            if t.dim() == 2 and tuple(t.shape) == tuple(w.shape)[::-1]:
                msg += ". Hint: did you swap batch and seqlen?"
            return msg
    return None


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def _describe_tokens(part, got, want, case) -> str:
    bad = (got != want).nonzero()
    r, t = bad[0].tolist()
    lo, hi = max(0, t - 4), min(want.shape[1], t + 5)

    def show(x):
        return "[" + ", ".join(str(int(v)) for v in x[r, lo:hi].tolist()) + "]"

    entries = "1 wrong entry" if len(bad) == 1 else f"{len(bad)} wrong entries"
    return (f"wrong {part} on {case.label}: {entries}, the first at row {r}, position {t}: "
            f"yours {int(got[r, t])}, expected {int(want[r, t])}; "
            f"yours {part}[{r}, {lo}:{hi}] = {show(got)}, expected {show(want)}")


def mqar_layout(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 10.1: ``fn(keys, values, pick, where, seqlen) -> (x, y, mask)``: keys, values
    (b, n) int64; pick (b, m) the pair each query asks for; where (b, m) the query positions
    (>= 2n, distinct per row); x = k_1 v_1 … k_n v_n then 0 except x[where] = the queried
    keys; y = the queried values at where, 0 elsewhere; mask True exactly at where."""
    return _check_parts("10.1", fn, _layout_cases(), _layout, _layout_mistakes(), LAYOUT_PARTS,
                        structure=_layout_structure, same=_equal, describe=_describe_tokens,
                        strict=strict)


# =============================================================================================
# Exercise 10.2: top-k routing and the load-balancing loss
# =============================================================================================

ROUTE_PARTS = ("gates", "aux")


def _route(logits, k, *, gates="top-k softmax", smallest=False, f_over="n·k", P_from="softmax",
           times_e=True, P_sum=False):
    """Mixtral's gates and Switch's balance loss (``minimodels.models.moe``), with switches
    that reproduce typical mistakes. logits (n, e) -> gates (n, e), aux ().

        gates = softmax over the k largest logits of each row, scattered into (n, e)
        aux   = e · Σ_i f_i · P_i,  f_i = (assignments to i) / (n·k),  P_i = mean_t softmax_i"""
    n, e = logits.shape
    top, idx = logits.topk(k, dim=-1, largest=not smallest)  # (n, k), (n, k)
    if gates == "top-k softmax":
        g = top.softmax(dim=-1)  # (n, k)
    elif gates == "softmax then top-k":  # not renormalised over the top k
        g = logits.softmax(dim=-1).gather(1, idx)
    elif gates == "raw logits":
        g = top
    elif gates == "softmax over tokens":
        g = top.softmax(dim=0)
    else:  # "first k experts": the right gates, at the wrong experts (below)
        g = top.softmax(dim=-1)
    G = torch.zeros_like(logits).scatter(1, idx, g)  # (n, e)
    if gates == "first k experts":
        G = torch.zeros_like(logits)
        G[:, :k] = g
    counts = torch.zeros(e, dtype=logits.dtype).index_add_(
        0, idx.reshape(-1), torch.ones(n * k, dtype=logits.dtype))  # (e,) assignments per expert
    f = {"n·k": counts / (n * k), "n": counts / n, "counts": counts,
         "gates": G.mean(dim=0)}[f_over]  # (e,)
    probs = G if P_from == "gates" else logits.softmax(dim=-1)  # (n, e)
    P = probs.sum(dim=0) if P_sum else probs.mean(dim=0)  # (e,)
    aux = (f * P).sum() * (e if times_e else 1)
    return G, aux


def _route_cases() -> list[Case]:
    """Random logits whose k-th and (k+1)-th largest differ by at least 0.05 in every row, so
    the top k is the same in any dtype or implementation (ties avoided)."""
    g = torch.Generator().manual_seed(102)

    def logits(n, e, k, dtype=torch.float64, shift=0.0):
        while True:
            x = torch.randn(n, e, generator=g, dtype=torch.float64) + shift
            s = x.sort(dim=-1, descending=True).values
            if k == e or bool((s[:, k - 1] - s[:, k] > 0.05).all()):
                return x.to(dtype)

    return [
        Case("n = 8 tokens, e = 4 experts, k = 2", (logits(8, 4, 2), 2)),
        Case("n = 7, e = 5, k = 2, float32", (logits(7, 5, 2, torch.float32), 2)),
        Case("n = 5, e = 3, k = 1 (Switch)", (logits(5, 3, 1), 1)),
        Case("n = 5, e = 4, k = e = 4 (every expert)", (logits(5, 4, 4), 4)),
        Case("n = 1 token, e = 6, k = 2", (logits(1, 6, 2), 2)),
        Case("n = 6, e = 4, k = 3, float32 logits near 100 (exp overflows float32)",
             (logits(6, 4, 3, torch.float32, shift=100.0), 3)),
    ]


def _route_mistakes() -> list[Mistake]:
    def wrong(**kw):
        return lambda logits, k: _route(logits, k, **kw)

    return [
        Mistake("the gates are not renormalised over the top k: a softmax over all e experts, "
                "then zeroed outside the top k, leaves rows that sum to less than 1. Take the "
                "softmax over the k largest logits only (Mixtral).",
                wrong(gates="softmax then top-k")),
        Mistake("the gates are the raw top-k logits: take their softmax over the k chosen "
                "experts, so each row is positive and sums to 1.", wrong(gates="raw logits")),
        Mistake("the softmax runs over the tokens (dim=0): normalise each token's k gates "
                "(dim=-1).", wrong(gates="softmax over tokens")),
        Mistake("the gates sit on experts 0 .. k-1: scatter them to the chosen experts (the "
                "indices topk returns).", wrong(gates="first k experts")),
        Mistake("the k SMALLEST logits were chosen: route each token to its k largest.",
                wrong(smallest=True)),
        Mistake("aux is k times too large: f_i is the share of the n·k assignments that went "
                "to expert i (divide the counts by n·k, not by n), so Σ_i f_i = 1.",
                wrong(f_over="n")),
        Mistake("f must be a share: divide each expert's count of assignments by n·k.",
                wrong(f_over="counts")),
        Mistake("f_i must count the hard assignments to expert i (how many of the n·k top-k "
                "choices are i, over n·k), not average the gates.", wrong(f_over="gates")),
        Mistake("P comes from the top-k gates: P_i is the mean over tokens of softmax(logits) "
                "over ALL experts (the router's full probabilities), which is what lets the "
                "loss push probability towards unused experts.", wrong(P_from="gates")),
        Mistake("P_i is the MEAN over tokens of softmax(logits)_i, not the sum.",
                wrong(P_sum=True)),
        Mistake("the factor e (the number of experts) is missing: aux = e · Σ_i f_i · P_i, "
                "which is 1 at perfect balance whatever e is.", wrong(times_e=False)),
    ]


def _route_structure(got, want, case) -> str | None:
    problem = _parts_structure(got, ROUTE_PARTS, case)
    if problem is not None:
        if isinstance(got, (tuple, list)) and len(got) == 2 and isinstance(got[0], torch.Tensor) \
                and isinstance(got[1], (float, int)):
            problem += (" (aux is a Python number: keep it a tensor computed from the logits, "
                        "so the router gets its gradient)")
        return problem
    gates, aux = got
    n, e = want[0].shape
    k = case.args[1]
    if gates.dtype != want[0].dtype or aux.dtype != want[1].dtype:
        bad = "gates" if gates.dtype != want[0].dtype else "aux"
        return (f"{bad} has dtype {_dtype(got[ROUTE_PARTS.index(bad)])} on {case.label}, "
                f"expected {_dtype(want[0])} (the logits' dtype)")
    if gates.shape != (n, e):
        msg = f"gates has shape {tuple(gates.shape)} on {case.label}, expected (n, e) = {(n, e)}"
        if gates.shape == (n, k) and k != e:
            msg += (": return the dense (n, e) matrix, zero outside each row's top k "
                    "(scatter the k gates to their experts)")
        return msg
    if aux.shape != ():
        return (f"aux has shape {tuple(aux.shape)} on {case.label}: it is one number, a scalar "
                "tensor of shape () (sum over the experts)")
    if not bool(torch.isfinite(gates).all()) or not bool(torch.isfinite(aux)):
        return (f"NaN or inf on {case.label}: exp of a large logit overflows; use "
                "torch.softmax (it subtracts the row's max first)")
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def _describe_route(part, got, want, case) -> str:
    if part == "aux":
        ratio = got.item() / want.item()
        return (f"wrong aux on {case.label}: yours {got.item():.6g}, expected "
                f"{want.item():.6g} (yours / expected = {ratio:.4g})")
    err = (got.double() - want.double()).abs()
    r = int(err.max(dim=1).values.argmax())
    row_sums = got.double().sum(dim=1)
    nonzero = (got != 0).sum(dim=1)
    k = case.args[1]
    msg = (f"wrong gates on {case.label}: max |error| {err.max().item():.3g} in row {r}: yours "
           f"[{', '.join(f'{v:.4g}' for v in got[r].tolist())}], expected "
           f"[{', '.join(f'{v:.4g}' for v in want[r].tolist())}]")
    if bool(nonzero[r] > k):
        msg += f" (yours has {int(nonzero[r])} non-zero gates in that row, expected <= k = {k})"
    elif not math.isclose(row_sums[r].item(), 1.0, abs_tol=1e-5):
        msg += f" (yours sums to {row_sums[r].item():.4g}, expected 1)"
    return msg


def _route_gradient(fn: Callable) -> str | None:
    """The router learns through both outputs: aux must carry a gradient to the logits (through
    P), and the gates too (through the top-k softmax). Both gradients must equal the
    reference's."""
    logits, k = _route_cases()[0].args
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7),
                          dtype=logits.dtype)
    mine = logits.clone().requires_grad_(True)
    where = "when the logits require grad"
    try:
        gates, aux = fn(mine, k)
    except Exception as err:  # the learner's bug (say .numpy() on a tensor that needs grad)
        return f"raised {type(err).__name__} {where}: {err}"
    if aux.grad_fn is None:
        return (f"aux has no gradient {where} (aux.grad_fn is None): was it computed under "
                "torch.no_grad() or from detached values (.detach(), .item(), a new tensor)? "
                "The balance loss trains the router only through its gradient (via P)")
    if gates.grad_fn is None:
        return (f"gates have no gradient {where} (gates.grad_fn is None): computed under "
                "torch.no_grad() or from detached values? The router learns from the task loss "
                "through the gates")
    ref = logits.clone().requires_grad_(True)
    ref_gates, ref_aux = _route(ref, k)
    for name, out, ref_out in (("aux", aux, ref_aux),
                               ("gates", (gates * weights).sum(), (ref_gates * weights).sum())):
        (g_mine,) = torch.autograd.grad(out, mine, allow_unused=True)
        (g_ref,) = torch.autograd.grad(ref_out, ref)
        if g_mine is None or not _close(g_mine, g_ref):
            return (f"the gradient of {name} with respect to the logits is wrong (values are "
                    "right): f counts hard assignments (no gradient), P = the mean of "
                    "softmax(logits) carries it; the gates' gradient flows through the softmax "
                    "of the top-k logits")
    return None


def route(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 10.2: ``fn(logits, k) -> (gates, aux)``: logits (n, e); gates (n, e), zero
    outside each row's k largest logits and the softmax over those k (rows sum to 1); aux =
    e · Σ_i f_i · P_i, f_i the share of the n·k assignments that went to expert i and P_i the
    mean over tokens of softmax(logits)_i over all experts (Switch Transformer eq. 4); both
    differentiable with respect to the logits."""
    return _check_parts("10.2", fn, _route_cases(), _route, _route_mistakes(), ROUTE_PARTS,
                        structure=_route_structure, same=_close, describe=_describe_route,
                        after=_route_gradient, strict=strict)


# =============================================================================================
# Exercise 10.3: the needle's depth placement
# =============================================================================================

# depth · (n_blocks − 1) is never within 0.05 of a half here (Python's round sends halves to the
# even neighbour, int(x + 0.5) does not: both are right away from ties), and neither is any
# mistake's value; every mistake is off on at least one case (tests/test_check_ch10.py).
NEEDLE_CASES = [(0.0, 10), (1.0, 10), (0.9, 4), (0.66, 7), (0.2, 8), (0.45, 13), (0.3, 11),
                (0.25, 1), (1.0, 1)]


def _needle_cases() -> list[Case]:
    return [Case(f"depth {d}, n_blocks {n}", (d, n)) for d, n in NEEDLE_CASES]


def _needle_mistakes() -> list[Mistake]:
    return [
        Mistake("int(depth · n_blocks) scales by n_blocks: at depth 1 it gives index n_blocks, "
                "one past the last sentence. The sentences are numbered 0 .. n_blocks − 1, so "
                "scale by n_blocks − 1.", lambda d, n: int(d * n)),
        Mistake("round(depth · n_blocks) scales by n_blocks: depth 1 must land on the last "
                "sentence, n_blocks − 1; scale by n_blocks − 1.", lambda d, n: round(d * n)),
        Mistake("the position was truncated (int() or floor): at depth 0.9 with 4 sentences, "
                "depth · (n_blocks − 1) = 2.7 is nearest to sentence 3. Round it.",
                lambda d, n: math.floor(d * (n - 1))),
        Mistake("the position was rounded up (ceil): at depth 0.2 with 8 sentences, "
                "depth · (n_blocks − 1) = 1.4 is nearest to sentence 1. Round it.",
                lambda d, n: math.ceil(d * (n - 1))),
        Mistake("counted from the question backwards: depth 0 is the FIRST sentence (the "
                "farthest from the question), depth 1 the last one, right before it.",
                lambda d, n: n - 1 - round(d * (n - 1))),
        Mistake("counted from 1: the sentences are numbered 0 .. n_blocks − 1 (depth 0 is "
                "sentence 0).", lambda d, n: round(d * (n - 1)) + 1),
    ]


def _needle_problem(fn: Callable, got, want: int, case: Case, cases, mistakes) -> str | None:
    depth, n_blocks = case.args
    if isinstance(got, torch.Tensor):
        return (f"returned a torch.Tensor ({_dtype(got)}, shape {tuple(got.shape)}) on "
                f"{case.label}: return a Python int (an index), e.g. with int(...) or .item()")
    if isinstance(got, bool) or not isinstance(got, int):
        kind = type(got).__name__
        if type(got).__module__ != "builtins":
            kind = f"{type(got).__module__}.{kind}"
        hint = (" (a float is not an index: turn it into an int)" if isinstance(got, float)
                else " (wrap it in int(...))")
        return f"returned {kind} {got!r} on {case.label}: return a Python int{hint}"
    if got == want:
        return None
    off = " (off by one block)" if abs(got - want) == 1 else ""
    msg = f"wrong block on {case.label}: yours {got}, expected {want}{off}"
    if not 0 <= got < n_blocks:
        msg += f"; index {got} is outside the haystack: its sentences are 0 .. {n_blocks - 1}"
    matches = [m for m in mistakes if m.wrong(*case.args) == got]
    if matches:
        everywhere = [m for m in matches
                      if all(_call(fn, c) == ("ok", m.wrong(*c.args)) for c in cases)]
        msg += f". Hint: {(everywhere or matches)[0].hint}"
    return msg


def needle_block(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 10.3: ``fn(depth, n_blocks) -> int``: the index of the haystack sentence the
    needle replaces, round(depth · (n_blocks − 1)): depth 0 the first sentence, depth 1 the
    last one before the question (``minimodels.tasks.needle_block``)."""
    prefix = f"Exercise 10.3 ({_name(fn)}):"
    cases, mistakes = _needle_cases(), _needle_mistakes()
    for case in cases:
        status, got = _call(fn, case)
        if status == "raised":
            return _report(Verdict(False, _raised(prefix, got, case)), strict)
        problem = _needle_problem(fn, got, tasks.needle_block(*case.args), case, cases, mistakes)
        if problem is not None:
            return _report(Verdict(False, f"{prefix} {problem}"), strict)
    return _report(Verdict(True, f"{prefix} passed {len(cases)} checks."), strict)
