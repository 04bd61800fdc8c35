"""The long-context tasks of minimodels.tasks (chapter 10): layouts, vocabularies, seeding, and
that every answer is recoverable from the context by a rule that reads only x[0..t]."""

import pytest
import torch

from minimodels import tasks

ALL = sorted(tasks.TASKS)


def _oracle_after(x, t):
    """The token after the first occurrence of x[t] (induction: the trigger; MQAR: the key in
    its pair, as keys are distinct and the pairs come first)."""
    row = x.tolist()
    return row[row.index(row[t]) + 1]


def _oracle_needle(x, t):
    """The token after the first earlier occurrence of the question (the last 5 tokens)."""
    row, q = x.tolist(), x[t - 4:t + 1].tolist()
    for i in range(t - 4):
        if row[i:i + 5] == q:
            return row[i + 5]
    raise AssertionError("question not found in the context")


def _oracle_copy(x, t, n_copy):
    """Selective copy: the j-th nonzero symbol before the go marker, j = t − (l − n_copy)."""
    row = x.tolist()
    go = max(row)
    symbols = [s for s in row[:row.index(go)] if s != 0]
    return symbols[t - (len(row) - n_copy)]


@pytest.mark.parametrize("seqlen", [12, 13, 37, 64, 200])
def test_every_answer_is_recoverable_from_the_context(seqlen):
    batches = {
        "mqar": (tasks.mqar(16, seqlen, n_pairs=4, seed=seqlen), _oracle_after),
        "induction_heads": (tasks.induction_heads(16, seqlen, seed=seqlen), _oracle_after),
        "needle_in_haystack": (tasks.needle_in_haystack(16, seqlen, seed=seqlen), _oracle_needle),
        "selective_copy": (tasks.selective_copy(16, seqlen, n_copy=3, seed=seqlen),
                           lambda x, t: _oracle_copy(x, t, 3)),
    }
    assert sorted(batches) == ALL
    for name, (batch, oracle) in batches.items():
        x, y, mask = batch  # the tuple (inputs, targets, loss_mask)
        assert x.shape == y.shape == mask.shape == (16, seqlen), name
        assert x.dtype == y.dtype == torch.int64 and mask.dtype == torch.bool, name
        assert 0 <= int(x.min()) and int(x.max()) < tasks.VOCAB_SIZE, name
        assert mask.any(1).all(), name
        assert (y[~mask] == 0).all(), name
        for b, t in mask.nonzero().tolist():
            assert oracle(x[b], t) == y[b, t], (name, b, t)
            assert y[b, t] != x[b, t], (name, b, t)  # the answer is never the current input


@pytest.mark.parametrize("name", ALL)
def test_seed_and_generator(name):
    task = tasks.TASKS[name]
    a, b = task(4, 40, seed=3), task(4, 40, seed=3)
    c = task(4, 40, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a.x, c.x)
    g = torch.Generator().manual_seed(3)
    d = task(4, 40, generator=g)
    assert all(torch.equal(u, v) for u, v in zip(a, d, strict=True))
    assert not torch.equal(task(4, 40, generator=g).x, d.x)  # the generator moves on
    with pytest.raises(ValueError, match="batch"):
        task(0, 40)
    with pytest.raises(TypeError, match="generator"):
        task(2, 40, generator=3)


def test_mqar_layout():
    x, y, mask = tasks.mqar(64, 100, n_pairs=6, n_queries=5, seed=1)
    assert (mask.sum(1) == 5).all() and not mask[:, :12].any()
    keys, values = x[:, 0:12:2], x[:, 1:12:2]
    assert ((1 <= keys) & (keys <= 24)).all() and ((25 <= values) & (values <= 48)).all()
    assert all(len(set(r.tolist())) == 6 for r in keys)  # distinct keys
    assert (x[:, 12:][~mask[:, 12:]] == 0).all()  # blanks between queries
    gaps = mask[:, 12:].nonzero()[:, 1].float()
    assert gaps.median() < 30  # power law: most queries come early in the 88 free positions
    # gapless: the queries fill the tail, which is Ba et al.'s recall when there is one query
    x, y, mask = tasks.mqar(3, 9, n_pairs=4, n_queries=1)
    assert mask[:, -1].all() and mask.sum() == 3
    with pytest.raises(ValueError, match="n_pairs must be <= n_keys"):
        tasks.mqar(1, 40, n_pairs=9, n_keys=8)
    with pytest.raises(ValueError, match="seqlen must be >= 2·n_pairs"):
        tasks.mqar(1, 20, n_pairs=8)
    assert tasks.mqar(1, 40, n_pairs=3).mask.sum() == 3  # n_queries defaults to n_pairs


def test_needle_depth_and_text():
    seqlen = 5 + 6 * 10 + 2  # 10 sentences after 2 pads
    for depth, block in [(0.0, 0), (0.5, 4), (0.55, 5), (1.0, 9)]:
        assert tasks.needle_block(depth, 10) == block
        x, y, _ = tasks.needle_in_haystack(3, seqlen, depth=depth, seed=2)
        start = 2 + 6 * block
        words = tasks.decode(x[0, start:start + 6]).split()
        assert words[:3] == ["the", "secret", "of"] and words[4] == "is"
        assert tasks.WORDS[int(y[0, -1])] == words[5]
    text = tasks.decode(tasks.needle_in_haystack(1, 25, depth=0.0).x[0])
    assert text.startswith("<pad> <pad> the secret of ") and text.count("secret") == 2
    with pytest.raises(ValueError, match="depth"):
        tasks.needle_in_haystack(1, 40, depth=1.5)
    with pytest.raises(ValueError, match="seqlen must be >= 11"):
        tasks.needle_in_haystack(1, 10)


def test_induction_trigger_occurs_twice():
    x, y, mask = tasks.induction_heads(32, 50, n_symbols=5, seed=0)
    assert ((x == 6).sum(1) == 2).all() and (x[:, -1] == 6).all()
    assert ((1 <= y[:, -1]) & (y[:, -1] <= 5)).all()
    with pytest.raises(ValueError, match="seqlen must be >= 3"):
        tasks.induction_heads(1, 2)
