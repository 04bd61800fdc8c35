"""Grade submitted exercise notebooks: run each in a fresh kernel and read the checkers' verdicts.

    python -m minimodels.course grade PATH... [--csv FILE] [--timeout SECONDS]

PATH is a notebook or a folder (searched recursively for ``*.ipynb``). Every submission is read
into memory first, then run one at a time, each in a temporary folder of its own, by a worker
process (``_grade_worker.py``: nbclient and a fresh ``python3`` kernel). Nothing a submission
runs executes in the grader's process. A submission that loops forever is stopped at
``--timeout`` (counted once its kernel is ready; the kernel is shut down, and the worker and
the kernel's process group are killed by their ids if they outlive it);
one that prints more than ``--max-output`` megabytes is stopped; one that crashes its
kernel or deletes files only spoils its own run. This is isolation for mistakes, not a security
sandbox: grade submissions you do not trust inside a container.

The verdicts are the checkers' own: in the kernel, ``minimodels.check`` appends every verdict it
reports to the file named by ``MINIMODELS_GRADE_LOG``, so printed text cannot pass for a verdict.
Each submission is matched to its chapter by its exercise headings and the checkers it calls,
and graded on the exercises of that chapter's solution notebook (an exercise the learner
deleted is reported, not skipped). One row per exercise:

    passed | the checker's message | not attempted | raised <error> | timed out | ...
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from minimodels.course import BEGIN, EXERCISE, _source

WORKER = Path(__file__).with_name("_grade_worker.py")
CHECK_CALL = re.compile(r"\bcheck\.(\w+)\(")
STUB = re.compile(r"(?:TODO \(Exercise|NotImplementedError\(\"Exercise)\s+(\d+\.\d+)")
PREFIX = re.compile(r"^Exercise\s+(\d+\.\d+)\s*(?:\([^)]*\))?:\s*")
NOT_EXERCISE = "not an exercise notebook of this course (no checker calls)"
STARTUP_SLACK_S = 90.0  # kernel start (up to 60 s) and shutdown beyond --timeout; then a kill


@dataclass(frozen=True)
class Reference:
    """A chapter's solution notebook: its exercises in order and the checkers it calls."""

    stem: str
    exercises: tuple[str, ...]
    checks: frozenset[str]


@dataclass(frozen=True)
class Row:
    file: str
    exercise: str
    verdict: str
    passed: bool = False


@dataclass(frozen=True)
class Run:
    """What the worker reports: how the run ended, the verdicts, each cell's first error."""

    status: str  # finished | timed out | kernel died | output limit | failed
    detail: str
    verdicts: list[dict]
    errors: list[tuple[int, str]]  # (cell index, "Name: value") in cell order


def default_root() -> Path:
    """The course folder: the current one if it has solutions/, else this checkout's."""
    here = Path.cwd()
    if (here / "solutions").is_dir():
        return here
    return Path(__file__).resolve().parents[2]


def cell_exercises(nb: dict) -> list[str | None]:
    """Each cell's exercise: the last ``Exercise N.M`` named in a markdown cell above it."""
    out, current = [], None
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            found = EXERCISE.findall(_source(cell))
            current = found[-1] if found else current
        out.append(current)
    return out


def reference(nb: dict, stem: str) -> Reference:
    """The exercises (one per solution region, in order) and checker calls of a solution."""
    exercises: list[str] = []
    checks: set[str] = set()
    for cell, ex in zip(nb["cells"], cell_exercises(nb), strict=True):
        if cell["cell_type"] != "code":
            continue
        src = _source(cell)
        if BEGIN in src and ex is not None and ex not in exercises:
            exercises.append(ex)
        checks.update(CHECK_CALL.findall(src))
    return Reference(stem, tuple(exercises), frozenset(checks))


def load_references(root: Path) -> list[Reference]:
    folder = root / "solutions"
    if not folder.is_dir():
        raise ValueError(f"root: {root} has no solutions/ folder (pass --root, the course folder)")
    return [reference(json.loads(p.read_text()), p.stem) for p in sorted(folder.glob("*.ipynb"))]


def match(nb: dict, name: str, references: list[Reference]) -> Reference | None:
    """The chapter a submission belongs to, by its exercise numbers and checker calls (the file
    name only breaks ties: learners rename files). None for a notebook that calls no checker of
    any chapter, such as a lecture notebook."""
    ids, calls = set(), set()
    for cell in nb.get("cells", []):
        src = _source(cell)
        if cell.get("cell_type") == "markdown":
            ids.update(EXERCISE.findall(src))
        elif cell.get("cell_type") == "code":
            calls.update(CHECK_CALL.findall(src))
            ids.update(STUB.findall(src))
    best, best_key = None, (0, 0, False)
    for ref in references:
        n_calls = len(calls & ref.checks)
        key = (n_calls, len(ids & set(ref.exercises)), ref.stem in name)
        if n_calls and key > best_key:
            best, best_key = ref, key
    return best


def find_submissions(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
            )
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"PATH: {path} is neither a notebook nor a folder")
    return list(dict.fromkeys(found))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_notebook(nb: dict, timeout: float, max_output_mb: float) -> Run:
    """Run ``nb`` in a worker process and a fresh kernel, in a temporary folder of its own."""
    tmp = Path(tempfile.mkdtemp(prefix="minimodels-grade-"))
    try:
        work = tmp / "work"  # the kernel's cwd: all the submission can see of the grader's files
        work.mkdir()
        (work / "submission.ipynb").write_text(json.dumps(nb))
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        env["MINIMODELS_GRADE_LOG"] = str(tmp / "verdicts.jsonl")
        # -P: the worker's folder (the package's modules) stays off sys.path
        cmd = [sys.executable, "-P", str(WORKER), str(tmp), str(timeout), str(max_output_mb)]
        with open(tmp / "worker.log", "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            try:
                proc.wait(timeout=timeout + STARTUP_SLACK_S)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
        kernel_pid = tmp / "kernel.pid"
        if kernel_pid.exists():  # the kernel runs in a session of its own: stop it by its id
            _kill_group(int(kernel_pid.read_text()))
        verdicts = []
        if (tmp / "verdicts.jsonl").exists():
            for line in (tmp / "verdicts.jsonl").read_text(errors="replace").splitlines():
                try:
                    verdicts.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: the verdicts before it still count
        try:
            report = json.loads((tmp / "report.json").read_text())
        except (OSError, json.JSONDecodeError):
            tail = (tmp / "worker.log").read_text(errors="replace")[-300:]
            status = "timed out" if proc.returncode == -signal.SIGKILL else "failed"
            return Run(status, f"the worker stopped ({proc.returncode}): {tail}", verdicts, [])
        errors = [(i, e) for i, e in report["errors"]]
        return Run(report["status"], report["detail"], verdicts, errors)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def grade_notebook(nb: dict, ref: Reference, file: str, run: Run) -> list[Row]:
    """One row per exercise of ``ref``, from the checkers' verdicts and the cells' errors."""
    by_exercise: dict[str, list[dict]] = {}
    for v in run.verdicts:
        m = PREFIX.match(v.get("message", ""))
        if m:
            by_exercise.setdefault(m.group(1), []).append(v)
    owner = cell_exercises(nb)
    rows = []
    for ex in ref.exercises:
        verdicts = by_exercise.get(ex, [])
        failed = [v for v in verdicts if not v.get("passed")]
        if verdicts and not failed:
            rows.append(Row(file, ex, "passed", True))
        elif failed:
            message = PREFIX.sub("", failed[0]["message"])
            attempted = "not implemented yet" not in message
            rows.append(Row(file, ex, _short(message) if attempted else "not attempted"))
        elif run.status != "finished":
            rows.append(Row(file, ex, f"{run.status}: {_short(run.detail, 120)}"))
        elif ex not in owner:
            rows.append(Row(file, ex, "not attempted: the exercise's cells are missing"))
        else:
            mine = [e for i, e in run.errors if i < len(owner) and owner[i] == ex]
            earlier = [e for i, e in run.errors if i < len(owner) and owner[i] is None]
            if mine:
                rows.append(Row(file, ex, f"raised {_short(mine[0])}"))
            elif earlier:
                rows.append(Row(file, ex, f"not checked: a setup cell raised {_short(earlier[0])}"))
            else:
                rows.append(Row(file, ex, "no verdict: its check cell was removed or not run"))
    return rows


def grade(
    paths: list[Path],
    *,
    root: Path | None = None,
    timeout: float = 120.0,
    max_output_mb: float = 5.0,
    progress=None,
) -> list[Row]:
    """Grade every submission under ``paths``; one row per (file, exercise)."""
    if timeout <= 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout}")
    if max_output_mb <= 0:
        raise ValueError(f"max_output_mb: expected a positive size, got {max_output_mb}")
    references = load_references(root or default_root())
    files = find_submissions(paths)
    if not files:
        raise ValueError(f"PATH: no notebooks (*.ipynb) under {', '.join(map(str, paths))}")
    loaded: list[tuple[str, dict | str]] = []
    for path in files:  # read all first: a submission that deletes files cannot remove another
        try:
            nb = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
                raise ValueError("no list of cells")
            loaded.append((str(path), nb))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            loaded.append((str(path), f"unreadable: not a notebook ({_short(str(err), 80)})"))
    rows: list[Row] = []
    for file, nb in loaded:
        if isinstance(nb, str):
            rows.append(Row(file, "-", nb))
            continue
        ref = match(nb, Path(file).name, references)
        if ref is None:
            rows.append(Row(file, "-", NOT_EXERCISE))
            continue
        start = time.monotonic()
        run = run_notebook(nb, timeout, max_output_mb)
        rows += grade_notebook(nb, ref, file, run)
        if progress:
            progress(f"graded {file} ({ref.stem}) in {time.monotonic() - start:.1f} s")
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a text table, a total per file and one for all."""
    widths = [max([len(h)] + [len(getattr(r, h)) for r in rows]) for h in ("file", "exercise")]
    lines = [f"{'file':<{widths[0]}}  {'exercise':<{widths[1]}}  verdict"]
    lines.append("-" * len(lines[0]))
    per_file: dict[str, list[Row]] = {}
    for r in rows:
        per_file.setdefault(r.file, []).append(r)
    def line(file: str, exercise: str, verdict: str) -> str:
        return f"{file:<{widths[0]}}  {exercise:<{widths[1]}}  {_short(verdict, 100)}"

    for file, mine in per_file.items():
        lines += [line(r.file, r.exercise, r.verdict) for r in mine]
        graded = [r for r in mine if r.exercise != "-"]
        if graded:
            passed = sum(r.passed for r in graded)
            lines.append(line(file, "total", f"{passed}/{len(graded)} passed"))
    graded = [r for r in rows if r.exercise != "-"]
    lines.append("-" * len(lines[0]))
    lines.append(
        f"total: {sum(r.passed for r in graded)} of {len(graded)} exercises passed "
        f"in {len(per_file)} notebooks"
    )
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "exercise", "verdict"])
        for r in rows:
            w.writerow([r.file, r.exercise, r.verdict])
