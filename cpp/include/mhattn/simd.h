// simd.h: the handful of vector operations the kernels are written against, once per target.
//
// Included only by the kernel sources (gemm.cpp, softmax.cpp, attention.cpp), which CMake
// compiles once per target with MHATTN_TARGET set to the target's name. Everything here lives
// in namespace mhattn::<target>, so the AVX2 build of an inline function can never be picked
// by the linker for the portable build.
//
// A target provides: V (a vector of W floats), vload/vstore (unaligned), vset1, vzero, vadd,
// vsub, vmul, vdiv, vfma (a*b + c), vmax, vmin, vclamp (keeps NaN), vabs, vselect_nonneg
// (x >= 0 ? a : b, lane by lane), vhsum, vhmax, vtranspose (a W × W block held in W vectors),
// vexp and vexp_softmax (exp of x <= 0, as the softmax needs it), vload_f32 (W float32, bfloat16
// or float16 values as float32) and to_f32 (one of them); and with_rows, for the kernels'
// register tiles, and round_up, for their padded sizes.
// Not here: anything that depends on a kernel's shapes; that lives in the kernel's own file.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mhattn/ops.h"  // bf16_t, f16_t

#ifndef MHATTN_TARGET
#error "simd.h is for kernel sources compiled with MHATTN_TARGET set (see CMakeLists.txt)"
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define MHATTN_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MHATTN_SIMD_AVX2 1
#endif

namespace mhattn {
namespace MHATTN_TARGET {

// One float32, bfloat16 or float16 value as float32 (exact: both widen).
inline float to_f32(float x) { return x; }
inline float to_f32(bf16_t x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_f32(f16_t x) {  // binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16, exp = (x.bits >> 10) & 0x1fu;
  uint32_t man = x.bits & 0x3ffu, u;
  if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;  // inf, NaN
  } else if (exp != 0) {
    u = sign | (exp + 112) << 23 | man << 13;  // rebias 15 -> 127
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: man · 2^-24; normalise it
    uint32_t e = 113;
    while (!(man & 0x400u)) man <<= 1, --e;
    u = sign | e << 23 | (man & 0x3ffu) << 13;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// x rounded to bfloat16 (its 16 bits), to nearest with ties to even; NaN stays a (quiet) NaN.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// x rounded to float16 (its 16 bits), to nearest with ties to even: overflows to ±inf from
// 65520 on, keeps the subnormals; NaN stays a (quiet) NaN.
inline uint16_t f16_bits(float x) {
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

using V = __m512;
constexpr int W = 16;
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V vload_f32(const float* p) { return vload(p); }
inline V vload_f32(const bf16_t* p) {  // widen to 32 bits, then the 16 bits become the top half
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline V vload_f32(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vzero() { return _mm512_setzero_ps(); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vdiv(V a, V b) { return _mm512_div_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline V vmin(V a, V b) { return _mm512_min_ps(a, b); }
// As with AVX2, max/min return their second operand when either is NaN: x goes second.
inline V vclamp(V x, V lo, V hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, x)); }
inline V vabs(V x) { return _mm512_abs_ps(x); }
inline V vselect_nonneg(V x, V a, V b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
}
inline float vhsum(V v) { return _mm512_reduce_add_ps(v); }
inline float vhmax(V v) { return _mm512_reduce_max_ps(v); }
// 2^(j/16) · (1 + q), j the low four bits of y (both exps below leave k there): vpermps picks
// 2^(j/16) from a table of 16 held in one register.
inline V exp2_sixteenths_times(V y, V q) {
  const V table = _mm512_setr_ps(
      1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f, 1.1892070770263672f,
      1.2418577671051025f, 1.2968395948410034f, 1.3542555570602417f, 1.4142135381698608f,
      1.4768261909484863f, 1.5422108173370361f, 1.610490322113037f, 1.6817928552627563f,
      1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f);
  const V t = _mm512_permutexvar_ps(_mm512_castps_si512(y), table);
  return _mm512_fmadd_ps(t, q, t);
}
// exp(x), with the same contract as the other targets' vexp below (within 2 ulp on
// [-87.3, 88], 0 below, exp(88) above, NaN stays NaN), in 12 instructions rather than 20:
// exp(x) = 2^floor(k/16) · 2^(j/16) · exp(r), with k = round(x · 16/ln2), j = k mod 16 and
// r = x - k · ln2/16 in [-ln2/32, ln2/32]. Adding 1.5 · 2^19, whose float spacing is 1/16, rounds
// x/ln2 to k/16 and leaves k in the low bits of the sum, where exp2_sixteenths_times reads j;
// vscalefps scales by 2^floor of k/16. On so short an interval exp(r) - 1 = r + r²/2 + r³/6 to
// within 1e-8. ln2 is split as for the other targets (0.693359375 is exact in float, and
// k/16 · 0.693359375 too).
inline V vexp(V x) {
  // Lanes below -87.33654 become 0 at the end; those with NaN keep it (the unordered compare).
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const V xc = _mm512_min_ps(_mm512_set1_ps(88.0f), x);  // NaN passes through min's 2nd operand
  const V shift = _mm512_set1_ps(786432.0f);               // 1.5 · 2^19
  const V y = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), shift);
  const V k16 = _mm512_sub_ps(y, shift);  // k/16, exactly
  V r = _mm512_fmadd_ps(k16, _mm512_set1_ps(-0.693359375f), xc);
  r = _mm512_fmadd_ps(k16, _mm512_set1_ps(2.12194440e-4f), r);
  const V poly = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6), _mm512_set1_ps(0.5f));
  const V q = _mm512_fmadd_ps(_mm512_mul_ps(r, r), poly, r);  // exp(r) - 1
  return _mm512_maskz_scalef_ps(keep, exp2_sixteenths_times(y, q), k16);
}
// exp(x) for the softmax, whose x = s - max is at most 0 (or -inf, or NaN): within 2 ulp of
// 2^x2, where x2 = x · log2(e) in float. Its two roundings (of log2(e), and of the product)
// move the result by up to |x| · 7.5e-8 relative: about 1 ulp more at x = -1, and more only
// where e^x, the weight of the term, is that much smaller. The scores themselves carry a
// rounding of that order. Bought with it: 2^x2 = 2^(k/16) · 2^r, r = x2 - k/16 an exact
// subtraction, and a max instead of vexp's clamp and compare. 5 of its 11 instructions are
// multiplies or FMAs (vexp: 7 of 12, and the compare). On Zen 4 the others (adds, max, scalef)
// ran beside a stream of FMAs at no cost in a microbenchmark, and a compare or a multiply did
// not; pv_lanes runs this beside its FMAs. x2 below -152 becomes -152, whose 2^x2 rounds to 0:
// so exp(-inf) = 0, with no NaN from -inf - -inf. Below 2^-126, denormals. NaN stays NaN (max
// returns its second operand).
inline V vexp_softmax(V x) {
  const V x2 = _mm512_max_ps(_mm512_set1_ps(-152.0f),
                             _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)));
  const V shift = _mm512_set1_ps(786432.0f);  // 1.5 · 2^19, as in vexp
  const V y = _mm512_add_ps(x2, shift);
  const V k16 = _mm512_sub_ps(y, shift);  // k/16, exactly
  const V r = _mm512_sub_ps(x2, k16);     // exactly, in [-1/32, 1/32]
  // 2^r - 1 = r·ln2 + (r·ln2)²/2 + (r·ln2)³/6 to within 1e-8
  V poly = _mm512_fmadd_ps(r, _mm512_set1_ps(0.0555041086648216f),
                           _mm512_set1_ps(0.2402265069591007f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.6931471805599453f));
  const V q = _mm512_mul_ps(poly, r);
  return _mm512_scalef_ps(exp2_sixteenths_times(y, q), k16);
}
// r[i][j] becomes r[j][i], 16 × 16: transpose the 4 × 4 blocks inside each 128-bit lane
// (unpack, shuffle), then move the lanes into place (two rounds of shuffle_f32x4).
inline void vtranspose(V r[16]) {
  V t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + q], lane L: column 4L + q of rows 4i .. 4i + 3
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    const V x0 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x88);
    const V x1 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xDD);
    const V y0 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0x88);
    const V y1 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0xDD);
    r[q] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    r[4 + q] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    r[8 + q] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    r[12 + q] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}

// W values rounded to bfloat16 and float16 (to nearest even, NaN kept), as bf16_bits and
// f16_bits round one.
inline void vstore_bf16(uint16_t* dst, V v) {
  const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
  const __m512i half_ulp = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, half_ulp), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
}
inline void vstore_f16(uint16_t* dst, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#elif defined(MHATTN_SIMD_AVX2)

using V = __m256;
constexpr int W = 8;
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V vload_f32(const float* p) { return vload(p); }
inline V vload_f32(const bf16_t* p) {  // widen to 32 bits, then the 16 bits become the top half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline V vload_f32(const f16_t* p) {  // F16C
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline V vset1(float x) { return _mm256_set1_ps(x); }
inline V vzero() { return _mm256_setzero_ps(); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vdiv(V a, V b) { return _mm256_div_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline V vmin(V a, V b) { return _mm256_min_ps(a, b); }
// max/min return their second operand when either is NaN, so x goes second: NaN survives.
inline V vclamp(V x, V lo, V hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, x)); }
inline V vabs(V x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
inline V vselect_nonneg(V x, V a, V b) {
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
}
inline float vhsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vhmax(V v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// n is integer-valued and in [-126, 127]: returns 2^n.
inline V vpow2i(V n) {
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline V vround(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// r[i][j] becomes r[j][i]: interleave pairs of rows, then pairs of pairs, then swap halves.
inline void vtranspose(V r[8]) {
  V t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    // t[2i]: r0[0] r1[0] r0[1] r1[1] | [4], [5]; t[2i + 1]: r0[2] r1[2] r0[3] r1[3] | [6], [7]
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {  // u[i] holds column i (low half) and i + 4 (high) of rows 0-3
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
// Lanes where x < lo (false for NaN) become 0.
inline V vzero_below(V x, V lo, V r) {
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), r);
}

// exp(x) for the softmax, whose x is at most 0 (or -inf, or NaN), with AVX-512's contract:
// within 2 ulp of 2^x2, x2 = x · log2(e) in float. 2^x2 = 2^floor(k/8) · 2^(j/8) · 2^r, with
// k = round(8 · x2), j = k mod 8 and r = x2 - k/8 in [-1/16, 1/16], exactly: adding 1.5 · 2^20,
// whose float spacing is 1/8, rounds x2 to k/8 and leaves k in the low bits of the sum, where
// vpermps reads j to pick 2^(j/8) from a table of 8 in one register. 2^r - 1 by four terms of
// its series (to within 2e-9 on so short an interval). 2^floor(k/8) is built in a float's
// exponent field and multiplied in, so NaN stays NaN; x2 is clamped at -127, whose power is
// +0: exp(-inf) = 0, and so is anything below 2^-126. 16 instructions against vexp's 21.
inline V vexp_softmax(V x) {
  const V x2 = _mm256_max_ps(_mm256_set1_ps(-127.0f),  // NaN passes: max returns the 2nd
                             _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)));
  const V shift = _mm256_set1_ps(1572864.0f);  // 1.5 · 2^20
  const V y = _mm256_add_ps(x2, shift);
  const V k8 = _mm256_sub_ps(y, shift);  // k/8, exactly
  const V r = _mm256_sub_ps(x2, k8);     // exactly
  V poly = _mm256_fmadd_ps(r, _mm256_set1_ps(0.009618129107628477f),  // (ln2)^4 / 24
                           _mm256_set1_ps(0.0555041086648216f));      // (ln2)^3 / 6
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(0.2402265069591007f));  // (ln2)^2 / 2
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(0.6931471805599453f));
  const V q = _mm256_mul_ps(poly, r);  // 2^r - 1
  const V table = _mm256_setr_ps(1.0f, 1.0905077326652577f, 1.189207115002721f,
                                 1.2968395546510096f, 1.4142135623730951f, 1.5422108254079407f,
                                 1.681792830507429f, 1.8340080864093424f);  // 2^(j/8)
  const V t = _mm256_permutevar8x32_ps(table, _mm256_castps_si256(y));
  const __m256i k = _mm256_sub_epi32(_mm256_castps_si256(y), _mm256_castps_si256(shift));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_srai_epi32(k, 3), _mm256_set1_epi32(127)), 23);  // 2^floor(k/8)
  return _mm256_mul_ps(_mm256_fmadd_ps(t, q, t), _mm256_castsi256_ps(bits));
}

// W values rounded to bfloat16 and float16, as AVX-512's.
inline void vstore_bf16(uint16_t* dst, V v) {
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
inline void vstore_f16(uint16_t* dst, V v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#else  // portable: GCC/Clang vector extensions, lowered to SSE2 on x86-64 and NEON on ARM

// W = 4 floats, one SSE2 or NEON register. The amx_emulated target (MHATTN_AMX_EMULATED, built
// with no ISA flags) takes AVX-512's W = 16, four SSE2 registers a vector, so that its kernels
// run with the shapes and paths of the AVX-512 targets they stand in for.
#if defined(MHATTN_AMX_EMULATED)
constexpr int W = 16;
#else
constexpr int W = 4;
#endif
typedef float V __attribute__((vector_size(4 * W)));
typedef int32_t VI __attribute__((vector_size(4 * W)));
inline V vload(const float* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, V v) { std::memcpy(p, &v, sizeof v); }
inline V vload_f32(const float* p) { return vload(p); }
template <class T>  // bf16_t, f16_t: one value at a time (this path is correct, not fast)
inline V vload_f32(const T* p) {
  V v;
  for (int i = 0; i < W; ++i) v[i] = to_f32(p[i]);
  return v;
}
inline V vset1(float x) { return V{} + x; }
inline V vzero() { return V{}; }
inline V vadd(V a, V b) { return a + b; }
inline V vsub(V a, V b) { return a - b; }
inline V vmul(V a, V b) { return a * b; }
inline V vdiv(V a, V b) { return a / b; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline V vmax(V a, V b) { return a > b ? a : b; }
inline V vmin(V a, V b) { return a < b ? a : b; }
inline V vclamp(V x, V lo, V hi) {
  V t = x < lo ? lo : x;  // comparisons with NaN are false, so NaN passes through
  return t > hi ? hi : t;
}
inline V vabs(V x) {
  VI bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= 0x7fffffff;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
inline V vselect_nonneg(V x, V a, V b) { return x >= 0 ? a : b; }
// Sums and maxima of halves, then of their halves: for W = 4, (v0 + v2) + (v1 + v3).
inline float vhsum(V v) {
  for (int h = W / 2; h >= 1; h /= 2)
    for (int i = 0; i < h; ++i) v[i] += v[i + h];
  return v[0];
}
inline float vhmax(V v) {
  for (int h = W / 2; h >= 1; h /= 2)
    for (int i = 0; i < h; ++i) v[i] = v[i] > v[i + h] ? v[i] : v[i + h];
  return v[0];
}
inline V vpow2i(V n) {
  VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  V r;
  std::memcpy(&r, &e, sizeof r);
  return r;
}
inline V vround(V x) {
  // Adding and subtracting 1.5 * 2^23 rounds to nearest for |x| < 2^22 (all we need here).
  const V magic = vset1(12582912.0f);
  return (x + magic) - magic;
}
inline V vzero_below(V x, V lo, V r) { return x < lo ? V{} : r; }
// r[i][j] becomes r[j][i].
inline void vtranspose(V r[W]) {
#if !defined(MHATTN_AMX_EMULATED)  // W = 4
  const V t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 1, 5);  // r0[0] r1[0] r0[1] r1[1]
  const V t1 = __builtin_shufflevector(r[0], r[1], 2, 6, 3, 7);  // r0[2] r1[2] r0[3] r1[3]
  const V t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 1, 5);
  const V t3 = __builtin_shufflevector(r[2], r[3], 2, 6, 3, 7);
  r[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
  r[1] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
  r[2] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
  r[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
#else
  V t[W];
  for (int i = 0; i < W; ++i)
    for (int j = 0; j < W; ++j) t[j][i] = r[i][j];
  for (int i = 0; i < W; ++i) r[i] = t[i];
#endif
}
// W values rounded to bfloat16 and float16, as bf16_bits and f16_bits round one.
inline void vstore_bf16(uint16_t* dst, V v) {
  for (int i = 0; i < W; ++i) dst[i] = bf16_bits(v[i]);
}
inline void vstore_f16(uint16_t* dst, V v) {
  for (int i = 0; i < W; ++i) dst[i] = f16_bits(v[i]);
}

#endif

#if !defined(MHATTN_SIMD_AVX512)
// exp(x) in float32, within 2 ulp of the true value for x in [-87.3, 88]; 0 below that
// (so exp(-inf) is exactly 0), exp(88) above; NaN stays NaN.
// exp(x) = 2^n * exp(r) with n = round(x / ln2) and r = x - n ln2 in [-ln2/2, ln2/2];
// exp(r) by the degree-6 minimax polynomial of Cephes' expf; ln2 is split into a part exact
// in float (0.693359375) and a small correction, so r keeps its low bits.
inline V vexp(V x) {
  const V lo = vset1(-87.33654f), hi = vset1(88.0f);
  V xc = vclamp(x, lo, hi);
  V n = vround(vmul(xc, vset1(1.44269504088896341f)));
  V r = vfma(n, vset1(-0.693359375f), xc);
  r = vfma(n, vset1(2.12194440e-4f), r);
  V p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
  return vzero_below(x, lo, vmul(p, vpow2i(n)));
}
#endif
#if !defined(MHATTN_SIMD_AVX512) && !defined(MHATTN_SIMD_AVX2)
// The softmax's exp (AVX-512's and AVX2's vexp_softmax above): vexp itself on the portable path.
inline V vexp_softmax(V x) { return vexp(x); }
#endif

// f(std::integral_constant<int, r>) for a run-time row count 1 <= r <= MAX: the register tiles
// take their rows as a template argument, and the last sliver of a block has fewer.
template <int MAX, class F>
inline void with_rows(int64_t r, F&& f) {
  if constexpr (MAX > 1)
    if (r < MAX) return with_rows<MAX - 1>(r, f);
  f(std::integral_constant<int, MAX>{});
}

// x rounded up to a multiple of m.
constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace MHATTN_TARGET
}  // namespace mhattn

// MHATTN_BF16_DOT: this target multiplies pairs of bfloat16 with vdpbf16ps: AVX512-BF16's, or
// (amx_emulated) a plain C++ emulation of it and of the AVX-512 intrinsics around it.
#if defined(__AVX512BF16__)
#define MHATTN_BF16_DOT 1
#elif defined(MHATTN_AMX_EMULATED)
#define MHATTN_BF16_DOT 1
#include "mhattn/avx512_emulated.h"
#endif
