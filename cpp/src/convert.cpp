// convert.cpp: float32 rounded to bfloat16 or float16, for every target: how a result computed
// in float32 gets the dtype of its input; and bfloat16 or float16 widened to float32 (exact).
// Round to nearest, ties to even, as NumPy, ml_dtypes and torch round; NaN stays NaN; float16
// overflows to ±inf from 65520 on and keeps its subnormals. One pass, vectorised and spread over
// the threads (NumPy's own float16 cast is scalar: a 128 × 2304 float16 result took longer to
// round there than to compute).
#include <algorithm>
#include <cstring>

#include "mhattn/ops.h"
#include "mhattn/simd.h"

namespace mhattn {
namespace MHATTN_TARGET {
namespace {

uint16_t f16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (a >= 0x38800000u) {  // a normal float16 (>= 2^-14): rebias 127 -> 15, round 13 bits off
    const uint32_t r = a - 0x38000000u;
    return static_cast<uint16_t>(sign | (r + 0xfffu + ((r >> 13) & 1u)) >> 13);
  }
  // A subnormal (units of 2^-24) or zero: adding 0.5 leaves the float with an ulp of 2^-24, so
  // the addition itself rounds to the unit, and the low bits count them.
  float f;
  std::memcpy(&f, &a, sizeof f);
  f += 0.5f;
  uint32_t t;
  std::memcpy(&t, &f, sizeof t);
  return static_cast<uint16_t>(sign | (t - 0x3f000000u));
}


}  // namespace

// dst[i] = src[i] (bf16 or f16) widened to float32, i < n.
void to_float(float* dst, const uint16_t* src, int64_t n, DType dt) {
  const int nt = num_threads();
  const int64_t chunk = 1 << 14;
  const bool bf = dt == DType::bf16;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && n > (1 << 17))
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t c1 = std::min(n, c0 + chunk);
    int64_t i = c0;
    for (; i + W <= c1; i += W)
      vstore(dst + i, bf ? vload_f32(reinterpret_cast<const bf16_t*>(src + i))
                         : vload_f32(reinterpret_cast<const f16_t*>(src + i)));
    for (; i < c1; ++i) dst[i] = bf ? to_f32(bf16_t{src[i]}) : to_f32(f16_t{src[i]});
  }
}

// dst[i] = src[i] rounded to dt (bf16 or f16), i < n, on the calling thread.
void round_to_half(uint16_t* dst, const float* src, int64_t n, DType dt) {
  const bool bf = dt == DType::bf16;
  int64_t i = 0;
#if defined(MHATTN_SIMD_AVX512) || defined(MHATTN_SIMD_AVX2)
  for (; i + W <= n; i += W) {
    if (bf) vstore_bf16(dst + i, vload(src + i));
    else vstore_f16(dst + i, vload(src + i));
  }
#endif
  for (; i < n; ++i) dst[i] = bf ? bf16_bits(src[i]) : f16_bits(src[i]);
}

// The same, spread over the threads.
void to_half(uint16_t* dst, const float* src, int64_t n, DType dt) {
  const int nt = num_threads();
  const int64_t chunk = 1 << 14;  // values per task
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && n > (1 << 17))
  for (int64_t c0 = 0; c0 < n; c0 += chunk)
    round_to_half(dst + c0, src + c0, std::min(n, c0 + chunk) - c0, dt);
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
