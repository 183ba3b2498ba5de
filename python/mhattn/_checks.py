"""All input validation of mhattn, in one place.

Every public function sends its arguments through here before anything reaches C++. Errors name
the argument and show the shapes involved: ValueError for shapes and values, TypeError for
dtypes. What comes out is what the kernels expect: float32 arrays (other float dtypes are
converted) whose last axis is contiguous, with any other strides, and masks as 4-D views
broadcast by zero strides, never materialised.
"""

from __future__ import annotations

import math
import operator

import ml_dtypes
import numpy as np

from . import _core

_F32 = np.dtype(np.float32)
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
# The dtypes a result keeps; every other float dtype (float64) is computed and returned as
# float32.
_KEPT = (_F32, BF16, F16)


def _shapes(**arrays):
    return ", ".join(f"{name} {tuple(np.shape(a))}" for name, a in arrays.items() if a is not None)


class _Shapes:
    """The shapes of the arguments, written out only if an error message needs them (a call
    that succeeds, the common case, should not pay for formatting)."""

    __slots__ = ("arrays",)

    def __init__(self, **arrays):
        self.arrays = arrays

    def __str__(self):
        return _shapes(**self.arrays)

    def __format__(self, spec):
        return format(str(self), spec)


def is_float(dtype):
    """float16/32/64 and ml_dtypes.bfloat16 (whose NumPy kind is 'V', not 'f')."""
    return dtype.kind == "f" or dtype == BF16


def as_array(x):
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def as_float(x, name):
    """x as a float32 ndarray; bfloat16, float16 and float64 are converted, other dtypes raise
    TypeError."""
    return as_dtype(x, _F32, name)


# The kernels' dtype codes (mhattn::DType).
_CODES = {_F32: 0, BF16: 1, F16: 2}
_DTYPE_NAMES = {"float32": _F32, "bfloat16": BF16, "float16": F16}


def native(a):
    """(array, code) as the kernels read a float32, bfloat16 or float16 array a: float32 as it
    is, the 16-bit ones viewed as uint16 (no copy); code is the kernels' dtype code."""
    if a.dtype is _F32:  # the common case first: hashing a dtype is slow
        return a, 0
    code = _CODES[a.dtype]
    return (a, 0) if code == 0 else (a.view(np.uint16), code)


def compute_dtype(dtype, name="dtype"):
    """A layer's dtype argument ("float32", "bfloat16", "float16", or such a NumPy dtype; None
    for float32) as a NumPy dtype."""
    if dtype is None:
        return _F32
    if isinstance(dtype, str) and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if d not in _KEPT:
        raise TypeError(f"{name} must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return d


def as_dtype(x, dtype, name):
    """x as an array of float dtype `dtype` (converted when it has another float dtype); other
    dtypes raise TypeError."""
    a = as_array(x)
    if a.dtype is dtype or a.dtype == dtype:
        return a
    if not is_float(a.dtype):
        raise TypeError(f"{name} must be a floating-point array (float32, bfloat16 or float16; "
                        f"float64 is converted to float32), got dtype {a.dtype}")
    code = _CODES.get(a.dtype, 0)
    if dtype == _F32 and code and a.flags.c_contiguous:
        # 16 bits widened by the kernels in one threaded vector pass: NumPy's float16 cast is
        # scalar (0.5 ms for 98 K values here).
        out = np.empty(a.shape, _F32)
        _core.to_float(out.reshape(-1), a.reshape(-1).view(np.uint16), code)
        return out
    return a.astype(dtype)


def result_dtype(d, other=None):
    """The dtype of a result computed from inputs of dtype d (and other): theirs when they
    share float32, bfloat16 or float16; float32 otherwise (NumPy's promotion, float64
    narrowed)."""
    if other is not None and other != d:
        return _F32
    if d is _F32 or d is BF16 or d is F16:  # identity first: == on dtypes is slow
        return d
    return d if d in _KEPT else _F32


def cast(out, dtype):
    """out (float32) in the result dtype, rounded to nearest even by the kernels (NumPy's own
    float16 cast is scalar, and slower than some of the products it would round)."""
    if dtype is _F32 or dtype == _F32:
        return out
    if not out.flags.c_contiguous:
        return out.astype(dtype)
    h = np.empty(out.shape, dtype)
    _core.to_half(h.reshape(-1).view(np.uint16), out.reshape(-1), _CODES[dtype])
    return h


def last_contiguous(a):
    """a, or a copy of it, whose last axis is contiguous and strides are whole elements."""
    if a.flags.c_contiguous:
        return a
    n = a.itemsize
    if a.ndim and a.shape[-1] > 1 and a.strides[-1] != n or any(s % n for s in a.strides):
        return np.ascontiguousarray(a)
    return a


def as_int(x, name, minimum):
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def as_positive_float(x, name):
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be positive and finite, got {v}")
    return v


def rows_2d(x, dim):
    """x (..., dim) as a 2-D (rows, dim) view when the layout allows it, else a copy."""
    return last_contiguous(x.reshape(math.prod(x.shape[:-1]), dim))


def mask_4d(mask, name, full_shape, shapes, bool_keep):
    """(array broadcast to 4-D full_shape, keep) for the kernel, or None.

    A bool mask becomes a uint8 view whose byte `bool_keep` means "attend"; a float mask is
    float32 and added to the scores. `full_shape` is (B, Hq, L, S).
    """
    if mask is None:
        return None
    m = mask if isinstance(mask, np.ndarray) else np.asarray(mask)
    if m.dtype == np.bool_:
        m, keep = m.view(np.uint8), bool_keep
    elif is_float(m.dtype):
        m, keep = m.astype(_F32, copy=False), 0
    else:
        raise TypeError(f"{name} must be bool or floating point, got dtype {m.dtype}")
    try:
        m = np.broadcast_to(m, full_shape)
    except ValueError:
        raise ValueError(f"{name} of shape {m.shape} does not broadcast to "
                         f"{tuple(full_shape)} (B, Hq, L, S); {shapes}") from None
    return (m, keep)


def check_sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa, causal_align, window,
               softcap=None):
    """Arguments of scaled_dot_product_attention -> what _core.attention takes (q float32; k and
    v bfloat16 or float16 as they are, viewed as uint16, with their dtype code; else float32),
    plus whether the input had no batch axis and the result's dtype."""
    qa, ka, va = as_array(query), as_array(key), as_array(value)
    if (not (qa.dtype is ka.dtype is va.dtype or qa.dtype == ka.dtype == va.dtype)
            and all(is_float(a.dtype) for a in (qa, ka, va))):
        raise TypeError(f"query, key and value must have one dtype; got query {qa.dtype}, key "
                        f"{ka.dtype}, value {va.dtype}")
    half = ka.dtype is not _F32 and (ka.dtype == BF16 or ka.dtype == F16)
    q = as_float(qa, "query")
    k, v = (ka, va) if half else (as_float(ka, "key"), as_float(va, "value"))
    shapes = _Shapes(query=q, key=k, value=v)
    if q.ndim not in (3, 4) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError("query, key and value must all be (B, H, len, dim) or all (H, len, dim); "
                         f"got {shapes}")
    unbatched = q.ndim == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    B, Hq, L, E = q.shape
    _, Hkv, S, _ = k.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"query, key and value must have the same batch size; got {shapes}")
    if k.shape[3] != E:
        raise ValueError(f"query and key must have the same head dim E (last axis); got {shapes}")
    if v.shape[1] != Hkv or v.shape[2] != S:
        raise ValueError(f"key and value must have the same heads and length; got {shapes}")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(f"query has {Hq} heads but key/value have {Hkv}; pass enable_gqa=True "
                             f"for grouped-query attention; got {shapes}")
        if Hkv == 0 or Hq % Hkv:
            raise ValueError(f"with enable_gqa, the query heads ({Hq}) must be a multiple of the "
                             f"key/value heads ({Hkv}); got {shapes}")
    if causal_align not in ("top_left", "bottom_right"):
        raise ValueError(f"causal_align must be 'top_left' or 'bottom_right', got {causal_align!r}")
    if window is not None:
        window = as_int(window, "window", 1)
    if softcap is not None:
        softcap = as_positive_float(softcap, "softcap")
    if scale is None:
        if E == 0:
            raise ValueError(f"head dim E is 0, so the default scale 1/sqrt(E) is undefined; "
                             f"pass scale; got {shapes}")
        scale = 1.0 / math.sqrt(E)
    full = (B, Hq, L, S) if not unbatched else (Hq, L, S)
    mask = None if attn_mask is None else mask_4d(attn_mask, "attn_mask", full, shapes, bool_keep=1)
    if mask is not None and unbatched:
        mask = (mask[0][None], mask[1])
    diag = S - L if causal_align == "bottom_right" else 0
    (k, kv_code), (v, _) = native(last_contiguous(k)), native(last_contiguous(v))
    return (last_contiguous(q), k, v, kv_code, mask, bool(is_causal), diag, window or 0,
            float(scale), softcap or 0.0, unbatched, result_dtype(qa.dtype))


class MhaCall:
    """A checked call of MultiHeadAttention: inputs as 2-D row views and sizes."""

    __slots__ = ("xq", "xk", "xv", "x_code", "B", "L", "S_new", "unbatched", "masks", "shapes",
                 "dtype")


def check_mha(mod, query, key, value, key_padding_mask, attn_mask, kv_cache):
    """Arguments of MultiHeadAttention.__call__ -> MhaCall (masks are left to mha_masks, which
    needs the total key length)."""
    qa = as_array(query)
    q = as_dtype(qa, mod.dtype, "query")  # the layer computes in its dtype
    self_attention = key is None and value is None
    if (key is None) != (value is None):
        raise ValueError("pass both key and value (cross-attention) or neither (self-attention)")
    k = q if self_attention else as_dtype(key, mod.dtype, "key")
    v = q if self_attention else as_dtype(value, mod.dtype, "value")
    shapes = _Shapes(query=q, key=None if self_attention else k, value=None if self_attention else v)
    if q.ndim not in (2, 3) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"query, key and value must all be batched (3 dims) or all unbatched "
                         f"(2 dims); got {shapes}")
    if kv_cache is not None and not self_attention:
        raise ValueError("kv_cache is for self-attention: pass only query (the new tokens)")
    c = MhaCall()
    c.dtype = result_dtype(qa.dtype)
    c.unbatched = q.ndim == 2
    if c.unbatched:
        q, k, v = q[None], k[None], v[None]
        seq = 1
    else:
        seq = 1 if mod.batch_first else 0
    bat = 1 - seq if not c.unbatched else 0
    c.B, c.L, c.S_new = q.shape[bat], q.shape[seq], k.shape[seq]
    for name, x, dim in (("query", q, mod.embed_dim), ("key", k, mod.kdim), ("value", v, mod.vdim)):
        if x.shape[-1] != dim:
            raise ValueError(f"{name} must have {dim} features in its last axis; got {shapes}")
    if k.shape[bat] != c.B or v.shape[bat] != c.B:
        raise ValueError(f"query, key and value must have the same batch size; got {shapes}")
    if v.shape[seq] != c.S_new:
        raise ValueError(f"key and value must have the same length; got {shapes}")
    if kv_cache is not None:
        kv_cache._check_fits(mod, c.B, c.L)
    c.xq, c.x_code = native(rows_2d(q, q.shape[-1]))
    c.xk = c.xq if self_attention else native(rows_2d(k, k.shape[-1]))[0]
    c.xv = c.xq if self_attention else native(rows_2d(v, v.shape[-1]))[0]
    c.masks = (key_padding_mask, attn_mask)
    c.shapes = shapes
    return c


def mha_masks(c, num_heads, S):
    """key_padding_mask (B, S) and attn_mask (L, S) or (B * Hq, L, S), torch's meaning (bool True
    = ignored), as two kernel masks over (B, Hq, L, S)."""
    kpm, am = c.masks
    B, L, Hq = c.B, c.L, num_heads
    full = (B, Hq, L, S)
    out = []
    if kpm is not None:
        kpm_a = np.asarray(kpm)
        want = (S,) if c.unbatched else (B, S)
        if kpm_a.shape != want:
            raise ValueError(f"key_padding_mask must be {want} (batch, key length); got "
                             f"{kpm_a.shape}; {c.shapes}")
        out.append(mask_4d(kpm_a.reshape(B, 1, 1, S), "key_padding_mask", full, c.shapes, 0))
    if am is not None:
        am_a = np.asarray(am)
        if am_a.shape == (L, S):
            am_4d = am_a
        elif am_a.shape == (B * Hq, L, S):
            am_4d = am_a.reshape(B, Hq, L, S)
        else:
            raise ValueError(f"attn_mask must be (L, S) = {(L, S)} or (B * num_heads, L, S) = "
                             f"{(B * Hq, L, S)}; got {am_a.shape}; {c.shapes}")
        out.append(mask_4d(am_4d, "attn_mask", full, c.shapes, 0))
    return out + [None] * (2 - len(out))


def check_linear_weight(weight, bias, dtype=None):
    """weight (N, K) in `dtype` (None: its own dtype if float32, bfloat16 or float16, else
    float32) and bias (N,) float32 contiguous, or None."""
    w = as_array(weight)
    w = as_dtype(w, result_dtype(w.dtype) if dtype is None else dtype, "weight")
    b = None if bias is None else np.ascontiguousarray(as_float(bias, "bias"))
    if w.ndim != 2:
        raise ValueError(f"linear wants weight (N, K); got {_shapes(weight=w, bias=b)}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"bias must be (N,) = ({w.shape[0]},); got {_shapes(weight=w, bias=b)}")
    return w, b


# The activations the GEMM applies as it stores (the codes of mhattn::Activation).
ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


def activation_code(activation):
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_CODES)}; got {activation!r}")
    return ACTIVATION_CODES[activation]


def check_weight(name, w, shape, dtype=_F32):
    a = as_dtype(w, dtype, name)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    return a
