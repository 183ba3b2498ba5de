"""Determinism and memory: the same input gives bit-identical output run after run at a fixed
thread count, and many calls leave the resident set flat."""

import os

import numpy as np
import pytest

import mhattn


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("threads", [1, 2])
def test_bit_identical_run_after_run(rng, threads):
    before = mhattn.get_num_threads()
    mhattn.set_num_threads(threads)
    try:
        mod = mhattn.MultiHeadAttention(96, 6, num_kv_heads=2, seed=0)
        x = rng.standard_normal((3, 150, 96), dtype=np.float32)
        q = rng.standard_normal((2, 4, 300, 48), dtype=np.float32)
        first = (mod(x, is_causal=True)[0], mhattn.scaled_dot_product_attention(q, q, q),
                 mhattn.linear(x, mod.out_proj_weight))
        for _ in range(5):
            again = (mod(x, is_causal=True)[0], mhattn.scaled_dot_product_attention(q, q, q),
                     mhattn.linear(x, mod.out_proj_weight))
            for a, b in zip(first, again):
                np.testing.assert_array_equal(a, b)
    finally:
        mhattn.set_num_threads(before)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.skipif(bool(os.environ.get("MHATTN_SANITIZE")),
                    reason="AddressSanitizer's quarantine keeps freed memory resident")
def test_ten_thousand_calls_leave_the_resident_set_flat(rng):
    mod = mhattn.MultiHeadAttention(32, 4, seed=0)
    x = rng.standard_normal((2, 9, 32), dtype=np.float32)
    cache = mhattn.KVCache(2, 4, 16, 8)
    for _ in range(200):  # warm up: scratch buffers and allocator pools reach their size
        mod(x, need_weights=True)
    start = rss_bytes()
    for i in range(10_000):
        mod(x, key_padding_mask=np.zeros((2, 9), bool), need_weights=i % 2 == 0)
        cache.reset()
        mod(x[:, :4], kv_cache=cache)
        mhattn.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None], is_causal=True)
    grown = rss_bytes() - start
    assert grown < 8 << 20, f"resident set grew by {grown / 2**20:.1f} MB over 10,000 calls"
