"""The functional API: scaled_dot_product_attention and the building blocks softmax, linear,
matmul, layer_norm and rms_norm. Each checks its input (mhattn._checks), allocates the output
and calls the C++ core with the GIL released. Each also takes torch tensors and then returns torch tensors
(mhattn._torch).

dtypes: the output has the input's dtype (float32, bfloat16 or float16; float64 gives float32).
Accumulation is float32 always. How the 16-bit dtypes are multiplied depends on the CPU
(vdpbf16ps, AMX, or widened to float32): the README's numeric policy, and show_config().
"""

from __future__ import annotations

import math

import numpy as np

from . import _checks, _core
from ._torch import accepts_tensors

__all__ = ["scaled_dot_product_attention", "softmax", "linear", "matmul", "layer_norm", "rms_norm"]


@accepts_tensors
def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                                 enable_gqa=False, *, causal_align="top_left", window=None,
                                 softcap=None):
    """Attention of query over key/value: softmax(query @ keyᵀ * scale + mask) @ value.

    Shapes (as torch.nn.functional.scaled_dot_product_attention):
      query (B, Hq, L, E) or (Hq, L, E); key (B, Hkv, S, E); value (B, Hkv, S, Ev)
      -> (B, Hq, L, Ev) (or (Hq, L, Ev)).
    query, key and value share one dtype, which the output has (float64 gives float32).
    attn_mask broadcasts to (B, Hq, L, S) and is never expanded: bool True = the key takes
    part, float (any float dtype) = added to the scores. is_causal masks keys after each
    query's position, aligned top-left (query l sees keys 0..l) or, with
    causal_align="bottom_right", so that the last query sees every key (what a KV cache needs
    when L < S). window=W keeps only keys within W positions of the query's (the W most recent
    with is_causal). scale defaults to 1/sqrt(E). softcap=c caps each scaled score s to
    c * tanh(s / c) before the mask is applied (Gemma 2). enable_gqa lets Hq be a multiple of
    Hkv: query head h reads kv head h // (Hq // Hkv). A query with no visible key gets zeros,
    not NaN.
    """
    q, k, v, kv_code, mask, causal, diag, window, scale, softcap, unbatched, dtype = (
        _checks.check_sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                           causal_align, window, softcap))
    B, Hq, L, _ = q.shape
    out = np.empty((B, Hq, L, v.shape[3]), dtype=np.float32)
    _core.attention(out, None, q, k, v, mask, None, causal, diag, window, scale, softcap,
                    kv_code)
    out = _checks.cast(out, dtype)
    return out[0] if unbatched else out


@accepts_tensors
def softmax(x, axis=-1):
    """exp(x) / sum(exp(x)) along `axis`, stable (the max is subtracted first).
    A slice that is entirely -inf gives zeros; NaN in a slice makes it NaN."""
    dtype = _checks.result_dtype(_checks.as_array(x).dtype)
    a = _checks.as_float(x, "x")
    if a.ndim == 0:
        raise ValueError("softmax needs an array with at least one axis, got a scalar")
    try:
        moved = np.moveaxis(a, axis, -1)
    except ValueError:  # numpy's AxisError
        raise ValueError(f"axis {axis} is out of range for x of shape {a.shape}") from None
    rows = np.ascontiguousarray(moved).reshape(math.prod(moved.shape[:-1]), moved.shape[-1])
    out = np.empty_like(rows)
    _core.softmax(out, rows)
    return np.moveaxis(_checks.cast(out, dtype).reshape(moved.shape), -1, axis)


@accepts_tensors
def linear(x, weight, bias=None, activation=None):
    """activation(x (..., K) @ weight (N, K).T + bias (N)) -> (..., N), weight laid out as
    PyTorch stores it.

    activation: None, "relu", "gelu" (exact, erf-based: BERT's and torch's default),
    "gelu_tanh" (the tanh approximation: GPT-2's) or "silu" (Llama's gate). It is applied as
    the GEMM stores its output, so it costs no extra pass over memory; mhattn.reference.activate
    defines each one.

    It computes in the weight's dtype (float32, bfloat16 or float16), as mhattn.Linear(weight)
    would: x of another dtype is converted to it first, and the output has x's dtype.

    The weight is read as it lies, never copied whole: a product of a few rows (a decode step)
    reads it in place, a bigger one copies it a cache-sized block at a time as the GEMM uses it.
    mhattn.Linear packs it once, when it is built, which a model that calls the same layer
    again and again gains from (and bfloat16 weights of a product of 16 rows or more are
    packed on every call here, for the CPU's bfloat16 instructions).
    """
    w, b = _checks.check_linear_weight(weight, bias)
    code = _checks.activation_code(activation)
    wa, wcode = _checks.native(w.T)
    return _rows_through(x, w.shape, w.dtype, lambda out, xa, xcode, ocode:
                         _core.gemm_raw(out, xa, wa, b, code, xcode, wcode, ocode))


def apply_linear(x, weight_shape, packed, bias, activation_code=0, compute=_checks._F32):
    """act(x (..., K) @ W.T + bias), W (N, K) = weight_shape packed as `packed` (checked
    weights, activation as _checks.activation_code gives it), x converted to `compute` (the
    weight's dtype) when it has another."""
    return _rows_through(x, weight_shape, compute, lambda out, xa, xcode, ocode:
                         _core.gemm(out, xa, packed, bias, activation_code, xcode, ocode))


def _rows_through(x, weight_shape, compute, product):
    """x (..., K) as rows of `compute`'s dtype, through product(out (rows, N), rows, their
    dtype code, out's dtype code), back in x's shape. out has x's dtype (float32, bfloat16 or
    float16; the kernels round into a 16-bit out themselves)."""
    dtype = _checks.result_dtype(_checks.as_array(x).dtype)
    a = _checks.as_dtype(x, compute, "x")
    N, K = weight_shape
    if a.ndim < 1 or a.shape[-1] != K:
        raise ValueError(f"linear wants x (..., K) with K = {K} (weight ({N}, {K})); got x {a.shape}")
    x2 = _checks.rows_2d(a, K)
    out = np.empty((x2.shape[0], N), dtype=dtype)
    xa, xcode = _checks.native(x2)
    product(out, xa, xcode, _checks._CODES[dtype])
    return out.reshape(a.shape[:-1] + (N,))


@accepts_tensors
def layer_norm(x, weight, bias=None, eps=1e-5, *, residual=None):
    """LayerNorm over the last axis of x + residual (residual, of x's shape, may be None):
    (s - mean(s)) / sqrt(var(s) + eps) * weight + bias, in one pass of the kernels over each
    row (the residual added as it is read). x (..., n), weight and bias (n) -> (..., n) in x's
    dtype, computed in float32. As torch's F.layer_norm over the last axis, with the
    residual add of a post-norm block (BERT) fused in."""
    return _norm(x, residual, weight, bias, eps, False)


@accepts_tensors
def rms_norm(x, weight, eps=1e-6, *, residual=None):
    """RMSNorm over the last axis of x + residual: s / sqrt(mean(s²) + eps) * weight (Llama,
    Qwen2, Mistral), in x's dtype, computed in float32."""
    return _norm(x, residual, weight, None, eps, True)


def _norm(x, residual, weight, bias, eps, rms):
    dtype = _checks.result_dtype(_checks.as_array(x).dtype)
    a = _checks.as_float(x, "x")
    if a.ndim == 0:
        raise ValueError("a norm needs an array with at least one axis, got a scalar")
    n = a.shape[-1]
    rows = np.ascontiguousarray(a).reshape(-1, n)
    r = None
    if residual is not None:
        r = _checks.as_float(residual, "residual")
        if r.shape != a.shape:
            raise ValueError(f"residual must have x's shape {a.shape}, got {r.shape}")
        r = np.ascontiguousarray(r).reshape(-1, n)
    w = np.ascontiguousarray(_checks.as_float(weight, "weight"))
    b = None if bias is None else np.ascontiguousarray(_checks.as_float(bias, "bias"))
    for name, v in (("weight", w), ("bias", b)):
        if v is not None and v.shape != (n,):
            raise ValueError(f"{name} must be ({n},) for x {a.shape}, got {v.shape}")
    eps = float(eps)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and at least 0, got {eps}")
    out = np.empty_like(rows)
    if out.size:
        _core.norm(out, rows, r, w, b, eps, rms)
    return _checks.cast(out, dtype).reshape(a.shape)


@accepts_tensors
def matmul(a, b):
    """a @ b with NumPy's rules: (..., M, K) @ (..., K, N) -> (..., M, N), batch axes broadcast,
    a 1-D operand promoted to a matrix and its axis dropped from the result."""
    dtype = _checks.result_dtype(_checks.as_array(a).dtype, _checks.as_array(b).dtype)
    x, y = _checks.as_dtype(a, dtype, "a"), _checks.as_dtype(b, dtype, "b")
    shapes = _checks._Shapes(a=x, b=y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"matmul does not take scalars; got {shapes}")
    x2 = x[None, :] if x.ndim == 1 else x
    y2 = y[:, None] if y.ndim == 1 else y
    if x2.shape[-1] != y2.shape[-2]:
        raise ValueError(f"matmul: a's last axis must match b's second to last; got {shapes}")
    if x.ndim == 2 and y.ndim == 2:  # one product: none of the batch axes' work
        out = np.empty((x.shape[0], y.shape[1]), dtype=np.float32)
        (xa, xcode), (ya, ycode) = _checks.native(x), _checks.native(y)
        _core.gemm_raw(out, xa, ya, None, 0, xcode, ycode)
        return _checks.cast(out, dtype)
    try:
        batch = np.broadcast_shapes(x2.shape[:-2], y2.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: the batch axes do not broadcast; got {shapes}") from None
    (M, K), N = x2.shape[-2:], y2.shape[-1]
    T = math.prod(batch)
    x3 = np.broadcast_to(x2, batch + (M, K)).reshape(T, M, K)
    y3 = np.broadcast_to(y2, batch + (K, N)).reshape(T, K, N)
    out = np.empty((x3.shape[0], M, N), dtype=np.float32)
    (xa, xcode), (ya, ycode) = _checks.native(x3), _checks.native(y3)
    _core.matmul(out, xa, ya, xcode, ycode)
    out = _checks.cast(out, dtype).reshape(batch + (M, N))
    if x.ndim == 1:
        out = out[..., 0, :]
    if y.ndim == 1:
        out = out[..., 0]
    return out
