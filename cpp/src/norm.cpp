// norm.cpp: LayerNorm and RMSNorm over the rows of a matrix, the residual added first, for
// every target: what a transformer block does between its products (BERT's post-norm
// LayerNorm(h + attention(h)), a pre-norm block's norm of its residual stream).
//
// Shapes: out, x, r (rows, n), C-contiguous; w, b (n). For each row, with s = x + r (r may
// be null: s = x):
//   LayerNorm: out = (s - mean(s)) / sqrt(mean((s - mean(s))²) + eps) · w + b   (b may be null)
//   RMSNorm:   out = s / sqrt(mean(s²) + eps) · w
// Three passes over the row, which stays in L1: (1) s into out, and its sum (RMSNorm: sum of
// squares); (2) LayerNorm's variance about the mean, two-pass as NumPy's; (3) out scaled and
// shifted. out may equal x or r. mhattn.reference.layer_norm and rms_norm are the simple
// version, in float64, that the tests hold this to.
#include <cmath>

#include "mhattn/ops.h"
#include "mhattn/simd.h"

namespace mhattn {
namespace MHATTN_TARGET {

namespace {

// out[j] = x[j] + r[j] (or x[j]); returns the sum of out[j] (or of out[j]² when `squares`).
float add_and_sum(float* out, const float* x, const float* r, int64_t n, bool squares) {
  V acc = vzero();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V s = r ? vadd(vload(x + j), vload(r + j)) : vload(x + j);
    vstore(out + j, s);
    acc = squares ? vfma(s, s, acc) : vadd(acc, s);
  }
  float sum = vhsum(acc);
  for (; j < n; ++j) {
    const float s = r ? x[j] + r[j] : x[j];
    out[j] = s;
    sum += squares ? s * s : s;
  }
  return sum;
}

// sum of (s[j] - mean)².
float squares_about(const float* s, int64_t n, float mean) {
  const V m = vset1(mean);
  V acc = vzero();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V d = vsub(vload(s + j), m);
    acc = vfma(d, d, acc);
  }
  float sum = vhsum(acc);
  for (; j < n; ++j) sum += (s[j] - mean) * (s[j] - mean);
  return sum;
}

// s[j] = (s[j] - shift) · inv · w[j] + b[j] (b may be null).
void scale_shift(float* s, int64_t n, float shift, float inv, const float* w, const float* b) {
  const V vs = vset1(shift), vi = vset1(inv);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V y = vmul(vmul(vsub(vload(s + j), vs), vi), vload(w + j));
    vstore(s + j, b ? vadd(y, vload(b + j)) : y);
  }
  for (; j < n; ++j) s[j] = (s[j] - shift) * inv * w[j] + (b ? b[j] : 0.0f);
}

}  // namespace

void norm(float* out, const float* x, const float* r, const float* w, const float* b,
          int64_t rows, int64_t n, float eps, bool rms) {
  const int nt = num_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows > 1 && rows * n > (1 << 15))
  for (int64_t i = 0; i < rows; ++i) {
    float* s = out + i * n;
    const float total = add_and_sum(s, x + i * n, r ? r + i * n : nullptr, n, rms);  // (1)
    if (rms) {
      scale_shift(s, n, 0.0f, 1.0f / std::sqrt(total / n + eps), w, nullptr);       // (3)
    } else {
      const float mean = total / n;
      const float var = squares_about(s, n, mean) / n;                                // (2)
      scale_shift(s, n, mean, 1.0f / std::sqrt(var + eps), w, b);                     // (3)
    }
  }
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
