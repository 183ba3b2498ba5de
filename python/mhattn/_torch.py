"""torch tensors in and out of mhattn, without copies.

Every public function and layer call is wrapped by `accepts_tensors`. When an argument is a
torch.Tensor, each tensor argument becomes a NumPy array over the same memory, with the same
strides (read through the tensor's DLPack capsule by _core.TensorFunction, which is faster than
torch's .numpy() and knows bfloat16), the NumPy code runs, and each array it returns becomes a
tensor over the array's memory (through a DLPack capsule made for it, which torch imports). A
tensor DLPack would misdescribe (a negative view) or cannot carry goes through torch's
.numpy(), which reads it or says why not. torch is never imported here: a tensor can only exist
once its caller has imported torch, so `sys.modules` tells whether to look for one at all.

Refused with TypeError: tensors off the CPU, and tensors that require grad while autograd is
on (mhattn computes no gradients; under torch.no_grad() or torch.inference_mode() they are
read like any other tensor).
"""

from __future__ import annotations

import functools
import inspect
import sys

import numpy as np

from . import _core
from ._checks import BF16


def tensor_type():
    """torch.Tensor, or None while torch has not been imported."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def to_numpy(x, name, weight=False):
    """A NumPy view of the CPU tensor x (no copy). A weight (a layer copies it, so no gradient
    could be expected to flow) is read even when it requires grad."""
    try:
        return x.numpy()  # the common case, and the cheap one; the rest explains refusals
    except (TypeError, RuntimeError):
        pass
    torch = sys.modules["torch"]
    if x.device.type != "cpu":
        raise TypeError(f"{name} is a tensor on {x.device}; mhattn computes on the CPU (pass "
                        f"{name}.cpu())")
    if x.requires_grad:
        if torch.is_grad_enabled() and not weight:
            raise TypeError(f"{name} requires grad, and mhattn computes no gradients: call it "
                            f"under torch.no_grad() or torch.inference_mode()")
        x = x.detach()
    try:
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(BF16)
        return x.numpy()
    except (TypeError, RuntimeError) as e:
        raise TypeError(f"{name}: a tensor mhattn cannot read in place ({e})") from None


def from_numpy(a):
    """A tensor over the memory of the array a (no copy)."""
    torch = sys.modules["torch"]
    if a.dtype is BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def weight_array(w, name):
    """w as an array: a tensor read in place (weights may require grad), anything else as is."""
    T = tensor_type()
    return to_numpy(w, name, weight=True) if T is not None and isinstance(w, T) else w


def _to_tensors(result):
    if type(result) is np.ndarray:
        return from_numpy(result)
    if isinstance(result, tuple):
        return tuple(_to_tensors(r) for r in result)
    return result


def _reader(T):
    """The reader of tensors of type T: what _core.TensorFunction reads them and makes tensors
    with (it asks once torch is there, and again if torch is imported anew)."""
    from torch.utils.dlpack import from_dlpack, to_dlpack
    # torch's import of a capsule itself: from_dlpack adds 0.2-0.3 us of Python around it.
    from_capsule = getattr(sys.modules["torch"]._C, "_from_dlpack", from_dlpack)
    return (T, to_dlpack, BF16, from_capsule)


def accepts_tensors(fn):
    """fn, taking torch tensors wherever it takes arrays, and then returning tensors: a
    _core.TensorFunction, which passes a call without tensors straight to fn and makes a call
    with tensors in C. What it adds to one is mostly torch's own cost: 0.2 us a tensor for its
    DLPack capsule, and about 0.4 us to import the result's capsule."""
    names = list(inspect.signature(fn).parameters)

    def by_torch(T, args, kwargs):  # tensors torch's .numpy() must read, or refuse with a reason
        args = [to_numpy(a, names[i] if i < len(names) else f"argument {i}")
                if isinstance(a, T) else a for i, a in enumerate(args)]
        kwargs = {k: to_numpy(v, k) if isinstance(v, T) else v for k, v in kwargs.items()}
        result = fn(*args, **kwargs)
        return result if type(result) is T else _to_tensors(result)

    return functools.update_wrapper(_core.TensorFunction(fn, by_torch, _to_tensors, _reader), fn)
