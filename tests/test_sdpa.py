"""scaled_dot_product_attention against mhattn.reference."""

import numpy as np
import pytest

import mhattn
from mhattn import _core, reference as ref
from tolerances import BF16, assert_close


def qkv(rng, B, Hq, Hkv, L, S, E, Ev=None):
    Ev = E if Ev is None else Ev
    q = rng.standard_normal((B, Hq, L, E), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, S, E), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, S, Ev), dtype=np.float32)
    return q, k, v


def check(q, k, v, **kw):
    got = mhattn.scaled_dot_product_attention(q, k, v, **kw)
    assert_close(got, ref.scaled_dot_product_attention(q, k, v, **kw), "attention")
    return got


@pytest.mark.parametrize("L,S", [(1, 1), (7, 33), (33, 7), (65, 127), (127, 65), (1, 300)])
@pytest.mark.parametrize("E", [8, 33, 64])
def test_odd_lengths_and_head_dims(isa, threads, rng, L, S, E):
    check(*qkv(rng, 2, 3, 3, L, S, E))


@pytest.mark.parametrize("E,Ev", [(8, 8), (16, 24), (96, 96), (128, 128), (200, 7), (256, 256)])
def test_head_dims_8_to_256(isa, rng, E, Ev):
    check(*qkv(rng, 1, 2, 2, 37, 70, E, Ev))


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(1, 50), (13, 13), (20, 77), (77, 20), (130, 130)])
def test_causal_both_alignments(isa, threads, rng, align, L, S):
    check(*qkv(rng, 2, 2, 2, L, S, 32), is_causal=True, causal_align=align)


@pytest.mark.parametrize("window,causal", [(1, True), (5, True), (40, True), (3, False), (64, False)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_sliding_window(isa, rng, window, causal, align):
    check(*qkv(rng, 1, 2, 2, 70, 90, 16), is_causal=causal, window=window, causal_align=align)


@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (6, 2), (8, 8), (12, 4)])
def test_grouped_query_heads(isa, threads, rng, Hq, Hkv):
    q, k, v = qkv(rng, 2, Hq, Hkv, 19, 45, 24)
    check(q, k, v, enable_gqa=True)
    check(q, k, v, enable_gqa=True, is_causal=True)


@pytest.mark.parametrize("mask_shape", [(37, 41), (2, 1, 37, 41), (1, 3, 1, 41), (41,), (37, 1), (2, 3, 37, 41)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_broadcast(isa, rng, mask_shape, kind):
    q, k, v = qkv(rng, 2, 3, 3, 37, 41, 16)
    if kind == "bool":
        mask = rng.random(mask_shape) < 0.7
    else:
        mask = np.where(rng.random(mask_shape) < 0.2, -np.inf, rng.standard_normal(mask_shape)).astype(np.float32)
    check(q, k, v, attn_mask=mask)
    check(q, k, v, attn_mask=mask, is_causal=True)


def test_mask_is_not_materialised(rng, monkeypatch):
    # The kernel receives the broadcast view itself: a (1, 1, 1, S) mask arrives with zero strides.
    q, k, v = qkv(rng, 2, 3, 3, 5, 9, 8)
    seen = {}
    real = mhattn._core.attention

    def spy(out, weights, q, k, v, mask0, mask1, *rest):
        seen["strides"] = mask0[0].strides
        return real(out, weights, q, k, v, mask0, mask1, *rest)

    monkeypatch.setattr(mhattn._core, "attention", spy)
    mhattn.scaled_dot_product_attention(q, k, v, attn_mask=np.ones(9, bool))
    assert seen["strides"][:3] == (0, 0, 0)


def test_fully_masked_row_gives_zeros(isa, rng):
    q, k, v = qkv(rng, 1, 2, 2, 6, 10, 8)
    mask = np.ones((6, 10), bool)
    mask[2] = False
    got = check(q, k, v, attn_mask=mask)
    assert np.all(got[:, :, 2] == 0) and np.all(np.isfinite(got))
    fmask = np.zeros((6, 10), np.float32)
    fmask[4] = -np.inf
    got = check(q, k, v, attn_mask=fmask)
    assert np.all(got[:, :, 4] == 0)


@pytest.mark.parametrize("S", [64, 300])
def test_masks_hide_the_largest_scores(isa, rng, S):
    # The keys a mask hides score 400 above the ones it keeps: a row max taken before masking
    # would make every kept key's exp underflow to 0 and the row come out as zeros.
    L, E = 20, 16
    q = np.full((1, 2, L, E), 10.0, np.float32)
    k = np.zeros((1, 2, S, E), np.float32)
    k[..., ::3, :] = 10.0
    v = rng.standard_normal((1, 2, S, E), dtype=np.float32)
    keep = np.ones(S, bool)
    keep[::3] = False
    want = v[:, :, keep].mean(axis=2, keepdims=True)
    for mask in (keep, np.where(keep, 0.0, -1000.0).astype(np.float32)):
        got = check(q, k, v, attn_mask=mask)
        assert_close(got, np.broadcast_to(want, got.shape), "attention")


def test_scale(isa, rng):
    q, k, v = qkv(rng, 1, 2, 2, 9, 11, 16)
    check(q, k, v, scale=0.37)
    check(q, k, v, scale=2.0, is_causal=True)


def test_unbatched_3d(isa, rng):
    q, k, v = qkv(rng, 1, 3, 3, 9, 11, 16)
    got = check(q[0], k[0], v[0], attn_mask=rng.random((9, 11)) < 0.5)
    assert got.shape == (3, 9, 16)


def test_non_contiguous_inputs(isa, rng):
    q, k, v = qkv(rng, 3, 4, 4, 20, 30, 48)
    qs = q[::2, :, ::3]                                  # strided batch and length
    ks = np.swapaxes(np.swapaxes(k, 1, 2).copy(), 1, 2)[::2]  # (B, S, H, E) memory
    vs = v[::2, :, :, ::2]                               # strided last axis: copied
    check(qs, ks, vs)
    check(q[:, ::-1], k[:, ::-1], v[:, ::-1])            # negative strides


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float64])
def test_output_has_the_input_dtype(isa, rng, dtype):
    q, k, v = (a.astype(dtype) for a in qkv(rng, 2, 3, 3, 17, 21, 24))
    mask = (rng.standard_normal((17, 21)) * 2).astype(np.float16)  # a float mask of any dtype
    got = mhattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    want = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert_close(got, want, "attention", np.float32 if dtype == np.float64 else dtype)


def test_query_key_and_value_must_share_a_dtype(rng):
    q, k, v = qkv(rng, 1, 2, 2, 5, 6, 8)
    with pytest.raises(TypeError, match="query float32, key float16, value float32"):
        mhattn.scaled_dot_product_attention(q, k.astype(np.float16), v)


@pytest.mark.parametrize("cap", [0.5, 20.0])
@pytest.mark.parametrize("L,S,G", [(1, 1100, 1), (3, 70, 1), (33, 45, 1), (40, 130, 4)])
def test_softcap_caps_the_scores_before_the_masks(isa, rng, cap, L, S, G):
    q, k, v = qkv(rng, 2, 2 * G, 2, L, S, 24)
    q *= 4.0  # scores of several units, where tanh bends
    mask = rng.random((L, S)) < 0.8
    for kw in ({}, {"is_causal": True, "causal_align": "bottom_right"}, {"attn_mask": mask},
               {"attn_mask": np.where(mask, 0.5, -np.inf).astype(np.float32), "window": 7}):
        got = mhattn.scaled_dot_product_attention(q, k, v, enable_gqa=G > 1, softcap=cap, **kw)
        want = ref.scaled_dot_product_attention(q, k, v, enable_gqa=G > 1, softcap=cap, **kw)
        assert_close(got, want, "attention")


def test_softcap_gives_the_weights_it_attends_with(rng):
    # The weights come from a second pass over the keys: the cap must be applied in both.
    q, k, v = qkv(rng, 1, 2, 2, 9, 40, 16)
    q *= 4.0
    out = np.empty((1, 2, 9, 16), np.float32)
    weights = np.zeros((1, 2, 9, 40), np.float32)
    _core.attention(out, weights, q, k, v, None, None, False, 0, 0, 0.25, 3.0)
    want = ref.scaled_dot_product_attention(q, k, v, scale=0.25, softcap=3.0)
    assert_close(out, want, "attention")
    scores = 3.0 * np.tanh(q.astype(np.float64) @ np.swapaxes(k, -1, -2) * 0.25 / 3.0)
    assert_close(weights, ref.softmax(scores), "attention")


@pytest.mark.parametrize("L,S", [(0, 5), (5, 0), (0, 0)])
def test_zero_lengths(rng, L, S):
    q, k, v = qkv(rng, 2, 2, 2, L, S, 8)
    got = mhattn.scaled_dot_product_attention(q, k, v)
    assert got.shape == (2, 2, L, 8) and np.all(got == 0)


def test_nan_stays_in_the_rows_it_touches(isa, rng):
    q, k, v = qkv(rng, 1, 1, 1, 8, 40, 16)
    q[0, 0, 3, 5] = np.nan
    got = mhattn.scaled_dot_product_attention(q, k, v)
    assert np.all(np.isnan(got[0, 0, 3]))
    others = np.delete(got[0, 0], 3, axis=0)
    assert np.all(np.isfinite(others))
    k[0, 0, 0, 0] = np.nan  # key 0 feeds every row; causal row 0 sees only it
    got = mhattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert np.all(np.isnan(got))


def test_thread_count_changes_nothing_beyond_rounding(rng):
    q, k, v = qkv(rng, 2, 4, 4, 100, 130, 32)
    results = []
    for n in (1, 2, 3):
        mhattn.set_num_threads(n)
        results.append(mhattn.scaled_dot_product_attention(q, k, v, is_causal=True))
    mhattn.set_num_threads(2)
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("Hq,Hkv,L", [(4, 4, 1), (2, 1, 1), (6, 2, 1), (8, 2, 1), (4, 2, 2),
                                     (3, 3, 4), (4, 1, 1)])
@pytest.mark.parametrize("E", [8, 33, 64, 128])
def test_decode_tiles_of_few_rows(isa, threads, rng, Hq, Hkv, L, E):
    """Tiles of at most four query rows (here 1, 2, 3 and 4) read k and v in place instead of
    packing them, and take P · V in as few passes over v as their registers allow."""
    q, k, v = qkv(rng, 2, Hq, Hkv, L, 301, E)
    check(q, k, v, enable_gqa=True)
    check(q, k, v, enable_gqa=True, is_causal=True, causal_align="bottom_right")
    check(q, k, v, enable_gqa=True, attn_mask=rng.random((2, 1, L, 301)) < 0.5, window=100,
          is_causal=True, causal_align="bottom_right")
    ks = np.swapaxes(np.swapaxes(k, 1, 2).copy(), 1, 2)  # keys of all heads interleaved in memory
    check(q, ks, v, enable_gqa=True)


@pytest.mark.parametrize("B,Hq,Hkv,L,S", [(1, 1, 1, 1, 1100), (1, 4, 1, 1, 2999), (2, 2, 2, 1, 1537),
                                         (1, 2, 1, 2, 4100)])
@pytest.mark.parametrize("E", [33, 128])
def test_split_s_decode(isa, threads, rng, B, Hq, Hkv, L, S, E):
    """Decode with too few heads to keep the threads busy splits the keys into chunks (split-S)
    and merges their (max, sum, output): chunks that see no key, masks, windows, NaN."""
    q, k, v = qkv(rng, B, Hq, Hkv, L, S, E)
    kw = dict(enable_gqa=True)
    check(q, k, v, **kw)
    check(q, k, v, **kw, is_causal=True, causal_align="bottom_right", window=700)  # few chunks see keys
    check(q, k, v, **kw, attn_mask=rng.standard_normal((S,), dtype=np.float32) * 3)
    keep = np.zeros((B, 1, L, S), bool)
    keep[..., S // 3: S // 3 + 5] = True  # one chunk sees five keys, the others none
    check(q, k, v, **kw, attn_mask=keep)
    got = mhattn.scaled_dot_product_attention(q, k, v, attn_mask=np.zeros((S,), bool), **kw)
    assert np.all(got == 0)  # no key visible anywhere
    k[0, 0, S - 1, 0] = np.nan  # the last chunk's NaN reaches every row of kv head 0
    got = mhattn.scaled_dot_product_attention(q, k, v, **kw)
    assert np.all(np.isnan(got[0, : Hq // Hkv]))
    assert np.all(np.isfinite(got[1:])) and np.all(np.isfinite(got[0, Hq // Hkv:]))


@pytest.mark.parametrize("Hq,Hkv,L,S", [(1, 1, 1100, 1030), (8, 1, 131, 300), (4, 2, 520, 77)])
def test_many_tiles_per_head_pack_keys_once(isa, threads, rng, Hq, Hkv, L, S):
    """With at least 16 tiles of query rows per kv head, the key blocks are packed once per call."""
    q, k, v = qkv(rng, 1, Hq, Hkv, L, S, 24, 40)
    check(q, k, v, enable_gqa=True)
    check(q, k, v, enable_gqa=True, is_causal=True, causal_align="bottom_right")
    check(q, k, v, enable_gqa=True, attn_mask=rng.random((L, S)) < 0.6, window=200)


@pytest.mark.parametrize("Hq,Hkv,L,S,E,Ev", [(2, 2, 37, 300, 12, 12), (4, 2, 100, 77, 8, 5),
                                              (3, 1, 19, 261, 33, 47), (1, 1, 300, 129, 96, 17),
                                              (2, 1, 16, 1000, 64, 64), (1, 1, 40, 50, 768, 40)])
def test_rows_in_vector_lanes(isa, threads, rng, Hq, Hkv, L, S, E, Ev):
    """Without weights, AVX-512 puts 16 query rows in the lanes of a vector: rows not a multiple
    of 16, key blocks that end inside a register tile, Ev over several register tiles, GQA rows
    of several heads in one vector, every causal and window bound, rows that see no key
    (bottom-right with L > S), masks of one value per key (broadcast to the lanes; per head too,
    without GQA), masks that differ per query or per head within a vector (transposed into the
    lanes: float and bool, contiguous and strided), the heads of q, k and v interleaved in
    memory."""
    q, k, v = qkv(rng, 2, Hq, Hkv, L, S, E, Ev)
    check(q, k, v, enable_gqa=True)
    check(q, k, v, enable_gqa=True, is_causal=True)
    check(q, k, v, enable_gqa=True, is_causal=True, causal_align="bottom_right")
    check(q, k, v, enable_gqa=True, window=45)
    check(q, k, v, enable_gqa=True, is_causal=True, causal_align="bottom_right", window=130)
    padding = rng.random((2, 1, 1, S)) < 0.8
    check(q, k, v, enable_gqa=True, attn_mask=padding, is_causal=True)
    check(q, k, v, enable_gqa=True, attn_mask=rng.standard_normal(S, dtype=np.float32) * 3)
    per_head = rng.standard_normal((2, Hq, 1, S), dtype=np.float32) * 3
    check(q, k, v, enable_gqa=True, attn_mask=per_head, window=45)
    per_query = rng.standard_normal((L, S), dtype=np.float32) * 3
    check(q, k, v, enable_gqa=True, attn_mask=per_query, is_causal=True)
    keep = rng.random((2, Hq, L, S)) < 0.7
    check(q, k, v, enable_gqa=True, attn_mask=keep, window=45)
    keep[..., S // 2] = False  # a NaN score that the bool mask hides: it replaces, not adds
    hidden = k.copy()
    hidden[:, :, S // 2, 0] = np.nan
    check(q, hidden, v, enable_gqa=True, attn_mask=keep)
    strided = (rng.standard_normal((L, 2 * S), dtype=np.float32) * 3)[:, ::2]
    check(q, k, v, enable_gqa=True, attn_mask=strided)
    interleaved = [np.swapaxes(np.swapaxes(x, 1, 2).copy(), 1, 2) for x in (q, k, v)]
    check(*interleaved, enable_gqa=True, is_causal=True)  # rows of a head Hq·E or Hkv·E apart


@pytest.mark.parametrize("L", [3, 40])
def test_bounds_hide_what_a_float_mask_adds(isa, threads, rng, L):
    """A key outside the causal bounds stays hidden even where a float mask adds +inf or NaN to
    its score, as in the reference (the bounds come after the masks): L = 3 takes the direct
    path, L = 40 the tiles or the lanes."""
    q, k, v = qkv(rng, 1, 2, 2, L, 40, 16)
    mask = rng.standard_normal((L, 40)).astype(np.float32)
    above = np.triu(np.ones((L, 40), bool), 1)
    mask[above] = np.where(rng.random(above.sum()) < 0.5, np.inf, np.nan)
    got = check(q, k, v, attn_mask=mask, is_causal=True)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_inf_input_gives_what_the_reference_gives(isa, rng, where, value):
    """Inf goes where the math sends it (inf - inf in a softmax is NaN): the NaN pattern and the
    finite values match the reference, and nothing crashes."""
    q, k, v = qkv(rng, 1, 2, 2, 6, 9, 8)
    {"query": q, "key": k, "value": v}[where][0, 1, 2, 3] = value
    got = mhattn.scaled_dot_product_attention(q, k, v)
    with np.errstate(invalid="ignore", over="ignore"):
        want = ref.scaled_dot_product_attention(q, k, v)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=2e-5)
    assert np.all(np.isfinite(got[:, 0]))  # head 0 never sees the inf
