"""RWKV models: step (recurrent) = forward (parallel) for every layer, constant state size,
AFT-simple against its formula, the time-mix against a loop written from the paper's
equations, and training through the kernels' backward."""

import pytest
import torch
from helpers import KERNELS, device_for, run_steps

from minimodels import use_backend
from minimodels.kernels.wkv import wkv
from minimodels.models import LM, Residual, state_numel
from minimodels.models.rwkv import RWKVChannelMix, RWKVTimeMix, aft_simple, token_shift

pytestmark = pytest.mark.ch03

D = 12




def RWKVBlock(d, layer=0, n_layers=1):
    """RWKV's block: x + TimeMix(LN(x)), then + ChannelMix(LN(·))."""
    return Residual(d, RWKVTimeMix(d, layer, n_layers), RWKVChannelMix(d, layer, n_layers),
                    torch.nn.LayerNorm)


def RWKVLM(vocab, d_model, n_layers):
    return LM(vocab, d_model, n_layers, mixer="rwkv", norm="layer", embed_norm=True,
              tie_head=False)


@pytest.mark.parametrize("make", [lambda: RWKVTimeMix(D), lambda: RWKVChannelMix(D),
                                  lambda: RWKVBlock(D, 1, 3)])
@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_step_equals_forward(make, backend):
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(2, 11, D, dtype=torch.float64)
    with use_backend(backend):
        y, state = run_steps(layer, x)
        want = layer(x)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def test_state_size_is_constant():
    torch.manual_seed(0)
    block = RWKVBlock(D)
    x = torch.randn(3, 40, D)
    sizes = []
    state = None
    for t in range(40):
        _, state = block.step(x[:, t], state)
        sizes.append(state_numel(state))
    assert len(set(sizes)) == 1 and sizes[0] == 3 * (D + 3 * D + D)  # x_prev, WKV, x_prev


def test_lm_step_equals_forward_and_generates():
    torch.manual_seed(0)
    lm = RWKVLM(11, 16, 2).double()
    tokens = torch.randint(0, 11, (2, 9))
    logits = lm(tokens)
    assert logits.shape == (2, 9, 11)
    state, steps = None, []
    for t in range(9):
        out, state = lm.step(tokens[:, t], state)
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=1e-10, atol=1e-10)
    out = lm.generate(tokens[:, :3], 5)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], tokens[:, :3])


def test_time_mix_equals_paper_equations():
    """o_t = W_o(σ(r_t) ⊙ wkv_t) with the WKV sum written out directly (no log space)."""
    torch.manual_seed(1)
    tm = RWKVTimeMix(D).double()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    xs = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)  # x_{t-1}
    r = tm.Wr(tm.mu_r * x + (1 - tm.mu_r) * xs)
    k = tm.Wk(tm.mu_k * x + (1 - tm.mu_k) * xs)
    v = tm.Wv(tm.mu_v * x + (1 - tm.mu_v) * xs)
    w, u = torch.exp(tm.time_decay), tm.time_first
    out = torch.empty_like(x)
    for t in range(7):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            e = torch.exp(-(t - 1 - i) * w + k[:, i])
            num, den = num + e * v[:, i], den + e
        out[:, t] = num / den
    torch.testing.assert_close(tm(x), tm.Wo(torch.sigmoid(r) * out))


def test_aft_simple_formula_and_link_to_wkv():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 6, 5, dtype=torch.float64) for _ in range(3))
    want = torch.empty_like(v)
    for t in range(6):
        wts = torch.softmax(k[:, : t + 1], dim=1)  # over i ≤ t, per channel
        want[:, t] = torch.sigmoid(q[:, t]) * (wts * v[:, : t + 1]).sum(1)
    torch.testing.assert_close(aft_simple(q, k, v), want)
    # RWKV with no decay and no bonus is causal AFT-simple without the σ(q) gate
    zero = torch.zeros(5, dtype=torch.float64)
    torch.testing.assert_close(torch.sigmoid(q) * wkv(zero, zero, k, v), want)
    full = aft_simple(q, k, v, causal=False)
    torch.testing.assert_close(full[:, -1], want[:, -1])


def test_aft_simple_survives_large_keys():
    k = torch.full((1, 4, 2), 200.0)
    assert torch.isfinite(aft_simple(torch.zeros(1, 4, 2), k, torch.ones(1, 4, 2))).all()


def test_token_shift():
    x = torch.arange(6.0).view(1, 3, 2)
    mu = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(token_shift(x, mu), torch.tensor([[[0.0, 0], [2, 1], [4, 3]]]))


def test_decays_are_nonnegative_and_spread():
    w = RWKVTimeMix(64).w
    assert (w >= 0).all() and w.max() / w.min() > 100


@pytest.mark.parametrize("backend", ["cpu"] + KERNELS[1:])
def test_training_through_kernel_backward_learns(backend):
    torch.manual_seed(0)
    dev = device_for(backend)
    lm = RWKVLM(5, 16, 1).to(dev)
    seq = torch.tensor([[0, 1, 2, 3, 4] * 4], device=dev)  # a cycle: next token is determined
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        with use_backend(backend):
            loss = torch.nn.functional.cross_entropy(lm(seq[:, :-1])[0], seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert lm.blocks[0].mixer.time_decay.grad is not None


def test_bad_input():
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        RWKVTimeMix(D)(torch.randn(4, D))
    with pytest.raises(ValueError, match="x_t must have 2 dimensions"):
        RWKVChannelMix(D).step(torch.randn(1, 4, D))
