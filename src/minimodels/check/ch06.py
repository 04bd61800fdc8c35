"""Checkers for chapter 06 (Monarch matrices, Monarch Mixer): the block-diagonal multiply, the
permutation P1, and the dense matrix of a Monarch product.

Each keeps its list of typical mistakes beside it (``_bd_mistakes``, ``_perm_mistakes``,
``_dense_mistakes``) and names the one it recognises: the transposed (inverse) permutation,
the factors in the wrong order, a missing permutation, transposed blocks, blocks cut from
strided instead of contiguous entries, the matrix returned transposed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from minimodels.check import Case, Mistake, Verdict, check_function
from minimodels.kernels.monarch import monarch_matrix

__all__ = ["block_diag_multiply", "monarch_dense", "monarch_perm"]


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _safe(wrong: Callable) -> Callable:
    """A mistake that cannot be made at some shapes (the factors swapped when they do not fit)
    matches nothing there instead of raising."""

    def run(*args):
        try:
            return wrong(*args)
        except (RuntimeError, ValueError, IndexError):
            return torch.empty(0)

    return run


# =============================================================================================
# Exercise 6.1: the block-diagonal multiply BD(w) x
# =============================================================================================


def _bd(x, w, *, blocks="contiguous", transpose=False, one_block=False):
    """BD(w) x with switches that reproduce typical mistakes. x (..., k·p), w (k, q, p)."""
    k, q, p = w.shape
    if blocks == "contiguous":
        xb = x.reshape(*x.shape[:-1], k, p)  # block kk = x[kk·p : (kk+1)·p]
    else:  # block kk = x[kk], x[kk + k], ...: every k-th entry
        xb = x.reshape(*x.shape[:-1], p, k).transpose(-1, -2)
    if one_block:
        w = w[:1].expand_as(w)
    W = w.transpose(-1, -2) if transpose else w
    return torch.einsum("kqp,...kp->...kq", W, xb).reshape(*x.shape[:-1], k * q)


def _bd_cases() -> list[Case]:
    g = torch.Generator().manual_seed(61)
    return [Case("one block, x (1, 3), w (1, 3, 3)", (_rand(g, 1, 3), _rand(g, 1, 3, 3))),
            Case("x (2, 12), w (4, 3, 3): square blocks", (_rand(g, 2, 12), _rand(g, 4, 3, 3))),
            Case("x (2, 3, 8), w (2, 5, 4): leading axes, rectangular blocks",
                 (_rand(g, 2, 3, 8), _rand(g, 2, 5, 4)))]


def _bd_mistakes() -> list[Mistake]:
    return [
        Mistake("each block multiplies its slice by wᵀ: block kk is w[kk] (q x p) applied to "
                "x[kk·p : (kk+1)·p], i.e. Σ_p w[kk, :, p] x[kk·p + p].",
                lambda x, w: _bd(x, w, transpose=True)),
        Mistake("your blocks take every k-th entry of x (x.reshape(..., p, k)): block kk owns the "
                "contiguous slice x[kk·p : (kk+1)·p], so reshape to (..., k, p).",
                lambda x, w: _bd(x, w, blocks="strided")),
        Mistake("every slice was multiplied by the first block w[0]: block kk uses w[kk].",
                lambda x, w: _bd(x, w, one_block=True)),
    ]


def _bd_reference(x, w):
    return _bd(x, w)


def block_diag_multiply(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 6.1: ``fn(x, w) -> BD(w) x``. x: (..., k·p); w: (k, q, p) -> (..., k·q)."""
    return check_function("6.1", fn, _bd_cases(), _bd_reference, _bd_mistakes(), strict=strict)


# =============================================================================================
# Exercise 6.2: the permutation P1 as a gather index
# =============================================================================================


def _perm(r, l, *, inverse=False, identity=False):
    idx = torch.arange(r * l)
    if identity:
        return idx
    i, j = (idx // l, idx % l) if inverse else (idx % r, idx // r)
    return j * r + i if inverse else i * l + j  # gather: out[j·r + i] = z[i·l + j]


def _perm_cases() -> list[Case]:
    return [Case("r = 1, l = 1", (1, 1)), Case("r = 3, l = 4", (3, 4)),
            Case("r = 4, l = 2", (4, 2)), Case("r = 5, l = 5", (5, 5))]


def _perm_mistakes() -> list[Mistake]:
    return [
        Mistake("this is the inverse (transposed) permutation P1ᵀ, or the one of (l, r) with r "
                "and l swapped: perm[j·r + i] must be i·l + j, because z[..., perm] puts "
                "z[i·l + j] at position j·r + i (a reshape to (r, l), then a transpose).",
                lambda r, l: _perm(r, l, inverse=True)),
        Mistake("this is the identity: P1 moves z[i·l + j] to position j·r + i.",
                lambda r, l: _perm(r, l, identity=True)),
    ]


def monarch_perm(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 6.2: ``fn(r, l) -> perm`` (int64, (r·l,)) with z[..., perm] = P1 z: position
    j·r + i (block j, row i) takes z[i·l + j]."""
    return check_function("6.2", fn, _perm_cases(), _perm, _perm_mistakes(), strict=strict)


# =============================================================================================
# Exercise 6.3: the dense matrix of a Monarch product
# =============================================================================================


def _dense(w1, w2, *, p1="right", p2=True, order="right", transpose_blocks=False,
           transpose_out=False):
    """P2 · BD(w2) · P1 · BD(w1) as a matrix (l·s, n), with switches for typical mistakes."""
    if order == "swapped":
        w1, w2 = w2, w1
    k, q, p = w1.shape
    l, s, r = w2.shape
    if transpose_blocks:
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    n = k * p
    x = torch.eye(n, dtype=w1.dtype)  # row a = e_a
    z = torch.einsum("kqp,akp->akq", w1, x.reshape(n, k, p)).reshape(n, k * q)
    if p1 == "right":
        z = z.reshape(n, r, l).transpose(1, 2)  # (n, l, r)
    elif p1 == "inverse":
        z = z.reshape(n, l, r).transpose(1, 2).reshape(n, l, r)
    else:
        z = z.reshape(n, l, r)
    y = torch.einsum("lsr,alr->als", w2, z)  # (n, l, s)
    y = y.transpose(1, 2).reshape(n, s * l) if p2 else y.reshape(n, l * s)
    return y if transpose_out else y.T.contiguous()


def _dense_cases() -> list[Case]:
    g = torch.Generator().manual_seed(63)
    # square first: there a swapped order, transposed blocks or Mᵀ still have the right shape
    # and get their names; l != r next, where P1 differs from its transpose
    return [Case("square: w1 (3, 3, 3), w2 (3, 3, 3)", (_rand(g, 3, 3, 3), _rand(g, 3, 3, 3))),
            Case("w1 (2, 3, 2), w2 (3, 2, 2): l != r", (_rand(g, 2, 3, 2), _rand(g, 3, 2, 2))),
            Case("one block each: w1 (1, 2, 3), w2 (1, 2, 2)",
                 (_rand(g, 1, 2, 3), _rand(g, 1, 2, 2))),
            Case("w1 (4, 2, 3), w2 (2, 5, 4)", (_rand(g, 4, 2, 3), _rand(g, 2, 5, 4)))]


def _dense_mistakes() -> list[Mistake]:
    return [Mistake(m.hint, _safe(m.wrong)) for m in _dense_mistakes_raw()]


def _dense_mistakes_raw() -> list[Mistake]:
    return [
        Mistake("the factors are in the wrong order: x meets BD(w1) first, M = P2·BD(w2)·P1·"
                "BD(w1) (the matrix product reads right to left).",
                lambda a, b: _dense(a, b, order="swapped")),
        Mistake("P1 is transposed (its inverse): position j·r + i of the regrouped vector "
                "takes z[i·l + j]; reshape z to (r, l), then transpose.",
                lambda a, b: _dense(a, b, p1="inverse")),
        Mistake("P1 is missing: between the factors, block j of w2 takes every l-th entry of "
                "BD(w1) x (z[i·l + j]), not a contiguous slice.",
                lambda a, b: _dense(a, b, p1="none")),
        Mistake("P2 is missing: output t of block j lands at t·l + j, not j·s + t.",
                lambda a, b: _dense(a, b, p2=False)),
        Mistake("the blocks are transposed: block kk of BD(w1) is w1[kk] (q x p), not its "
                "transpose.", lambda a, b: _dense(a, b, transpose_blocks=True)),
        Mistake("you returned Mᵀ: the matrix has one row per output (l·s rows) and one column "
                "per input (n = k·p columns), so M @ x is the product.",
                lambda a, b: _dense(a, b, transpose_out=True)),
    ]


def monarch_dense(fn: Callable, *, strict: bool | None = None) -> Verdict:
    """Exercise 6.3: ``fn(w1, w2) -> M`` (l·s, n): M @ x = P2 · BD(w2) · P1 · BD(w1) · x.
    w1: (k, q, p); w2: (l, s, r) with l·r = k·q."""
    return check_function("6.3", fn, _dense_cases(), monarch_matrix, _dense_mistakes(),
                          strict=strict)
