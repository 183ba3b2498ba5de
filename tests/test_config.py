"""Version, threads, SIMD target selection, and the GIL being released."""

import os
import platform
import subprocess
import sys
import threading
from importlib.metadata import version

import numpy as np
import pytest

import mhattn
from mhattn import _core


def run(code, **env):
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e)


def test_version_is_single_sourced():
    assert mhattn.__version__ == version("mhattn")


def test_show_config(capsys):
    mhattn.show_config()
    out = capsys.readouterr().out
    assert mhattn.__version__ in out and _core.target() in out and str(mhattn.get_num_threads()) in out
    assert "bfloat16" in out and ("AMX:         available" in out) == ("amx" in _core.targets())
    assert ("attention:   bfloat16 vdpbf16ps" in out) == (_core.target() in ("avx512bf16", "amx"))
    for t in _core.test_targets():  # every path has its line in the table
        assert t in mhattn._PATHS or t == "amx_emulated"


def test_portable_target_is_always_available():
    assert _core.targets()[0] == "generic"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the emulation is built on x86-64 only")
@pytest.mark.skipif("amx_emulated" not in os.environ.get("MHATTN_TEST_TARGETS", "amx_emulated"),
                    reason="MHATTN_TEST_TARGETS leaves the emulation out")
def test_amx_emulation_runs_on_every_x86_cpu():
    """The tests of the AMX and AVX512-BF16 kernels' logic run wherever the suite does, an
    AVX2-only CPU too: the emulation needs no ISA of its own."""
    assert "amx_emulated" in _core.test_targets()


def test_mhattn_isa_env_forces_the_portable_path():
    r = run("import mhattn; print(mhattn._core.target())", MHATTN_ISA="generic")
    assert r.returncode == 0 and r.stdout.strip() == "generic"


def test_mhattn_isa_env_refuses_unknown_target():
    r = run("import mhattn", MHATTN_ISA="avx9000")
    assert r.returncode != 0 and "avx9000" in r.stderr and "ImportError" in r.stderr


def test_default_threads_follow_omp_num_threads():
    r = run("import mhattn; print(mhattn.get_num_threads())", OMP_NUM_THREADS="3")
    assert r.stdout.strip() == "3"


def test_set_num_threads():
    before = mhattn.get_num_threads()
    try:
        mhattn.set_num_threads(1)
        assert mhattn.get_num_threads() == 1
    finally:
        mhattn.set_num_threads(before)


def test_concurrent_python_threads_get_serial_results():
    rng = np.random.default_rng(0)
    mod = mhattn.MultiHeadAttention(64, 4, seed=0)
    xs = [rng.standard_normal((2, 50, 64), dtype=np.float32) for _ in range(8)]
    serial = [mod(x, is_causal=True)[0] for x in xs]
    results = [None] * 8

    def work(i):
        for _ in range(5):
            results[i] = mod(xs[i], is_causal=True)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_forked_child_after_a_parallel_run_does_not_hang():
    """libgomp's workers do not survive fork(): a child of a process that ran mhattn in parallel
    computes on one thread instead of waiting forever for them."""
    code = """
import multiprocessing as mp, numpy as np, mhattn
mhattn.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((1, 8, 256, 64), dtype=np.float32)
want = mhattn.scaled_dot_product_attention(x, x, x)
def child(q):
    q.put((mhattn.get_num_threads(), mhattn.scaled_dot_product_attention(x, x, x)))
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
threads, got = q.get(timeout=60)
p.join(60)
assert p.exitcode == 0 and threads == 1
np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("first", ["torch", "mhattn"])
def test_openmp_beside_torch_either_import_order(first):
    pytest.importorskip("torch")
    code = f"""
import importlib
a = importlib.import_module({first!r})
import torch, mhattn, numpy as np
torch.set_num_threads(1)
mhattn.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((2, 8, 200, 64), dtype=np.float32)
t = torch.from_numpy(x)
for _ in range(3):
    ours = mhattn.scaled_dot_product_attention(x, x, x, is_causal=True)
    theirs = torch.nn.functional.scaled_dot_product_attention(t, t, t, is_causal=True).numpy()
np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-5)
assert torch.get_num_threads() == 1 and mhattn.get_num_threads() == 2
mhattn.set_num_threads(1)
torch.set_num_threads(2)
assert torch.get_num_threads() == 2 and mhattn.get_num_threads() == 1
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_set_num_threads_from_another_thread_while_calls_run():
    rng = np.random.default_rng(1)
    mod = mhattn.MultiHeadAttention(64, 4, seed=0)
    x = rng.standard_normal((2, 70, 64), dtype=np.float32)
    want = mod(x)[0]
    before = mhattn.get_num_threads()
    stop = threading.Event()
    results, errors = [], []

    def flip():
        n = 0
        while not stop.is_set():
            mhattn.set_num_threads(1 + n % 3)
            n += 1

    def work():
        try:
            for _ in range(40):
                results.append(mod(x)[0])
        except Exception as e:  # surfaced below
            errors.append(e)

    flipper = threading.Thread(target=flip)
    workers = [threading.Thread(target=work) for _ in range(4)]
    flipper.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    flipper.join()
    mhattn.set_num_threads(before)
    assert not errors and len(results) == 160
    for got in results:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
