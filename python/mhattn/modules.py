"""MultiHeadAttention (projections + attention, the layer of a transformer) and KVCache.

The layer holds its weights as read-only NumPy arrays of its dtype (float32, bfloat16 or
float16) under PyTorch's names, and keeps them packed for the GEMM, so a call never repacks
them. To change weights, use load_state_dict (which repacks); the arrays themselves cannot be
written to.
"""

from __future__ import annotations

import math

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

    def append(self, keys, values):
        """Add the keys and values (batch, num_kv_heads, T, head_dim) of T new tokens, rounded
        to the cache's dtype; for layers that change keys after the projection (rotary
        positions), which then attend over .keys and .values with
        scaled_dot_product_attention. Overflow raises ValueError and leaves the cache as it
        was."""
        k = _checks.as_dtype(keys, self.dtype, "keys")
        v = _checks.as_dtype(values, self.dtype, "values")
        want = (self.batch, self.num_kv_heads, self.head_dim)
        for name, a in (("keys", k), ("values", v)):
            if a.ndim != 4 or (a.shape[0], a.shape[1], a.shape[3]) != want:
                raise ValueError(f"KVCache.append: {name} must be (batch={self.batch}, "
                                 f"num_kv_heads={self.num_kv_heads}, T, head_dim="
                                 f"{self.head_dim}), got {a.shape}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"KVCache.append: keys hold {k.shape[2]} tokens, values {v.shape[2]}")
        self._check_room(k.shape[2])
        end = self._len + k.shape[2]
        self._kv[:, :self.num_kv_heads, self._len:end] = k
        self._kv[:, self.num_kv_heads:, self._len:end] = v
        self._len = end

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
        self._check_room(new)

    def _check_room(self, new):
        if self._len + new > self.max_len:
            raise ValueError(f"kv_cache overflow: it holds {self._len} of {self.max_len} tokens "
                             f"and this call adds {new}; the cache is unchanged")


class MultiHeadAttention:
    """Multi-head attention with projections: project, split into heads, attend in every head,
    concatenate, project back. The forward of torch.nn.MultiheadAttention, with grouped-query
    heads and a KV cache as well.

    MultiHeadAttention(embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None,
    bias=True, batch_first=True, seed=None, dtype=None, head_dim=None). Weights start as
    PyTorch initialises them (Xavier uniform in-projection, zero biases), drawn from
    numpy.random.default_rng(seed).
    dtype ("float32", the default, "bfloat16" or "float16") is what the layer stores its weights
    in and computes its projections in; an input of another float dtype is converted to it on
    the way in, and the output has the input's dtype.

    Calling it: mha(query, key=None, value=None, *, key_padding_mask=None, attn_mask=None,
    need_weights=False, average_attn_weights=True, is_causal=False, kv_cache=None,
    head_mask=None) -> (output, weights or None).
      query (B, L, embed_dim) [(L, B, embed_dim) if not batch_first; (L, embed_dim) unbatched]
      key (B, S, kdim), value (B, S, vdim): default to query (self-attention); another
      sequence makes it cross-attention (an encoder-decoder's decoder attending to the encoder).
      output: the shape of query. weights: (B, num_heads, L, S), or (B, L, S) averaged.
    Masks mean what they mean in torch.nn.MultiheadAttention: bool True = the key is ignored,
    float = added to the scores. key_padding_mask is (B, S); attn_mask (L, S) or
    (B * num_heads, L, S). is_causal masks later keys (top-left). With kv_cache (a KVCache),
    query holds the new tokens only and attention is causal, aligned bottom-right.
    A query that can see no key attends to nothing: its output is the out-projection's bias.
    head_mask (num_heads,) or (B, num_heads): multipliers on each head's output before the
    out-projection, as transformers 4's head_mask (the returned weights of a head are multiplied
    too). A head whose multiplier is 0 costs nothing: the call runs the layer with those heads
    pruned (see prune_heads), a pruned copy kept for each of the last few masks. With kv_cache,
    every kv head's new keys and values still go into the cache (a later call may keep other
    heads), and only the kept heads attend, reading the cache in place.

    prune_heads(heads) removes heads for good. After it, num_heads (and num_kv_heads) count
    what is left, head_dim is unchanged, and the projections to and from the heads are
    num_heads · head_dim wide rather than embed_dim. head_dim= (default embed_dim // num_heads)
    builds such a layer directly, for instance to load a pruned layer's state_dict().
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None,
                 bias=True, batch_first=True, seed=None, dtype=None, head_dim=None):
        self.dtype = _checks.compute_dtype(dtype)
        self.embed_dim = _checks.as_int(embed_dim, "embed_dim", 1)
        self.num_heads = _checks.as_int(num_heads, "num_heads", 1)
        if head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads "
                             f"({self.num_heads}), or head_dim given")
        self.num_kv_heads = (self.num_heads if num_kv_heads is None
                             else _checks.as_int(num_kv_heads, "num_kv_heads", 1))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.kdim = self.embed_dim if kdim is None else _checks.as_int(kdim, "kdim", 1)
        self.vdim = self.embed_dim if vdim is None else _checks.as_int(vdim, "vdim", 1)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.head_dim = (self.embed_dim // self.num_heads if head_dim is None
                         else _checks.as_int(head_dim, "head_dim", 1))

        rng = np.random.default_rng(seed)
        D, Q, KV = self.embed_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim

        def xavier(rows, cols):
            bound = np.sqrt(6.0 / (rows + cols))
            return rng.uniform(-bound, bound, size=(rows, cols)).astype(np.float32)

        if self._qkv_same_dim:
            w = xavier(Q + 2 * KV, D)
            wq, wk, wv = w[:Q], w[Q:Q + KV], w[Q + KV:]
        else:
            wq, wk, wv = xavier(Q, D), xavier(KV, self.kdim), xavier(KV, self.vdim)
        wo = rng.uniform(-1, 1, size=(D, Q)).astype(np.float32) / np.sqrt(Q)
        sd = {"out_proj.weight": wo}
        if self._qkv_same_dim:
            sd["in_proj_weight"] = np.concatenate([wq, wk, wv])
        else:
            sd.update(q_proj_weight=wq, k_proj_weight=wk, v_proj_weight=wv)
        if self.bias:
            sd["in_proj_bias"] = np.zeros(Q + 2 * KV, np.float32)
            sd["out_proj.bias"] = np.zeros(D, np.float32)
        self.load_state_dict(sd)

    @property
    def _qkv_same_dim(self):
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    def __repr__(self):
        extra = "" if self.num_kv_heads == self.num_heads else f", num_kv_heads={self.num_kv_heads}"
        if not self._qkv_same_dim:
            extra += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.num_heads * self.head_dim != self.embed_dim:
            extra += f", head_dim={self.head_dim} (pruned)"
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}"
                f"{extra}, bias={self.bias}, batch_first={self.batch_first})")

    # ---- weights ---------------------------------------------------------------------------

    def _expected_shapes(self):
        D, Q, KV = self.embed_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {"out_proj.weight": (D, Q)}
        if self._qkv_same_dim:
            shapes["in_proj_weight"] = (Q + 2 * KV, D)
        else:
            shapes.update(q_proj_weight=(Q, D), k_proj_weight=(KV, self.kdim),
                          v_proj_weight=(KV, self.vdim))
        if self.bias:
            shapes.update({"in_proj_bias": (Q + 2 * KV,), "out_proj.bias": (D,)})
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

    def _split(self, state):
        """(wq, wk, wv, bq, bk, bv) of a state dict of this layer's shapes (biases None without)."""
        Q, KV = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self._qkv_same_dim:
            w = state["in_proj_weight"]
            wq, wk, wv = w[:Q], w[Q:Q + KV], w[Q + KV:]
        else:
            wq, wk, wv = state["q_proj_weight"], state["k_proj_weight"], state["v_proj_weight"]
        b = state.get("in_proj_bias")
        bq, bk, bv = (None, None, None) if b is None else (b[:Q], b[Q:Q + KV], b[Q + KV:])
        return wq, wk, wv, bq, bk, bv

    def _split_and_pack(self):
        s = self._state
        wq, wk, wv, bq, bk, bv = self._split(s)
        f32 = lambda b: b.astype(np.float32)  # the GEMM adds float32 biases
        self._biases = (None, None, None, None) if bq is None else (
            f32(bq), f32(bk), f32(bv), f32(s["out_proj.bias"]))
        self._packed = _PackedWeights(wq, wk, wv, s["out_proj.weight"])
        self._masked_layers = {}  # head_mask's pruned copies, of these weights

    # ---- heads -----------------------------------------------------------------------------

    def prune_heads(self, heads):
        """Remove the query heads `heads` (indices among the current ones) for good, as
        transformers 4's prune_heads did: their rows of the Q projection, their columns of the
        out-projection, and a kv head's rows of K and V once all its query heads are gone. The
        layer then computes what it computed with those heads' head_mask at 0, and state_dict()
        is the pruned layer's. Grouped-query heads left in groups of unequal sizes get their kv
        heads repeated until every group has the gcd of the sizes (the kernels want equal
        groups). Returns self."""
        H = self.num_heads
        drop = set()
        for h in np.asarray(heads, dtype=object).reshape(-1).tolist():
            if isinstance(h, (bool, np.bool_)) or not isinstance(h, (int, np.integer)) or not 0 <= h < H:
                raise ValueError(f"prune_heads: heads must be ints in [0, {H}); got {heads!r}")
            drop.add(int(h))
        if len(drop) == H:
            raise ValueError(f"prune_heads: cannot remove all {H} heads")
        keep = [h for h in range(H) if h not in drop]
        if drop:
            state, self.num_heads, self.num_kv_heads = self._pruned_state(keep)
            self._state = state
            self._split_and_pack()
        return self

    def _pruned_state(self, keep):
        """(state dict, num_heads, num_kv_heads) of this layer keeping query heads `keep`."""
        E, G = self.head_dim, self.num_heads // self.num_kv_heads
        groups = [[h for h in keep if h // G == j] for j in range(self.num_kv_heads)]
        g = math.gcd(*(len(m) for m in groups if m))
        kv = [j for j, m in enumerate(groups) for _ in range(len(m) // g)]
        rows = lambda hs: np.concatenate([np.arange(h * E, (h + 1) * E) for h in hs])
        q_rows, kv_rows = rows(keep), rows(kv)
        wq, wk, wv, bq, bk, bv = self._split(self._state)
        s = {"out_proj.weight": self._state["out_proj.weight"][:, q_rows]}
        if self._qkv_same_dim:
            s["in_proj_weight"] = np.concatenate([wq[q_rows], wk[kv_rows], wv[kv_rows]])
        else:
            s.update(q_proj_weight=wq[q_rows], k_proj_weight=wk[kv_rows], v_proj_weight=wv[kv_rows])
        if bq is not None:
            s["in_proj_bias"] = np.concatenate([bq[q_rows], bk[kv_rows], bv[kv_rows]])
            s["out_proj.bias"] = self._state["out_proj.bias"]
        for w in s.values():
            w.flags.writeable = False
        return s, len(keep), len(kv)

    def _masked_layer(self, m):
        """The layer with the heads where m (float32, (num_heads,)) is 0 pruned and the others'
        outputs scaled by m (their out-projection columns), or None when every head is 0; the
        last few are kept."""
        key = m.tobytes()
        if key not in self._masked_layers:
            keep = np.flatnonzero(m).tolist()
            sub = None
            if keep:
                sub = object.__new__(type(self))
                sub.__dict__.update(self.__dict__)
                state, sub.num_heads, sub.num_kv_heads = self._pruned_state(keep)
                scale = np.repeat(m[keep], self.head_dim)
                wo = (state["out_proj.weight"].astype(np.float32) * scale).astype(self.dtype)
                wo.flags.writeable = False
                sub._state = {**state, "out_proj.weight": wo}
                sub._split_and_pack()
            if len(self._masked_layers) >= 4:
                self._masked_layers.pop(next(iter(self._masked_layers)))
            self._masked_layers[key] = sub
        return self._masked_layers[key]


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
                 need_weights=False, average_attn_weights=True, is_causal=False, kv_cache=None,
                 head_mask=None):
        if head_mask is not None:
            return self._call_masked(head_mask, query, key, value, key_padding_mask, attn_mask,
                                     need_weights, average_attn_weights, is_causal, kv_cache)
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
        concat = np.empty((B * L, Hq * E), dtype=np.float32)
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

    @accepts_tensors
    def varlen(self, x, lengths, *, is_causal=False):
        """Self-attention over sequences of several lengths packed end to end, with no padding:
        x (N, embed_dim) holds the tokens of sequence 0, then those of sequence 1, and so on,
        lengths (B,) how many each has (they sum to N). Each token attends to the tokens of
        its own sequence (with is_causal, to those before it and itself) -> (N, embed_dim) in
        x's dtype.

        It equals padding the sequences to the longest and calling the layer with
        key_padding_mask, on the real rows. The projections run on the N real tokens only;
        attention runs on the padded grid, its padded keys masked. On a batch of sentences of
        many lengths, that is the padding's share of the projections saved. Self-attention of
        a layer with kdim = vdim = embed_dim; no weights, head_mask or cache.
        """
        if not self._qkv_same_dim:
            raise ValueError("varlen is self-attention: the layer's kdim and vdim must be embed_dim")
        x = _checks.as_array(x)
        if not _checks.is_float(x.dtype) or x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise ValueError(f"varlen wants x (N, embed_dim={self.embed_dim}) of floats, got "
                             f"{x.shape} {x.dtype}")
        n = np.asarray(lengths)
        if n.ndim != 1 or n.dtype.kind not in "iu" or (n.size and n.min() < 0) or n.sum() != len(x):
            raise ValueError(f"varlen: lengths must be a 1-D array of counts >= 0 summing to "
                             f"x's {len(x)} rows, got {n!r}")
        B, T = len(n), int(n.max(initial=0))
        keep = np.arange(T) < n[:, None]  # (B, T): the real tokens of each sequence
        packed, weights = self._packed.get(), self._packed._weights
        # q, k and v of the (B, T) grid in one buffer, float32 as in the layer's own call; the
        # padding is zeros (masked out as keys, its query rows dropped)
        grid = np.empty((B, T, sum(w.shape[0] for w in weights[:3])), np.float32)
        grid[~keep] = 0
        grids, col = [], 0
        for i, heads in enumerate((self.num_heads, self.num_kv_heads, self.num_kv_heads)):
            part = grid[..., col:col + weights[i].shape[0]]
            part[keep] = functional.apply_linear(x, weights[i].shape, packed[i], self._biases[i],
                                                 0, self.dtype)
            grids.append(part.reshape(B, T, heads, self.head_dim).transpose(0, 2, 1, 3))  # (B, h, T, E)
            col += weights[i].shape[0]
        o = functional.scaled_dot_product_attention(*grids, attn_mask=keep[:, None, None, :],
                                                    is_causal=is_causal, enable_gqa=True)
        rows = o.transpose(0, 2, 1, 3)[keep].reshape(len(x), self.num_heads * self.head_dim)
        out = functional.apply_linear(rows, weights[3].shape, packed[3], self._biases[3], 0,
                                      self.dtype)
        return _checks.as_dtype(out, _checks.result_dtype(x.dtype), "out")

    def _call_masked(self, head_mask, query, key, value, key_padding_mask, attn_mask,
                     need_weights, average_attn_weights, is_causal, kv_cache):
        """__call__ with head_mask: each group of batch rows that share a mask runs on the layer
        with that mask's zero heads pruned (_masked_layer)."""
        H = self.num_heads
        m = _checks.as_float(head_mask, "head_mask")
        if kv_cache is not None:
            return self._call_masked_cached(m, query, key, value, key_padding_mask, attn_mask,
                                            need_weights, average_attn_weights, kv_cache)
        if m.shape == (H,) and attn_mask is None and not need_weights:  # the common case, short
            if not np.all(np.isfinite(m)):
                raise ValueError("head_mask must be finite")
            sub = self._masked_layer(np.ascontiguousarray(m))
            if sub is not None:
                return sub(query, key, value, key_padding_mask=key_padding_mask,
                           is_causal=is_causal)
        c = _checks.check_mha(self, query, key, value, key_padding_mask, attn_mask, None)
        rows = self._mask_rows(m, c)
        S = c.S_new
        axis = 0 if c.unbatched or self.batch_first else 1  # of the batch in query, key, value
        out = weights = None
        for mask_row, sel, keep, sub in self._mask_groups(rows):
            take = (lambda x: x) if len(sel) == c.B else (
                lambda x: None if x is None else np.take(np.asarray(x), sel, axis=axis))
            q, k, v = take(query), take(key), take(value)
            kpm = None if key_padding_mask is None else (
                key_padding_mask if len(sel) == c.B else np.asarray(key_padding_mask)[sel])
            am = attn_mask
            if am is not None and np.ndim(am) == 3:  # (B·H, L, S): this group's rows, kept heads
                am = np.asarray(am).reshape(c.B, H, c.L, S)[sel][:, keep].reshape(-1, c.L, S)
            if sub is None:  # every head masked: the out-projection's bias alone
                shape = np.shape(q)[:-1] + (self.embed_dim,)
                o = np.zeros(shape, np.float32)
                if self.bias:
                    o += self._biases[3]
                o, w = _checks.cast(o, c.dtype), None
            else:
                o, w = sub(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights,
                           average_attn_weights=False, is_causal=is_causal)
            if out is None:
                out = np.empty(np.shape(query)[:-1] + (self.embed_dim,), o.dtype)
            if len(sel) == c.B:
                out[...] = o
            else:
                idx = [slice(None)] * out.ndim
                idx[axis] = sel
                out[tuple(idx)] = o
            if need_weights:  # (B, H, L, S) of every head, masked ones scaled (0 if pruned)
                if weights is None:
                    weights = np.zeros((c.B, H, c.L, S), np.float32)
                if w is not None:
                    w32 = np.asarray(w, np.float32).reshape(len(sel), len(keep), c.L, S)
                    weights[sel[:, None], keep[None, :]] = w32 * mask_row[keep][:, None, None]
        if need_weights:
            weights = self._masked_weights(weights, average_attn_weights, c)
        return out, weights

    def _mask_groups(self, rows):
        """(mask_row, sel, keep, sub) for each distinct row of the masks rows (B, num_heads): the
        batch rows sel that have it, the heads it keeps, and the layer with the others pruned
        (_masked_layer; None when it keeps none)."""
        for mask_row in np.unique(rows, axis=0):
            yield (mask_row, np.flatnonzero(np.all(rows == mask_row, axis=1)),
                   np.flatnonzero(mask_row),
                   self._masked_layer(np.ascontiguousarray(mask_row, np.float32)))

    @staticmethod
    def _masked_weights(weights, average, c):
        """The weights (B, H, L, S) of a masked call as it returns them."""
        if average:
            weights = weights.mean(axis=1)
        return _checks.cast(weights[0] if c.unbatched else weights, c.dtype)

    def _mask_rows(self, m, c):
        """head_mask m, checked, as (B, num_heads) rows."""
        H = self.num_heads
        if m.shape not in ((H,), (c.B, H)) or (c.unbatched and m.ndim != 1):
            raise ValueError(f"head_mask must be ({H},) or (batch, {H}) = ({c.B}, {H}); got {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError("head_mask must be finite")
        return np.broadcast_to(m, (c.B, H))

    def _call_masked_cached(self, m, query, key, value, key_padding_mask, attn_mask,
                            need_weights, average_attn_weights, kv_cache):
        """__call__ with head_mask and kv_cache.

        1. The new tokens' keys and values of every kv head go into the cache, as the unmasked
           call writes them (a later call may keep other heads).
        2. For each group of batch rows that share a mask: the queries of the kept heads only
           (the Q rows of _masked_layer's pruned copy), then attention of each kv head's kept
           query heads over that kv head, read in place from the cache (bottom-right causal),
           into their columns of the concatenated heads.
        3. The out-projection of the kept heads' columns, scaled by the mask (the pruned copy's).
        """
        c = _checks.check_mha(self, query, key, value, key_padding_mask, attn_mask, kv_cache)
        rows = self._mask_rows(m, c)
        B, L, H, Hkv, E = c.B, c.L, self.num_heads, self.num_kv_heads, self.head_dim
        G, pos = H // Hkv, len(kv_cache)
        S = pos + L
        masks = _checks.mha_masks(c, H, S)  # checked here; sliced per group below
        x = _checks.as_dtype(query, self.dtype, "query")
        x = x[None] if c.unbatched else (x if self.batch_first else x.transpose(1, 0, 2))
        xa, xcode = _checks.native(np.ascontiguousarray(x).reshape(B * L, self.embed_dim))

        def project(x_rows, packed, bias, n, code=xcode):
            out = np.empty((x_rows.shape[0], n), np.float32)
            _core.gemm(out, x_rows, packed, bias, 0, code)
            return out

        _, pk, pv, _ = self._packed.get()  # 1.
        for i, (packed, bias) in enumerate(((pk, self._biases[1]), (pv, self._biases[2]))):
            new = project(xa, packed, bias, Hkv * E).reshape(B, L, Hkv, E).transpose(0, 2, 1, 3)
            kv_cache._kv[:, i * Hkv:(i + 1) * Hkv, pos:S] = new  # rounded to the cache's dtype
        kv_cache._len = S
        cache, kv_code = _checks.native(kv_cache._kv)

        out = np.empty((B, L, self.embed_dim), np.float32)
        weights = np.zeros((B, H, L, S), np.float32) if need_weights else None
        scale = float(1.0 / np.sqrt(E))
        for mask_row, sel, keep, sub in self._mask_groups(rows):  # 2.
            if sub is None:  # every head masked: the out-projection's bias alone
                out[sel] = self._biases[3] if self.bias else 0.0
                continue
            pq, _, _, po = sub._packed.get()
            x_sel = xa if len(sel) == B else xa.reshape(B, L, -1)[sel].reshape(len(sel) * L, -1)
            q = project(x_sel, pq, sub._biases[0], len(keep) * E).reshape(len(sel), L, len(keep), E)
            concat = np.empty_like(q)
            # (rows of q, rows of the cache): the whole batch at once, else one row at a time
            runs = ([(slice(None), slice(None))] if len(sel) == B else
                    [(slice(i, i + 1), slice(b, b + 1)) for i, b in enumerate(sel)])
            for j in np.unique(keep // G):
                s, e = np.searchsorted(keep // G, [j, j + 1])
                for qr, cr in runs:  # (rows, heads of kv head j, L, E) views, no copies
                    view = lambda a: a[qr].transpose(0, 2, 1, 3)[:, s:e]
                    qv = view(q)
                    w = np.empty(qv.shape[:3] + (S,), np.float32) if need_weights else None
                    _core.attention(view(concat), w, qv, cache[cr, j:j + 1, :S],
                                    cache[cr, Hkv + j:Hkv + j + 1, :S],
                                    *(None if mk is None else self._mask_slice(mk, cr, keep[s:e])
                                      for mk in masks),
                                    True, pos, 0, scale, 0.0, kv_code)
                    if need_weights:
                        weights[cr, keep[s:e]] = w * mask_row[keep[s:e]][:, None, None]
            o = project(concat.reshape(len(sel) * L, -1), po, sub._biases[3], self.embed_dim, 0)  # 3.
            out[sel] = o.reshape(len(sel), L, -1)

        if c.unbatched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(1, 0, 2).copy()
        if need_weights:
            weights = self._masked_weights(weights, average_attn_weights, c)
        return _checks.cast(out, c.dtype), weights

    @staticmethod
    def _mask_slice(mask, rows, heads):
        """A kernel mask (array broadcast to (B, H, L, S), keep) cut to the batch rows `rows` (a
        slice) and `heads`."""
        a, keep = mask
        a = a[rows]
        a = a[:, :len(heads)] if a.strides[1] == 0 else a[:, heads]
        return (a, keep)
