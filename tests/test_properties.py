"""Property tests: every public function against mhattn.reference over random shapes, head
counts, masks, causal flags, windows, strides and dtypes.

The default profile ("ci") is derandomized and small enough for every test run; set
MHATTN_HYPOTHESIS=long for a longer search by hand.
"""

import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import mhattn  # noqa: E402
from mhattn import reference as ref  # noqa: E402
from tolerances import BF16, TOL, assert_close  # noqa: E402

settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=3000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("MHATTN_HYPOTHESIS", "ci"))

DTYPES = [np.float32, np.float64, np.float16, BF16]


def result_dtype(dtype):
    return np.float32 if dtype == np.float64 else dtype


def f32(a):
    """The input as the kernels see it (float64 narrowed to float32), for the reference."""
    return None if a is None else a.astype(np.float32)


def array(draw, shape, dtype=np.float32, scale=1.0):
    """A random array of `shape`, sometimes a strided or transposed view of a larger one."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layout = draw(st.sampled_from(["c", "strided", "reversed"]))
    if layout == "strided":
        big = rng.standard_normal([n * 2 for n in shape]) * scale
        a = big[tuple(slice(None, None, 2) for _ in shape)]
    elif layout == "reversed" and len(shape):
        a = (rng.standard_normal(shape) * scale)[..., ::-1]
    else:
        a = rng.standard_normal(shape) * scale
    return a.astype(dtype, copy=False) if layout == "c" else a.astype(dtype)[...]


@st.composite
def sdpa_case(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 3))
    L, S = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    E, Ev = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    q = array(draw, (B, Hq, L, E), dtype)
    k = array(draw, (B, Hkv, S, E), dtype)
    v = array(draw, (B, Hkv, S, Ev), dtype)
    kw = dict(is_causal=draw(st.booleans()), enable_gqa=Hq != Hkv,
              causal_align=draw(st.sampled_from(["top_left", "bottom_right"])),
              window=draw(st.one_of(st.none(), st.integers(1, 45))))
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    if mask_kind:
        full = (B, Hq, L, S)
        shape = tuple(n if draw(st.booleans()) else 1 for n in full)[draw(st.integers(0, 3)):]
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        mask = rng.random(shape) < 0.7
        kw["attn_mask"] = mask if mask_kind == "bool" else np.where(mask, rng.standard_normal(shape), -np.inf)
    return q, k, v, kw


@given(sdpa_case())
def test_sdpa_matches_reference(case):
    q, k, v, kw = case
    want = ref.scaled_dot_product_attention(f32(q), f32(k), f32(v), **kw)
    got = mhattn.scaled_dot_product_attention(q, k, v, **kw)
    assert_close(got, want, "attention", result_dtype(q.dtype))


@given(st.data())
def test_linear_and_matmul_match_reference(data):
    M, N, K = (data.draw(st.integers(0, 70)) for _ in range(3))
    dtype = data.draw(st.sampled_from(DTYPES))
    x = array(data.draw, (M, K), dtype, scale=max(K, 1) ** -0.5)
    w = array(data.draw, (N, K), dtype)
    b = array(data.draw, (N,), dtype) if data.draw(st.booleans()) else None
    act = data.draw(st.sampled_from(ref.ACTIVATIONS))
    assert_close(mhattn.linear(x, w, b, activation=act), ref.linear(f32(x), f32(w), f32(b), act),
                 "gemm", result_dtype(dtype))
    assert_close(mhattn.matmul(x, w.T), ref.matmul(f32(x), f32(w).T), "gemm", result_dtype(dtype))


@given(st.data())
def test_softmax_matches_reference(data):
    shape = tuple(data.draw(st.integers(1, 9)) for _ in range(data.draw(st.integers(1, 3))))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = array(data.draw, shape, data.draw(st.sampled_from(DTYPES)), scale=5.0)
    assert_close(mhattn.softmax(x, axis=axis), ref.softmax(f32(x), axis=axis), "softmax",
                 result_dtype(x.dtype))


@given(st.data())
def test_multi_head_attention_matches_reference(data):
    Hkv = data.draw(st.integers(1, 3))
    Hq = Hkv * data.draw(st.integers(1, 3))
    D = Hq * data.draw(st.integers(1, 9))
    B, L, S = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    cross = data.draw(st.booleans())
    mod = mhattn.MultiHeadAttention(D, Hq, num_kv_heads=Hkv, bias=data.draw(st.booleans()),
                                    batch_first=data.draw(st.booleans()), seed=data.draw(st.integers(0, 99)))
    lead = (lambda n: (B, n)) if mod.batch_first else (lambda n: (n, B))
    q = array(data.draw, lead(L) + (D,))
    kv = array(data.draw, lead(S) + (D,)) if cross else q
    S = S if cross else L
    kw = dict(need_weights=data.draw(st.booleans()), is_causal=data.draw(st.booleans()))
    if data.draw(st.booleans()):
        kw["key_padding_mask"] = np.random.default_rng(data.draw(st.integers(0, 99))).random((B, S)) < 0.3
    out, w = mod(q, kv, kv, **kw)
    rout, rw = ref.multi_head_attention(q, kv, kv, mod.state_dict(), Hq, Hkv,
                                        batch_first=mod.batch_first, **kw)
    np.testing.assert_allclose(out, rout, **TOL["mha"])
    if kw["need_weights"]:
        np.testing.assert_allclose(w, rw, **TOL["mha"])
