"""mhattn as an attention implementation of Hugging Face transformers.

    import mhattn.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="mhattn")

Importing this module registers "mhattn" with transformers' AttentionInterface (the attention
function, `attention_forward`) and AttentionMaskInterface (the masks it wants, `mask`);
`register()` does it again, idempotently. Every model whose attention goes through that
interface then runs it on mhattn's kernel: GQA without repeating K/V, causal and sliding-window
attention from the module's flags with no mask built where none is needed, softcap (Gemma 2),
padding masks, the dynamic and static caches, and `model.generate`.

What it cannot serve goes to transformers' own sdpa function, with a warning the first time:
dropout (training), tensors that need grad, tensors off the CPU, float64, attention sinks or a
position bias, and keyword arguments it does not know. In bfloat16 and float16 models the
kernel reads k and v in their own dtype (a decode step reads half the bytes), q is widened to
float32, scores and softmax are float32, and the output is rounded to the model's dtype.

Needs transformers 4.53 or newer; tested against the newest release that installs here.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (
        AttentionMaskInterface,
        and_masks,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
        sliding_window_overlay,
    )
except ImportError as e:  # transformers missing, or older than the two interfaces
    raise ImportError(
        "mhattn.hf needs transformers 4.53 or newer (for AttentionInterface and "
        f"AttentionMaskInterface); importing them failed: {e}") from None

from . import _checks, _core, _torch

__all__ = ["register", "attention_forward", "mask", "NAME"]

NAME = "mhattn"

# Keyword arguments a model may pass that do not change the attention's result (bookkeeping
# for caches and other kernels). Any other one that is not None sends the call to sdpa.
_IGNORED = frozenset({
    "position_ids", "cache_position", "output_attentions", "use_cache", "past_key_values",
    "past_key_value", "layer_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
    "max_length_k", "seq_idx", "deterministic", "num_items_in_batch", "output_hidden_states",
    "output_router_logits", "return_dict",
})
_KEPT_DTYPES = {torch.float32: _checks._F32, torch.bfloat16: _checks.BF16,
                torch.float16: _checks.F16}
_warned = set()


def _unsupported(query, key, value, attention_mask, dropout, kwargs):
    """Why this call must go to sdpa, or None when mhattn serves it."""
    if dropout:
        return f"dropout ({dropout})"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        return "tensors that require grad (mhattn is for inference)"
    if query.device.type != "cpu":
        return f"tensors on {query.device}"
    if query.dtype not in _KEPT_DTYPES or not query.dtype == key.dtype == value.dtype:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        return f"a mask of type {type(attention_mask).__name__}"
    for name, v in kwargs.items():
        if v is not None and name not in _IGNORED:
            return f"the argument {name}"
    return None


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, sliding_window=None, softcap=None, **kwargs):
    """transformers' attention function on mhattn: query (B, Hq, L, E), key (B, Hkv, S, E),
    value (B, Hkv, S, Ev), attention_mask (broadcast to (B, Hq, L, S): bool True = attend,
    float = added) or None -> (out (B, L, Hq, Ev) contiguous, weights (B, Hq, L, S) when
    output_attentions, else None).

    With no mask, attention is causal when `is_causal` (else the module's flag) says so,
    aligned bottom-right (the last query sees every key: cached decoding, chunked prefill),
    within `sliding_window` when given. A mask carries causality itself, as with sdpa.
    """
    reason = _unsupported(query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"mhattn.hf: {reason} is not served by mhattn; this call and any "
                          f"like it run on transformers' sdpa attention", stacklevel=2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, softcap=softcap,
                                      sliding_window=sliding_window, **kwargs)
    dtype = query.dtype
    if dtype != torch.float32:
        query = query.float()  # k and v are read in their dtype; q is small next to them
    B, Hq, L, E = query.shape
    Hkv, S, Ev = key.shape[1], key.shape[2], value.shape[3]
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = 0
    if attention_mask is None:
        mask_arg = None
        if causal and sliding_window:
            window = int(sliding_window)
    else:
        causal = False
        mask_arg = _checks.mask_4d(_mask_numpy(attention_mask), "attention_mask",
                                   (B, Hq, L, S), "", bool_keep=1)
    q = _checks.last_contiguous(query.numpy())
    (k, kv_code), (v, _) = (_checks.native(_checks.last_contiguous(_torch.to_numpy(t, "key")))
                            for t in (key, value))
    out = torch.empty((B, L, Hq, Ev), dtype=torch.float32)
    weights = None
    if kwargs.get("output_attentions"):
        weights = torch.zeros((B, Hq, L, S), dtype=torch.float32)
    scale = 1.0 / E ** 0.5 if scaling is None else float(scaling)
    _core.attention(out.numpy().transpose(0, 2, 1, 3), None if weights is None else weights.numpy(),
                    q, k, v, mask_arg, None, causal, S - L, window, scale, float(softcap or 0.0),
                    kv_code)
    if dtype != torch.float32:
        out = _torch.from_numpy(_checks.cast(out.numpy(), _KEPT_DTYPES[dtype]))
        weights = None if weights is None else weights.to(dtype)
    return out, weights


def _mask_numpy(m):
    """A mask tensor as NumPy, in place (bool, or a float of any dtype)."""
    if m.dtype == torch.bfloat16:
        m = m.float()
    return m.numpy()


# The code objects of transformers' mask closures, to recognise a plain sliding-window mask.
_AND_CODE = and_masks(causal_mask_function).__code__
_SLIDING_CODE = sliding_window_overlay(1).__code__


def _cells(fn):
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _sliding_window_of(fn):
    """W when fn is transformers' sliding_window_causal_mask_function(W) and nothing else."""
    if getattr(fn, "__code__", None) is not _AND_CODE:
        return None
    fns = _cells(fn).get("mask_functions")
    if not (isinstance(fns, tuple) and len(fns) == 2 and fns[1] is causal_mask_function
            and getattr(fns[0], "__code__", None) is _SLIDING_CODE):
        return None
    w = _cells(fns[0]).get("sliding_window")
    return w if isinstance(w, int) else None


def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
         mask_function=causal_mask_function, attention_mask=None, local_size=None,
         allow_is_causal_skip=True, allow_is_bidirectional_skip=False, **kwargs):
    """The mask transformers builds for mhattn, or None where attention_forward needs none.

    - None for plain causal or sliding-window attention when nothing is padded and the last
      query is the last key (attention_forward then applies causality bottom-right, and the
      window, without a mask);
    - for bidirectional attention, None with no padding, else the padding mask alone,
      (B, 1, 1, S) bool (True = attend);
    - otherwise transformers' sdpa_mask: a bool (B, 1, L, S) mask with True = attend.
    """
    padding = None
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset:kv_offset + kv_length]
    no_padding = padding is None or bool(padding.all())
    if mask_function is bidirectional_mask_function and allow_is_bidirectional_skip:
        return None if no_padding else padding[:, None, None, :]
    aligned = int(q_offset) + q_length == kv_offset + kv_length
    plain = mask_function is causal_mask_function or _sliding_window_of(mask_function)
    if plain and allow_is_causal_skip and no_padding and aligned:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=False,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def register():
    """Register "mhattn" with transformers' AttentionInterface and AttentionMaskInterface (done
    at import; calling it again changes nothing)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask)


register()
