"""Backends: which implementation of a kernel runs, and the bridges between torch and Numba.

Every kernel module ends with ``IMPLS = {"ref": op_ref, "cpu": op_cpu, "cuda": op_cuda}`` and
its public entry calls ``dispatch(IMPLS, *tensors, backend=backend)``. This module decides which
of the three runs (``resolve``) and refuses, with the reason, when it cannot
(``BackendUnavailable``). It never falls back silently to another backend.

- ``ref``  the PyTorch reference: the definition, differentiable by autograd, any device.
- ``cpu``  a Numba ``njit(parallel=True)`` kernel over NumPy views of CPU tensors.
- ``cuda`` a ``numba.cuda`` kernel over CUDA tensors, launched on torch's current stream; with
  ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported) the same kernel runs in Numba's
  CUDA simulator on CPU tensors, which is how CI tests every GPU kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "cuda_available",
    "cuda_simulated",
    "cuda_stream",
    "dispatch",
    "expect_tensor",
    "resolve",
    "to_numba",
    "use_backend",
]

BACKENDS = ("ref", "cpu", "cuda")
ENV_VAR = "MINIMODELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# What this machine can run
# ---------------------------------------------------------------------------------------------


def cuda_simulated() -> bool:
    """True when Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@functools.cache
def _cuda_status() -> tuple[bool, str]:
    """(available, reason) for the ``cuda`` backend, computed once per process."""
    try:
        from numba import cuda
    except Exception as err:  # numba-cuda missing or broken: say so, do not hide it
        return False, f"numba.cuda could not be imported ({type(err).__name__}: {err})"
    if cuda_simulated():
        return True, "Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), running on the CPU"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA GPU on this machine"
    if not cuda.is_available():
        return False, "numba.cuda finds no usable CUDA driver or GPU"
    return True, f"GPU {torch.cuda.get_device_name()}"


def cuda_available() -> bool:
    """True when the ``cuda`` backend can run: a real GPU, or the simulator."""
    return _cuda_status()[0]


def available_backends() -> list[str]:
    """Backends that can run on this machine: always ``ref`` and ``cpu``; ``cuda`` when a GPU
    (or the CUDA simulator) is there."""
    return ["ref", "cpu"] + (["cuda"] if cuda_available() else [])


# ---------------------------------------------------------------------------------------------
# Choosing and calling an implementation
# ---------------------------------------------------------------------------------------------


_CONTEXT: contextvars.ContextVar[str | Callable | None] = contextvars.ContextVar(
    "minimodels_backend", default=None)


@contextlib.contextmanager
def use_backend(backend: str | Callable | None) -> Iterator[None]:
    """Within ``with use_backend("cpu"): ...`` every kernel call without an explicit
    ``backend=`` uses ``backend`` (a name of ``BACKENDS`` or a callable). Contexts nest; the
    innermost wins; ``None`` restores the default choice. The name is checked on entry."""
    if backend is not None and not callable(backend):
        resolve(backend)  # an unknown or unavailable backend fails here, not at the first call
    token = _CONTEXT.set(backend)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def resolve(backend: str | Callable | None = None, *tensors: torch.Tensor | None) -> str | Callable:
    """The backend to use: the explicit argument; else the innermost ``with use_backend(...)``;
    else ``$MINIMODELS_BACKEND``; else ``cuda`` when the tensors live on a GPU and ``cpu``
    otherwise. A callable is returned as it is (an exercise plugs the learner's function in
    that way). Raises ``BackendUnavailable``."""
    source = "backend"
    if backend is None:
        backend, source = _CONTEXT.get(), "use_backend"
    if callable(backend):
        return backend
    if backend is None:
        backend, source = os.environ.get(ENV_VAR) or None, ENV_VAR
    if backend is None:
        on_gpu = any(t is not None and t.is_cuda for t in tensors)
        return "cuda" if on_gpu else "cpu"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise BackendUnavailable(
            f"{source}={backend!r} is not a backend: expected one of {', '.join(BACKENDS)} "
            "or a callable"
        )
    if backend == "cuda" and not cuda_available():
        raise BackendUnavailable(f"backend 'cuda' is unavailable: {_cuda_status()[1]}")
    return backend


def _check_devices(name: str, tensors: tuple) -> None:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    if name == "cuda":
        if cuda_simulated() and device.type != "cpu":
            raise ValueError(f"the CUDA simulator runs on CPU tensors, got tensors on {device}")
        if not cuda_simulated() and device.type != "cuda":
            raise ValueError(
                f"backend 'cuda' needs CUDA tensors, got tensors on {device}: move them with "
                ".cuda(), or pass backend='cpu'"
            )


def dispatch(impls: Mapping[str, Callable], *args, backend=None, **kwargs):
    """Call ``impls[resolve(backend, *tensor args)](*args, **kwargs)``.

    A callable ``backend`` is called with the same arguments instead."""
    choice = resolve(backend, *(a for a in args if isinstance(a, torch.Tensor)))
    if callable(choice):
        return choice(*args, **kwargs)
    _check_devices(choice, args)
    return impls[choice](*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Input checks shared by every kernel's public entry
# ---------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float64)


def expect_tensor(
    name: str,
    x,
    dims: str,
    *,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Check that ``x`` is a tensor with ``len(dims.split(','))`` dimensions, one of ``dtypes``
    and, when given, exactly ``shape``. ``dims`` names the axes for the message, e.g.
    ``"batch, d, l"``. Raises ``TypeError``/``ValueError`` naming the argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({dims}), got {type(x).__name__}")
    if x.dtype not in dtypes:
        wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {wanted}, got {str(x.dtype).removeprefix('torch.')}")
    ndim = len(dims.split(","))
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions ({dims}), got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape ({dims}) = {tuple(shape)}, got {tuple(x.shape)}")
    return x


# ---------------------------------------------------------------------------------------------
# torch <-> Numba bridges (used only inside kernel wrappers)
# ---------------------------------------------------------------------------------------------


class CudaArray:
    """A CUDA tensor as Numba should see it: the CUDA Array Interface (version 3) and nothing
    else. Numba takes a torch tensor through DLPack, which makes a stream handshake for every
    argument of every launch; this view has no ``__dlpack__`` and no ``stream`` key (the kernels
    run on torch's current stream, so there is nothing to wait for), and it holds the tensor so
    the memory lives as long as the view."""

    __slots__ = ("__cuda_array_interface__", "tensor")

    def __init__(self, t: torch.Tensor):
        self.tensor = t
        size = t.element_size()
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            # None = C-contiguous: Numba then types the array as C-ordered, and the kernel's
            # index arithmetic knows the innermost stride (measured: 'A'-typed arrays cost
            # integer instructions in every access)
            "strides": None if t.is_contiguous() else tuple(s * size for s in t.stride()),
            "typestr": _typestr(t.dtype),
            "data": (t.data_ptr(), False),
            "version": 3,
        }


@functools.cache
def _typestr(dtype: torch.dtype) -> str:
    return np.dtype(str(dtype).removeprefix("torch.")).str


def to_numba(x: torch.Tensor):
    """A view of ``x`` that a Numba kernel accepts, sharing memory (writes go through).

    CPU tensors (and every tensor under the CUDA simulator) become NumPy arrays; CUDA tensors
    become a ``CudaArray``."""
    return CudaArray(x.detach()) if x.is_cuda else x.detach().numpy()


@functools.cache
def _external_stream(pointer: int):
    from numba import cuda

    return cuda.external_stream(pointer)


def cuda_stream():
    """torch's current CUDA stream as a Numba stream, so kernels order with torch's work.
    The wrapper is made once per stream (making one costs ~70 us). Under the simulator there
    is no stream: returns 0 (the default stream), after making its shared arrays thread-safe
    (``_simulator_shared_arrays_locked``); every kernel launch of the package goes through
    here."""
    if cuda_simulated():
        _simulator_shared_arrays_locked()
        return 0
    return _external_stream(torch.cuda.current_stream().cuda_stream)


def launch(kernel, grid, block, *args, shared_bytes: int = 0, cluster: int = 1) -> None:
    """Run the numba.cuda ``kernel`` on ``grid`` blocks × ``block`` threads on torch's current
    stream, with ``shared_bytes`` of dynamic shared memory (past 48 KB the kernel opts in,
    ``_allow_shared``) and, on a GPU, in thread-block clusters of ``cluster`` blocks (sm_90;
    ``grid`` a multiple of it); ``args`` are torch tensors and scalars, in the kernel's order.

    Numba's own launch path re-derives every argument's type and builds a device-array object
    per tensor at each call: ~40 us per array argument on the H200's host, as long as a small
    kernel itself. So the first call with a given set of argument kinds (on a given device)
    goes through Numba, which compiles, and later calls with the same kinds reuse the compiled
    kernel and pack the arguments straight from the tensors (``_Launcher``). The packing is
    checked against Numba's own on that first call; where they differ (a Numba version that
    packs differently) or cannot be compared, Numba's path is kept, with a warning.
    Non-contiguous tensors, and the simulator, always take Numba's path. Numba cannot launch
    clusters nor opt in past 48 KB: such launches always take ours, and are an error where it
    cannot."""
    if cluster != 1 and (cuda_simulated() or not isinstance(grid, int) or grid % cluster):
        raise ValueError(f"cluster must be 1 in the simulator, and divide a 1-D grid ({grid}) on "
                         f"a GPU, got {cluster}")
    stream = cuda_stream()
    key = fast = None  # the simulator: Numba's path, nothing to remember
    if not cuda_simulated():
        key = (kernel, torch.cuda.current_device(),
               tuple((a.dtype, a.dim(), a.is_contiguous()) if isinstance(a, torch.Tensor)
                     else type(a) for a in args))
        fast = _LAUNCHERS.get(key, _UNSEEN)
    if fast not in (None, _UNSEEN):
        fast(grid, block, stream, args, shared_bytes, cluster)
        return
    converted = [to_numba(a) if isinstance(a, torch.Tensor) else a for a in args]
    if cluster != 1 or (shared_bytes > _STATIC_SHARED_BYTES and not cuda_simulated()):
        # Numba's path can neither launch clusters nor opt in past 48 KB: compile, then ours
        overload = kernel.compile(tuple(kernel.typeof_pyval(a) for a in converted))
        fast = _Launcher.checked(overload, args, converted, stream)
        if fast is None:
            raise RuntimeError("backend.launch: a launch in clusters or past 48 KB of shared "
                               "memory needs the arguments packed as this numba-cuda packs "
                               "them, and they differ (warning above)")
        _LAUNCHERS[key] = fast
        fast(grid, block, stream, args, shared_bytes, cluster)
        return
    kernel[grid, block, stream, shared_bytes](*converted)
    if fast is _UNSEEN and all(c[2] for c in key[2] if isinstance(c, tuple)):
        argtypes = tuple(kernel.typeof_pyval(a) for a in converted)
        _LAUNCHERS[key] = _Launcher.checked(kernel.overloads[argtypes], args, converted, stream)


_LAUNCHERS: dict = {}  # (kernel, device, argument kinds) -> _Launcher, or None: Numba's path
_UNSEEN = object()
_STATIC_SHARED_BYTES = 48 * 1024  # what a block gets without opting in
_SHARED_ALLOWED: dict = {}  # compiled kernel (CUDA function) -> dynamic shared bytes allowed


def _allow_shared(cufunc, shared_bytes: int) -> None:
    """Let the compiled kernel ``cufunc`` take ``shared_bytes`` of dynamic shared memory: past
    48 KB a kernel must opt in (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), up to the
    device's MAX_SHARED_MEMORY_PER_BLOCK_OPTIN less its static shared memory."""
    if shared_bytes <= max(_STATIC_SHARED_BYTES, _SHARED_ALLOWED.get(cufunc, 0)):
        return
    from numba import cuda
    from numba.cuda.cudadrv.driver import binding, driver

    limit = cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    if shared_bytes > limit:
        raise ValueError(f"shared_bytes must be at most this GPU's {limit} bytes a block, "
                         f"got {shared_bytes}")
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, shared_bytes, cufunc.handle, cufunc.device.id)
    _SHARED_ALLOWED[cufunc] = shared_bytes


@functools.cache
def _allow_large_clusters(cufunc) -> None:
    """Let the compiled kernel ``cufunc`` run in clusters of more than 8 blocks (up to 16 on an
    H100: CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED)."""
    from numba.cuda.cudadrv.driver import binding, driver

    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
    driver.cuKernelSetAttribute(attr, 1, cufunc.handle, cufunc.device.id)


class _Launcher:
    """One compiled overload of a kernel, launched with arguments packed as Numba packs them
    (``_Kernel._prepare_args`` of numba-cuda 0.30): an array is (meminfo, parent, size,
    itemsize, data pointer, *shape, *strides in bytes), a float a C float or double, an integer
    a C integer of its type, a boolean itself."""

    def __init__(self, overload):
        from numba import types

        self.cufunc = overload._codelibrary.get_cufunc()
        self.kernel = self.cufunc.kernel
        self.packers = []
        for ty in overload.argument_types:
            if isinstance(ty, types.Array):
                self.packers.append(_pack_array)
            elif ty in (types.float32, types.float64):
                self.packers.append(_pack_scalar(ctypes.c_float if ty == types.float32
                                                 else ctypes.c_double))
            elif isinstance(ty, types.Integer):
                self.packers.append(_pack_scalar(getattr(ctypes, f"c_{ty}")))
            elif ty == types.boolean:
                self.packers.append(_pack_scalar(bool))
            else:
                raise TypeError(f"launch: no fast packing for a kernel argument of type {ty}")
        self.configs = {}

    @classmethod
    def checked(cls, overload, args, converted, stream) -> _Launcher | None:
        """A launcher for ``overload`` if it packs ``args`` exactly as Numba's
        ``_Kernel._prepare_args`` packs ``converted`` (the same arguments as Numba takes them);
        otherwise None, with a warning."""
        import warnings

        try:
            launcher = cls(overload)
        except TypeError:  # an argument type without fast packing: Numba's path, no warning
            return None
        from numba import types

        try:
            for i, (ty, a, value) in enumerate(zip(overload.argument_types, args, converted,
                                                   strict=True)):
                ours, theirs = [], []
                launcher.packers[i](a, ours)
                overload._prepare_args(ty, value, stream, [], theirs)
                if isinstance(ty, types.Array):  # strides the kernel never reads may differ
                    ours, theirs = (_addressed(p, ty, a.shape) for p in (ours, theirs))
                if [_comparable(x) for x in ours] != [_comparable(x) for x in theirs]:
                    raise _Mismatch(f"argument {i} ({ty}): ours {ours}, Numba's {theirs}")
        except (AttributeError, TypeError, _Mismatch) as err:
            name = getattr(getattr(overload, "py_func", None), "__name__", "a kernel")
            warnings.warn(f"backend.launch: this numba-cuda packs the arguments of {name} "
                          f"otherwise ({err}); launching through Numba's own path",
                          RuntimeWarning, stacklevel=3)
            return None
        return launcher

    def pack(self, args) -> list:
        params = []
        for pack, a in zip(self.packers, args, strict=True):
            pack(a, params)
        return params

    def __call__(self, grid, block, stream, args, shared_bytes=0, cluster=1):
        from cuda.core import LaunchConfig
        from cuda.core import launch as core_launch

        params = self.pack(args)
        _allow_shared(self.cufunc, shared_bytes)
        if cluster > 8:
            _allow_large_clusters(self.cufunc)
        key = (grid, block, shared_bytes, cluster)
        config = self.configs.get(key)
        if config is None:  # with a cluster, cuda.core counts the grid in clusters
            config = self.configs[key] = LaunchConfig(
                grid=grid, block=block, shmem_size=shared_bytes) if cluster == 1 else (
                LaunchConfig(grid=grid // cluster, cluster=cluster, block=block,
                             shmem_size=shared_bytes))
        core_launch(stream, config, self.kernel, *params)


class _Mismatch(Exception):
    """Our packing of a kernel argument differs from Numba's."""


def _addressed(packed: list, ty, shape) -> list:
    """A packed array argument (meminfo, parent, size, itemsize, data, *shape, *strides) with the
    strides the kernel never reads blanked. Numba addresses a C- or F-contiguous array from its
    shape alone (``cgutils.get_item_pointer2``), so its strides are unused; and an 'A'-layout
    array is only ever indexed at 0 along a size-1 axis. Numba packs those unused strides by its
    own rule (on the H200 a (1, 5, 1) C array came with 40 bytes for axis 1, where C order
    gives 8), so comparing them would reject a correct launcher for a whole shape class."""
    n = len(shape)
    head, strides = packed[:len(packed) - n], packed[len(packed) - n:]
    used = [ty.layout == "A" and size != 1 for size in shape]
    return head + [st if u else None for u, st in zip(used, strides, strict=True)]


def _comparable(x):
    """A packed kernel argument as a value: ctypes scalars by type and value."""
    return (type(x), x.value) if isinstance(x, ctypes._SimpleCData) else x


def _pack_array(t: torch.Tensor, params: list) -> None:
    size = t.element_size()
    shape = t.shape
    strides = [size] * len(shape)  # C order (the launcher only sees contiguous tensors)
    for i in range(len(shape) - 1, 0, -1):
        strides[i - 1] = strides[i] * shape[i]
    params += (0, 0, t.numel(), size, t.data_ptr(), *shape, *strides)


def _pack_scalar(ctype):
    def pack(a, params: list) -> None:
        params.append(ctype(a))
    return pack


@functools.cache
def _simulator_shared_arrays_locked() -> None:
    """Fix a race in Numba's CUDA simulator (numba-cuda 0.30.4), once per process.

    The simulator runs each CUDA thread as a Python thread and hands out
    ``cuda.shared.array`` from a dict keyed by the calling source line, with no lock: two
    threads of a block that reach the line together can each create their own array, and the
    block then computes silently wrong results (seen in CI as rare wrong outputs of the
    selective-scan kernels, 2 runs in 8, never in isolation). This replacement takes a lock and
    keys by the caller's (file, line) read from its frame; it is also much cheaper than the
    original's ``traceback.extract_stack`` per call. Dynamic shared memory (shape 0) is left
    to the original."""
    import sys
    import threading

    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:
            return original(self, shape, dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                if isinstance(dtype, types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array
