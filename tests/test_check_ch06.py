"""Chapter 06 checkers: the right answers pass, and each typical wrong answer fails with its
hint (the transposed permutation, the factors in the wrong order, a missing permutation,
transposed blocks, strided blocks, the matrix returned transposed, ...)."""

import pytest
import torch

from minimodels import check
from minimodels.check import CheckFailed
from minimodels.check.ch06 import _bd, _dense, _perm
from minimodels.kernels.monarch import monarch_matrix

pytestmark = pytest.mark.ch06


def right_bd(x, w):
    k, q, p = w.shape
    return torch.einsum("kqp,...kp->...kq", w, x.unflatten(-1, (k, p))).flatten(-2)


def right_perm(r, l):
    return torch.arange(r * l).reshape(r, l).T.reshape(-1)


def test_right_answers_pass():
    assert check.block_diag_multiply(right_bd, strict=True)
    assert check.monarch_perm(right_perm, strict=True)
    assert check.monarch_dense(monarch_matrix, strict=True)
    assert check.monarch_dense(_dense, strict=True)


def not_yet(*args):
    raise NotImplementedError("Exercise")


@pytest.mark.parametrize("checker", [check.block_diag_multiply, check.monarch_perm,
                                     check.monarch_dense])
def test_not_implemented(checker):
    verdict = checker(not_yet, strict=False)
    assert not verdict and "not implemented yet" in verdict.message


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda x, w: _bd(x, w, transpose=True), "by wᵀ"),
        (lambda x, w: _bd(x, w, blocks="strided"), "every k-th entry"),
        (lambda x, w: _bd(x, w, one_block=True), r"first block w\[0\]"),
    ],
)
def test_block_diag_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.block_diag_multiply(wrong, strict=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda r, l: _perm(r, l, inverse=True), "inverse \\(transposed\\) permutation"),
        (lambda r, l: right_perm(l, r), "r and l swapped"),  # the same permutation
        (lambda r, l: _perm(r, l, identity=True), "this is the identity"),
        (lambda r, l: right_perm(r, l).float(), "wrong dtype"),
        (lambda r, l: right_perm(r, l).tolist(), "returned list"),
    ],
)
def test_perm_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.monarch_perm(wrong, strict=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda a, b: _dense(a, b, order="swapped"), "factors are in the wrong order"),
        (lambda a, b: _dense(a, b, p1="inverse"), "P1 is transposed"),
        (lambda a, b: _dense(a, b, p1="none"), "P1 is missing"),
        (lambda a, b: _dense(a, b, p2=False), "P2 is missing"),
        (lambda a, b: _dense(a, b, transpose_blocks=True), "blocks are transposed"),
        (lambda a, b: _dense(a, b, transpose_out=True), "returned Mᵀ"),
    ],
)
def test_dense_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.monarch_dense(wrong, strict=True)


def test_dense_wrong_shape_and_dtype():
    with pytest.raises(CheckFailed, match="wrong shape"):
        check.monarch_dense(lambda a, b: monarch_matrix(a, b)[:, :-1], strict=True)
    with pytest.raises(CheckFailed, match="wrong dtype"):
        check.monarch_dense(lambda a, b: monarch_matrix(a, b).float(), strict=True)
