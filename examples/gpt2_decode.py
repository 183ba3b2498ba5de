"""Greedy generation on a GPT-2 decoder with mhattn.models.CausalLM, against transformers.

The decoder comes from a transformers GPT2LMHeadModel: here a small model built from a random
config (nothing is downloaded); CausalLM.from_pretrained(folder) reads a real checkpoint the
same way. --dtype bfloat16 holds the layers' weights and the KV cache in half the bytes.

    pip install "torch==2.13.0" transformers
    python examples/gpt2_decode.py [--dtype bfloat16] [--tokens 24]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mhattn.models import CausalLM


def small_random_gpt2(seed=0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=256, n_head=8, n_layer=4, n_positions=1100, vocab_size=500,
                     initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


def compare(hf, dtype, steps):
    """Greedy tokens of the same prompt on mhattn and on transformers, printed side by side."""
    import torch

    model = CausalLM.from_transformers(hf, dtype=dtype)
    prompt = np.random.default_rng(0).integers(0, hf.config.vocab_size, (1, 8))
    t0 = time.perf_counter()
    ours = model.generate(prompt, steps)[:, prompt.shape[1]:]
    dt = time.perf_counter() - t0
    with torch.inference_mode():
        theirs = hf.generate(torch.from_numpy(prompt), max_new_tokens=steps, do_sample=False,
                             pad_token_id=0)[:, prompt.shape[1]:].numpy()
    print("mhattn:      ", ours[0].tolist())
    print("transformers:", theirs[0].tolist())
    print(f"same tokens: {np.array_equal(ours, theirs)}; {steps / dt:.0f} tokens/s on mhattn "
          f"({dtype})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, default=24)
    args = p.parse_args()
    compare(small_random_gpt2(), args.dtype, args.tokens)


if __name__ == "__main__":
    main()
