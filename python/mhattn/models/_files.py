"""Reading a checkpoint folder: config.json and the weights of model.safetensors (one file, or
shards listed in model.safetensors.index.json), memory-mapped, bfloat16 included (as
ml_dtypes.bfloat16, which the safetensors package's NumPy reader refuses)."""

from __future__ import annotations

import json
import mmap
import os

import numpy as np

from .._checks import BF16

# safetensors' dtype names (https://github.com/huggingface/safetensors, the format's header).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": BF16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


def read_json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def read_safetensors(path):
    """{name: read-only array} of one .safetensors file: an 8-byte little-endian header length,
    a JSON header giving each tensor's dtype, shape and byte range, then the bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in _DTYPES:
            raise NotImplementedError(f"{path}: tensor {name} has dtype {t['dtype']}, which "
                                      f"mhattn does not read")
        a, b = t["data_offsets"]
        dtype = np.dtype(_DTYPES[t["dtype"]])
        out[name] = np.frombuffer(data, dtype, (b - a) // dtype.itemsize,
                                  8 + n + a).reshape(t["shape"])
    return out


def read_weights(folder):
    """Every tensor of the checkpoint in folder: model.safetensors, or the shards of
    model.safetensors.index.json."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return read_safetensors(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor "
                                f"model.safetensors.index.json (mhattn reads safetensors only)")
    out = {}
    for shard in sorted(set(read_json(folder, "model.safetensors.index.json")["weight_map"].values())):
        out.update(read_safetensors(os.path.join(folder, shard)))
    return out
