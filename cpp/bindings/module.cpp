// module.cpp: the pybind11 boundary of mhattn._core, nothing else.
//
// Arrays arrive prepared by mhattn/_checks.py (float32 or uint8, shapes checked, the last axis
// contiguous where a kernel needs it). This file turns them into pointers, element strides
// and the argument structs of ops.h, releases the GIL, and calls the active kernels. It checks
// only what would otherwise touch memory wrongly: dtypes, ranks, writability.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/numpy.h>

#include <memory>
#include <vector>
#include <string>

#include "mhattn/ops.h"

namespace py = pybind11;
using namespace pybind11::literals;
using mhattn::AttnArgs;
using mhattn::MaskArg;
using mhattn::OutMap;
using mhattn::PackedB;

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw py::value_error("mhattn._core: " + what);
}

const float* in_f32(const py::array& a, const char* name, int ndim) {
  if (a.dtype().kind() != 'f' || a.itemsize() != 4)
    throw py::type_error(std::string("mhattn._core: ") + name + " must be float32");
  require(a.ndim() == ndim, std::string(name) + " must have " + std::to_string(ndim) + " dims");
  return static_cast<const float*>(a.data());
}
float* out_f32(py::array& a, const char* name, int ndim) {
  in_f32(a, name, ndim);
  return static_cast<float*>(a.mutable_data());  // raises if not writeable
}
// An input of dtype code dt (mhattn::DType: 0 float32, 1 bfloat16, 2 float16): float32, or the
// 16-bit values of a half dtype as a uint16 (or any 2-byte) view.
const void* in_typed(const py::array& a, const char* name, int ndim, int dt) {
  if (dt == 0) return in_f32(a, name, ndim);
  if ((dt != 1 && dt != 2) || a.itemsize() != 2)
    throw py::type_error(std::string("mhattn._core: ") + name + " must hold 16-bit values");
  require(a.ndim() == ndim, std::string(name) + " must have " + std::to_string(ndim) + " dims");
  return a.data();
}
// An output of dtype code dt: float32, or 16-bit values (which the C++ side reaches through a
// float* that mhattn::OutMap reinterprets by its dtype).
float* out_typed(py::array& a, const char* name, int ndim, int dt) {
  if (dt == 0) return out_f32(a, name, ndim);
  in_typed(a, name, ndim, dt);
  return static_cast<float*>(a.mutable_data());  // raises if not writeable
}
const float* opt_f32(const py::object& o, const char* name) {
  return o.is_none() ? nullptr : in_f32(o.cast<py::array>(), name, 1);
}
// Stride of axis i in elements.
int64_t st(const py::array& a, int i) { return a.strides(i) / static_cast<int64_t>(a.itemsize()); }
// The last axis is contiguous, or has nothing to stride over.
bool last_contiguous(const py::array& a) {
  return a.size() == 0 || a.shape(a.ndim() - 1) <= 1 || st(a, a.ndim() - 1) == 1;
}

// None, or (array of 4 dims broadcast to (B, Hq, L, S), keep): uint8 is a bool mask whose
// byte `keep` means "attend", float32 is added to the scores.
MaskArg to_mask(const py::object& o) {
  MaskArg m;
  if (o.is_none()) return m;
  auto t = o.cast<py::tuple>();
  auto arr = t[0].cast<py::array>();
  require(arr.ndim() == 4, "a mask must come broadcast to 4 dims");
  if (arr.dtype().kind() == 'u' && arr.itemsize() == 1) {
    m.kind = 1;
  } else {
    in_f32(arr, "mask", 4);
    m.kind = 2;
  }
  m.data = arr.data();
  m.sb = st(arr, 0);
  m.sh = st(arr, 1);
  m.sl = st(arr, 2);
  m.ss = st(arr, 3);
  m.keep = t[1].cast<uint8_t>();
  return m;
}

std::shared_ptr<PackedB> pack(const py::array& b, int dtype) {
  const void* p = in_typed(b, "b", 2, dtype);
  auto out = std::make_shared<PackedB>();
  const int64_t K = b.shape(0), N = b.shape(1), ks = st(b, 0), ns = st(b, 1);
  py::gil_scoped_release release;
  *out = mhattn::pack_b(p, static_cast<mhattn::DType>(dtype), ks, ns, K, N);
  return out;
}

void check_packed(const PackedB& w) {
  if (w.target != mhattn::kernels().name)
    throw std::runtime_error("mhattn._core: weights packed for the " + w.target +
                             " kernels, but the active kernels are " +
                             mhattn::kernels().name + "; pack them again");
}

// Where the in-projection of rows (b, l) or (l, b) writes head h0 + n / E, dim n % E, position
// pos0 + l of buf (B, Hbuf, Sbuf, E).
OutMap head_split(float* buf, int64_t B, int64_t Hbuf, int64_t Sbuf, int64_t E, int64_t h0,
                  int64_t pos0, int64_t rows_len, bool seq_major) {
  OutMap c;
  c.data = buf + h0 * Sbuf * E + pos0 * E;
  const int64_t batch_stride = Hbuf * Sbuf * E;
  if (seq_major) {  // row m = l * B + b
    c.rows_per_group = B > 0 ? B : 1;
    c.row_group_stride = E;
    c.row_stride = batch_stride;
  } else {          // row m = b * rows_len + l
    c.rows_per_group = rows_len > 0 ? rows_len : 1;
    c.row_group_stride = batch_stride;
    c.row_stride = E;
  }
  c.cols_per_group = E > 0 ? E : 1;
  c.col_group_stride = Sbuf * E;
  return c;
}

}  // namespace

void add_tensor_functions(py::module_& m);  // tensors.cpp

PYBIND11_MODULE(_core, m) {
  m.doc() = "mhattn's native kernels. Use the functions of the mhattn package, which check input.";
  m.attr("__version__") = MHATTN_VERSION;

  m.def("targets", &mhattn::supported_targets,
        "SIMD targets built in and runnable on this CPU, best last.");
  m.def("test_targets", &mhattn::test_targets,
        "targets() and the emulations (amx_emulated, on every x86-64 CPU): what the tests run.");
  m.def("amx_status", &mhattn::amx_status,
        "Why the amx target cannot run here, or '' when it can.");
  m.def("target", [] { return std::string(mhattn::kernels().name); }, "The active SIMD target.");
  m.def("set_target", [](const std::string& name) { mhattn::set_target(name); }, "name"_a,
        "Switch the active SIMD target (ValueError if this CPU cannot run it).");
  m.def("get_num_threads", &mhattn::threads_setting);
  m.def("set_num_threads", &mhattn::set_num_threads, "n"_a);
  m.def("_set_threads_here", &mhattn::set_threads_here, "n"_a);
  add_tensor_functions(m);

  py::class_<PackedB, std::shared_ptr<PackedB>>(m, "Packed",
                                                "A (K, N) matrix packed for the GEMM micro-kernel.")
      .def(py::init(&pack), "b"_a, "dtype"_a = 0)
      .def_readonly("K", &PackedB::K)
      .def_readonly("N", &PackedB::N)
      .def_property_readonly("dtype", [](const PackedB& p) { return static_cast<int>(p.dtype); })
      .def_property_readonly("layout", [](const PackedB& p) {
        return p.layout == mhattn::Layout::pairs ? "pairs" : "panels";
      })
      .def_readonly("target", &PackedB::target);

  // out (M, N) = act(a (M, K) · b + bias); out's rows may be strided, its columns contiguous.
  // activation: 0 none, 1 relu, 2 gelu, 3 gelu_tanh, 4 silu (mhattn::Activation).
  // a_dtype: a's dtype code (in_typed).
  m.def("gemm", [](py::array out, const py::array& a, const PackedB& b, const py::object& bias,
                   int activation, int a_dtype, int out_dtype) {
    float* c = out_typed(out, "out", 2, out_dtype);
    const void* x = in_typed(a, "a", 2, a_dtype);
    const float* bs = opt_f32(bias, "bias");
    require(a.shape(1) == b.K && out.shape(0) == a.shape(0) && out.shape(1) == b.N &&
                last_contiguous(out) && (!bs || py::cast<py::array>(bias).shape(0) == b.N),
            "gemm shapes");
    require(activation >= 0 && activation <= static_cast<int>(mhattn::Activation::silu),
            "gemm activation");
    check_packed(b);
    const int64_t M = a.shape(0), a_rs = st(a, 0), a_cs = st(a, 1);
    const OutMap map =
        OutMap::row_major(c, M, b.N, st(out, 0), static_cast<mhattn::DType>(out_dtype));
    const auto act = static_cast<mhattn::Activation>(activation);
    py::gil_scoped_release release;
    mhattn::gemm_packed(map, x, static_cast<mhattn::DType>(a_dtype), a_rs, a_cs, b, bs, act, M);
  }, "out"_a, "a"_a, "b"_a, "bias"_a = py::none(), "activation"_a = 0, "a_dtype"_a = 0,
     "out_dtype"_a = 0);

  // out (M, N) = act(a (M, K) · b (K, N) + bias) with b as it lies, any strides, of dtype code
  // b_dtype: the one-shot product, which never packs the whole of b (mhattn::gemm_unpacked).
  m.def("gemm_raw", [](py::array out, const py::array& a, const py::array& b,
                       const py::object& bias, int activation, int a_dtype, int b_dtype,
                       int out_dtype) {
    float* c = out_typed(out, "out", 2, out_dtype);
    const void* x = in_typed(a, "a", 2, a_dtype);
    const void* y = in_typed(b, "b", 2, b_dtype);
    const float* bs = opt_f32(bias, "bias");
    const int64_t M = a.shape(0), K = a.shape(1), N = b.shape(1);
    require(b.shape(0) == K && out.shape(0) == M && out.shape(1) == N && last_contiguous(out) &&
                (!bs || py::cast<py::array>(bias).shape(0) == N),
            "gemm_raw shapes");
    require(activation >= 0 && activation <= static_cast<int>(mhattn::Activation::silu),
            "gemm activation");
    require(a_dtype == b_dtype, "gemm_raw wants a and b of one dtype");
    const OutMap map =
        OutMap::row_major(c, M, N, st(out, 0), static_cast<mhattn::DType>(out_dtype));
    const int64_t a_rs = st(a, 0), a_cs = st(a, 1), b_ks = st(b, 0), b_ns = st(b, 1);
    py::gil_scoped_release release;
    mhattn::gemm_unpacked(map, x, static_cast<mhattn::DType>(a_dtype), a_rs, a_cs, y,
                          static_cast<mhattn::DType>(b_dtype), b_ks, b_ns, K, N, bs,
                          static_cast<mhattn::Activation>(activation), M);
  }, "out"_a, "a"_a, "b"_a, "bias"_a = py::none(), "activation"_a = 0, "a_dtype"_a = 0,
     "b_dtype"_a = 0, "out_dtype"_a = 0);

  // out (T, M, N) contiguous = a (T, M, K) · b (T, K, N), any strides (0 where broadcast), of
  // dtype codes a_dtype and b_dtype (in_typed). Each product as gemm_raw's.
  m.def("matmul", [](py::array out, const py::array& a, const py::array& b, int a_dtype,
                     int b_dtype) {
    float* c = out_f32(out, "out", 3);
    const char* x = static_cast<const char*>(in_typed(a, "a", 3, a_dtype));
    const char* y = static_cast<const char*>(in_typed(b, "b", 3, b_dtype));
    const int64_t T = a.shape(0), M = a.shape(1), K = a.shape(2), N = b.shape(2);
    require(b.shape(0) == T && b.shape(1) == K && out.shape(0) == T && out.shape(1) == M &&
                out.shape(2) == N && last_contiguous(out),
            "matmul shapes");
    require(a_dtype == b_dtype, "matmul wants a and b of one dtype");
    const int64_t as0 = st(a, 0), as1 = st(a, 1), as2 = st(a, 2);
    const int64_t bs0 = st(b, 0), bs1 = st(b, 1), bs2 = st(b, 2);
    const int64_t cs0 = st(out, 0), cs1 = st(out, 1);
    const auto adt = static_cast<mhattn::DType>(a_dtype), bdt = static_cast<mhattn::DType>(b_dtype);
    const int64_t asz = a.itemsize(), bsz = b.itemsize();
    py::gil_scoped_release release;
    for (int64_t t = 0; t < T; ++t)
      mhattn::gemm_unpacked(OutMap::row_major(c + t * cs0, M, N, cs1), x + t * as0 * asz, adt,
                            as1, as2, y + t * bs0 * bsz, bdt, bs1, bs2, K, N, nullptr,
                            mhattn::Activation::none, M);
  }, "out"_a, "a"_a, "b"_a, "a_dtype"_a = 0, "b_dtype"_a = 0);

  // dst (n) = src (n) rounded to dtype code dt (1 bfloat16, 2 float16); both contiguous, dst
  // any 2-byte dtype.
  m.def("to_half", [](py::array dst, const py::array& src, int dt) {
    const float* x = in_f32(src, "src", 1);
    require(dst.itemsize() == 2 && dst.ndim() == 1 && (dt == 1 || dt == 2) &&
                dst.shape(0) == src.shape(0) &&
                (src.shape(0) <= 1 || (st(src, 0) == 1 && st(dst, 0) == 1)),
            "to_half wants contiguous arrays of one length");
    auto* y = static_cast<uint16_t*>(dst.mutable_data());
    const int64_t n = src.shape(0);
    py::gil_scoped_release release;
    mhattn::kernels().to_half(y, x, n, static_cast<mhattn::DType>(dt));
  }, "dst"_a, "src"_a, "dtype"_a);

  // dst (n) float32 = src (n) of dtype code dt (1 bfloat16, 2 float16) widened; contiguous.
  m.def("to_float", [](py::array dst, const py::array& src, int dt) {
    float* y = out_f32(dst, "dst", 1);
    require(src.itemsize() == 2 && src.ndim() == 1 && (dt == 1 || dt == 2) &&
                dst.shape(0) == src.shape(0) &&
                (src.shape(0) <= 1 || (st(src, 0) == 1 && st(dst, 0) == 1)),
            "to_float wants contiguous arrays of one length");
    const auto* x = static_cast<const uint16_t*>(src.data());
    const int64_t n = src.shape(0);
    py::gil_scoped_release release;
    mhattn::kernels().to_float(y, x, n, static_cast<mhattn::DType>(dt));
  }, "dst"_a, "src"_a, "dtype"_a);

  // out (R, n) = softmax over the rows of x (R, n); both C-contiguous, out may be x.
  m.def("softmax", [](py::array out, const py::array& x) {
    float* y = out_f32(out, "out", 2);
    const float* in = in_f32(x, "x", 2);
    const int64_t R = x.shape(0), n = x.shape(1);
    require(out.shape(0) == R && out.shape(1) == n &&
                (R <= 1 || (st(x, 0) == n && st(out, 0) == n)) && (n <= 1 || (st(x, 1) == 1 && st(out, 1) == 1)),
            "softmax wants C-contiguous arrays of one shape");
    py::gil_scoped_release release;
    mhattn::kernels().softmax(y, in, R, n, n);
  }, "out"_a, "x"_a);

  // out (R, n) = LayerNorm (rms: RMSNorm) of each row of x + residual (R, n; residual may be
  // None) times weight (n), plus bias (n; may be None); all C-contiguous, out may be x.
  m.def("norm", [](py::array out, const py::array& x, const py::object& residual,
                   const py::array& weight, const py::object& bias, float eps, bool rms) {
    float* y = out_f32(out, "out", 2);
    const float* in = in_f32(x, "x", 2);
    const float* r = residual.is_none() ? nullptr : in_f32(residual.cast<py::array>(), "residual", 2);
    const float* w = in_f32(weight, "weight", 1);
    const float* b = opt_f32(bias, "bias");
    const int64_t R = x.shape(0), n = x.shape(1);
    auto rows_like_x = [&](const py::array& a) {
      return a.shape(0) == R && a.shape(1) == n && (R <= 1 || st(a, 0) == n) &&
             (n <= 1 || st(a, 1) == 1);
    };
    require(rows_like_x(x) && rows_like_x(out) &&
                (residual.is_none() || rows_like_x(residual.cast<py::array>())) &&
                weight.shape(0) == n && (bias.is_none() || bias.cast<py::array>().shape(0) == n),
            "norm wants C-contiguous x, residual and out of one shape, weight and bias (n)");
    py::gil_scoped_release release;
    mhattn::kernels().norm(y, in, r, w, b, R, n, eps, rms);
  }, "out"_a, "x"_a, "residual"_a, "weight"_a, "bias"_a, "eps"_a, "rms"_a);

  // out (B, Hq, L, Ev) = attention(q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev)).
  // k and v of dtype code kv_dtype (in_typed); q, out and weights float32.
  m.def("attention", [](py::array out, const py::object& weights, const py::array& q,
                        const py::array& k, const py::array& v, const py::object& mask0,
                        const py::object& mask1, bool causal, int64_t diag_offset,
                        int64_t window, float scale, float softcap, int kv_dtype) {
    AttnArgs a{};
    a.out = out_f32(out, "out", 4);
    a.q = in_f32(q, "q", 4);
    a.k = in_typed(k, "k", 4, kv_dtype);
    a.v = in_typed(v, "v", 4, kv_dtype);
    a.kv_dt = static_cast<mhattn::DType>(kv_dtype);
    a.B = q.shape(0);
    a.Hq = q.shape(1);
    a.L = q.shape(2);
    a.E = q.shape(3);
    a.Hkv = k.shape(1);
    a.S = k.shape(2);
    a.Ev = v.shape(3);
    require(k.shape(0) == a.B && v.shape(0) == a.B && k.shape(3) == a.E && v.shape(1) == a.Hkv &&
                v.shape(2) == a.S && a.Hkv > 0 && a.Hq % a.Hkv == 0 && out.shape(0) == a.B &&
                out.shape(1) == a.Hq && out.shape(2) == a.L && out.shape(3) == a.Ev,
            "attention shapes");
    require(last_contiguous(q) && last_contiguous(k) && last_contiguous(v) && last_contiguous(out),
            "attention wants the last axis contiguous");
    a.out_sb = st(out, 0); a.out_sh = st(out, 1); a.out_sl = st(out, 2);
    a.q_sb = st(q, 0); a.q_sh = st(q, 1); a.q_sl = st(q, 2);
    a.k_sb = st(k, 0); a.k_sh = st(k, 1); a.k_ss = st(k, 2);
    a.v_sb = st(v, 0); a.v_sh = st(v, 1); a.v_ss = st(v, 2);
    if (!weights.is_none()) {
      auto w = weights.cast<py::array>();
      a.weights = out_f32(w, "weights", 4);
      require(w.shape(0) == a.B && w.shape(1) == a.Hq && w.shape(2) == a.L && w.shape(3) == a.S &&
                  w.flags() & py::array::c_style,
              "weights must be C-contiguous (B, Hq, L, S)");
    }
    a.masks[0] = to_mask(mask0);
    a.masks[1] = to_mask(mask1);
    a.scale = scale;
    a.causal = causal;
    a.diag_offset = diag_offset;
    a.window = window;
    a.softcap = softcap;
    py::gil_scoped_release release;
    mhattn::attention(a);
  }, "out"_a, "weights"_a, "q"_a, "k"_a, "v"_a, "mask0"_a, "mask1"_a, "causal"_a,
     "diag_offset"_a, "window"_a, "scale"_a, "softcap"_a = 0.0f, "kv_dtype"_a = 0);

  // The multi-head attention forward (mha.cpp). Rows of xq are (b, l), or (l, b) when
  // seq_major; rows of xk, xv likewise over the new_keys new key positions. The projections
  // write Q into qbuf (B, Hq, L, E) and K, V into kvbuf (B, 2 Hkv, Sbuf, E) at positions
  // kv_pos .. kv_pos + new_keys; attention reads keys 0 .. kv_pos + new_keys.
  m.def("mha_forward", [](py::array out, py::array concat, const py::object& weights,
                          const py::object& avg_weights, const py::array& xq, const py::array& xk,
                          const py::array& xv, const PackedB& wq, const PackedB& wk,
                          const PackedB& wv, const PackedB& wo, const py::object& bq,
                          const py::object& bk, const py::object& bv, const py::object& bo,
                          py::array qbuf, py::array kvbuf, int64_t kv_pos, int64_t new_keys,
                          bool seq_major, const py::object& mask0, const py::object& mask1,
                          bool causal, int64_t diag_offset, float scale, int x_dtype,
                          int kv_dtype) {
    for (const PackedB* w : {&wq, &wk, &wv, &wo}) check_packed(*w);
    mhattn::MhaArgs a{};
    float* q = out_f32(qbuf, "qbuf", 4);
    in_typed(kvbuf, "kvbuf", 4, kv_dtype);
    void* kv = kvbuf.mutable_data();  // raises if not writeable
    require((qbuf.flags() & py::array::c_style) && (kvbuf.flags() & py::array::c_style) &&
                (concat.flags() & py::array::c_style) && (out.flags() & py::array::c_style),
            "mha buffers must be C-contiguous");
    const int64_t B = qbuf.shape(0), Hq = qbuf.shape(1), L = qbuf.shape(2), E = qbuf.shape(3);
    const int64_t Hkv = kvbuf.shape(1) / 2, Sbuf = kvbuf.shape(2), S = kv_pos + new_keys;
    const int64_t D = Hq * E;
    require(kvbuf.shape(0) == B && kvbuf.shape(3) == E && kv_pos >= 0 && S <= Sbuf &&
                wq.N == D && wk.N == Hkv * E && wv.N == Hkv * E && wo.K == D &&
                xq.shape(0) == B * L && xk.shape(0) == B * new_keys && xv.shape(0) == B * new_keys &&
                xq.shape(1) == wq.K && xk.shape(1) == wk.K && xv.shape(1) == wv.K &&
                concat.shape(0) == B * L && concat.shape(1) == D && out.shape(0) == B * L &&
                out.shape(1) == wo.N,
            "mha shapes");
    // A 16-bit cache: K and V are projected into a float32 stage, then rounded into place.
    std::vector<float> stage;
    float* kv_dst = static_cast<float*>(kv);
    int64_t kv_dst_len = Sbuf, kv_dst_pos = kv_pos;
    if (kv_dtype != 0) {
      stage.resize(static_cast<size_t>(B * 2 * Hkv * new_keys * E));
      kv_dst = stage.data(), kv_dst_len = new_keys, kv_dst_pos = 0;
      a.stage = {stage.data(), static_cast<uint16_t*>(kv), static_cast<mhattn::DType>(kv_dtype),
                 B, 2 * Hkv, new_keys, E, Sbuf, kv_pos};
    }
    const py::array* xs[3] = {&xq, &xk, &xv};
    const PackedB* ws[3] = {&wq, &wk, &wv};
    const py::object* bs[3] = {&bq, &bk, &bv};
    for (int i = 0; i < 3; ++i) {
      mhattn::Projection& p = a.proj[i];
      p.x = in_typed(*xs[i], "x", 2, x_dtype);
      p.x_dt = static_cast<mhattn::DType>(x_dtype);
      require(last_contiguous(*xs[i]), "projection inputs want contiguous rows");
      p.x_rs = st(*xs[i], 0);
      p.rows = xs[i]->shape(0);
      p.w = ws[i];
      p.bias = opt_f32(*bs[i], "bias");
      p.dst = i == 0 ? head_split(q, B, Hq, L, E, 0, 0, L, seq_major)
                     : head_split(kv_dst, B, 2 * Hkv, kv_dst_len, E, (i - 1) * Hkv, kv_dst_pos,
                                  new_keys, seq_major);
    }
    AttnArgs& t = a.attn;
    t.out = out_f32(concat, "concat", 2);
    t.q = q;
    t.q_sb = Hq * L * E; t.q_sh = L * E; t.q_sl = E;
    t.k = kv;
    t.v = static_cast<char*>(kv) + Hkv * Sbuf * E * kvbuf.itemsize();
    t.kv_dt = static_cast<mhattn::DType>(kv_dtype);
    t.k_sb = t.v_sb = 2 * Hkv * Sbuf * E;
    t.k_sh = t.v_sh = Sbuf * E;
    t.k_ss = t.v_ss = E;
    t.out_sh = E;
    t.out_sb = seq_major ? D : L * D;
    t.out_sl = seq_major ? B * D : D;
    t.B = B; t.Hq = Hq; t.Hkv = Hkv; t.L = L; t.S = S; t.E = E; t.Ev = E;
    t.masks[0] = to_mask(mask0);
    t.masks[1] = to_mask(mask1);
    t.scale = scale;
    t.causal = causal;
    t.diag_offset = diag_offset;
    t.window = 0;
    t.softcap = 0.0f;
    if (!weights.is_none()) {
      auto w = weights.cast<py::array>();
      t.weights = out_f32(w, "weights", 4);
      require(w.shape(0) == B && w.shape(1) == Hq && w.shape(2) == L && w.shape(3) == S &&
                  (w.flags() & py::array::c_style), "weights must be C-contiguous (B, Hq, L, S)");
      if (!avg_weights.is_none()) {
        auto aw = avg_weights.cast<py::array>();
        a.avg_weights = out_f32(aw, "avg_weights", 3);
        require(aw.shape(0) == B && aw.shape(1) == L && aw.shape(2) == S &&
                    (aw.flags() & py::array::c_style), "avg_weights must be C-contiguous (B, L, S)");
      }
    }
    a.out_proj.x = t.out;
    a.out_proj.x_dt = mhattn::DType::f32;
    a.out_proj.x_rs = D;
    a.out_proj.rows = B * L;
    a.out_proj.w = &wo;
    a.out_proj.bias = opt_f32(bo, "out bias");
    a.out_proj.dst = OutMap::row_major(out_f32(out, "out", 2), B * L, wo.N, wo.N);
    py::gil_scoped_release release;
    mhattn::mha_forward(a);
  });

  m.def("_read_memory", [](const py::array& x) {
    const float* in = in_f32(x, "x", 1);
    require(x.shape(0) <= 1 || st(x, 0) == 1, "x must be contiguous");
    const int64_t n = x.shape(0);
    py::gil_scoped_release release;
    return mhattn::read_memory(in, n);
  }, "x"_a, "Sum of x read with mhattn's threads (the benchmark times it for bandwidth).");

  m.def("_peak_flops", [](int64_t iters, bool bf16) {
    py::gil_scoped_release release;
    return mhattn::kernels().peak_flops(iters, bf16);
  }, "iters"_a, "bf16"_a = false,
     "Flops of iters rounds of 16 FMA chains a thread (with bf16: four tdpbf16ps where the target "
     "has AMX, else vdpbf16ps where it has them): the benchmark times it for the arithmetic peak.");

  m.def("_vexp", [](const py::array& x, bool softmax) {
    const float* in = in_f32(x, "x", 1);
    require(x.shape(0) <= 1 || st(x, 0) == 1, "x must be contiguous");
    py::array_t<float> out(x.shape(0));
    mhattn::kernels().vexp(out.mutable_data(), in, x.shape(0), softmax);
    return out;
  }, "x"_a, "softmax"_a = false,
     "exp of each element through the kernels' vector exp, or with softmax=True the softmax's\n"
     "(for x <= 0); for testing their accuracy.");
}
