"""Version, threads, SIMD target selection, and the GIL being released."""

import os
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


def test_portable_target_is_always_available():
    assert _core.targets()[0] == "generic"


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
