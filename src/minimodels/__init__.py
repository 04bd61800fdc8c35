"""minimodels: the small, readable long-context models of the *Beyond RAG* course.

Every hot loop is a kernel in ``minimodels.kernels`` with three backends (``ref`` PyTorch,
``cpu`` Numba, ``cuda`` numba.cuda); see ``minimodels.backend``. The kernels, one per chapter:
``linear_scan`` (00), ``attention`` (02), ``wkv`` (03), ``s4d_kernel`` (04), ``selective_scan``
and ``parallel_scan`` (05).

Shape glossary (used in every docstring and shape comment):
    b  batch          l  sequence length     d  width (channels of a layer)
    h  heads          e  head dimension      n  state size of an SSM
    c  channels (RWKV, channels-last)        r  rows = b·d, as a kernel sees them
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from minimodels.backend import BackendUnavailable, available_backends, resolve, use_backend
from minimodels.kernels.attention import attention
from minimodels.kernels.scan import linear_scan, parallel_scan
from minimodels.kernels.selective_scan import selective_scan
from minimodels.kernels.ssm_kernel import s4d_kernel
from minimodels.kernels.wkv import wkv

__all__ = [
    "BackendUnavailable",
    "attention",
    "available_backends",
    "info",
    "linear_scan",
    "parallel_scan",
    "resolve",
    "s4d_kernel",
    "selective_scan",
    "use_backend",
    "wkv",
]
__version__ = "0.1.0"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def info() -> None:
    """Print the versions this course depends on and the backends that can run here."""
    from minimodels.backend import _cuda_status

    rows = [
        ("minimodels", __version__),
        ("python", f"{sys.version.split()[0]} ({platform.machine()})"),
        ("torch", _version("torch")),
        ("numpy", _version("numpy")),
        ("numba", _version("numba")),
        ("numba-cuda", _version("numba-cuda")),
        ("backends", ", ".join(available_backends())),
        ("cuda", _cuda_status()[1]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
