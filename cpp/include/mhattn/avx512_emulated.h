// avx512_emulated.h: the AVX-512 and AVX512-BF16 intrinsics that the bfloat16 kernels call,
// written out in plain C++ with Intel's semantics, for the amx_emulated target only.
//
// That target is built with no ISA flags, so it runs on every x86-64 CPU, and its vectors are
// simd.h's portable ones at W = 16. These functions take the place of the intrinsics of the
// same names: they live in namespace mhattn::amx_emulated, where unqualified lookup finds them
// before the global ones of <immintrin.h>, which is included only for its types (__m512i,
// __m512bh, __mmask16 and so on, plain vector and integer types). Calling an intrinsic not
// emulated here stops the build ("target specific option mismatch"), so the target never
// executes an AVX-512 instruction. Each follows the pseudocode of Intel's Intrinsics Guide,
// down to what vdpbf16ps and vcvtne2ps2bf16 do with denormals (taken as zero).
#pragma once

#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace mhattn {
namespace MHATTN_TARGET {

static_assert(W == 16, "the emulated AVX-512 vectors are 16 floats");

// The lanes of an integer vector as an array of T, and back.
template <class T, class X>
struct Lanes {
  T v[sizeof(X) / sizeof(T)];
};
template <class T, class X>
inline Lanes<T, X> lanes(X x) {
  Lanes<T, X> l;
  std::memcpy(l.v, &x, sizeof x);
  return l;
}
template <class X, class T>
inline X from_lanes(const Lanes<T, X>& l) {
  X x;
  std::memcpy(&x, l.v, sizeof x);
  return x;
}
inline float bf16_daz(uint16_t h) {  // a bfloat16 as float32, a denormal as zero
  if ((h & 0x7f80u) == 0) h &= 0x8000u;
  return to_f32(bf16_t{h});
}
inline float ftz(float x) {  // a denormal float32 flushed to zero
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x7f800000u) == 0 ? (u & 0x80000000u ? -0.0f : 0.0f) : x;
}

inline __m512i _mm512_loadu_si512(const void* p) {
  __m512i x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline __m512i _mm512_load_si512(const void* p) { return _mm512_loadu_si512(p); }
inline void _mm512_storeu_si512(void* p, __m512i x) { std::memcpy(p, &x, sizeof x); }
inline __m256i _mm256_loadu_si256(const __m256i* p) {
  __m256i x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline __m512i _mm512_setzero_si512() { return __m512i{}; }
inline __m512i _mm512_set1_epi32(int a) {
  Lanes<int32_t, __m512i> l;
  for (int32_t& x : l.v) x = a;
  return from_lanes(l);
}
inline __m512i _mm512_set1_epi16(short a) {
  Lanes<int16_t, __m512i> l;
  for (int16_t& x : l.v) x = a;
  return from_lanes(l);
}
inline V _mm512_loadu_ps(const float* p) { return vload(p); }
// Lanes whose bit in k is clear are zero and their memory is not read.
inline V _mm512_maskz_loadu_ps(__mmask16 k, const float* p) {
  V x = vzero();
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) x[i] = p[i];
  return x;
}
inline __m512i _mm512_maskz_loadu_epi16(__mmask32 k, const void* p) {
  Lanes<uint16_t, __m512i> l;
  for (int i = 0; i < 32; ++i) {
    l.v[i] = 0;
    if (k >> i & 1) std::memcpy(&l.v[i], static_cast<const char*>(p) + 2 * i, 2);
  }
  return from_lanes(l);
}
inline __m512i _mm512_castps_si512(V a) {
  __m512i x;
  std::memcpy(&x, &a, sizeof x);
  return x;
}

template <class T, class F>
inline __m512i lanewise(__m512i a, __m512i b, F f) {
  auto x = lanes<T>(a), y = lanes<T>(b);
  for (size_t i = 0; i < sizeof x.v / sizeof x.v[0]; ++i) x.v[i] = f(x.v[i], y.v[i]);
  return from_lanes(x);
}
inline __m512i _mm512_add_epi32(__m512i a, __m512i b) {
  return lanewise<uint32_t>(a, b, [](uint32_t x, uint32_t y) { return x + y; });
}
inline __m512i _mm512_and_si512(__m512i a, __m512i b) {
  return lanewise<uint32_t>(a, b, [](uint32_t x, uint32_t y) { return x & y; });
}
inline __m512i _mm512_or_si512(__m512i a, __m512i b) {
  return lanewise<uint32_t>(a, b, [](uint32_t x, uint32_t y) { return x | y; });
}
inline __m512i _mm512_srli_epi32(__m512i a, unsigned n) {  // n < 32
  return lanewise<uint32_t>(a, a, [n](uint32_t x, uint32_t) { return x >> n; });
}
inline __m512i _mm512_slli_epi32(__m512i a, unsigned n) {
  return lanewise<uint32_t>(a, a, [n](uint32_t x, uint32_t) { return x << n; });
}
// 16 words zero-extended to 16 doublewords.
inline __m512i _mm512_cvtepu16_epi32(__m256i a) {
  const auto w = lanes<uint16_t>(a);
  Lanes<uint32_t, __m512i> l;
  for (int i = 0; i < 16; ++i) l.v[i] = w.v[i];
  return from_lanes(l);
}
// Within each 128-bit lane (8 words): words 0-3 (lo) or 4-7 (hi) of a and b, interleaved.
inline __m512i unpack_epi16(__m512i a, __m512i b, int half) {
  const auto x = lanes<uint16_t>(a), y = lanes<uint16_t>(b);
  Lanes<uint16_t, __m512i> l;
  for (int lane = 0; lane < 4; ++lane)
    for (int i = 0; i < 4; ++i) {
      l.v[8 * lane + 2 * i] = x.v[8 * lane + 4 * half + i];
      l.v[8 * lane + 2 * i + 1] = y.v[8 * lane + 4 * half + i];
    }
  return from_lanes(l);
}
inline __m512i _mm512_unpacklo_epi16(__m512i a, __m512i b) { return unpack_epi16(a, b, 0); }
inline __m512i _mm512_unpackhi_epi16(__m512i a, __m512i b) { return unpack_epi16(a, b, 1); }
// Word i of the result is word idx[i] mod 32 of a.
inline __m512i _mm512_permutexvar_epi16(__m512i idx, __m512i a) {
  const auto j = lanes<uint16_t>(idx), x = lanes<uint16_t>(a);
  Lanes<uint16_t, __m512i> l;
  for (int i = 0; i < 32; ++i) l.v[i] = x.v[j.v[i] & 31];
  return from_lanes(l);
}
// Lane i of the result is lane idx[i] mod 16 of a, or of b when bit 4 of idx[i] is set.
inline V _mm512_permutex2var_ps(V a, __m512i idx, V b) {
  const auto j = lanes<uint32_t>(idx);
  V r;
  for (int i = 0; i < 16; ++i) r[i] = j.v[i] & 16 ? b[j.v[i] & 15] : a[j.v[i] & 15];
  return r;
}
// Words 0-15 are b rounded to bfloat16, words 16-31 a: to nearest even, denormals to zero.
inline __m512bh _mm512_cvtne2ps_pbh(V a, V b) {
  Lanes<uint16_t, __m512bh> l;
  for (int i = 0; i < 32; ++i) l.v[i] = bf16_bits(ftz(i < 16 ? b[i] : a[i - 16]));
  return from_lanes(l);
}
// Lane i: src[i] + a.bf16[2i+1]·b.bf16[2i+1], then + a.bf16[2i]·b.bf16[2i], in float32
// (the products are exact there); denormal inputs are zero, and so are denormal sums.
inline V _mm512_dpbf16_ps(V src, __m512bh a, __m512bh b) {
  const auto x = lanes<uint16_t>(a), y = lanes<uint16_t>(b);
  for (int i = 0; i < 16; ++i) {
    src[i] = ftz(src[i] + bf16_daz(x.v[2 * i + 1]) * bf16_daz(y.v[2 * i + 1]));
    src[i] = ftz(src[i] + bf16_daz(x.v[2 * i]) * bf16_daz(y.v[2 * i]));
  }
  return src;
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
