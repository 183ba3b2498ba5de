// tensors.cpp: a call with torch tensors, run on NumPy arrays over their memory, through
// DLPack and without importing torch (mhattn/_torch.py holds the rules; this is its fast path).
//
// torch's Tensor.numpy() costs 0.7 us a tensor; torch.utils.dlpack.to_dlpack costs 0.2, and
// the array built here from its capsule about 0.1 more. A result goes back the same way: a
// capsule made here for the array, which torch's DLPack import turns into a tensor (it keeps
// the array alive), cheaper than torch.from_numpy and bfloat16 included. With three or four
// tensors a call, and the glue in C rather than Python, that is most of what a call with
// tensors costs over one with arrays (issue 19 allows 3 us).
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include <cstdint>

#include <structmember.h>

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

// The DLPack dtype of an array's descr, when it is one a tensor result can have: float32,
// float16, float64 or bfloat16 (NumPy's own descrs, native byte order); lanes 0 otherwise.
DLDataType dlpack_dtype(PyObject* descr, py::handle bfloat16) {
  static PyObject* const f32 = py::dtype::of<float>().release().ptr();
  static PyObject* const f64 = py::dtype::of<double>().release().ptr();
  static PyObject* const f16 = py::dtype("float16").release().ptr();
  if (descr == f32) return {kDLFloat, 32, 1};
  if (descr == f64) return {kDLFloat, 64, 1};
  if (descr == f16) return {kDLFloat, 16, 1};
  if (descr == bfloat16.ptr()) return {kDLBfloat, 16, 1};
  return {0, 0, 0};
}

// A DLManagedTensor over an array, which it holds (manager_ctx) until the consumer lets go;
// shape and strides live in the same allocation.
struct Exported {
  DLManagedTensor m;
  int64_t dims[2 * 32];
};

void release_exported(DLManagedTensor* m) {
  const PyGILState_STATE gil = PyGILState_Ensure();  // torch may free a tensor without the GIL
  Py_DECREF(static_cast<PyObject*>(m->manager_ctx));
  PyGILState_Release(gil);
  delete reinterpret_cast<Exported*>(m);
}

void delete_unconsumed(PyObject* capsule) {  // a consumer renames the capsule it takes
  if (!PyCapsule_IsValid(capsule, "dltensor")) return;
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  m->deleter(m);
}

// The array a as a tensor over its memory, through from_dlpack (torch's import of a DLPack
// capsule); a itself (a new reference) when DLPack cannot carry it as it is: another dtype,
// read-only, more than 32 dims, or a stride that is negative or not whole elements
// (torch.from_numpy, in _torch.py, then converts it or says why not).
py::object tensor_of(py::handle a, py::handle bfloat16, py::handle from_dlpack) {
  auto* arr = py::detail::array_proxy(a.ptr());
  const DLDataType dt = dlpack_dtype(reinterpret_cast<PyObject*>(arr->descr), bfloat16);
  const int64_t item = dt.bits / 8;
  bool ok = dt.lanes == 1 && (arr->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_) != 0 &&
            arr->nd <= 32;  // (NumPy 2 allows 64 dims; Exported holds 32)
  for (int i = 0; ok && i < arr->nd; ++i) ok = arr->strides[i] >= 0 && arr->strides[i] % item == 0;
  if (!ok) return py::reinterpret_borrow<py::object>(a);
  auto* e = new Exported;
  DLTensor& d = e->m.dl_tensor;
  d.data = arr->data;
  d.device = {kDLCPU, 0};
  d.ndim = arr->nd;
  d.dtype = dt;
  d.shape = e->dims;
  d.strides = e->dims + arr->nd;
  d.byte_offset = 0;
  for (int i = 0; i < arr->nd; ++i) {
    d.shape[i] = arr->dimensions[i];
    d.strides[i] = arr->strides[i] / item;
  }
  e->m.manager_ctx = a.inc_ref().ptr();
  e->m.deleter = &release_exported;
  PyObject* capsule = PyCapsule_New(&e->m, "dltensor", &delete_unconsumed);
  if (capsule == nullptr) {
    release_exported(&e->m);
    throw py::error_already_set();
  }
  py::object owned = py::reinterpret_steal<py::object>(capsule);
  py::object t = py::reinterpret_steal<py::object>(PyObject_CallOneArg(from_dlpack.ptr(), capsule));
  if (!t) throw py::error_already_set();
  return t;
}

// A result of fn as the caller gets it: an array as a tensor (tensor_of), a tuple with its
// arrays so, anything else as it is.
py::object result_of(py::object r, PyObject* const* reader) {
  PyTypeObject* const ndarray = py::detail::npy_api::get().PyArray_Type_;
  if (Py_TYPE(r.ptr()) == ndarray) return tensor_of(r, reader[2], reader[3]);
  if (!PyTuple_CheckExact(r.ptr())) return r;
  const Py_ssize_t n = PyTuple_GET_SIZE(r.ptr());
  py::tuple out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    py::handle x = PyTuple_GET_ITEM(r.ptr(), i);
    py::object y = Py_TYPE(x.ptr()) == ndarray ? tensor_of(x, reader[2], reader[3])
                                               : py::reinterpret_borrow<py::object>(x);
    PyTuple_SET_ITEM(out.ptr(), i, y.release().ptr());
  }
  return std::move(out);
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

  // The capsule, left unconsumed, becomes the array's base: it frees m when the array dies
  // (a consumer that took m would rename it and wrap m in an owner of its own; this one needs
  // none).
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
  if (api.PyArray_SetBaseObject_(arr.ptr(), capsule.release().ptr()) != 0)
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

// TensorFunction(fn, slow, finish, make_reader): fn, taking torch tensors wherever it takes
// arrays (mhattn/_torch.py's accepts_tensors makes one for each function and layer call).
// A call without tensors (torch not even imported, or no argument a tensor) goes to fn as it
// came, arguments untouched. A call with tensors reads each through array_of and calls fn on
// the arrays, its result through result_of, then finish(result) when an array is left in it
// (one DLPack cannot carry). When some tensor must take torch's own path instead,
// slow(Tensor, args, kwargs) makes the whole call. make_reader(Tensor) gives the reader
// (Tensor, to_dlpack, bfloat16, from_dlpack) once torch is there.
// Like a function, it binds as a method (a layer's __call__), pickles by its qualified name,
// takes weak references, and functools.update_wrapper gives it fn's name, doc and __wrapped__.
struct TensorFunction {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject* fn;
  PyObject* slow;
  PyObject* finish;
  PyObject* make_reader;
  PyObject* dict;
  PyObject* weakrefs;
};

// What every TensorFunction shares: the torch module it last saw, its Tensor type, and the
// reader made for it.
struct Torch {
  PyObject* module = nullptr;
  PyObject* tensor = nullptr;
  PyObject* reader = nullptr;
} torch_seen;

// torch.Tensor (borrowed), or null while torch is not imported (or is halfway through its
// import); -1 with an exception set on an error.
int tensor_type(PyObject** type) {
  static PyObject* const torch_name = PyUnicode_InternFromString("torch");
  PyObject* torch = PyDict_GetItemWithError(PyImport_GetModuleDict(), torch_name);
  *type = nullptr;
  if (torch == nullptr) return PyErr_Occurred() ? -1 : 0;
  if (torch != torch_seen.module) {  // the first tensor call, or torch imported anew
    PyObject* t = PyObject_GetAttrString(torch, "Tensor");
    if (t == nullptr) {
      PyErr_Clear();
      return 0;
    }
    Py_INCREF(torch);
    Py_XSETREF(torch_seen.module, torch);
    Py_XSETREF(torch_seen.tensor, t);
    Py_CLEAR(torch_seen.reader);
  }
  *type = torch_seen.tensor;
  return 0;
}

bool has_array(PyObject* r) {  // an array left in a result, for finish
  PyTypeObject* const ndarray = py::detail::npy_api::get().PyArray_Type_;
  if (Py_TYPE(r) == ndarray) return true;
  if (!PyTuple_CheckExact(r)) return false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(r); ++i)
    if (Py_TYPE(PyTuple_GET_ITEM(r, i)) == ndarray) return true;
  return false;
}

// slow(Tensor, args, kwargs): the vectorcall's arguments as a tuple and a dict.
PyObject* call_slow(TensorFunction* self, PyObject* T, PyObject* const* args, Py_ssize_t nargs,
                    PyObject* kwnames) {
  py::tuple pos(nargs);
  for (Py_ssize_t i = 0; i < nargs; ++i) PyTuple_SET_ITEM(pos.ptr(), i, py::handle(args[i]).inc_ref().ptr());
  py::dict kwargs;
  for (Py_ssize_t i = 0; kwnames != nullptr && i < PyTuple_GET_SIZE(kwnames); ++i)
    if (PyDict_SetItem(kwargs.ptr(), PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) != 0)
      throw py::error_already_set();
  return PyObject_CallFunctionObjArgs(self->slow, T, pos.ptr(), kwargs.ptr(), nullptr);
}

PyObject* tensor_function_call(PyObject* self_, PyObject* const* args, size_t nargsf,
                               PyObject* kwnames) {
  auto* self = reinterpret_cast<TensorFunction*>(self_);
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  const Py_ssize_t n = nargs + (kwnames != nullptr ? PyTuple_GET_SIZE(kwnames) : 0);
  PyObject* T;
  if (tensor_type(&T) < 0) return nullptr;
  PyTypeObject* const ndarray = py::detail::npy_api::get().PyArray_Type_;
  Py_ssize_t first = 0;  // the first tensor argument, n when there is none
  if (T != nullptr)
    for (; first < n; ++first)
      if (Py_TYPE(args[first]) != ndarray &&
          PyObject_TypeCheck(args[first], reinterpret_cast<PyTypeObject*>(T)))
        break;
  if (T == nullptr || first == n) return PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
  try {
    if (torch_seen.reader == nullptr) {
      PyObject* r = PyObject_CallOneArg(self->make_reader, T);
      if (r == nullptr) return nullptr;
      if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 4) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_TypeError, "make_reader(Tensor) must give (Tensor, to_dlpack, bfloat16, from_dlpack)");
        return nullptr;
      }
      torch_seen.reader = r;
    }
    py::object keep = py::reinterpret_borrow<py::object>(torch_seen.reader);
    PyObject* const* reader = &PyTuple_GET_ITEM(keep.ptr(), 0);
    // conv[0] is free for the callee (PY_VECTORCALL_ARGUMENTS_OFFSET); conv[1 + i]: argument i.
    constexpr Py_ssize_t kMax = 31;
    if (n > kMax) return call_slow(self, T, args, nargs, kwnames);
    py::object conv[kMax + 1];
    PyObject* ptrs[kMax + 1] = {nullptr};
    for (Py_ssize_t i = 0; i < n; ++i) {
      conv[i + 1] = i < first ? py::reinterpret_borrow<py::object>(args[i]) : argument(args[i], reader);
      if (!conv[i + 1]) return call_slow(self, T, args, nargs, kwnames);
      ptrs[i + 1] = conv[i + 1].ptr();
    }
    py::object result = py::reinterpret_steal<py::object>(PyObject_Vectorcall(
        self->fn, ptrs + 1, static_cast<size_t>(nargs) | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames));
    if (!result) throw py::error_already_set();
    result = result_of(std::move(result), reader);
    if (has_array(result.ptr())) return PyObject_CallOneArg(self->finish, result.ptr());
    return result.release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* tensor_function_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  PyObject *fn, *slow, *finish, *make_reader;
  static const char* names[] = {"fn", "slow", "finish", "make_reader", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO:TensorFunction", const_cast<char**>(names),
                                   &fn, &slow, &finish, &make_reader))
    return nullptr;
  auto* self = reinterpret_cast<TensorFunction*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  self->vectorcall = &tensor_function_call;
  self->fn = py::handle(fn).inc_ref().ptr();
  self->slow = py::handle(slow).inc_ref().ptr();
  self->finish = py::handle(finish).inc_ref().ptr();
  self->make_reader = py::handle(make_reader).inc_ref().ptr();
  return reinterpret_cast<PyObject*>(self);
}

int tensor_function_traverse(PyObject* o, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<TensorFunction*>(o);
  Py_VISIT(self->fn);
  Py_VISIT(self->slow);
  Py_VISIT(self->finish);
  Py_VISIT(self->make_reader);
  Py_VISIT(self->dict);
  Py_VISIT(Py_TYPE(o));  // instances of a heap type hold a reference to it
  return 0;
}

int tensor_function_clear(PyObject* o) {
  auto* self = reinterpret_cast<TensorFunction*>(o);
  Py_CLEAR(self->fn);
  Py_CLEAR(self->slow);
  Py_CLEAR(self->finish);
  Py_CLEAR(self->make_reader);
  Py_CLEAR(self->dict);
  return 0;
}

void tensor_function_dealloc(PyObject* o) {
  PyObject_GC_UnTrack(o);
  if (reinterpret_cast<TensorFunction*>(o)->weakrefs != nullptr) PyObject_ClearWeakRefs(o);
  tensor_function_clear(o);
  PyTypeObject* type = Py_TYPE(o);
  type->tp_free(o);
  Py_DECREF(type);  // instances of a heap type hold a reference to it
}

PyObject* tensor_function_get(PyObject* self, PyObject* obj, PyObject*) {  // binds as a method
  if (obj == nullptr || obj == Py_None) return py::handle(self).inc_ref().ptr();
  return PyMethod_New(self, obj);
}

PyObject* tensor_function_repr(PyObject* self) {
  return PyObject_Repr(reinterpret_cast<TensorFunction*>(self)->fn);
}

PyObject* tensor_function_reduce(PyObject* self, PyObject*) {  // pickled as a global by name
  return PyObject_GetAttrString(self, "__qualname__");
}

PyMethodDef tensor_function_methods[] = {
    {"__reduce__", &tensor_function_reduce, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};

PyMemberDef tensor_function_members[] = {
    {"__dictoffset__", T_PYSSIZET, offsetof(TensorFunction, dict), READONLY, nullptr},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(TensorFunction, weakrefs), READONLY, nullptr},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(TensorFunction, vectorcall), READONLY, nullptr},
    {nullptr, 0, 0, 0, nullptr}};

PyGetSetDef tensor_function_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, nullptr, nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyType_Slot tensor_function_slots[] = {
    {Py_tp_new, reinterpret_cast<void*>(&tensor_function_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(&tensor_function_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(&tensor_function_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(&tensor_function_clear)},
    {Py_tp_call, reinterpret_cast<void*>(&PyVectorcall_Call)},
    {Py_tp_descr_get, reinterpret_cast<void*>(&tensor_function_get)},
    {Py_tp_repr, reinterpret_cast<void*>(&tensor_function_repr)},
    {Py_tp_methods, tensor_function_methods},
    {Py_tp_members, tensor_function_members},
    {Py_tp_getset, tensor_function_getset},
    {Py_tp_doc, const_cast<char*>(
        "TensorFunction(fn, slow, finish, make_reader): fn taking and returning torch tensors "
        "(see mhattn._torch.accepts_tensors)")},
    {0, nullptr}};

PyType_Spec tensor_function_spec = {
    "mhattn._core.TensorFunction", sizeof(TensorFunction), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
        Py_TPFLAGS_METHOD_DESCRIPTOR,
    tensor_function_slots};

}  // namespace

void add_tensor_functions(py::module_& m) {
  // A CPython type of its own: pybind11's argument dispatch would cost more than the work.
  PyObject* type = PyType_FromSpec(&tensor_function_spec);
  if (type == nullptr) throw py::error_already_set();
  m.add_object("TensorFunction", py::reinterpret_steal<py::object>(type));
}
