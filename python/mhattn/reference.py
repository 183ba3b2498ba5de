"""mhattn.reference: what every mhattn op computes, in plain NumPy.

This module is the test oracle and the readable definition of each op. It computes in float64
and returns float64; it is written to be obvious, not fast. Shapes use the letters of the rest
of mhattn: B batch, Hq query heads, Hkv key/value heads, L query length, S key length,
E head dim of queries and keys, Ev head dim of values, D model width.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "softmax",
    "activate",
    "ACTIVATIONS",
    "linear",
    "matmul",
    "layer_norm",
    "rms_norm",
    "visible_keys",
    "scaled_dot_product_attention",
    "multi_head_attention",
]


def softmax(x, axis=-1):
    """exp(x) / sum(exp(x)) along `axis`. A slice that is all -inf (fully masked) gives zeros."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    m = np.where(np.isneginf(m), 0.0, m)  # all -inf: shift by 0, every exp is 0
    e = np.exp(x - m)
    s = e.sum(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s == 0, 0.0, e / s)


def activate(x, name):
    """An activation applied element by element; name is one of ACTIVATIONS.

    relu(x) = max(x, 0); gelu(x) = x Φ(x) with Φ the normal CDF (BERT's exact GELU);
    gelu_tanh(x) = x (1 + tanh(u)) / 2, u = √(2/π) (x + 0.044715 x³) (GPT-2's), written here
    as x σ(2u), the same number without the cancellation of 1 + tanh(u) for negative u;
    silu(x) = x σ(x) (Llama's gate). σ(y) = 1 / (1 + exp(-y)).
    At -inf each takes its limit, 0; NaN stays NaN.
    """
    x = np.asarray(x, np.float64)
    if name is None:
        return x
    if name == "relu":
        y = np.where(x > 0, x, 0.0)
    elif name == "gelu":
        phi = 0.5 * np.vectorize(math.erfc, otypes=[np.float64])(-x / math.sqrt(2.0))
        with np.errstate(invalid="ignore"):
            y = x * phi
    elif name in ("gelu_tanh", "silu"):
        with np.errstate(over="ignore", invalid="ignore"):
            s = 2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3) if name == "gelu_tanh" else x
            y = x / (1.0 + np.exp(-s))
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {name!r}")
    return np.where(np.isneginf(x), 0.0, np.where(np.isnan(x), np.nan, y))


ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")


def linear(x, weight, bias=None, activation=None):
    """activation(x (..., K) @ weight (N, K).T + bias (N))."""
    y = np.asarray(x, np.float64) @ np.asarray(weight, np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return activate(y, activation)


def matmul(a, b):
    """a @ b with NumPy's rules for 1-D operands and batch broadcasting."""
    return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64))


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last axis of x + residual: (s - mean) / sqrt(var + eps) * weight + bias."""
    s = np.asarray(x, np.float64) + (0.0 if residual is None else np.asarray(residual, np.float64))
    mean = s.mean(-1, keepdims=True)
    var = ((s - mean) ** 2).mean(-1, keepdims=True)
    out = (s - mean) / np.sqrt(var + eps) * np.asarray(weight, np.float64)
    return out if bias is None else out + np.asarray(bias, np.float64)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over the last axis of x + residual: s / sqrt(mean(s²) + eps) * weight."""
    s = np.asarray(x, np.float64) + (0.0 if residual is None else np.asarray(residual, np.float64))
    return s / np.sqrt((s * s).mean(-1, keepdims=True) + eps) * np.asarray(weight, np.float64)


def visible_keys(L, S, is_causal=False, causal_align="top_left", window=None):
    """(L, S) bool: which keys each query may see before any mask.

    Query l sits at key position p = l (top_left) or l + S - L (bottom_right, the alignment a
    KV cache needs). Causal: keys j <= p. A window W keeps keys j > p - W, and when not causal
    also j < p + W.
    """
    p = np.arange(L)[:, None] + (S - L if causal_align == "bottom_right" else 0)
    j = np.arange(S)[None, :]
    ok = np.ones((L, S), dtype=bool)
    if is_causal:
        ok &= j <= p
    if window is not None:
        ok &= j > p - window
        if not is_causal:
            ok &= j < p + window
    return ok


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                                 enable_gqa=False, *, causal_align="top_left", window=None,
                                 softcap=None):
    """softmax(query @ key.T * scale + mask) @ value, per head.

    query (.., Hq, L, E), key (.., Hkv, S, E), value (.., Hkv, S, Ev) -> (.., Hq, L, Ev).
    softcap=c replaces each score s by c * tanh(s / c) first.
    A bool attn_mask keeps the keys where it is True; a float one is added to the scores.
    With enable_gqa, query head h reads kv head h // (Hq // Hkv).
    """
    q, k, v = (np.asarray(t, np.float64) for t in (query, key, value))
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / np.sqrt(E) if scale is None else scale
    if enable_gqa:
        group = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    scores = q @ np.swapaxes(k, -1, -2) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    visible = visible_keys(L, S, is_causal, causal_align, window)
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        if mask.dtype == bool:
            visible = visible & mask
        else:
            scores = scores + mask
    scores = np.where(visible, scores, -np.inf)
    return softmax(scores) @ v


def multi_head_attention(query, key, value, state, num_heads, num_kv_heads=None, *,
                         key_padding_mask=None, attn_mask=None, need_weights=False,
                         average_attn_weights=True, is_causal=False, batch_first=True,
                         head_mask=None):
    """The forward of torch.nn.MultiheadAttention (and of mhattn.MultiHeadAttention).

    query (B, L, D) or unbatched (L, D); key (B, S, kdim), value (B, S, vdim); with
    batch_first=False the first two axes are swapped. `state` holds the weights under
    PyTorch's names (MultiHeadAttention.state_dict()). Masks follow nn.MultiheadAttention:
    a bool mask is True where a key is ignored, a float mask is added to the scores;
    key_padding_mask is (B, S), attn_mask (L, S) or (B * num_heads, L, S). is_causal applies a
    top-left causal mask (in addition to attn_mask). head_mask (Hq,) or (B, Hq) multiplies each
    head's attention weights, and so its output (transformers 4's head_mask). The heads are
    num_heads × E wide, E from the weights' shapes (embed_dim / num_heads unless pruned).
    Returns (output, weights or None), weights (B, Hq, L, S), or (B, L, S) averaged over heads.
    """
    Hq = num_heads
    Hkv = num_kv_heads or num_heads
    q, k, v = (np.asarray(t, np.float64) for t in (query, key, value))
    unbatched = q.ndim == 2
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    elif not batch_first:
        q, k, v = (np.swapaxes(t, 0, 1) for t in (q, k, v))
    B, L, D = q.shape
    S = k.shape[1]
    if "in_proj_weight" in state:
        E = np.shape(state["in_proj_weight"])[0] // (Hq + 2 * Hkv)
    else:
        E = np.shape(state["q_proj_weight"])[0] // Hq
    Q = Hq * E

    if "in_proj_weight" in state:
        wq, wk, wv = np.split(np.asarray(state["in_proj_weight"], np.float64), [Q, Q + Hkv * E])
    else:
        wq, wk, wv = (np.asarray(state[n], np.float64)
                      for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    bq = bk = bv = bo = None
    if "in_proj_bias" in state:
        bq, bk, bv = np.split(np.asarray(state["in_proj_bias"], np.float64), [Q, Q + Hkv * E])
        bo = state["out_proj.bias"]

    def heads(x, w, b, H):  # (B, n, dim) -> (B, H, n, E)
        return linear(x, w, b).reshape(B, -1, H, E).transpose(0, 2, 1, 3)

    qh, kh, vh = heads(q, wq, bq, Hq), heads(k, wk, bk, Hkv), heads(v, wv, bv, Hkv)
    kh, vh = np.repeat(kh, Hq // Hkv, axis=1), np.repeat(vh, Hq // Hkv, axis=1)

    scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(E)  # (B, Hq, L, S)
    visible = np.broadcast_to(visible_keys(L, S, is_causal), scores.shape)
    for mask, shape in ((key_padding_mask, (B, 1, 1, S)), (attn_mask, None)):
        if mask is None:
            continue
        mask = np.asarray(mask)
        if shape is None:  # attn_mask: (L, S) or (B * Hq, L, S)
            shape = (L, S) if mask.ndim == 2 else (B, Hq, L, S)
        mask = mask.reshape(shape)
        if mask.dtype == bool:
            visible = visible & ~mask
        else:
            scores = scores + mask
    weights = softmax(np.where(visible, scores, -np.inf))
    if head_mask is not None:
        hm = np.asarray(head_mask, np.float64)
        weights = weights * hm.reshape(-1 if hm.ndim == 2 else 1, Hq, 1, 1)
    heads_out = (weights @ vh).transpose(0, 2, 1, 3).reshape(B, L, Q)
    out = linear(heads_out, state["out_proj.weight"], bo)

    if need_weights and average_attn_weights:
        weights = weights.mean(axis=1)
    if unbatched:
        out, weights = out[0], weights[0]
    elif not batch_first:
        out = np.swapaxes(out, 0, 1)
    return out, (weights if need_weights else None)
