"""A table of bad inputs: each raises its named error with the argument in the message."""

import numpy as np
import pytest

import mhattn

f32 = np.float32


def z(*shape, dtype=f32):
    return np.zeros(shape, dtype)


sdpa = mhattn.scaled_dot_product_attention
mha = mhattn.MultiHeadAttention(16, 4, seed=0)
mha_kv = mhattn.MultiHeadAttention(16, 4, kdim=8, vdim=12, seed=0)

BAD = [
    # (id, call, error, message fragment)
    ("sdpa wrong ndim", lambda: sdpa(z(2, 3), z(2, 3), z(2, 3)), ValueError, "query"),
    ("sdpa mixed ndim", lambda: sdpa(z(1, 2, 3, 4), z(2, 3, 4), z(2, 3, 4)), ValueError, "(1, 2, 3, 4)"),
    ("sdpa batch mismatch", lambda: sdpa(z(2, 2, 3, 4), z(1, 2, 3, 4), z(1, 2, 3, 4)), ValueError, "batch"),
    ("sdpa head dim mismatch", lambda: sdpa(z(1, 2, 3, 4), z(1, 2, 3, 5), z(1, 2, 3, 4)), ValueError, "head dim"),
    ("sdpa kv length mismatch", lambda: sdpa(z(1, 2, 3, 4), z(1, 2, 3, 4), z(1, 2, 5, 4)), ValueError, "length"),
    ("sdpa heads need gqa", lambda: sdpa(z(1, 4, 3, 4), z(1, 2, 3, 4), z(1, 2, 3, 4)), ValueError, "enable_gqa"),
    ("sdpa gqa not a multiple", lambda: sdpa(z(1, 3, 3, 4), z(1, 2, 3, 4), z(1, 2, 3, 4), enable_gqa=True), ValueError, "multiple"),
    ("sdpa mask does not broadcast", lambda: sdpa(z(1, 2, 3, 4), z(1, 2, 5, 4), z(1, 2, 5, 4), attn_mask=z(3, 4)), ValueError, "attn_mask"),
    ("sdpa int mask", lambda: sdpa(z(1, 2, 3, 4), z(1, 2, 5, 4), z(1, 2, 5, 4), attn_mask=z(3, 5, dtype=np.int32)), TypeError, "attn_mask"),
    ("sdpa int query", lambda: sdpa(z(1, 2, 3, 4, dtype=np.int64), z(1, 2, 3, 4), z(1, 2, 3, 4)), TypeError, "query"),
    ("sdpa complex key", lambda: sdpa(z(1, 2, 3, 4), z(1, 2, 3, 4, dtype=np.complex64), z(1, 2, 3, 4)), TypeError, "key"),
    ("sdpa object value", lambda: sdpa(z(1, 2, 3, 4), z(1, 2, 3, 4), z(1, 2, 3, 4, dtype=object)), TypeError, "value"),
    ("sdpa bool query", lambda: sdpa(z(1, 2, 3, 4, dtype=bool), z(1, 2, 3, 4), z(1, 2, 3, 4)), TypeError, "query"),
    ("sdpa bad align", lambda: sdpa(z(1, 2, 3, 4), z(1, 2, 3, 4), z(1, 2, 3, 4), causal_align="center"), ValueError, "causal_align"),
    ("sdpa bad window", lambda: sdpa(z(1, 2, 3, 4), z(1, 2, 3, 4), z(1, 2, 3, 4), window=0), ValueError, "window"),
    ("sdpa float window", lambda: sdpa(z(1, 2, 3, 4), z(1, 2, 3, 4), z(1, 2, 3, 4), window=2.5), TypeError, "window"),
    ("sdpa E=0 without scale", lambda: sdpa(z(1, 2, 3, 0), z(1, 2, 3, 0), z(1, 2, 3, 4)), ValueError, "scale"),
    ("mha heads do not divide", lambda: mhattn.MultiHeadAttention(10, 3), ValueError, "divisible"),
    ("mha kv heads do not divide", lambda: mhattn.MultiHeadAttention(12, 4, num_kv_heads=3), ValueError, "multiple"),
    ("mha zero heads", lambda: mhattn.MultiHeadAttention(12, 0), ValueError, "num_heads"),
    ("mha float embed_dim", lambda: mhattn.MultiHeadAttention(12.0, 2), TypeError, "embed_dim"),
    ("mha wrong width", lambda: mha(z(2, 3, 15)), ValueError, "query"),
    ("mha wrong ndim", lambda: mha(z(1, 2, 3, 16)), ValueError, "batched"),
    ("mha key without value", lambda: mha(z(2, 3, 16), z(2, 3, 16)), ValueError, "both key and value"),
    ("mha kdim mismatch", lambda: mha_kv(z(2, 3, 16), z(2, 5, 16), z(2, 5, 12)), ValueError, "key"),
    ("mha kv length mismatch", lambda: mha_kv(z(2, 3, 16), z(2, 5, 8), z(2, 4, 12)), ValueError, "length"),
    ("mha batch mismatch", lambda: mha_kv(z(2, 3, 16), z(3, 5, 8), z(3, 5, 12)), ValueError, "batch"),
    ("mha padding mask shape", lambda: mha(z(2, 3, 16), key_padding_mask=z(2, 4, dtype=bool)), ValueError, "key_padding_mask"),
    ("mha attn mask shape", lambda: mha(z(2, 3, 16), attn_mask=z(3, 4, dtype=bool)), ValueError, "attn_mask"),
    ("mha int mask", lambda: mha(z(2, 3, 16), attn_mask=z(3, 3, dtype=np.int8)), TypeError, "attn_mask"),
    ("mha int input", lambda: mha(z(2, 3, 16, dtype=np.int32)), TypeError, "query"),
    ("load_state_dict wrong shape", lambda: mha.load_state_dict({**mha.state_dict(), "out_proj.weight": z(16, 15)}), ValueError, "out_proj.weight"),
    ("load_state_dict missing key", lambda: mha.load_state_dict({"out_proj.weight": z(16, 16)}), ValueError, "missing"),
    ("load_state_dict int weights", lambda: mha.load_state_dict({**mha.state_dict(), "in_proj_bias": z(48, dtype=np.int32)}), TypeError, "in_proj_bias"),
    ("cache for cross-attention", lambda: mha(z(1, 3, 16), z(1, 3, 16), z(1, 3, 16), kv_cache=mhattn.KVCache(1, 4, 8, 4)), ValueError, "kv_cache"),
    ("cache of the wrong layer", lambda: mha(z(1, 3, 16), kv_cache=mhattn.KVCache(1, 2, 8, 4)), ValueError, "kv_cache"),
    ("cache overflow", lambda: mha(z(1, 9, 16), kv_cache=mhattn.KVCache(1, 4, 8, 4)), ValueError, "overflow"),
    ("cache bad size", lambda: mhattn.KVCache(1, 0, 8, 4), ValueError, "num_kv_heads"),
    ("linear shapes", lambda: mhattn.linear(z(3, 4), z(5, 3)), ValueError, "weight"),
    ("linear bias shape", lambda: mhattn.linear(z(3, 4), z(5, 4), z(4)), ValueError, "bias"),
    ("linear int x", lambda: mhattn.linear(z(3, 4, dtype=np.int16), z(5, 4)), TypeError, "x"),
    ("linear unknown activation", lambda: mhattn.linear(z(3, 4), z(5, 4), activation="swish"), ValueError, "activation"),
    ("linear activation not a name", lambda: mhattn.linear(z(3, 4), z(5, 4), activation=2), ValueError, "activation"),
    ("Linear unknown activation", lambda: mhattn.Linear(z(5, 4), activation="GELU"), ValueError, "activation"),
    ("matmul shapes", lambda: mhattn.matmul(z(3, 4), z(5, 3)), ValueError, "(3, 4)"),
    ("matmul batch", lambda: mhattn.matmul(z(2, 3, 4), z(3, 4, 3)), ValueError, "batch"),
    ("matmul scalar", lambda: mhattn.matmul(np.float32(1), z(3)), ValueError, "scalar"),
    ("softmax scalar", lambda: mhattn.softmax(np.float32(1)), ValueError, "scalar"),
    ("softmax axis", lambda: mhattn.softmax(z(3, 4), axis=2), ValueError, "axis"),
    ("softmax int", lambda: mhattn.softmax(z(3, dtype=np.int64)), TypeError, "x"),
    ("threads zero", lambda: mhattn.set_num_threads(0), ValueError, "n"),
    ("threads str", lambda: mhattn.set_num_threads("2"), TypeError, "n"),
]


@pytest.mark.parametrize("call,error,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_named_error(call, error, fragment):
    with pytest.raises(error) as e:
        call()
    assert fragment in str(e.value)


def test_read_only_input_is_fine():
    x = np.ones((1, 2, 3, 8), f32)
    x.flags.writeable = False
    assert sdpa(x, x, x).shape == (1, 2, 3, 8)
    y = np.ones((2, 3, 16), f32)
    y.flags.writeable = False
    assert mha(y)[0].shape == (2, 3, 16)
