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
// A product of a few rows (decode steps: up to kFewRows on packed B, MR on any) goes through
// gemm_few_rows instead, which streams several panels of B side by side, A packed once.
// gemm_simple is the same product as three plain loops: it is the definition a reader checks
// the fast path against, and it serves K = 0 and products too small to be worth packing A.
//
// gemm_raw is the same GEMM on a B that nobody packed (the one-shot mhattn.linear and matmul):
// it never copies the whole of B. The loop nest is gemm_typed's, and each KC × NR sliver of B
// is copied (transposed, when B's columns are contiguous, as for x · Wᵀ) into an L1 buffer just
// before the row slivers use it, as a 16-bit packed B is widened. A product of a few rows reads
// B where it lies: each row of B scaled into the rows of C when B's rows are contiguous
// (gemm_axpy, up to kAxpyRows rows), dot products with the rows of W when its columns are
// (gemm_dot, up to kInPlaceRows); other strides of up to MR rows go through gemm_few_rows,
// which copies B a panel at a time.
#include <algorithm>

#include "gemm/tile.h"

namespace mhattn {
namespace MHATTN_TARGET {
namespace {

// Where the loops below read B (K, N), of dtype BT (float, bf16_t, f16_t): one of two sources
// with the same three answers.
//   at(k, n):                b(k, n) as float32 (gemm_simple's);
//   sliver(p, k0, kc, buf):  rows k0 .. k0 + kc of panel p (columns p·NR ..), as float32 rows
//                            NR apart, zero past N: in place, or copied into buf (kc × NR);
//   kInPlace, panel(p):      whether the panels can be read where they lie (in BT), and where.
//
// Panels: a B that pack_b laid out (Layout::panels). A float32 sliver is read in place; a
// 16-bit one is widened into buf, once, for all the row slivers that share it (L1). Widened in
// the micro-kernel at every use instead, a compute-bound float16 product ran at 0.56-0.76x the
// speed of float32 (Zen 4, one run: vcvtph2ps beside the FMAs).
template <class BT>
struct Panels {
  const BT* p;
  int64_t K, N;
  explicit Panels(const PackedB& b)
      : p(std::is_same_v<BT, float> ? reinterpret_cast<const BT*>(b.data.data())
                                    : reinterpret_cast<const BT*>(b.half.data())),
        K(b.K), N(b.N) {}
  Panels(const BT* panels, int64_t k, int64_t n) : p(panels), K(k), N(n) {}
  float at(int64_t k, int64_t n) const { return to_f32(p[(n / NR) * K * NR + k * NR + n % NR]); }
  const float* sliver(int64_t panel, int64_t k0, int64_t kc, float* buf) const {
    const BT* src = p + panel * K * NR + k0 * NR;
    if constexpr (std::is_same_v<BT, float>) return src;
    for (int64_t i = 0; i < kc * NR; i += W) vstore(buf + i, vload_f32(src + i));
    return buf;
  }
  static constexpr bool kInPlace = true;
  const BT* panel(int64_t q) const { return p + q * K * NR; }
};

// Strided: B as the caller holds it, b(k, n) = b[k·ks + n·ns]. A sliver is copied into buf:
// by vectors when B's rows are contiguous (ns = 1: A @ B), by W × W blocks transposed in
// registers when its columns are (ks = 1: x · Wᵀ, W (N, K) row-major), one value at a time
// otherwise and at the edges. The copy is contiguous in L1, clear of the cache-set conflicts
// that rows of B 2^k bytes apart would have there.
template <class BT>
struct Strided {
  const BT* b;
  int64_t ks, ns, K, N;
  float at(int64_t k, int64_t n) const { return to_f32(b[k * ks + n * ns]); }
  const float* sliver(int64_t panel, int64_t k0, int64_t kc, float* buf) const {
    const int64_t n0 = panel * NR, cols = std::min<int64_t>(NR, N - n0);
    const BT* src = b + k0 * ks + n0 * ns;
    int64_t kv = 0, jv = 0;  // rows and columns done by vectors
    if (ns == 1 && cols == NR) {
      for (int64_t k = 0; k < kc; ++k) {
        // The same rows of the next panel, which the next call copies: rows ks apart are
        // apart in memory too, and no hardware prefetcher follows them.
        for (int v = 0; v < NV; ++v) __builtin_prefetch(src + k * ks + NR + v * W, 0, 2);
        for (int v = 0; v < NV; ++v) vstore(buf + k * NR + v * W, vload_f32(src + k * ks + v * W));
      }
      kv = kc, jv = NR;
    } else if (ks == 1) {
      kv = kc / W * W, jv = cols / W * W;
      for (int64_t j = 0; j < jv; j += W)
        for (int64_t k = 0; k < kv; k += W) {
          V r[W];
          for (int i = 0; i < W; ++i) r[i] = vload_f32(src + (j + i) * ns + k);
          vtranspose(r);  // r[i]: row k + i, columns j .. j + W
          for (int i = 0; i < W; ++i) vstore(buf + (k + i) * NR + j, r[i]);
        }
    }
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t j = k < kv ? jv : 0; j < NR; ++j)
        buf[k * NR + j] = j < cols ? to_f32(src[k * ks + j * ns]) : 0.0f;
    return buf;
  }
  static constexpr bool kInPlace = false;
};

// C (M, N) = act(A (M, K) · B (K, N) + bias), one element at a time.
template <class AT, class Src>
void gemm_simple(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const Src& b,
                 const float* bias, Activation act, int64_t M) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < b.N; ++n) {
      float acc = bias ? bias[n] : 0.0f;
      for (int64_t k = 0; k < b.K; ++k) acc += to_f32(a[m * a_rs + k * a_cs]) * b.at(k, n);
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


// C[m, n0 : n0 + cols] = act(vals + bias): the stores of gemm_dot and gemm_axpy. OutMap::col
// divides, so it is worked out once for each run of columns within one column group.
inline void store_run(const OutMap& c, int64_t m, int64_t n0, const float* vals, int64_t cols,
                      const float* bias, Activation act) {
  float* row = c.row(m);
  for (int64_t j = 0, len; j < cols; j += len) {
    len = std::min(cols - j, c.cols_per_group - (n0 + j) % c.cols_per_group);
    float* dst = row + c.col(n0 + j);
    for (int64_t u = 0; u < len; ++u)
      dst[u] = activate1(act, vals[j + u] + (bias ? bias[n0 + j + u] : 0.0f));
  }
}

// C (M, N) = act(A · B + bias) for M <= kFewRows (a packed B) or M <= MR (any B), decode steps of
// one or a few sequences: B is read once, from memory, and that is what bounds it. A is packed
// once, whole K, before the threads start, and each task streams its run of panels from start to
// end: P panels side by side for a packed B, one at a time through a copy for a strided one
// (gemm_raw sends the common strided ones of a few rows to gemm_dot and gemm_axpy).
// One sliver of A (M <= MR) keeps its C tile in registers over the whole of K. Several take KC
// steps: the first sliver reads a step's rows of B from memory, and the others find them in L1.
// Through gemm_typed's row blocks instead, which read B a panel at a time in runs of KG rows, 8
// rows took 1.4x as long as 6 (4096 × 4096 weights, 2 threads, Zen 4).
template <class AT, class Src>
void gemm_few_rows(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const Src& b,
                   const float* bias, Activation act, int64_t M) {
  const int64_t N = b.N, K = b.K, kp = round_up(K, W);
  const int nt = num_threads();
  const int64_t panels = (N + NR - 1) / NR;
  const int64_t runs = std::min<int64_t>(panels, 2 * nt);
  const int64_t run_len = (panels + runs - 1) / runs;
  const int64_t slivers = (M + MR - 1) / MR, kstep = slivers == 1 ? K : KC;
  float* ap = shared_scratch(slivers * MR * kp);
  pack_a(ap, a, a_rs, a_cs, M, K);
  float* crow[kFewRows];
  for (int64_t i = 0; i < M; ++i) crow[i] = c.row(i);
  // The widest sliver's rows (M itself when it is the only one) set P.
  with_rows<MR>(std::min<int64_t>(M, MR), [&](auto r) {
    constexpr int R = decltype(r)::value;
#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1 && 2.0 * M * N * K > kParallelFlops)
    for (int64_t t = 0; t < runs; ++t)
      walk_panels<stream_panels(R)>(t * run_len, std::min(panels, (t + 1) * run_len),
                                    [&](auto np, int64_t p) {
        constexpr int P = decltype(np)::value;
        float* buf = Src::kInPlace ? nullptr : thread_scratch(1, kstep * NR);
        for (int64_t k0 = 0; k0 < K; k0 += kstep) {
          const int64_t kc = std::min(kstep, K - k0);
          const Activation step_act = k0 + kc == K ? act : Activation::none;
          // The slivers of A against q panels of B from bq (panels b_step apart), rows k0 ..
          auto slivers_times = [&](auto nq, auto bq, int64_t b_step, int64_t p0) {
            constexpr int Q = decltype(nq)::value;
            for (int64_t i0 = 0; i0 < M; i0 += MR) {
              const float* as = ap + i0 * kp + k0 * MR;
              if (M - i0 >= R)  // every sliver but a last, shorter one
                micro_kernel<R, Q>(kc, as, bq, b_step, c, crow + i0, p0 * NR, N, bias, k0 == 0,
                                   step_act);
              else if constexpr (R == MR)  // (a shorter sliver follows only full ones)
                with_rows<MR>(M - i0, [&](auto rr) {
                  micro_kernel<decltype(rr)::value, Q>(kc, as, bq, b_step, c, crow + i0, p0 * NR, N,
                                                       bias, k0 == 0, step_act);
                });
            }
          };
          if constexpr (Src::kInPlace) {
            slivers_times(np, b.panel(p) + k0 * NR, K * NR, p);
          } else {
            for (int q = 0; q < P; ++q)
              slivers_times(std::integral_constant<int, 1>{}, b.sliver(p + q, k0, kc, buf), 0,
                            p + q);
          }
        }
      });
  });
}

// Rows of W side by side in gemm_dot, J: R · J accumulators, J rows of W and one of A in
// registers (32 with AVX-512; 16 with AVX2 and the portable path, so fewer there), and up to
// 8 streams from memory. In one run of 1 × 4096 → 4096 on 2 threads (Zen 4, AVX-512), 8 rows
// read W at the speed of a plain read (1.9-2.0 ms), 4 and 2 at 2.3-2.7 ms, 16 at 3.0-3.6;
// a software prefetch 512 floats ahead made every one slower.
constexpr int dot_cols(int rows) {
  return std::max(2, std::min(8, (W == 16 ? 24 : 12) / rows));
}
// Rows of A for which gemm_dot and gemm_axpy read B in place: up to 8 with AVX-512, whose
// registers then hold 3 rows of W beside them in gemm_dot; MR elsewhere. With 12 rows (2 rows
// of W, too few streams from memory) 12 × 4096 → 4096 took 6.6 ms in gemm_dot, against 5 in
// gemm_few_rows; 8 rows took 3.5 ms, against 4.3-4.7 there, where B's slivers are copied; and
// A @ B of 8 rows, whose slivers of B are rows 16 KB apart, 7.7 ms there (Zen 4, 2 threads).
constexpr int64_t kInPlaceRows = W == 16 ? 8 : MR;
// gemm_axpy holds U rows of B and one accumulator in registers whatever the rows of A, so it
// takes 8 on every target. 8 × 4096 → 4096 (A @ B) on AVX2, 2 threads, Zen 3: 7.7-10.3 ms
// through the row blocks with MR = 6 as its limit, against NumPy's 4.7-5.2.
constexpr int64_t kAxpyRows = 8;

// C (M, N) = act(A (M, K) · B + bias) for M <= kInPlaceRows and B's columns contiguous: B = Wᵀ with
// W (N, K) row-major, a decode step's x · Wᵀ on weights nobody packed. C(m, n) is the dot product
// of row m of A (widened to float32 once, rows K apart in shared scratch) with row n of W, read in
// place: J rows of W stream side by side, each read once, and A stays in cache.
template <class AT, class BT>
void gemm_dot(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const Strided<BT>& b,
              const float* bias, Activation act, int64_t M) {
  const int64_t N = b.N, K = b.K, kv = K / W * W;
  const int nt = num_threads();
  float* ap = shared_scratch(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) ap[m * K + k] = to_f32(a[m * a_rs + k * a_cs]);
  with_rows<kInPlaceRows>(M, [&](auto r) {
    constexpr int R = decltype(r)::value, J = dot_cols(R);
    const int64_t groups = (N + J - 1) / J;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && 2.0 * M * N * K > kParallelFlops)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t n0 = g * J, cols = std::min<int64_t>(J, N - n0);
      const BT* w[J];
      for (int j = 0; j < J; ++j) w[j] = b.b + (n0 + std::min<int64_t>(j, cols - 1)) * b.ns;
      V acc[R][J];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < J; ++j) acc[i][j] = vzero();
      for (int64_t k = 0; k < kv; k += W) {
        V wk[J];
        for (int j = 0; j < J; ++j) wk[j] = vload_f32(w[j] + k);
        for (int i = 0; i < R; ++i) {
          const V x = vload(ap + i * K + k);
          for (int j = 0; j < J; ++j) acc[i][j] = vfma(x, wk[j], acc[i][j]);
        }
      }
      for (int i = 0; i < R; ++i) {
        float sums[J];
        for (int64_t j = 0; j < cols; ++j) {
          sums[j] = vhsum(acc[i][j]);
          for (int64_t k = kv; k < K; ++k) sums[j] += ap[i * K + k] * to_f32(w[j][k]);
        }
        store_run(c, i, n0, sums, cols, bias, act);
      }
    }
  });
}

// C (M, N) = act(A (M, K) · B + bias) for M <= kAxpyRows and B's rows contiguous (A @ B with B
// (K, N) row-major, a decode step's product on a B nobody packed): row k of B, read in place,
// scaled by a(m, k) and added into row m of an accumulator in scratch, U = 8 rows of B at a time.
// The columns are cut into blocks of at most 16 KB of accumulators (in L1), at least one block per
// thread, so that each row of B is read in runs of pages. Walking panels of B down its rows
// instead, a few hundred bytes of each row at a time, read 1 × 4096 → 4096 at 0.5x NumPy. In one
// run of that product (Zen 4, 2 threads), 8 rows at a time in runs of 8 KB took 1.9-2.0 ms (a plain
// read of B: 1.9-2.2), 4 rows 2.2, 2 rows 2.6-2.9, 8 rows in runs of 2 KB 3.5-4.7.
template <class AT, class BT>
void gemm_axpy(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const Strided<BT>& b,
               const float* bias, Activation act, int64_t M) {
  constexpr int U = 8;
  const int64_t N = b.N, K = b.K;
  const int nt = num_threads();
  const int64_t block = round_up(std::min((4096 / M) / W * W, (N + nt - 1) / nt), W);
  const int64_t blocks = (N + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && 2.0 * M * N * K > kParallelFlops)
  for (int64_t t = 0; t < blocks; ++t) {
    const int64_t n0 = t * block, cols = std::min(block, N - n0), cv = cols / W * W;
    float* acc = thread_scratch(1, M * block);
    for (int64_t i = 0; i < M * block; ++i) acc[i] = 0.0f;
    for (int64_t k = 0; k < K; k += U) {
      const int64_t rows = std::min<int64_t>(U, K - k);
      const BT* br[U];
      float x[kAxpyRows][U];
      for (int u = 0; u < U; ++u) {
        br[u] = b.b + (k + std::min<int64_t>(u, rows - 1)) * b.ks + n0;
        for (int64_t m = 0; m < M; ++m) x[m][u] = u < rows ? to_f32(a[m * a_rs + (k + u) * a_cs]) : 0.0f;
      }
      for (int64_t j = 0; j < cv; j += W) {
        V bu[U];
        for (int u = 0; u < U; ++u) bu[u] = vload_f32(br[u] + j);
        for (int64_t m = 0; m < M; ++m) {
          V s = vload(acc + m * block + j);
          for (int u = 0; u < U; ++u) s = vfma(vset1(x[m][u]), bu[u], s);
          vstore(acc + m * block + j, s);
        }
      }
      for (int64_t j = cv; j < cols; ++j)
        for (int64_t m = 0; m < M; ++m)
          for (int u = 0; u < rows; ++u) acc[m * block + j] += x[m][u] * to_f32(br[u][j]);
    }
    for (int64_t m = 0; m < M; ++m) store_run(c, m, n0, acc + m * block, cols, bias, act);
  }
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

// gemm and gemm_raw: C (M, N) = act(A · B + bias), B read from the source b (Panels or Strided).
template <class AT, class Src>
void gemm_typed(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const Src& b,
                const float* bias, Activation act, int64_t M) {
  const int64_t N = b.N, K = b.K;
  if (M == 0 || N == 0) return;
  const double flops = 2.0 * M * N * K;
  if (K == 0 || flops < kTinyFlops) return gemm_simple(c, a, a_rs, a_cs, b, bias, act, M);
  // (A strided B of more rows keeps the row blocks: gemm_few_rows would copy each panel's
  // rows of B, 16 KB apart in A @ B at N = 4096, a whole panel after another, and took 8.1-8.8
  // ms on 9-12 × 4096 → 4096 against 6.4-7.0 here; x · Wᵀ ran alike both ways.)
  if (M <= MR || (Src::kInPlace && M <= kFewRows))
    return gemm_few_rows(c, a, a_rs, a_cs, b, bias, act, M);

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
    float* wbuf = thread_scratch(1, KC * NR);
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
          const float* bp = b.sliver(p, k0, kc, wbuf);
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



// gemm_raw for a product of many row blocks, which in gemm_typed would each copy the same
// slivers of B again (M = 4096: 30 times). In one A/B of three alternating runs (2 threads,
// Zen 4), this took the one-shot calls from 3-14% slower than the packed layer to 0-7% on
// 2048³ and 4096 × 768 → 2304. The columns of B in blocks of at most kRawBlock
// floats (4 MB, in L3) and of at least the threads' share of the panels, each block copied once
// into float32 panels (Strided::sliver over the whole of K, the threads sharing the panels),
// then multiplied as a packed B. The block lives in the calling thread's shared_scratch, which
// gemm_typed leaves alone for products of more than MR rows. C must be one column group (a
// plain row-major C, as gemm_unpacked's callers have).
constexpr int64_t kRawBlock = int64_t{1} << 20;
template <class AT, class BT>
void gemm_raw_blocks(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs,
                     const Strided<BT>& b, const float* bias, Activation act, int64_t M) {
  const int64_t K = b.K, N = b.N;
  const int nt = num_threads();
  const int64_t panels = (N + NR - 1) / NR;
  const int64_t per_block = std::max<int64_t>(std::min<int64_t>(kRawBlock / (K * NR), panels),
                                              std::min<int64_t>(4 * nt, panels));
  float* block = shared_scratch(per_block * K * NR);
  for (int64_t p0 = 0; p0 < panels; p0 += per_block) {
    const int64_t p1 = std::min(panels, p0 + per_block), n0 = p0 * NR;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t p = p0; p < p1; ++p) b.sliver(p, 0, K, block + (p - p0) * K * NR);
    OutMap part = c;  // columns n0 .. of C, one column group
    part.data = c.data + n0;
    part.cols_per_group = std::min(N, p1 * NR) - n0;
    gemm_typed(part, a, a_rs, a_cs, Panels<float>(block, K, part.cols_per_group),
               bias ? bias + n0 : nullptr, act, M);
  }
}

}  // namespace

int panel_width() { return NR; }

Layout b_layout(DType dt) {
  return dt == DType::bf16 && bf16_dot_available() ? Layout::pairs : Layout::panels;
}

int64_t packed_size(int64_t K, int64_t N, DType dt) {
#if defined(MHATTN_BF16_DOT)
  if (b_layout(dt) == Layout::pairs) return bf16_dot_packed_size(K, N);
#endif
  return round_up(N, NR) * K;
}

void pack_b(void* dst, const void* b, DType dt, int64_t ks, int64_t ns, int64_t K, int64_t N) {
#if defined(MHATTN_BF16_DOT)
  if (b_layout(dt) == Layout::pairs)
    return bf16_dot_pack_b(static_cast<bf16_t*>(dst), static_cast<const bf16_t*>(b), ks, ns,
                           K, N);
#endif
  if (dt == DType::f32)
    pack_panels(static_cast<float*>(dst), static_cast<const float*>(b), ks, ns, K, N);
  else  // bf16 and f16 alike: their 16 bits, copied as they are
    pack_panels(static_cast<f16_t*>(dst), static_cast<const f16_t*>(b), ks, ns, K, N);
}

namespace {
bool takes_amx(const PackedB& b, int64_t M) {
#if defined(MHATTN_AMX)
  return b.layout == Layout::pairs && M >= kAmxMinRows && b.K > 0;
#else
  (void)b, (void)M;
  return false;
#endif
}
}  // namespace

bool gemm_writes_half(const PackedB& b, int64_t M) { return takes_amx(b, M); }

void gemm(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
          const PackedB& b, const float* bias, Activation act, int64_t M) {
#if defined(MHATTN_AMX)
  if (takes_amx(b, M)) return amx_gemm(c, a, a_dt, a_rs, a_cs, b, bias, act, M);
#endif
#if defined(MHATTN_BF16_DOT)
  if (b.layout == Layout::pairs) return bf16_dot_gemm(c, a, a_dt, a_rs, a_cs, b, bias, act, M);
#endif
  with_type(a, a_dt, [&](auto ap) {
    switch (b.dtype) {
      case DType::f32: return gemm_typed(c, ap, a_rs, a_cs, Panels<float>(b), bias, act, M);
      case DType::bf16: return gemm_typed(c, ap, a_rs, a_cs, Panels<bf16_t>(b), bias, act, M);
      case DType::f16: return gemm_typed(c, ap, a_rs, a_cs, Panels<f16_t>(b), bias, act, M);
    }
  });
}

void gemm_raw(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
              const void* b, DType b_dt, int64_t b_ks, int64_t b_ns, int64_t K, int64_t N,
              const float* bias, Activation act, int64_t M) {
  // A and B of one dtype (gemm_unpacked checks; linear and matmul convert both to it): a third
  // of the instances of the templates below that any pair of dtypes would take.
  (void)a_dt;
  with_type(b, b_dt, [&](auto bp) {
    using BT = std::remove_const_t<std::remove_pointer_t<decltype(bp)>>;
    const BT* ap = static_cast<const BT*>(a);
    const Strided<BT> src{bp, b_ks, b_ns, K, N};
    const bool worth = M > 0 && N > 0 && 2.0 * M * N * K >= kTinyFlops;
    if (worth && M <= kAxpyRows && b_ns == 1) return gemm_axpy(c, ap, a_rs, a_cs, src, bias, act, M);
    if (worth && M <= kInPlaceRows && b_ks == 1) return gemm_dot(c, ap, a_rs, a_cs, src, bias, act, M);
    if (M >= 2 * MC && K > 0 && c.cols_per_group >= N)
      return gemm_raw_blocks(c, ap, a_rs, a_cs, src, bias, act, M);
    gemm_typed(c, ap, a_rs, a_cs, src, bias, act, M);
  });
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
