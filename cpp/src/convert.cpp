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

#if defined(MHATTN_SIMD_AVX512)
// W values at once, as bf16_bits does them.
void store_bf16(uint16_t* dst, V v) {
  const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
  const __m512i half_ulp = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, half_ulp), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
}
void store_f16(uint16_t* dst, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(MHATTN_SIMD_AVX2)
void store_bf16(uint16_t* dst, V v) {
  const __m256i u = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
  const __m256i half_ulp = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, half_ulp), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, quiet, nan);
  // 8 words of 32 bits to 16: pack within each 128-bit lane, then bring the halves together
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
}
void store_f16(uint16_t* dst, V v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif  // the portable path rounds one value at a time

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
    if (bf) store_bf16(dst + i, vload(src + i));
    else store_f16(dst + i, vload(src + i));
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
