"""mhattn: fast multi-head attention for CPUs.

A C++ core (SIMD chosen at run time, OpenMP threads) behind a NumPy API that follows PyTorch:
scaled_dot_product_attention, MultiHeadAttention (with KVCache for decoding), and the building
blocks softmax, linear (and Linear, its weight packed once) and matmul. mhattn.reference
defines every op in plain NumPy. Every function and layer also takes torch tensors and then
returns tensors; `import mhattn.hf` makes mhattn an attention implementation of Hugging Face
transformers. Results keep the input's dtype (float32, bfloat16, float16); the README's numeric
policy says how each is computed (show_config() prints it for this CPU).
"""

from __future__ import annotations

import os

from . import _core, models, reference
from ._core import __version__
from ._threads import threads
from .functional import layer_norm, linear, matmul, rms_norm, scaled_dot_product_attention, softmax
from .modules import KVCache, Linear, MultiHeadAttention

__all__ = [
    "__version__",
    "scaled_dot_product_attention",
    "MultiHeadAttention",
    "KVCache",
    "Linear",
    "softmax",
    "linear",
    "matmul",
    "layer_norm",
    "rms_norm",
    "set_num_threads",
    "get_num_threads",
    "threads",
    "show_config",
    "reference",
]


def set_num_threads(n):
    """Use n threads in mhattn's kernels (mhattn only: PyTorch's and NumPy's are not touched)."""
    from ._checks import as_int

    _core.set_num_threads(as_int(n, "n", 1))


def get_num_threads():
    """The number of threads mhattn's kernels use (those that the calling thread starts, inside
    a `with mhattn.threads(n)` block)."""
    return _core.get_num_threads()


# How each precision's products run on each target.
_PATHS = {
    "generic": ("float32 vectors", "widened to float32", "widened to float32"),
    "avx2": ("AVX2 FMA", "widened to float32 in registers", "F16C, widened in registers"),
    "avx512": ("AVX-512 FMA", "widened to float32 in registers", "F16C, widened in registers"),
    "avx512bf16": ("AVX-512 FMA", "vdpbf16ps", "F16C, widened in registers"),
    "amx": ("AVX-512 FMA", "AMX tiles (16 rows or more), vdpbf16ps", "F16C, widened in registers"),
}
# How attention reads bfloat16 and float16 keys and values: on the targets with vdpbf16ps it
# multiplies bfloat16 as it is, elsewhere 16 bits are widened to float32.
_ATTENTION_BF16 = {"avx512bf16": "vdpbf16ps", "amx": "vdpbf16ps (AMX tiles: not yet)"}


def show_config():
    """Print the version, the SIMD target chosen at run time and how each precision runs on
    it, whether AMX can run here (and why not), and the thread count."""
    print(f"mhattn {__version__}")
    t = _core.target()
    print(f"  SIMD target: {t} (this CPU can run: {', '.join(_core.targets())})")
    f32, bf16, f16 = _PATHS.get(t, ("?", "?", "?"))
    print(f"  products:    float32 {f32}; bfloat16 {bf16}; float16 {f16}")
    att = _ATTENTION_BF16.get(t, "widened to float32 (in registers when decoding)")
    print(f"  attention:   bfloat16 {att}; float16 widened to float32 (in registers when "
          f"decoding)")
    print(f"  AMX:         {_core.amx_status() or 'available'}")
    print(f"  threads:     {get_num_threads()}")


def _default_threads():
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_core.set_num_threads(_default_threads())
if os.environ.get("MHATTN_ISA"):
    try:
        _core.set_target(os.environ["MHATTN_ISA"])
    except ValueError as e:
        raise ImportError(str(e)) from None
