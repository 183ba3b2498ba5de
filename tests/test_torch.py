"""mhattn against PyTorch itself: SDPA, and nn.MultiheadAttention through from_torch.
Skipped when torch is not installed."""

import numpy as np
import pytest

import mhattn
from tolerances import assert_close

torch = pytest.importorskip("torch")


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,S,E", [(7, 7, 64), (5, 33, 17), (33, 5, 128)])
def test_sdpa_matches_torch(isa, rng, causal, L, S, E):
    q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in ((2, 3, L, E), (2, 3, S, E), (2, 3, S, E)))
    mask = rng.random((L, S)) < 0.8
    mask[:, 0] = True  # torch gives NaN for rows with no key; mhattn gives zeros (tested elsewhere)
    for kw in ({"is_causal": causal}, {"attn_mask": mask}, {"scale": 0.3}):
        if kw.get("is_causal") and L > S:
            continue
        want = torch.nn.functional.scaled_dot_product_attention(
            t(q), t(k), t(v), attn_mask=None if "attn_mask" not in kw else t(kw["attn_mask"]),
            is_causal=kw.get("is_causal", False), scale=kw.get("scale")).numpy()
        assert_close(mhattn.scaled_dot_product_attention(q, k, v, **kw), want, "torch")


def test_sdpa_gqa_matches_torch(isa, rng):
    q = rng.standard_normal((1, 8, 9, 32), dtype=np.float32)
    k, v = (rng.standard_normal((1, 2, 12, 32), dtype=np.float32) for _ in range(2))
    want = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), enable_gqa=True).numpy()
    assert_close(mhattn.scaled_dot_product_attention(q, k, v, enable_gqa=True), want, "torch")


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_linear_activation_matches_torch(isa, rng, activation):
    F = torch.nn.functional
    act = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
           "silu": F.silu}[activation]
    x, w, b = (rng.standard_normal(s, dtype=np.float32) for s in ((37, 70), (45, 70), (45,)))
    x *= 70 ** -0.5
    want = act(F.linear(t(x), t(w), t(b))).numpy()
    assert_close(mhattn.linear(x, w, b, activation=activation), want, "torch")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kdim,vdim", [(None, None), (24, 40)])
def test_from_torch_matches_nn_multiheadattention(isa, rng, batch_first, bias, kdim, vdim):
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(32, 4, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()
    if bias:
        with torch.no_grad():
            tm.in_proj_bias.normal_()
            tm.out_proj.bias.normal_()
    mod = mhattn.MultiHeadAttention.from_torch(tm)
    B, L, S = 2, 6, 9
    lead = (lambda n: (B, n)) if batch_first else (lambda n: (n, B))
    q = rng.standard_normal(lead(L) + (32,), dtype=np.float32)
    k = rng.standard_normal(lead(S) + (kdim or 32,), dtype=np.float32)
    v = rng.standard_normal(lead(S) + (vdim or 32,), dtype=np.float32)
    kpm = rng.random((B, S)) < 0.3
    kpm[:, 0] = False
    am = rng.standard_normal((L, S)).astype(np.float32)
    am_bool = rng.random((L, S)) < 0.3
    am_bool[:, 1] = False
    kpm_float = np.where(kpm, -np.inf, 0).astype(np.float32)
    am_heads = rng.standard_normal((B * 4, L, S)).astype(np.float32)  # one mask per (batch, head)
    for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": am}, {"attn_mask": am_bool},
               {"key_padding_mask": kpm, "attn_mask": am_bool},
               {"key_padding_mask": kpm_float, "attn_mask": am}, {"attn_mask": am_heads}):
        with torch.no_grad():
            want, want_w = tm(t(q), t(k), t(v), need_weights=True,
                              **{n: t(m) for n, m in kw.items()})
        got, got_w = mod(q, k, v, need_weights=True, **kw)
        assert_close(got, want.numpy(), "torch")
        assert_close(got_w, want_w.numpy(), "torch")


def test_state_dict_loads_into_torch(rng):
    mod = mhattn.MultiHeadAttention(32, 4, seed=3)
    tm = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in mod.state_dict().items()})
    x = rng.standard_normal((2, 5, 32), dtype=np.float32)
    with torch.no_grad():
        want = tm(t(x), t(x), t(x), need_weights=False)[0].numpy()
    assert_close(mod(x)[0], want, "torch")


@pytest.mark.parametrize("kw", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_from_torch_refuses_what_it_cannot_copy(kw):
    tm = torch.nn.MultiheadAttention(16, 2, batch_first=True, **kw)
    with pytest.raises(NotImplementedError, match="add_bias_kv and add_zero_attn"):
        mhattn.MultiHeadAttention.from_torch(tm)
