"""Greedy generation on a Llama-style decoder with grouped-query attention, on mhattn.

Llama rotates queries and keys by their position (RoPE) between the projection and the
attention, so this decoder does not use MultiHeadAttention. It projects with mhattn.Linear,
rotates in NumPy, and keeps the keys and values of earlier tokens in arrays of its own. Then
mhattn.scaled_dot_product_attention attends with enable_gqa (each kv head serves
Hq / Hkv query heads) and a causal mask aligned bottom-right, so the new tokens see the whole
cache. The SwiGLU gate's SiLU is fused into its projection; RMSNorm and the product are
NumPy. The weights come from a transformers LlamaForCausalLM, here built from a small random
config.

    pip install "torch==2.13.0" transformers
    python examples/llama_decode.py
"""

from __future__ import annotations

import numpy as np

import mhattn
from greedy import generate


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rope(x, pos, theta):
    """Rotate x (B, H, T, E) by positions pos (T): pairs (i, i + E/2) turn by pos · theta^(-2i/E)."""
    half = x.shape[-1] // 2
    angle = pos[:, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])  # (T, E/2)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Llama:
    def __init__(self, hf_model):
        cfg = hf_model.config
        sd = {k: v.detach().cpu().numpy() for k, v in hf_model.state_dict().items()}
        self.eps = cfg.rms_norm_eps
        rope_params = getattr(cfg, "rope_parameters", None) or {}
        self.theta = rope_params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.e = cfg.hidden_size // cfg.num_attention_heads
        self.embed, self.norm = sd["model.embed_tokens.weight"], sd["model.norm.weight"]
        self.head = mhattn.Linear(sd.get("lm_head.weight", self.embed))
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            layer = {n: mhattn.Linear(sd[p + key + ".weight"]) for n, key in (
                ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                ("o", "self_attn.o_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))}
            # The gate's SiLU is applied by the GEMM as it stores.
            layer["gate"] = mhattn.Linear(sd[p + "mlp.gate_proj.weight"], activation="silu")
            layer["norm1"] = sd[p + "input_layernorm.weight"]
            layer["norm2"] = sd[p + "post_attention_layernorm.weight"]
            self.layers.append(layer)

    def new_cache(self, batch, max_len):
        """Per layer: keys and values (B, Hkv, max_len, E), and how many tokens they hold."""
        shape = (batch, self.hkv, max_len, self.e)
        return {"len": 0, "kv": [(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
                                 for _ in self.layers]}

    def forward(self, ids, cache):
        """Logits (B, T, vocab) of the new tokens ids (B, T), appending them to the cache."""
        B, T = ids.shape
        start, end = cache["len"], cache["len"] + T
        pos = np.arange(start, end, dtype=np.float64)
        x = self.embed[ids]

        def heads(y, n):  # (B, T, n·E) -> (B, n, T, E)
            return y.reshape(B, T, n, self.e).transpose(0, 2, 1, 3)

        for w, (kc, vc) in zip(self.layers, cache["kv"]):
            h = rms_norm(x, w["norm1"], self.eps)
            q = rope(heads(w["q"](h), self.hq), pos, self.theta)
            kc[:, :, start:end] = rope(heads(w["k"](h), self.hkv), pos, self.theta)
            vc[:, :, start:end] = heads(w["v"](h), self.hkv)
            o = mhattn.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], is_causal=True,
                                                    causal_align="bottom_right", enable_gqa=True)
            x = x + w["o"](o.transpose(0, 2, 1, 3).reshape(B, T, -1))
            h = rms_norm(x, w["norm2"], self.eps)
            x = x + w["down"](w["gate"](h) * w["up"](h))
        cache["len"] = end
        return self.head(rms_norm(x, self.norm, self.eps))


def small_random_llama(seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=256, num_hidden_layers=3, vocab_size=400,
                      max_position_embeddings=256, initializer_range=0.2,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def main():
    import torch

    hf = small_random_llama()
    prompt = np.random.default_rng(0).integers(0, hf.config.vocab_size, (1, 8))
    ours, _ = generate(Llama(hf), prompt, 24)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt), max_new_tokens=24, do_sample=False,
                             pad_token_id=0)[:, prompt.shape[1]:].numpy()
    print("mhattn:      ", ours[0].tolist())
    print("transformers:", theirs[0].tolist())
    print("same tokens:", np.array_equal(ours, theirs))


if __name__ == "__main__":
    main()
