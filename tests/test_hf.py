"""mhattn.hf: transformers models with attn_implementation="mhattn" against the same models on
"sdpa" (or "eager" where sdpa cannot serve the model), for every family of the list, with padding, chunked prefill, the dynamic and static
caches and generate; the mask function's choices; what goes back to sdpa. Models are small and
random (nothing is downloaded). Skipped without torch and transformers."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("mhattn.hf")

from tolerances import TOL_HALF, BF16, tol  # noqa: E402

V = 300  # vocabulary


def small(family):
    """A random 2-layer model of the family, eval mode, float32."""
    t = transformers
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=256)
    torch.manual_seed(0)
    if family == "llama":
        cfg, cls = t.LlamaConfig(num_attention_heads=8, num_key_value_heads=2, **common), t.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = t.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common), t.Qwen2ForCausalLM
    elif family == "mistral":  # a window shorter than the sequences
        cfg, cls = (t.MistralConfig(num_attention_heads=4, num_key_value_heads=1, sliding_window=9,
                                    **common), t.MistralForCausalLM)
    elif family == "gemma2":  # softcap on the scores, sliding and full layers
        cfg, cls = (t.Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                   sliding_window=11, attn_logit_softcapping=5.0,
                                   query_pre_attn_scalar=24, **common), t.Gemma2ForCausalLM)
    elif family == "gpt2":
        cfg, cls = t.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=256), t.GPT2LMHeadModel
    elif family == "bert":
        cfg, cls = t.BertConfig(num_attention_heads=4, **common), t.BertModel
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than the init's, so the attention is not near uniform
        for name, p in model.named_parameters():
            if "proj" in name or "attn" in name or "query" in name or "key" in name:
                p.mul_(4.0)
    return model


class Count:
    """Counts the mhattn kernel calls made through mhattn.hf, to show a model really used it."""

    def __init__(self, monkeypatch):
        self.calls = 0
        core = hf._core

        class Proxy:
            def __getattr__(_, name):
                return getattr(core, name)

            def attention(_, *args):
                self.calls += 1
                return core.attention(*args)

        monkeypatch.setattr(hf, "_core", Proxy())


# What each family is compared against: sdpa, or eager where transformers' sdpa cannot serve
# the model (Gemma 2's softcap).
REFERENCE = {"gemma2": "eager"}


def run(model, impl, fn):
    if impl == "sdpa":
        impl = REFERENCE.get(model.config.model_type, "sdpa")
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return fn(model)


def close(a, b, dtype=np.float32):
    np.testing.assert_allclose(a.float().numpy(), b.float().numpy(), **tol("torch", dtype))


FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_logits_match_sdpa(monkeypatch, family):
    model, count = small(family), Count(monkeypatch)
    ids = torch.randint(0, V, (2, 40))
    pad = torch.ones(2, 40, dtype=torch.long)
    pad[1, :6] = 0  # left padding, as batched generation has it
    for kw in ({}, {"attention_mask": pad}):
        want = run(model, "sdpa", lambda m: m(ids, **kw).logits)
        before = count.calls
        got = run(model, "mhattn", lambda m: m(ids, **kw).logits)
        assert count.calls > before
        # Only real tokens: a padding query sees no key, and what comes out there is a
        # convention (zeros for mhattn and sdpa, a uniform average for eager's float mask).
        real = pad.bool() if kw else slice(None)
        close(got[real], want[real])


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_with_a_cache_matches_sdpa(monkeypatch, family):
    model, count = small(family), Count(monkeypatch)
    ids = torch.randint(0, V, (1, 45))

    def chunks(m):
        cache = transformers.DynamicCache(config=m.config)
        outs = [m(ids[:, a:b], cache=cache, use_cache=True).logits
                for a, b in ((0, 20), (20, 33), (33, 34), (34, 45))]
        return torch.cat(outs, dim=1)

    want = run(model, "sdpa", chunks)
    got = run(model, "mhattn", chunks)
    assert count.calls > 0
    close(got, want)
    close(got, run(model, "sdpa", lambda m: m(ids).logits))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_gives_sdpa_tokens(monkeypatch, family, cache):
    model, count = small(family), Count(monkeypatch)
    ids = torch.randint(0, V, (1, 13))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    want = run(model, "sdpa", lambda m: m.generate(ids, **kw))
    got = run(model, "mhattn", lambda m: m.generate(ids, **kw))
    assert count.calls > 0
    assert got.tolist() == want.tolist()


def test_encoder_with_padding_matches_sdpa(monkeypatch):
    model, count = small("bert"), Count(monkeypatch)
    ids = torch.randint(0, V, (3, 21))
    pad = torch.ones(3, 21, dtype=torch.long)
    pad[0, 15:] = 0
    pad[2, 4:] = 0
    for kw in ({}, {"attention_mask": pad}):
        want = run(model, "sdpa", lambda m: m(ids, **kw).last_hidden_state)
        got = run(model, "mhattn", lambda m: m(ids, **kw).last_hidden_state)
        close(got, want)
    assert count.calls > 0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_bf16_model_matches_sdpa_in_bf16(monkeypatch, family):
    model, count = small(family).to(torch.bfloat16), Count(monkeypatch)
    ids = torch.randint(0, V, (1, 30))
    want = run(model, "sdpa", lambda m: m(ids).logits)
    got = run(model, "mhattn", lambda m: m(ids).logits)
    assert got.dtype == torch.bfloat16 and count.calls > 0
    # Both round every layer's activations to bf16: compare against the float32 model with the
    # bf16 tolerance, each of them.
    ref = run(small(family), "sdpa", lambda m: m(ids).logits)
    for logits in (got, want):
        np.testing.assert_allclose(logits.float().numpy(), ref.numpy(), **TOL_HALF[BF16])


def test_output_attentions_gives_the_weights(monkeypatch):
    model = small("llama")
    ids = torch.randint(0, V, (1, 17))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(ids, output_attentions=True).attentions
    model.set_attn_implementation("mhattn")
    with torch.no_grad():
        got = model(ids, output_attentions=True).attentions
    assert len(got) == 2
    for g, w in zip(got, want):
        close(g, w)


def test_the_mask_is_left_out_where_attention_needs_none():
    m = transformers.masking_utils
    none = dict(batch_size=2, q_length=5, kv_length=12, q_offset=7, kv_offset=0)
    assert hf.mask(**none) is None  # the last query is the last key: causal bottom-right
    sliding = m.sliding_window_causal_mask_function(4)
    assert hf._sliding_window_of(sliding) == 4
    assert hf.mask(**none, mask_function=sliding, local_size=4) is None
    # Static cache prefill: keys past the queries are empty slots, so a mask is built.
    static = hf.mask(batch_size=1, q_length=5, kv_length=12, q_offset=0, kv_offset=0)
    assert static.shape == (1, 1, 5, 12) and not static[0, 0, -1, 5:].any()
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, :3] = False
    padded = hf.mask(**none, attention_mask=pad)
    assert padded.shape == (2, 1, 5, 12) and not padded[1, :, :, :3].any()
    other = m.and_masks(m.causal_mask_function, m.sliding_window_overlay(4), m.causal_mask_function)
    assert hf._sliding_window_of(other) is None
    assert hf.mask(**none, mask_function=other) is not None
    bidi = dict(batch_size=2, q_length=12, kv_length=12, mask_function=m.bidirectional_mask_function,
                allow_is_causal_skip=False, allow_is_bidirectional_skip=True)
    assert hf.mask(**bidi) is None
    assert hf.mask(**bidi, attention_mask=pad).shape == (2, 1, 1, 12)


def test_what_mhattn_cannot_serve_goes_to_sdpa_with_one_warning(monkeypatch):
    model, count = small("llama"), Count(monkeypatch)
    ids = torch.randint(0, V, (1, 12))
    want = run(model, "sdpa", lambda m: m(ids).logits)
    model.set_attn_implementation("mhattn")
    hf._warned.clear()
    with pytest.warns(UserWarning, match="require grad.*sdpa"):
        got = model(ids).logits  # autograd on: the projections' outputs require grad
    assert count.calls == 0 and got.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids)  # the same reason warns once
    close(got.detach(), want)
    q = torch.randn(1, 2, 4, 8)
    with pytest.warns(UserWarning, match="the argument s_aux"):
        out, _ = hf.attention_forward(model.model.layers[0].self_attn, q, q, q, None,
                                      s_aux=torch.zeros(2))
    assert count.calls == 0


def test_register_is_idempotent():
    hf.register()
    hf.register()
    assert transformers.AttentionInterface._global_mapping["mhattn"] is hf.attention_forward
    assert transformers.masking_utils.AttentionMaskInterface._global_mapping["mhattn"] is hf.mask
