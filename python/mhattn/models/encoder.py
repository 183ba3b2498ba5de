"""SentenceEncoder: a sentence-transformers model whose encoder is BERT (all-MiniLM-L6-v2 and
its kind): tokenizer, embeddings, the encoder layers (attention on MultiHeadAttention, the
feed-forward on Linear with the GELU fused into the GEMM), pooling and normalisation, giving
sentence-transformers' `encode` within float32 rounding. Its heads can be masked, ranked and
pruned (head_importance, prune_heads). It needs `tokenizers` (the `models` extra); mhattn
itself does not.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .. import _checks
from ..functional import layer_norm
from .._threads import threads as _threads
from ..modules import Linear, MultiHeadAttention
from ._files import read_weights

__all__ = ["SentenceEncoder"]

# sentence-transformers' pooling modes, in the order it concatenates them.
_POOLING = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")


class SentenceEncoder:
    """SentenceEncoder.from_pretrained(path, *, dtype="float32"): the sentence-transformers
    folder at path (modules.json: a Transformer with a BERT encoder, a Pooling module, and
    optionally Normalize). dtype is what the attention and feed-forward layers compute in
    ("bfloat16" and "float16" hold their weights in half the bytes); embeddings, LayerNorm and
    pooling stay float32, and so do the embeddings it returns.

    It pickles: the weights, the tokenizer and the pruned heads travel, and the packed weights
    are built again on arrival, so a copy in another process gives the same embeddings.
    """

    @classmethod
    def from_pretrained(cls, path, *, dtype="float32"):
        path = os.fspath(path)
        with open(os.path.join(path, "modules.json")) as f:
            modules = json.load(f)
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
            raise NotImplementedError(f"SentenceEncoder serves Transformer, Pooling and optionally "
                                      f"Normalize; {path} has {kinds}")
        with open(os.path.join(path, modules[0]["path"], "config.json")) as f:
            config = json.load(f)
        if config.get("model_type") != "bert":
            raise NotImplementedError(f"SentenceEncoder serves BERT encoders; {path} holds a "
                                      f"{config.get('model_type')!r} model")
        with open(os.path.join(path, modules[1]["path"], "config.json")) as f:
            pooling = json.load(f)
        modes = [m for m in _POOLING if pooling.get(f"pooling_mode_{m}")]
        if not modes:
            raise NotImplementedError(f"{path}: no pooling mode SentenceEncoder serves in {pooling}")
        max_len = config["max_position_embeddings"]
        bert_cfg = os.path.join(path, modules[0]["path"], "sentence_bert_config.json")
        if os.path.exists(bert_cfg):
            with open(bert_cfg) as f:
                max_len = json.load(f).get("max_seq_length", max_len)
        with open(os.path.join(path, modules[0]["path"], "tokenizer.json")) as f:
            tokenizer = f.read()
        weights = read_weights(os.path.join(path, modules[0]["path"]))
        weights = {k.removeprefix("bert."): v for k, v in weights.items()}
        state = dict(config=config, modes=modes, normalize=len(kinds) > 2, max_len=max_len,
                     tokenizer=tokenizer, weights=weights, dtype=_checks.compute_dtype(dtype).name,
                     pruned=[])
        model = cls.__new__(cls)
        model.__setstate__(state)
        return model

    # ---- pickling: the weights travel, the packed layers are rebuilt ---------------------

    def __getstate__(self):
        return dict(self._state)

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self._state = state
        self.threads = None  # encode's thread count when it is not given one (None: mhattn's)
        cfg, w = state["config"], state["weights"]
        self.eps = cfg["layer_norm_eps"]
        D, H = cfg["hidden_size"], cfg["num_attention_heads"]
        self.tokenizer = Tokenizer.from_str(state["tokenizer"])
        self.tokenizer.enable_truncation(state["max_len"])
        self.tokenizer.no_padding()
        self.pad_id = cfg.get("pad_token_id", 0)
        e = "embeddings."
        self.word, self.pos = w[e + "word_embeddings.weight"], w[e + "position_embeddings.weight"]
        self.type0 = w[e + "token_type_embeddings.weight"][0]
        self.emb_norm = (w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"])
        dtype = state["dtype"]
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            qkv = [f"{p}attention.self.{n}" for n in ("query", "key", "value")]
            att = MultiHeadAttention(D, H, dtype=dtype)
            att.load_state_dict({
                "in_proj_weight": np.concatenate([w[n + ".weight"] for n in qkv]),
                "in_proj_bias": np.concatenate([w[n + ".bias"] for n in qkv]),
                "out_proj.weight": w[p + "attention.output.dense.weight"],
                "out_proj.bias": w[p + "attention.output.dense.bias"],
            })
            self.layers.append(dict(
                attention=att,
                norm1=(w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                # BERT's GELU is the exact (erf) form; the GEMM applies it as it stores.
                up=Linear(w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"],
                          activation="gelu", dtype=dtype),
                down=Linear(w[p + "output.dense.weight"], w[p + "output.dense.bias"], dtype=dtype),
                norm2=(w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
            ))
        for layer, heads in state["pruned"]:
            self.layers[layer]["attention"].prune_heads(heads)

    # ---- encoding --------------------------------------------------------------------------

    @property
    def num_heads(self):
        """Heads left in each layer (after prune_heads)."""
        return [layer["attention"].num_heads for layer in self.layers]

    def encode(self, sentences, batch_size=32, *, skip_padding=True, threads=None):
        """(len(sentences), D) float32 sentence embeddings, sentence-transformers' `encode`
        within float32 rounding (unit length when the model normalises).

        Sentences are batched by length (sorted, batch_size at a time), so a batch is padded
        to its longest sentence and little more. Only attention needs the padded (B, T) grid:
        with skip_padding (the default) the projections (attention's through
        MultiHeadAttention.varlen), LayerNorm, the feed-forward and the residuals run on the
        real tokens only; skip_padding=False computes every padded position, as
        sentence-transformers does, for the same embeddings.

        threads: the kernels' thread count for this call (mhattn.threads); None takes the
        model's `threads` attribute, and that None mhattn's setting. The count is read when the
        call runs and does not travel with a pickled model, so each worker process or thread
        can give its own.
        """
        with _threads(self.threads if threads is None else threads):
            return self._encode(sentences, batch_size, skip_padding, None)

    def _encode(self, sentences, batch_size, skip_padding, head_masks):
        if isinstance(sentences, str):
            raise TypeError("encode takes a list of sentences, not one string")
        sentences = list(sentences)
        batch_size = _checks.as_int(batch_size, "batch_size", 1)
        enc = self.tokenizer.encode_batch(sentences)
        order = np.argsort([len(e.ids) for e in enc], kind="stable")
        out = None
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            T = max(len(enc[j].ids) for j in idx)
            ids = np.full((len(idx), T), self.pad_id, np.int64)
            mask = np.zeros((len(idx), T), bool)
            for r, j in enumerate(idx):
                ids[r, :len(enc[j].ids)] = enc[j].ids
                mask[r, :len(enc[j].ids)] = True
            emb = self._embed_batch(ids, mask, skip_padding, head_masks)
            if out is None:
                out = np.empty((len(sentences), emb.shape[1]), np.float32)
            out[idx] = emb
        if out is None:
            return np.zeros((0, self._state["config"]["hidden_size"] * len(self._state["modes"])),
                            np.float32)
        return out

    def _embed_batch(self, ids, mask, skip_padding, head_masks, maps=None):
        B, T = ids.shape
        padding = ~mask  # key_padding_mask: True where a token is padding
        rows = mask if skip_padding else np.ones_like(mask)  # the positions computed
        lengths = mask.sum(1)
        positions = np.broadcast_to(np.arange(T), (B, T))[rows]
        h = layer_norm((self.word[ids[rows]] + self.pos[positions] + self.type0).astype(np.float32),
                       *self.emb_norm, self.eps)
        x = np.zeros((B, T, h.shape[1]), np.float32)  # the (B, T) grid, where it is needed
        for i, layer in enumerate(self.layers):
            hm = None if head_masks is None else head_masks.get(i)
            if skip_padding and hm is None and maps is None:  # the real tokens alone
                a = layer["attention"].varlen(h, lengths)
            else:
                x[rows] = h
                a, w = layer["attention"](x, key_padding_mask=padding, head_mask=hm,
                                          need_weights=maps is not None, average_attn_weights=False)
                a = a[rows]
                if maps is not None:
                    maps.append(w)
            h = layer_norm(a, *layer["norm1"], self.eps, residual=h)
            h = layer_norm(layer["down"](layer["up"](h)), *layer["norm2"], self.eps, residual=h)
        x[rows] = h
        m = mask[..., None]
        pooled = []
        for mode in self._state["modes"]:
            if mode == "cls_token":
                pooled.append(x[:, 0])
            elif mode == "max_tokens":
                pooled.append(np.where(m, x, -np.inf).max(1))
            else:
                total = (x * m).sum(1)
                n = np.maximum(m.sum(1), 1e-9)
                pooled.append(total / (n if mode == "mean_tokens" else np.sqrt(n)))
        out = np.concatenate(pooled, axis=1).astype(np.float32)
        if self._state["normalize"]:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    # ---- heads -----------------------------------------------------------------------------

    def attention_maps(self, sentence):
        """(tokens, maps) for one sentence: its tokens as strings, and for each layer the
        attention weights of every head, (heads, T, T), query tokens along the rows, from the
        same kernel that encodes."""
        enc = self.tokenizer.encode(sentence)
        ids = np.array([enc.ids], np.int64)
        maps = []
        self._embed_batch(ids, np.ones_like(ids, bool), True, None, maps)
        return list(enc.tokens), [w[0] for w in maps]

    def prune_heads(self, heads):
        """Remove heads for good: heads = {layer: [head, ...]}, indices among each layer's
        current heads (MultiHeadAttention.prune_heads). Pickled copies keep the pruning."""
        for layer, hs in dict(heads).items():
            layer = _checks.as_int(layer, "layer", 0)
            if layer >= len(self.layers):
                raise ValueError(f"prune_heads: the model has {len(self.layers)} layers; got {layer}")
            hs = sorted({int(h) for h in hs})
            self.layers[layer]["attention"].prune_heads(hs)
            self._state["pruned"].append((layer, hs))
        return self

    def head_importance(self, sentences, batch_size=32):
        """(layers, heads) float64: for each head, 1 - cosine between the embeddings of
        `sentences` with that head masked (its output zeroed, head_mask) and without, averaged
        over the sentences. 0 means the embeddings do not change without the head; the larger,
        the more it matters. Pruned heads are not in the table (each row has the layer's heads
        left). Inference only: one encode per head, each on the layer with that head pruned."""
        base = self._encode(sentences, batch_size, True, None)
        table = np.zeros((len(self.layers), max(self.num_heads, default=0)))
        for i, H in enumerate(self.num_heads):
            for h in range(H):
                m = np.ones(H, np.float32)
                m[h] = 0
                emb = self._encode(sentences, batch_size, True, {i: m})
                cos = (emb * base).sum(1) / np.maximum(
                    np.linalg.norm(emb, axis=1) * np.linalg.norm(base, axis=1), 1e-12)
                table[i, h] = float(np.mean(1.0 - cos))
        return table
