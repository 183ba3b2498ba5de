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


def available_memory():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 0


@pytest.mark.skipif(available_memory() < 20 << 30, reason="needs 20 GB of free memory")
@pytest.mark.skipif(bool(os.environ.get("MHATTN_SANITIZE")), reason="too slow under the sanitizers")
def test_input_of_more_than_2_31_elements_is_addressed_right():
    K = 1024
    M = (1 << 31) // K + 3  # the last rows lie past element 2^31
    x = np.ones((M, K), np.float32)
    x[-2:] = 3.0
    w = np.random.default_rng(0).standard_normal((1, K)).astype(np.float32)
    out = mhattn.linear(x, w)
    np.testing.assert_allclose(out[-2:, 0], 3 * w.sum(), rtol=1e-4)
    np.testing.assert_allclose(out[:2, 0], w.sum(), rtol=1e-4)
    np.testing.assert_allclose(out[-3, 0], w.sum(), rtol=1e-4)
