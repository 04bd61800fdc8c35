"""MambaBlock and MambaLM: step (recurrent) equals forward (the selective-scan kernel), on every
backend, and the block's gradients flow through the kernel."""

import pytest
import torch
from helpers import ALL, device_for, run_steps

from minimodels.models.mamba import MambaBlock, MambaLM

pytestmark = pytest.mark.ch05




@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("d_conv", [1, 4])
def test_block_step_equals_forward(backend, d_conv):
    torch.manual_seed(0)
    dev = device_for(backend)
    block = MambaBlock(8, d_state=4, d_conv=d_conv, backend=backend).double().to(dev)
    x = torch.randn(2, 11, 8, dtype=torch.float64, device=dev)
    y, (window, state) = run_steps(block, x)
    torch.testing.assert_close(y, block(x))
    assert window.shape == (2, 16, d_conv - 1) and state.shape == (2, 16, 4)


def test_block_shapes_and_float32():
    block = MambaBlock(16)
    assert (block.d_inner, block.d_state, block.dt_rank) == (32, 16, 1)
    y = block(torch.randn(3, 5, 16))
    assert y.shape == (3, 5, 16) and y.dtype == torch.float32


def test_block_starts_with_delta_in_range_and_negative_A():
    block = MambaBlock(32, dt_min=1e-3, dt_max=1e-1)
    dt = torch.nn.functional.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert (block.A < 0).all()


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_gradients_equal_across_backends(backend):
    torch.manual_seed(1)
    block = MambaBlock(8, d_state=4).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    block.backend = "ref"
    want = torch.autograd.grad(block(x).square().sum(), list(block.parameters()))
    block.backend = backend
    got = torch.autograd.grad(block(x).square().sum(), list(block.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_causal():
    torch.manual_seed(2)
    block = MambaBlock(8, d_state=4).double()
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(block(x)[:, :6], block(x2)[:, :6])
    assert not torch.allclose(block(x)[:, 6:], block(x2)[:, 6:])


def test_lm_step_equals_forward_and_generates():
    torch.manual_seed(3)
    lm = MambaLM(vocab=11, d_model=8, n_layers=2, d_state=4).double()
    tokens = torch.randint(0, 11, (2, 7))
    logits = lm(tokens)
    assert logits.shape == (2, 7, 11)
    state, steps = None, []
    for t in range(7):
        out, state = lm.step(tokens[:, t], state)
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), logits)
    out = lm.generate(tokens[:, :3], 4)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], tokens[:, :3])
    # greedy generation agrees with the parallel forward pass on its own output
    torch.testing.assert_close(lm(out)[:, 2:-1].argmax(-1), out[:, 3:])


def test_lm_accepts_another_mixer():
    class Identity(torch.nn.Module):
        def forward(self, x):
            return 0 * x

        def step(self, x, state=None):
            return 0 * x, state

    lm = MambaLM(vocab=5, d_model=4, mixer=lambda d: Identity())
    assert lm(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 5)
