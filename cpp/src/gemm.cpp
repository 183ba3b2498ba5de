// gemm.cpp: packed SGEMM for every target, C (M, N) = act(A (M, K) · B (K, N) + bias).
//
// B is packed once into panels of NR columns (pack_b; a layer packs its weights when it is
// built, never per call). A is packed per block of up to MC rows × KC columns into slivers of
// MR rows, in chunks of W columns (pack_a). The micro-kernel holds an MR × NR tile of C in
// registers and streams one A sliver against one B sliver; the tile is written through OutMap
// (ops.h), which is how the in-projection stores Q, K and V directly in the (B, H, L, E) layout,
// bias included. The activation (activation.h) is applied in the same store, on the last step
// over K.
//
// Loop nest: parallel tasks of (row block, run of panels), dynamic schedule; inside a task:
// groups of up to KG columns of A (pack the A block, KC columns at a time) → panel → k0 in steps
// of KC → sliver of MR rows → micro-kernel. Each panel's C tile takes all the KC steps of a group
// while it is in cache, so C goes to memory once per group rather than once per KC step.
// A product of at most MR rows (a decode step) goes through gemm_one_sliver instead: one KC
// step over the whole of K, and several panels of B streamed side by side.
// gemm_simple is the same product as three plain loops: it is the definition a reader checks
// the fast path against, and it serves K = 0 and products too small to be worth packing A.
#include <algorithm>

#include "mhattn/activation.h"
#include "mhattn/ops.h"
#include "mhattn/simd.h"

namespace mhattn {
namespace MHATTN_TARGET {
namespace {

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
constexpr int64_t MC = 144;  // a multiple of every target's MR
constexpr int64_t KG = 4 * KC;
// Below this many flops a product runs on one thread through gemm_simple: starting the OpenMP
// team and packing cost more than the work.
constexpr double kTinyFlops = 2.0 * 16 * 16 * 16;
constexpr double kParallelFlops = 2.0 * 64 * 64 * 64;

// b(k, n) of a packed B.
inline float packed_at(const PackedB& b, int64_t k, int64_t n) {
  return b.data[(n / NR) * b.K * NR + k * NR + n % NR];
}

// C (M, N) = act(A (M, K) · B (K, N) + bias), one element at a time.
void gemm_simple(const OutMap& c, const float* a, int64_t a_rs, int64_t a_cs, const PackedB& b,
                 const float* bias, Activation act, int64_t M) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < b.N; ++n) {
      float acc = bias ? bias[n] : 0.0f;
      for (int64_t k = 0; k < b.K; ++k) acc += a[m * a_rs + k * a_cs] * packed_at(b, k, n);
      *c.at(m, n) = activate1(act, acc);
    }
}

// ap: the block A (mc, kc) as slivers of MR rows, each in chunks of W columns: sliver s holds
// a(s*MR + i, k0 + j), k0 a multiple of W, at ap[s * kcp * MR + k0 * MR + i * W + j], kcp = kc
// rounded up to W. A chunk is MR rows of one vector each, so when A's rows are contiguous,
// packing copies vectors (the layout before, k-major, took 5% of a 4096 × 768 → 768 product on
// one thread in scalar stores). Rows past mc and columns past kc are left unset: the
// micro-kernel never reads them.
void pack_a(float* ap, const float* a, int64_t rs, int64_t cs, int64_t mc, int64_t kc) {
  const int64_t kcp = round_up(kc, W);
  for (int64_t i0 = 0; i0 < mc; i0 += MR) {
    float* dst = ap + i0 * kcp;
    for (int64_t i = 0; i < std::min<int64_t>(MR, mc - i0); ++i) {
      const float* src = a + (i0 + i) * rs;
      int64_t k = 0;
      if (cs == 1)
        for (; k + W <= kc; k += W) vstore(dst + k * MR + i * W, vload(src + k));
      for (; k < kc; ++k) dst[k / W * W * MR + i * W + k % W] = src[k * cs];
    }
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

// C[m0 : m0+R, n0 : n0+P·NR] (+)= ap (an MR × kc sliver, as pack_a lays it out) · P slivers of
// B (kc × NR each, the q-th at bp + q * b_step), stored by store_tile, columns past N dropped.
// Registers: R × P·NV accumulators.
template <int R, int P>
void micro_kernel(int64_t kc, const float* ap, const float* bp, int64_t b_step, const OutMap& c,
                  float* const* crow, int64_t n0, int64_t N, const float* bias, bool first,
                  Activation act) {
  V acc[R][P * NV];
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < P * NV; ++u) acc[i][u] = vzero();
  // Ask for the C tile now, so that the stores (and a later KC step's loads) at the end find it
  // in cache.
  for (int q = 0; q < P; ++q)
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < NV; ++v) __builtin_prefetch(crow[i] + c.col(n0 + q * NR) + v * W, 1);
  // One k: a(i, k) at ak[i * W].
  auto step = [&](int64_t k, const float* ak) {
    V b[P * NV];
    for (int q = 0; q < P; ++q)
      for (int v = 0; v < NV; ++v) b[q * NV + v] = vload(bp + q * b_step + k * NR + v * W);
    for (int i = 0; i < R; ++i) {
      const V x = vset1(ak[i * W]);
      for (int u = 0; u < P * NV; ++u) acc[i][u] = vfma(x, b[u], acc[i][u]);
    }
  };
  int64_t k0 = 0;
  for (; k0 + W <= kc; k0 += W)
#pragma GCC unroll 16
    for (int j = 0; j < W; ++j) step(k0 + j, ap + k0 * MR + j);
  for (int64_t j = 0; k0 + j < kc; ++j) step(k0 + j, ap + k0 * MR + j);
  for (int q = 0; q < P; ++q) {
    V t[R][NV];
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < NV; ++v) t[i][v] = acc[i][q * NV + v];
    const int64_t nq = n0 + q * NR;
    store_tile<R>(t, c, crow, nq, std::min<int64_t>(NR, N - nq), bias, first, act);
  }
}

// Panels [p, p1) in groups: as many groups of P as fit, then of P/2, ..., then single panels;
// f(P', p) runs the P' panels from p.
template <int P, class F>
void walk_panels(int64_t p, int64_t p1, F&& f) {
  for (; p + P <= p1; p += P) f(std::integral_constant<int, P>{}, p);
  if constexpr (P > 1) walk_panels<P / 2>(p, p1, f);
}

// C (M, N) = act(A · B + bias) for M <= MR, a decode step: B is read once, from memory, and
// that is all that bounds it. A is packed once, whole K, before the threads start, and each
// task streams its run of panels from start to end in one KC step, P panels side by side.
void gemm_one_sliver(const OutMap& c, const float* a, int64_t a_rs, int64_t a_cs,
                     const PackedB& b, const float* bias, Activation act, int64_t M) {
  const int64_t N = b.N, K = b.K;
  const int nt = num_threads();
  const int64_t panels = (N + NR - 1) / NR;
  const int64_t runs = std::min<int64_t>(panels, 2 * nt);
  const int64_t run_len = (panels + runs - 1) / runs;
  float* ap = shared_scratch(MR * round_up(K, W));
  pack_a(ap, a, a_rs, a_cs, M, K);
  float* crow[MR];
  for (int64_t i = 0; i < M; ++i) crow[i] = c.row(i);
  with_rows<MR>(M, [&](auto r) {
    constexpr int R = decltype(r)::value;
#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1 && 2.0 * M * N * K > kParallelFlops)
    for (int64_t t = 0; t < runs; ++t)
      walk_panels<stream_panels(R)>(t * run_len, std::min(panels, (t + 1) * run_len),
                                    [&](auto np, int64_t p) {
        micro_kernel<R, decltype(np)::value>(K, ap, b.data.data() + p * K * NR, K * NR, c, crow,
                                             p * NR, N, bias, true, act);
      });
  });
}

}  // namespace

int panel_width() { return NR; }

// dst = B (K, N) as panels of NR columns, panel p holding b(k, p*NR + j) at
// dst[p * K * NR + k * NR + j], zero past N.
void pack_b(float* dst, const float* b, int64_t ks, int64_t ns, int64_t K, int64_t N) {
  const int64_t panels = (N + NR - 1) / NR;
  const int nt = num_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && K * N > (1 << 16))
  for (int64_t p = 0; p < panels; ++p) {
    float* d = dst + p * K * NR;
    const int64_t n0 = p * NR, cols = std::min<int64_t>(NR, N - n0);
    if (ns == 1) {  // rows of B are contiguous: copy NR at a time
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < cols; ++j) d[k * NR + j] = b[k * ks + n0 + j];
        for (int64_t j = cols; j < NR; ++j) d[k * NR + j] = 0.0f;
      }
    } else {  // columns of B are contiguous (x · Wᵀ with W row-major): walk each along k
      for (int64_t j = 0; j < NR; ++j) {
        const float* src = b + (n0 + j) * ns;
        if (j < cols)
          for (int64_t k = 0; k < K; ++k) d[k * NR + j] = src[k * ks];
        else
          for (int64_t k = 0; k < K; ++k) d[k * NR + j] = 0.0f;
      }
    }
  }
}

void gemm(const OutMap& c, const float* a, int64_t a_rs, int64_t a_cs, const PackedB& b,
          const float* bias, Activation act, int64_t M) {
  const int64_t N = b.N, K = b.K;
  if (M == 0 || N == 0) return;
  const double flops = 2.0 * M * N * K;
  if (K == 0 || flops < kTinyFlops) return gemm_simple(c, a, a_rs, a_cs, b, bias, act, M);
  if (M <= MR) return gemm_one_sliver(c, a, a_rs, a_cs, b, bias, act, M);

  // Row blocks of equal height (a multiple of MR), and the panels cut into runs so that there
  // are at least four tasks per thread and their count divides evenly among the threads. With
  // enough row blocks, their count is rounded up to a multiple of the threads instead, so that a
  // task takes every panel and packs its A block once (M = 4096: 30 blocks of up to 138 rows,
  // not 29 blocks in two runs each).
  const int nt = num_threads();
  int64_t row_blocks = (M + MC - 1) / MC;
  if (row_blocks >= 4 * nt) row_blocks = (row_blocks + nt - 1) / nt * nt;
  const int64_t mc = round_up((M + row_blocks - 1) / row_blocks, MR);
  const int64_t panels = (N + NR - 1) / NR;
  int64_t runs = std::min(panels, std::max<int64_t>(1, (4 * nt + row_blocks - 1) / row_blocks));
  while (runs < panels && (row_blocks * runs) % nt != 0) ++runs;
  const int64_t run_len = (panels + runs - 1) / runs;
  runs = (panels + run_len - 1) / run_len;
  const int64_t tasks = row_blocks * runs;

#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1 && tasks > 1 && flops > kParallelFlops)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t m0 = (t / runs) * mc, rows = std::min(mc, M - m0);
    if (rows <= 0) continue;
    const int64_t p0 = (t % runs) * run_len, p1 = std::min(panels, p0 + run_len);
    float* ap = thread_scratch(0, MC * KG);
    float* crow[MC];
    for (int64_t i = 0; i < rows; ++i) crow[i] = c.row(m0 + i);
    const int64_t rows_p = round_up(rows, MR);
    for (int64_t g0 = 0; g0 < K; g0 += KG) {
      const int64_t g1 = std::min(K, g0 + KG);
      for (int64_t k0 = g0; k0 < g1; k0 += KC)
        pack_a(ap + (k0 - g0) * rows_p, a + m0 * a_rs + k0 * a_cs, a_rs, a_cs, rows,
               std::min(KC, g1 - k0));
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t k0 = g0; k0 < g1; k0 += KC) {
          const int64_t kc = std::min(KC, K - k0), kcp = round_up(kc, W);
          const Activation step_act = k0 + kc == K ? act : Activation::none;
          const float* bp = b.data.data() + p * K * NR + k0 * NR;
          const float* apk = ap + (k0 - g0) * rows_p;
          for (int64_t i0 = 0; i0 < rows; i0 += MR)
            with_rows<MR>(std::min<int64_t>(MR, rows - i0), [&](auto r) {
              micro_kernel<decltype(r)::value, 1>(kc, apk + i0 * kcp, bp, K * NR, c, crow + i0,
                                                  p * NR, N, bias, k0 == 0, step_act);
            });
        }
    }
  }
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
