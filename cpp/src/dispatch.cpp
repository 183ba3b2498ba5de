// dispatch.cpp: choose the kernels' target at import from what this CPU can run.
//
// A target is runnable when the CPU has its instructions (CPUID) and the operating system
// saves the registers they use across context switches (XGETBV). MHATTN_ISA=<name> overrides
// the choice; a target the CPU cannot run is refused with an error, never run.
#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <vector>

#include "mhattn/ops.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(MHATTN_HAVE_AMX) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mhattn {

namespace {

#if defined(__x86_64__) || defined(_M_X64)
// One check per target, each building on the one before it; a build of only some targets
// (CMake's MHATTN_KERNEL_TARGETS) leaves some of them unused.
[[maybe_unused]] bool cpu_has_avx2_fma() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return false;
  // XCR0 bits 1 and 2: the OS saves the SSE and AVX register state.
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0x6u) != 0x6u) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return b & (1u << 5);  // AVX2
}

[[maybe_unused]] bool cpu_has_avx512f() {
  if (!cpu_has_avx2_fma()) return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 16))) return false;  // AVX512F
  // XCR0 bits 5-7: the OS saves the opmask registers and all 512 bits of zmm0-31.
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6u) == 0xE6u;
}

[[maybe_unused]] bool cpu_has_avx512bf16() {
  unsigned a, b, c, d;
  // AVX512BW too (CPUID.(7, 0):EBX bit 30), for the word shuffles of the bfloat16 kernels:
  // every CPU with AVX512_BF16 has it.
  if (!cpu_has_avx512f() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 30)))
    return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return a & (1u << 5);  // CPUID.(7, 1):EAX bit 5, AVX512_BF16
}
#endif

#if defined(MHATTN_HAVE_AMX)
// AMX-TILE and AMX-BF16 (CPUID.(7, 0):EDX bits 24 and 22), XCR0 bits 17-18 (the OS saves the
// tile state), and on Linux the permission to use it (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA), asked once: without it the first tile instruction kills the process.
std::string amx_refusal() {
  unsigned a, b, c, d;
  if (!cpu_has_avx512bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) ||
      !(d & (1u << 24)) || !(d & (1u << 22)))
    return "this CPU has no AMX-BF16";
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0x60000u) != 0x60000u) return "the OS does not enable the AMX tile state (XCR0)";
#if defined(__linux__)
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) != 0)
    return "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
#endif
  return "";
}
const std::string& amx_refused() {
  static const std::string why = amx_refusal();
  return why;
}
bool cpu_has_amx() { return amx_refused().empty(); }
#endif

struct Target {
  const char* name;
  const Kernels* (*table)();
  bool (*runnable)();
  bool test_only = false;  // an emulation: run by the tests, never chosen
};

const Target kTargets[] = {
    {"generic", generic::kernels, [] { return true; }},
#if defined(MHATTN_HAVE_AVX2)
    {"avx2", avx2::kernels, cpu_has_avx2_fma},
#endif
#if defined(MHATTN_HAVE_AVX512)
    {"avx512", avx512::kernels, cpu_has_avx512f},
#endif
#if defined(MHATTN_HAVE_AVX512BF16)
    {"avx512bf16", avx512bf16::kernels, cpu_has_avx512bf16},
#endif
#if defined(MHATTN_HAVE_AMX)
    {"amx", amx::kernels, cpu_has_amx},
#endif
#if defined(MHATTN_HAVE_AMX_EMULATED)
    {"amx_emulated", amx_emulated::kernels, [] { return true; }, true},
#endif
};

const Kernels* choose_at_import() {
  const Kernels* best = nullptr;
  for (const Target& t : kTargets)
    if (!t.test_only && t.runnable()) best = t.table();
  return best;
}

// Read on every kernel call, written only by set_target (at import, or by the tests).
std::atomic<const Kernels*> g_active{choose_at_import()};

}  // namespace

const Kernels& kernels() { return *g_active.load(std::memory_order_acquire); }

PackedB pack_b(const void* b, DType dt, int64_t b_ks, int64_t b_ns, int64_t K, int64_t N) {
  const Kernels& k = kernels();
  PackedB p;
  p.K = K;
  p.N = N;
  p.nr = k.nr;
  p.dtype = dt;
  p.layout = k.b_layout(dt);
  p.target = k.name;
  const auto size = static_cast<size_t>(k.packed_size(K, N, dt));
  void* dst;
  if (dt == DType::f32) {
    p.data.resize(size);
    dst = p.data.data();
  } else {
    p.half.resize(size);
    dst = p.half.data();
  }
  k.pack_b(dst, b, dt, b_ks, b_ns, K, N);
  return p;
}

namespace {
// product(C') with C' (M, N) float32, then C = C' rounded to c's 16-bit dtype.
template <class F>
void via_f32(const OutMap& c, int64_t M, int64_t N, F&& product) {
  std::vector<float> f(static_cast<size_t>(M * N));
  product(OutMap::row_major(f.data(), M, N, N));
  const Kernels& k = kernels();
  if (c.rows_per_group >= M && c.cols_per_group >= N && c.row_stride == N)
    return k.to_half(c.row_half(0), f.data(), M * N, c.dtype);  // one contiguous run
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0, len; j < N; j += len) {
      len = std::min(N - j, c.cols_per_group - j % c.cols_per_group);
      k.to_half(c.row_half(m) + c.col(j), f.data() + m * N + j, len, c.dtype);
    }
}
}  // namespace

void gemm_packed(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
                 const PackedB& b, const float* bias, Activation act, int64_t M) {
  const Kernels& k = kernels();
  if (c.dtype == DType::f32 || k.gemm_writes_half(b, M))
    return k.gemm(c, a, a_dt, a_rs, a_cs, b, bias, act, M);
  via_f32(c, M, b.N, [&](const OutMap& f) { k.gemm(f, a, a_dt, a_rs, a_cs, b, bias, act, M); });
}

void gemm_unpacked(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
                   const void* b, DType b_dt, int64_t b_ks, int64_t b_ns, int64_t K, int64_t N,
                   const float* bias, Activation act, int64_t M) {
  if (a_dt != b_dt) throw std::invalid_argument("gemm_unpacked: A and B must have one dtype");
  const Kernels& k = kernels();
  constexpr int64_t kPackRows = 16;
  if (k.b_layout(b_dt) == Layout::pairs && M >= kPackRows) {
    const PackedB p = pack_b(b, b_dt, b_ks, b_ns, K, N);
    return gemm_packed(c, a, a_dt, a_rs, a_cs, p, bias, act, M);
  }
  auto raw = [&](const OutMap& f) {
    k.gemm_raw(f, a, a_dt, a_rs, a_cs, b, b_dt, b_ks, b_ns, K, N, bias, act, M);
  };
  if (c.dtype == DType::f32) return raw(c);
  via_f32(c, M, N, raw);
}

std::vector<std::string> supported_targets() {
  std::vector<std::string> names;
  for (const Target& t : kTargets)
    if (!t.test_only && t.runnable()) names.emplace_back(t.name);
  return names;
}

std::vector<std::string> test_targets() {
  std::vector<std::string> names;
  for (const Target& t : kTargets)
    if (t.runnable()) names.emplace_back(t.name);
  return names;
}

std::string amx_status() {
#if defined(MHATTN_HAVE_AMX)
  return amx_refused();
#else
  return "this build has no AMX kernels";
#endif
}

void set_target(const std::string& name) {
  std::string known;
  for (const Target& t : kTargets) {
    if (name == t.name) {
      if (!t.runnable())
        throw std::invalid_argument("MHATTN_ISA=" + name + ": this CPU cannot run the " + name +
                                    " kernels");
      g_active.store(t.table(), std::memory_order_release);
      return;
    }
    known += known.empty() ? t.name : std::string(", ") + t.name;
  }
  throw std::invalid_argument("MHATTN_ISA=" + name + ": unknown target; this build has " + known);
}

}  // namespace mhattn
