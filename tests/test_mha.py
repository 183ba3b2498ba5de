"""MultiHeadAttention and KVCache against mhattn.reference."""

import numpy as np
import pytest

import mhattn
from mhattn import reference as ref
from tolerances import TOL, assert_close, tol


def randomize(mod, rng):
    """Non-zero biases and weights of order 1/sqrt(fan-in), so every term shows in the output."""
    sd = {k: (rng.standard_normal(v.shape) * (v.shape[-1] ** -0.5 if v.ndim == 2 else 0.5)).astype(np.float32)
          for k, v in mod.state_dict().items()}
    mod.load_state_dict(sd)
    return mod


def check(mod, q, k=None, v=None, **kw):
    out, w = mod(q, k, v, **kw)
    k = q if k is None else k
    v = q if v is None else v
    rout, rw = ref.multi_head_attention(q, k, v, mod.state_dict(), mod.num_heads, mod.num_kv_heads,
                                        batch_first=mod.batch_first, **kw)
    assert_close(out, rout, "mha")
    if kw.get("need_weights"):
        assert_close(w, rw, "mha")
    else:
        assert w is None
    return out, w


@pytest.mark.parametrize("D,H,L", [(24, 4, 7), (33, 3, 33), (64, 8, 65), (128, 2, 1), (96, 12, 17)])
def test_self_attention(isa, threads, rng, D, H, L):
    mod = randomize(mhattn.MultiHeadAttention(D, H), rng)
    check(mod, rng.standard_normal((3, L, D), dtype=np.float32))


@pytest.mark.parametrize("kdim,vdim", [(None, None), (20, 36), (48, 48)])
@pytest.mark.parametrize("L,S", [(5, 17), (17, 5), (1, 40)])
def test_cross_attention_encoder_decoder(isa, rng, kdim, vdim, L, S):
    D = 32
    mod = randomize(mhattn.MultiHeadAttention(D, 4, kdim=kdim, vdim=vdim), rng)
    dec = rng.standard_normal((2, L, D), dtype=np.float32)
    k = rng.standard_normal((2, S, kdim or D), dtype=np.float32)
    v = rng.standard_normal((2, S, vdim or D), dtype=np.float32)
    check(mod, dec, k, v)
    if kdim == vdim:
        check(mod, dec, k, k)  # one encoder output for both, the common case


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (6, 1), (4, 4)])
def test_grouped_query_heads(isa, rng, Hq, Hkv):
    mod = randomize(mhattn.MultiHeadAttention(48, Hq, num_kv_heads=Hkv), rng)
    check(mod, rng.standard_normal((2, 11, 48), dtype=np.float32), is_causal=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("am_shape", [None, "LS", "BHLS"])
def test_masks(isa, rng, kind, am_shape):
    B, L, S, D, H = 2, 9, 13, 32, 4
    mod = randomize(mhattn.MultiHeadAttention(D, H), rng)

    def mk(shape):
        if kind == "bool":
            return rng.random(shape) < 0.3
        return np.where(rng.random(shape) < 0.3, -np.inf, rng.standard_normal(shape)).astype(np.float32)

    kpm = mk((B, S))
    am = None if am_shape is None else mk((L, S) if am_shape == "LS" else (B * H, L, S))
    q = rng.standard_normal((B, L, D), dtype=np.float32)
    kv = rng.standard_normal((B, S, D), dtype=np.float32)
    check(mod, q, kv, kv, key_padding_mask=kpm, attn_mask=am)
    check(mod, q, kv, kv, key_padding_mask=kpm, attn_mask=am, need_weights=True)


def test_fully_masked_row_gives_out_proj_bias(isa, rng):
    mod = randomize(mhattn.MultiHeadAttention(16, 2), rng)
    x = rng.standard_normal((2, 5, 16), dtype=np.float32)
    kpm = np.zeros((2, 5), bool)
    kpm[1] = True  # batch 1 sees no key at all
    out, w = check(mod, x, key_padding_mask=kpm, need_weights=True)
    np.testing.assert_array_equal(out[1], np.broadcast_to(mod.out_proj_bias, (5, 16)))
    assert np.all(w[1] == 0)


@pytest.mark.parametrize("average", [True, False])
def test_attention_weights(isa, rng, average):
    mod = randomize(mhattn.MultiHeadAttention(40, 5), rng)
    x = rng.standard_normal((2, 19, 40), dtype=np.float32)
    _, w = check(mod, x, need_weights=True, average_attn_weights=average, is_causal=True)
    assert w.shape == ((2, 19, 19) if average else (2, 5, 19, 19))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def test_batch_first_false_and_unbatched(isa, rng):
    mod = randomize(mhattn.MultiHeadAttention(24, 3, batch_first=False), rng)
    x = rng.standard_normal((7, 2, 24), dtype=np.float32)  # (L, B, D)
    out, _ = check(mod, x, key_padding_mask=rng.random((2, 7)) < 0.3, need_weights=True)
    assert out.shape == (7, 2, 24)
    out, w = check(mod, x[:, 0], need_weights=True)         # (L, D): no batch axis
    assert out.shape == (7, 24) and w.shape == (7, 7)


def test_no_bias(isa, rng):
    mod = randomize(mhattn.MultiHeadAttention(32, 4, bias=False), rng)
    assert "in_proj_bias" not in mod.state_dict()
    check(mod, rng.standard_normal((2, 6, 32), dtype=np.float32))


def test_non_contiguous_input(isa, rng):
    mod = randomize(mhattn.MultiHeadAttention(32, 4), rng)
    x = rng.standard_normal((4, 12, 64), dtype=np.float32)[::2, ::3, ::2]
    check(mod, x)


def test_state_dict_round_trip_and_read_only_weights(rng):
    a = randomize(mhattn.MultiHeadAttention(32, 4, kdim=16, vdim=8), rng)
    b = mhattn.MultiHeadAttention(32, 4, kdim=16, vdim=8)
    b.load_state_dict(a.state_dict())
    x, kv1, kv2 = (rng.standard_normal((2, 5, d), dtype=np.float32) for d in (32, 16, 8))
    np.testing.assert_array_equal(a(x, kv1, kv2)[0], b(x, kv1, kv2)[0])
    assert set(a.state_dict()) == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                                   "out_proj.weight", "out_proj.bias"}
    with pytest.raises(ValueError):
        a.q_proj_weight[0, 0] = 1.0  # weights are packed: writing them in place would be ignored


def test_weights_follow_the_active_target(rng):
    """A layer built under one SIMD target still answers right after the target changes."""
    mod = randomize(mhattn.MultiHeadAttention(32, 4), rng)
    x = rng.standard_normal((2, 6, 32), dtype=np.float32)
    before = mhattn._core.target()
    try:
        for t in mhattn._core.targets():
            mhattn._core.set_target(t)
            check(mod, x)
    finally:
        mhattn._core.set_target(before)


# ---- KV cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2)])
def test_kv_cache_decode_equals_full_causal_attention(isa, threads, rng, Hq, Hkv):
    D, T, prompt = 32, 23, 9
    mod = randomize(mhattn.MultiHeadAttention(D, Hq, num_kv_heads=Hkv), rng)
    x = rng.standard_normal((2, T, D), dtype=np.float32)
    full, _ = mod(x, is_causal=True)
    cache = mhattn.KVCache(2, Hkv, 40, D // Hq)
    steps = [mod(x[:, :prompt], kv_cache=cache)[0]]           # the prompt as one chunk
    steps += [mod(x[:, t:t + 1], kv_cache=cache)[0] for t in range(prompt, T)]  # then one token a step
    assert len(cache) == T
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, **TOL["mha"])
    assert cache.keys.shape == (2, Hkv, T, D // Hq)


def test_kv_cache_overflow_leaves_cache_unchanged(rng):
    mod = mhattn.MultiHeadAttention(16, 2, seed=1)
    cache = mhattn.KVCache(1, 2, 6, 8)
    mod(rng.standard_normal((1, 4, 16), dtype=np.float32), kv_cache=cache)
    before = cache.keys.copy(), cache.values.copy()
    with pytest.raises(ValueError, match="overflow"):
        mod(rng.standard_normal((1, 3, 16), dtype=np.float32), kv_cache=cache)
    assert len(cache) == 4
    np.testing.assert_array_equal(cache.keys, before[0])
    np.testing.assert_array_equal(cache.values, before[1])
    mod(rng.standard_normal((1, 2, 16), dtype=np.float32), kv_cache=cache)  # exactly full is fine
    assert len(cache) == 6


def test_kv_cache_with_need_weights_and_padding(isa, rng):
    mod = randomize(mhattn.MultiHeadAttention(16, 2), rng)
    x = rng.standard_normal((2, 6, 16), dtype=np.float32)
    cache = mhattn.KVCache(2, 2, 6, 8)
    mod(x[:, :5], kv_cache=cache)
    kpm = np.zeros((2, 6), bool)
    kpm[0, 1] = True
    out, w = mod(x[:, 5:], kv_cache=cache, key_padding_mask=kpm, need_weights=True)
    rout, rw = ref.multi_head_attention(x, x, x, mod.state_dict(), 2, key_padding_mask=kpm,
                                        need_weights=True, is_causal=True)
    assert_close(out, rout[:, 5:], "mha")
    assert_close(w, rw[:, 5:], "mha")


def test_kv_cache_truncate_steps_back(rng):
    mod = randomize(mhattn.MultiHeadAttention(16, 2), rng)
    x = rng.standard_normal((1, 7, 16), dtype=np.float32)
    cache = mhattn.KVCache(1, 2, 8, 8)
    mod(x[:, :5], kv_cache=cache)
    first = mod(x[:, 5:6], kv_cache=cache)[0]
    cache.truncate(5)                       # forget token 5, then feed it again
    np.testing.assert_array_equal(mod(x[:, 5:6], kv_cache=cache)[0], first)
    with pytest.raises(ValueError, match="holds only 6"):
        cache.truncate(7)
    cache.reset()
    assert len(cache) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_kv_cache_append_rounds_and_an_overflow_changes_nothing(rng, dtype):
    # Layers that change keys after the projection (rotary positions) append themselves.
    cache = mhattn.KVCache(2, 3, 7, 5, dtype=dtype)
    k, v = (rng.standard_normal((2, 3, 4, 5), dtype=np.float32) for _ in range(2))
    cache.append(k, v)
    cache.append(k[:, :, :2], v[:, :, 2:])
    assert len(cache) == 6 and cache.keys.dtype == cache.dtype
    want_k = np.concatenate([k, k[:, :, :2]], 2).astype(cache.dtype)
    want_v = np.concatenate([v, v[:, :, 2:]], 2).astype(cache.dtype)
    np.testing.assert_array_equal(cache.keys, want_k)
    np.testing.assert_array_equal(cache.values, want_v)
    with pytest.raises(ValueError, match="overflow"):
        cache.append(k[:, :, :2], v[:, :, :2])
    for bad_k, bad_v, what in ((k[:, :2, :1], v[:, :2, :1], "num_kv_heads=3"),
                               (k[..., :1, :4], v[..., :1, :4], "head_dim=5"),
                               (k[:, :, :1], v[:, :, :2], "values 2"),
                               (k[0, :, :1], v[0, :, :1], "batch=2")):
        with pytest.raises(ValueError, match=what):
            cache.append(bad_k, bad_v)
    with pytest.raises(TypeError, match="keys"):
        cache.append(k[:, :, :1].astype(np.int32), v[:, :, :1])
    assert len(cache) == 6
    np.testing.assert_array_equal(cache.keys, want_k)
    cache.append(k[:, :, :1], v[:, :, :1])  # exactly full is fine
    assert len(cache) == 7


# ---- varlen: sequences packed end to end ---------------------------------------------------

@pytest.mark.parametrize("Hq,Hkv,causal", [(4, 4, False), (6, 2, False), (6, 3, True)])
def test_varlen_equals_the_padded_layer_on_the_real_rows(isa, rng, Hq, Hkv, causal):
    D = Hq * 5  # head dim 5: odd
    mod = randomize(mhattn.MultiHeadAttention(D, Hq, num_kv_heads=Hkv), rng)
    lengths = np.array([3, 0, 17, 1, 9])  # an empty sequence among them
    T = lengths.max()
    keep = np.arange(T) < lengths[:, None]
    grid = rng.standard_normal((len(lengths), T, D), dtype=np.float32)
    grid[~keep] = np.nan  # padding never reaches the real rows
    out = mod.varlen(grid[keep], lengths, is_causal=causal)
    assert out.shape == (lengths.sum(), D) and out.dtype == np.float32
    x = np.where(keep[..., None], grid, 0)
    want, _ = ref.multi_head_attention(x, x, x, mod.state_dict(), Hq, num_kv_heads=Hkv,
                                       key_padding_mask=~keep, is_causal=causal)
    assert_close(out, want[keep], "mha")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_varlen_in_half_follows_the_reference(rng, dtype):
    # weights in the half dtype, x float32: the reference in float64 on the rounded weights and
    # x rounded as the products round it
    mod = randomize(mhattn.MultiHeadAttention(24, 3), rng)
    half = mhattn.MultiHeadAttention(24, 3, dtype=dtype)
    half.load_state_dict(mod.state_dict())
    lengths = np.array([5, 11, 2])
    keep = np.arange(11) < lengths[:, None]
    x = np.where(keep[..., None], rng.standard_normal((3, 11, 24), dtype=np.float32), 0)
    x = x.astype(half.dtype).astype(np.float32)
    out = half.varlen(x[keep], lengths)
    assert out.dtype == np.float32
    want, _ = ref.multi_head_attention(x, x, x, half.state_dict(), 3, key_padding_mask=~keep)
    np.testing.assert_allclose(out, want[keep], **tol("mha", half.dtype))


def test_varlen_bad_input_raises():
    mod = mhattn.MultiHeadAttention(8, 2)
    x = np.zeros((5, 8), np.float32)
    for bad in ([2, 2], [6, -1], [[5]], [2.5, 2.5]):
        with pytest.raises(ValueError, match="lengths"):
            mod.varlen(x, bad)
    with pytest.raises(ValueError, match="embed_dim=8"):
        mod.varlen(np.zeros((5, 7), np.float32), [5])
    with pytest.raises(ValueError, match="kdim"):
        mhattn.MultiHeadAttention(8, 2, kdim=4).varlen(x, [5])
    assert mod.varlen(x[:0], [0, 0]).shape == (0, 8)
