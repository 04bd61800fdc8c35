"""MambaBlock and a Mamba LM: step (recurrent) equals forward (the selective-scan kernel), on every
backend; the block equals a loop written from the paper's equations; gradients flow through the
kernel on every backend."""

import pytest
import torch
from helpers import ALL, device_for, run_steps

from minimodels import use_backend
from minimodels.models import LM
from minimodels.models.mamba import MambaBlock

pytestmark = pytest.mark.ch05




@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("d_conv", [1, 4])
def test_block_step_equals_forward(backend, d_conv):
    torch.manual_seed(0)
    dev = device_for(backend)
    block = MambaBlock(8, d_state=4, d_conv=d_conv).double().to(dev)
    x = torch.randn(2, 11, 8, dtype=torch.float64, device=dev)
    with use_backend(backend):
        y, (window, state) = run_steps(block, x)
        want = block(x)
    torch.testing.assert_close(y, want)
    assert window.shape == (2, 16, d_conv - 1) and state.shape == (2, 16, 4)


def mamba_by_hand(block, x):
    """The block from the paper's equations with torch.nn.functional pieces only: an
    independent reference (its own conv1d call, the scan as an explicit loop over t)."""
    F = torch.nn.functional
    l = x.shape[1]
    u, z = (x @ block.in_proj.weight.T).chunk(2, dim=-1)  # (b, l, c)
    u = F.conv1d(F.pad(u.transpose(1, 2), (block.d_conv - 1, 0)), block.conv.weight,
                 block.conv.bias, groups=block.d_inner)  # (b, c, l), causal
    u = F.silu(u).transpose(1, 2)  # (b, l, c)
    dbc = u @ block.x_proj.weight.T
    r, n = block.dt_rank, block.d_state
    delta = F.softplus(dbc[..., :r] @ block.dt_proj.weight.T + block.dt_proj.bias)  # (b, l, c)
    B, C = dbc[..., r:r + n], dbc[..., r + n:]  # (b, l, n)
    A = -torch.exp(block.A_log)  # (c, n)
    h = torch.zeros(x.shape[0], block.d_inner, n, dtype=x.dtype, device=x.device)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t, :, None] * B[:, t, None, :]
                                                        * u[:, t, :, None])
        ys.append((h * C[:, t, None, :]).sum(-1) + block.D * u[:, t])  # (b, c)
    y = torch.stack(ys, 1) * F.silu(z)  # (b, l, c)
    return y @ block.out_proj.weight.T  # (b, l, d)


@pytest.mark.parametrize("backend", ALL)
def test_block_equals_the_papers_equations(backend):
    torch.manual_seed(4)
    dev = device_for(backend)
    block = MambaBlock(16, d_state=4).double().to(dev)
    assert (block.d_inner, block.d_state, block.dt_rank) == (32, 4, 1)
    x = torch.randn(3, 5, 16, dtype=torch.float64, device=dev)
    with use_backend(backend):
        y = block(x)
    torch.testing.assert_close(y, mamba_by_hand(block, x))
    with use_backend(backend):
        assert block.float()(x.float()).dtype == torch.float32


def test_block_starts_with_delta_in_range_and_negative_A():
    block = MambaBlock(32, dt_min=1e-3, dt_max=1e-1)
    dt = torch.nn.functional.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert (block.A < 0).all()


@pytest.mark.parametrize("backend", ["cpu", ALL[-1]])
def test_gradients_equal_across_backends(backend):
    torch.manual_seed(1)
    dev = device_for(backend)
    block = MambaBlock(8, d_state=4).double().to(dev)
    x = torch.randn(2, 9, 8, dtype=torch.float64, device=dev)
    want = torch.autograd.grad(mamba_by_hand(block, x).square().sum(), list(block.parameters()))
    with use_backend(backend):
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
    lm = LM(11, 8, 2, mixer="mamba", d_state=4).double()
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

    lm = LM(5, 4, 2, mixer=lambda d: Identity())
    tokens = torch.zeros(1, 3, dtype=torch.long)
    # the mixers add nothing: logits = head(norm(embed(tokens))) exactly
    torch.testing.assert_close(lm(tokens), lm.head(lm.norm(lm.embed(tokens))))
