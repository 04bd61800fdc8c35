"""Maintainer tooling: build ``exercises/`` from ``solutions/`` and check they are in sync.

    python -m minimodels.course exercises          # write exercises/NN_topic.ipynb
    python -m minimodels.course exercises --check  # exit 1 if exercises/ is stale
    python -m minimodels.course grade PATH...      # grade submitted exercise notebooks
    python -m minimodels.course book               # the course as a static website

Grading is ``minimodels.grade``, the website ``minimodels.book``.

A solution region sits between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's
markers) in a code cell. It becomes, at the indentation of the BEGIN marker::

    # TODO (Exercise 5.2): your code here
    raise NotImplementedError("Exercise 5.2")

The exercise number is the last ``Exercise N.M`` named in a markdown cell above the region.
Outputs and execution counts are cleared. The output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
EXERCISE = re.compile(r"Exercise\s+(\d+\.\d+)")
ROOT = Path.cwd()


class MarkerError(ValueError):
    """Unbalanced solution markers, or a region with no exercise number above it."""


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _stub_region(code: str, exercise: str | None, where: str) -> str:
    out, inside = [], False
    for line in code.splitlines(keepends=True):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise MarkerError(f"{where}: nested {BEGIN}")
            if exercise is None:
                raise MarkerError(f"{where}: no 'Exercise N.M' in a markdown cell above")
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# TODO (Exercise {exercise}): your code here\n")
            out.append(f'{indent}raise NotImplementedError("Exercise {exercise}")\n')
            inside = True
        elif stripped == END:
            if not inside:
                raise MarkerError(f"{where}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: {BEGIN} without {END}")
    return "".join(out)


def make_exercise(solution: dict, name: str = "notebook") -> dict:
    """The exercise notebook for a solution notebook (both as nbformat-4 JSON dicts)."""
    nb = copy.deepcopy(solution)
    exercise = None
    for i, cell in enumerate(nb["cells"]):
        src = _source(cell)
        if cell["cell_type"] == "markdown":
            found = EXERCISE.findall(src)
            exercise = found[-1] if found else exercise
            continue
        if cell["cell_type"] != "code":
            continue
        if BEGIN in src or END in src:
            src = _stub_region(src, exercise, f"{name} cell {i}")
        cell["source"] = src.splitlines(keepends=True)
        cell["outputs"] = []
        cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
    return nb


def dumps(nb: dict) -> str:
    """nbformat's on-disk layout: one-space indent, sorted keys, trailing newline."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def build_exercises(root: Path = ROOT, check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) every exercise notebook; return the stale ones."""
    solutions, exercises = root / "solutions", root / "exercises"
    stale = []
    wanted = set()
    for path in sorted(solutions.glob("*.ipynb")):
        target = exercises / path.name
        wanted.add(target.name)
        text = dumps(make_exercise(json.loads(path.read_text()), path.name))
        if target.exists() and target.read_text() == text:
            continue
        stale.append(str(target.relative_to(root)))
        if not check:
            exercises.mkdir(exist_ok=True)
            target.write_text(text)
    orphans = [p for p in sorted(exercises.glob("*.ipynb")) if p.name not in wanted]
    for p in orphans:
        stale.append(f"{p.relative_to(root)} (no solution{': removed' if not check else ''})")
        if not check:
            p.unlink()
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimodels.course")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("exercises", help="build exercises/ from solutions/")
    ex.add_argument("--check", action="store_true", help="fail if exercises/ is stale")
    ex.add_argument("--root", type=Path, default=ROOT, help="the course's root folder")
    gr = sub.add_parser("grade", help="run submitted exercise notebooks and tabulate verdicts")
    gr.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="notebooks or folders")
    gr.add_argument("--csv", type=Path, metavar="FILE", help="also write file,exercise,verdict")
    gr.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                    help="time limit of each notebook (default 120)")
    gr.add_argument("--max-output", type=float, default=5.0, metavar="MB",
                    help="stop a notebook whose outputs pass this size (default 5)")
    gr.add_argument("--root", type=Path, default=None,
                    help="the course folder whose solutions/ define the exercises")
    bk = sub.add_parser("book", help="build the course as a static website (nbconvert)")
    bk.add_argument("--out", type=Path, default=ROOT / "build" / "book", help="output folder")
    bk.add_argument("--root", type=Path, default=ROOT, help="the course's root folder")
    args = parser.parse_args(argv)
    if args.command == "grade":
        return _grade(args)
    if args.command == "book":
        from minimodels.book import build_book

        index = build_book(args.root, args.out)
        print(f"wrote the course's website: {index} (open it in a browser)")
        return 0
    stale = build_exercises(args.root, check=args.check)
    if args.check:
        if stale:
            print("exercises/ is out of date with solutions/:", *stale, sep="\n  ")
            print("run: python -m minimodels.course exercises")
            return 1
        print("exercises/ is in sync with solutions/")
    else:
        print("wrote:", *stale, sep="\n  ") if stale else print("exercises/ already up to date")
    return 0


def _grade(args: argparse.Namespace) -> int:
    from minimodels.grade import grade, table, write_csv

    try:
        rows = grade(args.paths, root=args.root, timeout=args.timeout,
                     max_output_mb=args.max_output,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as err:
        print(f"grade: {err}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
