// threads.cpp: mhattn's own thread count, the per-thread scratch buffers of the kernels, and a
// parallel read of memory with the same threads (the benchmark's measure of bandwidth).
//
// The thread count is mhattn's alone: every parallel region says num_threads(num_threads()),
// so set_num_threads never touches the OpenMP setting that PyTorch or NumPy see.
//
// Fork: libgomp's worker threads do not survive fork(), and a child that enters a parallel
// region of more than one thread after its parent ran one waits forever. So a child forked
// after mhattn's kernels ran in parallel computes on one thread (documented in the README).
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "mhattn/ops.h"

namespace mhattn {

namespace {
std::atomic<int> g_threads{1};
thread_local int t_threads = 0;  // the calling thread's own count (threads_here), 0: none
std::atomic<bool> g_pool_started{false};  // a kernel asked for more than one thread
std::atomic<bool> g_forked_child{false};  // ... and then this process was forked from it

void after_fork_in_child() {
  if (g_pool_started.load()) g_forked_child.store(true);
}
const bool g_fork_handler = pthread_atfork(nullptr, nullptr, after_fork_in_child) == 0;

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
struct Scratch {
  std::unique_ptr<float, AlignedFree> buf;
  float* data = nullptr;  // buf, or past it by the slot's stagger
  int64_t size = 0;
};
}  // namespace

int threads_setting() {
  if (g_forked_child.load(std::memory_order_relaxed)) return 1;
  return t_threads > 0 ? t_threads : g_threads.load();
}

int num_threads() {
  const int n = threads_setting();
  if (n > 1 && !g_pool_started.load(std::memory_order_relaxed)) g_pool_started.store(true);
  return n;
}

void set_num_threads(int n) { g_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

int set_threads_here(int n) {
  const int before = t_threads;
  t_threads = n < 0 ? 0 : n;
  return before;
}

namespace {
// s's buffer of at least n floats, stagger floats past a page boundary (sanitizer builds:
// exactly n floats, as malloc places them).
float* grow(Scratch& s, int64_t n, int64_t stagger = 0) {
#if defined(__SANITIZE_ADDRESS__)
  // Sanitizer builds: exactly n floats every time, so AddressSanitizer sees any access past
  // them (a pooled buffer's slack would hide it).
  if (s.size != n) {
    void* p = std::malloc(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float));
    if (!p) throw std::bad_alloc();
    s.buf.reset(static_cast<float*>(p));
    s.data = s.buf.get();
    s.size = n;
  }
#else
  if (s.size < n) {
    // Round up to whole cache lines, and grow by half again so a slowly growing size does
    // not reallocate on every call.
    int64_t want = ((n + n / 2 + 15) / 16) * 16;
    const size_t bytes = (static_cast<size_t>(want + stagger) * sizeof(float) + 4095) / 4096 * 4096;
    void* p = std::aligned_alloc(4096, bytes);  // (C11 asks for a size a multiple of 4096)
    if (!p) throw std::bad_alloc();
    s.buf.reset(static_cast<float*>(p));
    s.data = s.buf.get() + stagger;
    s.size = want;
  }
#endif
  return s.data;
}
}  // namespace

float* thread_scratch(int slot, int64_t n) {
  // Each slot starts at its own offset in a page (slot × 320 bytes), so that the tile's
  // buffers, read and written in the same loops, never share their low 12 address bits: a load
  // then never waits on an unrelated store to the same offset (4K aliasing). With the
  // allocator's offsets, bf16 B1 H12 L128 E64 ran at 0.72x of fp32 in 3 of 11 processes
  // (Zen 4); staggered, at 0.98-1.08x in 12 of 12.
  thread_local Scratch slots[kScratchSlots];
  return grow(slots[slot], n, slot * 80);
}

float* shared_scratch(int64_t n) {
  thread_local Scratch shared;
  return grow(shared, n);
}

float* widen_scratch(int slot, int64_t n) {
  thread_local Scratch widened[2];
  return grow(widened[slot], n);
}

double read_memory(const float* x, int64_t n) {
  // Eight running sums of four floats per thread (SSE2 on x86-64, NEON on ARM, with no ISA
  // flags) keep enough loads and adds in flight that memory, not the adds' latency, is the
  // limit; scalar sums would cap one core near 20 GB/s. The sum itself is unused.
  typedef float v4 __attribute__((vector_size(16)));
  constexpr int64_t kChunk = 4096;  // floats per parallel iteration, a multiple of 32
  double total = 0.0;
  const int nt = num_threads();
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : total)
  for (int64_t c = 0; c < (n + kChunk - 1) / kChunk; ++c) {
    v4 acc[8] = {};
    const int64_t end = std::min<int64_t>(n, (c + 1) * kChunk);
    int64_t i = c * kChunk;
    for (; i + 32 <= end; i += 32)
      for (int j = 0; j < 8; ++j) {
        v4 t;
        std::memcpy(&t, x + i + 4 * j, sizeof t);
        acc[j] += t;
      }
    float s = 0.0f;
    for (; i < end; ++i) s += x[i];
    for (int j = 0; j < 8; ++j) s += (acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]);
    total += s;
  }
  return total;
}

}  // namespace mhattn
