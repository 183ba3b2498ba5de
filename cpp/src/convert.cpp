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
  for (; i + W <= n; i += W) {
    if (bf) vstore_bf16(dst + i, vload(src + i));
    else vstore_f16(dst + i, vload(src + i));
  }
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
