// gemm/bf16_dot.cpp: C (M, N) = act(A (M, K) · B (K, N) + bias) for a bfloat16 B, on CPUs with
// AVX512-BF16. vdpbf16ps takes 16 pairs of bfloat16 from each operand and adds both products of
// every pair to 16 float32 accumulators: twice an FMA's products per instruction. On Zen 4 it
// issues at the FMA's rate (../shared/tools/fma_peak.c: 234 GFLOP/s a thread against 116 for
// fp32 FMAs); on Intel's Sapphire Rapids at half of it, where AMX is the bfloat16 path.
//
// B is packed once in Layout::pairs (ops.h): panels of NR columns whose rows come in pairs of
// k, so that a 512-bit load holds the pairs (b(2kk, j), b(2kk+1, j)) of 16 columns. A is
// rounded to bfloat16 (to nearest, ties to even) as it is packed, in slivers of MRP rows, each row
// a run of pairs: the pair (a(i, 2kk), a(i, 2kk+1)) is one 32-bit word, which the micro-kernel
// broadcasts to every lane. So a product with a bfloat16 B computes in bfloat16 whatever A's
// dtype: its accuracy is bfloat16's. Accumulation is float32. (vdpbf16ps, and the vector
// rounding of A, treat denormal inputs as zero; the simple version rounds them.)
//
// Loop nest as gemm.cpp's: parallel tasks of (row block, run of panels); inside a task, groups
// of up to KG pairs of A packed at once → panel → steps of KCP pairs → sliver → micro-kernel.
// A product of at most MRP rows (a decode step) takes each panel's whole K in one step, several
// panels side by side (walk_panels), as gemm_few_rows does: it is bound by reading B.
#include "gemm/tile.h"

#if defined(MHATTN_BF16_DOT)

namespace mhattn {
namespace MHATTN_TARGET {
namespace {

// Pairs of k per step: a KCP × NR sliver of B (128 pairs × 32 columns × 4 bytes = 16 KB) stays
// in the 32 KB L1d while the slivers of A stream past it. The A block of a group (at most
// MC × KG words = 576 KB) stays in the 1 MB L2 while every panel of the task's run passes, as
// in gemm.cpp.
constexpr int64_t KCP = 128;
// Register tile MRP × NR: 8 × 2 accumulators, two B vectors and the broadcast, 19 of the 32
// registers. Zen 5 issues two vdpbf16ps a cycle, and 12 chains did not keep both pipes busy: in
// an in-cache test of the micro-kernel alone (one thread, 128 pairs a step, Zen 5) 6 rows ran at
// 400 GFLOP/s and 8, 10 and 12 rows at 443-453, fma_peak.c's peak (449). Zen 4 issues one a
// cycle, where fewer chains would do and 16 cost only registers.
constexpr int MRP = 8;

// C[m0 : m0+R, n0 : n0+P·NR] (+)= ap (R rows of kp pairs, rows ldp words apart) · P slivers of
// B (kp pairs × NR columns each, the q-th at bp + q * b_step), stored by store_tile, columns
// past N dropped. Registers: R × P·NV accumulators, P·NV vectors of B, one broadcast.
template <int R, int P>
void micro_kernel(int64_t kp, const uint32_t* ap, int64_t ldp, const uint16_t* bp, int64_t b_step,
                  const OutMap& c, float* const* crow, int64_t n0, int64_t N, const float* bias,
                  bool first, Activation act) {
  V acc[R][P * NV];
  for (int i = 0; i < R; ++i)
    for (int u = 0; u < P * NV; ++u) acc[i][u] = vzero();
  for (int64_t kk = 0; kk < kp; ++kk) {
    __m512bh b[P * NV];
    for (int q = 0; q < P; ++q)
      for (int v = 0; v < NV; ++v)
        b[q * NV + v] = (__m512bh)_mm512_loadu_si512(bp + q * b_step + kk * 2 * NR + v * 2 * W);
    for (int i = 0; i < R; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[i * ldp + kk]));
      for (int u = 0; u < P * NV; ++u) acc[i][u] = _mm512_dpbf16_ps(acc[i][u], x, b[u]);
    }
  }
  store_panels<R, P>(acc, c, crow, n0, N, bias, first, act);
}

// The same product one element at a time, A rounded as the fast path rounds it: the definition
// the fast path is checked against, and the path of K = 0 and of products too small to pack.
template <class AT>
void gemm_pairs_simple(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs,
                       const PackedB& b, const float* bias, Activation act, int64_t M) {
  const int64_t Kp = pair_rows(b.K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < b.N; ++n) {
      float acc = bias ? bias[n] : 0.0f;
      for (int64_t k = 0; k < b.K; ++k) {
        const bf16_t x{bf16_bits(a[m * a_rs + k * a_cs])};
        const bf16_t w{b.half[(n / NR) * Kp * 2 * NR + k / 2 * 2 * NR + 2 * (n % NR) + k % 2]};
        acc += to_f32(x) * to_f32(w);
      }
      *c.at(m, n) = activate1(act, acc);
    }
}

template <class AT>
void gemm_pairs(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const PackedB& b,
                const float* bias, Activation act, int64_t M) {
  const int64_t N = b.N, K = b.K, Kp = pair_rows(K);  // Kp: pairs of k, per panel
  if (K == 0 || 2.0 * M * N * K < kTinyFlops)
    return gemm_pairs_simple(c, a, a_rs, a_cs, b, bias, act, M);
  const uint16_t* bdata = b.half.data();
  const int64_t panel_size = Kp * 2 * NR;  // elements of one panel
  const int nt = num_threads();
  const Tasks tk = tasks_of(M, N, nt, MRP);
#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1 && tk.count > 1 && 2.0 * M * N * K > kParallelFlops)
  for (int64_t t = 0; t < tk.count; ++t) {
    const int64_t m0 = (t / tk.runs) * tk.mc, rows = std::min(tk.mc, M - m0);
    if (rows <= 0) continue;
    const int64_t p0 = (t % tk.runs) * tk.run_len, p1 = std::min(tk.panels, p0 + tk.run_len);
    float* crow[MC];
    for (int64_t i = 0; i < rows; ++i) crow[i] = c.row(m0 + i);
    uint32_t* ap = reinterpret_cast<uint32_t*>(thread_scratch(0, std::max(MC * KG, MRP * Kp)));
    const AT* am = a + m0 * a_rs;
    if (rows <= MRP) {  // a decode step: every pair of k at once, P panels side by side
      pack_a_pairs(ap, am, a_rs, a_cs, rows, 0, Kp, K);
      with_rows<MRP>(rows, [&](auto r) {
        constexpr int R = decltype(r)::value;
        walk_panels<stream_panels(R)>(p0, p1, [&](auto np, int64_t p) {
          micro_kernel<R, decltype(np)::value>(Kp, ap, Kp, bdata + p * panel_size, panel_size,
                                               c, crow, p * NR, N, bias, true, act);
        });
      });
      continue;
    }
    for (int64_t g0 = 0; g0 < Kp; g0 += KG) {  // g0, g1, kk0: in pairs of k
      const int64_t g1 = std::min(Kp, g0 + KG);
      pack_a_pairs(ap, am, a_rs, a_cs, rows, 2 * g0, g1 - g0, K);
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t kk0 = g0; kk0 < g1; kk0 += KCP) {
          const int64_t kp = std::min(KCP, g1 - kk0);
          const Activation step_act = kk0 + kp == Kp ? act : Activation::none;
          const uint16_t* bp = bdata + p * panel_size + kk0 * 2 * NR;
          const int64_t ldp = g1 - g0;
          for (int64_t i0 = 0; i0 < rows; i0 += MRP)
            with_rows<MRP>(std::min<int64_t>(MRP, rows - i0), [&](auto r) {
              micro_kernel<decltype(r)::value, 1>(kp, ap + i0 * ldp + (kk0 - g0), ldp, bp, 0, c,
                                                  crow + i0, p * NR, N, bias, kk0 == 0,
                                                  step_act);
            });
        }
    }
  }
}

}  // namespace

int64_t bf16_dot_packed_size(int64_t K, int64_t N) { return round_up(N, NR) * 2 * pair_rows(K); }

// dst = B (K, N) in Layout::pairs: b(k, p*NR + j) at p * Kp * 2NR + (k / 2) * 2NR + 2j + k % 2,
// Kp = pair_rows(K); zero past K and N.
void bf16_dot_pack_b(bf16_t* dst, const bf16_t* b, int64_t ks, int64_t ns, int64_t K,
                     int64_t N) {
  const int64_t panels = (N + NR - 1) / NR, Kp = pair_rows(K);
  const int nt = num_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && K * N > (1 << 16))
  for (int64_t p = 0; p < panels; ++p) {
    bf16_t* d = dst + p * Kp * 2 * NR;
    for (int64_t kk = 0; kk < Kp; ++kk)
      for (int64_t j = 0; j < NR; ++j)
        for (int64_t h = 0; h < 2; ++h) {
          const int64_t k = 2 * kk + h, n = p * NR + j;
          d[kk * 2 * NR + 2 * j + h] = k < K && n < N ? b[k * ks + n * ns] : bf16_t{0};
        }
  }
}

void bf16_dot_gemm(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
                   const PackedB& b, const float* bias, Activation act, int64_t M) {
  if (M == 0 || b.N == 0) return;
  with_type(a, a_dt, [&](auto ap) { gemm_pairs(c, ap, a_rs, a_cs, b, bias, act, M); });
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn

#endif  // MHATTN_BF16_DOT
