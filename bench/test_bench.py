"""The harness's cases (mhattn.bench) as pytest-benchmark suites, grouped by case and head count.

    pytest bench/ --benchmark-group-by=group --benchmark-json out.json
CI runs them once with --benchmark-disable, so they cannot rot. Every engine's output is checked
against mhattn.reference before it is timed.
"""

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from mhattn import bench, reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tolerances import TOL_HALF  # noqa: E402  (the suite's one table, for 16-bit results)

ARGS = argparse.Namespace(heads=None, batch=1, length=512, width=768)
# The layer at head dim 64 stops at 16 heads here (width 1024): its float64 reference at width
# 4096 would take minutes and gigabytes for a check that the smaller widths already make.
LAYER_ARGS = argparse.Namespace(heads=(1, 2, 4, 8, 12, 16), batch=1, length=512, width=768)
# The gemm preset's one-shot calls only at the smaller shapes: at the big ones they repeat the
# packed layer's product, and its float64 reference, three times over.
CASES = [c for name in ("heads", "fixed-dim", "design", "causal", "gqa", "decode", "layer",
                         "layer-bf16", "layer-heads", "cache", "gemm")
         for c in bench.preset(name, ARGS)
         if not (c.kind == "gemm" and c.part != "Linear" and c.M * c.N * c.K > 2 ** 28)]
CASES += bench.preset("layer-fixed-dim", LAYER_ARGS)


def expected(case, inp):
    if case.kind == "gemm":
        return reference.linear(inp["x"], inp["w"])
    if case.kind == "layer":
        mod = inp["mod"]
        return reference.multi_head_attention(inp["x"], inp["x"], inp["x"], mod.state_dict(),
                                              mod.num_heads)[0]
    if case.kind == "cache":  # the last token, which sees every token of the sequence
        mod, x = inp["mod"], inp["x"]
        return reference.multi_head_attention(x[:, -1:], x, x, mod.state_dict(), mod.num_heads,
                                              mod.num_kv_heads)[0]
    return reference.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], is_causal=case.causal,
                                                  enable_gqa=case.Hq != case.Hkv)


_LAST = {}


def case_data(case):
    """The case's inputs and (once asked for) their reference, made once for all its engines:
    a case's tests run one after another, and the float64 reference is most of their time."""
    if _LAST.get("case") is not case:
        rng = np.random.default_rng(zlib.crc32(f"{case.kind} {case.label}".encode()))
        _LAST.clear()
        _LAST.update(case=case, inp=bench.make_inputs(case, rng))
    return _LAST


@pytest.mark.parametrize("engine", list(bench.ENGINES))
@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}-{c.label}".replace(" ", "_") for c in CASES])
def test_bench(benchmark, case, engine):
    data = case_data(case)
    inp = data["inp"]
    try:
        fn = bench.ENGINES[engine](case, inp)
    except bench.Skip as e:
        pytest.skip(str(e))
    if "want" not in data:
        data["want"] = expected(case, inp)
    got = np.asarray(fn())
    tol = dict(rtol=2e-3, atol=2e-3) if case.dtype == "float32" else TOL_HALF[got.dtype]
    np.testing.assert_allclose(got.astype(np.float64), data["want"], **tol)
    benchmark.group = f"{case.group} | H={case.Hq}" if case.kind != "gemm" else case.group
    benchmark.extra_info.update(case=case.label, engine=engine, flops=case.flops)
    benchmark(fn)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["gflops"] = case.flops / median / 1e9
        if case.kind == "decode":
            benchmark.extra_info["gbps"] = case.bytes / median / 1e9
