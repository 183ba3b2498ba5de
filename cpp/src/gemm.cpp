// gemm.cpp: packed SGEMM for every target, C (M, N) = act(A (M, K) · B (K, N) + bias).
//
// B is packed once into panels of NR columns (pack_b; a layer packs its weights when it is
// built, never per call). A is packed per block of up to MC rows × KC columns into slivers of
// MR rows, k-major. The micro-kernel holds an MR × NR tile of C in registers and streams one
// A sliver against one B sliver; the tile is written through OutMap (ops.h), which is how the
// in-projection stores Q, K and V directly in the (B, H, L, E) layout, bias included. The
// activation (activation.h) is applied in the same store, on the last step over K.
//
// Loop nest (the BLIS order): parallel tasks of (row block, run of panels), dynamic schedule;
// inside a task: k0 in steps of KC (pack the A block) → panel → sliver of MR rows → micro-kernel.
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
// The portable path's 4-wide vectors (SSE2, no FMA) take 3 × 4: also 12 accumulators, but only
// 3 broadcasts of A per step, which SSE2 pays for with shuffles on the ports the adds need.
constexpr int NV = W == 4 ? 4 : 2;
constexpr int MR = W == 4 ? 3 : 6;
constexpr int NR = NV * W;
// KC: a KC × NR sliver of B (256 × 16 floats = 16 KB with AVX2) stays in the 32 KB L1d while
// the slivers of A stream past it. MC: the packed A block (144 × 256 floats = 144 KB) stays in
// the 1 MB L2 while every panel of the task's run passes.
constexpr int64_t KC = 256;
constexpr int64_t MC = 144;  // a multiple of every target's MR
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

// ap: the block A (mc, kc) as slivers of MR rows, sliver s holding a(s*MR + i, k) at
// ap[s * kc * MR + k * MR + i]; rows past mc are zero.
void pack_a(float* ap, const float* a, int64_t rs, int64_t cs, int64_t mc, int64_t kc) {
  for (int64_t i0 = 0; i0 < mc; i0 += MR) {
    float* dst = ap + i0 * kc;
    for (int i = 0; i < MR; ++i) {
      if (i0 + i < mc) {
        const float* src = a + (i0 + i) * rs;
        for (int64_t k = 0; k < kc; ++k) dst[k * MR + i] = src[k * cs];
      } else {
        for (int64_t k = 0; k < kc; ++k) dst[k * MR + i] = 0.0f;
      }
    }
  }
}

// C[m0 : m0+R, n0 : n0+ncols] (+)= ap (kc × MR sliver) · bp (kc × NR sliver), plus bias when
// `first` (the first KC step writes, later ones add), then act when `last` (the last KC step).
// crow[i] is C's row m0 + i (OutMap::row, worked out once per task), so the store needs no
// division.
template <int R>
void micro_kernel(int64_t kc, const float* ap, const float* bp, const OutMap& c,
                  float* const* crow, int64_t n0, int64_t ncols, const float* bias, bool first,
                  Activation act) {
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vzero();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(bp + k * NR + v * W);
    for (int i = 0; i < R; ++i) {
      const V x = vset1(ap[k * MR + i]);
      for (int v = 0; v < NV; ++v) acc[i][v] = vfma(x, b[v], acc[i][v]);
    }
  }
  const bool whole = ncols == NR && n0 % c.cols_per_group + NR <= c.cols_per_group;
  if (whole) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = first && bias ? vload(bias + n0 + v * W) : vzero();
    const int64_t col = c.col(n0);
    for (int i = 0; i < R; ++i) {
      float* p = crow[i] + col;
      for (int v = 0; v < NV; ++v)
        vstore(p + v * W, vactivate(act, vadd(acc[i][v], first ? bv[v] : vload(p + v * W))));
    }
    return;
  }
  // Edge of N, or a tile that straddles a column group (a head of fewer than NR dims).
  float tile[R * NR];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) vstore(tile + i * NR + v * W, acc[i][v]);
  for (int i = 0; i < R; ++i)
    for (int64_t j = 0; j < ncols; ++j)
      tile[i * NR + j] += first ? (bias ? bias[n0 + j] : 0.0f) : crow[i][c.col(n0 + j)];
  if (act != Activation::none)
    for (int i = 0; i < R * NR; i += W) vstore(tile + i, vactivate(act, vload(tile + i)));
  for (int i = 0; i < R; ++i)
    for (int64_t j = 0; j < ncols; ++j) crow[i][c.col(n0 + j)] = tile[i * NR + j];
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

  // Row blocks of equal height (a multiple of MR), and the panels cut into runs so that there
  // are at least four tasks per thread and their count divides evenly among the threads.
  const int nt = num_threads();
  const int64_t row_blocks = (M + MC - 1) / MC;
  const int64_t mc = ((M + row_blocks - 1) / row_blocks + MR - 1) / MR * MR;
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
    // A single sliver of rows (a decode step) is packed whole and each panel of B streamed
    // from start to end in one go: B is read once, in order, which is all that bounds it.
    const int64_t k_step = rows <= MR ? K : KC;
    float* ap = thread_scratch(0, std::max(MC * KC, MR * K));
    float* crow[MC];
    for (int64_t i = 0; i < rows; ++i) crow[i] = c.row(m0 + i);
    for (int64_t k0 = 0; k0 < K; k0 += k_step) {
      const int64_t kc = std::min(k_step, K - k0);
      pack_a(ap, a + m0 * a_rs + k0 * a_cs, a_rs, a_cs, rows, kc);
      for (int64_t p = p0; p < p1; ++p) {
        const float* bp = b.data.data() + p * K * NR + k0 * NR;
        const int64_t n0 = p * NR, ncols = std::min<int64_t>(NR, N - n0);
        for (int64_t i0 = 0; i0 < rows; i0 += MR)
          with_rows<MR>(std::min<int64_t>(MR, rows - i0), [&](auto r) {
            micro_kernel<decltype(r)::value>(kc, ap + i0 * kc, bp, c, crow + i0, n0, ncols, bias,
                                             k0 == 0, k0 + kc == K ? act : Activation::none);
          });
      }
    }
  }
}


}  // namespace MHATTN_TARGET
}  // namespace mhattn
