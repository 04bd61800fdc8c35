"""`python -m minimodels.course grade`: a folder of submissions made here, graded in one run.

The submissions are chapter 06's exercise notebook (torch only, quick to run) filled in in
every way a learner hands one in: solved, half solved, wrong, an infinite loop, a syntax error,
a kernel crash that also deletes files, megabytes of output, plus chapter 00's notebook, a
lecture notebook and a file that is not a notebook, all graded in one run.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minimodels import course, grade

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "06_monarch_mixer.ipynb"
TIMEOUT_S = 40  # for every notebook, from its kernel's start; the infinite loop uses all of it

WRONG_61 = """\
    xb = x.reshape(*x.shape[:-1], p, k).transpose(-1, -2)     # strided slices, not contiguous
    out = torch.einsum("kqp,...kp->...kq", w, xb)
    return out.reshape(*x.shape[:-1], k * q)
"""
SYNTAX_62 = "    return torch.arange(r * l).reshape(r, l).T.reshape(-1\n"
# an infinite loop that sleeps, to spare the CPU of the tests running beside it: the grader
# stops it the same way as a busy one (it kills the kernel at the time limit)
LOOP_62 = "    import time\n    while True:\n        time.sleep(0.05)\n"
VANDAL_62 = """\
    import glob
    import os
    for path in glob.glob("*") + [{victim!r}]:
        os.remove(path)
    os._exit(1)
"""
CHATTY_61 = "    while True:\n        print('x' * 100_000)\n"


def submission(answers: dict[str, str | None]) -> dict:
    """Chapter 06's solution notebook with exercise ``N.M``'s region replaced by
    ``answers[N.M]`` (a stub, as in exercises/, when None); other exercises stay solved."""
    nb = json.loads(SOLUTION.read_text())
    owners = grade.cell_exercises(nb)
    for cell, ex in zip(nb["cells"], owners, strict=True):
        src = "".join(cell["source"])
        if cell["cell_type"] != "code" or course.BEGIN not in src or ex not in answers:
            continue
        if answers[ex] is None:
            src = course._stub_region(src, ex, "test")
        else:
            head, rest = src.split(course.BEGIN, 1)
            _, tail = rest.split(course.END, 1)
            src = head.rstrip(" ") + answers[ex] + tail.partition("\n")[2]
        cell["source"] = src
    return nb


def grade_folder(tmp_path: Path):
    folder = tmp_path / "submissions"
    folder.mkdir()
    subs = {
        "solved.ipynb": submission({}),
        "half.ipynb": submission({"6.2": None, "6.3": None}),
        "wrong.ipynb": submission({"6.1": WRONG_61, "6.2": SYNTAX_62}),
        "loop.ipynb": submission({"6.2": LOOP_62}),
        "crash.ipynb": submission({"6.2": VANDAL_62.format(victim=str(folder / "solved.ipynb"))}),
        "chatty.ipynb": submission({"6.1": CHATTY_61}),
        "zz_other_chapter.ipynb": json.loads((ROOT / "exercises" / "00_welcome.ipynb").read_text()),
        "lecture.ipynb": json.loads((ROOT / "chapters" / "00_welcome.ipynb").read_text()),
    }
    for name, nb in subs.items():
        (folder / name).write_text(json.dumps(nb))
    (folder / "notes").mkdir()
    (folder / "notes" / "broken.ipynb").write_text("{ this is not json")
    out = folder.parent / "grades.csv"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "minimodels.course", "grade", str(folder),
         "--csv", str(out), "--timeout", str(TIMEOUT_S), "--root", str(ROOT)],
        capture_output=True, text=True, timeout=20 * 60, cwd=ROOT,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    verdicts = {(Path(r[0]).name, r[1]): r[2] for r in rows[1:]}
    seconds = {  # stderr: "graded <file> (<chapter>) in <t> s", one line per notebook run
        Path(line.split()[1]).name: float(line.split()[-2])
        for line in proc.stderr.splitlines() if line.startswith("graded ")
    }  # fmt: skip
    return rows, verdicts, proc.stdout, elapsed, folder, seconds


def csv_has_the_columns_and_one_row_per_exercise(graded):
    rows, verdicts, _, _, _, _ = graded
    assert rows[0] == ["file", "exercise", "verdict"]
    per_file = {}
    for (name, ex), _verdict in verdicts.items():
        per_file.setdefault(name, []).append(ex)
    for name in ("solved.ipynb", "half.ipynb", "wrong.ipynb", "loop.ipynb", "crash.ipynb",
                 "chatty.ipynb"):  # fmt: skip
        assert per_file[name] == ["6.1", "6.2", "6.3"], name
    assert per_file["zz_other_chapter.ipynb"] == ["0.1", "0.2", "0.3"]


def solved_and_half_solved(graded):
    _, v, _, _, _, _ = graded
    assert [v["solved.ipynb", e] for e in ("6.1", "6.2", "6.3")] == ["passed"] * 3
    assert [v["half.ipynb", e] for e in ("6.1", "6.2", "6.3")] == [
        "passed", "not attempted", "not attempted"]  # fmt: skip


def wrong_answers_get_the_checkers_message(graded):
    _, v, _, _, _, _ = graded
    assert v["wrong.ipynb", "6.1"].startswith("wrong values"), v["wrong.ipynb", "6.1"]
    assert v["wrong.ipynb", "6.2"].startswith("raised SyntaxError"), v["wrong.ipynb", "6.2"]
    # 6.3 calls the broken 6.2: the checker reports what its function raised
    assert v["wrong.ipynb", "6.3"].startswith("raised NameError"), v["wrong.ipynb", "6.3"]


def infinite_loop_times_out_and_keeps_earlier_verdicts(graded):
    _, v, _, _, _, _ = graded
    assert v["loop.ipynb", "6.1"] == "passed"
    assert v["loop.ipynb", "6.2"].startswith("timed out")
    assert v["loop.ipynb", "6.3"].startswith("timed out")


def a_crash_that_deletes_files_spoils_only_its_own_run(graded):
    _, v, _, _, folder, _ = graded
    assert v["crash.ipynb", "6.1"] == "passed"
    assert v["crash.ipynb", "6.2"].startswith("kernel died")
    # it deleted solved.ipynb before its turn: the grader had read every submission first
    assert not (folder / "solved.ipynb").exists()
    assert v["solved.ipynb", "6.3"] == "passed"


def megabytes_of_output_are_cut_off(graded):
    _, v, _, _, _, seconds = graded
    assert all(v["chatty.ipynb", e].startswith("output limit") for e in ("6.1", "6.2", "6.3"))
    # stopped at the cap, not at the time limit (which the loop needs all of)
    assert seconds["chatty.ipynb"] < TIMEOUT_S < seconds["loop.ipynb"], seconds


def other_chapter_lecture_and_broken_files(graded):
    _, v, _, _, _, _ = graded
    assert [v["zz_other_chapter.ipynb", e] for e in ("0.1", "0.2", "0.3")] == ["not attempted"] * 3
    assert v["lecture.ipynb", "-"].startswith("not an exercise notebook")
    assert v["broken.ipynb", "-"].startswith("unreadable")


def table_totals_and_time(graded):
    _, _, stdout, elapsed, _, _ = graded
    lines = stdout.splitlines()
    assert any("solved.ipynb" in s and "total" in s and "3/3 passed" in s for s in lines), stdout
    assert any("half.ipynb" in s and "1/3 passed" in s for s in lines), stdout
    # solved 3 + half 1 + loop 1 + crash 1 = 6 of 7 notebooks x 3 exercises
    assert "total: 6 of 21 exercises passed in 9 notebooks" in stdout
    # under a minute a notebook (the bound), the loop included; 7 notebooks run
    assert elapsed < 7 * 60, elapsed


def test_grading_a_folder_of_mixed_submissions(tmp_path):
    # one test, not one per property: the grading runs once (pytest-xdist would repeat a
    # module fixture on each worker that gets a share of the tests)
    graded = grade_folder(tmp_path)
    csv_has_the_columns_and_one_row_per_exercise(graded)
    solved_and_half_solved(graded)
    wrong_answers_get_the_checkers_message(graded)
    infinite_loop_times_out_and_keeps_earlier_verdicts(graded)
    a_crash_that_deletes_files_spoils_only_its_own_run(graded)
    megabytes_of_output_are_cut_off(graded)
    other_chapter_lecture_and_broken_files(graded)
    table_totals_and_time(graded)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="timeout"):
        grade.grade([tmp_path], timeout=0)
    with pytest.raises(ValueError, match="PATH"):
        grade.grade([tmp_path / "missing"])
    with pytest.raises(ValueError, match="PATH: no notebooks"):
        grade.grade([tmp_path], root=ROOT)
    with pytest.raises(ValueError, match="root"):
        grade.grade([tmp_path], root=tmp_path)


def test_verdicts_come_from_the_checkers_log_not_printed_text(tmp_path, monkeypatch, capsys):
    import torch

    from minimodels import check

    log = tmp_path / "verdicts.jsonl"
    monkeypatch.setenv(check.GRADE_LOG, str(log))
    cases = [check.Case("x", (torch.ones(3),))]
    check.check_function("6.1", lambda x: 2 * x, cases, lambda x: 2 * x, strict=False)
    check.check_function("6.2", lambda x: x, cases, lambda x: 2 * x, strict=False)
    print("Exercise 6.3 (monarch_dense): passed 4 checks.")  # what a learner could print
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [v["passed"] for v in logged] == [True, False]
    assert "passed 4 checks" in capsys.readouterr().out  # printed, but not in the log
    ref = grade.reference(json.loads(SOLUTION.read_text()), SOLUTION.stem)
    rows = grade.grade_notebook(submission({}), ref, "x.ipynb",
                                grade.Run("finished", "", logged, []))  # fmt: skip
    assert [r.verdict.split(" on ")[0] for r in rows] == [
        "passed", "wrong values", "no verdict: its check cell was removed or not run"]  # fmt: skip
    assert [r.passed for r in rows] == [True, False, False]
