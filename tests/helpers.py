"""Helpers shared by the tests. `make test` runs the unit tests with NUMBA_ENABLE_CUDASIM=1, so
the ``cuda`` backend runs every CUDA kernel in Numba's simulator; on a GPU machine run
``pytest -m cuda`` without it to run them for real."""

import pytest
import torch

from minimodels.backend import _cuda_status, available_backends, cuda_simulated

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif("cuda" not in available_backends(), reason=_cuda_status()[1]),
    ],
)
KERNELS = ["cpu", CUDA]  # the fast paths, each checked against ref
ALL = ["ref", "cpu", CUDA]


def device_for(backend: str) -> torch.device:
    """Where a backend's inputs live: CUDA tensors for a real GPU, CPU otherwise."""
    return torch.device("cuda" if backend == "cuda" and not cuda_simulated() else "cpu")


def run_steps(layer, x):
    """Run a sequence layer's recurrent mode over x (b, l, d): ``step`` token by token from
    ``state=None`` -> (y (b, l, d), final state), to compare with ``forward`` (DESIGN §2.2)."""
    state, ys = None, []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


class ScaleMixer(torch.nn.Module):
    """A stateless mixer with d parameters, y = w ⊙ x: keeps hand counts of parameters short."""

    def __init__(self, d):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        return self.w * x

    def step(self, x_t, state=None):
        return self.w * x_t, state
