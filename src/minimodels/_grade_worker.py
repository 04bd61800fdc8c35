"""Run one submission for the grader (``minimodels.grade``): a process of its own, started as a
script so that it imports neither torch nor the package.

    python -P _grade_worker.py TMP TIMEOUT MAX_OUTPUT_MB

Executes ``TMP/work/submission.ipynb`` in a fresh ``python3`` kernel whose working folder is
``TMP/work``, every cell even after an error, within TIMEOUT seconds for the whole notebook
(counted from the moment the kernel is ready), stopping the kernel once its outputs pass
MAX_OUTPUT_MB. Writes the kernel's process id to
``TMP/kernel.pid`` (the grader stops its process group afterwards) and ``TMP/report.json``:
how the run ended and the first error of each cell. Outputs are not kept.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError


class OutputLimit(RuntimeError):
    pass


class GradingClient(NotebookClient):
    """nbclient with a deadline for the whole notebook and a cap on the bytes of output."""

    def __init__(self, nb, *, deadline: float, max_bytes: int, **kw):
        super().__init__(nb, **kw)
        self.deadline, self.max_bytes, self.seen, self.over = deadline, max_bytes, 0, False

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        self.seen += len(content.get("text", "")) + sum(
            len(str(v)) for v in content.get("data", {}).values()
        )
        if self.seen > self.max_bytes:
            if not self.over:
                self.over = True
                # stop the kernel (an interrupt lets a print loop flood on for seconds)
                os.killpg(self.km.provisioner.pid, signal.SIGKILL)
            return None  # dropped, as is all but errors: the grader keeps no outputs
        if msg["msg_type"] == "error":
            return super().output(outs, msg, display_id, cell_index)
        return None

    async def async_execute_cell(self, cell, cell_index, *args, **kwargs):
        if self.over:
            raise OutputLimit(f"printed more than {self.max_bytes / 1e6:g} MB")
        if time.monotonic() >= self.deadline:
            raise CellTimeoutError("the notebook's time limit passed")
        return await super().async_execute_cell(cell, cell_index, *args, **kwargs)


def main(tmp: Path, timeout: float, max_mb: float) -> None:
    work = tmp / "work"
    nb = nbformat.reads((work / "submission.ipynb").read_text(), as_version=4)

    def remaining(cell) -> int:
        return max(1, int(client.deadline - time.monotonic() + 0.999))

    def started(**_) -> None:  # the kernel is up: the time limit counts from here
        (tmp / "kernel.pid").write_text(str(client.km.provisioner.pid))
        client.deadline = time.monotonic() + timeout

    client = GradingClient(
        nb,
        deadline=time.monotonic() + timeout + 60,  # reset once the kernel has started
        max_bytes=int(max_mb * 1e6),
        kernel_name="python3",  # never the submission's own kernelspec
        allow_errors=True,
        timeout_func=remaining,
        startup_timeout=60,
        shutdown_kernel="immediate",
        resources={"metadata": {"path": str(work)}},
        on_notebook_start=started,
    )
    status, detail = "finished", ""
    try:
        client.execute()
    except CellTimeoutError:
        status, detail = "timed out", f"the notebook ran past {timeout:g} s"
    except DeadKernelError as err:
        status, detail = "kernel died", f"the kernel exited mid-cell ({err})"
    except OutputLimit as err:
        status, detail = "output limit", str(err)
    except Exception as err:  # a notebook nbclient cannot run: reported, not raised
        status, detail = "failed", f"{type(err).__name__}: {err}"
    if client.over and status != "output limit":
        status, detail = "output limit", f"printed more than {max_mb:g} MB"
    errors = []
    for i, cell in enumerate(client.nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append((i, f"{out.get('ename')}: {out.get('evalue')}"))
                break
    report = {"status": status, "detail": detail, "errors": errors}
    (tmp / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]))
