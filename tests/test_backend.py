import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from numba import cuda

import minimodels
from minimodels.backend import (
    BackendUnavailable,
    available_backends,
    cuda_simulated,
    dispatch,
    resolve,
)

IMPLS = {"ref": lambda x: ("ref", x), "cpu": lambda x: ("cpu", x), "cuda": lambda x: ("cuda", x)}


def test_ref_and_cpu_always_available():
    assert available_backends()[:2] == ["ref", "cpu"]


def test_simulator_makes_cuda_available():
    if not cuda_simulated():
        pytest.skip("runs under NUMBA_ENABLE_CUDASIM=1 (as make test does)")
    assert "cuda" in available_backends()


def test_resolve_explicit_env_and_device(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("MINIMODELS_BACKEND", raising=False)
    assert resolve(None, x) == "cpu"
    assert resolve("ref", x) == "ref"
    monkeypatch.setenv("MINIMODELS_BACKEND", "ref")
    assert resolve(None, x) == "ref"
    assert resolve("cpu", x) == "cpu"  # the argument wins over the environment


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(BackendUnavailable, match="'gpu' is not a backend: expected one of ref"):
        resolve("gpu")
    monkeypatch.setenv("MINIMODELS_BACKEND", "numpy")
    with pytest.raises(BackendUnavailable, match="MINIMODELS_BACKEND='numpy'"):
        resolve(None, torch.zeros(1))


def test_cuda_without_gpu_raises_with_reason():
    """In a fresh process without the simulator, on a machine with no GPU."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = (
        "import torch, minimodels as mm\n"
        "assert mm.available_backends() == ['ref', 'cpu']\n"
        "try:\n"
        "    mm.linear_scan(torch.ones(1, 1, 2), torch.ones(1, 1, 2), backend='cuda')\n"
        "except mm.BackendUnavailable as e:\n"
        "    print('raised:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "raised: backend 'cuda' is unavailable: torch sees no CUDA GPU" in out.stdout


def test_dispatch_calls_the_chosen_impl_and_callables():
    x = torch.ones(3)
    assert dispatch(IMPLS, x, backend="ref")[0] == "ref"
    assert dispatch(IMPLS, x)[0] == "cpu"
    assert dispatch(IMPLS, x, backend=lambda x: ("mine", x))[0] == "mine"


def test_dispatch_rejects_mixed_devices():
    meta = torch.empty(2, device="meta")
    with pytest.raises(ValueError, match="one device"):
        dispatch({"cpu": lambda a, b: None}, torch.ones(2), meta, backend="cpu")
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors"):
        dispatch({"cpu": lambda a: None}, meta, backend="cpu")


def test_info_prints_versions_and_backends(capsys):
    minimodels.info()
    out = capsys.readouterr().out
    for key in ("python", "torch", "numpy", "numba", "numba-cuda", "backends"):
        assert any(line.startswith(key + " ") for line in out.splitlines()), key
    assert torch.__version__ in out
    assert ", ".join(available_backends()) in out



def test_simulator_gives_every_thread_of_a_block_the_same_shared_array(monkeypatch):
    """Regression test for the simulator race fixed by backend._simulator_shared_arrays_locked.
    A slow np.empty holds the window between the simulator's lookup of a shared array and its
    insertion open: unfixed, each thread of the block then gets an array of its own and the
    sums below are garbage; fixed, all 16 threads see every index."""
    from minimodels.backend import cuda_stream

    if not cuda_simulated():
        pytest.skip("a simulator test (NUMBA_ENABLE_CUDASIM=1)")

    @cuda.jit
    def gather(out):
        s = cuda.shared.array(16, np.int64)
        i = cuda.threadIdx.x
        s[i] = i
        cuda.syncthreads()
        total = 0
        for j in range(16):
            total += s[j]
        out[i] = total

    stream = cuda_stream()  # applies the fix
    empty = np.empty

    def slow_empty(*args, **kwargs):
        time.sleep(0.002)
        return empty(*args, **kwargs)

    out = np.zeros(16, np.int64)
    monkeypatch.setattr(np, "empty", slow_empty)
    gather[1, 16, stream](out)
    monkeypatch.undo()
    assert (out == 16 * 15 // 2).all()


@pytest.mark.cuda
def test_launch_packs_arguments_as_numba_does():
    """backend.launch: the first call goes through Numba, later calls with the same argument
    kinds through the fast packer (on a GPU). Both must give the same results, for arrays of
    several ranks (one a view with a size-1 axis), float, integer and boolean scalars."""
    from minimodels.backend import _LAUNCHERS, _Launcher, launch

    if "cuda" not in available_backends():
        pytest.skip("needs the cuda backend")

    @cuda.jit
    def affine(x, w, out, scale, shift, flip):
        # x: (n, m); w: (m, 1); out: (n, m): out = scale · x · w + shift, negated if flip
        i, j = cuda.grid(2)
        if i < x.shape[0] and j < x.shape[1]:
            y = scale * x[i, j] * w[j, 0] + shift
            out[i, j] = -y if flip else y

    dev = torch.device("cpu" if cuda_simulated() else "cuda")
    g = torch.Generator().manual_seed(0)
    for n, m in [(1, 1), (37, 5), (3, 70)]:
        x = torch.randn(n, m, generator=g, dtype=torch.float64).to(dev)
        w = torch.randn(m, generator=g, dtype=torch.float64).to(dev)[:, None]
        for call, flip in enumerate((False, True, False)):
            out = torch.full_like(x, float("nan"))
            launch(affine, (-(-n // 8), -(-m // 8)), (8, 8), x, w, out, 0.5, 3, flip)
            want = 0.5 * x * w[:, 0] + 3
            torch.testing.assert_close(out, -want if flip else want)  # (the GPU may fuse to FMA)
            if not cuda_simulated() and call > 0:  # the packing agreed: the fast path ran
                entries = [v for key, v in _LAUNCHERS.items() if key[0] is affine]
                assert entries and all(isinstance(v, _Launcher) for v in entries)


class _FakeOverload:
    """Stands in for a compiled numba.cuda kernel: scalar arguments only, packed by
    ``prepare`` (Numba's rules, or a changed version of them)."""

    def __init__(self, argument_types, prepare):
        self.argument_types = argument_types
        self._codelibrary = SimpleNamespace(get_cufunc=lambda: SimpleNamespace(kernel=None))
        self._prepare_args = prepare


def test_launcher_is_kept_only_when_its_packing_equals_numbas():
    """_Launcher.checked compares its packing with the overload's own ``_prepare_args`` on the
    first call: equal gives a launcher; different (a numba-cuda that packs otherwise) gives
    None and a warning, so launches stay on Numba's own path instead of passing garbage."""
    import ctypes

    from numba import types

    from minimodels.backend import _Launcher

    argtypes = (types.float32, types.int64, types.boolean)
    args = (0.5, 3, True)

    def numba_rules(ty, value, stream, retr, params):
        params.append({types.float32: ctypes.c_float, types.int64: ctypes.c_int64}.get(
            ty, lambda v: v)(value))

    def changed(ty, value, stream, retr, params):
        params.append(ctypes.c_double(value) if ty == types.float32 else value)

    assert isinstance(_Launcher.checked(_FakeOverload(argtypes, numba_rules), args, args, 0),
                      _Launcher)
    with pytest.warns(RuntimeWarning, match="own path"):
        assert _Launcher.checked(_FakeOverload(argtypes, changed), args, args, 0) is None


def test_unused_strides_do_not_switch_the_fast_path_off():
    """Numba packs strides the kernel never reads by its own rule: a C-layout array is addressed
    from its shape alone (seen on the H200: a (1, 5, 1) float64 C array packed with 40 bytes for
    axis 1, where C order gives 8), and an 'A'-layout array is indexed at 0 along a size-1 axis.
    The first-call comparison ignores those strides, so a launcher is kept for such a shape
    class; a stride that differs on an axis an 'A' array really uses still rejects it."""
    from numba import types

    from minimodels.backend import _Launcher

    t = torch.zeros(1, 5, 2)

    def numba_rules(strides):
        def prepare(ty, value, stream, retr, params):
            params += [0, 0, value.numel(), 4, value.data_ptr(), *value.shape, *strides]
        return prepare

    def checked(layout, strides):
        argtypes = (types.Array(types.float32, 3, layout),)
        return _Launcher.checked(_FakeOverload(argtypes, numba_rules(strides)), (t,), (t,), 0)

    assert isinstance(checked("C", (4, 40, 4)), _Launcher)  # C: strides never read
    assert isinstance(checked("A", (999, 8, 4)), _Launcher)  # A: size-1 axis never read
    with pytest.warns(RuntimeWarning, match=r"argument 0 .*ours .*Numba's"):
        assert checked("A", (40, 4, 4)) is None  # A: a used axis differs


def test_scalar_packing_equals_numbas_prepare_args():
    """Our packers against the real ``_Kernel._prepare_args`` of the installed numba-cuda, for
    scalars (arrays need a GPU: test_launch_packs_arguments_as_numba_does). Run without the
    simulator, which replaces numba.cuda's dispatcher."""
    code = """
import ctypes
from types import SimpleNamespace
from numba import types
from numba.cuda.dispatcher import _Kernel
from minimodels.backend import _Launcher, _comparable
argtypes = (types.float32, types.float64, types.int64, types.int32, types.boolean)
args = (0.1, 0.1, -3, 7, False)
theirs = []
for ty, v in zip(argtypes, args):
    _Kernel._prepare_args(SimpleNamespace(extensions=[]), ty, v, 0, [], theirs)
fake = SimpleNamespace(argument_types=argtypes, _codelibrary=SimpleNamespace(
    get_cufunc=lambda: SimpleNamespace(kernel=None)))
ours = _Launcher(fake).pack(args)
assert [_comparable(x) for x in ours] == [_comparable(x) for x in theirs], (ours, theirs)
print("same")
"""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "same", out.stderr[-2000:]
