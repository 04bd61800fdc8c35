"""Recurrent networks: the Elman RNN, the LSTM and the GRU, in ``torch.nn``'s layout.

References: Elman, "Finding structure in time" (1990); Hochreiter & Schmidhuber, "Long
short-term memory" (1997), with the forget gate of Gers, Schmidhuber & Cummins (2000); Cho et
al., "Learning phrase representations using RNN encoder-decoder" (2014), section 2.3 (the GRU);
Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks" (2013),
section 2 (vanishing and exploding gradients).

Glossary (code = ``torch.nn``): ``W_ih`` = ``weight_ih_l0`` (g·n, d), ``W_hh`` = ``weight_hh_l0``
(g·n, n), ``b_ih``, ``b_hh`` = the biases (g·n,), with the g gates stacked in rows in torch's
order: RNN (one block), LSTM (i, f, g, o), GRU (r, z, n). Shapes: ``b`` batch, ``l`` length,
``d`` input width, ``n`` hidden width. ``h`` is the hidden state, ``c`` the LSTM's cell.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minimodels.backend import expect_tensor

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "RNNModel",
    "grad_norms",
    "gru",
    "gru_cell",
    "lstm",
    "lstm_cell",
    "rnn",
    "rnn_cell",
]

GATES = {"rnn": 1, "lstm": 4, "gru": 3}


# =============================================================================================
# Cells: one time step
# =============================================================================================


def _affine(x_t, W, b):
    return x_t @ W.T if b is None else x_t @ W.T + b  # (b, g·n)


def rnn_cell(x_t, h, W_ih, W_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """h' = tanh(W_ih x_t + b_ih + W_hh h + b_hh)   (relu instead of tanh if asked).

    x_t: (b, d); h: (b, n) -> h': (b, n)."""
    pre = _affine(x_t, W_ih, b_ih) + _affine(h, W_hh, b_hh)  # (b, n)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def lstm_cell(x_t, state, W_ih, W_hh, b_ih=None, b_hh=None):
    """One LSTM step, gates in torch's order (i, f, g, o):

        i = σ(·), f = σ(·), g = tanh(·), o = σ(·)      where · = W_ih x_t + b_ih + W_hh h + b_hh
        c' = f ⊙ c + i ⊙ g                            (the forget-gate path: the gradient highway)
        h' = o ⊙ tanh(c')

    x_t: (b, d); state = (h, c), each (b, n) -> (h', c')."""
    h, c = state
    i, f, g, o = (_affine(x_t, W_ih, b_ih) + _affine(h, W_hh, b_hh)).chunk(4, dim=-1)  # (b, n)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def gru_cell(x_t, h, W_ih, W_hh, b_ih=None, b_hh=None):
    """One GRU step, gates in torch's order (r, z, n):

        r = σ(W_ir x_t + b_ir + W_hr h + b_hr)
        z = σ(W_iz x_t + b_iz + W_hz h + b_hz)
        ñ = tanh(W_in x_t + b_in + r ⊙ (W_hn h + b_hn))   (r gates the recurrent term only)
        h' = (1 - z) ⊙ ñ + z ⊙ h

    x_t: (b, d); h: (b, n) -> h': (b, n). Cho et al. write z for 1 - z; torch's convention here."""
    xr, xz, xn = _affine(x_t, W_ih, b_ih).chunk(3, dim=-1)  # (b, n) each
    hr, hz, hn = _affine(h, W_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


# =============================================================================================
# Sequences: the cell run over time (BPTT is autograd through this loop)
# =============================================================================================


def _check(kind, x, states, W_ih, W_hh, b_ih, b_hh):
    """Validate the functional API's arguments; return (batch, d, n)."""
    expect_tensor("x", x, "batch, l, input")
    batch, _, d = x.shape
    g = GATES[kind]
    expect_tensor("W_hh", W_hh, f"{g}·hidden, hidden", dtypes=(x.dtype,))
    n = W_hh.shape[1]
    if W_hh.shape[0] != g * n:
        raise ValueError(
            f"W_hh must have shape ({g}·hidden, hidden) = ({g * n}, {n}) for {kind.upper()}, "
            f"got {tuple(W_hh.shape)}"
        )
    expect_tensor("W_ih", W_ih, f"{g}·hidden, input", dtypes=(x.dtype,), shape=(g * n, d))
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            expect_tensor(name, b, f"{g}·hidden", dtypes=(x.dtype,), shape=(g * n,))
    for name, s in states:
        expect_tensor(name, s, "batch, hidden", dtypes=(x.dtype,), shape=(batch, n))
    return batch, d, n


def _run(cell, x, state, weights, hidden_of):
    out = []
    for t in range(x.shape[1]):
        state = cell(x[:, t], state, *weights)
        out.append(hidden_of(state))
    return torch.stack(out, dim=1), state  # (b, l, n)


def rnn(x, h0, W_ih, W_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """Elman RNN over a sequence, equal to ``torch.nn.RNN(batch_first=True)``.

    x: (batch, l, input); h0: (batch, hidden) or None (zeros); W_ih: (hidden, input);
    W_hh: (hidden, hidden); b_ih, b_hh: (hidden,) or None. Returns (out (batch, l, hidden), h_T)."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    h0 = _zeros_if_none(x, h0, W_hh)
    _check("rnn", x, [("h0", h0)], W_ih, W_hh, b_ih, b_hh)
    cell = lambda x_t, h, *w: rnn_cell(x_t, h, *w, nonlinearity=nonlinearity)
    return _run(cell, x, h0, (W_ih, W_hh, b_ih, b_hh), lambda h: h)


def lstm(x, state, W_ih, W_hh, b_ih=None, b_hh=None):
    """LSTM over a sequence, equal to ``torch.nn.LSTM(batch_first=True)``.

    x: (batch, l, input); state = (h0, c0), each (batch, hidden), or None (zeros);
    W_ih: (4·hidden, input); W_hh: (4·hidden, hidden); b_ih, b_hh: (4·hidden,) or None.
    Returns (out (batch, l, hidden), (h_T, c_T))."""
    if state is None:
        state = (_zeros_if_none(x, None, W_hh), _zeros_if_none(x, None, W_hh))
    if not (isinstance(state, tuple | list) and len(state) == 2):
        raise TypeError(f"state must be a pair (h0, c0) of (batch, hidden) tensors, got {state!r}")
    _check("lstm", x, [("h0", state[0]), ("c0", state[1])], W_ih, W_hh, b_ih, b_hh)
    return _run(lstm_cell, x, tuple(state), (W_ih, W_hh, b_ih, b_hh), lambda s: s[0])


def gru(x, h0, W_ih, W_hh, b_ih=None, b_hh=None):
    """GRU over a sequence, equal to ``torch.nn.GRU(batch_first=True)``.

    x: (batch, l, input); h0: (batch, hidden) or None; W_ih: (3·hidden, input);
    W_hh: (3·hidden, hidden); b_ih, b_hh: (3·hidden,) or None.
    Returns (out (batch, l, hidden), h_T)."""
    h0 = _zeros_if_none(x, h0, W_hh)
    _check("gru", x, [("h0", h0)], W_ih, W_hh, b_ih, b_hh)
    return _run(gru_cell, x, h0, (W_ih, W_hh, b_ih, b_hh), lambda h: h)


def _zeros_if_none(x, h0, W_hh):
    if h0 is not None:
        return h0
    if not isinstance(x, torch.Tensor) or not isinstance(W_hh, torch.Tensor) or x.dim() != 3:
        return None  # _check reports the real problem
    return torch.zeros(x.shape[0], W_hh.shape[1], dtype=x.dtype, device=x.device)


# =============================================================================================
# Modules (the sequence-layer contract: forward(x) and step(x_t, state) agree)
# =============================================================================================


class _Recurrent(nn.Module):
    """Shared machinery: parameters in torch's layout and init, from_torch, forward and step."""

    kind = "rnn"
    torch_class = nn.RNN

    def __init__(self, d_input: int, d_hidden: int, bias: bool = True, fused: bool = False):
        super().__init__()
        if d_input < 1 or d_hidden < 1:
            raise ValueError(f"d_input and d_hidden must be >= 1, got {d_input}, {d_hidden}")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {fused!r}")
        self.d_input, self.d_hidden, self.fused = d_input, d_hidden, fused
        g = GATES[self.kind]
        self.W_ih = nn.Parameter(torch.empty(g * d_hidden, d_input))
        self.W_hh = nn.Parameter(torch.empty(g * d_hidden, d_hidden))
        self.b_ih = nn.Parameter(torch.empty(g * d_hidden)) if bias else None
        self.b_hh = nn.Parameter(torch.empty(g * d_hidden)) if bias else None
        bound = 1 / math.sqrt(d_hidden)  # torch.nn's init: U(-1/√n, 1/√n) for every weight
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def weights(self):
        """(W_ih, W_hh, b_ih, b_hh), ready for the functional form."""
        return self.W_ih, self.W_hh, self.b_ih, self.b_hh

    def extra_repr(self) -> str:
        return (f"d_input={self.d_input}, d_hidden={self.d_hidden}, bias={self.b_ih is not None}"
                + (", fused=True" if self.fused else ""))

    def scan(self, x, state=None):
        """Like forward, also returning the final state: (y (b, l, n), state). ``fused``: torch's
        own fused loop (cuDNN on a GPU) over the same weights instead of ours, one cell call per
        step; the arena uses it, where thousands of steps per batch would each launch a cell."""
        if not self.fused:
            return self._scan(x, state)
        expect_tensor("x", x, "batch, l, input")
        if state is None:
            zero = self._start(x)
            state = (zero, zero) if self.kind == "lstm" else zero
        hx = tuple(s[None] for s in state) if self.kind == "lstm" else state[None]
        params = [w for w in self.weights() if w is not None]
        run = {"lstm": torch.lstm, "gru": torch.gru,
               "rnn": torch.rnn_tanh if getattr(self, "nonlinearity", "tanh") == "tanh"
               else torch.rnn_relu}[self.kind]
        # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        y, *last = run(x, hx, params, self.b_ih is not None, 1, 0.0, self.training, False, True)
        if self.kind == "lstm":
            return y, (last[0][0], last[1][0])
        return y, last[0][0]

    def _scan(self, x, state=None):
        """Our loop of the layer's cell (the chapter's functional form)."""
        raise NotImplementedError

    @classmethod
    def from_torch(cls, module: nn.Module):
        """Build from a single-layer, unidirectional ``torch.nn.RNN/LSTM/GRU`` with
        ``batch_first=True``, copying its weights (same dtype and device)."""
        if type(module) is not cls.torch_class:
            want = cls.torch_class.__name__
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{want}, "
                            f"got {type(module).__name__}")
        if module.num_layers != 1 or module.bidirectional or not module.batch_first:
            raise ValueError("from_torch needs num_layers=1, bidirectional=False, batch_first=True")
        if getattr(module, "proj_size", 0):
            raise ValueError("from_torch does not support an LSTM with proj_size > 0")
        kwargs = {"nonlinearity": module.nonlinearity} if cls.kind == "rnn" else {}
        new = cls(module.input_size, module.hidden_size, bias=module.bias, **kwargs)
        new = new.to(device=module.weight_hh_l0.device, dtype=module.weight_hh_l0.dtype)
        with torch.no_grad():
            for ours, theirs in (("W_ih", "weight_ih_l0"), ("W_hh", "weight_hh_l0"),
                                 ("b_ih", "bias_ih_l0"), ("b_hh", "bias_hh_l0")):
                if getattr(new, ours) is not None:
                    getattr(new, ours).copy_(getattr(module, theirs))
        return new

    def _start(self, x):
        """The zero state h (b, d_hidden) for a batch x (b, ...)."""
        return torch.zeros(x.shape[0], self.d_hidden, dtype=x.dtype, device=x.device)

    def forward(self, x, state=None):
        """x: (b, l, d_input) -> y: (b, l, d_hidden), all hidden states (state=None: zeros)."""
        return self.scan(x, state)[0]

    def step(self, x_t, state=None):
        """x_t: (b, d_input) -> (y_t (b, d_hidden), state). Constant-size state."""
        expect_tensor("x_t", x_t, "batch, input")
        y, state = self.scan(x_t[:, None], state)
        return y[:, 0], state


class RNN(_Recurrent):
    """Elman RNN layer: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh); the state is h."""

    kind, torch_class = "rnn", nn.RNN

    def __init__(self, d_input: int, d_hidden: int, bias: bool = True, nonlinearity="tanh",
                 fused: bool = False):
        super().__init__(d_input, d_hidden, bias, fused)
        self.nonlinearity = nonlinearity

    def _scan(self, x, state=None):
        return rnn(x, state, *self.weights(), nonlinearity=self.nonlinearity)


class LSTM(_Recurrent):
    """LSTM layer (Hochreiter & Schmidhuber 1997, with forget gate); the state is (h, c).

    ``forget_bias`` (if given) sets the forget gate's bias so that f ≈ σ(forget_bias) at the
    start: the usual trick (Gers et al. 2000; Jozefowicz et al. 2015) to keep the memory open."""

    kind, torch_class = "lstm", nn.LSTM

    def __init__(self, d_input: int, d_hidden: int, bias: bool = True,
                 forget_bias: float | None = None, fused: bool = False):
        super().__init__(d_input, d_hidden, bias, fused)
        if forget_bias is not None:
            if not bias:
                raise ValueError("forget_bias needs bias=True")
            n = d_hidden
            with torch.no_grad():
                self.b_ih[n:2 * n] = forget_bias
                self.b_hh[n:2 * n] = 0.0

    def _scan(self, x, state=None):
        return lstm(x, state, *self.weights())


class GRU(_Recurrent):
    """GRU layer (Cho et al. 2014), torch's gate order (r, z, n); the state is h."""

    kind, torch_class = "gru", nn.GRU

    def _scan(self, x, state=None):
        return gru(x, state, *self.weights())


LAYERS = {"rnn": RNN, "lstm": LSTM, "gru": GRU}


class RNNModel(nn.Module):
    """A recurrent layer between an input map and a linear readout at every position.

    x: (b, l) token ids (when ``n_tokens`` is given) or (b, l, d_input) floats
    -> (b, l, d_output): logits or values, one per position (many-to-many; a many-to-one task
    reads the last position)."""

    def __init__(self, kind: str, d_input: int, d_hidden: int, d_output: int,
                 n_tokens: int | None = None, **layer_kwargs):
        super().__init__()
        if kind not in LAYERS:
            raise ValueError(f"kind must be one of {sorted(LAYERS)}, got {kind!r}")
        self.embed = nn.Embedding(n_tokens, d_input) if n_tokens else None
        self.layer = LAYERS[kind](d_input, d_hidden, **layer_kwargs)
        self.readout = nn.Linear(d_hidden, d_output)

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)  # (b, l, d)
        return self.readout(self.layer(x))  # (b, l, d_output)


# =============================================================================================
# Measuring BPTT: how much gradient reaches each step
# =============================================================================================


@torch.enable_grad()
def grad_norms(step, x, state):
    """‖∂L/∂h_t‖ for t = 1..l, with L = Σ h_l (summed over batch and hidden).

    ``step(x_t (b, d), state) -> state`` is a cell (state = h, or (h, c) for the LSTM: the
    gradient is taken at h). Since ∂L/∂h_t = (∂h_l/∂h_t)ᵀ 1, this is the Jacobian
    ∂h_l/∂h_t seen along one direction: the signal that BPTT carries back l - t steps.
    Returns norms: (l,), norms[t - 1] for h_t; norms[-1] = ‖1‖ = √(b·n)."""
    expect_tensor("x", x, "batch, l, input")
    if isinstance(state, tuple | list):  # make the graph start at the state, whatever the weights
        state = tuple(s.detach().requires_grad_() for s in state)
    else:
        state = state.detach().requires_grad_()
    hs = []
    for t in range(x.shape[1]):
        state = step(x[:, t], state)
        h = state[0] if isinstance(state, tuple | list) else state  # (b, n)
        hs.append(h)
    grads = torch.autograd.grad(hs[-1].sum(), hs, allow_unused=True)
    return torch.stack([
        torch.zeros((), dtype=x.dtype) if g is None else g.norm() for g in grads
    ])  # (l,)
