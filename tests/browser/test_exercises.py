"""The learner's loop in a real JupyterLab: type a wrong answer, read the verdict, fix it.

For each exercise notebook (exercises/0N_*.ipynb) one exercise is played through the page, as a
learner would: open a fresh copy of the notebook, Run → Run All Above Selected Cell (the setup),
click into the exercise cell, select all and type a typical wrong answer, Shift+Enter twice (the
exercise cell, then its check cell), and read the verdict the page shows: it must name the
mistake. Then select all again, type the solution, Shift+Enter twice, and the page must say
"passed". A screenshot of each verdict goes to test-artifacts/browser/exercise-<notebook>-*.png.

The wrong answers are written out below (each is one of its checker's known mistakes, see
src/minimodels/check/chNN.py); the right answers are read from solutions/, so they cannot drift
from the solutions. The text goes in with `keyboard.insert_text` (one input event, as a paste
does): typing key by key would let CodeMirror's auto-indent and bracket closing rewrite it. The
test then checks that JupyterLab's model holds exactly that text.

Run with `make test`, or alone: `.venv/bin/python -m pytest -m browser tests/browser -rs`.
The committed notebooks are never modified: the page works on a copy in a temp folder.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from .conftest import REPO, record_artifact, record_note

EXERCISES_DIR = REPO / "exercises"
SOLUTIONS_DIR = REPO / "solutions"
OPEN_TIMEOUT_MS = 60_000
RUN_TIMEOUT_MS = 120_000  # the setup cells import torch; a loaded 2-core machine is slow

pytestmark = pytest.mark.browser


@dataclass(frozen=True)
class Attempt:
    exercise: str  # "N.k": the cell that raises NotImplementedError("Exercise N.k")
    wrong: str  # the whole cell as a learner with a typical mistake types it
    names_mistake: str  # regex (case-insensitive) the verdict of `wrong` must match


# One exercise per notebook. Each regex accepts a couple of phrasings of the checker's hint, so
# a reworded hint does not break the test while a verdict that no longer names the mistake does.
ATTEMPTS = {
    "00_welcome.ipynb": Attempt(
        "0.1",
        # h0 ignored: the scan always starts from zeros
        "def linear_scan_loop(a, b, h0):\n"
        "    h = torch.zeros_like(a[..., 0])\n"
        "    out = torch.empty_like(a)\n"
        "    for t in range(a.shape[-1]):\n"
        "        h = a[..., t] * h + b[..., t]\n"
        "        out[..., t] = h\n"
        "    return out\n",
        r"ignore h0|started from zeros",
    ),
    "01_rnns.ipynb": Attempt(
        "1.1",
        # the gate blocks unpacked as (i, f, o, g); torch stacks them as (i, f, g, o)
        "def lstm_cell(x_t, state, W_ih, W_hh, b_ih, b_hh):\n"
        "    h, c = state\n"
        "    i, f, o, g = (x_t @ W_ih.T + b_ih + h @ W_hh.T + b_hh).chunk(4, dim=-1)\n"
        "    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)\n"
        "    h = torch.sigmoid(o) * torch.tanh(c)\n"
        "    return h, c\n",
        r"gate order",
    ),
    "02_attention.ipynb": Attempt(
        "2.1",
        # the scores are not divided by sqrt(e)
        "def causal_attention(q, k, v):\n"
        "    l = q.shape[-2]\n"
        "    s = q @ k.transpose(-2, -1)\n"
        "    keep = torch.ones(l, l, dtype=torch.bool).tril()\n"
        "    s = s.masked_fill(~keep, -math.inf)\n"
        "    return torch.softmax(s, dim=-1) @ v\n",
        r"not scaled|1/sqrt\(e\)",
    ),
    "03_rwkv.ipynb": Attempt(
        "3.3",
        # token t's own weight without the bonus u
        "def wkv_weights(w, u, k):\n"
        "    l, c = k.shape\n"
        "    t = torch.arange(l)\n"
        "    dist = (t[:, None] - 1 - t[None, :]).to(k.dtype)[..., None]\n"
        "    z = -dist * w + k[None]\n"
        "    z[t, t] = k\n"
        "    z = z.masked_fill((t[:, None] < t[None, :])[..., None], -torch.inf)\n"
        "    return torch.softmax(z, dim=1)\n",
        r"lacks the bonus|u \+ k_t",
    ),
    "04_ssm_discretisation.ipynb": Attempt(
        "4.2",
        # no zero padding: the FFT's product is the circular convolution
        "def causal_fft_conv(u, K):\n"
        "    L = u.shape[-1]\n"
        "    return torch.fft.irfft(torch.fft.rfft(u) * torch.fft.rfft(K), n=L)\n",
        r"circular",
    ),
    "05_selective_scan.ipynb": Attempt(
        "5.2",
        # the two maps composed in the wrong order
        "def combine(left, right):\n"
        "    a1, b1 = left\n"
        "    a2, b2 = right\n"
        "    return a1 * a2, a1 * b2 + b1\n",
        r"right map first|first left, then right",
    ),
    "06_monarch_mixer.ipynb": Attempt(
        "6.2",
        # the transposed (inverse) permutation
        "def monarch_perm(r, l):\n"
        "    return torch.arange(r * l).reshape(l, r).T.reshape(-1)\n",
        r"inverse|transposed",
    ),
    "07_hyena.ipynb": Attempt(
        "7.1",
        # an FFT of length l: the circular convolution
        "def causal_conv_fft(u, k, D):\n"
        "    l = u.shape[-1]\n"
        "    y = torch.fft.irfft(torch.fft.rfft(u, n=l) * torch.fft.rfft(k, n=l), n=l)\n"
        "    return y + D[:, None] * u\n",
        r"circular convolution",
    ),
    "08_hourglass_diffusion.ipynb": Attempt(
        "8.2",
        # the window centred on the query, never shifted inside the image
        "def window_starts(n, kernel_size):\n"
        "    return torch.arange(n) - kernel_size // 2\n",
        r"without clamping|shifts it inside",
    ),
    "09_ring_attention.ipynb": Attempt(
        "9.3",
        # the second chunk not mirrored: rank r takes chunks r and W + r
        "def zigzag_positions(seqlen, world_size):\n"
        "    chunks = torch.arange(seqlen).reshape(2 * world_size, -1)\n"
        "    return torch.cat([chunks[:world_size], chunks[world_size:]], 1)\n",
        r"not mirrored",
    ),
    "10_long_context_arena.ipynb": Attempt(
        "10.3",
        # scaled by n_blocks: depth 1 lands one past the last sentence
        "def needle_block(depth, n_blocks):\n"
        "    return int(depth * n_blocks)\n",
        r"off by one block",
    ),
}

NOTEBOOKS = sorted(p.name for p in EXERCISES_DIR.glob("*.ipynb"))
PARAMS = NOTEBOOKS or [
    pytest.param(None, marks=pytest.mark.skip(reason=f"no *.ipynb in {EXERCISES_DIR} yet"))
]

JS_CELLS = "() => window.jupyterapp.shell.currentWidget.content.model.toJSON().cells"
JS_KERNEL_STATUS = """() => [...document.querySelectorAll('.jp-StatusBar-Item')]
    .map(e => e.innerText.trim()).find(t => / \\| [A-Za-z ]+$/.test(t)) || ''"""
# Cells i..j (model indices) have run since execution count `after`, nothing is queued or
# running, and the kernel is idle.
JS_RAN = """([i, j, after]) => {
  const st = (JS_KERNEL_STATUS)();
  if (!st.endsWith('| Idle')) return false;
  if ([...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
        .some(e => e.innerText.includes('*'))) return false;
  const cells = window.jupyterapp.shell.currentWidget.content.model.toJSON().cells;
  return cells.slice(i, j + 1).every(c => c.cell_type !== 'code'
    || (c.execution_count !== null && c.execution_count > after));
}""".replace("(JS_KERNEL_STATUS)", f"({JS_KERNEL_STATUS})")
JS_CELL_NODES = "document.querySelectorAll('.jp-Notebook .jp-Cell')"
JS_OUTPUT_TEXT = f"""(i) => {{
  const out = {JS_CELL_NODES}[i].querySelector('.jp-OutputArea');
  return out ? out.innerText.trim() : '';
}}"""
JS_SCROLL_TO = f"(i) => {JS_CELL_NODES}[i].scrollIntoView({{block: 'start'}})"


def _solution_text(notebook: str, first_line: str) -> str:
    """The solution cell that starts with ``first_line``, as a learner who solved it would
    have it: the cell with the ### BEGIN/END SOLUTION marker lines dropped."""
    nb = nbformat.read(SOLUTIONS_DIR / notebook, as_version=4)
    found = [
        c.source for c in nb.cells
        if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source
        and c.source.split("\n", 1)[0] == first_line
    ]  # fmt: skip
    assert len(found) == 1, (
        f"solutions/{notebook}: {len(found)} solution cells start with {first_line!r} (want 1)"
    )
    lines = found[0].split("\n")
    markers = ("### BEGIN SOLUTION", "### END SOLUTION")
    return "\n".join(line for line in lines if line.strip() not in markers).rstrip() + "\n"


def _wait(page, js: str, what: str, timeout_ms: float, arg=None) -> None:
    try:
        page.wait_for_function(js, arg=arg, timeout=timeout_ms, polling=250)
    except Exception as e:  # noqa: BLE001 (a Playwright TimeoutError, reported clearly)
        pytest.fail(
            f"{what}: not done within {timeout_ms / 1000:.0f} s "
            f"(status bar: {page.evaluate(JS_KERNEL_STATUS)!r}): {type(e).__name__}"
        )


def _max_count(page) -> int:
    return max((c.get("execution_count") or 0) for c in page.evaluate(JS_CELLS))


def _type_into_cell(page, index: int, text: str, what: str) -> None:
    """Click into cell ``index``'s editor, select all, insert ``text`` (as a paste does), and
    check that JupyterLab's model now holds exactly ``text`` (without a final newline, which
    would only show as an empty last line)."""
    text = text.rstrip("\n")
    editor = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".cm-content")
    editor.scroll_into_view_if_needed()
    editor.click()
    page.wait_for_selector(".jp-Notebook.jp-mod-editMode")
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(text)
    source = ""
    for _ in range(20):  # the model follows the editor within a frame or two
        source = page.evaluate(JS_CELLS)[index]["source"]
        source = "".join(source) if isinstance(source, list) else source
        if source == text:
            return
        page.wait_for_timeout(100)
    pytest.fail(f"{what}: the cell holds\n{source}\ninstead of what was typed:\n{text}")


def _run_pair(page, index: int, ex: str, what: str) -> str:
    """Shift+Enter twice from the exercise cell (in edit mode): the exercise cell, then its
    check cell. Returns the verdict the check cell shows."""
    before = _max_count(page)
    page.keyboard.press("Shift+Enter")
    page.keyboard.press("Shift+Enter")
    _wait(page, JS_RAN, f"{what}: running the exercise and check cells", RUN_TIMEOUT_MS,
          arg=[index, index + 1, before])  # fmt: skip
    # The verdict is a stream output; wait for it to be painted.
    _wait(page, f"(i) => ({JS_OUTPUT_TEXT})(i).includes('Exercise {ex}')",
          f"{what}: the check cell's verdict", 10_000, arg=index + 1)  # fmt: skip
    cells = page.evaluate(JS_CELLS)
    errors = [
        f"{o.get('ename')}: {o.get('evalue')}"
        for o in cells[index].get("outputs", [])
        if o["output_type"] == "error"
    ]
    assert not errors, f"{what}: the exercise cell raised {errors}"
    return page.evaluate(JS_OUTPUT_TEXT, index + 1)


def _shot(page, index: int, path: Path) -> None:
    page.evaluate(JS_SCROLL_TO, index)
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    record_artifact(path)


@pytest.mark.parametrize("notebook", PARAMS)
def test_exercise_verdicts_in_jupyterlab(notebook, lab_server, chromium, artifacts_dir):
    assert notebook in ATTEMPTS, (
        f"exercises/{notebook} has no entry in ATTEMPTS (tests/browser/test_exercises.py): "
        "add one exercise's typical wrong answer and the hint its checker gives"
    )
    attempt = ATTEMPTS[notebook]
    ex = attempt.exercise
    t0 = time.monotonic()
    stem = Path(notebook).stem
    shots = {k: artifacts_dir / f"exercise-{stem}-{k}.png" for k in ("wrong", "passed", "failed")}
    for old in shots.values():
        old.unlink(missing_ok=True)

    # The exercise cell and its check cell, from the committed notebook.
    cells = nbformat.read(EXERCISES_DIR / notebook, as_version=4).cells
    marker = f'raise NotImplementedError("Exercise {ex}")'
    found = [i for i, c in enumerate(cells) if c.cell_type == "code" and marker in c.source]
    assert len(found) == 1, f"exercises/{notebook}: {len(found)} cells contain {marker!r}"
    index = found[0]
    assert index + 1 < len(cells) and "check." in cells[index + 1].source, (
        f"exercises/{notebook}: the cell after Exercise {ex} is not its check cell"
    )
    first_line = cells[index].source.split("\n", 1)[0]
    right = _solution_text(notebook, first_line)
    assert attempt.wrong.split("\n", 1)[0] == first_line, (
        f"{notebook}: the wrong answer must define the same function as the exercise cell "
        f"({first_line!r})"
    )

    copy = lab_server.fresh_copy(EXERCISES_DIR / notebook, "exercises")
    page = chromium.new_page()
    page.set_default_timeout(OPEN_TIMEOUT_MS)
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(f"page error: {e}"))
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    done = False
    try:
        # --- open the notebook, run the setup above the exercise ---------------------------------
        page.goto(lab_server.url_for(copy), wait_until="domcontentloaded")
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=OPEN_TIMEOUT_MS)
        _wait(page, f"() => ({JS_KERNEL_STATUS})().endsWith('| Idle')",
              f"{notebook}: opening", OPEN_TIMEOUT_MS)  # fmt: skip
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
        n_dom = page.evaluate(f"() => {JS_CELL_NODES}.length")
        assert n_dom == len(cells), f"{notebook}: {n_dom} cells on the page, {len(cells)} in file"
        open_s = time.monotonic() - t0

        # select the exercise cell (its prompt: a click there selects without editing)
        page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt").click()
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.locator(
            ".lm-Menu-content .lm-Menu-item",
            has=page.locator(
                ".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Above Selected Cell$")
            ),
        ).click()
        _wait(page, JS_RAN, f"{notebook}: Run All Above Selected Cell", RUN_TIMEOUT_MS,
              arg=[0, index - 1, 0])  # fmt: skip
        setup_s = time.monotonic() - t0 - open_s

        # --- a typical wrong answer: the verdict names the mistake ----------------------------
        _type_into_cell(page, index, attempt.wrong, f"{notebook}: the wrong answer")
        verdict = _run_pair(page, index, ex, f"{notebook}: the wrong answer")
        _shot(page, index, shots["wrong"])
        assert "passed" not in verdict, f"{notebook}: a wrong answer passed: {verdict}"
        assert re.search(attempt.names_mistake, verdict, re.IGNORECASE), (
            f"{notebook}: the verdict on the wrong answer does not name the mistake "
            f"(/{attempt.names_mistake}/):\n{verdict}"
        )
        wrong_verdict = verdict

        # --- the solution: passed --------------------------------------------------------------
        _type_into_cell(page, index, right, f"{notebook}: the solution")
        verdict = _run_pair(page, index, ex, f"{notebook}: the solution")
        _shot(page, index, shots["passed"])
        assert re.search(rf"Exercise {re.escape(ex)}\b.*\bpassed\b", verdict), (
            f"{notebook}: the solution from solutions/ did not pass in JupyterLab:\n{verdict}"
        )
        done = True
        hint = wrong_verdict.split("Hint: ", 1)[-1]
        note = (
            f"{notebook}: Exercise {ex}: opened {open_s:.1f} s, setup {setup_s:.1f} s, "
            f"total {time.monotonic() - t0:.1f} s; wrong -> {hint[:90]!r}; "
            f"solution -> {verdict[:60]!r}"
        )
        record_note(note)
        print(note)
    finally:
        if not done:
            try:
                _shot(page, index, shots["failed"])
                print(f"{notebook}: screenshot at {shots['failed']}")
            except Exception as e:  # noqa: BLE001 (never hide the real failure)
                print(f"{notebook}: no screenshot ({e})")
        if console_errors:
            print(f"{notebook}: browser console errors:\n  " + "\n  ".join(console_errors[:20]))
        page.close()  # no save: the notebook is a temporary copy anyway
        lab_server.shutdown_kernels()
