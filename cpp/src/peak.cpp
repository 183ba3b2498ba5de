// peak.cpp: the arithmetic peak of one target, for the benchmark to judge the kernels against.
//
// peak_flops(iters, bf16): each of num_threads() threads runs iters rounds of kChains independent
// accumulator chains, each a vfma (float32: 2 flops a lane) or, with bf16 on a target with
// AVX512-BF16, a vdpbf16ps (4 flops a float32 lane: two products, two sums). 16 chains (12 with
// 16 vector registers) keep more instructions in flight than any CPU's FMA latency times its FMA
// ports (4 × 2 on Intel's two-port cores and on Zen 3), so the count, not a dependency, is the
// limit. With AVX2, 16 chains and the two operands took 18 of the 16 ymm registers: three
// chains went through the stack on every round, and the peak read 55 GFLOP/s a thread on a
// Zen 3 whose GEMM ran at 75. On a target with AMX tiles
// (the bf16 GEMM's path there), bf16 counts tdpbf16ps instead (gemm/amx.cpp). Returns the
// flops done; the caller times the call.
#include "gemm/tile.h"

namespace mhattn {
namespace MHATTN_TARGET {

namespace {
constexpr int kChains = W == 16 ? 16 : 12;  // AVX-512 has 32 registers, AVX2 and SSE2 16
volatile double g_sink;  // where the chains' sum goes, so that the loops are not optimised away
}  // namespace

double peak_flops(int64_t iters, bool bf16) {
#if defined(MHATTN_AMX) && !defined(MHATTN_AMX_EMULATED)
  if (bf16) return amx_peak_flops(iters);
#endif
  const int nt = num_threads();
  double sink = 0.0;
#if defined(MHATTN_BF16_DOT)
  const bool dot = bf16;
#else
  const bool dot = false;
  (void)bf16;
#endif
#pragma omp parallel num_threads(nt) reduction(+ : sink)
  {
    V acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = vset1(1e-3f * c);
    const V x = vset1(0.999f), y = vset1(1e-6f);
    if (!dot) {
      for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 16
        for (int c = 0; c < kChains; ++c) acc[c] = vfma(acc[c], x, y);
    }
#if defined(MHATTN_BF16_DOT)
    else {
      const __m512bh p = (__m512bh)_mm512_set1_epi16(0x3F80), q = (__m512bh)_mm512_set1_epi16(0x3380);
      for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 16
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], p, q);
    }
#endif
    V s = vzero();
    for (int c = 0; c < kChains; ++c) s = vadd(s, acc[c]);
    sink += vhsum(s);
  }
  g_sink = sink;
  return (dot ? 4.0 : 2.0) * W * kChains * static_cast<double>(iters) * nt;
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
