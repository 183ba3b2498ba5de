"""torch tensors in and out: every function and layer takes tensors of any strides and dtype,
returns tensors, reads the inputs in place, and refuses what it cannot serve. Skipped when
torch is not installed."""

import copy
import inspect
import pickle
import subprocess
import sys
import weakref

import numpy as np
import pytest

import mhattn
from mhattn import _torch
from tolerances import BF16, assert_close

torch = pytest.importorskip("torch")


def as_np(t):
    """A tensor's values as NumPy, bfloat16 kept (for comparing against the NumPy call)."""
    return _torch.to_numpy(t, "t")


def same(got, want_np):
    """got is a tensor holding exactly the NumPy call's result."""
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(as_np(got).astype(np.float64), want_np.astype(np.float64))
    assert as_np(got).dtype == want_np.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sdpa_takes_and_returns_tensors_of_any_strides(rng, dtype):
    q = torch.randn(2, 9, 3, 24).to(dtype).transpose(1, 2)       # (B, H, L, E) over (B, L, H, E)
    k = torch.randn(2, 3, 40, 48).to(dtype)[..., ::2]             # strided last axis
    v = torch.randn(1, 3, 40, 24).to(dtype).expand(2, -1, -1, -1)  # zero batch stride
    mask = torch.rand(9, 40) < 0.7
    got = mhattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert got.dtype == dtype and got.shape == (2, 3, 9, 24)
    same(got, mhattn.scaled_dot_product_attention(as_np(q), as_np(k), as_np(v),
                                                  attn_mask=mask.numpy(), is_causal=True))


def test_inputs_are_read_in_place():
    for x in (torch.randn(5, 7), torch.randn(7, 5).t(), torch.randn(3, 7).to(torch.bfloat16)):
        a = _torch.to_numpy(x, "x")
        assert a.__array_interface__["data"][0] == x.data_ptr()
        assert a.strides == tuple(s * x.element_size() for s in x.stride())


def fast_call(fn, *args, **kwargs):
    """fn through _core.TensorFunction's C path alone: NotImplemented where torch's own path
    would take the call, and arrays the C path leaves in the result left as they are."""
    c_path = mhattn._core.TensorFunction(fn, lambda T, args, kwargs: NotImplemented,
                                         lambda result: result, _torch._reader)
    return c_path(*args, **kwargs)


def test_the_c_path_reads_tensors_in_place():
    base = torch.randn(4, 6, 8)
    tensors = [base, base.transpose(0, 2), base[:, ::2, 1:], torch.randn(3, 1).expand(3, 5),
               torch.tensor(2.5), torch.empty(0, 3), torch.randn(5, 3).to(torch.bfloat16),
               torch.randn(2, 7).half(), torch.randn(3, 2).double(), torch.rand(4, 4) < 0.5,
               torch.arange(6).reshape(2, 3), torch.arange(5, dtype=torch.uint8)]
    seen = []
    got = fast_call(lambda *a, **k: seen.extend(a + tuple(k.values())), *tensors[:-1], 7, m=tensors[-1])
    assert got is None and seen[-2] == 7
    for t, a in zip(tensors[:-1] + tensors[-1:], seen[:-2] + seen[-1:]):
        assert type(a) is np.ndarray and a.shape == tuple(t.shape), t
        assert a.dtype == as_np(t).dtype
        if t.numel():  # (an empty one has nothing to stride over)
            assert a.strides == tuple(s * t.element_size() for s in t.stride()), t
            assert a.__array_interface__["data"][0] == t.data_ptr()
        np.testing.assert_array_equal(a, as_np(t))


def test_the_c_path_keeps_the_tensor_alive_and_returns_tensors():
    t = torch.arange(12, dtype=torch.float32)
    a = fast_call(lambda x: x[3:], t)  # the array result comes back as a tensor over it
    assert isinstance(a, torch.Tensor) and a.data_ptr() == t.data_ptr() + 12
    pair = fast_call(lambda x: (x[::2], None, 5), t)  # and so do the arrays of a tuple
    assert isinstance(pair[0], torch.Tensor) and pair[1:] == (None, 5)
    assert pair[0].data_ptr() == t.data_ptr() and pair[0].stride() == (2,)
    del t
    import gc
    gc.collect()
    np.testing.assert_array_equal(a.numpy(), np.arange(3, 12, dtype=np.float32))
    np.testing.assert_array_equal(pair[0].numpy(), np.arange(0, 12, 2, dtype=np.float32))
    for dtype in (np.float16, np.float64, BF16):  # each a tensor of its dtype, bfloat16 too
        r = np.arange(6, dtype=np.float32).astype(dtype).reshape(2, 3).T
        got = fast_call(lambda t: r, torch.zeros(1))
        assert isinstance(got, torch.Tensor) and got.data_ptr() == r.__array_interface__["data"][0]
        assert got.stride() == (1, 3)
        np.testing.assert_array_equal(as_np(got), r)
    r = np.full(4, 2.0, np.float32)  # a fresh array lives as long as its tensor, no longer
    alive = weakref.ref(r)
    made = fast_call(lambda t: r, torch.zeros(1))
    del r
    gc.collect()
    assert alive() is not None
    np.testing.assert_array_equal(made.numpy(), np.full(4, 2.0, np.float32))
    del made
    gc.collect()
    assert alive() is None
    # What DLPack cannot carry as it is stays an array, for torch.from_numpy to take or refuse.
    ro = np.ones(3, np.float32)
    ro.flags.writeable = False
    kept = [ro, np.arange(4, dtype=np.float32)[::-1], np.arange(3), np.ones(2, np.complex64)]
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":  # more dims than NumPy 1 allows
        kept.append(np.zeros((1,) * 40, np.float32))
    for r in kept:
        assert type(fast_call(lambda t: r, torch.zeros(1))) is np.ndarray


def test_what_the_c_path_cannot_read_goes_to_torchs_path():
    neg = torch.tensor([1 + 2j, 3 - 1j]).conj().imag  # a negative view: to_dlpack would lose the sign
    assert neg.is_neg()
    for t in (neg, torch.randn(3, requires_grad=True), torch.empty(2, device="meta"),
              torch.randn(2, 2).to_sparse(), torch.randn(2, dtype=torch.complex64)):
        assert fast_call(lambda *a: pytest.fail("called"), torch.randn(2), t) is NotImplemented
        assert fast_call(lambda **k: pytest.fail("called"), x=t) is NotImplemented
    with pytest.raises(TypeError, match="x: a tensor mhattn cannot read in place"):
        mhattn.softmax(neg)
    with pytest.raises(ValueError, match="key"):  # errors of the call itself come through
        mhattn.scaled_dot_product_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 7),
                                            torch.randn(1, 2, 4, 8))


def test_a_wrapped_function_is_still_the_function():
    f = mhattn.scaled_dot_product_attention
    assert f.__name__ == "scaled_dot_product_attention" and f.__doc__ == f.__wrapped__.__doc__
    assert inspect.signature(f) == inspect.signature(f.__wrapped__)
    for g in (f, mhattn.softmax, mhattn.MultiHeadAttention.__call__):
        assert pickle.loads(pickle.dumps(g)) is g
    assert copy.deepcopy(f) is f and weakref.ref(f)() is f
    # Without tensors the call reaches fn with the very objects it was given, and fn's result
    # comes back as it is.
    args, kw = (np.ones(2), [1]), {"k": np.zeros(1)}
    echo = _torch.accepts_tensors(lambda *a, **k: (a, k))
    got_args, got_kw = echo(*args, **kw)
    assert all(g is a for g, a in zip(got_args, args)) and got_kw["k"] is kw["k"]
    assert type(echo(np.ones(2))[0][0]) is np.ndarray


def test_a_wrapped_method_binds_to_its_instance():
    class Layer:
        @_torch.accepts_tensors
        def __call__(self, x, scale=1.0):
            return (self, x * scale)

        @_torch.accepts_tensors
        def method(self, x):
            return (self, x + 1)

    layer = Layer()
    for who, x in (layer(torch.ones(3), scale=2.0), Layer.__call__(layer, torch.ones(3), 2.0)):
        assert who is layer and isinstance(x, torch.Tensor) and x.tolist() == [2.0, 2.0, 2.0]
    who, x = layer.method(torch.ones(2))
    assert who is layer and x.tolist() == [2.0, 2.0]
    bound = layer.method
    assert bound.__self__ is layer and bound(np.ones(1))[1].tolist() == [2.0]


def test_calls_of_many_tensors_take_torchs_path():
    total = _torch.accepts_tensors(lambda *xs: np.stack(xs).sum(axis=0))
    xs = [torch.full((2,), float(i)) for i in range(40)]  # more than the C path's 31 arguments
    assert fast_call(lambda *a: pytest.fail("called"), *xs) is NotImplemented
    got = total(*xs)
    assert isinstance(got, torch.Tensor) and got.tolist() == [sum(range(40))] * 2


def test_outputs_are_tensors_over_the_result_memory():
    for a in (np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((3, 2), BF16)):
        t = _torch.from_numpy(a)
        assert t.data_ptr() == a.__array_interface__["data"][0]
        np.testing.assert_array_equal(as_np(t), a)


def test_building_blocks_take_tensors(rng):
    x = torch.randn(6, 10)
    w, b = torch.randn(4, 10), torch.randn(4)
    same(mhattn.softmax(x, axis=0), mhattn.softmax(x.numpy(), axis=0))
    same(mhattn.linear(x, w, b, activation="gelu"), mhattn.linear(x.numpy(), w.numpy(), b.numpy(),
                                                                   activation="gelu"))
    same(mhattn.matmul(x, w.t()), mhattn.matmul(x.numpy(), w.numpy().T))
    same(mhattn.matmul(x.to(torch.bfloat16), w.t().to(torch.bfloat16)),
         mhattn.matmul(as_np(x.to(torch.bfloat16)), as_np(w.t().to(torch.bfloat16))))
    lin = mhattn.Linear(torch.nn.Parameter(w), torch.nn.Parameter(b))  # weights may need grad
    same(lin(x), lin(x.numpy()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_takes_tensors_and_a_torch_module(rng, dtype):
    tm = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    mod = mhattn.MultiHeadAttention.from_torch(tm)
    x = torch.randn(2, 7, 32).to(dtype)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    out, w = mod(x, key_padding_mask=kpm, need_weights=True)
    want, want_w = mod(as_np(x), key_padding_mask=kpm.numpy(), need_weights=True)
    same(out, want)
    same(w, want_w)
    if dtype == torch.float32:
        with torch.no_grad():
            t_out, _ = tm(x, x, x, key_padding_mask=kpm, need_weights=False)
        assert_close(out.numpy(), t_out.numpy(), "torch")


def test_bf16_weights_load_into_a_layer(rng):
    mod = mhattn.MultiHeadAttention(16, 2, seed=0)
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in mod.state_dict().items()}
    mod.load_state_dict(sd)
    np.testing.assert_array_equal(mod.in_proj_weight, sd["in_proj_weight"].float().numpy())


def test_a_tensor_that_requires_grad_is_refused_while_autograd_is_on():
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    with pytest.raises(TypeError, match=r"query requires grad.*torch.no_grad\(\)"):
        mhattn.scaled_dot_product_attention(q, q, q)
    with pytest.raises(TypeError, match="x requires grad"):
        mhattn.Linear(np.ones((3, 8), np.float32))(torch.randn(2, 8, requires_grad=True))
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            got = mhattn.scaled_dot_product_attention(q, q, q)
        same(got, mhattn.scaled_dot_product_attention(*(q.detach().numpy(),) * 3))


def test_a_tensor_off_the_cpu_is_refused():
    x = torch.empty(2, 3, device="meta")
    with pytest.raises(TypeError, match="x is a tensor on meta; mhattn computes on the CPU"):
        mhattn.softmax(x)


def test_torch_is_not_imported_for_numpy_calls():
    code = ("import sys, numpy as np, mhattn; x = np.ones((1, 2, 3, 4), np.float32); "
            "mhattn.scaled_dot_product_attention(x, x, x); mhattn.MultiHeadAttention(8, 2)("
            "np.ones((1, 3, 8), np.float32)); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
