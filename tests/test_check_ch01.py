"""The chapter-01 checkers against the mistakes learners make: each must get its verdict."""

import pytest
import torch

from minimodels import check

pytestmark = pytest.mark.ch01

# ---------------------------------------------------------------------------------------------
# Exercise 1.1: LSTM cell, written the way a learner would (not calling the package)
# ---------------------------------------------------------------------------------------------


def lstm_ok(x_t, state, W_ih, W_hh, b_ih, b_hh):
    h, c = state
    gates = x_t @ W_ih.T + b_ih + h @ W_hh.T + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm_gate_order_ifog(x_t, state, W_ih, W_hh, b_ih, b_hh):
    h, c = state
    i, f, o, g = (x_t @ W_ih.T + b_ih + h @ W_hh.T + b_hh).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm_swapped_activations(x_t, state, W_ih, W_hh, b_ih, b_hh):
    h, c = state
    i, f, g, o = (x_t @ W_ih.T + b_ih + h @ W_hh.T + b_hh).chunk(4, dim=1)
    c = torch.tanh(f) * c + torch.tanh(i) * torch.sigmoid(g)
    return torch.tanh(o) * torch.tanh(c), c


def lstm_no_forget_path(x_t, state, W_ih, W_hh, b_ih, b_hh):
    h, c = state
    i, f, g, o = (x_t @ W_ih.T + b_ih + h @ W_hh.T + b_hh).chunk(4, dim=1)
    c = torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm_state_not_carried(x_t, state, W_ih, W_hh, b_ih, b_hh):
    h = torch.zeros_like(state[0])
    c = torch.zeros_like(state[1])
    return lstm_ok(x_t, (h, c), W_ih, W_hh, b_ih, b_hh)


def lstm_returns_c_h(*args):
    h, c = lstm_ok(*args)
    return c, h


def lstm_returns_h_only(*args):
    return lstm_ok(*args)[0]


def lstm_not_implemented(*args):
    raise NotImplementedError("Exercise 1.1")


@pytest.mark.parametrize(
    "fn, message",
    [
        (lstm_not_implemented, "Exercise 1.1 .*not implemented yet"),
        (lstm_gate_order_ifog, r"Hint: wrong gate order: you unpacked the blocks as \(i, f, o, g\)"),
        (lstm_swapped_activations, "Hint: tanh and sigmoid are swapped"),
        (lstm_no_forget_path, "Hint: c' = i ⊙ g is missing the forget-gate path"),
        (lstm_state_not_carried, "Hint: the state is not carried: your cell ignores both h and c"),
        (lstm_returns_c_h, r"Hint: you returned \(c, h\)"),
        (lstm_returns_h_only, r"raised TypeError on batch 1.*return the new state as a pair \(h, c\)"),
    ],
)
def test_lstm_cell_wrong_answers(fn, message):
    with pytest.raises(check.CheckFailed, match=message):
        check.lstm_cell(fn)


def test_lstm_cell_correct_passes(capsys):
    assert check.lstm_cell(lstm_ok, strict=False).passed
    assert capsys.readouterr().out.strip() == "Exercise 1.1 (lstm_ok): passed 3 checks."


def test_lstm_float32_dtype_is_checked():
    def upcasts(x_t, state, *w):
        h, c = lstm_ok(x_t.double(), tuple(s.double() for s in state), *(v.double() for v in w))
        return h, c

    with pytest.raises(check.CheckFailed, match="wrong dtype .*float32.*got float64"):
        check.lstm_cell(upcasts)


# ---------------------------------------------------------------------------------------------
# Exercise 1.2: GRU cell
# ---------------------------------------------------------------------------------------------


def gru_ok(x_t, h, W_ih, W_hh, b_ih, b_hh):
    xr, xz, xn = (x_t @ W_ih.T + b_ih).chunk(3, dim=1)
    hr, hz, hn = (h @ W_hh.T + b_hh).chunk(3, dim=1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def gru_order_zrn(x_t, h, W_ih, W_hh, b_ih, b_hh):
    xz, xr, xn = (x_t @ W_ih.T + b_ih).chunk(3, dim=1)
    hz, hr, hn = (h @ W_hh.T + b_hh).chunk(3, dim=1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    return (1 - z) * torch.tanh(xn + r * hn) + z * h


def gru_swapped_activations(x_t, h, W_ih, W_hh, b_ih, b_hh):
    xr, xz, xn = (x_t @ W_ih.T + b_ih).chunk(3, dim=1)
    hr, hz, hn = (h @ W_hh.T + b_hh).chunk(3, dim=1)
    r, z = torch.tanh(xr + hr), torch.tanh(xz + hz)
    return (1 - z) * torch.sigmoid(xn + r * hn) + z * h


def gru_cho_convention(x_t, h, W_ih, W_hh, b_ih, b_hh):
    xr, xz, xn = (x_t @ W_ih.T + b_ih).chunk(3, dim=1)
    hr, hz, hn = (h @ W_hh.T + b_hh).chunk(3, dim=1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    return z * torch.tanh(xn + r * hn) + (1 - z) * h


def gru_state_not_carried(x_t, h, *w):
    return gru_ok(x_t, torch.zeros_like(h), *w)


@pytest.mark.parametrize(
    "fn, message",
    [
        (gru_order_zrn, r"Hint: wrong gate order: you unpacked the blocks as \(z, r, n\)"),
        (gru_swapped_activations, "Hint: tanh and sigmoid are swapped"),
        (gru_cho_convention, "Hint: z and 1 - z are swapped"),
        (gru_state_not_carried, "Hint: the state is not carried"),
        (lambda *a: gru_ok(*a).T, r"wrong shape on random \(batch 2.*swap two axes"),
    ],
)
def test_gru_cell_wrong_answers(fn, message):
    with pytest.raises(check.CheckFailed, match=message):
        check.gru_cell(fn)


def test_gru_cell_correct_passes():
    assert check.gru_cell(gru_ok).passed


# ---------------------------------------------------------------------------------------------
# Exercise 1.3: the gradient norm through time
# ---------------------------------------------------------------------------------------------


def _hidden(state):
    return state[0] if isinstance(state, tuple) else state


def norms_ok(step, x, state):
    hs = []
    for t in range(x.shape[1]):
        state = step(x[:, t], state)
        hs.append(_hidden(state))
    grads = torch.autograd.grad(hs[-1].sum(), hs)
    return torch.stack([g.norm() for g in grads])


def norms_state_not_carried(step, x, state):
    hs = []
    for t in range(x.shape[1]):
        new = step(x[:, t], state)  # always from the initial state
        hs.append(_hidden(new))
    grads = torch.autograd.grad(hs[-1].sum(), hs, allow_unused=True)
    return torch.stack([torch.zeros((), dtype=x.dtype) if g is None else g.norm() for g in grads])


def norms_detached(step, x, state):
    """Truncated BPTT by accident: the state is detached every step."""
    hs = []
    for t in range(x.shape[1]):
        state = step(x[:, t], state)
        h = _hidden(state)
        hs.append(h)
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    grads = torch.autograd.grad(hs[-1].sum(), hs, allow_unused=True)
    return torch.stack([torch.zeros((), dtype=x.dtype) if g is None else g.norm() for g in grads])


def norms_by_lag(step, x, state):
    return norms_ok(step, x, state).flip(0)


def norms_squared(step, x, state):
    return norms_ok(step, x, state) ** 2


@pytest.mark.parametrize(
    "fn, message",
    [
        (norms_state_not_carried, "Hint: only the last step receives gradient: carry the state"),
        (norms_detached, r"raised RuntimeError on an RNN, batch 2.*Hint: .*did you .detach\(\) the state"),
        (norms_by_lag, "Hint: your norms run backwards"),
        (norms_squared, "Hint: these are squared norms"),
        (lambda step, x, s: norms_ok(step, x, s)[None], r"wrong shape .*got \(1, 1\), expected \(1,\)"),
    ],
)
def test_grad_norms_wrong_answers(fn, message):
    with pytest.raises(check.CheckFailed, match=message):
        check.grad_norms(fn)


def test_grad_norms_correct_passes():
    assert check.grad_norms(norms_ok).passed


def test_grad_norms_not_implemented_prints(capsys):
    def stub(step, x, state):
        raise NotImplementedError("Exercise 1.3")

    verdict = check.grad_norms(stub, strict=False)
    assert not verdict.passed
    assert "not implemented yet" in capsys.readouterr().out
