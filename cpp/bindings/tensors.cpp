// tensors.cpp: a call with torch tensors, run on NumPy arrays over their memory, through
// DLPack and without importing torch (mhattn/_torch.py holds the rules; this is its fast path).
//
// torch's Tensor.numpy() costs 0.7 us a tensor; torch.utils.dlpack.to_dlpack costs 0.2, and
// the array built here from its capsule about 0.1 more. With three or four tensors a call, and
// the glue in C rather than Python, that is most of what a call with tensors costs over one with
// arrays (issue 19 allows 3 us).
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include <cstdint>

namespace py = pybind11;

namespace {

// The DLPack ABI (dlpack.h, versions 0.x, which torch's to_dlpack produces as "dltensor").
struct DLDevice { int32_t device_type; int32_t device_id; };
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means C-contiguous
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
enum { kDLCPU = 1 };
enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6 };

// The NumPy dtype of a DLPack one, or an empty handle.
py::object numpy_dtype(DLDataType t, py::handle bfloat16) {
  if (t.lanes != 1) return {};
  const int bits = t.bits;
  switch (t.code) {
    case kDLFloat:
      if (bits == 32) return py::dtype::of<float>();
      if (bits == 64) return py::dtype::of<double>();
      if (bits == 16) return py::dtype("float16");
      return {};
    case kDLBfloat: return bits == 16 ? py::reinterpret_borrow<py::object>(bfloat16) : py::object();
    case kDLBool: return bits == 8 ? py::dtype::of<bool>() : py::object();
    case kDLInt:
      if (bits == 8) return py::dtype::of<int8_t>();
      if (bits == 16) return py::dtype::of<int16_t>();
      if (bits == 32) return py::dtype::of<int32_t>();
      if (bits == 64) return py::dtype::of<int64_t>();
      return {};
    case kDLUInt: return bits == 8 ? py::dtype::of<uint8_t>() : py::object();
    default: return {};
  }
}

void delete_managed(PyObject* capsule) {
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "mhattn.dltensor"));
  if (m != nullptr && m->deleter != nullptr) m->deleter(m);
}

// t -> an array over its memory, or an empty handle when torch's own path must read it.
py::object array_of(py::handle t, py::handle to_dlpack, py::handle bfloat16) {
  // to_dlpack drops the negative bit of a view (x.conj().imag) and reads through requires_grad.
  static PyObject* const is_neg = PyUnicode_InternFromString("is_neg");
  static PyObject* const requires_grad = PyUnicode_InternFromString("requires_grad");
  py::object grad = py::reinterpret_steal<py::object>(PyObject_GetAttr(t.ptr(), requires_grad));
  if (!grad) throw py::error_already_set();
  if (grad.ptr() != Py_False) return {};
  py::object neg = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(t.ptr(), is_neg));
  if (!neg) throw py::error_already_set();
  if (neg.ptr() != Py_False) return {};

  py::object capsule = py::reinterpret_steal<py::object>(PyObject_CallOneArg(to_dlpack.ptr(), t.ptr()));
  if (!capsule) {  // a meta or sparse tensor, say: torch's path gives the reason
    PyErr_Clear();
    return {};
  }
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (m == nullptr) throw py::error_already_set();
  const DLTensor& d = m->dl_tensor;
  py::object dtype = numpy_dtype(d.dtype, bfloat16);
  // Off the CPU, a dtype NumPy lacks, or more dims than NumPy 1's limit (NPY_MAXDIMS): the
  // capsule, unconsumed, frees m.
  if (d.device.device_type != kDLCPU || !dtype || d.ndim > 32) return {};

  // Consume it (DLPack's protocol): from here the array's base owns m.
  if (PyCapsule_SetName(capsule.ptr(), "used_dltensor") != 0) throw py::error_already_set();
  py::capsule owner(static_cast<void*>(m), "mhattn.dltensor", &delete_managed);
  const int64_t item = d.dtype.bits / 8;
  py::ssize_t shape[32], strides[32];
  int64_t next = item;  // a C-contiguous stride, for a null strides
  for (int i = d.ndim - 1; i >= 0; --i) {
    shape[i] = d.shape[i];
    strides[i] = d.strides != nullptr ? d.strides[i] * item : next;
    next *= d.shape[i];
  }
  // pybind11's array constructor would copy shape and strides into vectors first; this is
  // the same NumPy call without them.
  auto& api = py::detail::npy_api::get();
  py::object arr = py::reinterpret_steal<py::object>(api.PyArray_NewFromDescr_(
      api.PyArray_Type_, dtype.release().ptr(), d.ndim, shape, strides,
      static_cast<char*>(d.data) + d.byte_offset, py::detail::npy_api::NPY_ARRAY_WRITEABLE_,
      nullptr));
  if (!arr) throw py::error_already_set();
  if (api.PyArray_SetBaseObject_(arr.ptr(), owner.release().ptr()) != 0)
    throw py::error_already_set();
  return arr;
}

// An argument as fn gets it: a, or the array over a when it is a tensor (an instance of
// reader[0]); an empty handle when torch's own path must read it.
py::object argument(PyObject* a, PyObject* const* reader) {
  if (!PyObject_TypeCheck(a, reinterpret_cast<PyTypeObject*>(reader[0])))
    return py::reinterpret_borrow<py::object>(a);
  return array_of(a, reader[1], reader[2]);
}

// tensor_call(fn, args, kwargs, (Tensor, to_dlpack, bfloat16, from_numpy))
//   fn(*args, **kwargs) with each tensor argument read as an array; a float32/float16 array
//   result comes back through from_numpy, any other result as fn returned it. NotImplemented
//   (and fn not called) when some tensor must take torch's own path.
PyObject* tensor_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyTuple_Check(args[1]) || !PyDict_Check(args[2]) || !PyTuple_Check(args[3]) ||
      PyTuple_GET_SIZE(args[3]) != 4) {
    PyErr_SetString(PyExc_TypeError,
                    "tensor_call(fn, args: tuple, kwargs: dict, (Tensor, to_dlpack, bfloat16, from_numpy))");
    return nullptr;
  }
  PyObject* const* reader = &PyTuple_GET_ITEM(args[3], 0);
  try {
    const Py_ssize_t n = PyTuple_GET_SIZE(args[1]);
    py::tuple pos(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      py::object a = argument(PyTuple_GET_ITEM(args[1], i), reader);
      if (!a) Py_RETURN_NOTIMPLEMENTED;
      PyTuple_SET_ITEM(pos.ptr(), i, a.release().ptr());
    }
    py::object kwargs;
    if (PyDict_GET_SIZE(args[2]) > 0) {
      kwargs = py::dict();
      PyObject *key, *value;
      Py_ssize_t at = 0;
      while (PyDict_Next(args[2], &at, &key, &value)) {
        py::object a = argument(value, reader);
        if (!a) Py_RETURN_NOTIMPLEMENTED;
        if (PyDict_SetItem(kwargs.ptr(), key, a.ptr()) != 0) throw py::error_already_set();
      }
    }
    py::object result = py::reinterpret_steal<py::object>(
        PyObject_Call(args[0], pos.ptr(), kwargs ? kwargs.ptr() : nullptr));
    if (!result) throw py::error_already_set();
    if (Py_TYPE(result.ptr()) != py::detail::npy_api::get().PyArray_Type_ ||
        reinterpret_cast<PyObject*>(py::detail::array_proxy(result.ptr())->descr) == reader[2])
      return result.release().ptr();
    return PyObject_CallOneArg(reader[3], result.ptr());
  } catch (py::error_already_set& e) {
    e.restore();
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef tensor_call_def = {
    "tensor_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&tensor_call)),
    METH_FASTCALL,
    "tensor_call(fn, args, kwargs, (Tensor, to_dlpack, bfloat16, from_numpy)): fn on arrays "
    "over the tensors' memory, its array result as a tensor; NotImplemented when a tensor must "
    "take torch's .numpy() path."};

}  // namespace

void add_tensor_functions(py::module_& m) {
  // A plain CPython function: pybind11's argument dispatch would cost more than the work.
  m.add_object("tensor_call", py::reinterpret_steal<py::object>(
                                  PyCFunction_NewEx(&tensor_call_def, nullptr, m.ptr())));
}
