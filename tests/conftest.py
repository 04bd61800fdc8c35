import os
import sys

from hypothesis import HealthCheck, settings

from minimodels.backend import cuda_simulated

# The fuzzer's profiles (tests/test_fuzz.py): "quick" in `make test` (derandomized, so CI sees
# the same cases every run), "long" under `pytest -m fuzz`; HYPOTHESIS_PROFILE picks another.
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("quick", max_examples=200, derandomize=True, database=None,
                          deadline=None, print_blob=True, suppress_health_check=_SLOW_IS_FINE)
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_IS_FINE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


def pytest_configure(config):
    if cuda_simulated():
        # The simulator runs each CUDA thread as a Python thread; barrier-heavy kernels spend
        # their time waiting for the interpreter to switch threads. Switching more often makes
        # them several times faster (TOOLCHAIN.md).
        sys.setswitchinterval(1e-5)
