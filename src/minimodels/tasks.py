"""Synthetic long-context tasks: small, seeded batches where the answer depends on a distant input.

References: Hochreiter & Schmidhuber, "Long short-term memory" (1997), section 5 (the adding
problem is their experiment 4); Arjovsky, Shah & Bengio, "Unitary evolution recurrent neural
networks" (2016), section 4.1 (the copying memory task).

Every task returns a ``Batch``: inputs ``x``, targets ``y`` and a boolean ``mask`` of the
positions that are scored. Many-to-one tasks score the last position only; many-to-many tasks
score several. Integer ``y`` means classification (cross-entropy, accuracy), float ``y`` means
regression (mean squared error). Shapes: ``b`` batch, ``l`` length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Batch", "adding", "copying"]


@dataclass(frozen=True)
class Batch:
    """x: (b, l) token ids or (b, l, d) floats; y: (b, l) targets; mask: (b, l) bool."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor

    @property
    def classification(self) -> bool:
        return not self.y.is_floating_point()


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def adding(batch: int, seqlen: int, *, generator: torch.Generator | None = None) -> Batch:
    """The adding problem: add the two marked numbers of a long sequence (many-to-one).

    x: (batch, seqlen, 2) float32: channel 0 holds numbers drawn from U(0, 1), channel 1 is 1 at
    two positions (one in each half) and 0 elsewhere. y: (batch, seqlen), the sum of the two
    marked numbers at the last position (0 elsewhere); mask: True at the last position only.
    Always predicting 1 scores a mean squared error of 1/6 ≈ 0.167: the bar to beat."""
    _check_sizes(batch=batch, seqlen=seqlen)
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 (two marks), got {seqlen}")
    values = torch.rand(batch, seqlen, generator=generator)  # (b, l)
    half = seqlen // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, seqlen, (batch,), generator=generator)
    marks = torch.zeros(batch, seqlen)
    rows = torch.arange(batch)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    x = torch.stack([values, marks], dim=-1)  # (b, l, 2)
    y = torch.zeros(batch, seqlen)
    y[:, -1] = (values * marks).sum(-1)
    mask = torch.zeros(batch, seqlen, dtype=torch.bool)
    mask[:, -1] = True
    return Batch(x, y, mask)


def copying(
    batch: int,
    seqlen: int,
    *,
    n_copy: int = 1,
    n_symbols: int = 8,
    generator: torch.Generator | None = None,
) -> Batch:
    """The copying memory task: read ``n_copy`` symbols, wait, then write them back.

    Token ids: 0 = blank, 1..n_symbols = symbols, n_symbols + 1 = the "go" marker (vocabulary
    ``n_symbols + 2``). A row of x (batch, seqlen), int64, is

        s_1 .. s_k  0 0 ... 0  go  0 ... 0          (k = n_copy; the last k positions are blank)

    and y (batch, seqlen) holds s_1 .. s_k at the last k positions (0 elsewhere), where mask is
    True. The lag between reading s_j and writing it is seqlen - k. With n_copy = 1 it is a
    many-to-one recall of the first token; chance accuracy is 1 / n_symbols."""
    _check_sizes(batch=batch, seqlen=seqlen, n_copy=n_copy, n_symbols=n_symbols)
    if seqlen < 2 * n_copy + 1:
        raise ValueError(f"seqlen must be >= 2·n_copy + 1 = {2 * n_copy + 1}, got {seqlen}")
    symbols = torch.randint(1, n_symbols + 1, (batch, n_copy), generator=generator)  # (b, k)
    x = torch.zeros(batch, seqlen, dtype=torch.long)
    x[:, :n_copy] = symbols
    x[:, seqlen - n_copy - 1] = n_symbols + 1
    y = torch.zeros(batch, seqlen, dtype=torch.long)
    y[:, seqlen - n_copy:] = symbols
    mask = torch.zeros(batch, seqlen, dtype=torch.bool)
    mask[:, seqlen - n_copy:] = True
    return Batch(x, y, mask)


# ---------------------------------------------------------------------------------------------
# Selective copying (chapter 05)
# ---------------------------------------------------------------------------------------------

__all__ += ["selective_copying"]


def selective_copying(
    batch: int,
    seqlen: int,
    *,
    n_copy: int = 4,
    n_symbols: int = 8,
    generator: torch.Generator | None = None,
) -> Batch:
    """Selective copying (Gu & Dao, "Mamba", 2023, section 3.1 and figure 2): the ``n_copy``
    symbols sit at RANDOM positions among blanks; after the "go" marker, write them back in order.

    Token ids as in ``copying``: 0 = blank, 1..n_symbols = symbols, n_symbols + 1 = go
    (vocabulary ``n_symbols + 2``). A row of x (batch, seqlen), int64, is

        0 s_1 0 0 s_2 0 ... s_k 0 0  go  0 ... 0        (the last k = n_copy positions blank)

    y (batch, seqlen) holds s_1 .. s_k at the last k positions, where mask is True. Unlike
    ``copying``, the gaps between symbols change from row to row, so a time-invariant
    convolution cannot line them up: the model must decide from the content what to keep."""
    _check_sizes(batch=batch, seqlen=seqlen, n_copy=n_copy, n_symbols=n_symbols)
    if seqlen < 2 * n_copy + 1:
        raise ValueError(f"seqlen must be >= 2·n_copy + 1 = {2 * n_copy + 1}, got {seqlen}")
    region = seqlen - n_copy - 1  # where the symbols may sit
    keys = torch.rand(batch, region, generator=generator)
    where = keys.topk(n_copy, dim=1).indices.sort(dim=1).values  # (b, k) distinct, in order
    symbols = torch.randint(1, n_symbols + 1, (batch, n_copy), generator=generator)  # (b, k)
    x = torch.zeros(batch, seqlen, dtype=torch.long)
    x.scatter_(1, where, symbols)
    x[:, region] = n_symbols + 1
    y = torch.zeros(batch, seqlen, dtype=torch.long)
    y[:, seqlen - n_copy:] = symbols
    mask = torch.zeros(batch, seqlen, dtype=torch.bool)
    mask[:, seqlen - n_copy:] = True
    return Batch(x, y, mask)


def associative_recall(
    batch: int,
    n_pairs: int,
    *,
    n_keys: int = 16,
    n_values: int = 16,
    generator: torch.Generator | None = None,
) -> Batch:
    """Associative recall: read key-value pairs, then answer the value of a queried key.

    Reference: Ba et al., "Using fast weights to attend to the recent past" (2016), section 4.1;
    Arora et al., "Zoology" (2023), section 3 (why attention-free models find it hard).

    Token ids: 0 unused, keys 1..n_keys, values n_keys+1..n_keys+n_values (vocabulary
    ``n_keys + n_values + 1``). A row of x (batch, 2·n_pairs + 1), int64, is

        k_1 v_1 k_2 v_2 ... k_n v_n  q          (distinct keys; q is one of them)

    and y holds the value paired with q at the last position, where mask is True
    (many-to-one). Chance accuracy is 1 / n_values."""
    _check_sizes(batch=batch, n_pairs=n_pairs, n_keys=n_keys, n_values=n_values)
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs must be <= n_keys = {n_keys} (distinct keys), got {n_pairs}")
    order = torch.rand(batch, n_keys, generator=generator).argsort(dim=1)
    keys = order[:, :n_pairs] + 1  # (b, n)
    values = torch.randint(n_keys + 1, n_keys + n_values + 1, (batch, n_pairs),
                           generator=generator)
    pick = torch.randint(0, n_pairs, (batch,), generator=generator)
    rows = torch.arange(batch)
    x = torch.cat([torch.stack([keys, values], 2).view(batch, 2 * n_pairs),
                   keys[rows, pick][:, None]], dim=1)  # (b, 2n + 1)
    y = torch.zeros_like(x)
    y[:, -1] = values[rows, pick]
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, -1] = True
    return Batch(x, y, mask)


__all__ += ["associative_recall"]


def multi_query_recall(
    batch: int,
    n_pairs: int,
    n_queries: int | None = None,
    *,
    n_keys: int = 16,
    n_values: int = 16,
    generator: torch.Generator | None = None,
) -> Batch:
    """Multi-query associative recall (MQAR): key-value pairs, then several queried keys, each
    answered with its value.

    Reference: Arora et al., "Zoology: measuring and improving recall in efficient language
    models" (2023) (MQAR: the gap between attention and gated convolutions such as Hyena grows
    with the number of pairs to remember).

    Token ids as ``associative_recall`` (keys 1..n_keys, values n_keys+1..n_keys+n_values,
    vocabulary ``n_keys + n_values + 1``). A row of x (batch, 2·n_pairs + n_queries), int64:

        k_1 v_1 … k_n v_n  q_1 … q_m          (distinct keys; each q_i is one of them)

    y holds q_i's value at q_i's position, where mask is True (``n_queries`` scored positions
    per row, default n_pairs). Chance accuracy is 1 / n_values."""
    n_queries = n_pairs if n_queries is None else n_queries
    _check_sizes(batch=batch, n_pairs=n_pairs, n_queries=n_queries, n_keys=n_keys,
                 n_values=n_values)
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs must be <= n_keys = {n_keys} (distinct keys), got {n_pairs}")
    keys = torch.rand(batch, n_keys, generator=generator).argsort(dim=1)[:, :n_pairs] + 1
    values = torch.randint(n_keys + 1, n_keys + n_values + 1, (batch, n_pairs),
                           generator=generator)
    pick = torch.randint(0, n_pairs, (batch, n_queries), generator=generator)  # (b, m)
    queries = keys.gather(1, pick)  # (b, m)
    x = torch.cat([torch.stack([keys, values], 2).view(batch, 2 * n_pairs), queries], 1)
    y = torch.zeros_like(x)
    y[:, 2 * n_pairs:] = values.gather(1, pick)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, 2 * n_pairs:] = True
    return Batch(x, y, mask)


__all__ += ["multi_query_recall"]
