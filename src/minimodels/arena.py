"""The long-context arena: every mixer of the course in the same small LM, on the same tasks.

References: Arora et al., "Zoology: measuring and improving recall in efficient language models"
(2023) (MQAR at matched size; recall against state size); Gemini Team, "Gemini 1.5" (2024),
section 5.2.1 (needle-in-a-haystack recall against context length and depth); Lieber et al.,
"Jamba: a hybrid transformer-Mamba language model" (2024), sections 2 and 6 (one attention layer
per seven Mamba layers, mixture-of-experts every other layer); Poli et al., "StripedHyena"
(2023) (Hyena layers striped with attention).

Every contender is ``minimodels.models.LM`` with ``n_layers`` blocks of one or several mixers,
its width chosen so that its parameter count is as close as possible to a common target
(``width_for``; reported). ``run`` trains one model per (task, length, contender) for
``budget`` steps on fresh seeded batches and scores it on held-out batches; ``costs`` times a
forward pass and decoding, and counts memory and state, against the sequence length. Rows are
plain dicts, saved as JSON under ``results/arena/`` by ``python -m minimodels.arena --quick``
(2-core CPU, minutes) or ``--full`` (a GPU, the CUDA kernels, larger everything);
``length_probe`` (``--probe``) trains a contender on each length alone and on all of them, to
tell a length it cannot learn from one that spoils another.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minimodels import lab, tasks
from minimodels.models import LM, state_numel
from minimodels.models.moe import parameter_counts
from minimodels.nn import MLP
from minimodels.plots import fit_slope
from minimodels.train import evaluate, seed_everything, train

__all__ = ["CONTENDERS", "FULL", "PROBE", "QUICK", "Scale", "constant_guesses", "costs",
           "exponents", "length_probe", "load", "make", "mean_accuracy", "merge",
           "ranking_changes", "results_dir", "run", "save", "scale_of", "summary", "width_for"]

# A contender: LM options. Pure mixers repeat their mixer over ``n_layers``; hybrids give a list
# (whose length is their depth). Jamba: 1 attention layer per 3 Mamba layers (the paper's 1:7 at
# 4 layers), mixture-of-experts every other layer (as the paper), no positional encoding (the
# Mamba layers supply order, section 6.4). StripedHyena: Hyena and attention alternating, rotary
# positions in attention. "jamba_dense" is Jamba with dense MLPs of the same active size: the
# control that isolates what the experts buy.
CONTENDERS: dict[str, dict] = {
    "attention": {"mixer": "attention", "n_heads": 2, "rope": True},
    "rwkv": {"mixer": "rwkv"},
    "s4d": {"mixer": "s4d", "d_state": 16},
    "mamba": {"mixer": "mamba"},
    "hyena": {"mixer": "hyena"},
    "m2": {"mixer": "m2"},
    "lstm": {"mixer": "lstm", "fused": True},  # torch's fused loop: the same layer, fast
    "striped_hyena": {"mixer": ["hyena", "attention"] * 2, "n_heads": 2, "rope": True},
    "jamba": {"mixer": ["mamba"] * 3 + ["attention"], "mlp": ["mlp", "moe"] * 2,
              "n_heads": 2, "n_experts": 4, "top_k": 2, "d_ff_expert": 2},
    "jamba_dense": {"mixer": ["mamba"] * 3 + ["attention"], "n_heads": 2, "d_ff_expert": 2},
}
HYBRIDS = ("striped_hyena", "jamba", "jamba_dense")
RECURRENT = ("rwkv", "s4d", "mamba", "lstm")  # a state of fixed size
LENGTH_OPTION = {"hyena": "l_max", "m2": "max_len"}  # mixers whose parameters depend on l_max


def _options(name: str, d_model: int, max_len: int) -> dict:
    """The LM keyword options of contender ``name`` at width ``d_model``."""
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}: expected one of {', '.join(CONTENDERS)}")
    opts = dict(CONTENDERS[name])
    mixers = opts["mixer"] if isinstance(opts["mixer"], list) else [opts["mixer"]]
    for mixer, option in LENGTH_OPTION.items():
        if mixer in mixers:
            opts[option] = max_len
    if "d_ff_expert" in opts:  # each expert d_ff = d_ff_expert · d: top_k of them = a dense MLP
        opts["d_ff"] = opts.pop("d_ff_expert") * d_model
    return opts


def make(name: str, d_model: int, *, vocab_size: int = tasks.VOCAB_SIZE, n_layers: int = 4,
         max_len: int = 256) -> LM:
    """Contender ``name`` as an LM of width d_model (hybrids: as many layers as their list)."""
    opts = _options(name, d_model, max_len)
    mixer = opts.pop("mixer")
    layers = len(mixer) if isinstance(mixer, list) else n_layers
    if name == "jamba_dense":  # where jamba has a MoE, one dense MLP as wide as its top_k experts
        wide = CONTENDERS["jamba"]["top_k"] * opts["d_ff"]
        opts["mlp"] = ["mlp", lambda d: MLP(d, wide)] * 2
    return LM(vocab_size, d_model, layers, mixer=mixer, **opts)


def width_for(name: str, params: int, *, vocab_size: int = tasks.VOCAB_SIZE, n_layers: int = 4,
              max_len: int = 256) -> int:
    """The width (a multiple of 4) whose model's total parameter count is closest to
    ``params``. "jamba_dense" takes jamba's width, so both have the same active parameters."""
    if name == "jamba_dense":
        name = "jamba"
    best = None
    for d in range(8, 1025, 4):
        n = parameter_counts(make(name, d, vocab_size=vocab_size, n_layers=n_layers,
                                  max_len=max_len))["total"]
        if best is None or abs(n - params) < abs(best[1] - params):
            best = (d, n)
        if n > params:
            break
    return best[0]


# =============================================================================================
# Scales
# =============================================================================================


@dataclass(frozen=True)
class Scale:
    """Everything that sets the size of an arena run. ``lengths``: each task's sequence lengths
    (training draws one per batch, each is scored); ``budget``: training steps per task;
    ``pairs``: MQAR's key-value counts (drawn per batch, each scored); ``depths``: the needle's
    scored depths (training draws a depth per row); ``options``: task options."""

    name: str
    params: int
    budget: dict[str, int]
    batch: int
    lr: float
    lengths: dict[str, tuple[int, ...]]
    pairs: tuple[int, ...]
    depths: tuple[float, ...]
    cost_lengths: tuple[int, ...]
    decode_marks: tuple[int, ...]
    options: dict[str, dict] = field(default_factory=dict)
    eval_batch: int = 256
    n_layers: int = 4
    contenders: tuple[str, ...] = tuple(CONTENDERS)
    device: str = "cpu"


QUICK = Scale(name="quick", params=40_000, batch=32, lr=3e-3,
              budget={"mqar": 400, "needle_in_haystack": 250, "induction_heads": 200,
                      "selective_copy": 200},
              lengths={"mqar": (32, 64), "needle_in_haystack": (32, 64, 128),
                       "induction_heads": (32,), "selective_copy": (32,)},
              pairs=(2, 4, 8), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
              options={"mqar": {"n_keys": 8, "n_values": 8}},
              cost_lengths=(256, 512, 1024, 2048, 4096), decode_marks=(64, 256, 1024))
# FULL fits the device budget of one session (two 10-minute calls, resumed from the
# checkpoint): on 2026-12-05 twice these steps, forty jobs side by side, did not finish in one
# call (the H200 time-slices between processes; each step of these small models waits on its
# launches, so more processes than a few buy little)
FULL = Scale(name="full", params=400_000, batch=64, lr=2e-3,
             budget={"mqar": 1000, "needle_in_haystack": 750, "induction_heads": 500,
                     "selective_copy": 500},
             lengths={"mqar": (64, 128, 256), "needle_in_haystack": (128, 512, 2048),
                      "induction_heads": (256,), "selective_copy": (256,)},
             pairs=(4, 8, 16, 32), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
             options={"mqar": {"n_keys": 32, "n_values": 31}},
             cost_lengths=(1024, 2048, 4096, 8192, 16384), decode_marks=(256, 1024, 4096),
             device="cuda")


# =============================================================================================
# Training and scoring
# =============================================================================================


def _to(batch: tasks.Batch, device: str) -> tasks.Batch:
    """The batch on ``device``; to a GPU from pinned memory, so that the copy does not wait for
    the GPU to finish the previous step (a copy from pageable memory does)."""
    if device == "cpu":
        return batch
    return tasks.Batch(*(t.pin_memory().to(device, non_blocking=True) for t in batch))


def _queries(length: int, n_pairs: int) -> int:
    """MQAR queries per row: a quarter of the positions after the pairs (at least n_pairs), so
    that every batch has many scored positions (Zoology asks each key once; more queries give
    more signal per step at a small budget)."""
    return max(n_pairs, (length - 2 * n_pairs) // 4)


def _fits(length: int, scale: Scale) -> list[int]:
    return [p for p in scale.pairs if 3 * p <= length]


def _evaluations(task: str, length: int, scale: Scale) -> dict[str, tasks.Batch]:
    """Held-out batches (seeds apart from training's) keyed by what varies within a task."""
    gen, opts, n = tasks.TASKS[task], scale.options.get(task, {}), scale.eval_batch
    if task == "mqar":
        return {f"pairs={p}": gen(n, length, n_pairs=p, n_queries=_queries(length, p),
                                  seed=10_000 + p, **opts) for p in _fits(length, scale)}
    if task == "needle_in_haystack":
        return {f"depth={d:g}": gen(n, length, depth=d, seed=20_000 + round(100 * d), **opts)
                for d in scale.depths}
    return {"": gen(n, length, seed=30_000, **opts)}


def _batches(task: str, lengths: Sequence[int], scale: Scale):
    """batch_fn(generator=g) for ``train``: a length drawn per batch (and MQAR's pair count)."""
    gen, opts = tasks.TASKS[task], scale.options.get(task, {})

    def pick(options, generator):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    def batch_fn(generator):
        length = pick(lengths, generator)
        if task == "mqar":
            p = pick(_fits(length, scale), generator)
            opts_ = {**opts, "n_pairs": p, "n_queries": _queries(length, p)}
        else:
            opts_ = opts
        return _to(gen(scale.batch, length, generator=generator, **opts_), scale.device)

    return batch_fn


def run(tasks_: Iterable[str], mixers: Iterable[str], lengths: Mapping[str, Sequence[int]]
        | Sequence[int], budget: Mapping[str, int] | int, *, scale: Scale = QUICK,
        seed: int = 0, workers: int = 1, progress: bool = True,
        checkpoint: Path | None = None) -> list[dict]:
    """Train each contender once per task and score it at every length.

    ``tasks_``: names of ``minimodels.tasks.TASKS``; ``mixers``: names of ``CONTENDERS``;
    ``lengths``: one list for every task, or a dict task -> lengths (training draws a length per
    batch); ``budget``: training steps per model, one int or a dict task -> steps. Widths match
    ``scale.params`` parameters. Returns one row per score: {task, length, contender, setting
    (pairs=…, depth=…), accuracy, d_model, total and active parameters, state (numbers in the
    decoding state after ``length`` tokens), steps, seconds (training)}. ``workers`` > 1 runs
    that many jobs at once in spawned processes (CPU: one per core). ``checkpoint``: a JSON-lines
    file that gets each finished job's rows at once; the jobs it already holds are not run again,
    so a run cut short (a time limit) resumes where it stopped."""
    from tqdm.auto import tqdm

    tasks_, mixers = list(tasks_), list(mixers)
    for t in tasks_:
        if t not in tasks.TASKS:
            raise ValueError(f"unknown task {t!r}: expected one of {', '.join(tasks.TASKS)}")
    _check_contenders(mixers, workers)
    steps = budget if isinstance(budget, Mapping) else {t: budget for t in tasks_}
    for t in tasks_:
        if not isinstance(steps.get(t), int) or steps[t] < 1:
            raise ValueError(f"budget for {t} must be a positive int (training steps), got "
                             f"{steps.get(t)!r}")
    per_task = (lengths if isinstance(lengths, Mapping) else {t: tuple(lengths) for t in tasks_})
    max_len = max(max(per_task[t]) for t in tasks_)
    widths = {m: width_for(m, scale.params, n_layers=scale.n_layers, max_len=max_len)
              for m in mixers}
    jobs = [(t, m, widths[m], tuple(per_task[t]), steps[t], max_len, scale, seed)
            for t in tasks_ for m in mixers]
    done = _load_checkpoint(checkpoint, {(t, m): (widths[m], steps[t]) for t in tasks_
                                         for m in mixers})
    todo = [job for job in jobs if job[:2] not in done]
    marks = sorted({n for t in tasks_ for n in per_task[t]})
    with lab.single_thread() if scale.device == "cpu" else contextlib.nullcontext():
        states = {(m, length): size for m in mixers for length, size in _state_sizes(
            make(m, widths[m], n_layers=scale.n_layers, max_len=max_len).to(scale.device),
            marks).items()}
    if checkpoint is not None:
        Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)

    def finished(job, rows):
        done[job[:2]] = rows
        if checkpoint is not None:
            with Path(checkpoint).open("a") as f:
                f.write(json.dumps(rows) + "\n")

    if workers == 1:
        for job in tqdm(todo, desc="arena", disable=not progress):
            finished(job, _job(*job))
    else:  # one process per core, one thread each; every job seeds itself: the same rows
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_job, *job): job for job in todo}
            for future in tqdm(as_completed(futures), total=len(futures), desc="arena",
                               disable=not progress):
                finished(futures[future], future.result())
    return [{**r, "state": states[r["contender"], r["length"]]} for job in jobs
            for r in done[job[:2]]]


def _check_contenders(mixers: Sequence[str], workers: int) -> None:
    for m in mixers:
        if m not in CONTENDERS:
            raise ValueError(f"unknown contender {m!r}: expected one of {', '.join(CONTENDERS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")


def _load_checkpoint(path: Path | None, want: Mapping[tuple[str, str], tuple[int, int]]
                     ) -> dict[tuple[str, str], list[dict]]:
    """The finished jobs in a checkpoint file: (task, contender) -> rows, for the jobs of this
    run; a job trained at another width or budget is a ValueError (a stale file)."""
    done: dict[tuple[str, str], list[dict]] = {}
    if path is None or not Path(path).exists():
        return done
    for line in Path(path).read_text().splitlines():
        rows = json.loads(line)
        key = (rows[0]["task"], rows[0]["contender"])
        if key in want:
            if (rows[0]["d_model"], rows[0]["steps"]) != want[key]:
                raise ValueError(f"checkpoint {path} trained {key} at (d_model, steps) = "
                                 f"{(rows[0]['d_model'], rows[0]['steps'])}, this run asks "
                                 f"{want[key]}: delete the file or pass another")
            done[key] = rows
    return done


def _job(t: str, m: str, d_model: int, lengths: Sequence[int], steps: int, max_len: int,
         scale: Scale, seed: int) -> list[dict]:
    """Train contender m on task t, then score it at every length (on a CPU, on one thread:
    these models are tiny, and two threads wait for each other at every op)."""
    with lab.single_thread() if scale.device == "cpu" else contextlib.nullcontext():
        return _train_and_score(t, m, d_model, lengths, steps, max_len, scale, seed)[0]


def _train_and_score(t, m, d_model, lengths, steps, max_len, scale, seed, batch_fn=None):
    """-> (score rows, training History); ``batch_fn`` defaults to ``_batches``."""
    rows = []
    seed_everything(seed)
    model = make(m, d_model, n_layers=scale.n_layers, max_len=max_len).to(scale.device)
    counts = parameter_counts(model)
    start = time.perf_counter()
    history = train(model, batch_fn or _batches(t, lengths, scale), steps, lr=scale.lr,
                    seed=seed, progress=False)
    seconds = time.perf_counter() - start
    for length in lengths:
        for setting, batch in _evaluations(t, length, scale).items():
            acc = evaluate(model, _to(batch, scale.device))["accuracy"]
            rows.append({"task": t, "length": length, "contender": m, "setting": setting,
                         "accuracy": round(acc, 4), "d_model": d_model, **counts,
                         "steps": steps, "seconds": round(seconds, 1)})
    return rows, history


@torch.no_grad()
def _state_sizes(model: LM, marks: Sequence[int]) -> dict[int, int]:
    """Numbers in the decoding state after each of ``marks`` tokens, in one pass (a KV cache
    grows, a recurrent state does not; the size does not depend on the weights)."""
    state, device, sizes = None, next(model.parameters()).device, {}
    for t in range(max(marks)):
        _, state = model.step(torch.tensor([t % 8], device=device), state)
        if t + 1 in marks:
            sizes[t + 1] = state_numel(state)
    return sizes


# =============================================================================================
# A length probe: can a contender learn a task at each length, alone and mixed?
# =============================================================================================

# The full needle's contenders at the full width, learning rate and steps, on a CPU at batch 16:
# chapter 10 asks why Hyena answers one fixed word at every length of the full scale.
PROBE = replace(FULL, name="probe", batch=16, device="cpu", contenders=("hyena", "attention"))


def length_probe(contenders: Iterable[str], lengths: Sequence[int], *, scale: Scale = PROBE,
                 task: str = "needle_in_haystack", every: int = 25, seed: int = 0,
                 workers: int = 1) -> dict[str, list[dict]]:
    """Train each contender on each of ``lengths`` alone and on all of them (a length drawn per
    batch, as ``run`` does), with the same seed, width, steps and learning rate as ``scale``'s
    ``task`` and the model size of the whole scale (``max_len``: its longest length), then
    score it at every length it trained on. Tells "cannot learn the task at this length" from
    "one length spoils another". -> {"scores": rows of ``run`` plus "trained_on" (a list),
    "curves": rows {contender, trained_on, length, step, loss}: the training loss at each
    length, averaged over the batches of that length in each window of ``every`` steps}."""
    contenders, lengths = list(contenders), tuple(lengths)
    _check_contenders(contenders, workers)
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive ints, got {lengths!r}")
    max_len = max(max(v) for v in scale.lengths.values())
    trainings = [(n,) for n in lengths] + ([lengths] if len(lengths) > 1 else [])
    jobs = [(task, m, width_for(m, scale.params, n_layers=scale.n_layers, max_len=max_len), on,
             scale.budget[task], max_len, scale, seed, every)
            for m in contenders for on in trainings]
    if workers == 1:
        parts = [_probe_job(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_probe_job, *zip(*jobs, strict=True)))
    return {"scores": [r for scores, _ in parts for r in scores],
            "curves": [r for _, curves in parts for r in curves]}


def _probe_job(t, m, d_model, on, steps, max_len, scale, seed, every):
    with lab.single_thread() if scale.device == "cpu" else contextlib.nullcontext():
        drawn: list[int] = []  # the length of each training batch, in order
        batch_fn = _batches(t, on, scale)

        def recorded(generator):
            batch = batch_fn(generator=generator)
            drawn.append(batch.x.shape[1])
            return batch

        rows, history = _train_and_score(t, m, d_model, on, steps, max_len, scale, seed,
                                         batch_fn=recorded)
    curves = []
    for length in on:
        for start in range(0, steps, every):
            window = [loss for loss, n in zip(history.loss[start:start + every],
                                              drawn[start:start + every], strict=True)
                      if n == length]
            if window:
                curves.append({"contender": m, "trained_on": list(on), "length": length,
                               "step": min(start + every, steps),
                               "loss": round(sum(window) / len(window), 4)})
    return [{**r, "trained_on": list(on)} for r in rows], curves


# =============================================================================================
# Cost: time and memory per token against length, decoding
# =============================================================================================


def _time(fn, device: str, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` calls of fn() after one warm-up (and compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def costs(mixers: Iterable[str], *, scale: Scale = QUICK, progress: bool = True) -> list[dict]:
    """Forward time and peak activation memory per token at each of ``scale.cost_lengths``
    (batch 1, no gradients, one thread on the CPU), and decoding: seconds per token and state
    size after each of ``scale.decode_marks`` tokens. Rows {contender, kind, length, value}."""
    from tqdm.auto import tqdm

    mixers = list(mixers)
    max_len = max(scale.cost_lengths)
    rows = []
    for m in tqdm(mixers, desc="costs", disable=not progress):
        seed_everything(0)
        d = width_for(m, scale.params, n_layers=scale.n_layers,
                      max_len=max(max(v) for v in scale.lengths.values()))
        model = make(m, d, n_layers=scale.n_layers, max_len=max_len).to(scale.device).eval()
        cpu = scale.device == "cpu"
        with lab.single_thread() if cpu else contextlib.nullcontext():
            for length in scale.cost_lengths:
                x = torch.randint(0, 8, (1, length), device=scale.device)
                with torch.no_grad():
                    seconds = _time(lambda x=x, model=model: model(x), scale.device)
                memory = (lab.peak_memory(lambda x=x, model=model: model(x)) if cpu
                          else _cuda_peak(model, x))
                rows += [{"contender": m, "kind": "time_per_token", "length": length,
                          "value": seconds / length},
                         {"contender": m, "kind": "memory_per_token", "length": length,
                          "value": memory / length}]
            if cpu:
                decode = lab.decode_throughput(model, scale.decode_marks, vocab=8)
                for mark, seconds in zip(scale.decode_marks, decode.seconds, strict=True):
                    rows += [{"contender": m, "kind": "decode_seconds", "length": mark,
                              "value": seconds},
                             {"contender": m, "kind": "state", "length": mark,
                              "value": decode.sizes[mark]}]
    return rows


def _cuda_peak(model, x) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# =============================================================================================
# Results: save, load, summarise
# =============================================================================================


def results_dir() -> Path:
    """``results/arena`` at the repository's root (the package is installed editable)."""
    return Path(__file__).resolve().parents[2] / "results" / "arena"


def save(scale: Scale, scores: list[dict], cost_rows: list[dict], seconds: float,
         path: Path | None = None) -> Path:
    path = path or results_dir() / f"{scale.name}.json"
    return _write(path, _meta(scale, seconds), scores, cost_rows)


def _meta(scale: Scale, seconds: float) -> dict:
    return {"scale": asdict(scale),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                       f"{platform.processor() or platform.system()}",
            "device": (torch.cuda.get_device_name() if scale.device == "cuda" else "cpu"),
            "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds),
            "torch": torch.__version__}


def _write(path: Path, meta: dict, scores: list[dict], cost_rows: list[dict]) -> Path:
    """path (.json): meta, scores and costs; beside it (.md): their ``summary`` table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "scores": scores, "costs": cost_rows}, indent=1))
    path.with_suffix(".md").write_text(summary(scores, cost_rows, meta))
    return path


def merge(paths: Sequence[Path], out: Path) -> Path:
    """Join results files of one scale written by separate runs (``--contenders``, ``--tasks``
    and ``--measure`` split a run that does not fit one call) into ``out``: their scores and
    costs, the seconds summed. A (task, contender) scored twice, a contender's costs measured
    twice, or files of different scales, is a ValueError."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if not parts:
        raise ValueError("paths: expected at least one results file")
    names = {part["meta"]["scale"]["name"] for part in parts}
    if len(names) != 1:
        raise ValueError(f"paths: the files hold different scales {sorted(names)}")
    seen: set[tuple[str, str]] = set()
    for path, part in zip(paths, parts, strict=True):
        mine = ({(r["task"], r["contender"]) for r in part["scores"]}
                | {("costs", r["contender"]) for r in part["costs"]})
        if mine & seen:
            again = ", ".join(f"{m} ({t})" for t, m in sorted(mine & seen))
            raise ValueError(f"paths: {path} measures {again} again")
        seen |= mine
    meta = dict(parts[0]["meta"], seconds=sum(part["meta"]["seconds"] for part in parts),
                runs=sum(part["meta"].get("runs", 1) for part in parts))
    return _write(out, meta, [r for part in parts for r in part["scores"]],
                  [r for part in parts for r in part["costs"]])


def load(name: str = "quick") -> dict | None:
    """The committed results of one scale ("quick", "full"), or None when they do not exist."""
    path = results_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def scale_of(meta: Mapping) -> Scale:
    """The ``Scale`` a results file was measured at, rebuilt from its ``meta``."""
    sc = dict(meta["scale"])
    sc["lengths"] = {t: tuple(v) for t, v in sc["lengths"].items()}
    for key in ("pairs", "depths", "cost_lengths", "decode_marks", "contenders"):
        sc[key] = tuple(sc[key])
    return Scale(**sc)


def constant_guesses(scores: list[dict], scale: Scale, *, min_cells: int = 5
                     ) -> dict[tuple[str, str], int]:
    """{(task, contender): token} for every contender whose accuracy, in every scored cell of a
    task (length x setting), is what answering that one token at every scored position scores
    on the same held-out batches: a collapsed model, which learned what the answers look like
    but not which one is right. "At chance" can hide this; a noisy model matches no single
    token in every cell. Accuracies are compared at the 4 decimals the results keep; a task
    scored in fewer than ``min_cells`` cells is skipped (one cell can match by chance)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in scores:
        cells.setdefault((r["task"], r["contender"]), []).append(r)
    rates: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # share of each token's answers
    found = {}
    for (t, m), rows in cells.items():
        if len(rows) < min_cells:
            continue
        match = torch.ones(tasks.VOCAB_SIZE, dtype=torch.bool)
        for r in rows:
            if (t, r["length"]) not in rates:
                rates[t, r["length"]] = {
                    k: torch.bincount(b.y[b.mask], minlength=tasks.VOCAB_SIZE) / b.mask.sum()
                    for k, b in _evaluations(t, r["length"], scale).items()}
            match &= (rates[t, r["length"]][r["setting"]].round(decimals=4)
                      - r["accuracy"]).abs() < 1e-6
        if match.sum() == 1:
            found[t, m] = int(match.nonzero())
    return found


def mean_accuracy(scores: list[dict], task: str, length: int | None = None) -> dict[str, float]:
    """Each contender's mean accuracy over the settings (and lengths, unless given) of a task."""
    acc: dict[str, list[float]] = {}
    for r in scores:
        if r["task"] == task and (length is None or r["length"] == length):
            acc.setdefault(r["contender"], []).append(r["accuracy"])
    return {m: sum(a) / len(a) for m, a in acc.items()}


def ranking_changes(small: list[dict], large: list[dict], tie: float = 0.02
                    ) -> list[tuple[str, str, int, int]]:
    """(task, contender, rank at the small scale, rank at the large scale), 1 = best, for every
    contender whose rank differs between two runs' scores (tasks and contenders in both). A
    contender's rank is 1 + the number of others more than ``tie`` above its mean accuracy, so
    near-ties share a rank (and shuffling them is no change)."""
    changes = []
    for t in dict.fromkeys(r["task"] for r in small):
        a, b = mean_accuracy(small, t), mean_accuracy(large, t)
        common = [m for m in a if m in b]
        rank = {run: {m: 1 + sum(acc[o] > acc[m] + tie for o in common) for m in common}
                for run, acc in (("small", a), ("large", b))}
        changes += [(t, m, rank["small"][m], rank["large"][m]) for m in common
                    if rank["small"][m] != rank["large"][m]]
    return sorted(changes)


def exponents(cost_rows: list[dict], kind: str) -> dict[str, float]:
    """Fitted exponent p of (kind per token) ∝ L^p for each contender (the larger half of the
    lengths, where fixed overheads matter least)."""
    out = {}
    for m in dict.fromkeys(r["contender"] for r in cost_rows):
        pts = sorted((r["length"], r["value"]) for r in cost_rows
                     if r["contender"] == m and r["kind"] == kind)
        pts = pts[(len(pts) - 1) // 2:]
        if len(pts) >= 2 and all(v > 0 for _, v in pts):
            out[m] = fit_slope([p[0] for p in pts], [p[1] for p in pts])
    return out


def _runs(meta: Mapping) -> str:
    n = meta.get("runs", 1)
    return f" (summed over {n} runs, some of them side by side)" if n > 1 else ""


def summary(scores: list[dict], cost_rows: list[dict], meta: Mapping) -> str:
    """A Markdown results table: mean accuracy per task for each contender, its size, and its
    cost exponents."""
    task_names = list(dict.fromkeys(r["task"] for r in scores))
    mixers = list(dict.fromkeys(r["contender"] for r in scores + cost_rows))
    size = {r["contender"]: (r["d_model"], r["total"], r["active"]) for r in scores}
    acc = {t: mean_accuracy(scores, t) for t in task_names}
    t_exp = exponents(cost_rows, "time_per_token")
    m_exp = exponents(cost_rows, "memory_per_token")
    head = (f"# Arena results: {meta['scale']['name']}\n\n{meta['date']}, {meta['device']} "
            f"({meta['machine']}), torch {meta['torch']}, {meta['seconds']} s in all"
            f"{_runs(meta)}. "
            f"Budget (steps of {meta['scale']['batch']} sequences per model): "
            f"{meta['scale']['budget']}; ~{meta['scale']['params']:,} parameters each.\n\n")
    cols = ["contender", "d", "params (active)"] + [f"{t} acc" for t in task_names] + [
        "time/token exp", "memory/token exp"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in mixers:
        d, total, active = size.get(m, ("-", 0, 0))  # "-": costs only, not trained here
        cells = [m, str(d), (f"{total:,}" + (f" ({active:,})" if active != total else "")
                             if total else "-")]
        cells += [f"{acc[t].get(m, float('nan')):.2f}" for t in task_names]
        cells += [f"{t_exp.get(m, float('nan')):.2f}", f"{m_exp.get(m, float('nan')):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


# =============================================================================================
# Command line
# =============================================================================================


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimodels.arena", description=(
        "Train every contender on the long-context tasks and measure their cost; writes "
        "results/arena/<scale>.json and .md."))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_true", help="2-core CPU, under 10 minutes")
    which.add_argument("--full", action="store_true", help="a CUDA GPU, larger everything")
    which.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                       help="join results files of split runs into --out")
    which.add_argument("--probe", nargs="+", choices=list(CONTENDERS), metavar="CONTENDER",
                       help="the full needle's model on a CPU, trained on each of --lengths "
                            "alone and on all of them (results/arena/probe.json; minutes)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512],
                        help="--probe's training lengths (default 128 512)")
    parser.add_argument("--contenders", nargs="+", default=None, choices=list(CONTENDERS))
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(tasks.TASKS))
    parser.add_argument("--budget", type=int, default=None, help="training steps per model")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/arena)")
    parser.add_argument("--workers", type=int, default=None,
                        help="jobs at once (default: 2 on the CPU, one per core; 1 on a GPU)")
    parser.add_argument("--measure", choices=("all", "scores", "costs"), default="all",
                        help="train and score, measure costs, or both (costs time the models: "
                             "run them alone on the machine)")
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out (the joined file)")
        print(f"wrote {merge(args.merge, args.out)}")
        return 0
    if args.probe:
        start = time.perf_counter()
        out = args.out or results_dir() / "probe.json"
        found = length_probe(args.probe, args.lengths,
                             workers=args.workers or min(2, os.cpu_count() or 1))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": _meta(PROBE, time.perf_counter() - start), **found},
                                  indent=1))
        print(f"wrote {out}")
        return 0
    scale = QUICK if args.quick else FULL
    if scale.device == "cuda" and not torch.cuda.is_available():
        parser.error("--full runs on a CUDA GPU and none is visible here; use --quick")
    if args.budget is not None:
        scale = replace(scale, budget={t: args.budget for t in scale.budget})
    mixers = args.contenders or list(scale.contenders)
    task_names = args.tasks or list(scale.lengths)
    start = time.perf_counter()
    workers = args.workers or (min(2, os.cpu_count() or 1) if scale.device == "cpu" else 1)
    out = args.out or results_dir() / f"{scale.name}.json"
    checkpoint = out.with_suffix(".jobs.jsonl")  # a run cut short resumes from it
    scores = (run(task_names, mixers, scale.lengths, scale.budget, scale=scale, workers=workers,
                  checkpoint=checkpoint) if args.measure != "costs" else [])
    cost_rows = costs(mixers, scale=scale) if args.measure != "scores" else []
    path = save(scale, scores, cost_rows, time.perf_counter() - start, out)
    checkpoint.unlink(missing_ok=True)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

