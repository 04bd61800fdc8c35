"""A seeded differential fuzzer of every kernel (issue #13), with hypothesis.

For each op of ``fuzz_strategies.OPS`` and each fast backend (``cpu``; ``cuda``, the simulator
under NUMBA_ENABLE_CUDASIM=1, tiny sizes), hypothesis draws cases: shapes at every tile edge,
both precisions, magnitudes from 1e-30 to 1e30, inf and nan, strided, transposed, broadcast and
conjugate layouts, the optional arguments. ``check_inputs`` then compares the backend with the
reference ``ref`` run in float64 (the truth), on the outputs, on the gradients of a random
linear function of them, and on the op resumed from its state (two calls = one call):

- float64: within 1e-9 of the output's scale (plus the ill-conditioning that the float32
  reference reveals, scaled down to float64's epsilon);
- float32: within 8 times the float32 reference's own error on the same inputs, or the float64
  reference's change when the inputs move by float32's rounding, whichever is larger (plus 16
  eps of the scale): the kernel may not be much worse than the definition computed in float32,
  nor than the inputs' own precision allows;
- non-finite values (inf or nan) where, and only where, the truth has them.

A gradient's errors count relative to its own scale and to the outputs' (``check_inputs``).

Two profiles (tests/conftest.py): "quick" runs in ``make test`` (derandomized: the same cases
every run); "long" (thousands of cases) runs with ``pytest -m fuzz tests/test_fuzz.py``, and on
a GPU without NUMBA_ENABLE_CUDASIM for the real kernels. ``HYPOTHESIS_PROFILE`` overrides both.
A failure prints a script that reproduces it (``Case.reproducer``) and hypothesis'
``@reproduce_failure`` blob, after shrinking; with ``FUZZ_LOG=path`` every failing case's
reproducer is also appended to that file the moment it fails, so a run stopped by a time limit
while hypothesis shrinks still leaves one.
"""

import importlib
import math
import os
from pathlib import Path

import pytest
import torch
from fuzz_strategies import LAYOUTS, OPS, SIMULATED, Case
from helpers import CUDA
from hypothesis import event, given, reject, settings

QUICK = os.environ.get("HYPOTHESIS_PROFILE", "quick")
LONG = os.environ.get("HYPOTHESIS_PROFILE", "long")
CUDA_SHARE = 4 if SIMULATED else 1  # the simulator is slow: a quarter of the cases

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
RTOL64 = 1e-9  # float64: error / the output's largest finite magnitude
REF_FACTOR = 8  # float32: error / the float32 reference's own error
# float32: relative to the output's largest finite magnitude. The float32 reference's error is
# one sample of rounding luck: on a 10-step selective scan it was 0.97 eps where, on the same
# inputs with u 1e30 times larger, it was 5.6 eps and the kernels 10-12 eps (cpu and cuda alike,
# 2026-12-05). A 4-eps floor failed the kernels at their usual error whenever the reference was
# lucky; 16 eps (1.9e-6 of the scale) does not. Defects of a few eps have their own tests
# (test_wkv.py's float32 dw of issue #13), not this floor.
FLOOR32 = 16 * EPS32
# float32: the yardstick is also the truth's change under NEARBY perturbations of the inputs by
# float32's rounding (``_perturbed``). Where a few ill-conditioned numbers dominate the error
# (attention's large logits, exp of large keys), the float32 reference's error alone varies by
# 10x from one draw to the next (natten, 2026-12-06: 0.1x to 2.6x the cpu kernel's over six
# seeds), and a lucky draw failed kernels that were as accurate as the inputs allow.
NEARBY = 2
G_SCALE = 4.0  # the cotangents G are standard normal: |G| rarely exceeds 4


# =============================================================================================
# Known issues: ``(name, judge(case, args, kwargs))``; ``judge`` sees the case and its float64
# arguments by name and returns None where the issue does not apply, else {output: floor}:
# those outputs are judged with a floor of that many eps of their scale instead of FLOOR32's 16
# (math.inf excuses one). A hypothesis event counts every case it applies to. The lead deletes
# an entry when its fix lands. Since 2026-12-06 the yardstick includes ``_perturbed``: the
# former entry for natten float32 at large logits is gone (the kernels are as accurate as
# float32 inputs allow), and the wkv and s4d entries judge with looser floors instead of
# rejecting their cases.
# =============================================================================================

KNOWN_ISSUES = [
    ("#13 follow-up, wkv float32 gradients at large |k| or |u|: the backward carries the "
     "normaliser of each softmax as one log, q + log(den), so a weight exp(k_t - log D) is off "
     "by up to an ulp of |k| in its exponent even where the token dominates and the float32 "
     "reference's weight is exactly 1 (e.g. example_inputs((1, 6, 5), seed=0), k x 1000: dv "
     "340 eps of its value, 24 eps of dv's scale). Also dk where one token dominates the later "
     "outputs: y equals v_i to float32's rounding, and dk_i needs y - v_i below that (19 eps of "
     "dk's scale at seed 0, (1, 7, 5), w = 0, k x 1000). Judged to 16 + K/2 eps of the scale, "
     "K = max|k| + max|u|. Fix: carry (q, log den) as a pair into the weights, and y's "
     "differences from the state's mean rather than y",
     lambda case, a, kw: _wkv_exponents(case, a)),
    ("#13 follow-up, s4d_kernel cuda float32 gradients: the backward sums G·z^l and l·G·z^l in "
     "float32 over chunks of 256 steps before its float64 atomics (the CPU kernel sums in "
     "float64). On an H100 (2026-12-06, long profile): example_inputs((2, 2, 1024), seed=1410), "
     "A + 0.6, dt x 1e-30: grad dt 33 eps of its scale, 16x the float32 reference's error. "
     "Judged to 64 eps. Fix: float64 chunk sums (to be timed on a GPU)",
     lambda case, a, kw: ({"grad A": 64, "grad C": 64, "grad dt": 64}
                          if (case.op, case.backend, case.dtype)
                          == ("s4d_kernel", "cuda", "float32") else None)),
]


def _wkv_exponents(case, a):
    """The wkv entry's judge: floors of 16 + K/2 eps for the gradients, where K >= 2."""
    K = _largest(a["k"]) + _largest(a["u"]) if case.op == "wkv" else 0.0
    if case.dtype != "float32" or K < 2:
        return None
    return dict.fromkeys(("grad w", "grad u", "grad k", "grad v"), 16 + K / 2)


# =============================================================================================
# The check
# =============================================================================================


def _run(fn, spec, args, kwargs, backend, dtype, grads):
    """Named outputs of ``fn(*args, **kwargs, backend=backend)`` and, with ``grads``, the
    gradients of Σ output·G (G: standard normal, seeded, rounded to ``dtype``; over the outputs
    not in ``spec.constant``) with respect to every tensor argument."""
    outs = spec.outputs(fn(*args, **kwargs, backend=backend), kwargs)
    if not grads:
        return {name: o.detach() for name, o in outs.items()}
    g = torch.Generator().manual_seed(0)
    diff = [o for name, o in outs.items() if o.requires_grad and name not in spec.constant]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)
                .to(o.dtype).to(o.device)).sum() for o in diff)
    named = [(n, a) for n, a in zip(spec.names, args, strict=True)
             if isinstance(a, torch.Tensor) and a.requires_grad]
    gs = torch.autograd.grad(loss, [a for _, a in named], allow_unused=True) if diff else [
        None] * len(named)
    result = {name: o.detach() for name, o in outs.items()}
    for (name, a), ga in zip(named, gs, strict=True):
        result[f"grad {name}"] = torch.zeros_like(a) if ga is None else ga
    return result


def compare(what, got, want, want32, dtype, scale=0.0, nearby=(), floor=FLOOR32 / EPS32):
    """None when ``got`` matches the float64 truth ``want``, else a line saying how it does not.
    ``want32``: the reference's result in float32 on the same inputs (its error sets the
    float32 tolerance and reveals ill-conditioning); ``nearby``: the float64 reference's results
    on inputs perturbed by float32's rounding (``_perturbed``): their distance from ``want``
    is the problem's own sensitivity at float32's precision, a second sample of the yardstick;
    ``scale``: the least magnitude that errors are relative to (for a gradient, see
    ``check_inputs``); ``floor``: float32's least tolerance, in eps of the scale."""
    if tuple(got.shape) != tuple(want.shape):
        return f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    got = got.detach().to(want.device, want.dtype)
    want32 = want32.detach().to(want.device, want.dtype)
    finite = torch.isfinite(want)
    wrong = ~finite & torch.isfinite(got)  # non-finite where the truth is (nan or inf alike)
    if wrong.any():
        i = _index(wrong)
        return f"{what}: {got[i].item()} at {i}, want {want[i].item()} (non-finite)"
    # where float32's reference did not overflow, nor came near it (another order of the same
    # sum may overflow there)
    known32 = finite & torch.isfinite(want32) & (want.abs() < torch.finfo(torch.float32).max / 64)
    judged = known32 if dtype == torch.float32 else finite
    if not judged.any():
        return None
    scale = max(scale, want[finite].abs().max().item())
    # the yardstick: the float32 reference's error, or the truth's move on nearby inputs
    err32 = (want32 - want)[known32].abs().max().item() if known32.any() else 0.0
    for near in nearby:  # where a perturbed input leaves the truth finite
        near = near.detach().to(want.device, want.dtype)
        ok = known32 & torch.isfinite(near)
        err32 = max([err32] + ([(near - want)[ok].abs().max().item()] if ok.any() else []))
    if dtype == torch.float64:
        tol = RTOL64 * scale + REF_FACTOR * EPS64 / EPS32 * err32
    else:
        tol = REF_FACTOR * err32 + floor * EPS32 * scale
    tol = max(tol, torch.finfo(dtype).tiny)
    err = torch.where(judged, (got - want).abs(), 0.0).nan_to_num(nan=math.inf)
    if err.max().item() <= tol:
        return None
    i = _index(err == err.max())
    return (f"{what}: error {err[i].item():.3g} at {i} > tolerance {tol:.3g} (scale "
            f"{scale:.3g}, the float32 yardstick {err32:.3g}): got {got[i].item()}, want "
            f"{want[i].item()}")


def _perturbed(args, kwargs, seed):
    """``args, kwargs`` with every floating (or complex) tensor multiplied by 1 ± 2⁻²⁴, a random
    sign per number (per real and imaginary part): float32's rounding of its inputs, so the
    reference's change there is what any float32 computation of the op must expect."""
    g = torch.Generator().manual_seed(1000 + seed)

    def nudge(t):
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            return t
        x = torch.view_as_real(t.detach().resolve_conj()) if t.is_complex() else t.detach()
        sign = torch.randint(0, 2, x.shape, generator=g).to(x.device, x.dtype) * 2 - 1
        x = x * (1 + sign * 2.0**-24)
        out = torch.view_as_complex(x.contiguous()) if t.is_complex() else x
        return out.requires_grad_(t.requires_grad)

    return tuple(nudge(a) for a in args), {k: nudge(v) for k, v in kwargs.items()}


def _largest(x):
    finite = x[torch.isfinite(x)]
    return finite.abs().max().item() if finite.numel() else 0.0


def _index(mask):
    return tuple(int(x) for x in mask.nonzero()[0])


def check_inputs(op, inputs, backend, dtype, split=None, loose=None):
    """Fuzz check of ``backend`` against ``ref`` on ``inputs(dtype) -> (args, kwargs)`` (see
    the module docstring); ``split``: also resume the op from its state at that step;
    ``loose``: {output: floor in eps of its scale} for a known issue. Raises AssertionError
    listing every mismatch."""
    spec = OPS[op]
    fn = getattr(importlib.import_module(spec.module), spec.func)
    args, kwargs = inputs(torch.float64)
    try:
        truth = _run(fn, spec, args, kwargs, "ref", dtype, grads=False)
    except (ValueError, TypeError) as err:  # bad input: the backend must refuse it too
        args, kwargs = inputs(dtype)
        with pytest.raises(type(err)):
            fn(*args, **kwargs, backend=backend)
        return
    grads = all(bool(torch.isfinite(o).all()) for o in truth.values())
    truth = _run(fn, spec, args, kwargs, "ref", dtype, grads)
    ref32 = _run(fn, spec, *inputs(torch.float32), "ref", dtype, grads)
    nearby = ([_run(fn, spec, *_perturbed(*inputs(torch.float64), seed), "ref", dtype, grads)
               for seed in range(NEARBY)] if dtype == torch.float32 else [])
    got = _run(fn, spec, *inputs(dtype), backend, dtype, grads)
    # a gradient ∂L/∂x of L = Σ out·G is judged relative to its own scale and at least to
    # |out|·|G| / max(|x|, 1): where |v| = 1e30 a one-hot softmax has ∂L/∂k = 0 exactly, but any
    # other order of its arithmetic leaves rounding of |v|·eps there
    out_scale = max([_largest(x) for n, x in truth.items() if n not in spec.constant] or [0])
    floors = {f"grad {n}": out_scale * G_SCALE / max(_largest(x), 1.0)
              for n, x in zip(spec.names, args, strict=True) if isinstance(x, torch.Tensor)}
    loose = loose or {}
    failures = [compare(name, got[name], truth[name], ref32[name], dtype, floors.get(name, 0.0),
                        [near[name] for near in nearby], loose.get(name, FLOOR32 / EPS32))
                for name in truth]
    if split is not None and spec.resume is not None:
        args, kwargs = inputs(dtype)
        with torch.no_grad():
            resumed = spec.resume(lambda *a, **k: fn(*a, **k, backend=backend), args, kwargs,
                                  split)
        failures += [compare(f"resumed at {split}: {name}", x, truth[name], ref32[name], dtype)
                     for name, x in resumed.items()]
    failures = [f for f in failures if f]
    assert not failures, f"{op} on {backend} in {dtype}:\n" + "\n".join(failures)


def check(case: Case):
    """``check_inputs`` on a drawn case (judged with looser floors where a known issue applies;
    rejected when the CUDA simulator's ``math.exp``, Python's, raises OverflowError); any
    failure is re-raised with the case's reproducer."""
    namespace = {}
    exec(case.source(), namespace)  # noqa: S102 -- the source that the reproducer prints
    inputs = namespace["inputs"]
    args, kwargs = inputs(torch.float64)
    loose = {}
    for name, judge in KNOWN_ISSUES:
        floors = judge(case, dict(zip(case.spec.names, args, strict=True)), kwargs)
        if floors is not None:
            event(f"known issue: {name}")
            loose.update(floors)
    try:
        check_inputs(case.op, inputs, case.backend, getattr(torch, case.dtype), case.split,
                     loose)
    except OverflowError:
        if not (SIMULATED and case.backend == "cuda"):
            raise
        event("simulator: math.exp raised OverflowError where a GPU gives inf")
        reject()
    except Exception as err:
        message = (f"{type(err).__name__}: {err}\n\nReproducer (from the repository root):\n\n"
                   f"{case.reproducer()}")
        log = os.environ.get("FUZZ_LOG")
        if log:  # written at once: hypothesis prints only after shrinking, which a time limit
            with open(log, "a") as f:  # may cut short (a long profile on a lent GPU)
                f.write(f"# {case.op} on {case.backend} in {case.dtype}\n{message}\n\n")
        raise AssertionError(message) from err


def fuzz(op, backend, profile):
    """Run ``check`` on cases of ``op`` drawn by hypothesis under a settings profile."""
    base = settings.get_profile(profile)
    share = CUDA_SHARE if backend == "cuda" else 1

    @settings(base, max_examples=max(1, base.max_examples // share))
    @given(OPS[op].cases(backend))
    def run(case):
        check(case)

    run()


BACKENDS = ["cpu", CUDA]


# =============================================================================================
# Tests
# =============================================================================================


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_fuzz_quick(op, backend):
    fuzz(op, backend, QUICK)


@pytest.mark.fuzz
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_fuzz_long(op, backend):
    fuzz(op, backend, LONG)


def test_a_failure_prints_a_reproducer_that_reproduces_it(monkeypatch):
    import minimodels.kernels.scan as scan

    case = Case(op="linear_scan", backend="cpu", dtype="float64", shape=(1, 2, 5), seed=3,
                edits=("b = b * 10.0",), layout=(LAYOUTS["strided"].format(x="a"),), split=2)
    check(case)  # the real kernel passes
    monkeypatch.setitem(scan.IMPLS, "cpu",
                        lambda a, b, h0=None: scan.linear_scan_ref(a, b, h0) * (1 + 1e-6))
    with pytest.raises(AssertionError) as info:
        check(case)
    message = str(info.value)
    assert "h: error 1" in message and "grad b" in message
    script = message[message.index("import torch"):]
    assert script == case.reproducer()
    assert "ex = example_inputs((1, 2, 5), dtype=torch.float64, device='cpu', seed=3)" in script
    assert "a = torch.stack([a, torch.zeros_like(a)], -1)[..., 0]" in script
    monkeypatch.chdir(Path(__file__).parents[1])
    with pytest.raises(AssertionError, match="h: error"):
        exec(script, {})  # noqa: S102 -- the reproducer, as a user pastes it


def test_fuzz_log_gets_the_reproducer_the_moment_a_case_fails(monkeypatch, tmp_path):
    import minimodels.kernels.scan as scan

    case = Case(op="linear_scan", backend="cpu", dtype="float32", shape=(2, 3, 4), seed=1,
                edits=(), layout=(), split=None)
    log = tmp_path / "fuzz.log"
    monkeypatch.setenv("FUZZ_LOG", str(log))
    check(case)
    assert not log.exists()  # a passing case writes nothing
    monkeypatch.setitem(scan.IMPLS, "cpu", lambda a, b, h0=None: scan.linear_scan_ref(a, b, h0) + 1)
    for _ in range(2):
        with pytest.raises(AssertionError):
            check(case)
    text = log.read_text()
    assert text.count("# linear_scan on cpu in float32") == 2
    assert text.count(case.reproducer()) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lucky_float32_reference_does_not_fail_a_kernel_at_its_usual_error(backend):
    # the long profile's case (2026-12-05): the float32 ref erred 0.97 eps, the kernels 9-12 eps
    case = Case(op="selective_scan", backend=backend, dtype="float32", shape=(1, 1, 1, 10), seed=0,
                example=(("var_B", False), ("var_C", False)),
                edits=("delta = delta * 1e-30", "u = u * 1e-30", "B = B * 60.0", "D = None",
                       "z = None", "delta_bias = None"),
                kwargs=(("delta_softplus", True), ("return_last_state", False)))
    check(case)


def test_compare_judges_non_finite_values_by_position():
    want = torch.tensor([1.0, math.inf, math.nan, -math.inf], dtype=torch.float64)
    assert compare("x", want.clone(), want, want, torch.float64) is None
    same_places = torch.tensor([1.0, math.nan, -math.inf, math.nan], dtype=torch.float64)
    assert compare("x", same_places, want, want, torch.float64) is None
    for bad in ([1.0, math.inf, 0.0, -math.inf], [math.inf, math.inf, math.nan, -math.inf],
                [math.nan, math.inf, math.nan, -math.inf]):
        assert "at (" in compare("x", torch.tensor(bad), want, want, torch.float64)


def test_compare_scales_the_float32_tolerance_by_the_references_own_error():
    want = torch.tensor([1.0, 2.0], dtype=torch.float64)
    ref32 = torch.tensor([1.0, 2.0 + 1e-4], dtype=torch.float64)
    close, far = torch.tensor([1.0 + 5e-4, 2.0]), torch.tensor([1.0 + 2e-3, 2.0])
    assert compare("x", close, want, ref32, torch.float32) is None
    assert "tolerance" in compare("x", far, want, ref32, torch.float32)
    assert "tolerance" in compare("x", close.double(), want, want, torch.float64)


def test_nearby_inputs_set_the_float32_yardstick_where_the_reference_was_lucky():
    """A float32 result 1e-5 off: too far when the float32 reference happened to be 1e-7 off,
    fine when the truth itself moves by 2e-6 as the inputs move by float32's rounding."""
    want = torch.linspace(-1, 1, 9, dtype=torch.float64)
    got, lucky = want + 1e-5, want + 1e-7
    assert compare("out", got, want, lucky, torch.float32) is not None
    assert compare("out", got, want, lucky, torch.float32, nearby=[want - 2e-6]) is None
    assert compare("out", want + 1e-4, want, lucky, torch.float32, nearby=[want - 2e-6])


def test_perturbed_inputs_move_by_float32_rounding_and_keep_everything_else():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, dtype=torch.complex128)
    n = torch.arange(3)
    (xp, zp, np_), kw = _perturbed((x, z, n), {"D": x[0].detach(), "L": 7}, seed=0)
    assert xp.requires_grad and xp.is_leaf and not zp.requires_grad and np_ is n
    for new, old in ((xp.detach(), x.detach()), (torch.view_as_real(zp), torch.view_as_real(z)),
                     (kw["D"], x[0].detach())):
        ratio = (new / old - 1).abs()
        assert torch.allclose(ratio, torch.full_like(ratio, 2.0**-24), rtol=1e-6)
    assert kw["L"] == 7
