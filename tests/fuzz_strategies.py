"""The differential fuzzer's cases (issue #13; the check is tests/test_fuzz.py).

A ``Case`` is one fuzzed call of a kernel: which op and backend, the precision, the shape and
seed of the op's ``example_inputs``, edits of the float64 values (magnitudes, special values,
optional arguments left out), edits of the layout after the cast (strides, broadcasts,
conjugate views) and keyword arguments. ``Case.source()`` renders it as Python: an ``inputs``
function that builds the arguments in any dtype. The test runs exactly that source, so the
reproducer printed on a failure (``Case.reproducer()``) is what ran.

``OPS`` is the registry: per op its module and argument names, a hypothesis strategy of its
cases (shapes at every tile edge of its CPU and CUDA kernels, lengths 0 and 1, primes), what
it returns and how it resumes from a state. A kernel of chapters 06-10 joins the fuzzer by
adding one ``Spec`` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st

import minimodels.kernels.attention.cpu as attention_cpu
import minimodels.kernels.attention.cuda as attention_cuda
import minimodels.kernels.long_conv as long_conv
import minimodels.kernels.long_conv.cuda as long_conv_cuda
import minimodels.kernels.monarch.cpu as monarch_cpu
import minimodels.kernels.natten.cuda as natten_cuda
import minimodels.kernels.selective_scan.cuda as selective_scan_cuda
import minimodels.kernels.ssm_kernel as ssm_kernel
import minimodels.kernels.wkv.cpu as wkv_cpu
import minimodels.kernels.wkv.cuda as wkv_cuda
from minimodels.backend import cuda_simulated
from minimodels.kernels._common import SCAN_CHUNK

SIMULATED = cuda_simulated()
MAGNITUDES = [1.0, 1.0, 1e-30, 1e-3, 10.0, 60.0, 1e3, 1e30]  # scales of an input's values
EXPONENTS = MAGNITUDES[:-1]  # for inputs that end up in an exp: |x| <= ~1e3, not 1e30
SPECIALS = ['float("inf")', 'float("-inf")', 'float("nan")']  # injected into one element


# =============================================================================================
# A case and its source
# =============================================================================================


@dataclass(frozen=True)
class Case:
    """One fuzzed call; every field is plain data so hypothesis prints and shrinks it."""

    op: str  # a key of OPS
    backend: str  # "cpu" or "cuda" (the simulator under NUMBA_ENABLE_CUDASIM=1)
    dtype: str  # "float32" or "float64": the precision the kernel runs in
    shape: tuple  # example_inputs' shape
    seed: int
    example: tuple = ()  # more keyword arguments of example_inputs: (name, value) pairs
    edits: tuple = ()  # lines run on example_inputs' float64 tensors (values, None)
    layout: tuple = ()  # lines run after the cast: other strides, same values
    kwargs: tuple = ()  # keyword arguments of the op: (name, value) pairs
    split: int | None = None  # state continuation: the sequence cut at this step

    @property
    def spec(self) -> Spec:
        return OPS[self.op]

    @property
    def device(self) -> str:
        return "cuda" if self.backend == "cuda" and not SIMULATED else "cpu"

    def present(self) -> tuple[str, ...]:
        """The tensor arguments that are not left out (``x = None``) by an edit."""
        gone = {line.split(" = ")[0] for line in self.edits if line.endswith(" = None")}
        return tuple(n for n in self.spec.names if n not in gone and n not in self.spec.static)

    def source(self) -> str:
        """Imports and ``def inputs(dtype) -> (args, kwargs)``: the case's arguments, rounded to
        the case's precision first, then held in ``dtype`` (float32 or float64) with
        requires_grad on every tensor."""
        spec = self.spec
        example = "".join(f", {k}={v!r}" for k, v in self.example)
        lines = [
            "import torch",
            f"from {spec.module} import example_inputs, {spec.func}",
            "",
            "",
            "def inputs(dtype):",
            f"    ex = example_inputs({self.shape!r}, dtype={spec.example_dtype}, "
            f"device={self.device!r}, seed={self.seed}{example})",
            f"    {', '.join(spec.names)}{',' if len(spec.names) == 1 else ''} = ex.args",
            *(f"    {line}" for line in self.edits),
        ]
        real = [n for n in self.present() if n not in spec.complex]
        cplx = [n for n in self.present() if n in spec.complex]
        for names, to, held in ((real, f"torch.{self.dtype}", "dtype"),
                                (cplx, f"torch.{self.dtype}.to_complex()", "dtype.to_complex()")):
            if names:
                tup = ", ".join(names) + ("," if len(names) == 1 else "")
                lines.append(f"    {tup} = (x.to({to}).to({held}).requires_grad_() "
                             f"for x in ({tup}))")
        lines += [f"    {line}" for line in self.layout]
        kw = "".join(f", {k!r}: {v!r}" for k, v in self.kwargs)
        lines.append(f"    return ({', '.join(spec.names)},), {{**ex.kwargs{kw}}}")
        return "\n".join(lines) + "\n"

    def reproducer(self) -> str:
        """A copy-pasteable script (run from the repository root) that rebuilds the case, calls
        the kernel and the float64 reference, then reruns the fuzzer's whole check."""
        f = self.spec.func
        return (
            self.source()
            + f"\n\nargs, kwargs = inputs(torch.{self.dtype})\n"
            f"got = {f}(*args, **kwargs, backend={self.backend!r})\n"
            f"want = {f}(*inputs(torch.float64)[0], **kwargs, backend=\"ref\")  # the truth\n"
            "# the fuzzer's whole check (outputs, gradients, state continuation):\n"
            "import sys; sys.path.insert(0, \"tests\")\n"
            "from test_fuzz import check_inputs\n"
            f"check_inputs({self.op!r}, inputs, {self.backend!r}, torch.{self.dtype}, "
            f"split={self.split!r})\n"
        )


# =============================================================================================
# The registry
# =============================================================================================


@dataclass(frozen=True)
class Spec:
    """How the fuzzer drives one op. ``names``: example_inputs' args in order; ``complex``:
    those that are complex; ``static``: those that are not tensors. ``cases(backend)``: the
    strategy. ``outputs(result, kwargs)``: named output tensors; ``constant``: those through
    which no gradient flows (an opaque state). ``resume(fn, args, kwargs, m)``: the op run as
    two calls cut at step m with the state carried between them, as the same named outputs
    (None when the op has no state)."""

    module: str
    func: str
    names: tuple
    cases: Callable
    outputs: Callable
    resume: Callable | None = None
    constant: tuple = ()
    complex: tuple = ()
    static: tuple = ()
    example_dtype: str = "torch.float64"


def lengths(hi: int, tiles=(), lo: int = 1):
    """A length in [lo, hi], half the time one at an edge: 0 (where lo allows), 1, small
    primes, each tile's size and its neighbours, two tiles plus one."""
    edges = {lo, 1, 2, 3, 5, 7, 13, 31}
    for t in tiles:
        edges |= {t - 1, t, t + 1, 2 * t + 1}
    edges = sorted(x for x in edges if lo <= x <= hi)
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _base(draw, backend):
    return {"backend": backend, "dtype": draw(st.sampled_from(["float32", "float64"])),
            "seed": draw(st.integers(0, 2**16))}


def _scaled(draw, names, p_edit=0.5, magnitudes=MAGNITUDES):
    """``x = x * s`` for some of ``names``, s from ``magnitudes``."""
    out = []
    for name in names:
        if draw(st.booleans()) if p_edit >= 0.5 else draw(st.integers(0, 3)) == 0:
            s = draw(st.sampled_from(magnitudes))
            out += [f"{name} = {name} * {s!r}"] if s != 1.0 else []
    return out


def _inject(draw, names, shape_ok: bool):
    """Now and then one element of one input set to inf, -inf or nan."""
    if not shape_ok or draw(st.integers(0, 5)) != 0:
        return []
    name = draw(st.sampled_from(names))
    return [f"{name}.view(-1)[{draw(st.integers(0, 999))} % {name}.numel()] = "
            f"{draw(st.sampled_from(SPECIALS))}"]


LAYOUTS = {
    "transposed": "{x} = {x}.transpose(0, -1).contiguous().transpose(0, -1)",
    "strided": "{x} = torch.stack([{x}, torch.zeros_like({x})], -1)[..., 0]",
    "broadcast": "{x} = {x}[:1].expand_as({x})",  # every row equal to the first
    "conjugate": "{x} = {x}.conj().resolve_conj().conj()",  # a conjugate view, same values
}


def _layout(draw, names, *, broadcast=(), conjugate=()):
    """Most inputs contiguous; some transposed, strided, broadcast or conjugate views."""
    out = []
    for name in names:
        kinds = ["contiguous"] * 3 + ["transposed", "strided"]
        kinds += ["broadcast"] * (name in broadcast) + ["conjugate"] * (name in conjugate)
        kind = draw(st.sampled_from(kinds))
        if kind != "contiguous":
            out.append(LAYOUTS[kind].format(x=name))
    return out


# ---------------------------------------------------------------------------------------------
# linear_scan(a, b, h0): (b, d, l); the state is h0
# ---------------------------------------------------------------------------------------------


@st.composite
def scan_cases(draw, backend):
    case = _base(draw, backend)
    if backend == "cuda":  # one block of SCAN_THREADS per row
        rows = draw(st.sampled_from([(1, 1), (1, 3), (2, 1), (2, 3), (1, 8)]))
        l = draw(lengths(2 * SCAN_CHUNK + 3, [SCAN_CHUNK], lo=0))
    else:  # rows go in pairs: odd counts leave one alone
        rows = draw(st.tuples(st.integers(1, 3), st.integers(1, 5)))
        l = draw(lengths(70, [], lo=0))
    a_mode = draw(st.sampled_from(["decay", "decay", "one", "grow", "signed", "zero"]))
    edits = {"decay": [], "one": ["a = torch.ones_like(a)"], "grow": ["a = a * 2.0"],
             "signed": ["a = a * (1 - 2 * (torch.arange(a.shape[-1], device=a.device) % 2))"],
             "zero": ["a = torch.zeros_like(a)"]}[a_mode]
    edits += _scaled(draw, ["b", "h0"])
    if draw(st.booleans()):
        edits.append("h0 = None")
    edits += _inject(draw, ["a", "b"], l > 0)
    names = ["a", "b"] + ["h0"] * ("h0 = None" not in edits)
    return Case(op="linear_scan", shape=(*rows, l), edits=tuple(edits),
                layout=tuple(_layout(draw, names, broadcast=names)),
                split=draw(st.integers(0, l)), **case)


def scan_resume(fn, args, kwargs, m):
    a, b, h0 = args
    h1 = fn(a[..., :m], b[..., :m], h0, **kwargs)
    h2 = fn(a[..., m:], b[..., m:], h1[..., -1] if m else h0, **kwargs)
    return {"h": torch.cat([h1, h2], -1)}


# ---------------------------------------------------------------------------------------------
# attention(q, k, v, causal, scale, return_lse): (b, h, lq, e), (b, h, lk, e)
# ---------------------------------------------------------------------------------------------


def _cuda_attention_tiles():
    tiles = [attention_cuda.SIMULATOR_TILES] if SIMULATED else attention_cuda.CUDA_TILES.values()
    return [ty * rm for ty, _, rm, _ in tiles], [tx * rn for _, tx, _, rn in tiles]


def _scores_and_values(draw) -> tuple[list, list]:
    """An attention op's ``scale`` keyword (sometimes), q and k scaled together to a drawn
    magnitude (the scores' range), and v rescaled now and then: (kwargs, edits)."""
    kwargs = []
    scale = draw(st.sampled_from([None, None, 0.0, -1.0, 0.3, 10.0]))
    if scale is not None:
        kwargs.append(("scale", scale))
    qk = draw(st.sampled_from(EXPONENTS))
    edits = [f"q, k = q * {qk!r}, k * {qk!r}"] if qk != 1.0 else []
    return kwargs, edits + _scaled(draw, ["v"])


@st.composite
def attention_cases(draw, backend):
    case = _base(draw, backend)
    if backend == "cuda" and SIMULATED:  # blocks of BM queries: 2 heads x 4 blocks at most
        bm, bn = _cuda_attention_tiles()
        heads = draw(st.sampled_from([(1, 1), (1, 2), (2, 1)]))
        lq = draw(lengths(4 * bm[0] - 1, bm))
        lk = draw(lengths(2 * bn[0] + 3, bn))
        e = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9]))
    else:
        bq, bk = ([attention_cpu.BLOCK_Q], [attention_cpu.BLOCK_K]) if backend == "cpu" else (
            _cuda_attention_tiles())
        heads = draw(st.tuples(st.integers(1, 2), st.integers(1, 3)))
        small = draw(st.booleans())
        lq = draw(lengths(17, []) if small else lengths(max(bq) + 3, bq))
        lk = draw(lengths(17, []) if small else lengths(2 * max(bk) + 3, bk))
        e = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 8, 16]), st.integers(0, 33)))
    causal = draw(st.booleans())
    if causal:
        lk = max(lk, lq)  # the mask is bottom-right aligned: lq <= lk
    kwargs = [("causal", causal), ("return_lse", draw(st.booleans()))]
    scale_kwargs, edits = _scores_and_values(draw)
    kwargs += scale_kwargs
    # non-finite values only without the causal mask: a value hidden from a query is
    # unspecified for it (kernels/attention/__init__.py: ref's dense 0·inf gives nan in the
    # outputs and gradients of the pairs the mask hides, where skipped tiles are not read; an
    # inf in k reached dq of a query that never sees that key)
    edits += _inject(draw, ["q", "k", "v"], e > 0 and not causal)
    names = ["q", "k", "v"]
    return Case(op="attention", shape=(*heads, lq, lk, e), edits=tuple(edits),
                layout=tuple(_layout(draw, names, broadcast=names)), kwargs=tuple(kwargs),
                **case)


def attention_outputs(result, kwargs):
    if kwargs.get("return_lse"):
        return {"out": result[0], "lse": result[1]}
    return {"out": result}


# ---------------------------------------------------------------------------------------------
# wkv(w, u, k, v, state, return_state): (b, l, c); the state is (b, 3, c) = (a, b, p)
# ---------------------------------------------------------------------------------------------


@st.composite
def wkv_cases(draw, backend):
    case = _base(draw, backend)
    if backend == "cuda" and SIMULATED:  # one thread per (b, c): 8 blocks of THREADS at most
        t = wkv_cuda.THREADS
        batch = draw(st.integers(1, 2))
        c = draw(lengths(4 * t // batch, [t]))
        l = draw(lengths(24, [], lo=0))
    else:  # CPU: blocks of channels start on multiples of VEC
        batch = draw(st.integers(1, 3))
        c = draw(lengths(2 * wkv_cpu.VEC + 2, [wkv_cpu.VEC, wkv_cuda.THREADS]))
        l = draw(lengths(40, [], lo=0))
    w_mode = draw(st.sampled_from(["example", "example", "zero", "16", "huge", "tiny"]))
    edits = {"example": [], "zero": ["w = torch.zeros_like(w)"],
             "16": ["w = torch.full_like(w, 16.0)"], "huge": ["w = w * 1e3"],
             "tiny": ["w = w * 1e-30"]}[w_mode]
    u_mode = draw(st.sampled_from(["example", "scaled", "inf", "-inf"]))
    if u_mode == "scaled":
        edits += _scaled(draw, ["u"], p_edit=1.0, magnitudes=EXPONENTS)
    elif u_mode != "example":
        edits.append(f'u[0] = float("{u_mode}")')
    edits += _scaled(draw, ["k"], magnitudes=EXPONENTS) + _scaled(draw, ["v"])
    edits += _inject(draw, ["k", "v"], l > 0)
    names = ["w", "u", "k", "v"]
    return Case(op="wkv", shape=(batch, l, c), edits=tuple(edits),
                layout=tuple(_layout(draw, names, broadcast=names)),
                kwargs=(("return_state", draw(st.booleans())),), split=draw(st.integers(0, l)),
                **case)


def wkv_outputs(result, kwargs):
    if not kwargs.get("return_state"):
        return {"y": result}
    y, s = result
    a, b, p = s[:, 0], s[:, 1], s[:, 2]  # (b, c) each; p only scales a and b:
    p = torch.where(a.isfinite() & b.isfinite(), p, torch.nan)  # a nan past makes it moot
    return {"y": y, "state.a": a, "state.b": b, "state.p": p}


def wkv_resume(fn, args, kwargs, m):
    w, u, k, v = args
    kw = {**kwargs, "return_state": True}
    y1, s = fn(w, u, k[:, :m], v[:, :m], **kw)
    y2, s = fn(w, u, k[:, m:], v[:, m:], **{**kw, "state": s})
    return wkv_outputs((torch.cat([y1, y2], 1), s) if kwargs.get("return_state") else
                       torch.cat([y1, y2], 1), kwargs)


# ---------------------------------------------------------------------------------------------
# selective_scan(u, delta, A, B, C, D, z, delta_bias, ...): (b, d, l, n)
# ---------------------------------------------------------------------------------------------


@st.composite
def selective_scan_cases(draw, backend):
    case = _base(draw, backend)
    cu = selective_scan_cuda
    if backend == "cuda" and SIMULATED:  # backward: one block per (b, d) row; n <= N_MAX
        rows = draw(st.sampled_from([(1, 1), (1, 3), (2, 1), (2, 2), (1, 4), (2, 3)]))
        l = draw(lengths(2 * cu.CHUNK + 3, [cu.TILE, cu.CHUNK], lo=0))
        n = draw(lengths(3 * cu.LANES + 1, [cu.LANES]))
    else:
        rows = draw(st.tuples(st.integers(1, 2), st.integers(1, 5)))
        l = draw(lengths(40 if backend == "cpu" else 2 * cu.CHUNK + 3, [cu.CHUNK], lo=0))
        n = draw(lengths(cu.N_MAX if backend == "cuda" else 17, [cu.LANES, 16]))
    edits = []
    A_mode = draw(st.sampled_from(["example", "example", "zero", "growing", "large"]))
    edits += {"example": [], "zero": ["A = torch.zeros_like(A)"], "growing": ["A = -A"],
              "large": ["A = A * 100.0"]}[A_mode]
    delta_mode = draw(st.sampled_from(["example", "example", "positive", "large", "tiny"]))
    edits += {"example": [], "positive": ["delta = delta.abs()"],
              "large": ["delta = delta * 10.0"], "tiny": ["delta = delta * 1e-30"]}[delta_mode]
    edits += _scaled(draw, ["u", "B", "C"], p_edit=0.25)
    for name in ("D", "z", "delta_bias"):
        if draw(st.booleans()):
            edits.append(f"{name} = None")
    edits += _inject(draw, ["u", "delta", "B", "C"], l > 0)
    example = (("var_B", draw(st.booleans())), ("var_C", draw(st.booleans())))
    kwargs = (("delta_softplus", draw(st.booleans())),
              ("return_last_state", draw(st.booleans())))
    c = Case(op="selective_scan", shape=(*rows, l, n), example=example, edits=tuple(edits),
             kwargs=kwargs, **case)
    per_batch = ["u", "delta", "z"] + [x for x, v in zip("BC", example, strict=True) if v[1]]
    layout = _layout(draw, c.present(), broadcast=per_batch)
    return replace(c, layout=tuple(layout))


def selective_scan_outputs(result, kwargs):
    if kwargs.get("return_last_state"):
        return {"y": result[0], "last_state": result[1]}
    return {"y": result}


# ---------------------------------------------------------------------------------------------
# s4d_kernel(A, C, dt, L): complex A, C (d, n), real dt (d,) -> K (d, L)
# ---------------------------------------------------------------------------------------------


@st.composite
def s4d_cases(draw, backend):
    case = _base(draw, backend)
    sk = ssm_kernel
    if backend == "cuda" and SIMULATED:  # forward blocks of THREADS·ITEMS steps per channel
        span = sk.THREADS * sk.ITEMS
        d, n = draw(st.integers(1, 2)), draw(lengths(sk.N_TILE + 1, [sk.N_TILE], lo=0))
        L = draw(lengths(span + sk.CHUNK + 1, [sk.CHUNK, span]))
    else:
        d, n = draw(st.integers(0, 3)), draw(lengths(9, [], lo=0))
        tiles = [sk.BLOCK] if backend == "cpu" else [sk.THREADS * sk.ITEMS, sk.CHUNK]
        L = draw(st.one_of(lengths(2 * max(tiles) + 1, tiles),
                           st.sampled_from([sk.BLOCK * sk.REANCHOR + 1])))
    A_mode = draw(st.sampled_from(["lin", "lin", "tiny", "zero", "real", "unstable", "scaled"]))
    edits = {"lin": [], "tiny": ["A = A * 1e-160"], "zero": ["A = torch.zeros_like(A)"],
             "real": ["A = A.real.to(A.dtype)"], "unstable": ["A = A + 0.6"],
             "scaled": [f"A = A * {draw(st.sampled_from(MAGNITUDES[2:6]))!r}"]}[A_mode]
    dt_mode = draw(st.sampled_from(["example", "example", "zero", "large", "tiny", "negative"]))
    edits += {"example": [], "zero": ["dt = torch.zeros_like(dt)"], "large": ["dt = dt * 100.0"],
              "tiny": ["dt = dt * 1e-30"], "negative": ["dt = -dt"]}[dt_mode]
    edits += _scaled(draw, ["C"], p_edit=0.25)
    return Case(op="s4d_kernel", shape=(d, n, L), edits=tuple(edits),
                layout=tuple(_layout(draw, ["A", "C", "dt"], conjugate=["A", "C"])), **case)


# ---------------------------------------------------------------------------------------------
# monarch_multiply(x, w1, w2): x (b, k·p), w1 (k, q, p), w2 (l, s, r) with l·r = k·q
# ---------------------------------------------------------------------------------------------


@st.composite
def monarch_cases(draw, backend):
    case = _base(draw, backend)
    if backend == "cuda" and SIMULATED:  # the simulator runs each thread in Python: a few tokens
        b = draw(st.integers(0, 4))
        k, q, p = (draw(st.integers(1, 4)) for _ in range(3))
    else:  # CPU: tasks of TILE tokens
        b = draw(lengths(2 * monarch_cpu.TILE + 1, [monarch_cpu.TILE], lo=0))
        k, q, p = (draw(st.integers(1, 6)) for _ in range(3))
    l = draw(st.sampled_from([d for d in range(1, k * q + 1) if (k * q) % d == 0]))
    s = draw(st.integers(1, 6))
    edits = _scaled(draw, ["x", "w1", "w2"], p_edit=0.25)
    edits += _inject(draw, ["x", "w1", "w2"], b > 0)
    names = ["x", "w1", "w2"]
    return Case(op="monarch", shape=(b, k, q, p, l, s), edits=tuple(edits),
                layout=tuple(_layout(draw, names, broadcast=["x"])), **case)


# ---------------------------------------------------------------------------------------------
# neighborhood_attention_2d(q, k, v, kernel_size, scale): (b, h, H, W, e), K odd <= H, W
# ---------------------------------------------------------------------------------------------


@st.composite
def natten_cases(draw, backend):
    case = _base(draw, backend)
    if backend == "cuda" and SIMULATED:  # tiles TILE queries wide: a few tiles
        heads = draw(st.sampled_from([(1, 1), (1, 2), (2, 1)]))
        H, W = (draw(lengths(2 * natten_cuda.TILE + 1, [natten_cuda.TILE])) for _ in range(2))
        e = draw(st.sampled_from([0, 1, 3, natten_cuda.E_CHUNK, natten_cuda.E_CHUNK + 1]))
    else:
        heads = draw(st.tuples(st.integers(1, 2), st.integers(1, 3)))
        H, W = (draw(lengths(17, [])) for _ in range(2))
        e = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 8, 16]), st.integers(0, 33)))
    top = min(H, W, natten_cuda.MAX_KERNEL if backend == "cuda" else 99)
    K = draw(st.sampled_from([x for x in range(1, top + 1, 2)]))
    kwargs, edits = _scores_and_values(draw)
    # non-finite values only in q: the reference (masked full attention) multiplies a value
    # outside a query's window by its weight 0 (or its score's gradient 0) and gets nan where
    # the windowed kernels, correctly, never read it: an inf in v reached the outputs, one in
    # k reached dq of every query (and one in q dk of every key, but an inf in q makes its own
    # output non-finite, and the fuzzer compares gradients only when the outputs are finite)
    edits += _inject(draw, ["q"], e > 0)
    names = ["q", "k", "v"]
    return Case(op="natten", shape=(*heads, H, W, e, K), edits=tuple(edits),
                layout=tuple(_layout(draw, names, broadcast=names)), kwargs=tuple(kwargs),
                **case)


# ---------------------------------------------------------------------------------------------
# causal_conv(u, k, D=, method=): u (b, h, l), k (h, lk) with 1 <= lk <= l, D (h,) or none
# ---------------------------------------------------------------------------------------------


@st.composite
def long_conv_cases(draw, backend):
    case = _base(draw, backend)
    if backend == "cuda" and SIMULATED:  # one thread per output: a few blocks
        b, h = draw(st.integers(0, 2)), draw(st.integers(1, 3))
        l = draw(lengths(2 * long_conv_cuda.THREADS + 1, [long_conv_cuda.THREADS]))
    else:
        b, h = draw(st.integers(0, 3)), draw(st.integers(1, 6))
        l = draw(lengths(2 * long_conv.DIRECT_MAX_TAPS["cpu"] + 3,
                          [long_conv.DIRECT_MAX_TAPS["cpu"]]))
    lk = draw(st.integers(1, l))
    skip = draw(st.booleans())
    # no inf/nan injected: the Toeplitz reference multiplies the zeros above the diagonal by
    # every input (0·inf = nan), and an FFT spreads one inf over every output; neither is the
    # direct sum's answer. Magnitudes up to 1e3, so that no finite product overflows.
    edits = _scaled(draw, ["u", "k"], p_edit=0.25, magnitudes=EXPONENTS)
    layout = _layout(draw, ["u", "k"], broadcast=["u"])
    if skip:  # D comes in kwargs: rounded to the case's precision, held in dtype like the args
        layout.append(f'ex.kwargs["D"] = ex.kwargs["D"].to(torch.{case["dtype"]}).to(dtype)')
    method = draw(st.sampled_from(["direct", "fft", "auto"]))
    return Case(op="long_conv", shape=(b, h, l, lk), example=(("skip", skip),),
                edits=tuple(edits), layout=tuple(layout), kwargs=(("method", method),), **case)


OPS = {
    "linear_scan": Spec("minimodels.kernels.scan", "linear_scan", ("a", "b", "h0"), scan_cases,
                        lambda r, kw: {"h": r}, scan_resume),
    "attention": Spec("minimodels.kernels.attention", "attention", ("q", "k", "v"),
                      attention_cases, attention_outputs),
    "wkv": Spec("minimodels.kernels.wkv", "wkv", ("w", "u", "k", "v"), wkv_cases, wkv_outputs,
                wkv_resume, constant=("state.a", "state.b", "state.p")),
    "selective_scan": Spec("minimodels.kernels.selective_scan", "selective_scan",
                           ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
                           selective_scan_cases, selective_scan_outputs),
    "s4d_kernel": Spec("minimodels.kernels.ssm_kernel", "s4d_kernel", ("A", "C", "dt", "L"),
                       s4d_cases, lambda r, kw: {"K": r}, complex=("A", "C"), static=("L",),
                       example_dtype="torch.complex128"),
    "monarch": Spec("minimodels.kernels.monarch", "monarch_multiply", ("x", "w1", "w2"),
                    monarch_cases, lambda r, kw: {"y": r}),
    "natten": Spec("minimodels.kernels.natten", "neighborhood_attention_2d", ("q", "k", "v"),
                   natten_cases, lambda r, kw: {"out": r}),
    "long_conv": Spec("minimodels.kernels.long_conv", "causal_conv", ("u", "k"),
                      long_conv_cases, lambda r, kw: {"y": r}),
}
