"""Every chapter notebook works in a real JupyterLab, driven by a real headless Chromium.

For each notebook: open it, clear its saved outputs, Run → Run All Cells, wait for the kernel to
be idle, then check what a learner would see: no error output, every code cell executed, every
ipywidgets widget rendered as a widget (not as its text fallback), and moving a slider changes
the output under it. A screenshot of each notebook goes to test-artifacts/browser/.

Run with `make test`, or alone: `.venv/bin/python -m pytest -m browser tests/browser -rs`.
The notebooks come from chapters/ (or $BROWSER_NOTEBOOKS_DIR); they are copied to a temp folder
first, so the committed files are never modified.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from .conftest import NOTEBOOK_TIMEOUT_S, NOTEBOOKS_DIR, record_artifact, record_note

NOTEBOOKS = sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb"))
PARAMS = NOTEBOOKS or [
    pytest.param(None, marks=pytest.mark.skip(reason=f"no *.ipynb in {NOTEBOOKS_DIR} yet"))
]

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
IDLE = re.compile(r"\| Idle$")
OPEN_TIMEOUT_MS = 60_000
WIDGET_TIMEOUT_MS = 30_000

pytestmark = pytest.mark.browser

# The notebook as JupyterLab's model holds it (nbformat JSON, with outputs), read through the
# app object the test server exposes (--LabApp.expose_app_in_browser).
JS_NOTEBOOK = "() => window.jupyterapp.shell.currentWidget.content.model.toJSON()"
JS_KERNEL_STATUS = """() => [...document.querySelectorAll('.jp-StatusBar-Item')]
    .map(e => e.innerText.trim()).find(t => / \\| [A-Za-z ]+$/.test(t)) || ''"""
JS_RUNNING = """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
    .filter(e => e.innerText.includes('*')).length"""
# Finished: no cell queued or running ([*]), the kernel idle, and every code cell executed or
# an error stopped the run (Run All skips the cells after an error).
JS_DONE = """() => {
  const st = [...document.querySelectorAll('.jp-StatusBar-Item')]
    .map(e => e.innerText.trim()).find(t => / \\| [A-Za-z ]+$/.test(t)) || '';
  if (!st.endsWith('| Idle')) return false;
  if ([...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
        .some(e => e.innerText.includes('*'))) return false;
  const cells = window.jupyterapp.shell.currentWidget.content.model.toJSON().cells
    .filter(c => c.cell_type === 'code');
  const error = cells.some(c => (c.outputs || []).some(o => o.output_type === 'error'));
  return error || cells.every(c => c.execution_count !== null);
}"""
# Every top-level output view and what it shows. The widget renderer puts a `.jupyter-widgets`
# element straight in its output node; a widget shown as its text fallback is text/plain
# ("interactive(children=(IntSlider(...").
JS_OUTPUT_VIEWS = """() => [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')]
  .filter(e => e.closest('.widget-output') === null)
  .map(e => ({
    mime: e.getAttribute('data-mime-type') || '',
    widget: e.querySelector(':scope > .jupyter-widgets') !== null,
    text: e.innerText.slice(0, 200),
  }))"""
# Tracebacks shown anywhere in the notebook, including inside ipywidgets Output widgets (an
# exception in an interact callback lands there, not in the notebook model). JupyterLab renders
# error outputs as stderr text, so the traceback header is what tells them apart.
JS_DOM_ERRORS = """() => [...document.querySelectorAll(
    '.jp-Notebook [data-mime-type="application/vnd.jupyter.stderr"]')]
  .filter(e => e.innerText.includes('Traceback (most recent call last)'))
  .map(e => e.innerText.slice(0, 400))"""
# The first slider, preferring one whose cell has an Output widget (interact's output area).
JS_PICK_SLIDER = """() => {
  const sliders = [...document.querySelectorAll('.jp-Notebook .widget-slider')];
  const good = sliders.filter(s => s.closest('.jp-Cell')?.querySelector('.widget-output'));
  const s = good[0] || sliders[0];
  if (!s) return -1;
  document.querySelectorAll('[data-browser-test]').forEach(e => e.removeAttribute('data-browser-test'));
  s.setAttribute('data-browser-test', 'slider');
  s.closest('.jp-Cell').setAttribute('data-browser-test', 'cell');
  return sliders.indexOf(s);
}"""
# What the slider's cell shows, without the slider itself: the text and images of its Output
# widgets (interact's output area) if it has any, else of the cell's other outputs.
JS_CELL_OUTPUT = """() => {
  const cell = document.querySelector('[data-browser-test="cell"]');
  let parts = [...cell.querySelectorAll('.widget-output')];
  if (!parts.length) {
    const clone = cell.querySelector('.jp-OutputArea').cloneNode(true);
    clone.querySelectorAll('.widget-slider').forEach(e => e.remove());
    parts = [clone];
  }
  return parts.map(p => p.innerText + [...p.querySelectorAll('img')].map(i => i.src).join('')
    + [...p.querySelectorAll('svg')].map(g => g.outerHTML).join('')).join('\\n');
}"""
JS_READOUT = """() => {
  const s = document.querySelector('[data-browser-test="slider"]');
  return (s.querySelector('.widget-readout') || s).innerText.trim();
}"""



def _wait_until(page, js: str, timeout_ms: float, *, polling: float, arg=None) -> bool:
    """Wait for ``js`` to be truthy; False on timeout (the caller asserts what it needs)."""
    try:
        page.wait_for_function(js, arg=arg, timeout=timeout_ms, polling=polling)
    except PlaywrightTimeout:
        return False
    return True

def _kernel_status(page) -> str:
    return page.evaluate(JS_KERNEL_STATUS)


def _wait_idle(page, what: str, timeout_ms: float) -> None:
    """Wait for the status bar to say `<kernel name> | Idle` (the toolbar's indicator can say
    idle while the kernel is still connecting, TOOLCHAIN.md)."""
    try:
        page.wait_for_function(
            f"() => ({JS_KERNEL_STATUS})().endsWith('| Idle')",
            timeout=timeout_ms,
            polling=250,
        )
    except Exception as e:  # noqa: BLE001 (a Playwright TimeoutError, reported clearly)
        pytest.fail(
            f"{what}: the kernel was not idle within {timeout_ms / 1000:.0f} s "
            f"(status bar: {_kernel_status(page)!r}): {type(e).__name__}"
        )


def _full_screenshot(page, path: Path) -> None:
    """The whole notebook, not just the viewport: grow the viewport to the notebook's height."""
    height = page.evaluate(
        """() => {
      const scroller = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer')
        || document.querySelector('.jp-NotebookPanel-notebook');
      if (!scroller) return document.body.scrollHeight;
      scroller.scrollTop = 0;
      return scroller.scrollHeight + (window.innerHeight - scroller.clientHeight);
    }"""
    )
    old = page.viewport_size
    page.set_viewport_size({"width": old["width"], "height": int(min(height + 20, 16000))})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))
    page.set_viewport_size(old)


@pytest.mark.parametrize("notebook", PARAMS)
def test_notebook_runs_in_jupyterlab(notebook, lab_server, chromium, artifacts_dir):
    t0 = time.monotonic()
    stem = Path(notebook).stem
    shot, widget_shot = artifacts_dir / f"{stem}.png", artifacts_dir / f"{stem}-widget.png"
    for old in (shot, widget_shot):
        old.unlink(missing_ok=True)
    page = chromium.new_page()
    page.set_default_timeout(OPEN_TIMEOUT_MS)
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(f"page error: {e}"))
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    try:
        # --- open the notebook and wait for its kernel ------------------------------------------
        page.goto(lab_server.page_url(notebook), wait_until="domcontentloaded")
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=OPEN_TIMEOUT_MS)
        _wait_idle(page, f"{notebook}: opening", OPEN_TIMEOUT_MS)
        open_s = time.monotonic() - t0
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
        # Saved outputs and execution counts would satisfy every check below: clear them first.
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
        page.wait_for_function(
            """() => window.jupyterapp.shell.currentWidget.content.model.toJSON().cells
                 .every(c => c.cell_type !== 'code' || c.execution_count === null)"""
        )

        # --- Run → Run All Cells, as a learner does ----------------------------------------------
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.locator(
            ".lm-Menu-content .lm-Menu-item",
            has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")),
        ).click()
        try:
            page.wait_for_function(JS_DONE, timeout=NOTEBOOK_TIMEOUT_S * 1000, polling=500)
        except Exception as e:  # noqa: BLE001
            pytest.fail(
                f"{notebook}: Run All did not finish within {NOTEBOOK_TIMEOUT_S:.0f} s "
                f"(status bar: {_kernel_status(page)!r}, cells still queued/running: "
                f"{page.evaluate(JS_RUNNING)}; set BROWSER_NOTEBOOK_TIMEOUT to allow more): "
                f"{type(e).__name__}"
            )
        run_s = time.monotonic() - t0 - open_s

        # --- no errors, every code cell executed -------------------------------------------------
        nb = page.evaluate(JS_NOTEBOOK)
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        errors = [
            f"cell {i} ({''.join(c['source'])[:60]!r}...): {o.get('ename')}: {o.get('evalue')}"
            for i, c in enumerate(nb["cells"])
            for o in c.get("outputs", [])
            if o["output_type"] == "error"
        ]
        assert not errors, f"{notebook}: error outputs in JupyterLab:\n" + "\n".join(errors)
        errors = page.evaluate(JS_DOM_ERRORS)
        assert not errors, f"{notebook}: tracebacks shown in JupyterLab:\n" + "\n".join(errors)
        not_run = [
            i for i, c in enumerate(nb["cells"]) if c in code and c["execution_count"] is None
        ]
        assert not not_run, f"{notebook}: code cells without an execution count: {not_run}"

        # --- every widget rendered as a widget ---------------------------------------------------
        n_widgets = sum(
            WIDGET_MIME in o.get("data", {}) for c in code for o in c.get("outputs", [])
        )
        js_count = f"() => ({JS_OUTPUT_VIEWS})().filter(v => v.widget).length >= {n_widgets}"
        _wait_until(page, js_count, WIDGET_TIMEOUT_MS, polling=250)  # asserted just below
        views = page.evaluate(JS_OUTPUT_VIEWS)
        rendered = [v for v in views if v["widget"]]
        fallback = [
            v for v in views
            if v["mime"] == "text/plain"
            and re.match(r"^\s*\w+\((children|value|options|description|layout)=", v["text"])
        ]  # fmt: skip
        assert len(rendered) == n_widgets and not fallback, (
            f"{notebook}: {n_widgets} widget outputs, {len(rendered)} rendered as widgets; "
            f"shown as text instead: {[v['text'][:80] for v in fallback]}. "
            "Is jupyterlab_widgets installed in the environment that runs JupyterLab?"
        )
        assert not [t for t in views if "Error displaying widget" in t["text"]], (
            f"{notebook}: a widget failed to display: "
            f"{[t['text'] for t in views if 'Error displaying widget' in t['text']]}"
        )

        # --- moving a slider changes the output under it -----------------------------------------
        idx = page.evaluate(JS_PICK_SLIDER)
        assert n_widgets > 0 and idx >= 0, (
            f"{notebook}: no slider widget to move ({n_widgets} widgets); DESIGN.md §3 wants "
            "each chapter to have at least one widget whose knob teaches something"
        )
        slider = page.locator('[data-browser-test="slider"]')
        slider.scroll_into_view_if_needed()
        before_out, before_val = page.evaluate(JS_CELL_OUTPUT), page.evaluate(JS_READOUT)
        handle = slider.locator(".noUi-handle, [role=slider], input").first
        handle.focus()
        for key in ("ArrowRight", "ArrowLeft"):  # Left if the slider starts at its maximum
            for _ in range(3):
                handle.press(key)
                page.wait_for_timeout(100)
            if page.evaluate(JS_READOUT) != before_val:
                break
        after_val = page.evaluate(JS_READOUT)
        assert after_val != before_val, (
            f"{notebook}: the arrow keys did not move the slider (readout {before_val!r})"
        )
        # the output changes (asserted below once the kernel has settled)
        _wait_until(page, f"(before) => ({JS_CELL_OUTPUT})() !== before", WIDGET_TIMEOUT_MS,
                    polling=100, arg=before_out)
        _wait_idle(page, f"{notebook}: after moving the slider", NOTEBOOK_TIMEOUT_S * 1000)
        page.wait_for_timeout(500)  # let the last output message and plot paint
        assert page.evaluate(JS_CELL_OUTPUT) != before_out, (
            f"{notebook}: moved the slider ({before_val!r} -> {after_val!r}) but the output "
            "under it did not change"
        )
        errors = page.evaluate(JS_DOM_ERRORS)
        assert not errors, f"{notebook}: traceback shown after moving the slider:\n" + "\n".join(
            errors
        )
        slider.scroll_into_view_if_needed()
        page.screenshot(path=str(widget_shot))
        record_artifact(widget_shot)
        note = (
            f"{notebook}: opened in {open_s:.1f} s, Run All {run_s:.1f} s, "
            f"total {time.monotonic() - t0:.1f} s; {len(code)} code cells, {n_widgets} widgets; "
            f"slider {before_val!r} -> {after_val!r} changed its output"
        )
        stderr = page.evaluate(
            """() => [...document.querySelectorAll(
                '.jp-Notebook [data-mime-type="application/vnd.jupyter.stderr"]')]
              .map(e => e.innerText.trim().split('\\n')[0].slice(0, 100))"""
        )
        if stderr:  # warnings are allowed, but shown (JupyterLab paints them red)
            note += f"; stderr shown (red) in {len(stderr)} outputs: {stderr[:3]}"
        record_note(note)
        print(note)
    finally:
        try:
            _full_screenshot(page, shot)
            record_artifact(shot)
            print(f"{notebook}: screenshot at {shot}")
        except Exception as e:  # noqa: BLE001 (never hide the real failure)
            print(f"{notebook}: no screenshot ({e})")
        if console_errors:
            print(f"{notebook}: browser console errors:\n  " + "\n  ".join(console_errors[:20]))
        page.close()  # no save: the notebook is a temporary copy anyway
        lab_server.shutdown_kernels()
