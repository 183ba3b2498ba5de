// gemm/amx.cpp: C (M, N) = act(A (M, K) · B (K, N) + bias) for a bfloat16 B on AMX tiles
// (Intel Sapphire Rapids and later), and the same code on an emulation of the tiles.
//
// A tile is 16 rows of 64 bytes. tdpbf16ps C, A, B: C (16 × 16 float32) += A (16 rows × 32
// bfloat16) · B (16 rows of 16 pairs), where B's row kk holds the pairs (b(2kk, n), b(2kk+1, n))
// of 16 columns n: 16 × 16 × 32 products per instruction, over 1 TFLOP/s a thread. So B is the
// bf16_dot layout, Layout::pairs, whose panel of NR = 32 columns is two tiles side by side (rows
// of 128 bytes) and whose pairs of k are padded to kPairAlign = 16 (a tile's rows) on AMX
// targets. A is packed as bf16_dot packs it, rows of pairs, padded with zero pairs to the
// step's and with zero rows to a whole block.
//
// Register blocking 2 × 2 (the DESIGN's, and oneDNN's): tiles 0-3 accumulate a 32 × 32 block
// of C from A tiles 4, 5 (rows 0-15, 16-31) and B tiles 6, 7 (columns 0-15, 16-31): four
// tdpbf16ps per two A and two B loads. The block goes through a float32 buffer to store_tile,
// which adds the bias, applies the activation on the last step over K and writes through OutMap.
// Loop nest as bf16_dot's: parallel tasks of (row block, run of panels); in a task, groups of up
// to KG pairs of A packed at once → panel → steps of KCP pairs → blocks of 32 rows.
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

// cbuf (32 × 32 float32, rows of 128 bytes) = A (32 rows of kp pairs, rows lda words apart)
// · B (kp pairs of a 32-column panel, rows of 2·NR bf16); kp a multiple of 16.
void block(int64_t kp, const uint32_t* ap, int64_t lda, const uint16_t* bp, float* cbuf) {
  TILE_ZERO(0);
  TILE_ZERO(1);
  TILE_ZERO(2);
  TILE_ZERO(3);
  for (int64_t kk = 0; kk < kp; kk += TM) {
    TILE_LOAD(4, ap + kk, lda * 4);                    // rows 0-15
    TILE_LOAD(5, ap + TM * lda + kk, lda * 4);         // rows 16-31
    TILE_LOAD(6, bp + kk * 2 * NR, 2 * NR * 2);        // columns 0-15
    TILE_LOAD(7, bp + kk * 2 * NR + NR, 2 * NR * 2);   // columns 16-31
    TILE_DP(0, 4, 6);
    TILE_DP(1, 4, 7);
    TILE_DP(2, 5, 6);
    TILE_DP(3, 5, 7);
  }
  TILE_STORE(0, cbuf, 4 * BM);
  TILE_STORE(1, cbuf + TM, 4 * BM);
  TILE_STORE(2, cbuf + TM * BM, 4 * BM);
  TILE_STORE(3, cbuf + TM * BM + TM, 4 * BM);
}

template <class AT>
void gemm_tiles(const OutMap& c, const AT* a, int64_t a_rs, int64_t a_cs, const PackedB& b,
                const float* bias, Activation act, int64_t M) {
  const int64_t N = b.N, K = b.K, Kp = pair_rows(K);
  const uint16_t* bdata = b.half.data();
  const int64_t panel_size = Kp * 2 * NR;
  const int nt = num_threads();
  const Tasks tk = tasks_of(M, N, nt);
#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1 && tk.count > 1 && 2.0 * M * N * K > kParallelFlops)
  for (int64_t t = 0; t < tk.count; ++t) {
    const int64_t m0 = (t / tk.runs) * tk.mc, rows = std::min(tk.mc, M - m0);
    if (rows <= 0) continue;
    const TileScope tiles;
    const int64_t p0 = (t % tk.runs) * tk.run_len, p1 = std::min(tk.panels, p0 + tk.run_len);
    const int64_t rows_p = round_up(rows, BM);
    float* crow[MC];
    for (int64_t i = 0; i < rows; ++i) crow[i] = c.row(m0 + i);
    uint32_t* ap = reinterpret_cast<uint32_t*>(thread_scratch(0, (MC + BM) * KG));
    float* cbuf = thread_scratch(1, BM * BM);
    for (int64_t g0 = 0; g0 < Kp; g0 += KG) {  // in pairs of k; KG and Kp multiples of 16
      const int64_t g1 = std::min(Kp, g0 + KG), ldp = g1 - g0;
      pack_a_pairs(ap, a + m0 * a_rs, a_rs, a_cs, rows, 2 * g0, ldp, K);
      std::memset(ap + rows * ldp, 0, (rows_p - rows) * ldp * sizeof(uint32_t));
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t kk0 = g0; kk0 < g1; kk0 += KCP) {
          const int64_t kp = std::min(KCP, g1 - kk0);
          const Activation step_act = kk0 + kp == Kp ? act : Activation::none;
          const uint16_t* bp = bdata + p * panel_size + kk0 * 2 * NR;
          for (int64_t i0 = 0; i0 < rows; i0 += BM) {
            block(kp, ap + i0 * ldp + (kk0 - g0), ldp, bp, cbuf);
            for (int64_t i = i0; i < std::min(rows, i0 + BM); ++i) {
              const V t1[1][NV] = {{vload(cbuf + (i - i0) * BM), vload(cbuf + (i - i0) * BM + W)}};
              store_tile<1>(t1, c, crow + i, p * NR, std::min<int64_t>(NR, N - p * NR), bias,
                            kk0 == 0, step_act);
            }
          }
        }
    }
  }
}

}  // namespace

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
