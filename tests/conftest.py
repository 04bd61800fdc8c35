import sys

from minimodels.backend import cuda_simulated


def pytest_configure(config):
    if cuda_simulated():
        # The simulator runs each CUDA thread as a Python thread; barrier-heavy kernels spend
        # their time waiting for the interpreter to switch threads. Switching more often makes
        # them several times faster (TOOLCHAIN.md).
        sys.setswitchinterval(1e-5)
