"""Whole models on mhattn's kernels.

SentenceEncoder: sentence embeddings from a sentence-transformers folder with a BERT encoder
(all-MiniLM-L6-v2 and its kind), with heads to mask, rank and prune.
CausalLM: GPT-2 and Llama-family decoders (Llama, Qwen2, Mistral), greedy generation with a
KV cache per layer.

Both need the `models` extra's packages only to read what they read (tokenizers for the
encoder's tokenizer, transformers for CausalLM.from_transformers); mhattn itself does not.
"""

from .decoder import CausalLM
from .encoder import SentenceEncoder

__all__ = ["CausalLM", "SentenceEncoder"]
