// gemm/gemm.cpp: the packed GEMM of every target, C (M, N) = act(A (M, K) · B (K, N) + bias),
// float32 arithmetic for A and B of any dtype (float32, bfloat16, float16).
//
// B is packed once into panels of NR columns (pack_b; a layer packs its weights when it is
// built, never per call), in its own dtype: bfloat16 and float16 weights keep half the bytes
// and are widened to float32 in registers as the micro-kernel loads them (vload_f32), which is
// what a decode step, bound by reading B, gains from them. A is packed per block of up to
// MC rows × KC columns into slivers of MR rows, in chunks of W columns (pack_a), widened to
// float32 as it is copied. On CPUs with AVX512-BF16, bfloat16 B takes gemm/bf16_dot.cpp
// instead. The micro-kernel holds an MR × NR tile of C in registers and streams one A sliver
// against one B sliver; the tile is written through OutMap (ops.h), which is how the
// in-projection stores Q, K and V directly in the (B, H, L, E) layout, bias included. The
// activation (activation.h) is applied in the same store, on the last step over K.
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

#include "gemm/tile.h"

namespace mhattn {
namespace MHATTN_TARGET {
namespace {

// The panels of a packed B, as elements of its dtype BT (float, bf16_t, f16_t).
template <class BT>
const BT* b_panels(const PackedB& b) {
  if constexpr (std::is_same_v<BT, float>) return b.data.data();
  else return reinterpret_cast<const BT*>(b.half.data());
}

// C (M, N) = act(A (M, K) · B (K, N) + bias), one element at a time.
template <class AT, class BT>
void gemm_simple(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const PackedB& b,
                 const float* bias, Activation act, int64_t M) {
  const BT* bp = b_panels<BT>(b);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < b.N; ++n) {
      float acc = bias ? bias[n] : 0.0f;
      for (int64_t k = 0; k < b.K; ++k)
        acc += to_f32(a[m * a_rs + k * a_cs]) * to_f32(bp[(n / NR) * b.K * NR + k * NR + n % NR]);
      *c.at(m, n) = activate1(act, acc);
    }
}

// ap: the block A (mc, kc) as slivers of MR rows, each in chunks of W columns: sliver s holds
// a(s*MR + i, k0 + j), k0 a multiple of W, at ap[s * kcp * MR + k0 * MR + i * W + j], kcp = kc
// rounded up to W. A chunk is MR rows of one vector each, so when A's rows are contiguous,
// packing copies vectors (the layout before, k-major, took 5% of a 4096 × 768 → 768 product on
// one thread in scalar stores). Rows past mc and columns past kc are left unset: the
// micro-kernel never reads them. A of a 16-bit dtype AT is widened to float32 here.
template <class AT>
void pack_a(float* ap, const AT* a, int64_t rs, int64_t cs, int64_t mc, int64_t kc) {
  const int64_t kcp = round_up(kc, W);
  for (int64_t i0 = 0; i0 < mc; i0 += MR) {
    float* dst = ap + i0 * kcp;
    for (int64_t i = 0; i < std::min<int64_t>(MR, mc - i0); ++i) {
      const AT* src = a + (i0 + i) * rs;
      int64_t k = 0;
      if (cs == 1)
        for (; k + W <= kc; k += W) vstore(dst + k * MR + i * W, vload_f32(src + k));
      for (; k < kc; ++k) dst[k / W * W * MR + i * W + k % W] = to_f32(src[k * cs]);
    }
  }
}


// C[m0 : m0+R, n0 : n0+P·NR] (+)= ap (an MR × kc sliver, as pack_a lays it out) · P slivers of
// B (kc × NR each, the q-th at bp + q * b_step, elements of BT widened as they are loaded),
// stored by store_tile, columns past N dropped. Registers: R × P·NV accumulators.
template <int R, int P, class BT>
void micro_kernel(int64_t kc, const float* ap, const BT* bp, int64_t b_step, const OutMap& c,
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
      for (int v = 0; v < NV; ++v) b[q * NV + v] = vload_f32(bp + q * b_step + k * NR + v * W);
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
  store_panels<R, P>(acc, c, crow, n0, N, bias, first, act);
}


// C (M, N) = act(A · B + bias) for M <= MR, a decode step: B is read once, from memory, and
// that is all that bounds it. A is packed once, whole K, before the threads start, and each
// task streams its run of panels from start to end in one KC step, P panels side by side.
template <class AT, class BT>
void gemm_one_sliver(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs,
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
        micro_kernel<R, decltype(np)::value>(K, ap, b_panels<BT>(b) + p * K * NR, K * NR, c,
                                             crow, p * NR, N, bias, true, act);
      });
  });
}

// dst = B (K, N) as panels of NR columns, panel p holding b(k, p*NR + j) at
// dst[p * K * NR + k * NR + j], zero past N; elements of T, copied as they are.
template <class T>
void pack_panels(T* dst, const T* b, int64_t ks, int64_t ns, int64_t K, int64_t N) {
  const int64_t panels = (N + NR - 1) / NR;
  const int nt = num_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && K * N > (1 << 16))
  for (int64_t p = 0; p < panels; ++p) {
    T* d = dst + p * K * NR;
    const int64_t n0 = p * NR, cols = std::min<int64_t>(NR, N - n0);
    if (ns == 1) {  // rows of B are contiguous: copy NR at a time
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < cols; ++j) d[k * NR + j] = b[k * ks + n0 + j];
        for (int64_t j = cols; j < NR; ++j) d[k * NR + j] = T{};
      }
    } else {  // columns of B are contiguous (x · Wᵀ with W row-major): walk each along k
      for (int64_t j = 0; j < NR; ++j) {
        const T* src = b + (n0 + j) * ns;
        if (j < cols)
          for (int64_t k = 0; k < K; ++k) d[k * NR + j] = src[k * ks];
        else
          for (int64_t k = 0; k < K; ++k) d[k * NR + j] = T{};
      }
    }
  }
}

// A sliver of B (kc × NR) as float32: B itself, or a 16-bit B widened into buf. A product of
// many rows widens each sliver once, into L1, for all its row slivers to share; widened in the
// micro-kernel at every use instead, a compute-bound float16 product ran at 0.56-0.76x the
// speed of float32 (Zen 4, one run: vcvtph2ps beside the FMAs).
template <class BT>
const float* widened(const BT* bp, int64_t kc, float* buf) {
  if constexpr (std::is_same_v<BT, float>) {
    return bp;
  } else {
    for (int64_t i = 0; i < kc * NR; i += W) vstore(buf + i, vload_f32(bp + i));
    return buf;
  }
}

template <class AT, class BT>
void gemm_typed(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const PackedB& b,
                const float* bias, Activation act, int64_t M) {
  const int64_t N = b.N, K = b.K;
  if (M == 0 || N == 0) return;
  const double flops = 2.0 * M * N * K;
  if (K == 0 || flops < kTinyFlops) return gemm_simple<AT, BT>(c, a, a_rs, a_cs, b, bias, act, M);
  if (M <= MR) return gemm_one_sliver<AT, BT>(c, a, a_rs, a_cs, b, bias, act, M);

  const int nt = num_threads();
  const Tasks tk = tasks_of(M, N, nt);
  const int64_t mc = tk.mc, panels = tk.panels, runs = tk.runs, run_len = tk.run_len,
                tasks = tk.count;

#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1 && tasks > 1 && flops > kParallelFlops)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t m0 = (t / runs) * mc, rows = std::min(mc, M - m0);
    if (rows <= 0) continue;
    const int64_t p0 = (t % runs) * run_len, p1 = std::min(panels, p0 + run_len);
    float* ap = thread_scratch(0, MC * KG);
    float* wbuf = std::is_same_v<BT, float> ? nullptr : thread_scratch(1, KC * NR);
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
          const float* bp = widened(b_panels<BT>(b) + p * K * NR + k0 * NR, kc, wbuf);
          const float* apk = ap + (k0 - g0) * rows_p;
          for (int64_t i0 = 0; i0 < rows; i0 += MR)
            with_rows<MR>(std::min<int64_t>(MR, rows - i0), [&](auto r) {
              micro_kernel<decltype(r)::value, 1>(kc, apk + i0 * kcp, bp, 0, c, crow + i0,
                                                  p * NR, N, bias, k0 == 0, step_act);
            });
        }
    }
  }
}

// A's dtype, then B's: the instance of gemm_typed for them.
template <class AT>
void gemm_a(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const PackedB& b,
            const float* bias, Activation act, int64_t M) {
  switch (b.dtype) {
    case DType::f32: return gemm_typed<AT, float>(c, a, a_rs, a_cs, b, bias, act, M);
    case DType::bf16: return gemm_typed<AT, bf16_t>(c, a, a_rs, a_cs, b, bias, act, M);
    case DType::f16: return gemm_typed<AT, f16_t>(c, a, a_rs, a_cs, b, bias, act, M);
  }
}

}  // namespace

int panel_width() { return NR; }

Layout b_layout(DType dt) {
  return dt == DType::bf16 && bf16_dot_available() ? Layout::pairs : Layout::panels;
}

int64_t packed_size(int64_t K, int64_t N, DType dt) {
#if defined(__AVX512BF16__)
  if (b_layout(dt) == Layout::pairs) return bf16_dot_packed_size(K, N);
#endif
  return round_up(N, NR) * K;
}

void pack_b(void* dst, const void* b, DType dt, int64_t ks, int64_t ns, int64_t K, int64_t N) {
#if defined(__AVX512BF16__)
  if (b_layout(dt) == Layout::pairs)
    return bf16_dot_pack_b(static_cast<bf16_t*>(dst), static_cast<const bf16_t*>(b), ks, ns,
                           K, N);
#endif
  if (dt == DType::f32)
    pack_panels(static_cast<float*>(dst), static_cast<const float*>(b), ks, ns, K, N);
  else  // bf16 and f16 alike: their 16 bits, copied as they are
    pack_panels(static_cast<f16_t*>(dst), static_cast<const f16_t*>(b), ks, ns, K, N);
}

void gemm(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
          const PackedB& b, const float* bias, Activation act, int64_t M) {
#if defined(MHATTN_AMX)
  if (b.layout == Layout::pairs && M >= kAmxMinRows && b.K > 0)
    return amx_gemm(c, a, a_dt, a_rs, a_cs, b, bias, act, M);
#endif
#if defined(__AVX512BF16__)
  if (b.layout == Layout::pairs) return bf16_dot_gemm(c, a, a_dt, a_rs, a_cs, b, bias, act, M);
#endif
  with_a_type(a, a_dt, [&](auto ap) { gemm_a(c, ap, a_rs, a_cs, b, bias, act, M); });
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
