"""The building blocks softmax, linear, matmul, layer_norm and rms_norm, and the kernels' vector
exp."""

import numpy as np
import pytest

import mhattn
from mhattn import _core
from mhattn import reference as ref
from tolerances import BF16, EXP_MAX_ULP, assert_close


def mat(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("M", [1, 5, 17, 255])
@pytest.mark.parametrize("N", [1, 5, 17, 255])
@pytest.mark.parametrize("K", [1, 5, 17, 255, 1023])
def test_linear_odd_sizes(isa, rng, M, N, K):
    x, w, b = mat(rng, M, K, scale=K ** -0.5), mat(rng, N, K), mat(rng, N)
    assert_close(mhattn.linear(x, w, b), ref.linear(x, w, b), "gemm")
    assert_close(mhattn.linear(x, w), ref.linear(x, w), "gemm")


@pytest.mark.parametrize("M,N,K", [(300, 200, 700), (1023, 65, 257), (64, 2304, 768),
                                   (293, 70, 2500), (1500, 70, 300)])
def test_linear_blocked_sizes_both_thread_counts(isa, threads, rng, M, N, K):
    # K = 2500: A packed in groups of KC steps, the last group and step partial, and a last row
    # block (89 rows) that is not a whole number of slivers. M = 1500: enough row blocks that
    # their count is rounded up to a multiple of the threads.
    x, w, b = mat(rng, M, K, scale=K ** -0.5), mat(rng, N, K), mat(rng, N)
    assert_close(mhattn.linear(x, w, b), ref.linear(x, w, b), "gemm")


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 24, 25])
@pytest.mark.parametrize("N", [257, 1000])
def test_linear_few_rows_walk_several_panels_at_once(isa, threads, rng, M, N):
    # A few slivers of rows (decode steps: up to 4 slivers, 24 rows with AVX) stream several
    # panels of B side by side, as many as fit the registers, then fewer at the end of a task's
    # run; N leaves an edge panel. K = 300 takes two steps of k when there are several slivers,
    # the activation on the last only. Packed (Linear) and read where B lies (linear).
    K = 300
    x, w, b = mat(rng, M, K, scale=K ** -0.5), mat(rng, N, K), mat(rng, N)
    assert_close(mhattn.linear(x, w, b), ref.linear(x, w, b), "gemm")
    assert_close(mhattn.linear(x, w, b, activation="silu"), ref.linear(x, w, b, "silu"), "gemm")
    assert_close(mhattn.Linear(w, b, activation="silu")(x), ref.linear(x, w, b, "silu"), "gemm")
    assert_close(mhattn.linear(x[:, ::-1], w), ref.linear(x[:, ::-1], w), "gemm")
    assert_close(mhattn.matmul(x, w.T.copy()), ref.matmul(x, w.T), "gemm")  # B (K, N), rows contiguous


def test_linear_strided_inputs_and_leading_axes(isa, rng):
    x = mat(rng, 4, 9, 80, scale=0.1)[:, ::2, ::2]   # (4, 5, 40), strided everywhere
    w = mat(rng, 40, 33).T                           # (33, 40) transposed view
    b = mat(rng, 66)[::2]
    got = mhattn.linear(x, w, b)
    assert got.shape == (4, 5, 33)
    assert_close(got, ref.linear(x, w, b), "gemm")


def test_linear_zero_sizes(rng):
    assert mhattn.linear(np.zeros((0, 4), np.float32), mat(rng, 3, 4)).shape == (0, 3)
    got = mhattn.linear(np.zeros((2, 0), np.float32), np.zeros((3, 0), np.float32), np.ones(3, np.float32))
    assert_close(got, np.ones((2, 3)), "gemm")


ACTIVATIONS = [a for a in ref.ACTIVATIONS if a is not None]


def test_activation_names_agree_with_the_reference():
    from mhattn._checks import ACTIVATION_CODES
    assert tuple(ACTIVATION_CODES) == ref.ACTIVATIONS


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_over_the_float_range(isa, activation):
    # Through a 1 × 1 identity weight the GEMM's sums are exact: what is left is the activation.
    x = np.concatenate([np.linspace(-20, 20, 40_001), -np.logspace(-30, 38, 500),
                        np.logspace(-30, 38, 500)]).astype(np.float32)
    got = mhattn.linear(x[:, None], np.ones((1, 1), np.float32), activation=activation)[:, 0]
    assert_close(got, ref.activate(x, activation), "activation")
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -3.4e38, 3.4e38], np.float32)
    got = mhattn.linear(special[:, None], np.ones((1, 1), np.float32), activation=activation)[:, 0]
    np.testing.assert_array_equal(got, np.array([np.inf, 0.0, np.nan, 0.0, 0.0, 3.4e38], np.float32))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M,N,K", [(1, 5, 3), (5, 17, 255), (17, 255, 17), (300, 200, 700), (64, 2304, 768),
                                   (40, 50, 2100)])
def test_linear_activation_fused_in_the_store(isa, threads, rng, activation, M, N, K):
    # Sizes with edge tiles, several KC steps (700: the activation must come after the last one
    # only), several groups of them (2100), and products small enough for the unpacked path.
    x, w, b = mat(rng, M, K, scale=3 * K ** -0.5), mat(rng, N, K), mat(rng, N)
    assert_close(mhattn.linear(x, w, b, activation=activation), ref.linear(x, w, b, activation), "gemm")
    layer = mhattn.Linear(w, activation=activation)
    assert_close(layer(x), ref.linear(x, w, None, activation), "gemm")
    assert_close(layer(x[::-1]), ref.linear(x[::-1], w, None, activation), "gemm")


@pytest.mark.parametrize("sa,sb", [((7, 5), (5, 9)), ((3, 7, 5), (5, 9)), ((2, 1, 17, 33), (4, 33, 6)),
                                   ((5,), (5, 9)), ((7, 5), (5,)), ((6, 130, 257), (6, 257, 129))])
def test_matmul_broadcasting(isa, rng, sa, sb):
    a, b = mat(rng, *sa, scale=sa[-1] ** -0.5), mat(rng, *sb)
    assert_close(mhattn.matmul(a, b), ref.matmul(a, b), "gemm")


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("M", [1, 5, 7, 8, 9, 300])
@pytest.mark.parametrize("K,N", [(203, 75), (3, 2000)])
@pytest.mark.parametrize("layout", ["rows", "columns", "strided"])
def test_one_shot_products_read_b_as_it_lies(isa, threads, rng, dtype, M, K, N, layout):
    # matmul never packs the whole of B. Its rows contiguous (A @ B: a few rows of A take the
    # axpy path), its columns contiguous (x @ W.T: the dot path), or neither (a view with steps:
    # copied a value at a time); K and N off every vector width, K = 3 shorter than one.
    a = mat(rng, M, K, scale=K ** -0.5).astype(dtype)
    shape, view = {"rows": ((K, N + 5), lambda t: t[:, :N]), "columns": ((N, K), lambda t: t.T),
                   "strided": ((2 * K, 3 * N), lambda t: t[1::2, ::3])}[layout]
    b = view(mat(rng, *shape).astype(dtype))
    assert_close(mhattn.matmul(a, b), ref.matmul(a, b), "gemm", dtype)


def test_one_shot_products_of_many_rows_copy_b_in_blocks(isa, rng):
    # 300 rows: B is copied into float32 panels a block of columns at a time (at most 4 MB:
    # 15 panels at K = 2100), so N = 600 takes a whole block and a partial one; x @ W.T and
    # A @ B, with bias and activation through linear.
    x, w, bias = mat(rng, 300, 2100, scale=2100 ** -0.5), mat(rng, 600, 2100), mat(rng, 600)
    assert_close(mhattn.linear(x, w, bias, activation="gelu"), ref.linear(x, w, bias, "gelu"), "gemm")
    b = np.ascontiguousarray(w.T)
    assert_close(mhattn.matmul(x, b), ref.matmul(x, b), "gemm")


def test_matmul_transposed_views(isa, rng):
    a, b = mat(rng, 70, 50, scale=0.1), mat(rng, 90, 70)
    assert_close(mhattn.matmul(a.T, b.T), ref.matmul(a.T, b.T), "gemm")


@pytest.mark.parametrize("shape,axis", [((7, 33), -1), ((3, 65, 4), 1), ((127,), 0), ((2, 3, 5), 0), ((4, 0), -1)])
def test_softmax(isa, threads, rng, shape, axis):
    x = mat(rng, *shape, scale=5.0)
    assert_close(mhattn.softmax(x, axis=axis), ref.softmax(x, axis=axis), "softmax")


def test_softmax_masked_rows_and_nan(isa):
    x = np.array([[-np.inf] * 5, [0, -np.inf, 1, -np.inf, 2], [1, np.nan, 0, 0, 0]] * 3, np.float32)
    got = mhattn.softmax(x)
    assert np.all(got[0] == 0)
    assert_close(got[1], ref.softmax(x[1]), "softmax")
    assert np.all(np.isnan(got[2]))


def every_float_from_2_to_the_minus_7_to_2():
    """Every float32 in [2^-7, 2), where an exp's range reduction and low terms matter most."""
    return (np.arange(2 ** 24, dtype=np.uint32) + np.uint32(0x3C000000)).view(np.float32)


def test_vector_exp_within_2_ulp(isa):
    # The whole range, and every float of magnitude in [2^-7, 2), where the range reduction
    # and the polynomial's low-order terms matter most.
    every = every_float_from_2_to_the_minus_7_to_2()
    for x in (np.linspace(-87.3, 88.0, 2_000_003, dtype=np.float32), every, -every):
        got = _core._vexp(x)
        want = np.exp(x.astype(np.float64))
        ulp = np.abs(got - want) / np.spacing(want.astype(np.float32))
        assert ulp.max() <= EXP_MAX_ULP
    special = _core._vexp(np.array([-np.inf, -100.0, np.nan, 0.0, 1.0, 89.0, np.inf], np.float32))
    assert special[0] == 0 and special[1] == 0 and np.isnan(special[2]) and special[3] == 1
    assert special[5] == special[6] == _core._vexp(np.array([88.0], np.float32))[0]


def test_softmax_exp_within_its_bound(isa):
    # vexp_softmax, for the softmax's x <= 0: within 2 ulp of 2^x2, x2 = x·log2(e) in float,
    # whose two roundings (of log2(e) and of the product) add at most |x|·7.5e-8 relative
    # (simd.h). Then below 2^-126 (x < -87.34) only tiny values, and exactly 0 from x = -105 down
    # (2^-151.5), -inf included.
    every = every_float_from_2_to_the_minus_7_to_2()
    for x in (np.linspace(-87.33, 0.0, 2_000_003, dtype=np.float32), -every):
        got = _core._vexp(x, softmax=True)
        want = np.exp(x.astype(np.float64))
        bound = EXP_MAX_ULP * np.spacing(want.astype(np.float32)) + np.abs(x) * 7.5e-8 * want
        assert np.all(np.abs(got - want) <= bound)
    tail = _core._vexp(np.linspace(-105.0, -87.34, 100_001, dtype=np.float32), softmax=True)
    assert np.all((tail >= 0) & (tail < 2.0 ** -126))
    special = _core._vexp(np.array([-np.inf, -1e30, -105.0, np.nan, 0.0], np.float32), softmax=True)
    assert np.all(special[:3] == 0) and np.isnan(special[3]) and special[4] == 1


def test_linear_layer_packs_once_and_matches_reference(isa, rng):
    w, b = mat(rng, 33, 70), mat(rng, 33)
    layer = mhattn.Linear(w, b)
    assert (layer.in_features, layer.out_features) == (70, 33)
    for shape in ((5, 70), (2, 3, 70), (70,)):
        x = mat(rng, *shape, scale=70 ** -0.5)
        assert_close(layer(x), ref.linear(x, w, b), "gemm")
    with pytest.raises(ValueError):
        layer.weight[0, 0] = 1.0  # packed: writing the copy in place would be ignored
    with pytest.raises(ValueError, match="K = 70"):
        layer(mat(rng, 5, 69))


def test_linear_layer_follows_the_active_target(rng):
    w = mat(rng, 20, 30)
    layer = mhattn.Linear(w)
    x = mat(rng, 7, 30)
    before = _core.target()
    try:
        for t in _core.targets():
            _core.set_target(t)
            assert_close(layer(x), ref.linear(x, w), "gemm")
    finally:
        _core.set_target(before)


# ---- layer_norm and rms_norm ---------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 17, 384, 1001])
@pytest.mark.parametrize("residual", [False, True])
def test_norms_against_the_reference(isa, threads, rng, n, residual):
    # 300 rows: enough to be split across threads at n >= 384
    x = mat(rng, 300, n) * 3 + 1.5  # a mean far from 0: the variance is taken about it
    r = mat(rng, 300, n) if residual else None
    w, b = mat(rng, n), mat(rng, n)
    assert_close(mhattn.layer_norm(x, w, b, 1e-5, residual=r),
                 ref.layer_norm(x, w, b, 1e-5, r), "norm")
    assert_close(mhattn.layer_norm(x, w, residual=r), ref.layer_norm(x, w, None, 1e-5, r), "norm")
    assert_close(mhattn.rms_norm(x, w, 1e-6, residual=r), ref.rms_norm(x, w, 1e-6, r), "norm")


def test_norms_keep_leading_axes_strides_and_the_half_dtypes(rng):
    x = mat(rng, 2, 3, 40)[:, :, ::2]  # a strided last axis
    w, b = mat(rng, 20), mat(rng, 20)
    r = mat(rng, 2, 3, 20)
    assert_close(mhattn.layer_norm(x, w, b, residual=r), ref.layer_norm(x, w, b, 1e-5, r), "norm")
    for dtype in (BF16, np.dtype(np.float16)):
        xh = x.astype(dtype)
        want = ref.rms_norm(xh.astype(np.float32), w, 1e-6)
        assert_close(mhattn.rms_norm(xh, w), want, "norm", dtype)
    # eps = 0 on a constant row: LayerNorm divides by sqrt(0); NaN or inf, as the formula says
    with np.errstate(all="ignore"):
        assert not np.isfinite(mhattn.layer_norm(np.ones((1, 4), np.float32), np.ones(4), eps=0.0)).any()


def test_norms_bad_input_raises():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="weight must be"):
        mhattn.layer_norm(x, np.ones(5))
    with pytest.raises(ValueError, match="bias must be"):
        mhattn.layer_norm(x, np.ones(4), np.ones(3))
    with pytest.raises(ValueError, match="residual must have"):
        mhattn.rms_norm(x, np.ones(4), residual=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="eps"):
        mhattn.rms_norm(x, np.ones(4), eps=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        mhattn.layer_norm(np.float32(1.0), np.ones(1))
    with pytest.raises(TypeError, match="x must be"):
        mhattn.layer_norm(x.astype(np.int32), np.ones(4))
    assert mhattn.layer_norm(np.zeros((0, 4), np.float32), np.ones(4)).shape == (0, 4)
