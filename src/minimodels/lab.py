"""What the chapters share: a CUDA check that runs anywhere, single-thread timing, decode
throughput, memory probes, and claims tables rendered from measured values.

    res = lab.simulator_check(CODE)          # CODE prints a number; a GPU or Numba's simulator
    print(res.value < 1e-12)                 # a failed run raises with its stderr, never NaN
    with lab.single_thread():                # torch and Numba on one thread, restored after
        sizes, seconds = lab.decode_throughput(model, marks=[16, 64, 256])
    lab.peak_memory(lambda: attention(q, k, v, backend="ref"))   # bytes torch allocated
    lab.claims_table([lab.Claim("Linear in l", "slope {slope:.2f}", lab.between("slope", 0.8,
                      1.2, otherwise="holds with caveats"), slope=s)])
    lab.say("The kernel is {x:.1f}x faster.", x=speedup)

Every number a chapter's prose quotes goes through ``claims_table`` or ``say``: the text is
formatted from the measured values and each verdict is computed from a stated threshold, so the
words cannot drift from the numbers. Layer: ``lab`` may import kernels, models and ``bench``;
nothing below imports ``lab``.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from minimodels.backend import cuda_simulated

__all__ = [
    "CheckRun",
    "Claim",
    "Decode",
    "Rule",
    "SimulatorCheckFailed",
    "above",
    "below",
    "between",
    "claims_table",
    "core",
    "decode_throughput",
    "peak_memory",
    "saved_for_backward",
    "say",
    "simulator_check",
    "single_thread",
]


# =============================================================================================
# A CUDA check that runs on any machine
# =============================================================================================


class SimulatorCheckFailed(RuntimeError):
    """The check's subprocess failed (exit status, timeout, or no number printed)."""


@dataclass(frozen=True)
class CheckRun:
    """The outcome of ``simulator_check``: the subprocess's exit status and output, and whether
    it ran in Numba's CUDA simulator (no GPU here) or on a real GPU."""

    returncode: int
    stdout: str
    stderr: str
    simulated: bool
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def where(self) -> str:
        return "Numba's CUDA simulator" if self.simulated else "the GPU"

    @property
    def message(self) -> str:
        """One line when it ran; else why it failed, with the tail of its stderr."""
        if self.timed_out:
            return f"the CUDA check timed out in {self.where}" + self._tail()
        if self.returncode != 0:
            return (f"the CUDA check failed in {self.where} (exit status {self.returncode})"
                    + self._tail())
        return f"the CUDA check ran in {self.where}"

    def _tail(self, chars: int = 2000) -> str:
        tail = (self.stderr or self.stdout).strip()[-chars:]
        return ":\n" + tail if tail else " (no output)"

    @property
    def value(self) -> float:
        """The last number the check printed. Raises ``SimulatorCheckFailed`` with the
        subprocess's stderr when it failed or printed no number: never a silent NaN."""
        if not self.ok:
            raise SimulatorCheckFailed(self.message)
        words = self.stdout.split()
        try:
            return float(words[-1])
        except (IndexError, ValueError):
            raise SimulatorCheckFailed(
                f"the CUDA check ran in {self.where} but its last output is not a number: "
                f"{self.stdout.strip()[-200:]!r}") from None


def simulator_check(code: str, timeout: float = 300.0, *, switch_interval: float = 1e-5
                    ) -> CheckRun:
    """Run ``code`` (Python source that usually prints one number, e.g. a max error) in a fresh
    process: on the GPU when one is present, else with ``NUMBA_ENABLE_CUDASIM=1``. A separate
    process because the simulator must be switched on before Numba is imported. The code can
    ask ``minimodels.backend.cuda_simulated()`` where its tensors belong (CPU under the
    simulator). ``sys.setswitchinterval(switch_interval)`` is set first: the simulator runs GPU
    threads as Python threads, and frequent switches make barrier-heavy kernels several times
    faster. Returns a ``CheckRun``; its ``value`` raises with the stderr tail if the run failed."""
    from minimodels.backend import cuda_available

    env = dict(os.environ)
    simulated = cuda_simulated() or not cuda_available()
    if simulated:
        env["NUMBA_ENABLE_CUDASIM"] = "1"  # no GPU here: simulate one
    source = f"import sys\nsys.setswitchinterval({switch_interval!r})\n{code}"
    try:
        run = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        def text(x):
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

        return CheckRun(-1, text(err.stdout), text(err.stderr) + f"\n(killed after {timeout} s)",
                        simulated, timed_out=True)
    return CheckRun(run.returncode, run.stdout, run.stderr, simulated)


# =============================================================================================
# Timing
# =============================================================================================


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one torch thread and one Numba thread, and restore both counts after
    (also on an error). Tiny ops on a busy 2-core machine run many times faster on one thread
    than on two that wait for each other at every barrier; timings measure the op, not the
    wake-ups."""
    import numba

    threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])


class Decode(NamedTuple):
    """``sizes[t]``: numbers in the state after t tokens; ``seconds[i]``: median seconds per
    step of the ``n`` steps after ``marks[i]`` tokens."""

    sizes: dict[int, int]
    seconds: list[float]


def decode_throughput(model, marks: Sequence[int], n: int = 15, vocab: int = 16, *,
                      one_thread: bool = True) -> Decode:
    """Greedy-decode-style stepping of ``model.step(token (1,), state) -> (logits, state)`` for
    ``max(marks) + n`` tokens (token t is ``t % vocab``), batch 1, without gradients. At each
    mark, the size of the state so far (``minimodels.models.state_numel``: numbers in every
    tensor of it; 0 before the first token) and the median time of the next ``n`` steps (the
    median shrugs off the machine's other work). On one thread unless ``one_thread=False``."""
    from minimodels.models import state_numel

    marks = sorted(marks)
    sizes, steps, state = {}, [], None
    with single_thread() if one_thread else contextlib.nullcontext(), torch.no_grad():
        for t in range(marks[-1] + n):
            if t in marks:
                sizes[t] = 0 if state is None else state_numel(state)
            token = torch.tensor([t % vocab])
            start = time.perf_counter()
            _, state = model.step(token, state)
            steps.append(time.perf_counter() - start)
    return Decode(sizes, [statistics.median(steps[m:m + n]) for m in marks])


# =============================================================================================
# Memory
# =============================================================================================


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes of the tensors torch allocates while ``fn()`` runs (under ``no_grad``),
    beyond its inputs. ``tracemalloc`` does not see torch's allocator and torch keeps no peak
    counter on the CPU, so this counts: a ``TorchDispatchMode`` sees every tensor each torch
    operation returns, adds its storage's bytes when it is new (not a view of an input) and
    subtracts them when the tensor is freed. Memory a Numba kernel allocates inside itself is
    invisible to it (count that from the kernel's constants)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0

        def _free(self, nbytes):
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    nbytes = t.untyped_storage().nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, nbytes)
            return out

    with torch.no_grad(), _Peak() as mode:
        fn()
    return mode.peak


def saved_for_backward(fn: Callable[..., object], *args: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of ``fn(*args)``, counted with
    ``torch.autograd.graph.saved_tensors_hooks`` (deterministic, no profiler). Each argument
    is cloned and made a leaf that requires grad; each saved tensor counts numel·element_size
    (a tensor saved twice counts twice)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    xs = [a.detach().clone().requires_grad_() for a in args]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*xs)
    return total


# =============================================================================================
# Claims and sentences rendered from measured values
# =============================================================================================


@dataclass(frozen=True)
class Rule:
    """A verdict computed from the measured values: ``then`` when ``test(values[key])`` holds,
    else ``otherwise`` (a label, or another ``Rule`` for a third grade). Build one with
    ``above``, ``below`` or ``between``; ``rule(values)`` returns the label, ``rule.explain``
    the comparison that decided it (e.g. ``"ratio 2.31 > 2"``)."""

    key: str
    test: Callable[[float], bool]
    condition: str  # e.g. "> 2", "in [0.8, 1.2]"
    then: str = "holds"
    otherwise: str | Rule = "not reproducible here"

    def _decide(self, values: Mapping[str, Any]) -> tuple[str, str]:
        if self.key not in values:
            raise KeyError(f"the verdict rule needs the measured value {self.key!r}; "
                           f"got {sorted(values)}")
        try:
            x = float(values[self.key])
        except (TypeError, ValueError):
            x = math.nan
        if math.isnan(x):
            raise ValueError(f"the measured value {self.key!r} must be a number, got "
                             f"{values[self.key]!r}")
        passed = self.test(x)
        why = f"{self.key} {x:.3g} {'' if passed else 'not '}{self.condition}"
        if passed:
            return self.then, why
        if isinstance(self.otherwise, Rule):
            label, deeper = self.otherwise._decide(values)
            return label, f"{why}; {deeper}"
        return self.otherwise, why

    def __call__(self, values: Mapping[str, Any]) -> str:
        return self._decide(values)[0]

    def explain(self, values: Mapping[str, Any]) -> str:
        return self._decide(values)[1]


def above(key: str, threshold: float, then: str = "holds",
          otherwise: str | Rule = "not reproducible here") -> Rule:
    """``then`` when the measured ``key`` > ``threshold``."""
    return Rule(key, lambda x: x > threshold, f"> {threshold:g}", then, otherwise)


def below(key: str, threshold: float, then: str = "holds",
          otherwise: str | Rule = "not reproducible here") -> Rule:
    """``then`` when the measured ``key`` < ``threshold``."""
    return Rule(key, lambda x: x < threshold, f"< {threshold:g}", then, otherwise)


def between(key: str, lo: float, hi: float, then: str = "holds",
            otherwise: str | Rule = "not reproducible here") -> Rule:
    """``then`` when ``lo`` <= the measured ``key`` <= ``hi``."""
    return Rule(key, lambda x: lo <= x <= hi, f"in [{lo:g}, {hi:g}]", then, otherwise)


@dataclass(frozen=True, init=False)
class Claim:
    """One row of a claims table: the ``claim`` as stated (paper, documentation), what we
    ``measured`` as a ``str.format`` template over ``values``, and the ``verdict``: a ``Rule``
    over ``values`` or a fixed label (for claims a test or a construction settles)."""

    claim: str
    measured: str
    verdict: Rule | str
    values: dict[str, Any] = field(default_factory=dict)

    def __init__(self, claim: str, measured: str, verdict: Rule | str, /, **values: Any):
        object.__setattr__(self, "claim", claim)
        object.__setattr__(self, "measured", measured)
        object.__setattr__(self, "verdict", verdict)
        object.__setattr__(self, "values", values)

    def cells(self, show_rule: bool = True) -> tuple[str, str, str]:
        measured = _fill(self.measured, self.values)
        if isinstance(self.verdict, Rule):
            verdict = self.verdict(self.values)
            if show_rule:
                verdict += f" ({self.verdict.explain(self.values)})"
        else:
            verdict = self.verdict
        return self.claim, measured, verdict


def _fill(template: str, values: Mapping[str, Any]) -> str:
    """``template.format(**values)``, with every ``Rule`` among the values replaced by its
    verdict on the others; a missing value is a clear KeyError."""
    plain = {k: v for k, v in values.items() if not isinstance(v, Rule)}
    filled = {k: (v(plain) if isinstance(v, Rule) else v) for k, v in values.items()}
    try:
        return template.format(**filled)
    except KeyError as err:
        raise KeyError(f"the template {template!r} names {err}, which was not given "
                       f"(given: {sorted(values)})") from None


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def claims_table(rows: Iterable[Claim], *, show_rule: bool = True,
                 header: Sequence[str] = ("claim", "measured at course scale", "verdict")):
    """The chapter's claims as a Markdown table (``IPython.display.Markdown``; a notebook
    renders it, ``.data`` is the text). Each row's measured cell is formatted from its values
    and its verdict computed by its rule; with ``show_rule`` the verdict also says which
    comparison decided it, e.g. "holds (ratio 5.2 > 2)"."""
    from IPython.display import Markdown

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if not isinstance(row, Claim):
            raise TypeError(f"claims_table takes Claim rows, got {type(row).__name__}")
        lines.append("| " + " | ".join(_cell(c) for c in row.cells(show_rule)) + " |")
    return Markdown("\n".join(lines))


def say(template: str, **values: Any):
    """One sentence (or paragraph) of Markdown formatted from measured values:
    ``say("The kernel is {x:.1f}x faster: the claim {v}.", x=r, v=above("x", 3))``; a ``Rule``
    among the values becomes its verdict on the other values."""
    from IPython.display import Markdown

    return Markdown(_fill(template, values))


# =============================================================================================
# A kernel's core, pulled from its source
# =============================================================================================

CORE_MAX_LINES = 40


def core(obj, name: str, *, max_lines: int = CORE_MAX_LINES):
    """The lines of ``obj``'s source file (a module or a function) between the markers
    ``# [core] name`` and the next ``# [/core]``, dedented, as a Markdown code block with the
    file and line numbers and a link to the whole file: a chapter shows the 10–30 lines that
    carry a kernel's idea, and they cannot drift from the code that runs. Raises ValueError when
    the marker is missing or the core is longer than ``max_lines``."""
    import inspect
    import textwrap
    from pathlib import Path

    from IPython.display import Markdown

    path = Path(inspect.getsourcefile(obj))
    lines = path.read_text().splitlines()
    start = next((i for i, s in enumerate(lines) if s.strip() == f"# [core] {name}"), None)
    if start is None:
        raise ValueError(f"no '# [core] {name}' marker in {path}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == "# [/core]"), None)
    if end is None:
        raise ValueError(f"the core '{name}' in {path} has no closing '# [/core]'")
    body = lines[start + 1:end]
    if len(body) > max_lines:
        raise ValueError(f"the core '{name}' in {path} has {len(body)} lines > {max_lines}: "
                         "show the idea, link the rest")
    root = Path(__file__).resolve().parents[2]  # the repository (src/minimodels/lab.py)
    try:
        shown = path.resolve().relative_to(root).as_posix()
    except ValueError:  # an installed wheel: no repository around it
        shown = path.name
    text = textwrap.dedent("\n".join(body))
    # no line numbers: an edit elsewhere in the file must not change what the chapter shows
    return Markdown(f"```python\n{text}\n```\n\n<small>`{shown}`, core '{name}': the idea of "
                    f"the kernel; [the whole file](../{shown}).</small>")
