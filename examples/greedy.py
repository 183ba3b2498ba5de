"""Greedy decoding with a KV cache, for the decoders of gpt2_decode.py and llama_decode.py."""

import numpy as np


def generate(model, prompt, steps):
    """Greedy decoding: (tokens (B, steps), logits (B, steps, vocab) that chose them).

    model.new_cache(batch, max_len) makes an empty cache; model.forward(ids, cache) returns the
    logits of the new tokens ids (B, T) and appends them to the cache. The prompt goes in as one
    chunk, then one token per step."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps)
    logits = model.forward(prompt, cache)[:, -1]
    tokens, chosen_by = [], []
    for _ in range(steps):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        chosen_by.append(logits)
        logits = model.forward(nxt[:, None], cache)[:, -1]
    return np.stack(tokens, 1), np.stack(chosen_by, 1)
