"""mhattn.models.CausalLM against transformers: GPT-2, Llama (default and llama3 rotary
positions), Qwen2 (q, k, v biases) and Mistral (a sliding window shorter than the sequences),
small random models built from configs (nothing is downloaded). Skipped when torch or
transformers is not installed (.ci/run installs them)."""

import pickle

import numpy as np
import pytest

import mhattn
from mhattn.models import CausalLM
from tolerances import BF16, MODEL_HALF_VS_TORCH, TOL, TOL_MODEL_HALF

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ["gpt2", "llama", "llama3", "qwen2", "mistral"]


def random_model(kind, seed=0, **extra):
    """A random 3-layer decoder of the kind, the same for the same arguments, its biases and
    norm weights random too (transformers starts them at 0 and 1)."""
    model = _random_model(kind, seed, extra)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _random_model(kind, seed, extra):
    torch.manual_seed(seed)
    tf = transformers
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=96, n_head=6, n_layer=3, n_positions=64, vocab_size=300,
                            initializer_range=0.2, bos_token_id=None, eos_token_id=None, **extra)
        return tf.GPT2LMHeadModel(cfg).eval()
    # head_dim 24 (not a multiple of the vector width), 6 query heads on 2 kv heads
    common = dict(hidden_size=144, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=200, num_hidden_layers=3, vocab_size=300,
                  max_position_embeddings=256, initializer_range=0.2, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, **extra)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()
    if kind == "llama3":  # long-context scaling: original_max_position_embeddings 16 scales most
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=16)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_parameters=rope)).eval()
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval()
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=5)).eval()
    raise ValueError(kind)


def hf_generate(hf, prompt, steps, **kw):
    with torch.inference_mode():
        return hf.generate(torch.from_numpy(prompt), max_new_tokens=steps, do_sample=False,
                           pad_token_id=kw.pop("pad_token_id", 0), **kw).numpy()


def hf_logits(hf, ids):
    with torch.inference_mode():
        return hf(torch.from_numpy(ids)).logits.float().numpy()


def assert_logits_close(got, want):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got / scale, want / scale, **TOL["model"])


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_gives_transformers_greedy_tokens(kind, batch):
    hf = random_model(kind)
    model = CausalLM.from_transformers(hf)
    prompt = np.random.default_rng(batch).integers(0, 300, (batch, 7))
    got = model.generate(prompt, 20)
    assert got.dtype == np.int64 and got.shape == (batch, 27)
    np.testing.assert_array_equal(got, hf_generate(hf, prompt, 20))
    # the logits of the whole sequence in one call, and chunk by chunk through a cache
    want = hf_logits(hf, got)
    assert_logits_close(model.forward(got), want)
    cache = model.new_cache(batch, got.shape[1])
    steps = [(0, 5), (5, 6), (6, 13), (13, 27)]
    chunks = [model.forward(got[:, a:b], cache) for a, b in steps]
    assert len(cache[0]) == 27
    assert_logits_close(np.concatenate(chunks, 1), want)


@pytest.mark.parametrize("kind", FAMILIES)
def test_prompts_of_different_lengths_left_padded_as_transformers(kind):
    hf = random_model(kind)
    model = CausalLM.from_transformers(hf)
    rng = np.random.default_rng(5)
    lengths = [9, 4, 1, 7]  # Mistral's window is 5: the padding sits inside and outside it
    prompt = np.zeros((4, 9), np.int64)
    mask = np.zeros((4, 9), np.int64)
    for r, n in enumerate(lengths):
        prompt[r, 9 - n:] = rng.integers(0, 300, n)
        mask[r, 9 - n:] = 1
    with torch.inference_mode():
        want = hf.generate(torch.from_numpy(prompt), attention_mask=torch.from_numpy(mask),
                           max_new_tokens=12, do_sample=False, pad_token_id=0).numpy()
    got = model.generate(prompt, 12, attention_mask=mask)
    np.testing.assert_array_equal(got, want)
    for r, n in enumerate(lengths):  # each row as it would decode alone
        alone = model.generate(prompt[r:r + 1, 9 - n:], 12)
        np.testing.assert_array_equal(got[r, 9:], alone[0, n:])
    # forward with the mask over the cache and the new tokens: the logits of the real positions
    full = np.concatenate([mask, np.ones((4, 12), np.int64)], 1)
    positions = np.maximum(np.cumsum(full, 1) - 1, 0)  # (transformers' forward takes them as given)
    with torch.inference_mode():
        hf_out = hf(torch.from_numpy(got), attention_mask=torch.from_numpy(full),
                    position_ids=torch.from_numpy(positions)).logits.numpy()
    cache = model.new_cache(4, got.shape[1])
    chunks = [model.forward(got[:, a:b], cache, attention_mask=full[:, :b]) for a, b in ((0, 9), (9, 21))]
    real = full.astype(bool)
    assert_logits_close(np.concatenate(chunks, 1)[real], hf_out[real])
    with pytest.raises(ValueError, match="attention_mask must be a"):
        model.generate(prompt, 3, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="no token"):
        model.generate(prompt, 3, attention_mask=np.zeros_like(mask))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        model.generate(prompt, 3, attention_mask=mask * 2)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "mistral"])
def test_from_pretrained_reads_what_save_pretrained_writes(kind, tmp_path):
    # one file, shards with an index, and a bfloat16 checkpoint (safetensors' own NumPy reader
    # refuses bfloat16; mhattn reads it)
    hf = random_model(kind)
    prompt = np.random.default_rng(0).integers(0, 300, (2, 6))
    want = hf_generate(hf, prompt, 12)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    for folder in ("one", "shards"):
        model = CausalLM.from_pretrained(tmp_path / folder)
        np.testing.assert_array_equal(model.generate(prompt, 12), want)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = CausalLM.from_pretrained(tmp_path / "bf16")  # bfloat16 weights, computed in float32
    hf_bf16 = hf.float()  # the rounded weights in float32: the same model
    np.testing.assert_array_equal(model.generate(prompt, 12), hf_generate(hf_bf16, prompt, 12))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_ends_at_the_end_token_as_transformers(kind):
    hf = random_model(kind)
    prompt = np.random.default_rng(4).integers(0, 300, (3, 5))
    free = CausalLM.from_transformers(hf).generate(prompt, 16)
    # an end token that one row emits early and another later (or never)
    eos = int(free[0, 8])
    hf.generation_config.eos_token_id = eos
    hf.generation_config.pad_token_id = 7
    model = CausalLM.from_transformers(hf)
    assert model.eos_token_id == [eos] and model.pad_token_id == 7
    got = model.generate(prompt, 16)
    np.testing.assert_array_equal(got, hf_generate(hf, prompt, 16, pad_token_id=7))
    stop = 5 + free[0, 5:].tolist().index(eos) + 1  # row 0 ends here
    assert (got[0, stop:] == 7).all() and stop < 21
    np.testing.assert_array_equal(model.generate(prompt, 16, eos_token_id=None), free)
    # one row: decoding stops at its end token
    got = model.generate(prompt[:1], 16)
    assert got.shape == (1, stop)
    np.testing.assert_array_equal(got, hf_generate(hf, prompt[:1], 16, pad_token_id=7))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_decoding_follows_float32(kind, dtype):
    # Teacher-forced: the prompt in a chunk, then a token a step; every step's logits of the
    # model in the half dtype (weights and KV cache) within a whole model's tolerance of the
    # float32 model's, on logits scaled by their largest, and no further from them than
    # MODEL_HALF_VS_TORCH times transformers' own model in that dtype.
    hf = random_model(kind)
    full, half = CausalLM.from_transformers(hf), CausalLM.from_transformers(hf, dtype=dtype)
    seq = np.random.default_rng(0).integers(0, 300, (2, 40))
    c32, c16 = full.new_cache(2, 40), half.new_cache(2, 40)
    assert c16[0].dtype == np.dtype(BF16 if dtype == "bfloat16" else dtype)
    t = TOL_MODEL_HALF[c16[0].dtype]
    worst = 0.0
    for a, b in [(0, 8)] + [(i, i + 1) for i in range(8, 40)]:
        want = full.forward(seq[:, a:b], c32)
        got = half.forward(seq[:, a:b], c16)
        assert got.dtype == np.float32
        scale = np.abs(want).max()
        np.testing.assert_allclose(got / scale, want / scale, **t)
        worst = max(worst, np.abs(got - want).max() / scale)
    want = full.forward(seq)
    theirs = hf_logits(hf.to(getattr(torch, dtype)), seq)
    assert worst <= MODEL_HALF_VS_TORCH * np.abs(theirs - want).max() / np.abs(want).max()


def test_a_pickled_model_gives_the_same_tokens_and_threads_are_per_call():
    hf = random_model("qwen2")
    model = CausalLM.from_transformers(hf, dtype="bfloat16")
    model.threads = 1
    copy = pickle.loads(pickle.dumps(model))
    assert copy.threads is None and copy.dtype == model.dtype
    prompt = np.random.default_rng(2).integers(0, 300, (2, 9))
    want = model.generate(prompt, 10)
    np.testing.assert_array_equal(copy.generate(prompt, 10, threads=1), want)
    with mhattn.threads(1):
        np.testing.assert_array_equal(copy.generate(prompt, 10), want)


def test_bad_input_and_unknown_models_raise():
    model = CausalLM.from_transformers(random_model("gpt2"))
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(np.zeros((2, 3), np.float32), 4)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(np.array([1, 2, 3]), 4)
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        model.generate(np.array([[1, 300]]), 4)
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        model.generate(np.array([[-1, 2]]), 4)
    with pytest.raises(ValueError, match="positions"):  # GPT-2 has 64
        model.generate(np.zeros((1, 60), np.int64), 8)
    assert model.generate(np.array([[3, 4]]), 0).tolist() == [[3, 4]]
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32))
    with pytest.raises(NotImplementedError, match="bert"):
        CausalLM.from_transformers(bert)
    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=2.0,
                original_max_position_embeddings=64)
    with pytest.raises(NotImplementedError, match="yarn"):
        CausalLM.from_transformers(random_model("llama", rope_parameters=rope))


@pytest.mark.parametrize("script", ["gpt2_decode.py", "llama_decode.py"])
def test_the_decoding_examples_run(script):
    import subprocess
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    if not (examples / script).exists():
        pytest.skip("examples/ is not here (tests run from an installed wheel)")
    out = subprocess.run([sys.executable, script, "--tokens", "6", "--dtype", "bfloat16"],
                         cwd=examples, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "same tokens: True" in out.stdout
