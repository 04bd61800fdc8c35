"""Fixtures for the real-browser tests: one JupyterLab server and one headless Chromium for the
session, both started here and stopped here, nothing left running.

Environment knobs:
  BROWSER_NOTEBOOKS_DIR    folder whose *.ipynb are tested (default: chapters/)
  CHROMIUM_PATH            a Chromium executable (default: `chromium` or `chromium-browser` on PATH)
  BROWSER_NOTEBOOK_TIMEOUT seconds one notebook may take to Run All (default 180: DESIGN.md
                           budgets 90 s a chapter; a loaded 2-core machine needs the margin)
  BROWSER_ARTIFACTS_DIR    where screenshots go (default: test-artifacts/browser/)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = Path(os.environ.get("BROWSER_NOTEBOOKS_DIR") or REPO / "chapters").resolve()
ARTIFACTS_DIR = Path(os.environ.get("BROWSER_ARTIFACTS_DIR") or REPO / "test-artifacts" / "browser")
NOTEBOOK_TIMEOUT_S = float(os.environ.get("BROWSER_NOTEBOOK_TIMEOUT", "180"))
SERVER_START_TIMEOUT_S = 60.0

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# JupyterLab settings for the test server: no news, no update check (both would reach out to
# the internet and pop a toast over the notebook), and every cell kept in the DOM so that the
# checks see all outputs, not only those scrolled into view.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# What the end-of-run summary lists. Tests record into the running item's user_properties,
# which travel with its reports: under pytest-xdist (`make test` runs two workers) the summary
# is printed by the controller, which sees the workers' reports, not their memory.
_skipped: list[str] = []
_artifacts: list[Path] = []
_notes: list[str] = []
_current: list = []  # the item this process is running


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current[:] = [item]  # before any fixture: a session fixture may skip loudly


def _record(kind: str, value: str) -> None:
    if _current:
        _current[0].user_properties.append((f"browser-{kind}", value))


def pytest_runtest_logreport(report):
    if report.when != "teardown":  # the last report of an item carries all it recorded
        return
    lists = {"browser-artifact": _artifacts, "browser-note": _notes, "browser-skip": _skipped}
    for key, value in report.user_properties:
        if key in lists:
            lists[key].append(Path(value) if key == "browser-artifact" else value)


def record_artifact(path: Path) -> None:
    _record("artifact", str(path))


def record_note(line: str) -> None:
    _record("note", line)


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM_PATH")
    if env:
        return env if os.access(env, os.X_OK) else shutil.which(env)
    return shutil.which("chromium") or shutil.which("chromium-browser")


def skip_loudly(reason: str) -> None:
    _record("skip", reason)
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter):
    if _notes:
        terminalreporter.write_sep("-", "notebooks in JupyterLab")
        for line in _notes:
            terminalreporter.write_line(line)
    if _artifacts:
        terminalreporter.write_sep("-", f"browser screenshots ({len(_artifacts)})")
        for path in _artifacts:
            try:
                shown = path.resolve().relative_to(Path.cwd())
            except ValueError:
                shown = path
            terminalreporter.write_line(str(shown))
    if _skipped:
        terminalreporter.write_sep("!", "BROWSER TESTS SKIPPED", red=True, bold=True)
        for reason in sorted(set(_skipped)):
            terminalreporter.write_line(reason, red=True, bold=True)


# --- a pytest-level guard: a hung browser or kernel fails the test instead of hanging CI ---------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = getattr(item, "browser_guard_s", None)
    if limit is None or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        # pytest.fail raises a BaseException: `except Exception` in the test cannot swallow it.
        pytest.fail(
            f"{item.name}: still running after {limit:.0f} s (guard in tests/browser/conftest.py); "
            "a kernel or the page hung"
        )

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("browser"):
            # Run All's own timeout + time for opening, the widget and the screenshots.
            item.browser_guard_s = NOTEBOOK_TIMEOUT_S + 90


# --- the JupyterLab server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (localhost only)
        return r.read()


def _pids_using(marker: str) -> list[int]:
    """PIDs whose command line mentions `marker` (our private temp dir): the kernels the server
    started in their own sessions, which killing the server's process group does not reach."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(d.name))
    return pids


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


class LabServer:
    def __init__(self, url: str, token: str, root: Path, notebooks: Path, log: Path):
        self.url, self.token, self.root, self.notebooks, self.log = url, token, root, notebooks, log

    def page_url(self, notebook: str) -> str:
        return self.url_for(self.notebooks / notebook)

    def url_for(self, path: Path) -> str:
        """The JupyterLab page of ``path``, a file under the server's root."""
        rel = path.relative_to(self.root).as_posix()
        return f"{self.url}lab/tree/{rel}?reset&token={self.token}"

    def fresh_copy(self, src: Path, folder: str) -> Path:
        """Copy ``src`` (a notebook outside chapters/, e.g. an exercise) to <root>/<folder>/,
        replacing an earlier copy, and return the copy's path: the page then edits and may
        autosave the copy, never the committed file."""
        dest = self.root / folder / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return dest

    def shutdown_kernels(self) -> None:
        """Stop every kernel (one notebook runs at a time), so that a hung or heavy kernel does
        not slow the next notebook down."""
        base = f"{self.url}api/kernels"
        try:
            kernels = json.loads(_get(f"{base}?token={self.token}", timeout=10))
            for k in kernels:
                req = urllib.request.Request(
                    f"{base}/{k['id']}?token={self.token}", method="DELETE"
                )
                urllib.request.urlopen(req, timeout=30).close()  # noqa: S310
        except OSError as e:
            print(f"could not shut the kernels down ({e}); they stop with the server")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"


@pytest.fixture(scope="session")
def lab_server():
    if find_chromium() is None:
        # Checked here too so that nothing starts when the browser tests will all skip.
        skip_loudly(_no_chromium_reason())
    tmp = Path(tempfile.mkdtemp(prefix="beyond-rag-browser-"))
    root = tmp / "root"
    # Work on copies: the committed notebooks are never touched (Run All + autosave would).
    notebooks = root / NOTEBOOKS_DIR.name
    shutil.copytree(NOTEBOOKS_DIR, notebooks, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = tmp / "lab-settings"
    for rel, values in LAB_SETTINGS.items():
        f = settings / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    for d in ("config", "runtime", "workspaces"):
        (tmp / d).mkdir()

    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the kernel must use the inline backend, as a learner's does
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env.update(
        NUMBA_CACHE_DIR=str(REPO / ".numba_cache"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
        JUPYTER_CONFIG_DIR=str(tmp / "config"),  # ignore the user's own Jupyter config
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),  # connection files: also how we find kernels
        PYTHONUNBUFFERED="1",
    )
    token = secrets.token_hex(16)
    log = tmp / "server.log"
    proc = None
    try:
        for _ in range(3):  # a free port can be taken between our check and the bind
            port = _free_port()
            cmd = [
                sys.executable, "-m", "jupyter", "lab",
                "--no-browser", "--allow-root",
                "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}",
                f"--LabApp.user_settings_dir={settings}",
                f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
                "--LabApp.expose_app_in_browser=True",  # window.jupyterapp, to read the model
            ]  # fmt: skip
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    _get(f"{url}api/status?token={token}")
                    break
                except OSError:
                    time.sleep(0.25)
            if proc.poll() is None:  # answering, or running but silent (reported below)
                break
        server = LabServer(url, token, root, notebooks, log)
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            _get(f"{url}api/status?token={token}")
        except OSError as e:
            pytest.fail(
                f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S:.0f} s ({e}):\n"
                + server.log_tail()
            )
        yield server
    finally:
        if proc is not None:
            _kill_group(proc)
        for pid in _pids_using(str(tmp)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def _no_chromium_reason() -> str:
    return (
        "BROWSER TESTS SKIPPED: no Chromium found (looked at $CHROMIUM_PATH, `chromium`, "
        "`chromium-browser`). Install it (`apt-get install -y chromium`) to prove the notebooks "
        "work in JupyterLab."
    )


# --- the browser -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium():
    exe = find_chromium()
    if exe is None:
        skip_loudly(_no_chromium_reason())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # launch() gives Chromium a fresh, temporary user-data dir and deletes it afterwards.
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, headless=True)
        try:
            # One context for the session, one page per notebook: JupyterLab's static files
            # (content-hashed, cacheable) then load from the browser cache after the first page.
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            yield context
        finally:
            browser.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR
