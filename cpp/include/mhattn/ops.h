// ops.h: the signature of every kernel, and the table through which the chosen target is called.
//
// Letters used throughout: B batch, Hq query heads, Hkv key/value heads, L query length,
// S key length, E head dim of queries and keys, Ev head dim of values, M/N/K matrix sizes.
// Conventions: outputs first, then inputs, then sizes; sizes and strides are int64 and strides
// count elements, not bytes. Inputs were validated by the Python layer (mhattn/_checks.py):
// kernels trust shapes, strides and pointers.
#pragma once

#include <cstdint>
#include <new>
#include <string>
#include <vector>

namespace mhattn {

// ---------------------------------------------------------------------------------------------
// GEMM: C = A · B + bias, with B packed once into panels (pack_b) and C written through OutMap.

// The element types of arrays: float32, and the two 16-bit formats, held as their bits
// (bfloat16: the top half of a float32; float16: IEEE binary16). simd.h converts them.
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// Where C(m, n) lives. Rows come in groups of `rows_per_group`, columns in groups of
// `cols_per_group` (columns inside a group are contiguous):
//   C(m, n) = data + (m / rows_per_group) * row_group_stride + (m % rows_per_group) * row_stride
//                  + (n / cols_per_group) * col_group_stride + (n % cols_per_group)
// A plain row-major matrix is one group each way. The in-projection uses the groups to write
// Q, K and V straight into the (B, H, L, E) layout: rows (b, l), columns (h, e).
// C is float32, or, with dtype bf16 or f16, 16-bit values at the same offsets (in elements)
// from data: a GEMM writes those only where Kernels::gemm_writes_half says it does.
struct OutMap {
  float* data;
  int64_t rows_per_group, row_group_stride, row_stride;
  int64_t cols_per_group, col_group_stride;
  DType dtype = DType::f32;
  int64_t row_offset(int64_t m) const {
    return (m / rows_per_group) * row_group_stride + (m % rows_per_group) * row_stride;
  }
  float* row(int64_t m) const { return data + row_offset(m); }
  uint16_t* row_half(int64_t m) const { return reinterpret_cast<uint16_t*>(data) + row_offset(m); }
  int64_t col(int64_t n) const { return (n / cols_per_group) * col_group_stride + n % cols_per_group; }
  float* at(int64_t m, int64_t n) const { return row(m) + col(n); }
  static OutMap row_major(float* c, int64_t M, int64_t N, int64_t ldc, DType dt = DType::f32) {
    return OutMap{c, M > 0 ? M : 1, 0, ldc, N > 0 ? N : 1, 0, dt};
  }
};

// What the GEMM applies to each element of C as it stores it (activation.h has the formulas).
enum class Activation : int { none = 0, relu = 1, gelu = 2, gelu_tanh = 3, silu = 4 };

// How pack_b lays out B (K, N), in B's own dtype (float32 in `data`, 16-bit in `half`):
//   panels: panels of NR columns, panel p holding b(k, p*NR + j) at p * K * NR + k * NR + j,
//           zero past N. NR is the target's (gemm.cpp). Every dtype, every target.
//   pairs:  bfloat16 for vdpbf16ps (gemm/bf16_dot.cpp): panels of NR columns whose rows go in
//           pairs of k, b(k, p*NR + j) at p * Kp * NR + (k / 2) * 2 * NR + 2 * j + k % 2,
//           Kp = K rounded up to even, zero past K and N.
enum class Layout : int { panels = 0, pairs = 1 };

// The allocator of packed weights: storage on a 64-byte boundary, so that no row of a panel
// (a 64-byte vector or tile row) straddles two cache lines. std::allocator's large blocks sit
// 16 bytes past a page: every tile row then touched two lines, and an AMX block loop over
// 128 x 2304 x 768 ran at 430-530 GFLOP/s against 860-890 aligned (Intel Xeon with AMX, one
// thread, a micro-benchmark).
template <class T>
struct LineAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <class U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <class U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};

struct PackedB {
  std::vector<float, LineAligned<float>> data;
  std::vector<uint16_t, LineAligned<uint16_t>> half;
  int64_t K = 0, N = 0;
  int nr = 0;
  DType dtype = DType::f32;
  Layout layout = Layout::panels;
  std::string target;  // the target whose micro-kernel this layout is for
};

// ---------------------------------------------------------------------------------------------
// Attention.

// A mask over (B, Hq, L, S), broadcast by zero strides. kind: 0 none, 1 bool (bytes, a key takes
// part where the byte equals `keep`), 2 float (added to the scaled scores).
struct MaskArg {
  int kind = 0;
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, ss = 0;
  uint8_t keep = 1;
};

// out (B, Hq, L, Ev) = softmax(scale * q kᵀ + masks) v, head h reading kv head h / (Hq / Hkv).
// q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), out: all with the last axis contiguous,
// the other strides free. q and out are float32; k and v are of kv_dt, and a 16-bit kv_dt is
// read in place by Kernels::attention only where Kernels::attention_reads says so (everywhere
// but the lanes path of AVX-512 targets, which reads bfloat16 only, with AVX512-BF16);
// mhattn::attention widens it first otherwise.
// weights (B, Hq, L, S) contiguous and zero-filled, or null.
// Key j is visible to query l when the masks allow it and, with p = l + diag_offset,
//   causal: j <= p;   window > 0: j > p - window (and j < p + window when not causal).
// softcap > 0 caps every scaled score s to softcap · tanh(s / softcap) before the masks
// (Gemma 2's attention logit soft-capping).
struct AttnArgs {
  float* out;
  int64_t out_sb, out_sh, out_sl;
  float* weights;
  const float* q;
  int64_t q_sb, q_sh, q_sl;
  const void* k;
  int64_t k_sb, k_sh, k_ss;
  const void* v;
  int64_t v_sb, v_sh, v_ss;
  DType kv_dt;
  MaskArg masks[2];
  int64_t B, Hq, Hkv, L, S, E, Ev;
  float scale;
  bool causal;
  int64_t diag_offset;  // 0 for top-left alignment, S - L for bottom-right
  int64_t window;       // 0: no window
  float softcap;        // 0: no cap
};

// Rows of a tile (Hq / Hkv · L) up to which attention reads k and v in place, a decode step's.
constexpr int64_t kAttentionDirectRows = 4;

// ---------------------------------------------------------------------------------------------
// The kernels of one target. dispatch.cpp picks a table at import from the CPU's features.
struct Kernels {
  const char* name;
  int nr;  // panel width of pack_b's layouts
  // The layout pack_b gives a B of dtype dt, and its size in elements of dt.
  Layout (*b_layout)(DType dt);
  int64_t (*packed_size)(int64_t K, int64_t N, DType dt);
  // dst = B (K, N) of dtype dt packed, b(k, n) = b[k * b_ks + n * b_ns] (in elements).
  void (*pack_b)(void* dst, const void* b, DType dt, int64_t b_ks, int64_t b_ns, int64_t K,
                 int64_t N);
  // C (M, N) = act(A (M, K) · B + bias (N, may be null)) in float32; a(m, k) =
  // a[m * a_rs + k * a_cs], of dtype a_dt. Accumulation is float32 whatever the dtypes.
  void (*gemm)(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
               const PackedB& b, const float* bias, Activation act, int64_t M);
  // Whether gemm writes a 16-bit C itself (OutMap::dtype bf16 or f16) for this B and M: where
  // it stores each element once, after the whole of K (the AMX tiles). Elsewhere C is float32.
  bool (*gemm_writes_half)(const PackedB& b, int64_t M);
  // The same product on a B (K, N) that nobody packed, b(k, n) = b[k * b_ks + n * b_ns], of
  // A's dtype (b_dt must equal a_dt): never a copy of the whole of B, but slivers of it as they
  // are used (products of at most a few rows read it in place), in float32 arithmetic.
  void (*gemm_raw)(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
                   const void* b, DType b_dt, int64_t b_ks, int64_t b_ns, int64_t K, int64_t N,
                   const float* bias, Activation act, int64_t M);
  // dst[i] = src[i] rounded to dt (bf16 or f16), to nearest even, i < n.
  void (*to_half)(uint16_t* dst, const float* src, int64_t n, DType dt);
  // dst[i] = src[i] (bf16 or f16) widened to float32, i < n.
  void (*to_float)(float* dst, const uint16_t* src, int64_t n, DType dt);
  // out = softmax(x) over each row of n; rows apart by ld in both. out may equal x.
  void (*softmax)(float* out, const float* x, int64_t rows, int64_t n, int64_t ld);
  // out (rows, n) = LayerNorm (or RMSNorm when rms) of each row of x + r (r may be null),
  // times w, plus b (may be null; LayerNorm only); all C-contiguous, out may equal x or r.
  void (*norm)(float* out, const float* x, const float* r, const float* w, const float* b,
               int64_t rows, int64_t n, float eps, bool rms);
  void (*attention)(const AttnArgs& args);
  // Whether attention reads this call's 16-bit k and v as they are (else they must be float32):
  // the direct path's few rows, and bfloat16 where the target has a bfloat16 lanes path.
  bool (*attention_reads)(const AttnArgs& args);
  // out[i] = exp(x[i]) with the kernels' vector exp, or the softmax's (vexp_softmax, for
  // x <= 0) when `softmax`; for testing their accuracy.
  void (*vexp)(float* out, const float* x, int64_t n, bool softmax);
  // iters rounds of 16 independent FMA chains on each of num_threads() threads (for bf16: four
  // tdpbf16ps where the target has AMX, else vdpbf16ps where it has them); returns the flops
  // done, for the benchmark to time.
  double (*peak_flops)(int64_t iters, bool bf16);
};

namespace generic { const Kernels* kernels(); }
#ifdef MHATTN_HAVE_AVX2
namespace avx2 { const Kernels* kernels(); }
#endif
#ifdef MHATTN_HAVE_AVX512
namespace avx512 { const Kernels* kernels(); }
#endif
#ifdef MHATTN_HAVE_AVX512BF16
namespace avx512bf16 { const Kernels* kernels(); }
#endif
#ifdef MHATTN_HAVE_AMX
namespace amx { const Kernels* kernels(); }
#endif
#ifdef MHATTN_HAVE_AMX_EMULATED
namespace amx_emulated { const Kernels* kernels(); }
#endif

// dispatch.cpp
const Kernels& kernels();                       // the active target
std::vector<std::string> supported_targets();   // compiled in and runnable on this CPU, best last
// supported_targets() and the emulations (amx_emulated, on every x86-64 CPU): what the tests run.
std::vector<std::string> test_targets();
// Why the amx target is not runnable ("" when it is): no AMX, or the OS refused the tiles.
std::string amx_status();
void set_target(const std::string& name);       // throws std::invalid_argument if unsupported
// B (K, N) of dtype dt, b(k, n) = b[k * b_ks + n * b_ns], packed for the active target.
// Allocation lives here rather than in the kernels so that no standard-library code is built
// with ISA flags.
PackedB pack_b(const void* b, DType dt, int64_t b_ks, int64_t b_ns, int64_t K, int64_t N);
// Kernels::gemm for a C of any dtype: a 16-bit C goes through a float32 buffer, rounded after,
// where the kernels do not write it themselves (gemm_writes_half).
void gemm_packed(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
                 const PackedB& b, const float* bias, Activation act, int64_t M);
// C (M, N) = act(A · B + bias) on a B nobody packed (mhattn.linear and matmul): Kernels::gemm_raw,
// except bfloat16 products of many rows where the kernels have a bfloat16 layout (vdpbf16ps,
// AMX): B packed whole for them first, which twice the products per instruction repay. A and B
// must have one dtype (std::invalid_argument otherwise). C of any dtype, as gemm_packed.
void gemm_unpacked(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
                   const void* b, DType b_dt, int64_t b_ks, int64_t b_ns, int64_t K, int64_t N,
                   const float* bias, Activation act, int64_t M);

// threads.cpp
int num_threads();       // for a kernel about to start a parallel region
int threads_setting();   // what get_num_threads reports (1 in a child forked after a parallel run)
void set_num_threads(int n);
// The count for the kernels the calling thread starts, over set_num_threads' (0: none); returns
// the one before. For a process whose threads each run their own calls (mhattn.threads).
int set_threads_here(int n);
// A per-thread buffer of at least n floats, 64-byte aligned, reused across calls. slot picks
// one of a few independent buffers so a kernel can hold several at once.
float* thread_scratch(int slot, int64_t n);
constexpr int kScratchSlots = 8;
// A buffer of the calling thread (not of the OpenMP workers) of at least n floats, to share
// with its team inside a parallel region; reused across calls like thread_scratch.
float* shared_scratch(int64_t n);
// Two more buffers of the calling thread (slot 0 or 1), for mhattn::attention's float32 copies
// of a 16-bit k and v: reused across calls, as a fresh allocation of a few MB costs its page
// faults on every call (0.5 ms of a 4 ms bfloat16 attention, L = S = 512, E = 64, H = 12).
float* widen_scratch(int slot, int64_t n);
// Reads x (n floats) once with num_threads() threads and returns its sum: the benchmark
// times it to know the memory bandwidth the kernels can have.
double read_memory(const float* x, int64_t n);

// mha.cpp: attention on the active kernels, a 16-bit k and v widened to float32 first where the
// kernel reads float32 (Kernels::attention_reads).
void attention(const AttnArgs& a);
// mha.cpp: the multi-head attention forward, projections included.
struct Projection {
  const void* x;         // (rows, K) of dtype x_dt, rows apart by x_rs, columns contiguous
  DType x_dt;
  int64_t x_rs, rows;
  const PackedB* w;      // (K, N) packed: x · w is the projection
  const float* bias;     // (N) or null
  OutMap dst;
};
// A KV cache of a 16-bit dtype: the K and V projections write their float32 rows into src
// (B, H2 = 2 Hkv, n new positions, E), and mha_forward rounds them into the cache (B, H2,
// Sbuf, E) at positions pos .. pos + n.
struct KvStage {
  const float* src;      // null: no stage (the projections write a float32 cache in place)
  uint16_t* cache;
  DType dt;
  int64_t B, H2, n, E, Sbuf, pos;
};
struct MhaArgs {
  Projection proj[3];    // Q, K, V; a projection with w == null is skipped (cached keys)
  KvStage stage;         // where K and V go when the cache is 16-bit
  AttnArgs attn;         // reads what the projections wrote; attn.out is the concat buffer
  Projection out_proj;   // x = the concat buffer (rows of the query, Hq * Ev): heads side by side
  float* avg_weights;    // (B, L, S) or null: weights averaged over heads (attn.weights set)
};
void mha_forward(const MhaArgs& args);

}  // namespace mhattn
