"""The GEMM and the layers in bfloat16 and float16, on every SIMD path, against the float64
reference on the same rounded inputs: weights packed in their own dtype (the converting panels
everywhere, vdpbf16ps pairs on avx512bf16), inputs of either dtype, sizes at every edge."""

import numpy as np
import pytest

import mhattn
from mhattn import _checks, _core
from mhattn import reference as ref
from tolerances import BF16, assert_close, tol

F16 = np.dtype(np.float16)
HALF = [BF16, F16]


def mat(rng, *shape, scale=1.0, dtype=np.float32):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# (M, N, K): one element; K odd (a last pair of k half empty); N past a panel; a decode step's
# few rows (1-7, several panels side by side); K past one step and one group of k (2500: two
# groups of pairs, the last partial); M past a row block.
# 8 and 9 rows: the vdpbf16ps kernel's whole 8-row tile, and one row past it.
# 40 × 300 × 2100: two groups of k over runs of several panels, so that the AMX kernel keeps a
# strip of C per panel across the groups.
SHAPES = [(1, 1, 1), (5, 17, 33), (7, 70, 129), (1, 1000, 300), (6, 257, 300), (8, 40, 64),
          (9, 48, 130), (17, 255, 255), (300, 200, 701), (150, 33, 2500), (40, 300, 2100)]


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("x_half", [False, True], ids=["x-f32", "x-half"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_linear_with_half_weights(isa, threads, rng, dtype, x_half, M, N, K):
    w, b = mat(rng, N, K, dtype=dtype), mat(rng, N)
    x = mat(rng, M, K, scale=K ** -0.5, dtype=dtype if x_half else np.float32)
    # It computes in the weight's dtype: x is rounded to it first, and the reference takes the
    # same rounded x. The result has x's dtype, with the tolerance of the weight's. The one-shot
    # call reads the weights as they lie, the layer packs them: both are checked.
    want = ref.linear(x.astype(dtype), w, b, "gelu")
    for got in (mhattn.linear(x, w, b, activation="gelu"), mhattn.Linear(w, b, activation="gelu")(x)):
        assert got.dtype == x.dtype
        np.testing.assert_allclose(got.astype(np.float64), want, **tol("gemm", dtype))


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_half_results_are_the_float32_ones_rounded(isa, rng, dtype, M, N, K):
    # A 16-bit x gives a 16-bit result, which the AMX kernel rounds as it stores each block
    # (bias and activation first) and the others round from a float32 buffer; either way it is
    # the float32 result of the same product (x already in the weight's dtype) rounded, bit for
    # bit, column edges and all.
    w, b = mat(rng, N, K, dtype=dtype), mat(rng, N)
    x = mat(rng, M, K, scale=K ** -0.5, dtype=dtype)
    lin = mhattn.Linear(w, b, activation="gelu")
    for product in (lin, lambda x: mhattn.linear(x, w, b, activation="gelu")):
        got, wide = product(x), product(x.astype(np.float32))
        assert got.dtype == dtype and wide.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint16), _checks.cast(wide, dtype).view(np.uint16))


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_linear_half_strided_and_transposed(isa, rng, dtype):
    x = mat(rng, 4, 9, 80, scale=0.1, dtype=dtype)[:, ::2, ::2]  # (4, 5, 40), strided
    w = mat(rng, 40, 33, dtype=dtype).T                         # (33, 40) transposed view
    assert_close(mhattn.linear(x, w), ref.linear(x, w), "gemm", dtype)


def test_bf16_weights_take_the_pairs_layout_where_the_cpu_has_vdpbf16ps():
    w = np.ones((5, 7), BF16)
    for t in _core.test_targets():
        before = _core.target()
        _core.set_target(t)
        try:
            packed = _core.Packed(*_checks.native(w.T))
        finally:
            _core.set_target(before)
        assert packed.dtype == 1
        assert packed.layout == ("pairs" if t in ("avx512bf16", "amx", "amx_emulated") else "panels")


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_linear_layer_stores_its_weights_in_its_dtype(isa, rng, dtype):
    w, b = mat(rng, 70, 90), mat(rng, 70)
    lin = mhattn.Linear(w, b, dtype=dtype.name)
    assert lin.weight.dtype == dtype and lin.weight.nbytes == w.nbytes // 2
    assert "dtype=" in repr(lin)
    x = mat(rng, 9, 90, scale=0.1)
    got = lin(x)  # a float32 input: rounded to the layer's dtype, the output float32
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref.linear(x.astype(dtype), w.astype(dtype), b), **tol("gemm", dtype))
    assert mhattn.Linear(w.astype(dtype)).dtype == dtype  # by default, the weight's own dtype


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_matmul_in_half_and_mixed(isa, rng, dtype):
    a, b = mat(rng, 3, 17, 40, scale=0.2, dtype=dtype), mat(rng, 40, 33, dtype=dtype)
    assert_close(mhattn.matmul(a, b), ref.matmul(a, b), "gemm", dtype)
    got = mhattn.matmul(a, b.astype(np.float32))  # NumPy's promotion: float32, computed so
    assert_close(got, ref.matmul(a, b), "gemm")


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
@pytest.mark.parametrize("cross", [False, True])
def test_multi_head_attention_in_half(isa, rng, dtype, cross):
    mod = mhattn.MultiHeadAttention(48, 4, num_kv_heads=2, seed=1, dtype=dtype.name)
    assert all(w.dtype == dtype for w in mod.state_dict().values())
    x = mat(rng, 2, 13, 48, dtype=dtype)
    kv = mat(rng, 2, 9, 48, dtype=dtype) if cross else x
    pad = np.zeros((2, kv.shape[1]), bool)
    pad[1, -3:] = True
    out, w = mod(x, kv, kv, key_padding_mask=pad, need_weights=True)
    want, want_w = ref.multi_head_attention(x, kv, kv, mod.state_dict(), 4, 2, key_padding_mask=pad,
                                            need_weights=True)
    assert_close(out, want, "mha", dtype)
    assert_close(w, want_w, "mha", dtype)
    # A float32 input to a half layer: converted on the way in, the output float32.
    out32, _ = mod(x.astype(np.float32), kv.astype(np.float32), kv.astype(np.float32),
                   key_padding_mask=pad)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, want, **tol("gemm", dtype))


def test_layer_dtype_names_are_checked():
    with pytest.raises(TypeError, match="dtype must be 'float32', 'bfloat16' or 'float16'"):
        mhattn.MultiHeadAttention(8, 2, dtype="int8")
    with pytest.raises(TypeError, match="dtype must be"):
        mhattn.Linear(np.ones((2, 2), np.float32), dtype=np.float64)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_results_round_to_half_as_numpy_does(isa, dtype):
    # Every 9973rd float32 bit pattern (normals, subnormals, inf, NaN of both signs), the edges
    # of float16 (65504, halfway to inf at 65520, its subnormals) and lengths with a tail.
    pats = np.arange(0, 2**32, 9973, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 6e-8, 2.98e-8, 2.9e-8, 1e-45,
                      3.4e38, np.inf, -np.inf, np.nan], np.float32)
    for x in (np.concatenate([pats, edges]), edges[:7]):
        got = _checks.cast(x, dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            want = x.astype(dtype)
        real = ~np.isnan(x)
        np.testing.assert_array_equal(got.view(np.uint16)[real], want.view(np.uint16)[real])
        assert np.isnan(got[~real].astype(np.float32)).all()


_AFTER_ONEDNN = """
import numpy as np, torch, mhattn, ml_dtypes
from mhattn import _core
_core.set_target("amx")
mhattn.set_num_threads(2)
torch.set_num_threads(2)
x = np.ones((64, 256), ml_dtypes.bfloat16)
for _ in range(3):
    mhattn.linear(x, x[:128])
    t = torch.ones(256, 256, dtype=torch.bfloat16)
    t @ t  # oneDNN's AMX kernel, which releases the tiles when it is done
print(float(mhattn.linear(x, x[:128]).astype(np.float32)[5, 7]))
"""


@pytest.mark.skipif("amx" not in _core.targets(), reason="the CPU has no AMX")
def test_amx_runs_after_another_library_released_the_tiles():
    # Regression: the tiles were configured once per thread and never again, so a torch bf16
    # matmul between two calls (oneDNN releases the tiles) made the next one an illegal
    # instruction. In a process of its own, as that kills the process.
    pytest.importorskip("torch")
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", _AFTER_ONEDNN], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "256.0"
