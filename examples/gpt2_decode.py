"""Greedy generation with a KV cache on a GPT-2 decoder, every attention and linear layer on mhattn.

The decoder's weights come from a transformers GPT2LMHeadModel: a real checkpoint if you have
one, or, as here and in the tests, a small model built from a random config (nothing is
downloaded). The prompt goes through in one chunk; then each step feeds one token, and the
attention reads the keys and values of every earlier token from mhattn.KVCache. LayerNorm, GELU
and the embeddings are NumPy. GPT2(hf_model, dtype="bfloat16") holds the layers' weights and
the KV cache in bfloat16 (half the bytes a token reads); the residual stream stays float32.

    pip install "torch==2.13.0" transformers
    python examples/gpt2_decode.py [--dtype bfloat16]
"""

from __future__ import annotations

import time

import numpy as np

import mhattn
from greedy import generate


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class GPT2:
    """A GPT-2 decoder on mhattn, built from a transformers GPT2LMHeadModel, its attention and
    linear layers and KV cache in `dtype` (float32, bfloat16 or float16)."""

    def __init__(self, hf_model, dtype="float32"):
        cfg = hf_model.config
        self.dtype = dtype
        sd = {k: v.detach().cpu().numpy() for k, v in hf_model.state_dict().items()}
        self.eps = cfg.layer_norm_epsilon
        self.heads, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.wte, self.wpe = sd["transformer.wte.weight"], sd["transformer.wpe.weight"]
        self.norm_f = (sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
        self.lm_head = mhattn.Linear(self.wte, dtype=dtype)  # tied to the token embeddings
        self.layers = []
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            att = mhattn.MultiHeadAttention(cfg.n_embd, cfg.n_head, dtype=dtype)
            # GPT-2's Conv1D keeps weights as (in, out); mhattn takes PyTorch's (out, in).
            att.load_state_dict({
                "in_proj_weight": sd[p + "attn.c_attn.weight"].T,
                "in_proj_bias": sd[p + "attn.c_attn.bias"],
                "out_proj.weight": sd[p + "attn.c_proj.weight"].T,
                "out_proj.bias": sd[p + "attn.c_proj.bias"],
            })
            self.layers.append(dict(
                attention=att,
                norm1=(sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]),
                norm2=(sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]),
                # GPT-2's GELU is the tanh form; the GEMM applies it as it stores.
                up=mhattn.Linear(sd[p + "mlp.c_fc.weight"].T, sd[p + "mlp.c_fc.bias"],
                                 activation="gelu_tanh", dtype=dtype),
                down=mhattn.Linear(sd[p + "mlp.c_proj.weight"].T, sd[p + "mlp.c_proj.bias"],
                                   dtype=dtype),
            ))

    def new_cache(self, batch, max_len):
        return [mhattn.KVCache(batch, self.heads, max_len, self.head_dim, dtype=self.dtype)
                for _ in self.layers]

    def forward(self, ids, cache):
        """Logits (B, T, vocab) of the new tokens ids (B, T), appending them to the cache."""
        start = len(cache[0])
        x = self.wte[ids] + self.wpe[start:start + ids.shape[1]]
        for layer, kv in zip(self.layers, cache):
            a, _ = layer["attention"](layer_norm(x, *layer["norm1"], self.eps), kv_cache=kv)
            x = x + a
            h = layer["up"](layer_norm(x, *layer["norm2"], self.eps))
            x = x + layer["down"](h)
        return self.lm_head(layer_norm(x, *self.norm_f, self.eps))


def main():
    import argparse

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=256, n_head=8, n_layer=4, n_positions=1100, vocab_size=500,
                     initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(cfg).eval()
    model = GPT2(hf, dtype=args.dtype)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8))
    t0 = time.perf_counter()
    ours, _ = generate(model, prompt, 24)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt), max_new_tokens=24, do_sample=False,
                             pad_token_id=0)[:, prompt.shape[1]:].numpy()
    print("mhattn:      ", ours[0].tolist())
    print("transformers:", theirs[0].tolist())
    print(f"same tokens: {np.array_equal(ours, theirs)}; {24 / dt:.0f} tokens/s on mhattn "
          f"({args.dtype})")


if __name__ == "__main__":
    main()
