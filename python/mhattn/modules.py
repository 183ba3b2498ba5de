"""MultiHeadAttention (projections + attention, the layer of a transformer) and KVCache.

The layer holds its weights as read-only NumPy arrays of its dtype (float32, bfloat16 or
float16) under PyTorch's names, and keeps them packed for the GEMM, so a call never repacks
them. To change weights, use load_state_dict (which repacks); the arrays themselves cannot be
written to.
"""

from __future__ import annotations

import numpy as np

from . import _checks, _core, functional
from ._torch import accepts_tensors, weight_array

__all__ = ["MultiHeadAttention", "KVCache", "Linear"]


class _PackedWeights:
    """Weight matrices W (N, K) packed for the GEMM of the active SIMD target, packed again
    when the target changes (only the tests switch it at run time)."""

    def __init__(self, *weights):
        self._weights = weights
        self._pack()

    def _pack(self):
        # x · Wᵀ: the GEMM's B is Wᵀ, a strided view of W, packed without a copy of W, in W's
        # dtype.
        self._packed = tuple(_core.Packed(*_checks.native(w.T)) for w in self._weights)
        self._target = _core.target()

    def get(self):
        if self._target != _core.target():
            self._pack()
        return self._packed


class Linear:
    """activation(x (..., K) @ weight (N, K).T + bias (N)) -> (..., N), with the weight packed
    for the GEMM once, when the layer is built (mhattn.linear packs it on every call). weight
    is laid out as PyTorch stores it; the layer keeps read-only copies as .weight (in the
    layer's dtype) and .bias (float32). activation is None, "relu", "gelu", "gelu_tanh" or
    "silu", applied as the GEMM stores its output (see mhattn.linear).

    dtype ("float32", "bfloat16" or "float16"; by default the weight's own, float32 for
    another) is what the layer stores its weight in and computes in: bfloat16 and float16
    weights take half the memory. An input of another float dtype is converted to it on the
    way in; the output has the input's dtype. Accumulation is float32 in every dtype."""

    def __init__(self, weight, bias=None, activation=None, *, dtype=None):
        w, b = _checks.check_linear_weight(
            weight_array(weight, "weight"), weight_array(bias, "bias"),
            None if dtype is None else _checks.compute_dtype(dtype))
        self._activation_code = _checks.activation_code(activation)
        self.activation = activation
        self.dtype = w.dtype
        self.weight = np.array(w, w.dtype)
        self.bias = None if b is None else np.array(b, np.float32)
        for a in (self.weight, self.bias):
            if a is not None:
                a.flags.writeable = False
        self.out_features, self.in_features = self.weight.shape
        self._packed = _PackedWeights(self.weight)

    def __repr__(self):
        act = "" if self.activation is None else f", activation={self.activation!r}"
        dt = "" if self.dtype == np.float32 else f", dtype={self.dtype.name!r}"
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{act}{dt})")

    @accepts_tensors
    def __call__(self, x):
        return functional.apply_linear(x, self.weight.shape, self._packed.get()[0], self.bias,
                                       self._activation_code, self.dtype)


class KVCache:
    """Keys and values of earlier tokens, for decoding one token (or chunk) at a time.

    KVCache(batch, num_kv_heads, max_len, head_dim, *, dtype="float32") preallocates room for
    max_len tokens of one layer; len(cache) is how many it holds. dtype "bfloat16" or "float16"
    stores keys and values in half the bytes: appends round them, and a decode step reads the
    half-size cache directly (the layers above widen it to float32 for a longer chunk). Pass it as mha(x_new, kv_cache=cache): the layer
    projects x_new, appends its keys and values, and attends over everything cached, each new
    token seeing all earlier tokens and the earlier tokens of its own chunk. Appending past
    max_len raises ValueError and leaves the cache unchanged. One cache serves one layer and
    one sequence of calls at a time.
    """

    def __init__(self, batch, num_kv_heads, max_len, head_dim, *, dtype="float32"):
        self.dtype = _checks.compute_dtype(dtype)
        self.batch = _checks.as_int(batch, "batch", 1)
        self.num_kv_heads = _checks.as_int(num_kv_heads, "num_kv_heads", 1)
        self.max_len = _checks.as_int(max_len, "max_len", 0)
        self.head_dim = _checks.as_int(head_dim, "head_dim", 1)
        # Keys in heads [0, Hkv), values in [Hkv, 2 Hkv): one buffer, so the in-projection
        # writes both straight into place.
        self._kv = np.zeros((self.batch, 2 * self.num_kv_heads, self.max_len, self.head_dim),
                            dtype=self.dtype)
        self._len = 0

    def __len__(self):
        return self._len

    def __repr__(self):
        dt = "" if self.dtype == np.float32 else f", dtype={self.dtype.name!r}"
        return (f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, "
                f"max_len={self.max_len}, head_dim={self.head_dim}{dt}, len={self._len})")

    @property
    def keys(self):
        """(batch, num_kv_heads, len, head_dim), a read-only view."""
        return self._view(0)

    @property
    def values(self):
        """(batch, num_kv_heads, len, head_dim), a read-only view."""
        return self._view(self.num_kv_heads)

    def _view(self, h0):
        v = self._kv[:, h0:h0 + self.num_kv_heads, :self._len]
        v.flags.writeable = False
        return v

    def reset(self):
        """Forget every token (the memory is kept)."""
        self.truncate(0)

    def truncate(self, n):
        """Keep the first n tokens and forget the rest (to step back after a rejected draft, or
        to reuse a prompt's cache); n must be at most len(self)."""
        n = _checks.as_int(n, "n", 0)
        if n > self._len:
            raise ValueError(f"truncate({n}): the cache holds only {self._len} tokens")
        self._len = n

    def _check_fits(self, mod, batch, new):
        if (batch, mod.num_kv_heads, mod.head_dim) != (self.batch, self.num_kv_heads,
                                                       self.head_dim):
            raise ValueError(
                f"kv_cache holds batch {self.batch}, {self.num_kv_heads} kv heads of dim "
                f"{self.head_dim}; this call has batch {batch} and the layer {mod.num_kv_heads} "
                f"kv heads of dim {mod.head_dim}")
        if self._len + new > self.max_len:
            raise ValueError(f"kv_cache overflow: it holds {self._len} of {self.max_len} tokens "
                             f"and this call adds {new}; the cache is unchanged")


class MultiHeadAttention:
    """Multi-head attention with projections: project, split into heads, attend in every head,
    concatenate, project back. The forward of torch.nn.MultiheadAttention, with grouped-query
    heads and a KV cache as well.

    MultiHeadAttention(embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None,
    bias=True, batch_first=True, seed=None, dtype=None). Weights start as PyTorch initialises
    them (Xavier uniform in-projection, zero biases), drawn from numpy.random.default_rng(seed).
    dtype ("float32", the default, "bfloat16" or "float16") is what the layer stores its weights
    in and computes its projections in; an input of another float dtype is converted to it on
    the way in, and the output has the input's dtype.

    Calling it: mha(query, key=None, value=None, *, key_padding_mask=None, attn_mask=None,
    need_weights=False, average_attn_weights=True, is_causal=False, kv_cache=None)
    -> (output, weights or None).
      query (B, L, embed_dim) [(L, B, embed_dim) if not batch_first; (L, embed_dim) unbatched]
      key (B, S, kdim), value (B, S, vdim): default to query (self-attention); another
      sequence makes it cross-attention (an encoder-decoder's decoder attending to the encoder).
      output: the shape of query. weights: (B, num_heads, L, S), or (B, L, S) averaged.
    Masks mean what they mean in torch.nn.MultiheadAttention: bool True = the key is ignored,
    float = added to the scores. key_padding_mask is (B, S); attn_mask (L, S) or
    (B * num_heads, L, S). is_causal masks later keys (top-left). With kv_cache (a KVCache),
    query holds the new tokens only and attention is causal, aligned bottom-right.
    A query that can see no key attends to nothing: its output is the out-projection's bias.
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None,
                 bias=True, batch_first=True, seed=None, dtype=None):
        self.dtype = _checks.compute_dtype(dtype)
        self.embed_dim = _checks.as_int(embed_dim, "embed_dim", 1)
        self.num_heads = _checks.as_int(num_heads, "num_heads", 1)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads "
                             f"({self.num_heads})")
        self.num_kv_heads = (self.num_heads if num_kv_heads is None
                             else _checks.as_int(num_kv_heads, "num_kv_heads", 1))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.kdim = self.embed_dim if kdim is None else _checks.as_int(kdim, "kdim", 1)
        self.vdim = self.embed_dim if vdim is None else _checks.as_int(vdim, "vdim", 1)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.head_dim = self.embed_dim // self.num_heads

        rng = np.random.default_rng(seed)
        D, KV = self.embed_dim, self.num_kv_heads * self.head_dim

        def xavier(rows, cols):
            bound = np.sqrt(6.0 / (rows + cols))
            return rng.uniform(-bound, bound, size=(rows, cols)).astype(np.float32)

        if self._qkv_same_dim:
            w = xavier(D + 2 * KV, D)
            wq, wk, wv = w[:D], w[D:D + KV], w[D + KV:]
        else:
            wq, wk, wv = xavier(D, D), xavier(KV, self.kdim), xavier(KV, self.vdim)
        wo = rng.uniform(-1, 1, size=(D, D)).astype(np.float32) / np.sqrt(D)
        sd = {"out_proj.weight": wo}
        if self._qkv_same_dim:
            sd["in_proj_weight"] = np.concatenate([wq, wk, wv])
        else:
            sd.update(q_proj_weight=wq, k_proj_weight=wk, v_proj_weight=wv)
        if self.bias:
            sd["in_proj_bias"] = np.zeros(D + 2 * KV, np.float32)
            sd["out_proj.bias"] = np.zeros(D, np.float32)
        self.load_state_dict(sd)

    @property
    def _qkv_same_dim(self):
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    def __repr__(self):
        extra = "" if self.num_kv_heads == self.num_heads else f", num_kv_heads={self.num_kv_heads}"
        if not self._qkv_same_dim:
            extra += f", kdim={self.kdim}, vdim={self.vdim}"
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}"
                f"{extra}, bias={self.bias}, batch_first={self.batch_first})")

    # ---- weights ---------------------------------------------------------------------------

    def _expected_shapes(self):
        D, KV = self.embed_dim, self.num_kv_heads * self.head_dim
        shapes = {"out_proj.weight": (D, D)}
        if self._qkv_same_dim:
            shapes["in_proj_weight"] = (D + 2 * KV, D)
        else:
            shapes.update(q_proj_weight=(D, D), k_proj_weight=(KV, self.kdim),
                          v_proj_weight=(KV, self.vdim))
        if self.bias:
            shapes.update({"in_proj_bias": (D + 2 * KV,), "out_proj.bias": (D,)})
        return shapes

    def state_dict(self):
        """The weights under torch.nn.MultiheadAttention's names, as new arrays of the layer's
        dtype."""
        return {name: w.copy() for name, w in self._state.items()}

    def load_state_dict(self, state_dict):
        """Set every weight from a dict with PyTorch's names (in_proj_weight or q/k/v_proj_weight,
        in_proj_bias, out_proj.weight, out_proj.bias), of any float dtype (converted to the
        layer's); the weights are packed again."""
        shapes = self._expected_shapes()
        missing = sorted(set(shapes) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(shapes))
        if missing or unexpected:
            raise ValueError(f"load_state_dict: missing keys {missing}, unexpected keys "
                             f"{unexpected}; expected {sorted(shapes)}")
        state = {}
        for name, shape in shapes.items():
            w = weight_array(state_dict[name], f"state_dict[{name!r}]")
            w = np.array(_checks.check_weight(f"state_dict[{name!r}]", w, shape, self.dtype),
                         self.dtype)
            w.flags.writeable = False
            state[name] = w
        self._state = state
        self._split_and_pack()

    def _split_and_pack(self):
        D, KV = self.embed_dim, self.num_kv_heads * self.head_dim
        s = self._state
        if self._qkv_same_dim:
            w = s["in_proj_weight"]
            wq, wk, wv = w[:D], w[D:D + KV], w[D + KV:]
        else:
            wq, wk, wv = s["q_proj_weight"], s["k_proj_weight"], s["v_proj_weight"]
        b = s.get("in_proj_bias")
        b32 = None if b is None else b.astype(np.float32)  # the GEMM adds float32 biases
        self._biases = (None, None, None, None) if b is None else (
            b32[:D], b32[D:D + KV], b32[D + KV:], s["out_proj.bias"].astype(np.float32))
        self._packed = _PackedWeights(wq, wk, wv, s["out_proj.weight"])

    def __getattr__(self, name):
        # in_proj_weight, q_proj_weight, ..., out_proj_weight / out_proj_bias: read-only arrays
        state = self.__dict__.get("_state", {})
        key = name.replace("out_proj_", "out_proj.")
        if key in state:
            return state[key]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def from_torch(cls, module):
        """A MultiHeadAttention with the weights and batch_first of a torch.nn.MultiheadAttention."""
        if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
            raise NotImplementedError("from_torch: add_bias_kv and add_zero_attn are not supported")
        w = module.out_proj.weight
        dtype = {"torch.bfloat16": "bfloat16", "torch.float16": "float16"}.get(str(w.dtype))
        mod = cls(module.embed_dim, module.num_heads, kdim=module.kdim, vdim=module.vdim,
                  bias=module.in_proj_bias is not None, batch_first=module.batch_first,
                  dtype=dtype)
        mod.load_state_dict({k: v for k, v in module.state_dict().items()})
        return mod

    # ---- forward ---------------------------------------------------------------------------

    @accepts_tensors
    def __call__(self, query, key=None, value=None, *, key_padding_mask=None, attn_mask=None,
                 need_weights=False, average_attn_weights=True, is_causal=False, kv_cache=None):
        c = _checks.check_mha(self, query, key, value, key_padding_mask, attn_mask, kv_cache)
        B, L, Hq, Hkv, E = c.B, c.L, self.num_heads, self.num_kv_heads, self.head_dim
        if kv_cache is not None:
            kvbuf, kv_pos = kv_cache._kv, len(kv_cache)
            causal, diag = True, kv_pos  # bottom-right: S - L = the tokens cached before
        else:
            kvbuf = np.empty((B, 2 * Hkv, c.S_new, E), dtype=np.float32)
            kv_pos, causal, diag = 0, bool(is_causal), 0
        S = kv_pos + c.S_new
        masks = _checks.mha_masks(c, Hq, S)

        out = np.empty((B * L, self.embed_dim), dtype=np.float32)
        concat = np.empty((B * L, self.embed_dim), dtype=np.float32)
        qbuf = np.empty((B, Hq, L, E), dtype=np.float32)
        weights = np.zeros((B, Hq, L, S), dtype=np.float32) if need_weights else None
        avg = np.empty((B, L, S), np.float32) if need_weights and average_attn_weights else None
        seq_major = not self.batch_first and not c.unbatched
        kv_arr, kv_code = _checks.native(kvbuf)  # a 16-bit cache as its bits
        _core.mha_forward(out, concat, weights, avg, c.xq, c.xk, c.xv, *self._packed.get(),
                          *self._biases, qbuf, kv_arr, kv_pos, c.S_new, seq_major, masks[0],
                          masks[1], causal, diag, float(1.0 / np.sqrt(E)), c.x_code, kv_code)
        if kv_cache is not None:
            kv_cache._len = S

        if c.unbatched:
            out = out.reshape(L, self.embed_dim)
        elif seq_major:
            out = out.reshape(L, B, self.embed_dim)
        else:
            out = out.reshape(B, L, self.embed_dim)
        if need_weights:
            weights = _checks.cast(avg if avg is not None else weights, c.dtype)
            if c.unbatched:
                weights = weights[0]
        return _checks.cast(out, c.dtype), weights
