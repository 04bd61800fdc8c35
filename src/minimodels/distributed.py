"""Run a function on several processes joined by ``torch.distributed``, from a notebook.

Reference: the PyTorch documentation, "Distributed communication package" (init_process_group,
point-to-point communication, timeouts). DESIGN §7: every collective has a timeout, every rank
checks its inputs and fails clearly, and the launcher kills its processes by their ids.

    results = launch(fn, world_size=4, args=(x,))   # [fn(0, 4, x), fn(1, 4, x), ...]

``fn`` must be importable (a function defined in a module of the package, not in a notebook:
``spawn`` pickles it by name). Each rank runs with one torch thread and one Numba thread (4
ranks on a 2-core laptop would otherwise fight over the cores), inside an initialised default
process group whose operations time out after ``timeout`` seconds. World size 1 runs the same
path (one process, a group of one).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_lib
import socket
import time
import traceback
from collections.abc import Callable, Sequence

__all__ = ["RankFailed", "free_port", "launch"]

BACKENDS = ("gloo", "nccl")


class RankFailed(RuntimeError):
    """A rank raised something other than ValueError/TypeError, died, or timed out; the message
    names the rank and carries its traceback."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (chosen by the OS at run time)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, timeout: float,
               fn: Callable, args: tuple, results) -> None:
    """A child process: join the group, run ``fn(rank, world_size, *args)``, report back the
    pickled result or the error (its type, message and traceback), leave the group."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except Exception as err:  # reported to the parent, which raises it there: never hidden
        results.put((rank, False, (type(err).__name__, str(err), traceback.format_exc())))


def launch(fn: Callable, world_size: int, backend: str = "gloo", *, args: Sequence = (),
           timeout: float = 60.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes (``spawn``) joined by a
    ``torch.distributed`` group over ``backend`` (``"gloo"`` on the CPU, ``"nccl"`` with one GPU
    per rank), and return the list of results by rank.

    A ValueError or TypeError raised on any rank is raised here with the same type, prefixed by
    the rank; any other failure, a rank that dies, or no result within ``2 · timeout + 30``
    seconds raises ``RankFailed``. Whatever happens, every process still alive is killed by its
    id and joined before this returns."""
    import multiprocessing as mp

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", "") or \
            getattr(fn, "__module__", "__main__") == "__main__":
        raise ValueError("fn must be a function importable by name from a module (the child "
                         "processes import it): define it in a package module, not in a "
                         "notebook or inside another function")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = []
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    try:
        os.environ.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")  # the children's env
        for rank in range(world_size):
            p = ctx.Process(target=_rank_main, name=f"minimodels-rank{rank}", daemon=True,
                            args=(rank, world_size, port, backend, timeout, fn, tuple(args),
                                  results))
            p.start()
            procs.append(p)
        for key, value in saved.items():  # the parent's env as it was
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        saved = {}
        return _collect(procs, results, 2 * timeout + 30)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for p in procs:  # by id, never by name
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        results.close()


def _collect(procs, results, deadline_s: float) -> list:
    """The results by rank, or the clearest error: a ValueError/TypeError of the lowest rank
    that raised one (bad input is reported on every rank), else ``RankFailed``."""
    world_size = len(procs)
    got, errors = {}, {}
    deadline = time.monotonic() + deadline_s
    while len(got) + len(errors) < world_size:
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue_lib.Empty:
            dead = [r for r, p in enumerate(procs) if r not in got and r not in errors
                    and not p.is_alive() and p.exitcode not in (0, None)]
            if dead and results.empty():
                r = dead[0]
                raise RankFailed(f"rank {r} died with exit code {procs[r].exitcode} before "
                                 "reporting a result") from None
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if r not in got and r not in errors]
                raise RankFailed(f"ranks {missing} sent no result within {deadline_s:.0f} s") \
                    from None
            continue
        if ok:
            got[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
    if errors:
        for kind in ("ValueError", "TypeError"):
            for rank in sorted(errors):
                name, message, _ = errors[rank]
                if name == kind:
                    raise {"ValueError": ValueError, "TypeError": TypeError}[kind](
                        f"rank {rank}: {message}")
        rank = min(errors)
        name, message, tb = errors[rank]
        raise RankFailed(f"rank {rank} raised {name}: {message}\n{tb}")
    return [got[r] for r in range(world_size)]
