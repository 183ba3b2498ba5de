import os
import zlib

import numpy as np
import pytest

import mhattn
from mhattn import _core


def _isa_params():
    """_core.test_targets(), or those named in MHATTN_TEST_TARGETS (comma-separated; "chosen"
    is the one mhattn picked for this CPU): .ci/run's run of the suite on the built wheel takes
    generic,chosen, as the first run has tried every target on the same kernels."""
    names = os.environ.get("MHATTN_TEST_TARGETS")
    if not names:
        return _core.test_targets()
    keep = {_core.target() if n.strip() == "chosen" else n.strip() for n in names.split(",")}
    return [t for t in _core.test_targets() if t in keep]


@pytest.fixture(params=_isa_params())
def isa(request):
    """Run the test once per SIMD target this CPU can run (the portable one always), and on
    the emulation of the AMX target and its AVX-512 (amx_emulated), which every x86-64 CPU runs."""
    before = _core.target()
    _core.set_target(request.param)
    yield request.param
    _core.set_target(before)


# MHATTN_TEST_ONE_THREAD=1 (.ci/run's second and third runs of the suite, on the wheel and
# under the sanitizers, after the first has run both) keeps the tests to one thread count.
@pytest.fixture(params=[1] if os.environ.get("MHATTN_TEST_ONE_THREAD") else [1, 2])
def threads(request):
    before = mhattn.get_num_threads()
    mhattn.set_num_threads(request.param)
    yield request.param
    mhattn.set_num_threads(before)


@pytest.fixture
def rng(request):
    # A seed of its own for every test, stable from run to run.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
