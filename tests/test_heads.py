"""Heads one can mask and remove: MultiHeadAttention's head_mask and prune_heads against the
float64 reference, with grouped-query heads, masks, weights, bfloat16 and torch tensors."""

import numpy as np
import pytest

import mhattn
from mhattn import reference as ref
from tolerances import BF16, assert_close, tol


def layer(rng, H, Hkv=None, D=None, dtype=None, **kw):
    D = D or 8 * H + 0
    mod = mhattn.MultiHeadAttention(D, H, num_kv_heads=Hkv, dtype=dtype, **kw)
    # Random biases too (the layer starts them at zero), so a pruned row of a bias shows.
    mod.load_state_dict({n: rng.standard_normal(w.shape).astype(np.float32) * 0.3
                         for n, w in mod.state_dict().items()})
    return mod


def ref_mha(mod, x, **kw):
    return ref.multi_head_attention(x, x, x, mod.state_dict(), mod.num_heads, mod.num_kv_heads,
                                    batch_first=mod.batch_first, **kw)


@pytest.mark.parametrize("H,Hkv,drop", [(6, None, [1, 4]), (8, 2, [0, 1, 2, 3]), (8, 2, [5]),
                                         (8, 4, [0, 3, 6]), (4, 1, [0, 1, 2])])
def test_prune_heads_equals_the_masked_layer(isa, rng, H, Hkv, drop):
    # (8, 2, [5]) leaves groups of 4 and 3: the kv heads are repeated into groups of 1.
    mod = layer(rng, H, Hkv, D=8 * H)
    x = rng.standard_normal((2, 11, 8 * H)).astype(np.float32)
    m = np.ones(H, np.float32)
    m[drop] = 0
    want, _ = ref_mha(mod, x, head_mask=m)
    assert_close(mod(x, head_mask=m)[0], want, "mha")
    mod.prune_heads(drop)
    assert mod.num_heads == H - len(drop)
    assert_close(mod(x)[0], want, "mha")
    sd = mod.state_dict()
    assert sd["out_proj.weight"].shape == (8 * H, 8 * mod.num_heads)
    assert_close(mod(x)[0], ref_mha(mod, x)[0], "mha")  # the reference on the pruned weights
    fresh = mhattn.MultiHeadAttention(8 * H, mod.num_heads, num_kv_heads=mod.num_kv_heads,
                                      head_dim=8)
    fresh.load_state_dict(sd)
    np.testing.assert_array_equal(fresh(x)[0], mod(x)[0])


def test_prune_heads_in_cross_attention(rng):
    H, D, kdim, vdim = 6, 48, 20, 36
    mod = layer(rng, H, 3, D=D, kdim=kdim, vdim=vdim)
    x = rng.standard_normal((2, 5, D)).astype(np.float32)
    k = rng.standard_normal((2, 9, kdim)).astype(np.float32)
    v = rng.standard_normal((2, 9, vdim)).astype(np.float32)
    m = np.array([1, 1, 0, 0, 1, 0], np.float32)
    masked = mod(x, k, v, head_mask=m)[0]
    want = ref.multi_head_attention(x, k, v, mod.state_dict(), H, 3, head_mask=m)[0]
    assert_close(masked, want, "mha")
    mod.prune_heads([2, 3, 5])
    assert_close(mod(x, k, v)[0], want, "mha")
    assert mod.state_dict()["k_proj_weight"].shape == (mod.num_kv_heads * 8, kdim)


def test_prune_heads_drops_a_kv_head_with_its_last_query_head(rng):
    mod = layer(rng, 8, 2, D=64)
    mod.prune_heads([4, 5, 6, 7])
    assert (mod.num_heads, mod.num_kv_heads) == (4, 1)
    assert mod.state_dict()["in_proj_weight"].shape == (4 * 8 + 2 * 8, 64)
    assert "pruned" in repr(mod)


@pytest.mark.parametrize("shape", ["heads", "batch"])
def test_head_mask_scales_each_heads_output_and_weights(isa, rng, shape):
    mod = layer(rng, 4, D=32)
    x = rng.standard_normal((3, 9, 32)).astype(np.float32)
    m = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
    if shape == "batch":  # a mask per sequence, two of them equal
        m = np.array([[1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.5, 2.0]], np.float32)
    kpm = np.zeros((3, 9), bool)
    kpm[1, 6:] = True
    out, w = mod(x, head_mask=m, key_padding_mask=kpm, need_weights=True,
                 average_attn_weights=False)
    want, want_w = ref_mha(mod, x, head_mask=m, key_padding_mask=kpm, need_weights=True,
                           average_attn_weights=False)
    assert_close(out, want, "mha")
    assert_close(w, want_w, "mha")
    if shape == "batch":  # every head masked: the out-projection's bias alone
        np.testing.assert_allclose(out[1], np.broadcast_to(mod.state_dict()["out_proj.bias"], (9, 32)))
    avg = mod(x, head_mask=m, key_padding_mask=kpm, need_weights=True)[1]
    assert_close(avg, want_w.mean(axis=1), "mha")


def test_head_mask_with_per_head_masks_causal_and_seq_major(rng):
    mod = layer(rng, 4, D=32, batch_first=False)
    x = rng.standard_normal((7, 2, 32)).astype(np.float32)  # (L, B, D)
    am = rng.standard_normal((2 * 4, 7, 7)).astype(np.float32)  # (B·H, L, S)
    m = np.array([[0, 1, 1, 0], [1, 1, 0, 1]], np.float32)
    got = mod(x, head_mask=m, attn_mask=am, is_causal=True)[0]
    want = ref_mha(mod, x, head_mask=m, attn_mask=am, is_causal=True)[0]
    assert_close(got, want, "mha")


def test_head_mask_in_bfloat16_and_with_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    mod = layer(rng, 4, D=32, dtype="bfloat16")
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    m = np.array([1, 0, 1, 0], np.float32)
    got = mod(torch.from_numpy(x), head_mask=torch.from_numpy(m))[0]
    assert isinstance(got, torch.Tensor)
    want = ref_mha(mod, x.astype(BF16), head_mask=m)[0]
    assert got.dtype == torch.float32  # x's dtype; computed in the layer's bfloat16
    np.testing.assert_allclose(got.numpy(), want, **tol("mha", BF16))


def test_head_mask_errors(rng):
    mod = layer(rng, 4, D=32)
    x = np.zeros((2, 5, 32), np.float32)
    with pytest.raises(ValueError, match=r"head_mask must be \(4,\) or"):
        mod(x, head_mask=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="finite"):
        mod(x, head_mask=np.array([1, np.nan, 1, 1], np.float32))
    with pytest.raises(ValueError, match=r"head_mask must be \(4,\) or"):
        mod(x, head_mask=np.ones((3, 4), np.float32), kv_cache=mhattn.KVCache(2, 4, 8, 8))
    with pytest.raises(ValueError, match="all 4 heads"):
        mod.prune_heads([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"ints in \[0, 4\)"):
        mod.prune_heads([4])
    assert mod.prune_heads([]).num_heads == 4


def test_masked_layers_follow_new_weights(rng):
    mod = layer(rng, 4, D=32)
    x = rng.standard_normal((1, 5, 32)).astype(np.float32)
    m = np.array([1, 0, 1, 1], np.float32)
    mod(x, head_mask=m)
    mod.load_state_dict({n: w * 2 for n, w in mod.state_dict().items()})
    assert_close(mod(x, head_mask=m)[0], ref_mha(mod, x, head_mask=m)[0], "mha")


@pytest.mark.parametrize("H,Hkv", [(4, None), (8, 2), (6, 3)])
def test_head_mask_with_a_kv_cache(isa, rng, H, Hkv):
    # Decoding with a mask that changes from call to call: every call's rows equal the
    # reference over the whole sequence (causal) with that call's mask, so the cache kept the
    # keys and values of the heads an earlier call masked.
    B, T, D = 2, 10, 8 * H
    mod = layer(rng, H, Hkv, D=D)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    some = np.ones(H, np.float32)
    some[[0, H - 1]] = 0
    per_row = np.stack([np.linspace(0, 2, H), np.zeros(H)]).astype(np.float32)  # row 1: none
    cache = mhattn.KVCache(B, mod.num_kv_heads, T, mod.head_dim)
    for (a, b), m in zip([(0, 4), (4, 5), (5, 6), (6, 8), (8, 10)],
                         [some, per_row, None, 1 - some, some * 0.5]):
        got, w = mod(x[:, a:b], kv_cache=cache, head_mask=m, need_weights=True,
                     average_attn_weights=False)
        want, want_w = ref_mha(mod, x, head_mask=m, is_causal=True, need_weights=True,
                               average_attn_weights=False)
        assert_close(got, want[:, a:b], "mha")
        assert_close(w, want_w[:, :, a:b, :b], "mha")
        assert len(cache) == b
    np.testing.assert_allclose(mod(x[:, :1], head_mask=per_row, kv_cache=mhattn.KVCache(
        B, mod.num_kv_heads, 1, mod.head_dim))[0][1], np.broadcast_to(
        mod.state_dict()["out_proj.bias"], (1, D)))  # every head masked: the bias alone


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_pruned_decoding_equals_masked_decoding(rng, cache_dtype):
    # In bfloat16 both caches hold the same rounded keys and values of the kept kv heads, but
    # the two calls may take different paths (a kv head's group of query heads differs), and
    # the bfloat16 tiles round q: bfloat16's tolerance there.
    H, Hkv, drop = 8, 4, [1, 2, 3, 6]
    mod = layer(rng, 8, 4, D=64, batch_first=False)
    pruned = layer(rng, 8, 4, D=64, batch_first=False)
    pruned.load_state_dict(mod.state_dict())
    pruned.prune_heads(drop)
    m = np.ones(H, np.float32)
    m[drop] = 0
    x = rng.standard_normal((7, 3, 64)).astype(np.float32)  # (L, B, D)
    full = mhattn.KVCache(3, Hkv, 7, 8, dtype=cache_dtype)
    small = mhattn.KVCache(3, pruned.num_kv_heads, 7, 8, dtype=cache_dtype)
    t = tol("mha", BF16 if cache_dtype == "bfloat16" else np.float32)
    for a, b in [(0, 3), (3, 4), (4, 7)]:
        np.testing.assert_allclose(mod(x[a:b], kv_cache=full, head_mask=m)[0],
                                   pruned(x[a:b], kv_cache=small)[0], **t)
