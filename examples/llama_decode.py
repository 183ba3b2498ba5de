"""Greedy generation on a Llama decoder with grouped-query heads, with mhattn.models.CausalLM.

Llama rotates queries and keys by their position (RoPE) between the projection and the
attention; CausalLM does that in NumPy, appends the keys and values to a KVCache per layer and
attends over it with grouped-query heads (each kv head serves Hq / Hkv query heads, read in
place, never repeated). Qwen2 and Mistral (a sliding window) load the same way. The model here
is a small random LlamaForCausalLM (nothing is downloaded).

    pip install "torch==2.13.0" transformers
    python examples/llama_decode.py [--dtype bfloat16] [--tokens 24]
"""

from __future__ import annotations

import argparse

from gpt2_decode import compare


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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, default=24)
    args = p.parse_args()
    compare(small_random_llama(), args.dtype, args.tokens)


if __name__ == "__main__":
    main()
