// gemm/tile.h: what the GEMM's paths share, compiled per target like them: the register tile
// and block sizes, the store of a tile of C through OutMap (bias, activation, column groups),
// the division of a product into parallel tasks, and the entry points of gemm/bf16_dot.cpp.
#pragma once

#include <algorithm>

#include "mhattn/activation.h"
#include "mhattn/ops.h"
#include "mhattn/simd.h"

namespace mhattn {
namespace MHATTN_TARGET {

// Register tile MR × NR, NR = NV vectors. AVX2 (16 ymm registers): 6 × 2 accumulators, two B
// vectors and one broadcast A value make 15; AVX-512 uses the same shape with 16-wide vectors.
// The portable path's 4-wide vectors (SSE2: no FMA, and two-operand instructions, so each
// multiply needs a copy of its operand) take 2 × 4: 8 accumulators, 4 B vectors, the broadcast
// and the product's copy fit the 16 xmm registers. 3 × 4 spilled an accumulator to the stack;
// 2 × 4 was 6-17% faster than it in one A/B run.
constexpr int NV = W == 4 ? 4 : 2;
constexpr int MR = W == 4 ? 2 : 6;
constexpr int NR = NV * W;
// KC: a KC × NR sliver of B (256 × 16 floats = 16 KB with AVX2) stays in the 32 KB L1d while
// the slivers of A stream past it. MC, KG: the packed A block (at most 144 × 1024 floats =
// 576 KB) stays in the 1 MB L2 while every panel of the task's run passes. In one A/B run
// (2 threads, median of 15) against one pack per KC step, with the first step's C prefetch and
// the row blocks below, this was 1.00-1.11x as fast on the nine shapes of issue 3 (4096 × 768
// → 768: 1.07x, 1024³: 1.05x).
constexpr int64_t KC = 256;
constexpr int64_t MC = 144;  // a multiple of every target's MR, and of bf16_dot.cpp's 8
constexpr int64_t KG = 4 * KC;
// Below this many flops a product runs on one thread through gemm_simple: starting the OpenMP
// team and packing cost more than the work.
constexpr double kTinyFlops = 2.0 * 16 * 16 * 16;
// Products of at most this many rows (a few slivers of A: decode steps, batched or not) on a
// packed B read it once, streaming it (gemm_few_rows); more go through the row blocks of
// gemm_typed.
constexpr int64_t kFewRows = 4 * MR;
constexpr double kParallelFlops = 2.0 * 64 * 64 * 64;

// f(p as const float*, const bf16_t* or const f16_t*, as dt says): how each GEMM path turns an
// A (or an unpacked B) of any dtype into the instance of its templates for that type.
template <class F>
void with_type(const void* a, DType dt, F&& f) {
  switch (dt) {
    case DType::f32: return f(static_cast<const float*>(a));
    case DType::bf16: return f(static_cast<const bf16_t*>(a));
    case DType::f16: return f(static_cast<const f16_t*>(a));
  }
}

// Parallel tasks of a product of M rows over N columns: row blocks of equal height mc (a
// multiple of MR), and the panels of NR columns cut into runs of run_len so that there are at
// least four tasks per thread and their count divides evenly among the threads. With enough
// row blocks, their count is rounded up to a multiple of the threads instead, so that a task
// takes every panel and packs its A block once (M = 4096: 30 blocks of up to 138 rows, not 29
// blocks in two runs each). Task t covers row block t / runs and run t % runs. mr: the rows of
// the caller's register tile, which mc is a multiple of.
struct Tasks {
  int64_t mc, panels, runs, run_len, count;
};
inline Tasks tasks_of(int64_t M, int64_t N, int nt, int64_t mr = MR) {
  int64_t row_blocks = (M + MC - 1) / MC;
  if (row_blocks >= 4 * nt) row_blocks = (row_blocks + nt - 1) / nt * nt;
  const int64_t mc = round_up((M + row_blocks - 1) / row_blocks, mr);
  const int64_t panels = (N + NR - 1) / NR;
  int64_t runs = std::min(panels, std::max<int64_t>(1, (4 * nt + row_blocks - 1) / row_blocks));
  while (runs < panels && (row_blocks * runs) % nt != 0) ++runs;
  const int64_t run_len = (panels + runs - 1) / runs;
  runs = (panels + run_len - 1) / run_len;
  return {mc, panels, runs, run_len, row_blocks * runs};
}

// Stores an R × NR tile of C: C[m0 : m0+R, n0 : n0+ncols] (+)= t, plus bias when `first` (the
// first KC step writes, later ones add), then act (Activation::none but on the last KC step).
// crow[i] is C's row m0 + i (OutMap::row, worked out once per task), so the store needs no
// division.
template <int R>
void store_tile(const V (&t)[R][NV], const OutMap& c, float* const* crow, int64_t n0,
                int64_t ncols, const float* bias, bool first, Activation act) {
  const bool whole = ncols == NR && n0 % c.cols_per_group + NR <= c.cols_per_group;
  if (whole) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = first && bias ? vload(bias + n0 + v * W) : vzero();
    const int64_t col = c.col(n0);
    for (int i = 0; i < R; ++i) {
      float* p = crow[i] + col;
      for (int v = 0; v < NV; ++v)
        vstore(p + v * W, vactivate(act, vadd(t[i][v], first ? bv[v] : vload(p + v * W))));
    }
    return;
  }
  // Edge of N, or a tile that straddles column groups (heads of fewer than NR dims, or one
  // head's last dims and the next one's first): through a buffer, a run of columns inside one
  // group at a time, contiguous in C. OutMap::col divides, so it is worked out once per run.
  // Worked out twice per element, it made the layer at width 768, L = 512 take 21.4 ms at
  // H = 32 and 22.0 ms at H = 64 (E = 24, 12); once per run, 16.7 and 17.5 ms (H = 12: 15.6).
  float tile[R * NR];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) vstore(tile + i * NR + v * W, t[i][v]);
  auto for_runs = [&](auto&& f) {  // f(j, len, col): tile columns [j, j + len) at C's col
    for (int64_t j = 0, len; j < ncols; j += len) {
      len = std::min(ncols - j, c.cols_per_group - (n0 + j) % c.cols_per_group);
      f(j, len, c.col(n0 + j));
    }
  };
  for_runs([&](int64_t j, int64_t len, int64_t col) {
    for (int i = 0; i < R; ++i)
      for (int64_t u = 0; u < len; ++u)
        tile[i * NR + j + u] += first ? (bias ? bias[n0 + j + u] : 0.0f) : crow[i][col + u];
  });
  if (act != Activation::none)
    for (int i = 0; i < R * NR; i += W) vstore(tile + i, vactivate(act, vload(tile + i)));
  for_runs([&](int64_t j, int64_t len, int64_t col) {
    for (int i = 0; i < R; ++i)
      std::copy(tile + i * NR + j, tile + i * NR + j + len, crow[i] + col);
  });
}

// The end of every micro-kernel: P register tiles of R rows, acc[i][q·NV + v] for panel q of NR
// columns from n0, each stored by store_tile, columns past N dropped.
template <int R, int P>
void store_panels(const V (&acc)[R][P * NV], const OutMap& c, float* const* crow, int64_t n0,
                  int64_t N, const float* bias, bool first, Activation act) {
  for (int q = 0; q < P; ++q) {
    V t[R][NV];
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < NV; ++v) t[i][v] = acc[i][q * NV + v];
    const int64_t nq = n0 + q * NR;
    store_tile<R>(t, c, crow, nq, std::min<int64_t>(NR, N - nq), bias, first, act);
  }
}

// A product of at most MR rows (a decode step) reads each panel of B once, from memory. One
// sequential stream per core leaves memory bandwidth unused, so such a product walks up to P
// panels side by side, as many as there are accumulator registers for: R·P·NV of them.
// Measured in one run on 1×4096→4096 (64 MB of B), 2 threads: 0.74× NumPy with one panel at a
// time, 1.04× with 2, 1.10× with 4, 1.16× with 8 (AVX-512).
constexpr int kAccumulators = W == 16 ? 16 : 8;
constexpr int stream_panels(int64_t rows) {
  int p = 1;
  while (2 * p * rows * NV <= kAccumulators) p *= 2;
  return p;
}

// Panels [p, p1) in groups: as many groups of P as fit, then of P/2, ..., then single panels;
// f(P', p) runs the P' panels from p.
template <int P, class F>
void walk_panels(int64_t p, int64_t p1, F&& f) {
  for (; p + P <= p1; p += P) f(std::integral_constant<int, P>{}, p);
  if constexpr (P > 1) walk_panels<P / 2>(p, p1, f);
}

// gemm/bf16_dot.cpp: bfloat16 B in Layout::pairs, multiplied with vdpbf16ps, and
// gemm/amx.cpp: the same layout on AMX tiles. Built where the target has AVX512-BF16 (and AMX),
// or the emulation of both (amx_emulated); bf16_dot_available() says whether this one does.
#if defined(__AMX_BF16__) || defined(MHATTN_AMX_EMULATED)
#define MHATTN_AMX 1
#endif
constexpr bool bf16_dot_available() {
#if defined(MHATTN_BF16_DOT)
  return true;
#else
  return false;
#endif
}
#if defined(MHATTN_BF16_DOT)
// Pairs of k a panel of Layout::pairs holds: K / 2 rounded up, and on AMX targets rounded up to
// a tile's 16 rows (zero pairs), so that every step of k is whole tiles.
#if defined(MHATTN_AMX)
constexpr int64_t kPairAlign = 16;
#else
constexpr int64_t kPairAlign = 1;
#endif
inline int64_t pair_rows(int64_t K) { return round_up((K + 1) / 2, kPairAlign); }

// A value of A as bfloat16 bits (bf16_bits of a float is simd.h's).
inline uint16_t bf16_bits(bf16_t x) { return x.bits; }
inline uint16_t bf16_bits(f16_t x) { return bf16_bits(to_f32(x)); }

// 16 pairs of k of a row, from 32 values at p, as 16 words of bfloat16 pairs.
inline __m512i pairs_of(const float* p) {
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + W), _mm512_loadu_ps(p));
}
inline __m512i pairs_of(const bf16_t* p) { return _mm512_loadu_si512(p); }
inline __m512i pairs_of(const f16_t* p) {
  return (__m512i)_mm512_cvtne2ps_pbh(vload_f32(p + W), vload_f32(p));
}

// The pair (k, k + 1) of the row at src (values cs apart) as bfloat16 bits, low half first;
// k past K is zero.
template <class AT>
inline uint32_t pair_at(const AT* src, int64_t k, int64_t cs, int64_t K) {
  const uint32_t lo = k < K ? bf16_bits(src[k * cs]) : 0;
  const uint32_t hi = k + 1 < K ? bf16_bits(src[(k + 1) * cs]) : 0;
  return lo | hi << 16;
}

// ap = rows [0, mc) of A, k from k0 .. k0 + 2·kp, as runs of pairs: the pair of
// k = k0 + 2kk, k0 + 2kk + 1 of row i at ap[i * kp + kk] (so sliver s, of rows s·MR .., starts
// at ap + s·MR·kp); k past K is zero.
template <class AT>
void pack_a_pairs(uint32_t* ap, const AT* a, int64_t rs, int64_t cs, int64_t mc, int64_t k0,
                  int64_t kp, int64_t K) {
  for (int64_t i = 0; i < mc; ++i) {
    const AT* src = a + i * rs;
    uint32_t* dst = ap + i * kp;
    int64_t kk = 0;
    if (cs == 1)  // 16 pairs at a time while all 32 values lie within K
      for (; kk + W <= kp && k0 + 2 * (kk + W) <= K; kk += W)
        _mm512_storeu_si512(dst + kk, pairs_of(src + k0 + 2 * kk));
    for (; kk < kp; ++kk) dst[kk] = pair_at(src, k0 + 2 * kk, cs, K);
  }
}

int64_t bf16_dot_packed_size(int64_t K, int64_t N);
void bf16_dot_pack_b(bf16_t* dst, const bf16_t* b, int64_t ks, int64_t ns, int64_t K, int64_t N);
void bf16_dot_gemm(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
                   const PackedB& b, const float* bias, Activation act, int64_t M);
#endif
#if defined(MHATTN_AMX)
// convert.cpp: dst[i] = src[i] rounded to dt (bf16 or f16), i < n, on the calling thread.
void round_to_half(uint16_t* dst, const float* src, int64_t n, DType dt);
// Products of at least this many rows take the tiles; fewer (a decode step), vdpbf16ps, which
// wastes no tile rows on them (a block of tiles is 32 rows).
constexpr int64_t kAmxMinRows = 16;
void amx_gemm(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
              const PackedB& b, const float* bias, Activation act, int64_t M);
#if !defined(MHATTN_AMX_EMULATED)
double amx_peak_flops(int64_t iters);
#endif
#endif

}  // namespace MHATTN_TARGET
}  // namespace mhattn
