"""The exercise pipeline: solutions -> exercises, and the sync check."""

import json

import pytest

from minimodels.course import ROOT, MarkerError, build_exercises, dumps, main, make_exercise


def notebook(*cells):
    return {"cells": list(cells), "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def md(text):
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def code(text, outputs=None):
    return {
        "cell_type": "code", "metadata": {}, "source": text, "execution_count": 3,
        "outputs": outputs or [{"output_type": "stream", "name": "stdout", "text": "hi"}],
    }


SOLVED = notebook(
    md("### Exercise 5.2: the step"),
    code(
        "def step(x):\n"
        "    y = 2 * x\n"
        "    ### BEGIN SOLUTION\n"
        "    y = y + 1\n"
        "    return y\n"
        "    ### END SOLUTION\n"
        "\n"
        "print('defined')\n"
    ),
    code("check(step)"),
)


def test_region_becomes_an_indented_stub_and_outputs_are_cleared():
    ex = make_exercise(SOLVED)
    src = "".join(ex["cells"][1]["source"])
    assert src == (
        "def step(x):\n"
        "    y = 2 * x\n"
        "    # TODO (Exercise 5.2): your code here\n"
        '    raise NotImplementedError("Exercise 5.2")\n'
        "\n"
        "print('defined')\n"
    )
    for cell in ex["cells"][1:]:
        assert cell["outputs"] == [] and cell["execution_count"] is None
    assert SOLVED["cells"][1]["outputs"], "the solution notebook itself is untouched"


@pytest.mark.parametrize(
    "cells, message",
    [
        ((md("Exercise 1.1"), code("### BEGIN SOLUTION\nx = 1\n")), "without ### END"),
        ((md("Exercise 1.1"), code("x = 1\n### END SOLUTION\n")), "without ### BEGIN"),
        ((md("intro"), code("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n")), "no 'Exercise N.M'"),
    ],
)
def test_bad_markers_are_errors(cells, message):
    with pytest.raises(MarkerError, match=message):
        make_exercise(notebook(*cells))


def test_build_and_check_round_trip(tmp_path, capsys):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions" / "05_x.ipynb").write_text(dumps(SOLVED))
    assert main(["exercises", "--check", "--root", str(tmp_path)]) == 1
    assert "exercises/05_x.ipynb" in capsys.readouterr().out
    assert main(["exercises", "--root", str(tmp_path)]) == 0
    assert main(["exercises", "--check", "--root", str(tmp_path)]) == 0
    built = json.loads((tmp_path / "exercises" / "05_x.ipynb").read_text())
    assert "NotImplementedError" in "".join(built["cells"][1]["source"])
    (tmp_path / "exercises" / "99_orphan.ipynb").write_text("{}")
    assert build_exercises(tmp_path, check=True) == ["exercises/99_orphan.ipynb (no solution)"]


def test_repository_exercises_are_in_sync():
    assert (ROOT / "solutions").is_dir(), "run the tests from the repository root"
    assert build_exercises(ROOT, check=True) == []
