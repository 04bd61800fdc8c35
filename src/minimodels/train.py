"""A small training loop: seeding, a tqdm.auto progress bar, evaluation on a held-out batch.

Works with any model ``x -> (b, l, out)`` and any task of ``minimodels.tasks``: the loss is
cross-entropy (integer targets) or mean squared error (float targets) over the masked positions.
A model with mixture-of-experts layers also minimises ``aux_weight`` times their
load-balancing loss (Fedus et al., "Switch Transformers", 2021, section 2.2); the history logs
the task loss only, so curves compare with dense models.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from minimodels.tasks import Batch

__all__ = ["History", "evaluate", "seed_everything", "task_loss", "train"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def task_loss(pred: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Loss on the scored positions. pred: (b, l, classes) logits or (b, l, 1) / (b, l) values."""
    if batch.classification:
        return nn.functional.cross_entropy(pred[batch.mask], batch.y[batch.mask])  # (m, c) vs (m,)
    if pred.dim() == 3:
        pred = pred.squeeze(-1)  # (b, l)
    return nn.functional.mse_loss(pred[batch.mask], batch.y[batch.mask])


@torch.no_grad()
def evaluate(model: nn.Module, batch: Batch) -> dict[str, float]:
    """{"loss": ...} and, for classification, {"accuracy": ...} on the scored positions."""
    was_training = model.training
    model.eval()
    pred = model(batch.x)
    model.train(was_training)
    out = {"loss": task_loss(pred, batch).item()}
    if batch.classification:
        out["accuracy"] = (pred[batch.mask].argmax(-1) == batch.y[batch.mask]).float().mean().item()
    return out


@dataclass
class History:
    """Training losses per step and evaluations every ``eval_every`` steps."""

    loss: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.evals[-1][1] if self.evals else {}


def train(
    model: nn.Module,
    batch_fn: Callable[..., Batch],
    steps: int,
    lr: float = 1e-2,
    *,
    seed: int = 0,
    eval_batch: Batch | None = None,
    eval_every: int = 50,
    clip: float | None = 1.0,
    progress: bool = True,
    desc: str = "training",
    aux_weight: float = 0.01,
) -> History:
    """Train ``model`` with Adam for ``steps`` steps on fresh batches ``batch_fn(generator=g)``.

    The batch generator is seeded with ``seed`` (so two runs see the same data); gradients are
    clipped to norm ``clip`` (None: no clipping). ``eval_batch`` (held out) is scored every
    ``eval_every`` steps and at the end. When the model holds a ``MoE`` the loss minimised is
    task loss + ``aux_weight`` · ``aux_loss(model)``; ``History.loss`` keeps the task loss.
    A loss that becomes inf or nan is a FloatingPointError, not a silently broken model.
    Returns a ``History``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float)) or aux_weight < 0:
        raise ValueError(f"aux_weight must be a number >= 0, got {aux_weight!r}")
    from tqdm.auto import tqdm

    from minimodels.models.moe import MoE, aux_loss  # lazy: importing models loads every family

    has_moe = aux_weight > 0 and any(isinstance(m, MoE) for m in model.modules())

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history, losses = History(), []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=True)
    model.train()
    for i in bar:
        batch = batch_fn(generator=g)
        loss = task_loss(model(batch.x), batch)
        total = loss + aux_weight * aux_loss(model) if has_moe else loss
        opt.zero_grad()
        total.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.detach())  # read back in bulk: on a GPU, no wait at every step
        if eval_batch is not None and ((i + 1) % eval_every == 0 or i + 1 == steps):
            history.evals.append((i + 1, evaluate(model, eval_batch)))
            bar.set_postfix({k: round(v, 3) for k, v in history.final.items()})
    history.loss = torch.stack(losses).tolist()
    bad = [i for i, v in enumerate(history.loss) if not math.isfinite(v)]
    if bad:  # checked once at the end: on a GPU, a check per step would wait at every step
        raise FloatingPointError(f"the training loss became {history.loss[bad[0]]} at step "
                                 f"{bad[0] + 1} of {steps}: the model's parameters are garbage "
                                 "(lower lr, or look for an overflow in a layer)")
    return history
