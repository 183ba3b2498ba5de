"""The normalisations of the models' residual streams, (..., D) -> (..., D) float32, in NumPy."""

import numpy as np


def layer_norm(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (BERT, GPT-2)."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x²) + eps) * weight over the last axis (Llama, Qwen2, Mistral)."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight
