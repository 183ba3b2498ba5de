// threads.cpp: mhattn's own thread count and the per-thread scratch buffers of the kernels.
//
// The thread count is mhattn's alone: every parallel region says num_threads(num_threads()),
// so set_num_threads never touches the OpenMP setting that PyTorch or NumPy see.
#include <atomic>
#include <cstdlib>
#include <memory>

#include "mhattn/ops.h"

namespace mhattn {

namespace {
std::atomic<int> g_threads{1};

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
struct Scratch {
  std::unique_ptr<float, AlignedFree> buf;
  int64_t size = 0;
};
}  // namespace

int num_threads() { return g_threads.load(std::memory_order_relaxed); }
void set_num_threads(int n) { g_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

float* thread_scratch(int slot, int64_t n) {
  thread_local Scratch slots[kScratchSlots];
  Scratch& s = slots[slot];
  if (s.size < n) {
    // Round up to whole cache lines, and grow by half again so a slowly growing size does
    // not reallocate on every call.
    int64_t want = ((n + n / 2 + 15) / 16) * 16;
    void* p = std::aligned_alloc(64, static_cast<size_t>(want) * sizeof(float));
    if (!p) throw std::bad_alloc();
    s.buf.reset(static_cast<float*>(p));
    s.size = want;
  }
  return s.buf.get();
}

}  // namespace mhattn
