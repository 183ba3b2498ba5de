"""The one table of tolerances the tests compare float32 results against float64 references with.

Every op's inputs are scaled so its outputs are of order 1, so an absolute floor plus a relative
part fits all sizes the tests use (K up to 2500, S up to a few hundred, E up to 256).
"""

import ml_dtypes
import numpy as np

TOL = {
    "softmax": dict(rtol=1e-5, atol=1e-6),
    "gemm": dict(rtol=1e-4, atol=1e-5),
    "attention": dict(rtol=1e-4, atol=2e-5),
    # LayerNorm and RMSNorm: a mean and a variance summed in float32 over up to a few thousand
    # values, then one scaling; outputs of order 1.
    "norm": dict(rtol=1e-5, atol=1e-5),
    "mha": dict(rtol=1e-4, atol=2e-5),
    "torch": dict(rtol=1e-4, atol=2e-5),   # float32 against float32: both sides round
    "threads": dict(rtol=1e-5, atol=1e-6),  # one result at two thread counts
    # A whole decoder against transformers' float32 one, on logits scaled by their largest:
    # both sides round every layer. Measured on the random 3-layer decoders of
    # tests/test_decoders.py: up to 3e-6.
    "model": dict(rtol=1e-4, atol=2e-5),
    # An activation alone, element by element over its whole float32 range: relative, since the
    # GELU tails reach 1e-38. Near x = -10 the argument of exp is ~ -50 and one float32 rounding
    # of it moves the result by 3e-6 relative; nothing computed in float32 does better.
    "activation": dict(rtol=3e-5, atol=1e-30),
}
EXP_MAX_ULP = 2.0

# Results in bfloat16 and float16, against the float64 reference on the same (already rounded)
# inputs, for every op: the result's own rounding (half an ulp: 2^-9 and 2^-12 relative) plus
# what computing in that precision adds. Five times tighter than PyTorch's own CPU tests use
# (bfloat16 atol = rtol = 5e-2, float16 1e-2).
BF16 = np.dtype(ml_dtypes.bfloat16)
TOL_HALF = {
    BF16: dict(rtol=1e-2, atol=1e-2),
    np.dtype(np.float16): dict(rtol=2e-3, atol=2e-3),
}


def tol(op, dtype=np.float32):
    """The tolerance of op for a result of this dtype."""
    return TOL_HALF.get(np.dtype(dtype), TOL[op])


def assert_close(actual, expected, op, dtype=np.float32):
    """actual, of the given dtype, equals expected within op's tolerance for that dtype."""
    actual = np.asarray(actual)
    assert actual.dtype == dtype, f"{op}: result dtype {actual.dtype}, want {np.dtype(dtype)}"
    assert actual.shape == np.shape(expected), f"{op}: shape {actual.shape} != {np.shape(expected)}"
    np.testing.assert_allclose(actual.astype(np.float64), expected, err_msg=op, **tol(op, dtype))

# A whole model in bfloat16 or float16 (weights, activations into every product, KV cache)
# against the same model in float32, on outputs scaled by their largest: each layer's products
# round their inputs again, so the error grows with depth. Measured on the random 3-layer
# decoders of tests/test_decoders.py (initializer range 0.2, so activations are large), over
# three seeds, teacher-forced: GPT-2 up to 2.4e-2 in bfloat16 and 3.5e-3 in float16; the Llama
# family (SwiGLU, whose product doubles the relative error, RMSNorm) up to 1.05e-1 and 1.15e-2.
# transformers' own model in that dtype deviates as much (GPT-2 2.7e-2 and 3.0e-3, the Llama
# family 1.5e-1 and 1.3e-2), so the tests also ask for no more than MODEL_HALF_VS_TORCH times
# its deviation (measured: at most 1.5 times).
TOL_MODEL_HALF = {
    BF16: dict(rtol=1.5e-1, atol=1.5e-1),
    np.dtype(np.float16): dict(rtol=1.5e-2, atol=1.5e-2),
}
MODEL_HALF_VS_TORCH = 2.0
