// activation.h: the element-wise activations that the GEMM can apply as it stores C, so that a
// feed-forward layer's up-projection and its activation are one pass over memory, not two.
// Compiled per target with the kernels (it builds on simd.h).
//
//   relu(x)      = max(x, 0)
//   gelu(x)      = x Φ(x) = x · erfc(-x / √2) / 2          (BERT, the exact form)
//   gelu_tanh(x) = x (1 + tanh(u)) / 2 = x · σ(2u),  u = √(2/π) (x + 0.044715 x³)   (GPT-2)
//   silu(x)      = x · σ(x)                                 (Llama's gate)
//
// Every one keeps NaN as NaN and takes its limit at ±inf: gelu(-inf) = -0, gelu(inf) = inf.
#pragma once

#include <cfloat>
#include <cmath>

#include "mhattn/ops.h"
#include "mhattn/simd.h"

namespace mhattn {
namespace MHATTN_TARGET {

// erfc(z) for z >= 0 with a relative error below 1.2e-7 (before float rounding): the
// Chebyshev-fitted form erfc(z) = t · exp(-z² + P(t)), t = 1 / (1 + z/2), from Numerical
// Recipes (erfcc). Relative accuracy matters: gelu's negative tail is x · erfc(|x|/√2) / 2.
inline V verfc_nonneg(V z) {
  const V t = vdiv(vset1(1.0f), vfma(z, vset1(0.5f), vset1(1.0f)));
  V p = vset1(0.17087277f);
  p = vfma(p, t, vset1(-0.82215223f));
  p = vfma(p, t, vset1(1.48851587f));
  p = vfma(p, t, vset1(-1.13520398f));
  p = vfma(p, t, vset1(0.27886807f));
  p = vfma(p, t, vset1(-0.18628806f));
  p = vfma(p, t, vset1(0.09678418f));
  p = vfma(p, t, vset1(0.37409196f));
  p = vfma(p, t, vset1(1.00002368f));
  p = vfma(p, t, vset1(-1.26551223f));
  return vmul(t, vexp(vfma(vsub(vzero(), z), z, p)));
}

// x clamped to [-FLT_MAX, inf]: x · (a factor that is 0 at -inf) gives -0 there, not NaN.
inline V vfinite_below(V x) { return vclamp(x, vset1(-FLT_MAX), vset1(INFINITY)); }

inline V vgelu(V x) {
  const V half_e = vmul(vset1(0.5f), verfc_nonneg(vmul(vabs(x), vset1(0.70710678118654752f))));
  const V phi = vselect_nonneg(x, vsub(vset1(1.0f), half_e), half_e);  // Φ(x)
  return vmul(vfinite_below(x), phi);
}

// σ(y) = 1 / (1 + e^-y), computed from e = e^-|y| so that nothing overflows: σ(y) = 1 / (1 + e)
// for y >= 0 and e / (1 + e) for y < 0.
inline V vsigmoid(V y) {
  const V e = vexp(vsub(vzero(), vabs(y)));
  return vdiv(vselect_nonneg(y, vset1(1.0f), e), vadd(vset1(1.0f), e));
}

inline V vgelu_tanh(V x) {  // 2u = 2√(2/π) (x + 0.044715 x³)
  const V two_u = vmul(vset1(1.5957691216057308f), vfma(vmul(vset1(0.044715f), x), vmul(x, x), x));
  return vmul(vfinite_below(x), vsigmoid(two_u));
}

inline V vsilu(V x) { return vmul(vfinite_below(x), vsigmoid(x)); }

// max(0, x) with x second, so NaN passes (see vclamp in simd.h).
inline V vrelu(V x) { return vmax(vzero(), x); }

inline V vactivate(Activation act, V x) {
  switch (act) {
    case Activation::relu: return vrelu(x);
    case Activation::gelu: return vgelu(x);
    case Activation::gelu_tanh: return vgelu_tanh(x);
    case Activation::silu: return vsilu(x);
    case Activation::none: break;
  }
  return x;
}

// The scalar form, through the vector code so that both give the same bits.
inline float activate1(Activation act, float x) {
  float buf[W];
  vstore(buf, vactivate(act, vset1(x)));
  return buf[0];
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
