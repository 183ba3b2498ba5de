// gemm/amx.cpp: C (M, N) = act(A (M, K) · B (K, N) + bias) for a bfloat16 B on AMX tiles
// (Intel Sapphire Rapids and later), and the same code on an emulation of the tiles.
//
// A tile is 16 rows of 64 bytes. tdpbf16ps C, A, B: C (16 × 16 float32) += A (16 rows × 32
// bfloat16) · B (16 rows of 16 pairs), where B's row kk holds the pairs (b(2kk, n), b(2kk+1, n))
// of 16 columns n: 16 × 16 × 32 products per instruction, over 1 TFLOP/s a thread. So B is the
// bf16_dot layout, Layout::pairs, whose panel of NR = 32 columns is two tiles side by side (rows
// of 128 bytes) and whose pairs of k are padded to kPairAlign = 16 (a tile's rows) on AMX
// targets. A is packed per task in the tile layout (pack_a_tiles): each tile it loads is 1 KB
// in a row, where rows of A's pairs 1-4 KB apart put a tile's 16 rows in a few L1 sets.
//
// Register blocking 2 × 2 (the DESIGN's, and oneDNN's): tiles 0-3 accumulate a 32 × 32 block
// of C from A tiles 4, 5 (rows 0-15, 16-31) and B tiles 6, 7 (columns 0-15, 16-31): four
// tdpbf16ps per two A and two B loads. Loop nest: parallel tasks of (row block, run of panels);
// in a task, groups of up to KG pairs of A packed at once → panel → steps of KCP pairs → blocks
// of 32 rows. A step's 16 KB of the panel stays in L1 while the task's blocks pass and their A
// streams from L2: per four tdpbf16ps, two tile loads from L2 and two from L1. With four from
// L2 the tiles ran at 1.3 TFLOP/s, with two at 2.1 (a micro-benchmark, Intel Xeon with AMX).
// The blocks accumulate in float32 over K in a strip of the panel's C (rows × 32), read and
// written once a step; a finished block goes through store_tile (bias, activation, OutMap)
// once the next block is under way.
//
// The tile configuration (palette 1, every tile 16 rows × 64 bytes) is the same for every
// shape, since partial blocks are padded. Each task loads it when it starts and releases the
// tiles when it ends (TileScope): a flag kept per thread would go stale, because another
// library on the same thread (oneDNN under torch) releases the tiles after its own kernels, and
// a tile instruction without a configuration is an illegal instruction. A load and a release
// cost well under a microsecond against a task's tens; released tiles also spare the OS their
// 8 KB on every context switch. The OS must grant the tile state first (dispatch.cpp asks once,
// at import, and the target is not runnable without it).
//
// The emulation (target amx_emulated, test only) runs the same loop nest and the same tile
// operations written out in plain C++, so the packing, padding and blocking are tested on any
// CPU; the real instructions run where the CPU has them.
#include "gemm/tile.h"

#if defined(MHATTN_AMX)

#include <cstdlib>
#include <cstring>

#if !defined(MHATTN_AMX_EMULATED)
#include <immintrin.h>
#endif

namespace mhattn {
namespace MHATTN_TARGET {
namespace {

constexpr int TM = 16;  // rows of a tile
constexpr int64_t BM = 2 * TM;  // rows of a block: two A tiles
// Pairs of k per step: a multiple of a tile's 16 rows of B; 128 pairs of a 32-column panel are
// 16 KB, in L1 while the blocks of rows pass.
constexpr int64_t KCP = 128;
volatile double g_amx_sink;  // where amx_peak_flops's sum goes, so its loop is not removed
// Rows of a task at most: tasks_of's row blocks of up to MC rows, rounded up to whole blocks.
constexpr int64_t kRowsMax = round_up(MC, BM);

struct TileConfig {  // the 64-byte operand of ldtilecfg, palette 1
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

TileConfig every_tile_16_by_64() {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = TM;
  return c;
}

#if !defined(MHATTN_AMX_EMULATED)

void tile_config() {
  const TileConfig c = every_tile_16_by_64();
  _tile_loadconfig(&c);
}
void tile_release() { _tile_release(); }
// The tile instructions name their tiles in the instruction itself: GCC's intrinsics are
// macros that paste the number in, so the tiles are named by macros too, here and below.
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define TILE_STORE(t, p, stride) _tile_stored(t, p, stride)
#define TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)

#else  // the emulation: the eight tiles of this thread, and the instructions as Intel defines them

struct Tiles {
  alignas(64) unsigned char t[8][TM][64];
  TileConfig cfg;
};
thread_local Tiles g_tiles;

// As on the hardware, an instruction with the tiles released (palette 0) is an error.
void tile_config() { g_tiles.cfg = every_tile_16_by_64(); }
void tile_release() { std::memset(&g_tiles, 0, sizeof g_tiles); }
void check_configured() {
  if (g_tiles.cfg.palette_id != 1) std::abort();
}
void tile_zero(int t) {
  check_configured();
  std::memset(g_tiles.t[t], 0, sizeof g_tiles.t[t]);
}
void tile_load(int t, const void* p, int64_t stride) {
  check_configured();
  for (int r = 0; r < g_tiles.cfg.rows[t]; ++r)
    std::memcpy(g_tiles.t[t][r], static_cast<const char*>(p) + r * stride, g_tiles.cfg.colsb[t]);
}
void tile_store(int t, void* p, int64_t stride) {
  check_configured();
  for (int r = 0; r < g_tiles.cfg.rows[t]; ++r)
    std::memcpy(static_cast<char*>(p) + r * stride, g_tiles.t[t][r], g_tiles.cfg.colsb[t]);
}
inline float bf16_at(const unsigned char* row, int i) {
  uint16_t h;
  std::memcpy(&h, row + 2 * i, 2);
  return to_f32(bf16_t{h});
}
// C[m][n] += A[m].bf16[2k] · B[k].bf16[2n] + A[m].bf16[2k+1] · B[k].bf16[2n+1], over k.
void tile_dp(int tc, int ta, int tb) {
  check_configured();
  const int rows = g_tiles.cfg.rows[ta], pairs = g_tiles.cfg.colsb[ta] / 4,
            cols = g_tiles.cfg.colsb[tc] / 4;
  for (int m = 0; m < rows; ++m)
    for (int n = 0; n < cols; ++n) {
      float c;
      std::memcpy(&c, g_tiles.t[tc][m] + 4 * n, 4);
      for (int k = 0; k < pairs; ++k)
        c += bf16_at(g_tiles.t[ta][m], 2 * k) * bf16_at(g_tiles.t[tb][k], 2 * n) +
             bf16_at(g_tiles.t[ta][m], 2 * k + 1) * bf16_at(g_tiles.t[tb][k], 2 * n + 1);
      std::memcpy(g_tiles.t[tc][m] + 4 * n, &c, 4);
    }
}
#define TILE_ZERO(t) tile_zero(t)
#define TILE_LOAD(t, p, stride) tile_load(t, p, stride)
#define TILE_STORE(t, p, stride) tile_store(t, p, stride)
#define TILE_DP(c, a, b) tile_dp(c, a, b)

#endif

struct TileScope {  // the tiles configured for one task, and released after it
  TileScope() { tile_config(); }
  ~TileScope() { tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// A in the tile layout, for groups of `steps` × 16 pairs of k from k0: block b of 32 rows, step
// s holds two tiles, rows 0-15 then 16-31, each 16 rows of 16 pairs (64 bytes), so that a tile
// load reads 1 KB in a row: the pair (k0 + 32s + 2q, + 1) of row 32b + r at
// ap[((b · steps + s) · 32 + r) · 16 + q]. k past K and rows past `rows` (up to rows_p) are zero.
template <class AT>
void pack_a_tiles(uint32_t* ap, const AT* a, int64_t rs, int64_t cs, int64_t rows,
                  int64_t rows_p, int64_t k0, int64_t steps, int64_t K) {
  for (int64_t i = 0; i < rows_p; ++i) {
    uint32_t* dst = ap + (i / BM) * steps * BM * TM + (i % BM) * TM;
    const AT* src = a + i * rs;
    for (int64_t s = 0; s < steps; ++s, dst += BM * TM) {
      const int64_t k = k0 + 2 * TM * s;
      if (i >= rows) {
        std::memset(dst, 0, TM * sizeof(uint32_t));
      } else if (cs == 1 && k + 2 * TM <= K) {
        _mm512_storeu_si512(dst, pairs_of(src + k));
      } else {
        for (int q = 0; q < TM; ++q) dst[q] = pair_at(src, k + 2 * q, cs, K);
      }
    }
  }
}

// C (32 × 32 float32 at c, rows of 128 bytes) (+)= A (32 rows × 16·steps pairs, tile layout
// from ap) · B (as many pairs of a 32-column panel, rows of 2·NR bf16): C is zeroed first when
// `first`, else read from c.
void block(int64_t steps, const uint32_t* ap, const uint16_t* bp, float* c, bool first) {
  if (first) {
    TILE_ZERO(0);
    TILE_ZERO(1);
    TILE_ZERO(2);
    TILE_ZERO(3);
  } else {
    TILE_LOAD(0, c, 4 * BM);
    TILE_LOAD(1, c + TM, 4 * BM);
    TILE_LOAD(2, c + TM * BM, 4 * BM);
    TILE_LOAD(3, c + TM * BM + TM, 4 * BM);
  }
  for (int64_t s = 0; s < steps; ++s, ap += BM * TM, bp += TM * 2 * NR) {
    TILE_LOAD(4, ap, 4 * TM);            // rows 0-15
    TILE_LOAD(5, ap + TM * TM, 4 * TM);  // rows 16-31
    TILE_LOAD(6, bp, 2 * NR * 2);        // columns 0-15
    TILE_LOAD(7, bp + NR, 2 * NR * 2);   // columns 16-31
    TILE_DP(0, 4, 6);
    TILE_DP(1, 4, 7);
    TILE_DP(2, 5, 6);
    TILE_DP(3, 5, 7);
  }
  TILE_STORE(0, c, 4 * BM);
  TILE_STORE(1, c + TM, 4 * BM);
  TILE_STORE(2, c + TM * BM, 4 * BM);
  TILE_STORE(3, c + TM * BM + TM, 4 * BM);
}

// Columns [n0, n0 + ncols) of a row of a 16-bit C (`row`, OutMap::row_half) = act(t + bias),
// rounded to C's dtype: store_tile for gemm_writes_half's C, which the tiles write once, after
// the whole of K. `col`: C's column of n0 (OutMap::col), where a whole tile lies in one group.
void store_half(const V (&t)[1][NV], const OutMap& c, uint16_t* row, int64_t col, int64_t n0,
                int64_t ncols, const float* bias, Activation act) {
  float v[NR];
  for (int q = 0; q < NV; ++q) {
    V x = t[0][q];
    if (bias && ncols == NR) x = vadd(x, vload(bias + n0 + q * W));
    vstore(v + q * W, x);
  }
  if (bias && ncols < NR)
    for (int64_t j = 0; j < ncols; ++j) v[j] += bias[n0 + j];
  if (act != Activation::none)
    for (int q = 0; q < NV; ++q) vstore(v + q * W, vactivate(act, vload(v + q * W)));
  if (ncols == NR && n0 % c.cols_per_group + NR <= c.cols_per_group) {  // in one group: 2 stores
    for (int q = 0; q < NV; ++q)
      if (c.dtype == DType::bf16) vstore_bf16(row + col + q * W, vload(v + q * W));
      else vstore_f16(row + col + q * W, vload(v + q * W));
    return;
  }
  for (int64_t j = 0, len; j < ncols; j += len) {  // runs of columns inside one column group
    len = std::min(ncols - j, c.cols_per_group - (n0 + j) % c.cols_per_group);
    round_to_half(row + c.col(n0 + j), v + j, len, c.dtype);
  }
}

template <class AT>
void gemm_tiles(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const PackedB& b,
                const float* bias, Activation act, int64_t M) {
  const int64_t N = b.N, K = b.K, Kp = pair_rows(K);
  const uint16_t* bdata = b.half.data();
  const int64_t panel_size = Kp * 2 * NR;
  const int nt = num_threads();
  const Tasks tk = tasks_of(M, N, nt, BM);
#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1 && tk.count > 1 && 2.0 * M * N * K > kParallelFlops)
  for (int64_t t = 0; t < tk.count; ++t) {
    const int64_t m0 = (t / tk.runs) * tk.mc, rows = std::min(tk.mc, M - m0);
    if (rows <= 0) continue;
    const TileScope tiles;
    const int64_t p0 = (t % tk.runs) * tk.run_len, p1 = std::min(tk.panels, p0 + tk.run_len);
    const int64_t rows_p = round_up(rows, BM);
    float* crow[kRowsMax];        // C's rows, float32
    uint16_t* hrow[kRowsMax];     // or 16-bit
    for (int64_t i = 0; i < rows; ++i)
      if (c.dtype == DType::f32) crow[i] = c.row(m0 + i);
      else hrow[i] = c.row_half(m0 + i);
    uint32_t* ap = reinterpret_cast<uint32_t*>(thread_scratch(0, kRowsMax * KG));
    // C of a panel (rows_p × 32 float32): one per panel of the run when K takes several
    // groups, else two in turn, so that a finished block waits in one while the next panel
    // starts in the other.
    const bool per_panel = Kp > KG;
    float* cbuf = thread_scratch(1, (per_panel ? std::max<int64_t>(2, p1 - p0) : 2) * rows_p * BM);
    // A finished block goes to C (bias, activation, OutMap) only after the next one is under
    // way: reading it straight after its tile stores waited for every tdpbf16ps in flight,
    // a quarter of the time of 1024³.
    const float* done = nullptr;  // the finished block waiting for its store, rows from done_i0
    int64_t done_i0 = 0, done_p = 0;
    auto store_done = [&] {
      if (!done) return;
      const int64_t n0 = done_p * NR, ncols = std::min<int64_t>(NR, N - n0), col = c.col(n0);
      for (int64_t i = done_i0; i < std::min(rows, done_i0 + BM); ++i) {
        const float* r = done + (i - done_i0) * BM;
        const V t1[1][NV] = {{vload(r), vload(r + W)}};
        if (c.dtype == DType::f32) store_tile<1>(t1, c, crow + i, n0, ncols, bias, true, act);
        else store_half(t1, c, hrow[i], col, n0, ncols, bias, act);
      }
      done = nullptr;
    };
    for (int64_t g0 = 0; g0 < Kp; g0 += KG) {  // in pairs of k; KG and Kp multiples of 16
      const int64_t g1 = std::min(Kp, g0 + KG), steps = (g1 - g0) / TM;
      pack_a_tiles(ap, a + m0 * a_rs, a_rs, a_cs, rows, rows_p, 2 * g0, steps, K);
      for (int64_t p = p0; p < p1; ++p) {
        float* strip = cbuf + (per_panel ? p - p0 : (p - p0) % 2) * rows_p * BM;
        for (int64_t kk0 = g0; kk0 < g1; kk0 += KCP) {
          const int64_t s0 = (kk0 - g0) / TM, ns = std::min(KCP, g1 - kk0) / TM;
          const bool last = g1 == Kp && kk0 + KCP >= g1;
          const uint16_t* bp = bdata + p * panel_size + kk0 * 2 * NR;
          for (int64_t i0 = 0; i0 < rows_p; i0 += BM) {
            block(ns, ap + ((i0 / BM) * steps + s0) * BM * TM, bp, strip + i0 * BM, kk0 == 0);
            if (!last) continue;
            store_done();
            done = strip + i0 * BM, done_i0 = i0, done_p = p;
          }
        }
      }
    }
    store_done();
  }
}

}  // namespace

#if !defined(MHATTN_AMX_EMULATED)
// Flops of iters rounds of four tdpbf16ps on each of num_threads() threads, the 2 × 2 block's
// four accumulators fed by tiles that stay put: the tiles' peak, for the benchmark.
double amx_peak_flops(int64_t iters) {
  const int nt = num_threads();
  alignas(64) uint16_t ones[TM * 2 * TM];
  std::fill(ones, ones + TM * 2 * TM, bf16_bits(1.0f));
  double sink = 0.0;
#pragma omp parallel num_threads(nt) reduction(+ : sink)
  {
    const TileScope tiles;
    TILE_ZERO(0);
    TILE_ZERO(1);
    TILE_ZERO(2);
    TILE_ZERO(3);
    TILE_LOAD(4, ones, 64);
    TILE_LOAD(5, ones, 64);
    TILE_LOAD(6, ones, 64);
    TILE_LOAD(7, ones, 64);
    for (int64_t i = 0; i < iters; ++i) {
      TILE_DP(0, 4, 6);
      TILE_DP(1, 4, 7);
      TILE_DP(2, 5, 6);
      TILE_DP(3, 5, 7);
    }
    alignas(64) float c[TM * TM];
    TILE_STORE(0, c, 64);
    sink += c[0];
  }
  g_amx_sink = sink;
  return 4.0 * 2 * TM * TM * 2 * TM * static_cast<double>(iters) * nt;
}
#endif

void amx_gemm(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
              const PackedB& b, const float* bias, Activation act, int64_t M) {
  with_type(a, a_dt, [&](auto ap) { gemm_tiles(c, ap, a_rs, a_cs, b, bias, act, M); });
}

#undef TILE_ZERO
#undef TILE_LOAD
#undef TILE_STORE
#undef TILE_DP

}  // namespace MHATTN_TARGET
}  // namespace mhattn

#endif  // MHATTN_AMX
