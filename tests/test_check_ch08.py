"""Chapter 08 checkers: the right answers pass, and each typical wrong answer fails with its
hint (σ and σ² confused, the clean image as target, the window centred without clamping or
clamped on one side, a merge by plain reshape, a split that is not the merge's inverse, ...)."""

import pytest
import torch

from minimodels import check
from minimodels.check import CheckFailed
from minimodels.check.ch08 import (
    _loss,
    _merge_channels_first,
    _merge_plain,
    _merge_swapped,
    _split_plain,
    _split_swapped,
    _starts,
)
from minimodels.kernels.natten import window_start
from minimodels.models.diffusion import Denoiser, denoiser_loss
from minimodels.models.hdit import merge_tokens, split_tokens

pytestmark = pytest.mark.ch08


def right_loss(F, x0, sigma, noise):
    """Through the package's Denoiser and denoiser_loss (another code path than the checker's)."""
    class Wrap(torch.nn.Module):
        def forward(self, x, c):
            return F(x, c)

    return denoiser_loss(Denoiser(Wrap(), sigma_data=0.5), x0, sigma, noise)


def right_starts(n, kernel_size):
    return torch.tensor([window_start(i, n, kernel_size) for i in range(n)])


def test_right_answers_pass():
    assert check.edm_loss(right_loss, strict=True)
    assert check.window_starts(right_starts, strict=True)
    assert check.merge_tokens(merge_tokens, strict=True)
    assert check.split_tokens(split_tokens, strict=True)


def not_yet(*args):
    raise NotImplementedError("Exercise")


@pytest.mark.parametrize("checker", [check.edm_loss, check.window_starts, check.merge_tokens,
                                     check.split_tokens])
def test_not_implemented(checker):
    verdict = checker(not_yet, strict=False)
    assert not verdict and "not implemented yet" in verdict.message


@pytest.mark.parametrize(
    "switch, hint",
    [("noise_sq", "noise is scaled by σ²"), ("c_in_var", "missing its square root"),
     ("c_out_sq", "c_out uses σ²"), ("target_x0", "target is the clean image"),
     ("no_c_in", "F got x_σ itself"), ("c_noise_sigma", "c_noise = ln")],
)
def test_loss_mistakes_get_their_hint(switch, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.edm_loss(lambda *a: _loss(*a, **{switch: True}), strict=True)


def test_loss_wrong_structure():
    with pytest.raises(CheckFailed, match="returned float"):
        check.edm_loss(lambda *a: right_loss(*a).item(), strict=True)
    with pytest.raises(CheckFailed, match="wrong shape"):
        check.edm_loss(lambda F, x0, s, n: (F(x0, s) - x0).pow(2), strict=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [(lambda n, K: _starts(n, K, clamp="none"), "centred without clamping"),
     (lambda n, K: _starts(n, K, clamp="low"), "clamped at 0 only"),
     (lambda n, K: _starts(n, K, top=n - K + 1), "off by one at the far border"),
     (lambda n, K: right_starts(n, K).float(), "wrong dtype")],
)
def test_window_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.window_starts(wrong, strict=True)


@pytest.mark.parametrize(
    "wrong, hint",
    [(_merge_plain, "plain reshape"), (_merge_channels_first, r"\(d, dy, dx\) order"),
     (_merge_swapped, "dy and dx are swapped"),
     (lambda x: merge_tokens(x)[..., :-1], "wrong shape")],
)
def test_merge_mistakes_get_their_hint(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        check.merge_tokens(wrong, strict=True)


@pytest.mark.parametrize("wrong", [_split_swapped, _split_plain])
def test_split_not_inverse_gets_its_hint(wrong):
    x = torch.randn(1, 4, 4, 3, dtype=torch.float64)
    assert not torch.equal(wrong(merge_tokens(x)), x)  # the mistake really is not an inverse
    with pytest.raises(CheckFailed, match="not the inverse of the merge"):
        check.split_tokens(wrong, strict=True)
