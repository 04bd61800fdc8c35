"""exp(x) for x ≤ 0 written out in arithmetic, so that loops calling it vectorise (CPU kernels).

pip's Numba has no vector math library: ``math.exp`` in an njit loop is a call to the scalar
libm ``exp``, and a loop that calls a function is never vectorised. ``exp_neg`` is the same
function as a few multiply-adds that LLVM inlines and vectorises (Cody & Waite range reduction,
a Taylor polynomial, the power of two written straight into the float's exponent field):

    e^x = 2^t · e^r,   t = round(x / ln 2),   r = x - t·ln 2,   |r| ≤ ln2 / 2
    e^r ≈ Σ_{d ≤ D} r^d / d!      (Horner; D = 7 in float32, 13 in float64)
    2^t = the float whose bits are (t + bias) << mantissa   (bias 127 / 1023, mantissa 23 / 52)

ln 2 = LN2_HI + LN2_LO with LN2_HI short (9 significant bits), so t·LN2_HI is exact for every t
used. The truncation error r^(D+1)/(D+1)! is below 5e-9 (D = 7) and 4e-18 (D = 13), under the
rounding of the dtype. Arguments below EXP_MIN (-87 in float32, -708 in float64: 2^t stays a
normal number) give exactly 0 (a select after the polynomial, which is evaluated at EXP_MIN so
that 2^t stays in range): e^-inf = 0 as libm's, and results below e^EXP_MIN (1.6e-38 in
float32, 3.3e-308 in float64) flush to 0. nan gives nan. (It used to return
e^EXP_MIN there: WKV at an empty past then weighted a k = -inf token by 1.6e-38 alone and
returned its v where the definition is 0/0.)

Measured (6 M arguments spread over [EXP_MIN, 0] plus [-5, 0], against exp in long double): max
relative error 7.8e-8 = 0.66 eps in float32 and 1.4e-16 = 0.64 eps in float64 (libm's own:
6.0e-8 and 1.1e-16); against ``math.exp`` in the same dtype at most 1 ulp apart, 0.06 ulp on
average. The multiply-adds may be fused (``fastmath={"contract"}``, nothing else): without FMA
the errors are 1.0e-7 and 2.0e-16. One core of the 2-core CI machine (AVX-512), a loop over
1024 arguments in L1: 0.3 ns per float32 exp (9-13x ``math.exp``), 0.75 ns per float64 (5-8x).

Numba's on-disk cache does not see this module: a kernel that calls ``exp_neg`` keeps its
cached machine code after an edit here. Delete the caches (``__pycache__/*.nbi``, ``*.nbc``, or
``$NUMBA_CACHE_DIR``) after changing this file.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["EXP_MIN32", "EXP_MIN64", "exp_neg", "exp_rows"]

EXP_MIN32 = -87.0  # e^-87 ≈ 1.6e-38 > the smallest normal float32, 1.2e-38
EXP_MIN64 = -708.0  # e^-708 ≈ 3.3e-308 > the smallest normal float64, 2.2e-308
LOG2E = 1.4426950408889634
LN2_HI = 0.693359375  # 355/512: t·LN2_HI is exact for |t| < 2^15
LN2_LO = -2.12194440054690583e-4  # ln 2 - LN2_HI
DEGREE32, DEGREE64 = 7, 13

# The constants as scalars of each dtype: Numba freezes NumPy scalars of a global as constants
# of their own type, so float32 arithmetic stays float32 (a Python float would be float64).
_C32 = tuple(np.float32(c) for c in (EXP_MIN32, LOG2E, LN2_HI, LN2_LO, 0.5, 0.0))
_C64 = tuple(np.float64(c) for c in (EXP_MIN64, LOG2E, LN2_HI, LN2_LO, 0.5, 0.0))
_T32 = tuple(np.float32(1 / math.factorial(d)) for d in range(DEGREE32 + 1))  # 1/d!
_T64 = tuple(np.float64(1 / math.factorial(d)) for d in range(DEGREE64 + 1))


@intrinsic
def _pow2(typingctx, t):
    """2^t for a float t that holds an integer of the normal exponent range: the integer
    (t + bias) << mantissa, reinterpreted as a float of t's type (no libm call, vectorises)."""
    if not isinstance(t, types.Float):
        return None
    width = t.bitwidth
    mantissa, bias = (23, 127) if width == 32 else (52, 1023)

    def codegen(context, builder, sig, args):
        ity = ir.IntType(width)
        i = builder.add(builder.fptosi(args[0], ity), ir.Constant(ity, bias))
        i = builder.shl(i, ir.Constant(ity, mantissa))
        return builder.bitcast(i, context.get_value_type(sig.return_type))

    return t(t), codegen


def exp_neg(x):
    """e^x for x ≤ 0, and 0 for x < EXP_MIN (e^-inf = 0). This Python body is a stand-in
    (``math.exp``); inside njit code the overload below runs: float32 in, float32 out (float64
    likewise)."""
    return 0.0 if x < EXP_MIN64 else math.exp(x)


def _exp_neg32(x):
    lo, log2e, ln2_hi, ln2_lo, half, zero = _C32
    c0, c1, c2, c3, c4, c5, c6, c7 = _T32
    y = max(x, lo)
    t = np.floor(y * log2e + half)  # round(y / ln 2)
    r = (y - t * ln2_hi) - t * ln2_lo  # |r| ≤ ln2 / 2
    p = ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0
    return zero if x < lo else p * _pow2(t)  # nan < lo is false: nan stays nan


def _exp_neg64(x):
    lo, log2e, ln2_hi, ln2_lo, half, zero = _C64
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13 = _T64
    y = max(x, lo)
    t = np.floor(y * log2e + half)
    r = (y - t * ln2_hi) - t * ln2_lo
    p = ((((((c13 * r + c12) * r + c11) * r + c10) * r + c9) * r + c8) * r + c7) * r + c6
    p = (((((p * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0
    return zero if x < lo else p * _pow2(t)  # nan < lo is false: nan stays nan


@overload(exp_neg, jit_options={"fastmath": {"contract"}})
def _exp_neg_overload(x):
    if x == types.float32:
        return _exp_neg32
    if x == types.float64:
        return _exp_neg64
    return None


@njit(cache=True)
def exp_rows(x, n):
    """x[j] = exp_neg(x[j]) for j < n, in place (a 1-d float32 or float64 array)."""
    for j in range(n):
        x[j] = exp_neg(x[j])
