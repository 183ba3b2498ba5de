// vec.h: small primitives over a row of floats, built on simd.h: max, exp-and-sum, scale.
// Each has the same shape: a vector main loop, then a scalar tail for n not a multiple of W.
// Used by softmax.cpp and attention.cpp; compiled per target like them.
#pragma once

#include <cmath>

#include "mhattn/simd.h"

namespace mhattn {
namespace MHATTN_TARGET {

// max_j x[j]; -inf for n = 0.
inline float vec_max(const float* x, int64_t n) {
  int64_t j = 0;
  float m = -INFINITY;
  if (n >= W) {
    V acc = vload(x);
    for (j = W; j + W <= n; j += W) acc = vmax(acc, vload(x + j));
    m = vhmax(acc);
  }
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// y[j] = exp(x[j] - shift), x[j] - shift <= 0 (the softmax's exp, vexp_softmax); returns the
// sum of the y. y may equal x.
inline float vec_exp_sum(float* y, const float* x, int64_t n, float shift) {
  const V s = vset1(shift);
  V acc = vzero();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V e = vexp_softmax(vsub(vload(x + j), s));
    vstore(y + j, e);
    acc = vadd(acc, e);
  }
  float sum = vhsum(acc);
  for (; j < n; ++j) {
    y[j] = expf(x[j] - shift);
    sum += y[j];
  }
  return sum;
}

// 1 / x, or 0 for x = 0: how a row with nothing to normalise by (every key masked) comes out
// as zeros rather than NaN. NaN stays NaN.
inline float recip_or_zero(float x) { return x == 0.0f ? 0.0f : 1.0f / x; }

// x[j] = c · tanh(x[j] / c), with tanh(t) = 1 - 2 / (exp(2t) + 1): exact limits ±c at ±inf
// (vexp gives 0 below -87 and saturates above 88), NaN stays NaN. Near t = 0 the subtraction
// loses the low bits: the error is up to about c · 1.2e-7 absolute, which moves a softmax
// weight by as much relative.
inline void vec_softcap(float* x, int64_t n, float c) {
  const V two_over_c = vset1(2.0f / c), one = vset1(1.0f), two = vset1(2.0f), vc = vset1(c);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V e = vexp(vmul(vload(x + j), two_over_c));
    vstore(x + j, vmul(vc, vsub(one, vdiv(two, vadd(e, one)))));
  }
  for (; j < n; ++j) x[j] = c * tanhf(x[j] / c);
}

// y[j] = a * x[j]. y may equal x.
inline void vec_scale(float* y, const float* x, int64_t n, float a) {
  const V va = vset1(a);
  int64_t j = 0;
  for (; j + W <= n; j += W) vstore(y + j, vmul(va, vload(x + j)));
  for (; j < n; ++j) y[j] = a * x[j];
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
