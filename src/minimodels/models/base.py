"""One language model for every mixer: embedding, residual pre-norm blocks, norm, head.

References: Radford et al., "Language models are unsupervised multitask learners" (GPT-2, 2019),
section 2.3 (pre-norm residual blocks); Xiong et al., "On layer normalization in the
transformer architecture" (2020); Press & Wolf, "Using the output embedding to improve
language models" (2017) (the tied head); Lieber et al., "Jamba" (2024), section 2 (a stack
that mixes attention and Mamba layers).

A *mixer* is any sequence layer (DESIGN §2.2): ``forward(x (b, l, d)) -> (b, l, d)`` and
``step(x_t (b, d), state) -> (y_t (b, d), state)``, ``state=None`` at the start. A block is

    x = x + mixer(norm₁(x));   x = x + mlp(norm₂(x))      (the MLP only if the family has one)

and the model is  logits = head(norm(block_N(… block_1(embed(tokens) [+ pos]) …))).
Shapes: ``b`` batch, ``l`` length, ``d`` d_model, ``v`` vocab_size.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from minimodels.backend import expect_tensor
from minimodels.nn import RMSNorm, generate_greedy

__all__ = ["LM", "NORMS", "Residual", "state_numel"]

NORMS = {"rms": RMSNorm, "layer": nn.LayerNorm}


def state_numel(state) -> int:
    """How many numbers a recurrent state holds: the elements of every tensor in it, however
    nested in tuples, lists and dicts (positions and other integers count 0). Works for one
    mixer's state and for an ``LM``'s."""
    if isinstance(state, torch.Tensor):
        return state.numel()
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_numel(s) for s in state)
    return 0


class Residual(nn.Module):
    """A pre-norm residual block: x + mixer(norm₁(x)), then + mlp(norm₂(x)) when ``mlp`` is
    given. Same forward / step contract as its mixer. The state is the mixer's state, or the
    pair (mixer's, MLP's) when the MLP has a state of its own (RWKV's channel-mix shifts
    tokens, so it remembers x_{t-1})."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp: nn.Module | None = None,
                 norm: type[nn.Module] = RMSNorm):
        super().__init__()
        self.norm1 = norm(d_model)
        self.norm2 = norm(d_model) if mlp is not None else None
        self.mixer, self.mlp = mixer, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))  # (b, l, d)
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    @property
    def mlp_has_state(self) -> bool:
        return hasattr(self.mlp, "step")

    def step(self, x_t: torch.Tensor, state=None):
        s_mix, s_mlp = (state if self.mlp_has_state and state is not None
                        else (state, None))
        y, s_mix = self.mixer.step(self.norm1(x_t), s_mix)  # (b, d)
        x_t = x_t + y
        if self.mlp is None:
            return x_t, s_mix
        if not self.mlp_has_state:
            return x_t + self.mlp(self.norm2(x_t)), s_mix
        y, s_mlp = self.mlp.step(self.norm2(x_t), s_mlp)
        return x_t + y, (s_mix, s_mlp)


def _accepted(factory: Callable) -> set[str] | None:
    """The keyword names ``factory`` takes, or None when it takes ``**kwargs``."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _call(factory: Callable, d_model: int, options: dict, used: set[str]):
    """factory(d_model, **the options it takes); records which options were taken."""
    names = _accepted(factory)
    mine = {k: v for k, v in options.items() if names is None or k in names}
    used.update(mine)
    return factory(d_model, **mine)


class LM(nn.Module):
    """A language model around any mixer (``minimodels.models.MIXERS``).

    LM(vocab_size, d_model, n_layers, mixer="mamba", mlp="auto", **options)

    - ``mixer``: a name of ``MIXERS``, a factory ``factory(d_model, **options) -> nn.Module``,
      or a list with one of those per layer (hybrids: Jamba's ``["mamba"] * 3 + ["attention"]``).
    - ``mlp``: a name of ``MLPS`` (``"mlp"``, ``"rwkv"``, ``"monarch"``, ``"moe"``), a factory,
      None, or ``"auto"``: the MLP each mixer's family uses (``FAMILY_MLP``: attention → "mlp",
      rwkv → its channel-mix, the recurrent and state-space families → none); or a list with
      one of those per layer (Jamba's MoE every other layer: ``["mlp", "moe"] * 2``).
    - ``norm``: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm, RWKV's), for every block and the
      final norm; ``embed_norm`` also normalises the embeddings (RWKV's ln0).
    - ``positions``: None (the mixer knows the order) or ``max_len``, for learned absolute
      positions (GPT's); attention needs them, recurrences do not.
    - ``tie_head``: the head reuses the embedding matrix (Mamba's LMs) or has its own (GPT-2's
      untied variant, RWKV).
    - ``**options`` go to every mixer and MLP factory that takes them by name (``n_heads`` to
      attention, ``d_state`` to mamba and s4d); the model passes ``layer`` (its index) and
      ``n_layers`` too. An option no factory takes is a ValueError.

    forward: tokens (b, l) int64 -> logits (b, l, v). step: token (b,), state -> (logits (b, v),
    state) with state = (position, [each block's state]); ``state_numel(state)`` counts it.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int,
                 mixer: str | Callable | Sequence[str | Callable] = "mamba",
                 mlp: str | Callable | Sequence[str | Callable | None] | None = "auto", *,
                 norm: str = "rms", embed_norm: bool = False, positions: int | None = None,
                 tie_head: bool = True, **options):
        super().__init__()
        from minimodels.models import FAMILY_MLP, MIXERS, MLPS  # the registry imports this module

        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("n_layers", n_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        mixers = list(mixer) if isinstance(mixer, (list, tuple)) else [mixer] * n_layers
        if len(mixers) != n_layers:
            raise ValueError(f"mixer is a list of {len(mixers)} entries for n_layers={n_layers}: "
                             "give one per layer")
        mlps = list(mlp) if isinstance(mlp, (list, tuple)) else [mlp] * n_layers
        if len(mlps) != n_layers:
            raise ValueError(f"mlp is a list of {len(mlps)} entries for n_layers={n_layers}: "
                             "give one per layer")
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, positions
        self.mixer_names = [m if isinstance(m, str) else getattr(m, "__name__", "custom")
                            for m in mixers]
        Norm = NORMS[norm]

        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(positions, d_model) if positions else None
        self.embed_norm = Norm(d_model) if embed_norm else None
        used: set[str] = set()
        blocks = []
        for i, (m, p) in enumerate(zip(mixers, mlps, strict=True)):
            opts = {**options, "layer": i, "n_layers": n_layers}
            make_mixer = _lookup("mixer", m, MIXERS)
            auto = isinstance(p, str) and p == "auto"
            block_mlp = (FAMILY_MLP.get(m) if isinstance(m, str) else None) if auto else p
            mixer_module = _call(make_mixer, d_model, opts, used)
            mlp_module = (None if block_mlp is None
                          else _call(_lookup("mlp", block_mlp, MLPS), d_model, opts, used))
            blocks.append(Residual(d_model, mixer_module, mlp_module, Norm))
        self.blocks = nn.ModuleList(blocks)
        unused = set(options) - used
        if unused:
            raise ValueError(f"no mixer or MLP of this model takes the option(s) "
                             f"{', '.join(sorted(unused))} (mixers: {self.mixer_names})")
        self.norm = Norm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_head:
            self.head.weight = self.embed.weight

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        x = self.embed(tokens)  # (b, l, d) or (b, d)
        if self.pos is not None:
            l = tokens.shape[-1] if tokens.dim() == 2 else 1
            if start + l > self.max_len:
                raise ValueError(f"position {start + l - 1} >= max_len={self.max_len}: this "
                                 "model learned positions up to max_len only")
            p = self.pos(torch.arange(start, start + l, device=tokens.device))  # (l, d)
            x = x + (p if tokens.dim() == 2 else p[0])
        return x if self.embed_norm is None else self.embed_norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        expect_tensor("tokens", tokens, "b, l", dtypes=(torch.int64, torch.int32))
        x = self._embed(tokens, 0)  # (b, l, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (b, l, v)

    def step(self, token: torch.Tensor, state=None):
        """token (b,) -> (logits (b, v), state); state = (position, [block states]) or None."""
        expect_tensor("token", token, "b", dtypes=(torch.int64, torch.int32))
        t, states = (0, [None] * len(self.blocks)) if state is None else state
        x = self._embed(token, t)  # (b, d)
        new = []
        for block, s in zip(self.blocks, states, strict=True):
            x, s = block.step(x, s)
            new.append(s)
        return self.head(self.norm(x)), (t + 1, new)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, use_cache: bool = True) -> torch.Tensor:
        """Greedy continuation of prompt (b, l0) by n_new tokens -> (b, l0 + n_new). With
        ``use_cache`` each new token costs one ``step`` (a KV cache for attention, a
        constant-size state for the recurrent families); without, a full forward pass."""
        if use_cache:
            return generate_greedy(self.step, prompt, n_new)
        tokens = prompt
        for _ in range(n_new):
            nxt = self(tokens)[:, -1].argmax(-1)  # (b,)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return tokens


def _lookup(kind: str, entry, registry: dict) -> Callable:
    if callable(entry):
        return entry
    if isinstance(entry, str) and entry in registry:
        return registry[entry]
    raise ValueError(f"unknown {kind} {entry!r}: expected a factory or one of "
                     f"{', '.join(sorted(registry))}")
