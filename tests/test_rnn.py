"""Chapter 01: the functional RNN/LSTM/GRU equal torch.nn; step equals forward; from_torch."""

import pytest
import torch
from torch import nn

from minimodels.models import rnn as R

pytestmark = pytest.mark.ch01

KINDS = {
    "rnn": (nn.RNN, R.rnn, R.RNN),
    "lstm": (nn.LSTM, R.lstm, R.LSTM),
    "gru": (nn.GRU, R.gru, R.GRU),
}
SIZES = [(1, 1, 1, 1), (3, 7, 5, 4), (2, 13, 3, 9)]  # (batch, l, input, hidden), odd sizes


def _torch_module(kind, d, n, bias=True, **kw):
    torch.manual_seed(hash((kind, d, n, bias)) % 1000)
    m = KINDS[kind][0](d, n, batch_first=True, bias=bias, **kw).double()
    with torch.no_grad():  # larger than torch's init, so the gates are far from 0.5
        for p in m.parameters():
            p.normal_(0, 0.7)
    return m


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b, l, d, n", SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_functional_equals_torch_nn(kind, b, l, d, n, bias):
    m = _torch_module(kind, d, n, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, l, d, dtype=torch.float64, generator=g)
    h0 = torch.randn(1, b, n, dtype=torch.float64, generator=g)
    weights = (m.weight_ih_l0, m.weight_hh_l0) + (
        (m.bias_ih_l0, m.bias_hh_l0) if bias else (None, None)
    )
    fn = KINDS[kind][1]
    with torch.no_grad():
        if kind == "lstm":
            c0 = torch.randn(1, b, n, dtype=torch.float64, generator=g)
            want, (hT, cT) = m(x, (h0, c0))
            got, (gh, gc) = fn(x, (h0[0], c0[0]), *weights)
            torch.testing.assert_close(gc, cT[0], rtol=1e-12, atol=1e-12)
        else:
            want, hT = m(x, h0)
            got, gh = fn(x, h0[0], *weights)
    assert got.shape == (b, l, n)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, hT[0], rtol=1e-12, atol=1e-12)


def test_relu_rnn_equals_torch_nn():
    m = _torch_module("rnn", 3, 4, nonlinearity="relu")
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    ours = R.RNN.from_torch(m)
    assert ours.nonlinearity == "relu"
    with torch.no_grad():
        torch.testing.assert_close(ours(x), m(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_state_default_and_gradients_match(kind):
    m = _torch_module(kind, 3, 4)
    ours = KINDS[kind][2].from_torch(m)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), m(x)[0], rtol=1e-12, atol=1e-12)
    ours(x).square().sum().backward()
    m(x)[0].square().sum().backward()
    torch.testing.assert_close(ours.W_hh.grad, m.weight_hh_l0.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.b_ih.grad, m.bias_ih_l0.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_equals_forward(kind, dtype):
    torch.manual_seed(0)
    layer = KINDS[kind][2](3, 5).to(dtype)
    x = torch.randn(2, 9, 3, dtype=dtype)
    y = layer(x)
    state, ys = None, []
    for t in range(x.shape[1]):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=tol, atol=tol)
    assert y.dtype == dtype
    # the state is constant-sized: (b, n), or a pair of them for the LSTM
    sizes = [s.shape for s in (state if kind == "lstm" else (state,))]
    assert all(s == (2, 5) for s in sizes)


@pytest.mark.parametrize("kind", KINDS)
def test_from_torch_round_trip(kind):
    m = _torch_module(kind, 4, 6)
    ours = KINDS[kind][2].from_torch(m)
    assert ours.W_ih.dtype == torch.float64
    for a, b in [("W_ih", "weight_ih_l0"), ("W_hh", "weight_hh_l0"), ("b_ih", "bias_ih_l0"),
                 ("b_hh", "bias_hh_l0")]:
        assert torch.equal(getattr(ours, a), getattr(m, b))
        assert getattr(ours, a).data_ptr() != getattr(m, b).data_ptr()  # a copy, not a view
    back = KINDS[kind][0](4, 6, batch_first=True).double()
    with torch.no_grad():
        back.weight_ih_l0.copy_(ours.W_ih)
        back.weight_hh_l0.copy_(ours.W_hh)
        back.bias_ih_l0.copy_(ours.b_ih)
        back.bias_hh_l0.copy_(ours.b_hh)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], ours(x), rtol=1e-12, atol=1e-12)


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(TypeError, match="expects a torch.nn.LSTM, got GRU"):
        R.LSTM.from_torch(nn.GRU(2, 3, batch_first=True))
    with pytest.raises(ValueError, match="batch_first=True"):
        R.GRU.from_torch(nn.GRU(2, 3))
    with pytest.raises(ValueError, match="num_layers=1"):
        R.RNN.from_torch(nn.RNN(2, 3, num_layers=2, batch_first=True))
    with pytest.raises(ValueError, match="proj_size"):
        R.LSTM.from_torch(nn.LSTM(2, 3, batch_first=True, proj_size=2))


def test_forget_bias_opens_the_forget_gate():
    layer = R.LSTM(2, 3, forget_bias=2.0)
    assert torch.all(layer.b_ih[3:6] == 2.0) and torch.all(layer.b_hh[3:6] == 0.0)
    with pytest.raises(ValueError, match="forget_bias needs bias=True"):
        R.LSTM(2, 3, bias=False, forget_bias=1.0)


def test_bad_inputs_name_the_argument():
    W_ih, W_hh = torch.randn(12, 3), torch.randn(12, 3)
    x = torch.randn(2, 5, 3)
    h = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"x must have 3 dimensions \(batch, l, input\)"):
        R.lstm(x[0], (h, h), W_ih, W_hh)
    with pytest.raises(ValueError, match=r"W_hh must have shape \(3·hidden, hidden\)"):
        R.gru(x, h, W_ih, W_hh)  # LSTM weights given to the GRU
    with pytest.raises(ValueError, match=r"W_ih must have shape .* = \(12, 3\), got \(12, 4\)"):
        R.lstm(x, (h, h), torch.randn(12, 4), W_hh)
    with pytest.raises(ValueError, match=r"c0 must have shape \(batch, hidden\) = \(2, 3\)"):
        R.lstm(x, (h, torch.zeros(3, 2)), W_ih, W_hh)
    with pytest.raises(TypeError, match=r"state must be a pair \(h0, c0\)"):
        R.lstm(x, h, W_ih, W_hh)
    with pytest.raises(TypeError, match="b_ih must be float32"):
        R.lstm(x, (h, h), W_ih, W_hh, torch.zeros(12, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        R.rnn(x.numpy(), h, torch.randn(3, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        R.rnn(x, h, torch.randn(3, 3), torch.randn(3, 3), nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"x_t must have 2 dimensions \(batch, input\)"):
        R.GRU(3, 3).step(x)
    with pytest.raises(ValueError, match="kind must be one of"):
        R.RNNModel("transformer", 2, 3, 1)


def test_grad_norms_of_a_linear_rnn_are_powers_of_the_weight():
    """h_t = a·h_{t-1} + x_t (scalar, identity nonlinearity): ∂h_l/∂h_t = a^(l-t)."""
    a = 0.5
    step = lambda x_t, h: a * h + x_t
    x = torch.randn(1, 6, 1, dtype=torch.float64)
    norms = R.grad_norms(step, x, torch.zeros(1, 1, dtype=torch.float64))
    torch.testing.assert_close(norms, a ** torch.arange(5, -1, -1, dtype=torch.float64))


def test_grad_norms_lstm_state_and_vanishing():
    torch.manual_seed(0)
    n = 8
    W_hh = torch.randn(n, n) * 0.5 / n**0.5  # spectral radius ≈ 0.5: vanishing
    x = torch.randn(4, 30, n)
    norms = R.grad_norms(lambda x_t, h: R.rnn_cell(x_t, h, torch.eye(n), W_hh), x,
                         torch.zeros(4, n))
    assert norms.shape == (30,) and norms[0] < 1e-4 * norms[-1]
    layer = R.LSTM(n, n, forget_bias=5.0)
    cell = lambda x_t, s: R.lstm_cell(x_t, s, *layer.weights())
    lnorms = R.grad_norms(cell, x, (torch.zeros(4, n), torch.zeros(4, n)))
    assert lnorms.shape == (30,) and lnorms[0] > 1e3 * norms[0]


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("with_state", [False, True])
def test_fused_equals_our_loop_with_gradients(kind, with_state):
    """fused=True (torch's fused loop) computes our layer: outputs, final state and every
    gradient agree in float64, from zeros or from a given state, and step still matches."""
    torch.manual_seed(0)
    layer = R.LAYERS[kind](3, 5).double()
    fused = R.LAYERS[kind](3, 5, fused=True).double()
    fused.load_state_dict(layer.state_dict())
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    h = torch.randn(2, 5, dtype=torch.float64)
    state = ((h, h.flip(0)) if kind == "lstm" else h) if with_state else None
    results = []
    for module in (layer, fused):
        y, last = module.scan(x, state)
        last = last if kind == "lstm" else (last,)
        (y.square().sum() + sum(s.sum() for s in last)).backward()
        results.append((y, last, [p.grad for p in module.parameters()]))
    (y0, s0, g0), (y1, s1, g1) = results
    torch.testing.assert_close(y1, y0)
    for a, b in zip(s1 + tuple(g1), s0 + tuple(g0), strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        y_step, _ = fused.step(x[:, 0], state)
    torch.testing.assert_close(y_step, y0[:, 0].detach())
    with pytest.raises(TypeError, match="fused"):
        R.LAYERS[kind](3, 5, fused=1)
