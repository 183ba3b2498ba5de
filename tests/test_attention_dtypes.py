"""Attention with bfloat16 and float16 inputs and a KV cache in half the bytes, on every SIMD
path, against the float64 reference on the same rounded inputs: the decode path reading k and v
in their own dtype (split across threads for a long cache), longer tiles on widened copies,
scores that would overflow float16, and a layer decoding token by token from a 16-bit cache."""

import numpy as np
import pytest

import mhattn
from mhattn import reference as ref
from tolerances import BF16, assert_close, tol

HALF = [BF16, np.dtype(np.float16)]
IDS = ["bf16", "f16"]


def qkv(rng, dtype, B, Hq, Hkv, L, S, E, Ev=None):
    Ev = E if Ev is None else Ev
    return (rng.standard_normal(shape).astype(dtype) for shape in
            ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)))


# (Hq, Hkv, L, S, E, Ev): decode (one query; a GQA group of 4; 2 queries of 2 heads) reads k
# and v in place, with E and Ev off the vector width and a cache long enough to be split across
# threads; longer tiles read widened copies.
CASES = [(4, 4, 1, 37, 64, 64), (8, 2, 1, 300, 24, 40), (4, 2, 2, 129, 17, 17),
         (2, 1, 1, 3000, 128, 128), (4, 4, 37, 45, 64, 64), (6, 2, 70, 70, 32, 24),
         # groups of 2-4 rows with Ev a multiple of 16 (bfloat16: P · V in pairs of keys), an odd
         # number of keys, a second block of one key, the last 16 of 32 dims a pass
         (4, 1, 1, 37, 64, 48), (3, 1, 1, 1025, 32, 32), (2, 2, 2, 51, 16, 16),
         # the wide passes of P · V in pairs (128 dims for 2 rows, 64 for 3-4), then 32 or 16
         (2, 1, 1, 70, 24, 144), (4, 1, 1, 301, 40, 80), (6, 2, 1, 99, 32, 96)]


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("Hq,Hkv,L,S,E,Ev", CASES)
def test_sdpa_in_half_on_every_path(isa, threads, rng, dtype, Hq, Hkv, L, S, E, Ev):
    q, k, v = qkv(rng, dtype, 2, Hq, Hkv, L, S, E, Ev)
    mask = rng.random((L, S)) < 0.8
    for kw in ({}, {"is_causal": True, "causal_align": "bottom_right"}, {"attn_mask": mask},
               {"attn_mask": np.where(mask, 0.0, -np.inf).astype(dtype), "window": 9}):
        got = mhattn.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv, **kw)
        want = ref.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv, **kw)
        assert_close(got, want, "attention", dtype)



# Tiles of many rows in bfloat16: on targets with AVX512-BF16 both products run on vdpbf16ps
# with k and v as they are (pairs of dims of q, pairs of keys of P and v), elsewhere on widened
# copies. (Hq, Hkv, L, S, E, Ev): odd E and Ev, E = 1, Ev under the vector width, an odd number
# of keys in the last block, several blocks, a GQA group, a wide head.
BF16_TILES = [(2, 2, 40, 131, 13, 20), (3, 1, 17, 300, 1, 3), (4, 2, 33, 129, 64, 64),
              (1, 1, 20, 50, 768, 768), (2, 2, 65, 257, 31, 17)]


@pytest.mark.parametrize("Hq,Hkv,L,S,E,Ev", BF16_TILES)
def test_bfloat16_tiles_on_every_path(isa, rng, Hq, Hkv, L, S, E, Ev):
    B = 2
    q, k, v = qkv(rng, BF16, B, Hq, Hkv, L, S, E, Ev)
    rows = rng.random((B, Hq, L, S)) < 0.7  # a mask that differs from row to row
    rows[0, 0, 3] = False                    # a row that sees no key: zeros
    flt = np.where(rng.random((L, S)) < 0.8, rng.standard_normal((L, S)), -np.inf).astype(BF16)
    for kw in ({}, {"is_causal": True}, {"is_causal": True, "causal_align": "bottom_right"},
               {"attn_mask": rows}, {"attn_mask": flt, "window": 7}, {"softcap": 2.0}):
        got = mhattn.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv, **kw)
        want = ref.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv, **kw)
        assert_close(got, want, "attention", BF16)
    # k and v of any strides: (B, S, H, E) memory seen as (B, H, S, E)
    ks = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    vs = np.ascontiguousarray(v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    got = mhattn.scaled_dot_product_attention(q, ks, vs, enable_gqa=Hq != Hkv)
    assert_close(got, ref.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv),
                 "attention", BF16)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("Hq,L", [(1, 1), (4, 1), (2, 2), (2, 40)])
@pytest.mark.parametrize("Ev", [20, 48])
def test_half_keys_and_values_are_read_within_their_dims(isa, rng, dtype, Hq, L, Ev):
    # k and v as views of rows with NaN past E and Ev: a kernel that read past a row's last dim
    # (a whole vector where a masked one is due) would turn the result to NaN.
    E, S = 40, 71
    q = rng.standard_normal((1, Hq, L, E)).astype(dtype)
    kbig = np.full((1, 1, S, E + 24), np.nan, dtype)
    vbig = np.full((1, 1, S, Ev + 24), np.nan, dtype)
    kbig[..., :E] = rng.standard_normal((1, 1, S, E))
    vbig[..., :Ev] = rng.standard_normal((1, 1, S, Ev))
    k, v = kbig[..., :E], vbig[..., :Ev]
    got = mhattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    want = ref.scaled_dot_product_attention(q, k.copy(), v.copy(), enable_gqa=True)
    assert_close(got, want, "attention", dtype)

def test_fully_masked_rows_and_empty_lengths_in_half(rng):
    q, k, v = qkv(rng, BF16, 1, 2, 2, 1, 20, 16)
    got = mhattn.scaled_dot_product_attention(q, k, v, attn_mask=np.zeros((1, 20), bool))
    assert got.dtype == BF16 and not got.astype(np.float32).any()
    q, k, v = qkv(rng, BF16, 1, 2, 2, 1, 0, 16)
    assert not mhattn.scaled_dot_product_attention(q, k, v).astype(np.float32).any()


def test_float16_scores_beyond_65504_are_float32(isa, rng):
    # q·k reaches 10^6 here, beyond float16's range: the scores are float32, so the result is
    # the float32 answer on the same float16 values, not inf or NaN.
    E = 64
    q = np.full((1, 2, 1, E), 100, np.float16) + rng.random((1, 2, 1, E)).astype(np.float16)
    k = np.full((1, 2, 50, E), 100, np.float16) + rng.random((1, 2, 50, E)).astype(np.float16)
    v = rng.standard_normal((1, 2, 50, E)).astype(np.float16)
    for L in (1, 9):  # the decode path, and a widened tile
        qL = np.repeat(q, L, axis=2)
        got = mhattn.scaled_dot_product_attention(qL, k, v, scale=0.01)
        want = ref.scaled_dot_product_attention(qL, k, v, scale=0.01)
        assert np.isfinite(got.astype(np.float32)).all()
        assert_close(got, want, "attention", np.float16)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_a_half_cache_decodes_as_the_float32_cache_does(isa, rng, dtype):
    D, H, Hkv, steps = 64, 8, 2, 6
    mod = mhattn.MultiHeadAttention(D, H, num_kv_heads=Hkv, seed=3)
    x = rng.standard_normal((2, 20 + steps, D)).astype(np.float32)
    half = mhattn.KVCache(2, Hkv, 40, D // H, dtype=dtype.name)
    full = mhattn.KVCache(2, Hkv, 40, D // H)
    assert half._kv.nbytes == full._kv.nbytes // 2 and dtype.name in repr(half)
    for cache in (half, full):
        mod(x[:, :20], kv_cache=cache)  # a prompt of 20: a widened tile
    assert half.keys.dtype == dtype
    np.testing.assert_allclose(half.keys.astype(np.float32), full.keys, **tol("attention", dtype))
    for t in range(20, 20 + steps):  # then token by token: the decode path, reading the cache
        got, _ = mod(x[:, t:t + 1], kv_cache=half)
        want, _ = mod(x[:, t:t + 1], kv_cache=full)
        np.testing.assert_allclose(got, want, **tol("attention", dtype))


def test_half_cache_overflow_is_refused_and_leaves_it_unchanged(rng):
    mod = mhattn.MultiHeadAttention(16, 2, seed=0)
    cache = mhattn.KVCache(1, 2, 4, 8, dtype="bfloat16")
    mod(rng.standard_normal((1, 3, 16)).astype(np.float32), kv_cache=cache)
    before = cache.keys.copy()
    with pytest.raises(ValueError, match="kv_cache overflow"):
        mod(rng.standard_normal((1, 2, 16)).astype(np.float32), kv_cache=cache)
    assert len(cache) == 3
    np.testing.assert_array_equal(cache.keys.view(np.uint16), before.view(np.uint16))


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("L", [1, 23])
def test_half_keys_and_values_of_any_strides(isa, rng, dtype, L):
    # (B, S, H, E) memory seen as (B, H, S, E): rows H·E apart, read in place (decode) or
    # widened row by row (L = 23).
    q = rng.standard_normal((2, 3, L, 40)).astype(dtype)
    k = rng.standard_normal((2, 50, 3, 40)).astype(dtype).transpose(0, 2, 1, 3)
    v = rng.standard_normal((2, 50, 3, 24)).astype(dtype).transpose(0, 2, 1, 3)
    got = mhattn.scaled_dot_product_attention(q, k, v, is_causal=True, causal_align="bottom_right")
    want = ref.scaled_dot_product_attention(q, k, v, is_causal=True, causal_align="bottom_right")
    assert_close(got, want, "attention", dtype)
