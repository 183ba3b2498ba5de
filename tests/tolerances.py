"""The one table of tolerances the tests compare float32 results against float64 references with.

Every op's inputs are scaled so its outputs are of order 1, so an absolute floor plus a relative
part fits all sizes the tests use (K up to 2500, S up to a few hundred, E up to 256).
"""

import numpy as np

TOL = {
    "softmax": dict(rtol=1e-5, atol=1e-6),
    "gemm": dict(rtol=1e-4, atol=1e-5),
    "attention": dict(rtol=1e-4, atol=2e-5),
    "mha": dict(rtol=1e-4, atol=2e-5),
    "torch": dict(rtol=1e-4, atol=2e-5),   # float32 against float32: both sides round
    "threads": dict(rtol=1e-5, atol=1e-6),  # one result at two thread counts
    # An activation alone, element by element over its whole float32 range: relative, since the
    # GELU tails reach 1e-38. Near x = -10 the argument of exp is ~ -50 and one float32 rounding
    # of it moves the result by 3e-6 relative; nothing computed in float32 does better.
    "activation": dict(rtol=3e-5, atol=1e-30),
}
EXP_MAX_ULP = 2.0


def assert_close(actual, expected, op):
    actual = np.asarray(actual)
    assert actual.dtype == np.float32, f"{op}: result dtype {actual.dtype}, want float32"
    assert actual.shape == np.shape(expected), f"{op}: shape {actual.shape} != {np.shape(expected)}"
    np.testing.assert_allclose(actual, expected, err_msg=op, **TOL[op])
