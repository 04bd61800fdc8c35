"""A sparse mixture-of-experts MLP: each token runs through top_k of n_experts MLPs.

References: Shazeer et al., "Outrageously large neural networks: the sparsely-gated
mixture-of-experts layer" (2017), section 2; Fedus et al., "Switch Transformers" (2021),
section 2.2, eq. 4 (the load-balancing loss); Jiang et al., "Mixtral of experts" (2024),
section 2.1 (top-2 routing, gates renormalised over the chosen experts); Lieber et al.,
"Jamba" (2024), section 2 (a MoE MLP every other layer).

    logits = W_r x                                   the router, (n, e)
    G(x)   = softmax(TopK(logits, k))                 zero outside the k largest logits
    y      = Σ_{i ∈ TopK} G(x)_i · E_i(x)            E_i = expert i, an MLP(d_model, d_ff)

    aux = n_experts · Σ_i f_i · P_i                   f_i: share of the n·k assignments to i,
                                                      P_i: mean of softmax(logits)_i over tokens

Glossary: ``n_experts`` (Mixtral's n, Switch's N), ``top_k`` = k (Mixtral's K), ``router`` = W_r
(Mixtral's W_g), ``experts[i]`` = E_i, ``expert_load`` = f, ``gates`` = G(x). Shapes: ``b``
batch, ``l`` length, ``d`` d_model, ``n`` tokens (every leading axis flattened), ``k`` top_k,
``e`` n_experts (here ``e`` is the expert axis, not a head dimension).
"""

from __future__ import annotations

import torch
from torch import nn

from minimodels.nn import MLP

__all__ = ["MoE", "aux_loss", "moe_ref", "parameter_counts"]


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class MoE(nn.Module):
    """MoE(d_model, n_experts=8, top_k=2, d_ff=None): y = Σ_{i ∈ TopK} G(x)_i · E_i(x).

    Each expert is an ``MLP(d_model, d_ff)`` (d_ff = 4·d_model by default), the router a
    ``Linear(d_model, n_experts)`` without bias. forward: x (..., d) -> (..., d), so it serves
    both ``forward`` (b, l, d) and ``LM.step`` (b, d); the layer has no state (no ``step``).

    Each expert runs only on the tokens routed to it: the n·k (token, expert) assignments are
    grouped by expert, each expert gathers its tokens, and its outputs, times their gates, are
    scatter-added into y. ``moe_ref`` is the dense definition (every expert on every token).

    After each forward: ``aux_loss`` (scalar, differentiable w.r.t. the router) is the
    Switch Transformer load-balancing loss n_experts · Σ_i f_i · P_i, 1 at perfect balance, and
    ``expert_load`` (n_experts,) is f, the detached share of assignments each expert got.
    """

    def __init__(self, d_model: int, n_experts: int = 8, top_k: int = 2, d_ff: int | None = None):
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("n_experts", n_experts)
        _positive_int("top_k", top_k)
        if top_k > n_experts:
            raise ValueError(f"top_k must be between 1 and n_experts={n_experts}, got {top_k}")
        if d_ff is not None:
            _positive_int("d_ff", d_ff)
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)  # W_r
        self.experts = nn.ModuleList(MLP(d_model, d_ff) for _ in range(n_experts))
        self.aux_loss: torch.Tensor | None = None  # set by forward
        self.expert_load: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}"

    def _check(self, x) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point torch.Tensor of shape (..., d_model), "
                            f"got {got}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (..., d_model={self.d_model}), "
                             f"got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"x must hold at least one token, got shape {tuple(x.shape)}")

    def route(self, x: torch.Tensor):
        """x (n, d) -> logits (n, e), top-k expert indices (n, k), gates (n, k) summing to 1:
        the softmax over the k largest logits only (Mixtral's renormalised top-k)."""
        logits = self.router(x)  # (n, e)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)  # (n, k), (n, k)
        return logits, top_idx, top_logits.softmax(dim=-1)  # gates (n, k)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """The dense gate matrix G(x): x (..., d) -> (..., n_experts), zero outside each
        token's top_k experts, each row summing to 1."""
        self._check(x)
        _, top_idx, g = self.route(x.reshape(-1, self.d_model))
        G = torch.zeros(top_idx.shape[0], self.n_experts, dtype=g.dtype, device=g.device)
        return G.scatter(1, top_idx, g).reshape(*x.shape[:-1], self.n_experts)  # (..., e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        flat = x.reshape(-1, self.d_model)  # (n, d)
        n, k = flat.shape[0], self.top_k
        logits, top_idx, gates = self.route(flat)  # (n, e), (n, k), (n, k)

        # Group the n·k assignments by expert: one sort, then each expert's slice.
        expert_of = top_idx.reshape(-1)  # (n·k,)
        order = expert_of.argsort(stable=True)  # (n·k,)
        token_of = (order // k)  # (n·k,) the token of each sorted assignment
        gate_of = gates.reshape(-1)[order]  # (n·k,)
        counts = torch.bincount(expert_of, minlength=self.n_experts)  # (e,)
        y = torch.zeros_like(flat)  # (n, d)
        for expert, tokens, g in zip(self.experts, token_of.split(counts.tolist()),
                                     gate_of.split(counts.tolist()), strict=True):
            if tokens.numel():
                y.index_add_(0, tokens, g[:, None] * expert(flat[tokens]))  # (m, d) into (n, d)

        # Switch Transformer eq. 4 with top-k: f over the n·k assignments, P over the n tokens.
        f = counts.to(logits.dtype) / (n * k)  # (e,)
        P = logits.softmax(dim=-1).mean(dim=0)  # (e,)
        self.aux_loss = self.n_experts * (f * P).sum()
        self.expert_load = f.detach()
        return y.reshape(x.shape)  # (..., d)


def moe_ref(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The dense definition of ``moe(x)``: every expert on every token, times the sparse gate
    matrix G = softmax(logits masked to -inf outside the top k). x (..., d) -> (..., d).
    Costs n_experts / top_k times the fast path's expert FLOPs; sets no ``aux_loss``."""
    moe._check(x)
    logits = moe.router(x)  # (..., e)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(
        -1, logits.topk(moe.top_k, dim=-1).indices, True)  # (..., e)
    G = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)  # (..., e)
    Y = torch.stack([expert(x) for expert in moe.experts], dim=-2)  # (..., e, d)
    return (G[..., None] * Y).sum(dim=-2)  # (..., d)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"total": every parameter, "active": the parameters one token uses}.

    A token passes through only top_k of each MoE's n_experts experts (and its router), so
    ``active`` counts top_k experts per MoE and everything else in full. A matrix-vector
    product costs 2 FLOPs per weight, so a token's FLOPs follow ``active``, not ``total``:
    Mixtral 8x7B holds 47B parameters but uses 13B per token (Jiang et al. 2024, section 2.1).
    That is why a MoE is cheap per token: capacity grows with n_experts, compute with top_k.
    Shared (tied) parameters count once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts[0].parameters())
            idle += (m.n_experts - m.top_k) * per_expert
    return {"total": total, "active": total - idle}


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of ``aux_loss`` over every MoE inside ``model`` from its last forward; a zero
    scalar when there is none (no MoE, or no forward yet). Add ``aux_weight * aux_loss(model)``
    to the task loss (Switch uses 0.01) to keep the experts evenly loaded."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    if not losses:
        p = next(model.parameters(), None)
        if p is None or not p.is_floating_point():
            return torch.zeros(())
        return torch.zeros((), dtype=p.dtype, device=p.device)
    return torch.stack(losses).sum()
