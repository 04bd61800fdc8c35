"""Hyena and StripedHyena (chapter 07): the implicit filter (shape, decay window, any length),
the Hyena operator against an independent reference (explicit loops for every convolution),
its step against its forward, causality, the recurrence's gate placement; attention with rotary
positions and grouped-query heads (KV cache = forward, relative positions, GQA with h_kv = h
is plain attention, a smaller cache); LM(mixer="hyena") and a striped hybrid."""

import math

import pytest
import torch
from helpers import run_steps

from minimodels.models import LM, MIXERS, state_numel
from minimodels.models.attention import MultiHeadAttention, rotary
from minimodels.models.hyena import HyenaFilter, HyenaOperator, positional_encoding

pytestmark = pytest.mark.ch07


def direct_conv(z, h, D):
    """y_t = Σ_{j<=t} h_j z_{t−j} + D z_t by explicit loops. z (b, d, l), h (d, l), D (d,)."""
    y = D[:, None] * z
    for t in range(z.shape[-1]):
        for j in range(t + 1):
            y[..., t] = y[..., t] + h[:, j] * z[..., t - j]
    return y


def test_positional_encoding():
    z = positional_encoding(5, 2, 10, dtype=torch.float64)
    assert z.shape == (5, 5)
    torch.testing.assert_close(z[:, 0], torch.arange(5, dtype=torch.float64) / 10)
    torch.testing.assert_close(z[3, 2], torch.tensor(math.cos(2 * math.pi * 2 * 0.3),
                                                     dtype=torch.float64))
    torch.testing.assert_close(positional_encoding(3, 2, 10), positional_encoding(5, 2, 10)[:3])


def test_filter_shape_window_and_prefix():
    torch.manual_seed(0)
    f = HyenaFilter(6, 100, reach=(0.2, 1.0)).double()
    h = f(100)
    assert h.shape == (6, 100)
    w = f.window(100)
    # the fastest channel falls to 1% at 20% of l_max, the slowest at 100%
    torch.testing.assert_close(w[-1, 20], torch.tensor(0.01, dtype=torch.float64), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(w[0, 99], torch.tensor(0.01 ** 0.99, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(f(37), h[:, :37])  # a length-l filter is the prefix
    with pytest.raises(ValueError, match=r"filter length l must be in \[1, l_max = 100\]"):
        f(101)
    with pytest.raises(ValueError, match="reach must be"):
        HyenaFilter(2, 10, reach=(1.0, 0.5))


def test_operator_matches_an_independent_reference():
    torch.manual_seed(1)
    op = HyenaOperator(4, l_max=32, order=2).double()
    u = torch.randn(2, 11, 4, dtype=torch.float64)
    p = op.in_proj(u).transpose(1, 2)  # (b, 3d, l)
    w = op.short.weight[:, 0]  # (3d, s)
    pad = torch.nn.functional.pad(p, (op.s - 1, 0))
    p = sum(w[:, i, None] * pad[..., i:i + 11] for i in range(op.s)) + op.short.bias[:, None]
    x1, x2, v = p.split(4, dim=1)
    h = op.filters(11)
    z = x1 * direct_conv(v, h[0], op.D[0])  # gate after the convolution
    z = x2 * direct_conv(z, h[1], op.D[1])
    torch.testing.assert_close(op(u), op.out_proj(z.transpose(1, 2)))
    gate_first = op.out_proj((direct_conv(x2 * direct_conv(x1 * v, h[0], op.D[0]), h[1],
                                          op.D[1])).transpose(1, 2))
    assert (op(u) - gate_first).abs().max() > 1e-3  # the gate's side matters


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("l", [1, 9, 150])  # 150 > DIRECT_MAX_TAPS["cpu"]: the FFT path
def test_step_equals_forward(order, l):
    torch.manual_seed(order)
    op = HyenaOperator(6, l_max=160, order=order).double()
    u = torch.randn(2, l, 6, dtype=torch.float64)
    ys, state = run_steps(op, u)
    torch.testing.assert_close(ys, op(u))
    window, hist = state
    assert window.shape == (2, (order + 1) * 6, 2)
    assert [tuple(hh.shape) for hh in hist] == [(2, 6, l)] * order  # grows like a KV cache


def test_operator_is_causal_and_trains():
    torch.manual_seed(2)
    op = HyenaOperator(8, l_max=64)
    u = torch.randn(1, 40, 8, requires_grad=True)
    u2 = u.detach().clone()
    u2[:, 25:] += 1
    torch.testing.assert_close(op(u)[:, :25], op(u2)[:, :25])
    assert (op(u)[:, 25:] - op(u2)[:, 25:]).abs().max() > 1e-4
    op(u).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in op.parameters())
    assert u.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="u must have 3 dimensions"):
        op(torch.randn(40, 8))


def test_rotary_keeps_norms_and_makes_scores_relative():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64, generator=g)
    torch.testing.assert_close(rotary(q, 5).norm(), q.norm())
    s1 = (rotary(q, 7) * rotary(k, 3)).sum()
    s2 = (rotary(q, 14) * rotary(k, 10)).sum()  # same distance 4
    torch.testing.assert_close(s1, s2)
    assert abs((rotary(q, 7) * rotary(k, 6)).sum() - s1) > 1e-6


@pytest.mark.parametrize("rope, n_kv", [(False, None), (True, None), (True, 2), (False, 1),
                                        (True, 1)])
def test_attention_options_step_equals_forward(rope, n_kv):
    torch.manual_seed(3)
    att = MultiHeadAttention(16, n_heads=4, rope=rope, n_kv_heads=n_kv).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    ys, (K, V) = run_steps(att, x)
    torch.testing.assert_close(ys, att(x))
    assert K.shape == V.shape == (2, n_kv or 4, 12, 4)  # the cache holds h_kv heads


def test_gqa_shares_key_value_heads():
    torch.manual_seed(4)
    gqa = MultiHeadAttention(16, n_heads=4, n_kv_heads=2).double()
    full = MultiHeadAttention(16, n_heads=4).double()
    with torch.no_grad():  # the same map with every key/value head written twice
        full.Wq.weight.copy_(gqa.Wq.weight)
        full.Wo.weight.copy_(gqa.Wo.weight)
        for W, Wg in ((full.Wk, gqa.Wk), (full.Wv, gqa.Wv)):
            W.weight.copy_(Wg.weight.view(2, 4, 16).repeat_interleave(2, 0).reshape(16, 16))
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), full(x))
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        MultiHeadAttention(16, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="head size d_model / n_heads must be even"):
        MultiHeadAttention(12, n_heads=4, rope=True)


def test_lm_hyena_and_striped_hybrid():
    torch.manual_seed(5)
    lm = LM(13, 16, 2, mixer="hyena", l_max=32).double()
    assert isinstance(lm.blocks[0].mixer, HyenaOperator) and "hyena" in MIXERS
    striped = LM(13, 16, 3, mixer=["hyena", "hyena", "attention"], l_max=32, n_heads=4,
                 rope=True, n_kv_heads=2).double()
    assert isinstance(striped.blocks[2].mixer, MultiHeadAttention)
    assert striped.blocks[2].mixer.rope and striped.blocks[2].mixer.n_kv_heads == 2
    tokens = torch.randint(0, 13, (2, 10))
    for model in (lm, striped):
        logits = model(tokens)
        state, steps = None, []
        for t in range(10):
            out, state = model.step(tokens[:, t], state)
            steps.append(out)
        torch.testing.assert_close(torch.stack(steps, 1), logits)
    # hyena, per layer: order 2 histories (b, d, t) and the short window (b, 3d, 2);
    # attention: K and V of 2 heads (b, 2, t, e)
    hyena_state = 2 * (2 * 2 * 16 * 10 + 2 * 3 * 16 * 2)
    assert state_numel(state) == hyena_state + 2 * 2 * 2 * 10 * 4

