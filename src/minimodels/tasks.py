"""Synthetic long-context tasks: small, seeded batches where the answer depends on a distant input.

References: Hochreiter & Schmidhuber, "Long short-term memory" (1997), section 5 (the adding
problem is their experiment 4); Arjovsky, Shah & Bengio, "Unitary evolution recurrent neural
networks" (2016), section 4.1 (the copying memory task); Gu & Dao, "Mamba" (2023), section 3.1
(selective copying, induction heads); Olsson et al., "In-context learning and induction heads"
(2022); Arora et al., "Zoology" (2023), section 3 (multi-query associative recall); Kamradt,
"Needle in a haystack" (2023) and Gemini Team, "Gemini 1.5" (2024), section 5.2.1 (the needle).

Every task returns a ``Batch``, the tuple ``(inputs, targets, loss_mask)`` = ``(x, y, mask)``:
inputs ``x``, targets ``y`` and a boolean ``mask`` of the positions that are scored. Many-to-one
tasks score the last position only; many-to-many tasks score several. Integer ``y`` means
classification (cross-entropy, accuracy), float ``y`` means regression (mean squared error).
``y[t]`` is what a causal model should output after reading ``x[0..t]``. Shapes: ``b`` batch,
``l`` length.

The long-context tasks (``TASKS``: selective_copy, induction_heads, mqar, needle_in_haystack)
share one signature, ``task(batch, seqlen, *, seed=0, generator=None, **options)``: the same
``seed`` gives the same batch; a ``generator`` (``torch.Generator``), when given, is used instead
(``train`` passes one to draw a fresh batch per step). Each docstring lists its token ids; all
fit in ``VOCAB_SIZE`` = 64 with the default options, so one model can learn any of them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TASKS", "VOCAB_SIZE", "Batch", "adding", "copying"]

VOCAB_SIZE = 64  # every long-context task's ids are < 64 with its default options


class Batch(NamedTuple):
    """(inputs, targets, loss_mask): x (b, l) token ids or (b, l, d) floats; y (b, l) targets;
    mask (b, l) bool, True where y is scored."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor

    @property
    def classification(self) -> bool:
        return not self.y.is_floating_point()


def _rng(seed: int, generator: torch.Generator | None) -> torch.Generator:
    """The generator to draw from: ``generator`` when given, else a fresh one seeded ``seed``."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
        return generator
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


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

__all__ += ["selective_copy"]


def selective_copy(
    batch: int,
    seqlen: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    n_copy: int = 4,
    n_symbols: int = 8,
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
    generator = _rng(seed, generator)
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


# ---------------------------------------------------------------------------------------------
# Induction heads (Olsson et al. 2022; used by H3, Hyena and Mamba as a synthetic task)
# ---------------------------------------------------------------------------------------------

__all__ += ["induction_heads"]


def induction_heads(
    batch: int,
    seqlen: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    n_symbols: int = 16,
) -> Batch:
    """Induction heads: a trigger token appears once, followed by a random symbol; at the end
    the trigger appears again and the model must say the symbol that followed it ("… A B … A →
    B", Olsson et al. 2022, section 2; Gu & Dao 2023, section 4.1.2).

    Token ids: 0 unused, symbols 1..n_symbols, the trigger n_symbols + 1 (vocabulary
    ``n_symbols + 2``). A row of x (batch, seqlen), int64, is random symbols with

        … s s T a s s … s  T        (T the trigger at a random p ≤ seqlen − 3, a = x[p+1])

    y holds a at the last position, where mask is True (many-to-one). The trigger occurs nowhere
    else, so the answer is the token after the trigger's first occurrence. Chance is 1/n_symbols."""
    _check_sizes(batch=batch, seqlen=seqlen, n_symbols=n_symbols)
    if seqlen < 3:
        raise ValueError(f"seqlen must be >= 3 (trigger, answer, trigger), got {seqlen}")
    generator = _rng(seed, generator)
    trigger = n_symbols + 1
    x = torch.randint(1, n_symbols + 1, (batch, seqlen), generator=generator)  # (b, l)
    where = torch.randint(0, seqlen - 2, (batch,), generator=generator)  # (b,) p in [0, l − 3]
    rows = torch.arange(batch)
    x[rows, where] = trigger
    x[:, -1] = trigger
    y = torch.zeros_like(x)
    y[:, -1] = x[rows, where + 1]
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, -1] = True
    return Batch(x, y, mask)


# ---------------------------------------------------------------------------------------------
# Multi-query associative recall (Zoology)
# ---------------------------------------------------------------------------------------------

__all__ += ["mqar"]


def mqar(
    batch: int,
    seqlen: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    n_pairs: int = 8,
    n_queries: int | None = None,
    n_keys: int = 24,
    n_values: int = 24,
    power_a: float = 0.01,
) -> Batch:
    """Multi-query associative recall (MQAR): key-value pairs, then queried keys scattered over
    the rest of the sequence, each answered with its value.

    References: Ba et al., "Using fast weights to attend to the recent past" (2016), section 4.1
    (one query); Arora et al., "Zoology" (2023), section 3 and appendix (several queries; the gap
    between attention and gated convolutions grows with the number of pairs).

    Token ids: 0 blank, keys 1..n_keys, values n_keys+1..n_keys+n_values (vocabulary
    ``n_keys + n_values + 1``; 49 with the defaults). A row of x (batch, seqlen), int64, is

        k_1 v_1 … k_n v_n   0 q_1 0 0 0 q_2 … 0 q_m 0 0      (n = n_pairs distinct keys)

    The first 2n tokens are the pairs; each query q_i is one of the keys (drawn with
    replacement) and sits at a distinct position of the remaining seqlen − 2n, drawn with
    probability ∝ (gap + 1)^(power_a − 1) where gap counts from the end of the pairs (Zoology's
    power law: most queries come soon, a few come late). y holds q_i's value at q_i's position,
    where mask is True (``n_queries`` scored positions per row, default n_pairs). When seqlen =
    2n + n_queries the queries fill the tail in order (no blanks; with n_queries = 1 this is
    Ba et al.'s single-query recall). Chance accuracy is 1 / n_values."""
    n_queries = n_pairs if n_queries is None else n_queries
    _check_sizes(batch=batch, seqlen=seqlen, n_pairs=n_pairs, n_queries=n_queries,
                 n_keys=n_keys, n_values=n_values)
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs must be <= n_keys = {n_keys} (distinct keys), got {n_pairs}")
    if seqlen < 2 * n_pairs + n_queries:
        raise ValueError(f"seqlen must be >= 2·n_pairs + n_queries = {2 * n_pairs + n_queries}, "
                         f"got {seqlen}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    generator = _rng(seed, generator)
    context, region = 2 * n_pairs, seqlen - 2 * n_pairs
    keys = torch.rand(batch, n_keys, generator=generator).argsort(dim=1)[:, :n_pairs] + 1  # (b, n)
    values = torch.randint(n_keys + 1, n_keys + n_values + 1, (batch, n_pairs),
                           generator=generator)  # (b, n)
    pick = torch.randint(0, n_pairs, (batch, n_queries), generator=generator)  # (b, m)
    if region == n_queries:
        gaps = torch.arange(n_queries).expand(batch, n_queries)  # (b, m) the whole tail
    else:
        p = torch.arange(1, region + 1, dtype=torch.float64) ** (power_a - 1)  # (region,)
        gaps = torch.multinomial(p.expand(batch, region), n_queries, replacement=False,
                                 generator=generator).sort(dim=1).values  # (b, m)
    where = context + gaps  # (b, m) query positions
    x = torch.zeros(batch, seqlen, dtype=torch.long)
    x[:, :context] = torch.stack([keys, values], 2).view(batch, context)
    x.scatter_(1, where, keys.gather(1, pick))
    y = torch.zeros_like(x)
    y.scatter_(1, where, values.gather(1, pick))
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask.scatter_(1, where, True)
    return Batch(x, y, mask)


# ---------------------------------------------------------------------------------------------
# Needle in a haystack (Kamradt 2023; Gemini 1.5's recall plot)
# ---------------------------------------------------------------------------------------------

__all__ += ["WORDS", "decode", "needle_block", "needle_in_haystack"]

# The needle task's vocabulary: id = position in WORDS. Haystack sentences are
# "DET ADJ NOUN VERB ADVERB ." (6 tokens); the needle is "the secret of KEY is VALUE" (6 tokens);
# the question is "the secret of KEY is" and its answer VALUE.
_MARKS = ("<pad>", ".", "the", "a", "secret", "of", "is")
_ADJECTIVES = ("quiet", "old", "green", "small", "bright", "cold", "long", "soft")
_NOUNS = ("river", "stone", "garden", "bird", "window", "road", "tree", "cloud", "house",
          "field", "lamp", "boat")
_VERBS = ("runs", "sleeps", "waits", "shines", "falls", "sings", "turns", "rests")
_ADVERBS = ("slowly", "often", "alone", "softly", "again", "today", "there", "still")
_KEYS = ("fox", "owl", "cat", "wolf", "hare", "crow", "bear", "deer")
_VALUES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = _MARKS + _ADJECTIVES + _NOUNS + _VERBS + _ADVERBS + _KEYS + _VALUES
_ID = {w: i for i, w in enumerate(WORDS)}
_BLOCK, _QUESTION = 6, 5  # tokens per sentence; tokens of the question


def _ids(words: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([_ID[w] for w in words])


def decode(tokens) -> str:
    """The needle task's token ids (a sequence of ints or a 1-d tensor) as text."""
    return " ".join(WORDS[int(t)] for t in tokens)


def needle_block(depth: float, n_blocks: int) -> int:
    """Which of the haystack's ``n_blocks`` sentences the needle replaces at ``depth``:
    round(depth · (n_blocks − 1)), so depth 0 is the first sentence and depth 1 the last one,
    right before the question (Gemini 1.5's "depth %" axis)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return round(depth * (n_blocks - 1))



def needle_in_haystack(
    batch: int,
    seqlen: int,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    depth: float | None = None,
) -> Batch:
    """One fact hidden in distractor text; at the end a question that only the fact answers.

    References: Kamradt, "Needle in a haystack — pressure testing LLMs" (2023); Gemini Team,
    "Gemini 1.5" (2024), figure 1 and section 5.2.1 (recall against context length and depth).

    Token ids: positions in ``WORDS`` (61 words, ``decode`` turns ids into text). A row of x
    (batch, seqlen), int64, is n_blocks = (seqlen − 5) // 6 sentences after (seqlen − 5) % 6
    pads, then the question:

        <pad>…  the old bird sings again .  …  the secret of owl is four  …  the secret of owl is

    Haystack sentences are "DET ADJ NOUN VERB ADVERB ." with words drawn at random; the needle
    "the secret of KEY is VALUE" replaces sentence ``needle_block(depth, n_blocks)`` (``depth``
    in [0, 1]; None draws the sentence uniformly for each row). y holds VALUE at the last
    position, where mask is True. Value words appear only in the needle; chance is 1/10."""
    _check_sizes(batch=batch, seqlen=seqlen)
    if seqlen < _BLOCK + _QUESTION:
        raise ValueError(f"seqlen must be >= {_BLOCK + _QUESTION} (one sentence and the "
                         f"question), got {seqlen}")
    generator = _rng(seed, generator)
    n_blocks = (seqlen - _QUESTION) // _BLOCK
    pad = seqlen - _QUESTION - n_blocks * _BLOCK

    def draw(words: tuple[str, ...], *shape: int) -> torch.Tensor:
        return _ids(words)[torch.randint(0, len(words), shape, generator=generator)]

    words = [draw(kind, batch, n_blocks) for kind in (("the", "a"), _ADJECTIVES, _NOUNS, _VERBS,
                                                      _ADVERBS)]
    sentences = torch.stack(words + [torch.full((batch, n_blocks), _ID["."])], 2)  # (b, blocks, 6)
    key, value = draw(_KEYS, batch), draw(_VALUES, batch)  # (b,), (b,)
    if depth is None:
        block = torch.randint(0, n_blocks, (batch,), generator=generator)  # (b,)
    else:
        block = torch.full((batch,), needle_block(depth, n_blocks))
    prefix = _ids(("the", "secret", "of")).expand(batch, 3)
    question = torch.cat([prefix, key[:, None], torch.full((batch, 1), _ID["is"])], 1)  # (b, 5)
    sentences[torch.arange(batch), block] = torch.cat([question, value[:, None]], 1)
    x = torch.cat([torch.zeros(batch, pad, dtype=torch.long),
                   sentences.reshape(batch, n_blocks * _BLOCK), question], 1)  # (b, l)
    y = torch.zeros_like(x)
    y[:, -1] = value
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, -1] = True
    return Batch(x, y, mask)


TASKS = {"selective_copy": selective_copy, "induction_heads": induction_heads, "mqar": mqar,
         "needle_in_haystack": needle_in_haystack}
