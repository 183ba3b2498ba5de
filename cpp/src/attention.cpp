// attention.cpp: fused scaled dot-product attention for every target (arguments: AttnArgs, ops.h).
//
// out (B, Hq, L, Ev) = softmax(scale · q kᵀ + masks) · v, computed for a tile of query rows at
// a time against blocks of keys with the online softmax (a running max m and sum l per row),
// so the L × S scores are never stored unless the weights are asked for.
//
// Tasks are (b, kv head, tile of bq rows, tile_rows()). The rows of a tile are the (l, g) pairs
// of the G = Hq / Hkv query heads that share the kv head, l-major: with grouped-query attention
// every key block is loaded once for all the heads that read it. Per tile and block of bk keys:
//   1. kt = kᵀ of the block in panels of 2W keys (E × 2W each, as gemm.cpp packs B), keys
//      padded with zeros to bkp, a multiple of 2W
//   2. S (R × bkp) = qs · kt, where qs (R × E) holds the tile's query rows times scale
//   3. S = -inf where a bool mask says no, S += float masks, then S = -inf outside each row's
//      causal/window bounds (whatever a float mask added there) and in the padding
//   4. per row: m' = max(m, max_j S), P = exp(S - m'), l = l · exp(m - m') + Σ P,
//      O = O · exp(m - m'), m = m'
//   5. O (R × evp) += P · vp, where vp is the block of v in panels of 2W dims (bk × 2W each,
//      the last W wide when evp is an odd number of vectors), Ev padded to evp
// and at the end out = O / l, a row with l = 0 (no visible key) giving zeros rather than NaN.
// With weights asked for, a first pass (steps 1-4 without O) finds every row's m and l, and a
// second writes P = exp(S - m) / l to the weights and accumulates O = P · v.
// Blocks outside every row's causal/window bounds are never visited.
// Two variants of step 1: tiles of at most kDirectRows rows (decode) pack nothing and read k
// and v where they lie (qk_direct; decode is bound by reading them once), and heads with many
// tiles have all their blocks packed once per call, before the tiles run.
// On AVX-512, tiles without weights to write take the lanes path instead (below merge_row):
// W query rows at a time, one per lane of a vector, k and v read in place.
// k and v are float32, or bfloat16 or float16 read where they lie: on the direct path (decode,
// a KV cache in half the bytes) widened in registers, on the packed path widened as each block
// is packed, and bfloat16 on the lanes path of targets with AVX512-BF16, multiplied as it is
// (vdpbf16ps, below attend_tile_lanes). mhattn::attention (mha.cpp) widens a 16-bit k and v for
// the lanes path of other targets first (reads_kv says which). KT is their element type.
// Split-S: when a decode call has too few tiles to keep every thread busy (one sequence, few
// kv heads), each tile's keys are cut into chunks that run as tasks of their own, each ending
// with its rows' partial (m, l, O); a second pass merges them:
//   m = max_c m_c,  l = Σ_c l_c · exp(m_c - m),  out = Σ_c O_c · exp(m_c - m) / l.
#include <algorithm>
#include <cfloat>

#include "mhattn/ops.h"
#include "mhattn/vec.h"

namespace mhattn {
namespace MHATTN_TARGET {
namespace {

// Query rows per tile, chosen per call by tile_rows(): 256, 128 or 64. Taller tiles spread the
// packing of each key block over more rows (measured 7-9% faster at E = 12-24 with 256 than 64).
constexpr int64_t BQ_MIN = 64, BQ_MAX = 256;
// qs and O of a tile and a block's kt and vp ((bq + bk) × (E + evp) floats) should stay within
// this much of the 1 MB L2.
constexpr int64_t kTileBytes = 640 * 1024;
// Register tile for both products: RM rows × 2 vectors, 12 accumulators (as in gemm.cpp).
constexpr int RM = 6;
// Packed kᵀ and v come in panels this wide (keys for kt, dims for vp), one register tile's
// worth, so a tile reads its panel from one contiguous stretch of memory.
constexpr int64_t KP = 2 * W;
// Tiles of up to this many query rows take the direct path (KeyBlocks::direct), in blocks of
// kDirectBlockKeys keys (a multiple of every W).
constexpr int64_t kDirectRows = kAttentionDirectRows;
constexpr int64_t kDirectBlockKeys = 1024;
// Accumulators of the direct path's P · V register tiles (pv_rows): half the vector registers
// (16 of AVX-512's 32; 8 of AVX2's 16).
constexpr int kPassAccumulators = W == 16 ? 16 : 8;
// ... and with several passes, the bytes of v (a few dozen keys) that each covers before the next
// keys (pv_direct_chunks).
constexpr int64_t kPassChunkBytes = 8 * 1024;
// Heads with at least this many tiles of BQ_MIN rows have their key blocks packed once per call.
constexpr int64_t kPrepackTiles = 16;
// Split-S: direct-path calls with fewer than kSplitTasksPerThread tasks per thread cut their
// keys into chunks of at least kSplitMinKeys (a chunk then reads at least 256 KB of k and v at
// E = 128, far more than the merge costs).
constexpr int64_t kSplitTasksPerThread = 4;
constexpr int64_t kSplitMinKeys = 512;
// bfloat16 on AVX512-BF16: vdpbf16ps takes 16 pairs of bfloat16 from each operand and adds
// both products of each pair to a float32 lane, twice an FMA's work per instruction (on Zen 4
// at the FMA's rate, fma_peak.c). The lanes path (below attend_tile_lanes) and the direct path's
// Q·Kᵀ (qk_direct_pairs) use it on a bfloat16 k and v as they lie.
#if defined(MHATTN_BF16_DOT)
constexpr bool kBf16Dot = true;

inline V vdp(V acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
// The pair of bfloat16 at p (32 bits) in every lane.
inline __m512i vpair_set1(const bf16_t* p) {
  uint32_t u;
  std::memcpy(&u, p, sizeof u);
  return _mm512_set1_epi32(static_cast<int>(u));
}
// Lane i holds (a[i], b[i]) rounded to bfloat16 (to nearest even), a in the low half.
inline __m512i vpairs(V a, V b) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {
      0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave),
                                  (__m512i)_mm512_cvtne2ps_pbh(b, a));  // a low, b high
}

// The same pairs for P (values in [0, 1]) in four integer operations: rounded to nearest with
// ties away from zero rather than to even (an exact tie is rare and its bias nil). In a profile
// of E = 12 on Zen 4, vcvtne2ps2bf16, the word shuffle and the store after them were the
// hottest instructions (13% of the samples); this measured no faster within the noise, but it
// is the shorter chain of dependent operations.
inline __m512i vpairs_p(V a, V b) {
  const __m512i half = _mm512_set1_epi32(0x8000), high = _mm512_set1_epi32(-65536);
  const __m512i ra = _mm512_add_epi32(_mm512_castps_si512(a), half);
  const __m512i rb = _mm512_add_epi32(_mm512_castps_si512(b), half);
  return _mm512_or_si512(_mm512_and_si512(rb, high), _mm512_srli_epi32(ra, 16));
}

// The first n lanes (all for n >= W, none for n <= 0).
inline __mmask16 lanes_below(int64_t n) {
  return n >= W ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
#else
constexpr bool kBf16Dot = false;
#endif

// Keys per block: kt and vp (bk × (E + evp) floats) fill about 128 KB of the 1 MB L2 while the
// tile's rows use them (each register tile's panels are contiguous, so L2 streams them well);
// at least 64 keys (shorter blocks spend more on the per-block softmax bookkeeping; measured
// 2-5% slower at 64 than 256 keys for E = 48-64), at most 512.
int64_t block_keys(int64_t E, int64_t evp) {
  const int64_t bk = 32768 / std::max<int64_t>(1, E + evp) / W * W;
  return std::clamp<int64_t>(bk, 64, 512);
}

// Rows per tile: the tallest of BQ_MAX, ..., BQ_MIN (halving) whose tile fits kTileBytes and
// that still leaves four tasks per thread for the dynamic schedule to balance.
int64_t tile_rows(int64_t heads, int64_t rows_per_head, int64_t E, int64_t bk, int64_t evp,
                  int nt) {
  int64_t bq = BQ_MAX;
  while (bq > BQ_MIN && ((bq + bk) * (E + evp) * 4 > kTileBytes ||
                         heads * ((rows_per_head + bq - 1) / bq) < 4 * nt))
    bq /= 2;
  return bq;
}

// s (R × NV·W, rows apart by lds) = qs (R × E) · kt (E × NV·W, rows apart by ldk); mx[i]
// becomes the lane-wise max of mx[i] and row i of the tile, so step 4 needs no pass of its own
// to find a row's max when nothing masks it.
template <int R, int NV>
void qk_tile(float* s, int64_t lds, const float* qs, const float* kt, int64_t ldk, int64_t E,
             V* mx) {
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = vzero();
  for (int64_t e = 0; e < E; ++e) {
    V kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = vload(kt + e * ldk + c * W);
    for (int i = 0; i < R; ++i) {
      const V x = vset1(qs[i * E + e]);
      for (int c = 0; c < NV; ++c) acc[i][c] = vfma(x, kv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) {
      vstore(s + i * lds + c * W, acc[i][c]);
      mx[i] = vmax(mx[i], acc[i][c]);
    }
}

// o (R × NV·W, rows apart by ldo) += p (R × bk, rows apart by ldp) · vp (bk × NV·W, ldv).
template <int R, int NV, class VT>
void pv_tile(float* o, int64_t ldo, const float* p, int64_t ldp, const VT* vp, int64_t ldv,
             int64_t bk) {
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = vload(o + i * ldo + c * W);
  for (int64_t j = 0; j < bk; ++j) {
    V vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = vload_f32(vp + j * ldv + c * W);
    for (int i = 0; i < R; ++i) {
      const V x = vset1(p[i * ldp + j]);
      for (int c = 0; c < NV; ++c) acc[i][c] = vfma(x, vv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) vstore(o + i * ldo + c * W, acc[i][c]);
}

// s (R × n, rows apart by lds) = qs (R × E) · the first n keys of kt, kt in panels of KP keys
// (panel j / KP at kt + j·E, E × KP), for any R ≤ RM; n is a multiple of KP. row_max[i] =
// max_j s[i][j].
template <int R>
void qk_rows(float* s, int64_t lds, float* row_max, const float* qs, const float* kt, int64_t n,
             int64_t E) {
  V mx[R];
  for (int i = 0; i < R; ++i) mx[i] = vset1(-INFINITY);
  for (int64_t j = 0; j < n; j += KP) qk_tile<R, 2>(s + j, lds, qs, kt + j * E, KP, E, mx);
  for (int i = 0; i < R; ++i) row_max[i] = vhmax(mx[i]);
}
void qk(int64_t R, float* s, int64_t lds, float* row_max, const float* qs, const float* kt,
        int64_t n, int64_t E) {
  with_rows<RM>(R, [&](auto r) { qk_rows<decltype(r)::value>(s, lds, row_max, qs, kt, n, E); });
}

// The end of the direct path's Q·Kᵀ: acc[i·KG + c] holds the sum of row i and key c (KG = W / R
// keys), spread over its lanes in parts. One W × W register transpose and W - 1 adds make them
// a vector of W dot products; the first n keys of each row go to s (rows lds apart).
template <int R>
inline void store_dot_products(float* s, int64_t lds, const V (&acc)[W], int64_t n) {
  constexpr int KG = W / R;
  V r[W];  // a copy for the transpose: acc, never addressed, stays in registers in the loops
#pragma GCC unroll 16
  for (int u = 0; u < W; ++u) r[u] = acc[u];
  vtranspose(r);  // lane u of every vector: sum u = (row u / KG, key u % KG), in parts
  V dot = r[0];
  for (int u = 1; u < W; ++u) dot = vadd(dot, r[u]);
  if (R == 1 && n == W) {
    vstore(s, dot);
    return;
  }
  float d[W];
  vstore(d, dot);
  for (int i = 0; i < R; ++i) std::copy(d + i * KG, d + i * KG + n, s + i * lds);
}

// s (R × n, rows apart by lds) = qs (R × E) · kᵀ for n ≤ KG = W / R keys of k (rows k_ss
// apart), R ≥ 2 rows (a GQA group): W dims of every key of the group at a time, each widened
// once (vload_f32: float16 costs a conversion per vector) and multiplied into all R rows. The
// R·KG sums fill one W × W transpose, as in qk_direct_pairs_group; the dims past the last
// whole vector are added one by one.
template <int R, bool Full, class KT>
void qk_direct_group(float* s, int64_t lds, const float* qs, const KT* k, int64_t k_ss,
                     int64_t n, int64_t E) {
  constexpr int KG = W / R;
  const int64_t Ew = E / W * W;
  V acc[W];
#pragma GCC unroll 16
  for (int u = 0; u < W; ++u) acc[u] = vzero();
  for (int64_t e = 0; e < Ew; e += W) {
#pragma GCC unroll 16
    for (int c = 0; c < KG; ++c) {
      if (!Full && c >= n) break;
      const V kv = vload_f32(k + c * k_ss + e);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) acc[i * KG + c] = vfma(vload(qs + i * E + e), kv, acc[i * KG + c]);
    }
  }
  const int64_t keys = Full ? KG : n;
  store_dot_products<R>(s, lds, acc, keys);
  if (Ew < E)
    for (int i = 0; i < R; ++i)
      for (int64_t c = 0; c < keys; ++c)
        for (int64_t e = Ew; e < E; ++e) s[i * lds + c] += qs[i * E + e] * to_f32(k[c * k_ss + e]);
}

// s (R × bk, rows apart by lds) = qs (R × E) · kᵀ, reading the bk rows of k (k_ss apart) where
// they lie: no packing. For tiles of a few rows (decode), where each key is used by few
// queries and packing would cost more than it saves. One row: W keys at a time, W independent
// sums, then one register transpose turns them into a vector of W dot products. Several rows
// (a GQA group) share each key's loads (qk_direct_group).
template <class KT>
void qk_direct(int64_t R, float* s, int64_t lds, const float* qs, const KT* k, int64_t k_ss,
               int64_t bk, int64_t E) {
  if (R >= 2) {
    with_rows<kDirectRows>(R, [&](auto r) {
      constexpr int RR = decltype(r)::value, KG = W / RR;
      int64_t j = 0;
      for (; j + KG <= bk; j += KG)
        qk_direct_group<RR, true>(s + j, lds, qs, k + j * k_ss, k_ss, KG, E);
      if (j < bk) qk_direct_group<RR, false>(s + j, lds, qs, k + j * k_ss, k_ss, bk - j, E);
    });
    return;
  }
  // One row (R = 1): W keys at a time, key by key (k is read in address order).
  const int64_t Ew = E / W * W;
  int64_t j = 0;
  for (; j + W <= bk; j += W) {
    const KT* kj = k + j * k_ss;
    V acc[W];
#pragma GCC unroll 16  // unrolled, acc lives in registers (else GCC zeroes it with rep stos)
    for (int c = 0; c < W; ++c) {
      const KT* kc = kj + c * k_ss;
      acc[c] = vzero();
      for (int64_t e = 0; e < Ew; e += W) acc[c] = vfma(vload(qs + e), vload_f32(kc + e), acc[c]);
    }
    float* out = s + j;
    store_dot_products<1>(out, lds, acc, W);
    for (int64_t e = Ew; e < E; ++e)
      for (int c = 0; c < W; ++c) out[c] += qs[e] * to_f32(kj[c * k_ss + e]);
  }
  for (; j < bk; ++j) {
    const KT* kr = k + j * k_ss;
    V a = vzero();
    for (int64_t e = 0; e < Ew; e += W) a = vfma(vload(qs + e), vload_f32(kr + e), a);
    float d = vhsum(a);
    for (int64_t e = Ew; e < E; ++e) d += qs[e] * to_f32(kr[e]);
    s[j] = d;
  }
}

#if defined(MHATTN_BF16_DOT)
// dst (R × round_up(n, 32), rows apart by ldd) = src (R × n, rows apart by lds) rounded to
// bfloat16, zero past n: rows in natural order, whose pairs are two adjacent elements (of q:
// two dims, for qk_direct_pairs; of P: two keys, for pv_direct_pairs).
void rows_to_bf16(bf16_t* dst, int64_t ldd, const float* src, int64_t lds, int64_t R,
                  int64_t n) {
  for (int64_t i = 0; i < R; ++i)
    for (int64_t e = 0; e < round_up(n, 2 * W); e += 2 * W) {
      const V a = _mm512_maskz_loadu_ps(lanes_below(n - e), src + i * lds + e);
      const V b = _mm512_maskz_loadu_ps(lanes_below(n - e - W), src + i * lds + e + W);
      _mm512_storeu_si512(dst + i * ldd + e, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
}

// s (R × bk, rows apart by lds) = qb · kᵀ for a bfloat16 k on the direct path (R ≤ 4 rows):
// each vdpbf16ps multiplies 32 dims of a key, read where it lies, by 32 of a row of qb
// (rows_to_bf16), with no widening. Keys go KG = W / R at a time, so that the R·KG sums of a
// group fill one W × W transpose (as in qk_direct) and each load of a key serves all R rows.
// A key's last dims are loaded under a mask.
template <int R, bool Full>
void qk_direct_pairs_group(float* s, int64_t lds, const bf16_t* qb, int64_t ldq,
                           const bf16_t* k, int64_t k_ss, int64_t n, int64_t E) {
  constexpr int KG = W / R;
  V acc[W];
#pragma GCC unroll 16
  for (int u = 0; u < W; ++u) acc[u] = vzero();
  const int64_t E32 = E / (2 * W) * (2 * W);
  const __mmask32 tail = (__mmask32{1} << (E - E32)) - 1;  // E - E32 < 32
  if constexpr (R == 1) {
    // One row: key by key, each read in address order. (Dims outer, as below, ran at half the
    // bandwidth here on a cache too big for L3.)
#pragma GCC unroll 16
    for (int c = 0; c < KG; ++c) {
      if (!Full && c >= n) break;
      const bf16_t* kc = k + c * k_ss;
      for (int64_t e = 0; e < E32; e += 2 * W)
        acc[c] = vdp(acc[c], _mm512_loadu_si512(qb + e), _mm512_loadu_si512(kc + e));
      if (E32 < E)
        acc[c] = vdp(acc[c], _mm512_loadu_si512(qb + E32), _mm512_maskz_loadu_epi16(tail, kc + E32));
    }
  } else {
    // Several rows: 32 dims of every key of the group at a time, so that R·KG independent
    // accumulators take turns.
    for (int64_t e = 0; e < E; e += 2 * W) {
#pragma GCC unroll 16
      for (int c = 0; c < KG; ++c) {
        if (!Full && c >= n) break;
        const __m512i kv = e < E32 ? _mm512_loadu_si512(k + c * k_ss + e)
                                   : _mm512_maskz_loadu_epi16(tail, k + c * k_ss + e);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i)
          acc[i * KG + c] = vdp(acc[i * KG + c], _mm512_loadu_si512(qb + i * ldq + e), kv);
      }
    }
  }
  store_dot_products<R>(s, lds, acc, Full ? KG : n);
}
template <int R>
void qk_direct_pairs_rows(float* s, int64_t lds, const bf16_t* qb, int64_t ldq, const bf16_t* k,
                          int64_t k_ss, int64_t bk, int64_t E) {
  constexpr int KG = W / R;
  int64_t j = 0;
  for (; j + KG <= bk; j += KG)
    qk_direct_pairs_group<R, true>(s + j, lds, qb, ldq, k + j * k_ss, k_ss, KG, E);
  if (j < bk) qk_direct_pairs_group<R, false>(s + j, lds, qb, ldq, k + j * k_ss, k_ss, bk - j, E);
}
void qk_direct_pairs(int64_t R, float* s, int64_t lds, const bf16_t* qb, int64_t ldq,
                     const bf16_t* k, int64_t k_ss, int64_t bk, int64_t E) {
  with_rows<kDirectRows>(R, [&](auto r) {
    qk_direct_pairs_rows<decltype(r)::value>(s, lds, qb, ldq, k, k_ss, bk, E);
  });
}

// One pass of pv_direct_pairs_rows: dims [e, e + NC·2W) of o (R rows evp apart) += pb · v, NC
// chunks of 32 dims a key pair, the last chunk cut to Ev by a mask. 2·R·NC accumulators: each
// pass streams the block's rows of v once, so fewer, wider passes read it from farther caches
// fewer times (a 1024-key block of a 128-dim head is 256 KB, more than L1).
template <int R, int NC>
void pv_pairs_pass(float* o, int64_t evp, const bf16_t* pb, int64_t ldb, const bf16_t* v,
                   int64_t ldv, int64_t e, int64_t Ev, int64_t bk, __m512i first, __m512i second) {
  __mmask32 m[NC];
  for (int c = 0; c < NC; ++c) {
    const int64_t d = e + c * 2 * W;
    m[c] = d + 2 * W <= Ev ? ~__mmask32{0} : (__mmask32{1} << (Ev - d)) - 1;
  }
  V lo[R][NC], hi[R][NC];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) lo[i][c] = hi[i][c] = vzero();
  for (int64_t j = 0; j < bk; j += 2) {
    __m512i vlo[NC], vhi[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      const bf16_t* vj = v + j * ldv + e + c * 2 * W;
      const __m512i a = _mm512_maskz_loadu_epi16(m[c], vj);
      const __m512i b = j + 1 < bk ? _mm512_maskz_loadu_epi16(m[c], vj + ldv) : _mm512_setzero_si512();
      vlo[c] = _mm512_unpacklo_epi16(a, b);
      vhi[c] = _mm512_unpackhi_epi16(a, b);
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512i pp = vpair_set1(pb + i * ldb + j);
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) {
        lo[i][c] = vdp(lo[i][c], pp, vlo[c]);
        hi[i][c] = vdp(hi[i][c], pp, vhi[c]);
      }
    }
  }
  // Unrolled like the loops above, so that lo and hi are never indexed by a variable: GCC then
  // keeps them in registers (else it stores all 16 to the stack at every key pair).
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      float* oi = o + i * evp + e + c * 2 * W;
      vstore(oi, vadd(vload(oi), _mm512_permutex2var_ps(lo[i][c], first, hi[i][c])));
      if (e + c * 2 * W + W < Ev)
        vstore(oi + W, vadd(vload(oi + W), _mm512_permutex2var_ps(lo[i][c], second, hi[i][c])));
    }
}

// o (R × Ev, rows evp apart) += p (R × bk, rows ldp apart) · v (bk × Ev, rows ldv apart) for a
// bfloat16 v on the direct path, R ≥ 2 rows (a GQA group), Ev a multiple of W. P is rounded to
// bfloat16 into pb (R rows of round_up(bk, 2W), zero past bk), whose natural order is pairs of
// keys; v's rows of keys j and j + 1 are interleaved in registers (vpunpcklwd / vpunpckhwd)
// into pairs of the same keys, each row's P pair broadcast against them: 128 dims a pass for
// two rows, 64 for three or four (pv_pairs_pass), then 32 at a time. The interleave leaves the
// dims of 32 in the order [0-3, 8-11, 16-19, 24-27] (lo) and [4-7, ...] (hi), which two
// vpermt2ps at the end of the pass put back.
template <int R>
void pv_direct_pairs_rows(float* o, int64_t evp, const float* p, int64_t ldp, const bf16_t* v,
                          int64_t ldv, int64_t Ev, int64_t bk, bf16_t* pb) {
  const int64_t ldb = round_up(bk, 2 * W);
  rows_to_bf16(pb, ldb, p, ldp, R, bk);
  alignas(64) static constexpr int32_t kFirst[W] = {0, 1, 2, 3, 16, 17, 18, 19,
                                                    4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static constexpr int32_t kSecond[W] = {8, 9, 10, 11, 24, 25, 26, 27,
                                                     12, 13, 14, 15, 28, 29, 30, 31};
  const __m512i first = _mm512_load_si512(kFirst), second = _mm512_load_si512(kSecond);
  constexpr int NC = R == 2 ? 4 : 2;  // 2·R·NC = 16 accumulators (12 for three rows)
  int64_t e = 0;
  for (; e + NC * 2 * W <= Ev; e += NC * 2 * W)
    pv_pairs_pass<R, NC>(o, evp, pb, ldb, v, ldv, e, Ev, bk, first, second);
  for (; e < Ev; e += 2 * W) pv_pairs_pass<R, 1>(o, evp, pb, ldb, v, ldv, e, Ev, bk, first, second);
}
void pv_direct_pairs(int64_t R, float* o, int64_t evp, const float* p, int64_t ldp,
                     const bf16_t* v, int64_t ldv, int64_t Ev, int64_t bk, bf16_t* pb) {
  with_rows<kDirectRows>(R, [&](auto r) {
    if constexpr (decltype(r)::value >= 2)
      pv_direct_pairs_rows<decltype(r)::value>(o, evp, p, ldp, v, ldv, Ev, bk, pb);
  });
}
#endif

// The direct path's P · V on dims [0, ev) in passes of 2W (the last W wide): o (R rows, ldo
// apart) += p (R × bk, ldp) · v (bk × ev, rows ldv apart). With several passes (AVX2 with four
// rows: 8 at E = 128), in chunks of keys whose rows of v (kPassChunkBytes) every pass covers
// before the next chunk. A pass reads a line of each row of v, a row apart: over a whole block
// that walks memory with a stride of a row, one line per page per row, too few for the hardware
// prefetcher to follow,
// and GQA decode (H32/8 S4096 E128, float32, one thread, Zen 3) read its cache at 8.5 GB/s
// against H8/8's 19. So the rows of the next chunk are prefetched, in address order, while the
// passes run on this one: on 2 threads, 2.0-2.1 ms a call (median) against 3.0-3.1 (float32)
// and 1.1-1.3 against 1.4 (bfloat16).
template <int R, class VT>
void pv_direct_chunks(float* o, int64_t ldo, const float* p, int64_t ldp, const VT* v,
                      int64_t ldv, int64_t ev, int64_t bk) {
  const int64_t row_bytes = ev * int64_t(sizeof(VT));
  const bool passes = ev > 2 * W;
  const int64_t chunk = passes ? std::max<int64_t>(1, kPassChunkBytes / row_bytes) : bk;
  for (int64_t j = 0; j < bk; j += chunk) {
    const int64_t n = std::min(chunk, bk - j);
    if (passes)
      for (int64_t r = j + chunk; r < std::min(bk, j + 2 * chunk); ++r)
        for (int64_t b = 0; b < row_bytes; b += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(v + r * ldv) + b);
    int64_t c = 0;
    for (; c + 2 * W <= ev; c += 2 * W)
      pv_tile<R, 2>(o + c, ldo, p + j, ldp, v + j * ldv + c, ldv, n);
    if (c < ev) pv_tile<R, 1>(o + c, ldo, p + j, ldp, v + j * ldv + c, ldv, n);
  }
}

// o (R × evp) += p (R × n, rows apart by ldp) · the first n keys of vp, the packed block of
// bk keys (panels of KP dims, panel c / KP at vp + c·bk, bk × KP, the last W wide when evp is
// an odd number of vectors), for any R ≤ RM.
template <int R>
void pv_packed_rows(float* o, const float* p, int64_t ldp, const float* vp, int64_t evp,
                    int64_t bk, int64_t n) {
  int64_t c = 0;
  for (; c + KP <= evp; c += KP) pv_tile<R, 2>(o + c, evp, p, ldp, vp + c * bk, KP, n);
  if (c < evp) pv_tile<R, 1>(o + c, evp, p, ldp, vp + c * bk, W, n);
}
void pv_packed(int64_t R, float* o, const float* p, int64_t ldp, const float* vp, int64_t evp,
               int64_t bk, int64_t n) {
  with_rows<RM>(R, [&](auto r) { pv_packed_rows<decltype(r)::value>(o, p, ldp, vp, evp, bk, n); });
}

// The direct path's o (R × evp) += p (R × bk, rows apart by ldp) · v (bk × evp, rows ldv
// apart, where it lies), for any R ≤ RM.
template <int R, class VT>
void pv_rows(float* o, const float* p, int64_t ldp, const VT* v, int64_t ldv, int64_t evp,
             int64_t bk) {
  int64_t c = 0;
  // Few rows leave registers for more vectors of v per key: fewer, longer passes over v, which
  // lies in memory with its rows apart. Up to kPassAccumulators accumulators: the v vectors are
  // memory operands of the FMAs and need no registers. One pass over a 128-dim head with
  // AVX-512 and one or two rows, two with four (GQA decode: 4 query heads per kv head).
  if (R * 8 <= kPassAccumulators)
    for (; c + 8 * W <= evp; c += 8 * W) pv_tile<R, 8>(o + c, evp, p, ldp, v + c, ldv, bk);
  if (R * 4 <= kPassAccumulators)
    for (; c + 4 * W <= evp; c += 4 * W) pv_tile<R, 4>(o + c, evp, p, ldp, v + c, ldv, bk);
  if (c < evp) pv_direct_chunks<R>(o + c, evp, p, ldp, v + c, ldv, evp - c, bk);
}
template <class VT>
void pv(int64_t R, float* o, const float* p, int64_t ldp, const VT* v, int64_t ldv,
        int64_t evp, int64_t bk) {
  with_rows<RM>(R, [&](auto r) { pv_rows<decltype(r)::value>(o, p, ldp, v, ldv, evp, bk); });
}

// One query row of a tile: where it comes from and goes, which keys it may see, its masks.
struct Row {
  const float* q;
  float* out;
  float* weights;        // its row of (B, Hq, L, S), or null
  int64_t lo, hi;        // visible keys lie in [lo, hi) before masks
  const void* mask[2];   // the row's start in each mask
};

enum class Pass { Online, Stats, Final };

// Where a tile's results go when its keys are split (split-S): only keys [lo, hi) are seen,
// and each row i leaves m[i], l[i] and O (o + i·evp, not yet divided by l) for the merge.
struct Partial {
  int64_t lo, hi;
  float *m, *l, *o;
};

// Row r of the G·L rows of (batch b, kv head kvh): query l = r / G of head kvh·G + r % G.
inline int64_t row_query(const AttnArgs& a, int64_t r) { return r / (a.Hq / a.Hkv); }
inline int64_t row_head(const AttnArgs& a, int64_t kvh, int64_t r) {
  const int64_t G = a.Hq / a.Hkv;
  return kvh * G + r % G;
}
inline float* row_out(const AttnArgs& a, int64_t b, int64_t kvh, int64_t r) {
  return a.out + b * a.out_sb + row_head(a, kvh, r) * a.out_sh + row_query(a, r) * a.out_sl;
}

// Row r of the G·L rows of (batch b, kv head kvh). Its keys [lo, hi) are its causal and window
// bounds, cut to part's keys when part is given; an empty range has lo = hi.
Row make_row(const AttnArgs& a, int64_t b, int64_t kvh, int64_t r, const Partial* part) {
  const int64_t l = row_query(a, r), h = row_head(a, kvh, r);
  Row row;
  row.q = a.q + b * a.q_sb + h * a.q_sh + l * a.q_sl;
  row.out = row_out(a, b, kvh, r);
  row.weights = a.weights ? a.weights + ((b * a.Hq + h) * a.L + l) * a.S : nullptr;
  const int64_t p = l + a.diag_offset;  // the row's diagonal in key positions
  int64_t lo = a.window > 0 ? p - a.window + 1 : 0;
  int64_t hi = a.causal ? p + 1 : (a.window > 0 ? p + a.window : a.S);
  hi = std::clamp<int64_t>(std::min(hi, part ? part->hi : a.S), 0, a.S);
  row.lo = std::clamp<int64_t>(std::max(lo, part ? part->lo : 0), 0, hi);
  row.hi = hi;
  for (int mi = 0; mi < 2; ++mi) {
    const MaskArg& mk = a.masks[mi];
    const int64_t off = b * mk.sb + h * mk.sh + l * mk.sl;  // in elements: bytes or floats
    const size_t size = mk.kind == 1 ? sizeof(uint8_t) : sizeof(float);
    row.mask[mi] = mk.kind == 0 ? nullptr : static_cast<const char*>(mk.data) + off * size;
  }
  return row;
}

// Per-thread scratch of a tile, one slot each (threads.cpp): qs (bq × E), kt (E × bk_max),
// vp (bk_max × evp), S (RM × bk_max: one register tile's rows), O (bq × evp), m and l (bq).
// The lanes path uses qs for qT and o for oT (a group of W rows after another), s for sT
// (bk_max × W), and no kt or vp.
struct Scratch {
  float *qs, *kt, *vp, *s, *o, *m, *l;
};

// The direct path's bfloat16 rows in the tile's kt scratch: q (kDirectRows rows of
// round_up(E, 32)), then P (kDirectRows rows of round_up(bk_max, 32)), on targets with
// AVX512-BF16 (qk_direct_pairs, pv_direct_pairs).
inline int64_t direct_q_stride(int64_t E) { return round_up(E, 2 * W); }
inline bf16_t* direct_q_bf16(const Scratch& t) { return reinterpret_cast<bf16_t*>(t.kt); }
inline bf16_t* direct_p_bf16(const Scratch& t, int64_t E) {
  return direct_q_bf16(t) + kDirectRows * direct_q_stride(E);
}

// The key blocks of one kv head: block i covers keys [i·bk_max, i·bk_max + bk). `packed`, when
// not null, holds every block already packed (step 1 and the copy of step 5), block i at
// packed + i·block_floats: kt (E · bkp floats) then vp (bk · evp). Otherwise each block is packed
// into the thread's scratch when it is visited.
template <class KT>
struct KeyBlocks {
  const KT *k, *v;     // the head's k (S × E, rows k_ss apart) and v (S × Ev, rows v_ss apart)
  const float* packed;
  int64_t bk_max, evp, block_floats;
  bool direct;         // read k (and v, when Ev = evp) in place instead of packing (few rows)
};

int64_t block_floats(int64_t E, int64_t bk_max, int64_t evp) {
  return E * round_up(bk_max, KP) + bk_max * evp;
}

// kt = kᵀ of keys [j0, j0 + bk) in panels of KP keys, zero-padded to bkp keys (qk_rows), as
// float32 (a 16-bit k is widened here, as it is copied). W keys × W dims at a time through
// registers (vtranspose); scalar at the edges.
template <class KT>
void pack_keys(float* kt, const AttnArgs& a, const KeyBlocks<KT>& kb, int64_t j0, int64_t bk) {
  const int64_t E = a.E, bkp = round_up(bk, KP), ks = a.k_ss;
  for (int64_t j = 0; j < bkp; j += W) {
    float* dst = kt + j / KP * E * KP + j % KP;  // dim e of keys j .. j + W at dst + e·KP
    const KT* src = kb.k + (j0 + j) * ks;
    const int64_t keys = std::clamp<int64_t>(bk - j, 0, W);
    int64_t e = 0;
    if (keys == W) {
      for (; e + W <= E; e += W) {
        V r[W];
        for (int i = 0; i < W; ++i) r[i] = vload_f32(src + i * ks + e);
        vtranspose(r);
        for (int i = 0; i < W; ++i) vstore(dst + (e + i) * KP, r[i]);
      }
    }
    for (; e < E; ++e)
      for (int64_t i = 0; i < W; ++i) dst[e * KP + i] = i < keys ? to_f32(src[i * ks + e]) : 0.0f;
  }
}

// vp = v of keys [j0, j0 + bk) in panels of KP dims, zero-padded to evp dims (pv_rows), as
// float32.
template <class KT>
void pack_values(float* vp, const AttnArgs& a, const KeyBlocks<KT>& kb, int64_t j0,
                 int64_t bk) {
  const int64_t Ev = a.Ev, evp = kb.evp;
  for (int64_t c = 0; c < evp; c += KP) {
    const int64_t width = std::min(KP, evp - c), real = std::clamp<int64_t>(Ev - c, 0, width);
    float* dst = vp + c * bk;
    for (int64_t j = 0; j < bk; ++j) {
      const KT* vr = kb.v + (j0 + j) * a.v_ss + c;
      for (int64_t e = 0; e < real; ++e) dst[j * width + e] = to_f32(vr[e]);
      std::fill(dst + j * width + real, dst + (j + 1) * width, 0.0f);
    }
  }
}

// Steps 3 and 4 for one row r of the tile, its scores s (bkp of them, for keys j0 ..) in hand;
// m, l and o (evp) are the row's running max, sum and output. s_max, when not null, is the
// max of the scores before masking (qk_rows), used if step 3 changes none of them.
void softmax_row(Pass pass, const AttnArgs& a, const Row& r, float* s, const float* s_max,
                 int64_t j0, int64_t bk, int64_t bkp, float& m, float& l, float* o, int64_t evp) {
  // 3. masks, then bounds: a key outside the bounds is hidden whatever a float mask adds to it
  // (+inf or NaN included), as in the reference.
  const bool cut = r.lo > j0 || r.hi < j0 + bk;  // the row's bounds leave out part of the block
  bool masked = bk < bkp || cut || a.softcap > 0;
  if (a.softcap > 0) vec_softcap(s, bk, a.softcap);  // the cap comes before the masks
  for (int64_t j = bk; j < bkp; ++j) s[j] = -INFINITY;
  for (int mi = 0; mi < 2; ++mi) {
    const MaskArg& mk = a.masks[mi];
    masked = masked || mk.kind != 0;
    if (mk.kind == 1) {
      const uint8_t* mr = static_cast<const uint8_t*>(r.mask[mi]) + j0 * mk.ss;
      for (int64_t j = 0; j < bk; ++j)
        if (mr[j * mk.ss] != mk.keep) s[j] = -INFINITY;
    } else if (mk.kind == 2) {
      const float* mr = static_cast<const float*>(r.mask[mi]) + j0 * mk.ss;
      for (int64_t j = 0; j < bk; ++j) s[j] += mr[j * mk.ss];
    }
  }
  if (cut)
    for (int64_t j = 0; j < bk; ++j)
      if (j0 + j < r.lo || j0 + j >= r.hi) s[j] = -INFINITY;
  // 4. the softmax update.
  if (pass == Pass::Final) {
    // m and l are final: P = exp(S - m) / l, which is also the row of weights.
    vec_exp_sum(s, s, bkp, m == -INFINITY ? 0.0f : m);
    vec_scale(s, s, bkp, l);  // l holds 1/l in this pass
    if (r.weights) std::copy(s, s + bk, r.weights + j0);
    return;
  }
  const float mx = s_max && !masked ? *s_max : vec_max(s, bkp);
  const float m_new = mx > m ? mx : m;
  const float shift = m_new == -INFINITY ? 0.0f : m_new;  // all masked so far: P = 0
  const float alpha = expf(m - shift);
  l = l * alpha + vec_exp_sum(s, s, bkp, shift);
  m = m_new;
  if (pass == Pass::Online && alpha != 1.0f) vec_scale(o, o, evp, alpha);
}

// Runs steps 1-5 of the file comment over the blocks that hold keys [key_lo, key_hi) for the
// R rows of a tile. After packing a block, steps 2-5 go a register tile of RM rows at a time,
// so those rows' scores (RM × bkp, in t.s) stay in L1 from Q·Kᵀ through P·V.
template <class KT>
void run_blocks(Pass pass, const AttnArgs& a, const Row* rows, int64_t R,
                const KeyBlocks<KT>& kb, int64_t key_lo, int64_t key_hi, const Scratch& t) {
  const int64_t E = a.E, bk_max = kb.bk_max, evp = kb.evp;
  // Packed blocks are fixed slices of S; the direct path reads exactly the keys it needs.
  for (int64_t j0 = kb.direct ? key_lo : key_lo / bk_max * bk_max; j0 < key_hi; j0 += bk_max) {
    const int64_t bk = std::min(bk_max, (kb.direct ? key_hi : a.S) - j0), bkp = round_up(bk, KP);

    // 1. kt = kᵀ of the block and vp = its v (or, on the direct path, k and v as they lie:
    // v at vd, rows ldv apart).
    const float *kt = t.kt, *vp = t.vp;
    const KT* vd = nullptr;
    int64_t ldv = 0;
    if (kb.direct) {
      if (evp == a.Ev) {
        vd = kb.v + j0 * a.v_ss;
        ldv = a.v_ss;
      } else {
        pack_values(t.vp, a, kb, j0, bk);
      }
    } else if (kb.packed) {
      kt = kb.packed + j0 / bk_max * kb.block_floats;
      vp = kt + E * bkp;
    } else {
      pack_keys(t.kt, a, kb, j0, bk);
      pack_values(t.vp, a, kb, j0, bk);
    }

    for (int64_t i0 = 0; i0 < R; i0 += RM) {
      const int64_t rr = std::min<int64_t>(RM, R - i0);
      // Of a packed block, only its first n keys when no row of these sees past them (the
      // diagonal blocks of a causal mask), and none when no row sees any of them (a sliding
      // window's blocks), unless the rows' weights are written: theirs cover whole blocks.
      // (The direct path's blocks already end at the rows' last key.)
      int64_t n = bk;
      if (!kb.direct && !a.weights) {
        int64_t hi = j0;  // the end of what the rows that see some of the block see
        for (int64_t i = i0; i < i0 + rr; ++i) {
          const int64_t end = std::min(rows[i].hi, j0 + bk);
          if (std::max(rows[i].lo, j0) < end) hi = std::max(hi, end);
        }
        n = hi - j0;
        if (n == 0) continue;  // no row of these sees the block: it changes none of them
      }
      const int64_t np = round_up(n, KP);  // bkp on the direct path, where n = bk
      // 2. S = qs · kt for these rows.
      float s_max[RM];
      if (kb.direct) {
#if defined(MHATTN_BF16_DOT)
        if constexpr (std::is_same_v<KT, bf16_t>) {  // q in bfloat16 (attend_tile)
          const int64_t ldq = direct_q_stride(E);
          qk_direct_pairs(rr, t.s, bkp, direct_q_bf16(t) + i0 * ldq, ldq, kb.k + j0 * a.k_ss,
                          a.k_ss, bk, E);
        } else
#endif
          qk_direct(rr, t.s, bkp, t.qs + i0 * E, kb.k + j0 * a.k_ss, a.k_ss, bk, E);
      } else
        qk(rr, t.s, bkp, s_max, t.qs + i0 * E, kt, np, E);
      // 3, 4.
      for (int64_t i = 0; i < rr; ++i)
        softmax_row(pass, a, rows[i0 + i], t.s + i * bkp, kb.direct ? nullptr : s_max + i, j0,
                    n, np, t.m[i0 + i], t.l[i0 + i], t.o + (i0 + i) * evp, evp);
      // 5. O += P · v.
      if (pass != Pass::Stats) {
#if defined(MHATTN_BF16_DOT)
        if constexpr (std::is_same_v<KT, bf16_t>)  // a GQA group: pairs of keys on vdpbf16ps
          if (vd && rr >= 2) {
            pv_direct_pairs(rr, t.o + i0 * evp, evp, t.s, bkp, vd, ldv, a.Ev, bk,
                            direct_p_bf16(t, E));
            continue;
          }
#endif
        if (vd) pv(rr, t.o + i0 * evp, t.s, bkp, vd, ldv, evp, bk);
        else pv_packed(rr, t.o + i0 * evp, t.s, bkp, vp, evp, bk, n);
      }
    }
  }
}

// out (and weights) of one task: batch b, kv head kvh, tile rows [r0, r0 + R) of the G·L rows;
// with `part`, only its keys, and the partial results go to it instead.
template <class KT>
void attend_tile(const AttnArgs& a, int64_t b, int64_t kvh, int64_t r0, int64_t R,
                 const KeyBlocks<KT>& kb, const Scratch& t, const Partial* part) {
  const int64_t E = a.E, Ev = a.Ev, evp = kb.evp;
  Row rows[BQ_MAX];
  int64_t key_lo = a.S, key_hi = 0;
  for (int64_t i = 0; i < R; ++i) {
    const Row& r = rows[i] = make_row(a, b, kvh, r0 + i, part);
    if (r.lo < r.hi) {
      key_lo = std::min(key_lo, r.lo);
      key_hi = std::max(key_hi, r.hi);
    }
    vec_scale(t.qs + i * E, r.q, E, a.scale);
    t.m[i] = -INFINITY;
    t.l[i] = 0.0f;
    std::fill(t.o + i * evp, t.o + (i + 1) * evp, 0.0f);
  }
#if defined(MHATTN_BF16_DOT)
  if constexpr (std::is_same_v<KT, bf16_t>)  // the direct path's Q·Kᵀ (qk_direct_pairs)
    if (kb.direct) rows_to_bf16(direct_q_bf16(t), direct_q_stride(E), t.qs, E, R, E);
#endif
  if (a.weights) {
    run_blocks(Pass::Stats, a, rows, R, kb, key_lo, key_hi, t);
    for (int64_t i = 0; i < R; ++i) t.l[i] = recip_or_zero(t.l[i]);
    run_blocks(Pass::Final, a, rows, R, kb, key_lo, key_hi, t);
    for (int64_t i = 0; i < R; ++i) std::copy(t.o + i * evp, t.o + i * evp + Ev, rows[i].out);
  } else {
    run_blocks(Pass::Online, a, rows, R, kb, key_lo, key_hi, t);
    if (part) {
      std::copy(t.m, t.m + R, part->m);
      std::copy(t.l, t.l + R, part->l);
      std::copy(t.o, t.o + R * evp, part->o);
      return;
    }
    for (int64_t i = 0; i < R; ++i)
      vec_scale(rows[i].out, t.o + i * evp, Ev, recip_or_zero(t.l[i]));
  }
}

// out (Ev) of one row from its `splits` partial results: chunk c's at m[c·ms], l[c·ms] and
// o + c·os.
void merge_row(float* out, int64_t Ev, int64_t splits, const float* m, const float* l,
               int64_t ms, const float* o, int64_t os) {
  float mx = -INFINITY;
  for (int64_t c = 0; c < splits; ++c) mx = m[c * ms] > mx ? m[c * ms] : mx;
  const float shift = mx == -INFINITY ? 0.0f : mx;  // nothing visible: every l is 0
  float sum = 0.0f;
  std::fill(out, out + Ev, 0.0f);
  for (int64_t c = 0; c < splits; ++c) {
    const float lc = l[c * ms];
    if (lc == 0.0f) continue;  // a chunk with no visible key adds nothing (and its m is -inf)
    const float w = expf(m[c * ms] - shift);
    sum += lc * w;
    const float* oc = o + c * os;
    for (int64_t e = 0; e < Ev; ++e) out[e] += w * oc[e];
  }
  vec_scale(out, out, Ev, recip_or_zero(sum));
}

// ---------------------------------------------------------------------------------------------
// The lanes path, for tiles without weights to write: a tile's rows go W at a time, one row per
// lane of a vector. For such a group of rows and a block of keys j:
//   sT[j] (W) = Σ_e qT[e] · k[j][e], where qT (E × W) holds the rows' q times scale
//   m' = max(m, max_j sT[j]), P[j] = exp(sT[j] - m'), l = l · exp(m - m') + Σ_j P[j]
//   oT[e] (W) = oT[e] · exp(m - m') + Σ_j P[j] · v[j][e]
// with every operation lane-wise, and k and v read where they lie, each element broadcast to
// all lanes. Against the tiles above, nothing is packed, the row max and sum need no horizontal
// reductions, and Ev is not padded to whole vectors: P · V costs Ev FMAs per W scores (12 at
// E = 12, where the tiles pay 16).
// On AVX-512 only, whose FMAs take the broadcast as a memory operand at no cost. In one A/B run
// against the tiles (2 threads, L = S = 512, width 768) it was 1.38x as fast at H = 96 (E = 8),
// 1.18x at E = 12, 1.27x at E = 24, 1.08x at E = 64, 1.11x at E = 768, and 1.25x causal at
// B1 H32 L1024 E128; with a padding mask, 1.28-1.45x at E = 12 and 1.11x at E = 64. On AVX2, where
// each broadcast is a load of its own, it was 6-20% slower, and the portable path 26-29% slower.
constexpr bool kLanesPath = W == 16;
// Keys per block: at E = 12, sT (bk × W) and the block's k and v (bk × (E + Ev)) fit the 32 KB
// L1. 64 and 256 keys were within 3% in one A/B run at E = 12-64.
constexpr int64_t kLanesBlockKeys = 128;
// Keys per Q·Kᵀ register tile: independent sums enough to cover the FMA latency.
constexpr int kLanesKeys = 8;
// Dims of oT per P·V register tile: 16 accumulators of AVX-512's 32 registers, beside P[j] and
// the broadcasts.
constexpr int kLanesOut = 16;
// Keys between a P[j]'s exp and the FMAs that read it (pv_lanes). Without the gap, the FMAs of
// each key wait for its exp and the two barely overlap. In a microbenchmark of one block at
// E = 12, exps and P · V took 13% less time with 4 keys ahead than with the exps in a loop of
// their own, and no less with none ahead. In one A/B run against vexp in a loop of its own,
// H64 E12 was 1.13x as fast with 4 keys ahead, 1.07x with 2 and 1.12x with 8.
constexpr int64_t kExpAhead = 4;

// sT (NJ × W) = acc, and mx becomes the lane-wise max of mx and acc: the end of a Q·Kᵀ tile
// on the lanes path.
template <int NJ>
void store_scores(float* sT, V& mx, const V* acc) {
  V m = mx;  // a local: mx could alias sT (vector types may alias float), which would keep it
             // in memory, each vmax waiting for the store before it
  for (int c = 0; c < NJ; ++c) {
    vstore(sT + c * W, acc[c]);
    m = vmax(m, acc[c]);
  }
  mx = m;
}

// tile(j, n) for the keys [j, j + n) of a block of bk, n = kLanesKeys (a compile-time constant,
// std::integral_constant) but for the last few: the Q·Kᵀ register tiles of the lanes path.
template <class F>
void over_key_tiles(int64_t bk, F&& tile) {
  int64_t j = 0;
  for (; j + kLanesKeys <= bk; j += kLanesKeys) tile(j, std::integral_constant<int, kLanesKeys>{});
  if (j < bk) with_rows<kLanesKeys>(bk - j, [&](auto n) { tile(j, n); });
}

// tile(e0, n, first) for the dims [e0, e0 + n) of oT (Ev × W), in register tiles of near-equal
// height of at most kLanesOut dims (n a compile-time constant); first for the first, which
// takes the exps of P and their sum.
template <class F>
void over_out_tiles(int64_t Ev, F&& tile) {
  const int64_t tiles = (Ev + kLanesOut - 1) / kLanesOut;
  for (int64_t e0 = 0, t = 0; t < tiles; ++t) {
    const int64_t ne = (Ev - e0) / (tiles - t);
    with_rows<kLanesOut>(ne, [&](auto n) { tile(e0, n, t == 0); });
    e0 += ne;
  }
}

// sT (NJ × W) = qT (E × W) · kᵀ for NJ keys (rows of k, k_ss apart); mx becomes the lane-wise
// max of mx and the scores.
template <int NJ>
void qk_lanes(float* sT, V& mx, const float* qT, const float* k, int64_t k_ss, int64_t E) {
  V acc[NJ];
  for (int c = 0; c < NJ; ++c) acc[c] = vzero();
  for (int64_t e = 0; e < E; ++e) {
    const V q = vload(qT + e * W);
    for (int c = 0; c < NJ; ++c) acc[c] = vfma(q, vset1(k[c * k_ss + e]), acc[c]);
  }
  store_scores<NJ>(sT, mx, acc);
}

// oT (NE × W) = oT · alpha + Σ_j P[j] (W) · v[j][e] over bk keys, for NE dims of v (rows v_ss
// apart). P (bk × W) is at p; with Exp, p holds the scores S and the exps are taken here:
// P[j] = exp(S[j] - m) written over S[j] (for the other register tiles of oT) and added to sum.
// Each key's P is computed kExpAhead keys before the FMAs that read it, so the exps run beside
// the FMAs of earlier keys instead of holding up their own.
template <int NE, bool Exp>
void pv_lanes(float* oT, V alpha, float* p, const float* v, int64_t v_ss, int64_t bk, V m,
              V& sum) {
  V total = sum;  // a local: sum could alias p (vector types may alias float)
  auto exp_key = [&](int64_t j) {
    const V pj = vexp_softmax(vsub(vload(p + j * W), m));
    vstore(p + j * W, pj);
    total = vadd(total, pj);
  };
  if constexpr (Exp)
    for (int64_t j = 0; j < std::min(kExpAhead, bk); ++j) exp_key(j);
  V acc[NE];
  for (int e = 0; e < NE; ++e) acc[e] = vmul(vload(oT + e * W), alpha);
  for (int64_t j = 0; j < bk; ++j) {
    if constexpr (Exp)
      if (j + kExpAhead < bk) exp_key(j + kExpAhead);
    const V pj = vload(p + j * W);
    for (int e = 0; e < NE; ++e) acc[e] = vfma(pj, vset1(v[j * v_ss + e]), acc[e]);
  }
  for (int e = 0; e < NE; ++e) vstore(oT + e * W, acc[e]);
  sum = total;
}

// Step 3 on the lanes path for a mask that holds one value per key for all the rows of a tile
// (per_key): over keys [j0, j0 + bk) of sT (bk × W), -inf where a bool mask says no, a float
// mask's values added, each broadcast to every lane.
void mask_lanes(float* sT, const MaskArg& mk, const void* row, int64_t j0, int64_t bk) {
  const int64_t ss = mk.ss;
  if (mk.kind == 1) {
    const uint8_t* mr = static_cast<const uint8_t*>(row) + j0 * ss;
    for (int64_t j = 0; j < bk; ++j)
      if (mr[j * ss] != mk.keep) vstore(sT + j * W, vset1(-INFINITY));
  } else if (mk.kind == 2) {
    const float* mr = static_cast<const float*>(row) + j0 * ss;
    for (int64_t j = 0; j < bk; ++j)
      vstore(sT + j * W, vadd(vload(sT + j * W), vset1(mr[j * ss])));
  }
}

// Whether mask mk holds one value per key for all the rows of a tile: the same for every query
// (sl = 0) and, when a tile's rows span the G query heads of a kv head, for every head.
bool per_key(const AttnArgs& a, const MaskArg& mk) {
  return mk.sl == 0 && (mk.sh == 0 || a.Hq == a.Hkv);
}

// Step 3 on the lanes path for a mask that differs from row to row: W keys at a time, the W
// rows' values as the rows of a W × W block (a float mask's rows loaded as vectors when they
// are contiguous, element by element otherwise), transposed into sT's layout (vtranspose).
// A bool mask's block holds 0 (keep) or -inf, and -inf replaces the score, as in mask_lanes.
// Against the tiles, in one A/B run (E = 12 and 64, L = 128 and 512): 1.06-1.11x with an (L, S)
// float mask, 1.14-1.31x with a (B, H, L, S) bool mask.
void mask_lanes_rows(float* sT, const MaskArg& mk, const Row* rows, int mi, int64_t j0,
                     int64_t bk) {
  for (int64_t j = 0; j < bk; j += W) {
    const int64_t n = std::min<int64_t>(W, bk - j);
    V r[W];
    if (mk.kind == 2 && mk.ss == 1 && n == W) {
      for (int i = 0; i < W; ++i)
        r[i] = vload(static_cast<const float*>(rows[i].mask[mi]) + j0 + j);
    } else {
      float block[W][W] = {};
      for (int i = 0; i < W; ++i)
        for (int64_t c = 0; c < n; ++c) {
          const int64_t at = (j0 + j + c) * mk.ss;
          if (mk.kind == 2)
            block[i][c] = static_cast<const float*>(rows[i].mask[mi])[at];
          else
            block[i][c] = static_cast<const uint8_t*>(rows[i].mask[mi])[at] == mk.keep
                              ? 0.0f : -INFINITY;
        }
      for (int i = 0; i < W; ++i) r[i] = vload(block[i]);
    }
    vtranspose(r);
    for (int64_t c = 0; c < n; ++c) {
      const V s = vload(sT + (j + c) * W);
      vstore(sT + (j + c) * W, mk.kind == 1 ? vselect_nonneg(r[c], s, r[c]) : vadd(s, r[c]));
    }
  }
}

// qT (E × W) = the q of W rows, times scale, one row per lane. W dims at a time through
// registers (vtranspose), scalar for the last E % W.
void rows_to_lanes(float* qT, const Row* rows, int64_t E, float scale) {
  int64_t e = 0;
  for (; e + W <= E; e += W) {
    V r[W];
    for (int i = 0; i < W; ++i) r[i] = vmul(vload(rows[i].q + e), vset1(scale));
    vtranspose(r);
    for (int i = 0; i < W; ++i) vstore(qT + (e + i) * W, r[i]);
  }
  for (; e < E; ++e)
    for (int i = 0; i < W; ++i) qT[e * W + i] = rows[i].q[e] * scale;
}

// The out of the first n of W rows = oT (Ev × W, one row per lane) / l, lane by lane (0 where
// l = 0: a row that saw no key). W dims at a time through registers, scalar for the last Ev % W.
void lanes_to_rows(const Row* rows, int64_t n, const float* oT, const float* l, int64_t Ev) {
  float inv[W];
  for (int i = 0; i < W; ++i) inv[i] = recip_or_zero(l[i]);
  int64_t e = 0;
  for (; e + W <= Ev; e += W) {
    V r[W];
    for (int i = 0; i < W; ++i) r[i] = vload(oT + (e + i) * W);
    vtranspose(r);
    for (int64_t i = 0; i < n; ++i) vstore(rows[i].out + e, vmul(r[i], vset1(inv[i])));
  }
  for (; e < Ev; ++e)
    for (int64_t i = 0; i < n; ++i) rows[i].out[e] = oT[e * W + i] * inv[i];
}

// Step 3 on the lanes path for one block of keys [j0, j0 + bk) of a group of W rows, whose
// scores sT (bk × W) are in hand: the soft cap, the masks, and -inf outside each row's bounds
// when `cut` (some row does not see every key of the block). Returns the lane-wise max of what
// is left.
V lanes_mask(const AttnArgs& a, const Row* rows, int64_t j0, int64_t bk, bool cut, float* sT) {
  const V ninf = vset1(-INFINITY);
  if (a.softcap > 0) vec_softcap(sT, bk * W, a.softcap);
  for (int mi = 0; mi < 2; ++mi)
    if (per_key(a, a.masks[mi]))
      mask_lanes(sT, a.masks[mi], rows[0].mask[mi], j0, bk);
    else
      mask_lanes_rows(sT, a.masks[mi], rows, mi, j0, bk);
  if (cut) {  // then -inf outside each row's bounds, whatever a float mask added (softmax_row)
    float first[W], final[W];  // per lane, relative to j0: exact in float whatever S is
    for (int i = 0; i < W; ++i) {
      first[i] = static_cast<float>(std::clamp<int64_t>(rows[i].lo - j0, -1, bk));
      final[i] = static_cast<float>(std::clamp<int64_t>(rows[i].hi - 1 - j0, -1, bk));
    }
    const V vlo = vload(first), vlast = vload(final);
    for (int64_t j = 0; j < bk; ++j) {
      const V key = vset1(static_cast<float>(j));
      const V s = vselect_nonneg(vsub(key, vlo), vload(sT + j * W), ninf);
      vstore(sT + j * W, vselect_nonneg(vsub(vlast, key), s, ninf));
    }
  }
  V mx = ninf;
  for (int64_t j = 0; j < bk; ++j) mx = vmax(mx, vload(sT + j * W));
  return mx;
}

// The lanes path's products on float32 k and v (the bfloat16 ones follow below):
// sT (bk × W) = qT · kᵀ for keys [j0, j0 + bk), returning the lane-wise max;
V lanes_qk(const AttnArgs& a, const KeyBlocks<float>& kb, const float* qT, float* sT,
           int64_t j0, int64_t bk, const Scratch&) {
  const float* k = kb.k + j0 * a.k_ss;
  V mx = vset1(-INFINITY);
  over_key_tiles(bk, [&](int64_t j, auto n) {
    qk_lanes<decltype(n)::value>(sT + j * W, mx, qT, k + j * a.k_ss, a.k_ss, a.E);
  });
  return mx;
}
// and oT (Ev × W) = oT · alpha + P · v with P = exp(sT - m) (written over sT), sum += Σ P.
void lanes_pv(const AttnArgs& a, const KeyBlocks<float>& kb, float* oT, V alpha, float* sT,
              int64_t j0, int64_t bk, V m, V& sum, const Scratch&) {
  const float* v = kb.v + j0 * a.v_ss;
  over_out_tiles(a.Ev, [&](int64_t e0, auto n, bool first) {
    constexpr int NE = decltype(n)::value;
    if (first)
      pv_lanes<NE, true>(oT + e0 * W, alpha, sT, v + e0, a.v_ss, bk, m, sum);
    else
      pv_lanes<NE, false>(oT + e0 * W, alpha, sT, v + e0, a.v_ss, bk, m, sum);
  });
}
// Nothing to prepare per block of float32 keys (k and v are read where they lie), and the
// queries go to qT (E × W) as they are.
void lanes_prepare(const AttnArgs&, const KeyBlocks<float>&, int64_t, int64_t, const Scratch&) {}
void lanes_queries(const KeyBlocks<float>&, float* qT, const Row* rows, int64_t E, float scale) {
  rows_to_lanes(qT, rows, E, scale);
}
int64_t lanes_query_floats(const KeyBlocks<float>&, int64_t E) { return E * W; }

#if defined(MHATTN_BF16_DOT)
// ---------------------------------------------------------------------------------------------
// The lanes path on bfloat16 k and v (AVX512-BF16), both products on vdpbf16ps (kBf16Dot):
//   Q·Kᵀ: qP (E/2 pairs × W) holds the rows' q times scale rounded to bfloat16: lane i of
//         vector e holds dims (2e, 2e + 1) of row i. k is read where it lies, each pair of dims
//         of a key broadcast to every lane.
//   P·V:  P of keys (2j, 2j + 1) rounded to bfloat16 as one vector of pairs pP[j] (row i in lane
//         i), against vP, the block's v with the rows of keys 2j and 2j + 1 interleaved: the pair
//         (v[2j][e], v[2j + 1][e]) broadcast.
// Scores, softmax and sums stay float32; only the operands of the two products are rounded,
// as torch's bfloat16 SDPA rounds them too. An odd E or block length gets a zero pair half.

// qP ((E + 1) / 2 × W pairs) = the q of W rows times scale, as pairs of dims, one row a lane.
void rows_to_pairs(uint32_t* qP, const Row* rows, int64_t E, float scale) {
  int64_t e = 0;
  for (; e + W <= E; e += W) {  // W dims through registers (vtranspose), then W / 2 pairs
    V r[W];
    for (int i = 0; i < W; ++i) r[i] = vmul(vload(rows[i].q + e), vset1(scale));
    vtranspose(r);
    for (int i = 0; i < W; i += 2) _mm512_storeu_si512(qP + (e + i) / 2 * W, vpairs(r[i], r[i + 1]));
  }
  for (; e < E; e += 2) {
    float lo[W], hi[W];
    for (int i = 0; i < W; ++i) {
      lo[i] = rows[i].q[e] * scale;
      hi[i] = e + 1 < E ? rows[i].q[e + 1] * scale : 0.0f;
    }
    _mm512_storeu_si512(qP + e / 2 * W, vpairs(vload(lo), vload(hi)));
  }
}

// sT (NJ × W) = qP · kᵀ for NJ keys (rows of k, k_ss apart); mx becomes the lane-wise max.
template <int NJ>
void qk_lanes_bf16(float* sT, V& mx, const uint32_t* qP, const bf16_t* k, int64_t k_ss,
                   int64_t E) {
  V acc[NJ];
#pragma GCC unroll 8
  for (int c = 0; c < NJ; ++c) acc[c] = vzero();
  for (int64_t e = 0; e < E; e += 2) {
    const __m512i q = _mm512_loadu_si512(qP + e / 2 * W);
    if (e + 1 < E) {
#pragma GCC unroll 8
      for (int c = 0; c < NJ; ++c) acc[c] = vdp(acc[c], q, vpair_set1(k + c * k_ss + e));
    } else {  // the last of an odd E, paired with a zero
#pragma GCC unroll 8
      for (int c = 0; c < NJ; ++c) acc[c] = vdp(acc[c], q, _mm512_set1_epi32(k[c * k_ss + e].bits));
    }
  }
  store_scores<NJ>(sT, mx, acc);
}

// oT (NE × W) = oT · alpha + Σ_j pP[j] · vP[j][e] over the (bk + 1) / 2 pairs of keys, for NE
// dims of v (vP rows Ev apart). With Exp, pP is made here from the scores sT (bk × W):
// pP[j] = the pair (exp(sT[2j] - m), exp(sT[2j + 1] - m)), summed into sum in float32, kExpAhead
// keys ahead of the products that read it (pv_lanes).
template <int NE, bool Exp>
void pv_lanes_bf16(float* oT, V alpha, const float* sT, uint32_t* pP, const uint32_t* vP,
                   int64_t Ev, int64_t bk, V m, V& sum) {
  const int64_t pairs = (bk + 1) / 2, ahead = kExpAhead / 2;
  V total = sum;
  auto exp_pair = [&](int64_t j) {
    const V p0 = vexp_softmax(vsub(vload(sT + 2 * j * W), m));
    const V p1 = 2 * j + 1 < bk ? vexp_softmax(vsub(vload(sT + (2 * j + 1) * W), m)) : vzero();
    total = vadd(total, vadd(p0, p1));
    _mm512_storeu_si512(pP + j * W, vpairs_p(p0, p1));
  };
  if constexpr (Exp)
    for (int64_t j = 0; j < std::min(ahead, pairs); ++j) exp_pair(j);
  V acc[NE];
  for (int e = 0; e < NE; ++e) acc[e] = vmul(vload(oT + e * W), alpha);
  for (int64_t j = 0; j < pairs; ++j) {
    if constexpr (Exp)
      if (j + ahead < pairs) exp_pair(j + ahead);
    const __m512i p = _mm512_loadu_si512(pP + j * W);
    const uint32_t* vj = vP + j * Ev;
    for (int e = 0; e < NE; ++e)
      acc[e] = vdp(acc[e], p, _mm512_set1_epi32(static_cast<int>(vj[e])));
  }
  for (int e = 0; e < NE; ++e) vstore(oT + e * W, acc[e]);
  sum = total;
}

// vP ((bk + 1) / 2 × Ev) = v of keys [j0, j0 + bk) in pairs of keys: (v[2j][e], v[2j + 1][e])
// at vP[j·Ev + e], the key past an odd bk zero. Into t.vp, once per block for every group of
// rows of the tile.
void lanes_prepare(const AttnArgs& a, const KeyBlocks<bf16_t>& kb, int64_t j0, int64_t bk,
                   const Scratch& t) {
  const int64_t Ev = a.Ev;
  auto* vP = reinterpret_cast<uint32_t*>(t.vp);
  for (int64_t j = 0; j < bk; j += 2) {
    const auto* r0 = reinterpret_cast<const uint16_t*>(kb.v + (j0 + j) * a.v_ss);
    const auto* r1 = j + 1 < bk ? r0 + a.v_ss : nullptr;
    uint32_t* dst = vP + j / 2 * Ev;
    int64_t e = 0;
    if (r1)
      for (; e + W <= Ev; e += W) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r0 + e)));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r1 + e)));
        _mm512_storeu_si512(dst + e, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    for (; e < Ev; ++e) dst[e] = r0[e] | (r1 ? static_cast<uint32_t>(r1[e]) << 16 : 0u);
  }
}
void lanes_queries(const KeyBlocks<bf16_t>&, float* qs, const Row* rows, int64_t E, float scale) {
  rows_to_pairs(reinterpret_cast<uint32_t*>(qs), rows, E, scale);
}
int64_t lanes_query_floats(const KeyBlocks<bf16_t>&, int64_t E) { return (E + 1) / 2 * W; }

V lanes_qk(const AttnArgs& a, const KeyBlocks<bf16_t>& kb, const float* qs, float* sT,
           int64_t j0, int64_t bk, const Scratch&) {
  const auto* qP = reinterpret_cast<const uint32_t*>(qs);
  const bf16_t* k = kb.k + j0 * a.k_ss;
  V mx = vset1(-INFINITY);
  over_key_tiles(bk, [&](int64_t j, auto n) {
    qk_lanes_bf16<decltype(n)::value>(sT + j * W, mx, qP, k + j * a.k_ss, a.k_ss, a.E);
  });
  return mx;
}
void lanes_pv(const AttnArgs& a, const KeyBlocks<bf16_t>&, float* oT, V alpha, float* sT,
              int64_t, int64_t bk, V m, V& sum, const Scratch& t) {
  auto* pP = reinterpret_cast<uint32_t*>(t.kt);
  const auto* vP = reinterpret_cast<const uint32_t*>(t.vp);
  over_out_tiles(a.Ev, [&](int64_t e0, auto n, bool first) {
    constexpr int NE = decltype(n)::value;
    if (first)
      pv_lanes_bf16<NE, true>(oT + e0 * W, alpha, sT, pP, vP + e0, a.Ev, bk, m, sum);
    else
      pv_lanes_bf16<NE, false>(oT + e0 * W, alpha, sT, pP, vP + e0, a.Ev, bk, m, sum);
  });
}
#endif  // MHATTN_BF16_DOT

// One block of keys [j0, j0 + bk) for a group of W rows: sT = q · kᵀ; step 3 when `cut` (some
// row does not see every key of the block) or there are masks; the softmax update of m, l and
// oT (W lanes each; oT is Ev × W); oT += P · v. qs holds the group's queries (lanes_queries).
template <class KT>
void lanes_block(const AttnArgs& a, const KeyBlocks<KT>& kb, const Row* rows, int64_t j0,
                 int64_t bk, bool cut, const float* qs, float* m, float* l, float* oT,
                 const Scratch& t) {
  float* sT = t.s;
  V mx = lanes_qk(a, kb, qs, sT, j0, bk, t);
  if (cut || a.masks[0].kind != 0 || a.masks[1].kind != 0 || a.softcap > 0)
    mx = lanes_mask(a, rows, j0, bk, cut, sT);
  // m starts at -FLT_MAX, not -inf: a row with no visible key so far keeps m' = -FLT_MAX, so
  // exp(m - m') = 1 and P = exp(-inf - m') = 0 with no special case, and l stays 0.
  const V m_old = vload(m), m_new = vmax(m_old, mx), alpha = vexp_softmax(vsub(m_old, m_new));
  V sum = vzero();
  lanes_pv(a, kb, oT, alpha, sT, j0, bk, m_new, sum, t);
  vstore(l, vfma(vload(l), alpha, sum));
  vstore(m, m_new);
}

// out of one task on the lanes path: batch b, kv head kvh, tile rows [r0, r0 + R) of the G·L
// rows, in groups of W. A group's last lanes, past R, repeat the last row, and their results are
// dropped. Each block of keys is visited once, for every group in turn, while it is in cache.
template <class KT>
void attend_tile_lanes(const AttnArgs& a, int64_t b, int64_t kvh, int64_t r0, int64_t R,
                       const KeyBlocks<KT>& kb, const Scratch& t) {
  const int64_t E = a.E, Ev = a.Ev, groups = (R + W - 1) / W, qn = lanes_query_floats(kb, E);
  Row rows[BQ_MAX];
  int64_t g_lo[BQ_MAX / W], g_hi[BQ_MAX / W];      // keys some row of the group sees
  int64_t lo_max[BQ_MAX / W], hi_min[BQ_MAX / W];  // keys every row of the group sees
  int64_t key_lo = a.S, key_hi = 0;
  for (int64_t g = 0; g < groups; ++g) {
    g_lo[g] = a.S, g_hi[g] = 0, lo_max[g] = 0, hi_min[g] = a.S;
    for (int64_t i = 0; i < W; ++i) {
      const int64_t idx = g * W + i;
      const Row& r = rows[idx] = make_row(a, b, kvh, r0 + std::min(idx, R - 1), nullptr);
      lo_max[g] = std::max(lo_max[g], r.lo);
      hi_min[g] = std::min(hi_min[g], r.hi);
      if (r.lo < r.hi) {
        g_lo[g] = std::min(g_lo[g], r.lo);
        g_hi[g] = std::max(g_hi[g], r.hi);
      }
    }
    lanes_queries(kb, t.qs + g * qn, rows + g * W, E, a.scale);
    key_lo = std::min(key_lo, g_lo[g]);
    key_hi = std::max(key_hi, g_hi[g]);
    std::fill(t.m + g * W, t.m + (g + 1) * W, -FLT_MAX);
    std::fill(t.l + g * W, t.l + (g + 1) * W, 0.0f);
    std::fill(t.o + g * Ev * W, t.o + (g + 1) * Ev * W, 0.0f);
  }
  for (int64_t j0 = key_lo; j0 < key_hi; j0 += kLanesBlockKeys) {
    const int64_t bk = std::min(kLanesBlockKeys, key_hi - j0);
    lanes_prepare(a, kb, j0, bk, t);
    for (int64_t g = 0; g < groups; ++g) {
      if (g_hi[g] <= j0 || g_lo[g] >= j0 + bk) continue;  // no row of the group sees the block
      // Only the block's first n keys when no row of the group sees past them (a causal
      // mask's diagonal blocks).
      const int64_t n = std::min(bk, g_hi[g] - j0);
      lanes_block(a, kb, rows + g * W, j0, n, lo_max[g] > j0 || hi_min[g] < j0 + n,
                  t.qs + g * qn, t.m + g * W, t.l + g * W, t.o + g * Ev * W, t);
    }
  }
  for (int64_t g = 0; g < groups; ++g)
    lanes_to_rows(rows + g * W, std::min<int64_t>(W, R - g * W), t.o + g * Ev * W, t.l + g * W,
                  Ev);
}

// Whether Kernels::attention reads this call's k and v as they are: float32 always; 16 bits on
// the direct path (decode) and on the packed path, which widens each block as it packs it; on the
// lanes path (AVX-512 targets, no weights asked for) only bfloat16, where the target multiplies
// it as it is (AVX512-BF16). mhattn::attention widens the others into float32 copies first.
bool reads_kv(const AttnArgs& a) {
  if (a.kv_dt == DType::f32 || a.Hkv == 0 || a.Hq / a.Hkv * a.L <= kDirectRows) return true;
  if (!kLanesPath || a.weights) return true;  // the packed path
  return kBf16Dot && a.kv_dt == DType::bf16;
}

template <class KT>
void attention_typed(const AttnArgs& a) {
  const int64_t G = a.Hq / a.Hkv;
  const int nt = num_threads();
  // A tile of at most kDirectRows rows (decode: L = 1 times the GQA group) reads k and v in
  // place: each key meets so few queries that packing it would cost more than it saves. Its
  // blocks need not fit L1 and are longer, so the per-block softmax bookkeeping is rarer.
  // A 16-bit k and v of more rows than that arrive only where reads_kv says the path reads
  // them; mhattn::attention widens them otherwise.
  const bool direct = G * a.L <= kDirectRows || !reads_kv(a);
  // The lanes path (above) unless there are weights to write.
  const bool lanes = kLanesPath && !direct && !a.weights;
  const int64_t evp = round_up(a.Ev, W);
  const int64_t bk_max =
      direct ? kDirectBlockKeys : (lanes ? kLanesBlockKeys : block_keys(a.E, evp));
  const int64_t bq = tile_rows(a.B * a.Hkv, G * a.L, a.E, round_up(bk_max, KP), evp, nt);
  const int64_t tiles = (G * a.L + bq - 1) / bq;
  const int64_t tasks = a.B * a.Hkv * tiles;
  const int64_t nblk = (a.S + bk_max - 1) / bk_max, blk_floats = block_floats(a.E, bk_max, evp);
  // With many tiles per kv head, every tile would pack the same blocks: pack them all once, in
  // a parallel pass before the tiles run. With few, packing in the tile is cheaper: the block
  // is then hot in the packing core's own L1 and L2, where the pass leaves a buffer the other
  // core reads through L3 (measured with 64-row tiles: 2 tiles a head, pass 10-40% slower; 8,
  // even; 16, 7-20% faster).
  const bool prepack =
      !direct && !lanes && (G * a.L + BQ_MIN - 1) / BQ_MIN >= kPrepackTiles && a.S > 0;
  // Split-S (file comment): chunks of `chunk` keys, `splits` per tile. Not with weights, whose
  // second pass needs every row's final m and l.
  int64_t splits = 1, chunk = a.S;
  if (direct && !a.weights && nt > 1 && tasks < kSplitTasksPerThread * nt) {
    const int64_t want = (kSplitTasksPerThread * nt + tasks - 1) / tasks;
    chunk = std::max(kSplitMinKeys, round_up((a.S + want - 1) / want, W));
    splits = std::max<int64_t>(1, (a.S + chunk - 1) / chunk);
  }
  // One shared buffer serves either (split-S is for the direct path, prepacking is not).
  float* packed = prepack ? shared_scratch(a.B * a.Hkv * nblk * blk_floats) : nullptr;
  const int64_t part_rows = tasks * splits * bq;  // partial results: m, l, then O (evp each)
  float* parts = splits > 1 ? shared_scratch(part_rows * (2 + evp)) : nullptr;
  const double flops = 2.0 * a.B * a.Hq * a.L * a.S * (a.E + a.Ev);

  // Task t: batch b, kv head kvh, rows [r0, r0 + R) of its G·L rows.
  struct Tile {
    int64_t b, kvh, r0, R;
  };
  auto tile_of = [&](int64_t task) {
    const int64_t r0 = task % tiles * bq;
    return Tile{task / (a.Hkv * tiles), task / tiles % a.Hkv, r0, std::min(bq, G * a.L - r0)};
  };
  // Job task·splits + c: chunk c of the task's keys, its rows' partial results side by side.
  auto partial_of = [&](int64_t job) {
    const int64_t c = job % splits;
    return Partial{c * chunk, std::min(a.S, (c + 1) * chunk), parts + job * bq,
                   parts + part_rows + job * bq, parts + 2 * part_rows + job * bq * evp};
  };

  auto head_blocks = [&](int64_t b, int64_t kvh) {
    KeyBlocks<KT> kb;
    kb.k = static_cast<const KT*>(a.k) + b * a.k_sb + kvh * a.k_sh;
    kb.v = static_cast<const KT*>(a.v) + b * a.v_sb + kvh * a.v_sh;
    kb.packed = prepack ? packed + (b * a.Hkv + kvh) * nblk * blk_floats : nullptr;
    kb.bk_max = bk_max;
    kb.evp = evp;
    kb.block_floats = blk_floats;
    kb.direct = direct;
    return kb;
  };

#pragma omp parallel num_threads(nt) if (nt > 1 && tasks * splits > 1 && flops > 1e5)
  {
    if (prepack) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < a.B * a.Hkv * nblk; ++i) {
        const KeyBlocks<KT> kb = head_blocks(i / nblk / a.Hkv, i / nblk % a.Hkv);
        const int64_t j0 = i % nblk * bk_max, bk = std::min(bk_max, a.S - j0);
        float* kt = packed + i * blk_floats;
        pack_keys(kt, a, kb, j0, bk);
        pack_values(kt + a.E * round_up(bk, KP), a, kb, j0, bk);
      }
    }
#pragma omp for schedule(dynamic)
    for (int64_t job = 0; job < tasks * splits; ++job) {
      const Tile tl = tile_of(job / splits);
      Scratch t;
      t.qs = thread_scratch(0, bq * a.E);
      // The bfloat16 lanes path keeps its pairs of P in kt and of v in vp (lanes_prepare).
      const bool pairs = lanes && !std::is_same_v<KT, float>;
      // The direct path on bfloat16 keeps its q rows and P rows in bfloat16 in kt
      // (qk_direct_pairs, pv_direct_pairs): at most kDirectRows of each.
      const int64_t kt_floats =
          pairs ? (bk_max + 1) / 2 * W
                : std::max(a.E * round_up(bk_max, KP),
                           kDirectRows * (direct_q_stride(a.E) + round_up(bk_max, 2 * W)) / 2);
      t.kt = lanes && !pairs ? nullptr : thread_scratch(1, kt_floats);
      t.vp = lanes && !pairs ? nullptr
                             : thread_scratch(2, pairs ? (bk_max + 1) / 2 * a.Ev : bk_max * evp);
      t.s = thread_scratch(3, lanes ? W * bk_max : RM * round_up(bk_max, KP));
      t.o = thread_scratch(4, bq * evp);
      t.m = thread_scratch(5, bq);
      t.l = thread_scratch(6, bq);
      const Partial part = splits > 1 ? partial_of(job) : Partial{};
      if constexpr (std::is_same_v<KT, float> || (kBf16Dot && std::is_same_v<KT, bf16_t>))
        if (lanes) {
          attend_tile_lanes(a, tl.b, tl.kvh, tl.r0, tl.R, head_blocks(tl.b, tl.kvh), t);
          continue;
        }
      attend_tile(a, tl.b, tl.kvh, tl.r0, tl.R, head_blocks(tl.b, tl.kvh), t,
                  splits > 1 ? &part : nullptr);
    }
    if (splits > 1) {
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const Tile tl = tile_of(task);
        const Partial p0 = partial_of(task * splits);  // chunk 0; chunk c lies c·bq rows on
        for (int64_t i = 0; i < tl.R; ++i)
          merge_row(row_out(a, tl.b, tl.kvh, tl.r0 + i), a.Ev, splits, p0.m + i, p0.l + i, bq,
                    p0.o + i * evp, bq * evp);
      }
    }
  }
}

}  // namespace

bool attention_reads(const AttnArgs& a) { return reads_kv(a); }

void attention(const AttnArgs& a) {
  if (a.B == 0 || a.Hq == 0 || a.L == 0 || a.Ev == 0) return;
  switch (a.kv_dt) {
    case DType::f32: return attention_typed<float>(a);
    case DType::bf16: return attention_typed<bf16_t>(a);
    case DType::f16: return attention_typed<f16_t>(a);
  }
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
