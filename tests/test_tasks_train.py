"""Synthetic tasks have the documented shapes and targets; the training loop learns."""

import functools
import math

import pytest
import torch
from torch import nn

from minimodels import tasks
from minimodels.train import evaluate, seed_everything, task_loss, train

pytestmark = pytest.mark.ch01


def test_adding_shapes_targets_and_determinism():
    g = torch.Generator().manual_seed(0)
    batch = tasks.adding(5, 12, generator=g)
    assert batch.x.shape == (5, 12, 2) and batch.y.shape == (5, 12) and batch.mask.shape == (5, 12)
    assert batch.x.dtype == torch.float32 and not batch.classification
    marks = batch.x[..., 1]
    assert torch.all(marks.sum(1) == 2)
    assert torch.all(marks[:, :6].sum(1) == 1) and torch.all(marks[:, 6:].sum(1) == 1)
    torch.testing.assert_close(batch.y[:, -1], (batch.x[..., 0] * marks).sum(1))
    assert torch.all(batch.y[:, :-1] == 0)
    assert batch.mask[:, -1].all() and not batch.mask[:, :-1].any()
    again = tasks.adding(5, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.x, batch.x) and torch.equal(again.y, batch.y)


def test_copying_layout():
    batch = tasks.copying(4, 10, n_copy=2, n_symbols=5, generator=torch.Generator().manual_seed(1))
    x, y, mask = batch.x, batch.y, batch.mask
    assert x.shape == y.shape == mask.shape == (4, 10) and batch.classification
    assert torch.all((x[:, :2] >= 1) & (x[:, :2] <= 5))
    assert torch.all(x[:, 7] == 6)  # the "go" marker, n_copy + 1 steps before the end
    assert torch.all(x[:, 2:7] == 0) and torch.all(x[:, 8:] == 0)
    assert torch.equal(y[:, 8:], x[:, :2]) and torch.all(y[:, :8] == 0)
    assert mask[:, 8:].all() and not mask[:, :8].any()


def test_tasks_reject_bad_sizes():
    with pytest.raises(ValueError, match="seqlen must be >= 2·n_copy \\+ 1 = 5, got 4"):
        tasks.copying(2, 4, n_copy=2)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        tasks.adding(0, 10)
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        tasks.adding(2, 1)


def test_task_loss_scores_only_masked_positions():
    batch = tasks.adding(3, 6, generator=torch.Generator().manual_seed(0))
    pred = torch.zeros(3, 6, 1)
    pred[:, -1, 0] = batch.y[:, -1]
    pred[:, :-1] = 100.0  # unscored positions: any value
    assert task_loss(pred, batch).item() == 0.0


class _Last(nn.Module):
    """A linear map of the last-position inputs, replicated over time: enough for a toy task."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x):
        return self.lin(x)  # (b, l, 3)


def _toy(batch=16, *, generator=None):
    """Classify which of two input channels is larger, at every position (scored at the end)."""
    x = torch.randn(batch, 4, 2, generator=generator)
    y = (x[..., 1] > x[..., 0]).long()
    mask = torch.zeros(batch, 4, dtype=torch.bool)
    mask[:, -1] = True
    return tasks.Batch(x, y, mask)


def test_train_reduces_loss_and_is_reproducible():
    held_out = _toy(256, generator=torch.Generator().manual_seed(9))
    runs = []
    for _ in range(2):
        seed_everything(0)
        model = _Last()
        before = evaluate(model, held_out)
        history = train(model, _toy, 150, lr=5e-2, eval_batch=held_out, eval_every=50,
                        progress=False)
        runs.append(history)
    assert len(history.loss) == 150 and [s for s, _ in history.evals] == [50, 100, 150]
    assert history.final["loss"] < 0.5 * before["loss"]
    assert history.final["accuracy"] > 0.9
    assert runs[0].loss == runs[1].loss


def test_train_with_a_recurrent_model_on_adding_learns_something():
    from minimodels.models.rnn import RNNModel

    seed_everything(0)
    model = RNNModel("gru", 2, 8, 1)
    held_out = tasks.adding(64, 6, generator=torch.Generator().manual_seed(3))
    history = train(model, functools.partial(tasks.adding, 32, 6), 120, lr=2e-2,
                    eval_batch=held_out, progress=False)
    assert history.evals[-1][1]["loss"] < 0.1  # always answering 1 scores ≈ 0.167
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train(model, _toy, 0)


def test_train_raises_when_the_loss_becomes_non_finite():
    seed_everything(0)
    model = _Last()

    def poisoned(generator):  # the third batch holds an inf: the loss, then the weights, break
        batch = _toy(generator=generator)
        poisoned.calls += 1
        if poisoned.calls == 3:
            batch.x[0, -1, 0] = math.inf
        return batch

    poisoned.calls = 0
    with pytest.raises(FloatingPointError, match="loss became (nan|inf) at step 3 of 5"):
        train(model, poisoned, 5, lr=5e-2, progress=False)
