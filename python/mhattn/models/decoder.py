"""CausalLM: a decoder-only language model on mhattn's kernels, and greedy generation with a
KVCache per layer.

Two families of decoders:
- GPT-2: learned positions, LayerNorm, MultiHeadAttention over the cache, the GELU fused into
  the feed-forward's first GEMM.
- The Llama family: Llama, Qwen2 (biases on q, k and v) and Mistral (a sliding window). Rotary
  positions (the default and the llama3 kinds) are applied in NumPy between the projection
  and the attention, so these layers append to their cache themselves (KVCache.append) and
  attend with scaled_dot_product_attention over it: grouped-query heads read their kv head in
  place, causal aligned bottom-right, the window without a mask. RMSNorm, the SwiGLU
  feed-forward with the SiLU fused into the gate's GEMM.

q, k and v come out of one GEMM (their weights concatenated). Embeddings, norms and the
residual stream are float32 in every dtype; dtype="bfloat16" or "float16" holds the layers'
weights, the KV cache and the logits' projection in half the bytes.
"""

from __future__ import annotations

import os

import numpy as np

from .. import _checks
from .._threads import threads as _threads
from .._torch import weight_array
from ..functional import layer_norm, rms_norm, scaled_dot_product_attention
from ..modules import KVCache, Linear, MultiHeadAttention
from ._files import read_json, read_weights

__all__ = ["CausalLM"]

_LLAMA_FAMILY = ("llama", "qwen2", "mistral")
# GPT-2's activation_function names, as the GEMM's activations.
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                     "relu": "relu", "silu": "silu", "swish": "silu"}


def _f32(a):
    return np.asarray(a, np.float32)


class _Weights:
    """The checkpoint's tensors by name, saying which one is missing when one is."""

    def __init__(self, weights, family):
        self._w = weights
        self._family = family

    def __call__(self, name):
        if name not in self._w:
            raise ValueError(f"the {self._family} checkpoint has no weight {name!r}")
        return self._w[name]

    def get(self, name, default=None):
        return self._w.get(name, default)


class _GPT2:
    """GPT-2's blocks: forward(ids (B, T), caches, positions (B or 1, T), keys) -> the final
    LayerNorm's output (B, T, D). keys: None, or (B, cached + T) bool, False at padding."""

    def __init__(self, cfg, w, dtype):
        D, H = cfg["n_embd"], cfg["n_head"]
        act = cfg.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTIVATIONS:
            raise NotImplementedError(f"GPT-2 with activation_function={act!r}")
        if cfg.get("scale_attn_by_inverse_layer_idx") or not cfg.get("scale_attn_weights", True):
            raise NotImplementedError("GPT-2 with scores scaled other than by 1/sqrt(head dim)")
        self.dtype, self.eps = dtype, cfg["layer_norm_epsilon"]
        self.kv_heads, self.head_dim, self.max_positions = H, D // H, cfg["n_positions"]
        self.embed, self.positions = w("wte.weight"), _f32(w("wpe.weight"))
        self.head_weight = w.get("lm_head.weight", self.embed)  # tied to the token embeddings
        self.norm = (_f32(w("ln_f.weight")), _f32(w("ln_f.bias")))
        self.layers = []
        for i in range(cfg["n_layer"]):
            p = f"h.{i}."
            att = MultiHeadAttention(D, H, dtype=dtype)
            # GPT-2's Conv1D keeps weights as (in, out); mhattn takes PyTorch's (out, in).
            att.load_state_dict({
                "in_proj_weight": w(p + "attn.c_attn.weight").T,
                "in_proj_bias": w(p + "attn.c_attn.bias"),
                "out_proj.weight": w(p + "attn.c_proj.weight").T,
                "out_proj.bias": w(p + "attn.c_proj.bias"),
            })
            self.layers.append(dict(
                attention=att,
                norm1=(_f32(w(p + "ln_1.weight")), _f32(w(p + "ln_1.bias"))),
                norm2=(_f32(w(p + "ln_2.weight")), _f32(w(p + "ln_2.bias"))),
                up=Linear(w(p + "mlp.c_fc.weight").T, w(p + "mlp.c_fc.bias"),
                          activation=_GPT2_ACTIVATIONS[act], dtype=dtype),
                down=Linear(w(p + "mlp.c_proj.weight").T, w(p + "mlp.c_proj.bias"), dtype=dtype),
            ))

    def forward(self, ids, caches, positions, keys):
        if positions.max() >= self.max_positions:
            raise ValueError(f"GPT-2 has {self.max_positions} positions; these tokens would "
                             f"reach position {positions.max()}")
        x = _f32(self.embed[ids]) + self.positions[positions]
        ignored = None if keys is None else ~keys  # nn.MultiheadAttention's sense of the mask
        for layer, kv in zip(self.layers, caches):
            a, _ = layer["attention"](layer_norm(x, *layer["norm1"], self.eps), kv_cache=kv,
                                      key_padding_mask=ignored)
            x = x + a
            x = x + layer["down"](layer["up"](layer_norm(x, *layer["norm2"], self.eps)))
        return layer_norm(x, *self.norm, self.eps)


def _inverse_frequencies(cfg, E):
    """RoPE's (E/2,) float32 inverse frequencies theta^(-2i/E), as transformers computes them
    for rope_type "default" and "llama3" (Llama 3.1's long-context scaling)."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NotImplementedError("rotary positions on part of the head dims")
    inv = (1.0 / np.float32(theta) ** (np.arange(0, E, 2, dtype=np.float32) / np.float32(E)))
    if kind == "default":
        return inv.astype(np.float32)
    if kind != "llama3":
        raise NotImplementedError(f"rotary positions of rope_type {kind!r} (mhattn has "
                                  f"'default' and 'llama3')")
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    middle = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(middle, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)


class _Llama:
    """The Llama family's blocks: forward(ids (B, T), caches, positions (B or 1, T), keys) ->
    the final RMSNorm's output. keys: None, or (B, cached + T) bool, False at padding."""

    def __init__(self, cfg, w, dtype):
        family = cfg["model_type"]
        D, Hq = cfg["hidden_size"], cfg["num_attention_heads"]
        Hkv = cfg.get("num_key_value_heads") or Hq
        E = cfg.get("head_dim") or D // Hq
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"{family} with hidden_act={cfg['hidden_act']!r}")
        self.dtype, self.eps = dtype, cfg["rms_norm_eps"]
        self.hq, self.kv_heads, self.head_dim = Hq, Hkv, E
        self.inv_freq = _inverse_frequencies(cfg, E)
        self.embed, self.norm = w("embed_tokens.weight"), _f32(w("norm.weight"))
        self.head_weight = w.get("lm_head.weight", self.embed)
        window = cfg.get("sliding_window")
        types = cfg.get("layer_types")
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            if types is not None:
                win = window if types[i] == "sliding_attention" else None
            elif family == "mistral":
                win = window
            elif family == "qwen2" and cfg.get("use_sliding_window"):
                win = window if i >= cfg.get("max_window_layers", 0) else None
            else:
                win = None
            p, a, m = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp."
            names = [a + n for n in ("q_proj", "k_proj", "v_proj")]
            biases = [w.get(n + ".bias") for n in names]
            qkv_bias = None
            if any(b is not None for b in biases):  # Qwen2: q, k and v have biases, o has none
                rows = (Hq * E, Hkv * E, Hkv * E)
                qkv_bias = np.concatenate([np.zeros(r, np.float32) if b is None else _f32(b)
                                           for b, r in zip(biases, rows)])
            self.layers.append(dict(
                window=win,
                norm1=_f32(w(p + "input_layernorm.weight")),
                norm2=_f32(w(p + "post_attention_layernorm.weight")),
                qkv=Linear(np.concatenate([w(n + ".weight") for n in names]), qkv_bias, dtype=dtype),
                o=Linear(w(a + "o_proj.weight"), w.get(a + "o_proj.bias"), dtype=dtype),
                # The gate's SiLU is applied by the GEMM as it stores.
                gate=Linear(w(m + "gate_proj.weight"), w.get(m + "gate_proj.bias"),
                            activation="silu", dtype=dtype),
                up=Linear(w(m + "up_proj.weight"), w.get(m + "up_proj.bias"), dtype=dtype),
                down=Linear(w(m + "down_proj.weight"), w.get(m + "down_proj.bias"), dtype=dtype),
            ))

    def _rotation(self, positions):
        """cos and sin (B or 1, T, 1, E) of positions (B or 1, T), each angle twice (the halves
        of a head's dims turn together), float32 as transformers computes them."""
        angle = positions.astype(np.float32)[..., None] * self.inv_freq
        angle = np.concatenate([angle, angle], -1)[:, :, None]
        return np.cos(angle), np.sin(angle)

    def forward(self, ids, caches, positions, keys):
        B, T = ids.shape
        Hq, Hkv, E = self.hq, self.kv_heads, self.head_dim
        cos, sin = self._rotation(positions)
        mask = None if keys is None else keys[:, None, None, :]  # (B, 1, 1, S), True: attend
        half = E // 2
        x = _f32(self.embed[ids])
        for layer, kv in zip(self.layers, caches):
            qkv = layer["qkv"](rms_norm(x, layer["norm1"], self.eps)).reshape(B, T, Hq + 2 * Hkv, E)
            qk = qkv[:, :, :Hq + Hkv]  # (B, T, Hq + Hkv, E): q's heads, then k's
            turned = np.concatenate([-qk[..., half:], qk[..., :half]], -1)  # rotate_half
            qk = qk * cos + turned * sin
            kv.append(qk[:, :, Hq:].transpose(0, 2, 1, 3), qkv[:, :, Hq + Hkv:].transpose(0, 2, 1, 3))
            q = qk[:, :, :Hq].transpose(0, 2, 1, 3).astype(kv.dtype, copy=False)
            o = scaled_dot_product_attention(q, kv.keys, kv.values, mask, is_causal=True,
                                             causal_align="bottom_right", enable_gqa=True,
                                             window=layer["window"])
            x = x + layer["o"](o.transpose(0, 2, 1, 3).reshape(B, T, Hq * E))
            h = rms_norm(x, layer["norm2"], self.eps)
            x = x + layer["down"](layer["gate"](h) * layer["up"](h))
        return rms_norm(x, self.norm, self.eps)


class CausalLM:
    """A decoder-only language model: GPT-2, or the Llama family (Llama, Qwen2, Mistral).

    CausalLM.from_pretrained(path, *, dtype="float32") reads a transformers checkpoint folder
    (config.json and model.safetensors, or its shards; generation_config.json for the end
    token when present). CausalLM.from_transformers(model, *, dtype="float32") takes a
    transformers model (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM,
    MistralForCausalLM). dtype is what the layers' weights, the KV cache and the logits'
    projection are held in ("bfloat16" and "float16": half the bytes); embeddings, norms and
    the residual stream stay float32, and so do the logits.

    generate(input_ids, max_new_tokens) is greedy decoding; forward(input_ids, cache) the
    logits of new tokens. It pickles: the weights travel and the packed layers are rebuilt on
    arrival. The thread count is per call (threads=) or per model (.threads), read when a call
    runs.
    """

    @classmethod
    def from_pretrained(cls, path, *, dtype="float32"):
        path = os.fspath(path)
        config = read_json(path, "config.json")
        generation = (read_json(path, "generation_config.json")
                      if os.path.exists(os.path.join(path, "generation_config.json")) else {})
        return cls._build(config, read_weights(path), dtype, generation)

    @classmethod
    def from_transformers(cls, model, *, dtype="float32"):
        weights = {k: weight_array(t, k) for k, t in model.state_dict().items()}
        generation = getattr(model, "generation_config", None)
        generation = generation.to_dict() if generation is not None else {}
        return cls._build(model.config.to_dict(), weights, dtype, generation)

    @classmethod
    def _build(cls, config, weights, dtype, generation):
        family = config.get("model_type")
        if family != "gpt2" and family not in _LLAMA_FAMILY:
            raise NotImplementedError(f"CausalLM serves GPT-2, Llama, Qwen2 and Mistral; this "
                                      f"checkpoint is a {family!r} model")
        prefix = "transformer." if family == "gpt2" else "model."  # the base model's names
        weights = {k.removeprefix(prefix): v for k, v in weights.items()}
        ends = {k: generation.get(k, config.get(k)) for k in ("eos_token_id", "pad_token_id")}
        model = cls.__new__(cls)
        model.__setstate__(dict(config=config, weights=weights, tokens=ends,
                                dtype=_checks.compute_dtype(dtype).name))
        return model

    # ---- pickling: the weights travel, the packed layers are rebuilt ---------------------

    def __getstate__(self):
        return dict(self._state)

    def __setstate__(self, state):
        self._state = state
        self.threads = None  # the thread count of a call not given one (None: mhattn's)
        cfg = state["config"]
        self.family = cfg["model_type"]
        self.dtype = np.dtype(_checks.compute_dtype(state["dtype"]))
        w = _Weights(state["weights"], self.family)
        self._net = (_GPT2 if self.family == "gpt2" else _Llama)(cfg, w, state["dtype"])
        self.lm_head = Linear(self._net.head_weight, dtype=state["dtype"])
        eos = state["tokens"]["eos_token_id"]
        self.eos_token_id = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = state["tokens"]["pad_token_id"]
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or [0])[0]

    def __repr__(self):
        dt = "" if self.dtype == np.float32 else f", dtype={self.dtype.name!r}"
        return f"CausalLM({self.family!r}, layers={len(self._net.layers)}{dt})"

    @property
    def num_layers(self):
        return len(self._net.layers)

    # ---- running -----------------------------------------------------------------------------

    def new_cache(self, batch, max_len):
        """An empty cache for batch sequences of up to max_len tokens: a KVCache per layer."""
        net = self._net
        return [KVCache(batch, net.kv_heads, max_len, net.head_dim, dtype=net.dtype)
                for _ in net.layers]

    def forward(self, input_ids, cache=None, *, attention_mask=None, threads=None):
        """Logits (B, T, vocab) float32 of the new tokens input_ids (B, T) (ints), each seeing
        the tokens in cache (from new_cache; they are appended to it) and those before it in
        its own row. cache=None: a fresh one, so the logits of a whole sequence.

        attention_mask (B, cached + T), as transformers': 1 for a token, 0 for padding, over
        the cached tokens and the new ones. Padding is never attended to, and positions count
        the tokens only, so a left-padded row gives the logits it would give alone (a padding
        position's own logits mean nothing). None: every token is real."""
        ids = self._ids(input_ids)
        if cache is None:
            cache = self.new_cache(ids.shape[0], ids.shape[1])
        past = len(cache[0])
        keys = self._mask(attention_mask, ids.shape[0], past + ids.shape[1])
        positions = self._positions(keys, ids.shape[0], past + ids.shape[1])[:, past:]
        with _threads(self.threads if threads is None else threads):
            return self.lm_head(self._net.forward(ids, cache, positions, keys))

    def generate(self, input_ids, max_new_tokens=20, *, attention_mask=None, eos_token_id="config",
                 threads=None):
        """Greedy decoding: (B, T + n) int64, the prompts input_ids (B, T) and after each the
        most likely next token, n = max_new_tokens at most, as transformers' generate with
        do_sample=False. The prompt goes in as one chunk, then one token a step through a
        KVCache per layer.

        attention_mask (B, T): prompts of different lengths, padded (1 for a token, 0 for
        padding), as transformers takes them. Pad on the left, as transformers expects of a
        decoder, and each row decodes as it would alone; padding elsewhere works too (each row
        continues from its last token), but transformers would not give the same tokens.

        eos_token_id: the token(s) that end a row, by default the model's (its generation
        config's); None never ends early. A row that has ended is filled with pad_token_id, and
        decoding stops when every row has.
        """
        ids = self._ids(input_ids)
        n = _checks.as_int(max_new_tokens, "max_new_tokens", 0)
        if eos_token_id == "config":
            eos = self.eos_token_id
        else:
            eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id).astype(np.int64).tolist()
        B, T = ids.shape
        prompt_keys = self._mask(attention_mask, B, T)
        out = np.full((B, T + n), self.pad_token_id, np.int64)
        out[:, :T] = ids
        if n == 0:
            return out
        keys = None
        if prompt_keys is not None:  # the new tokens are all real
            keys = np.ones((B, T + n), bool)
            keys[:, :T] = prompt_keys
        positions = self._positions(keys, B, T + n)
        # each row's last token: its next one follows from there
        last = T - 1 if keys is None else T - 1 - np.argmax(prompt_keys[:, ::-1], axis=1)
        cache = self.new_cache(B, T + n)
        done = np.zeros(B, bool)
        with _threads(self.threads if threads is None else threads):
            hidden = self._net.forward(ids, cache, positions[:, :T],
                                       None if keys is None else keys[:, :T])
            hidden = hidden[np.arange(B), last]
            for i in range(n):
                nxt = self.lm_head(hidden).argmax(-1)
                out[:, T + i] = np.where(done, self.pad_token_id, nxt)
                done |= np.isin(nxt, eos)
                if done.all():
                    return out[:, :T + i + 1]
                if i + 1 < n:
                    hidden = self._net.forward(out[:, T + i:T + i + 1], cache,
                                               positions[:, T + i:T + i + 1],
                                               None if keys is None else keys[:, :T + i + 1])[:, -1]
        return out

    @staticmethod
    def _mask(attention_mask, B, S):
        """attention_mask as (B, S) bool, True at tokens; None when there is no padding."""
        if attention_mask is None:
            return None
        m = np.asarray(attention_mask)
        if m.shape != (B, S) or not (m.dtype == bool or m.dtype.kind in "iu"):
            raise ValueError(f"attention_mask must be a ({B}, {S}) array of 0/1 or bool, got shape "
                             f"{m.shape} and dtype {m.dtype}")
        if m.dtype != bool and ((m != 0) & (m != 1)).any():
            raise ValueError("attention_mask holds values other than 0 and 1")
        m = m.astype(bool, copy=False)
        if not m.any(axis=1).all():
            raise ValueError("a row of attention_mask has no token")
        return None if m.all() else m

    @staticmethod
    def _positions(keys, B, S):
        """(B, S) positions: the count of tokens before each (padding counts none). Without
        padding (keys None) every row's are the same, (1, S), so the rotation and the position
        embeddings are computed once and broadcast over the batch."""
        if keys is None:
            return np.arange(S)[None]
        return np.maximum(np.cumsum(keys, axis=1) - 1, 0)

    def _ids(self, input_ids):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids must be a (batch, tokens) array of integers, got shape "
                             f"{ids.shape} and dtype {ids.dtype}")
        if ids.shape[1] == 0:
            raise ValueError("input_ids holds no tokens")
        vocab = self._net.embed.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids must be token ids in [0, {vocab}), got {ids.min()} .. "
                             f"{ids.max()}")
        return ids.astype(np.int64, copy=False)
