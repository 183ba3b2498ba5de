// kernels.cpp: the table of one target's kernels. Compiled once per target with the kernels,
// so `kernels()` of mhattn::avx2 hands out the AVX2 builds of gemm/, softmax.cpp, norm.cpp and
// attention.cpp.
#include "mhattn/ops.h"

#define MHATTN_STR2(x) #x
#define MHATTN_STR(x) MHATTN_STR2(x)

namespace mhattn {
namespace MHATTN_TARGET {

// gemm/gemm.cpp
int panel_width();
Layout b_layout(DType dt);
int64_t packed_size(int64_t K, int64_t N, DType dt);
void pack_b(void* dst, const void* b, DType dt, int64_t b_ks, int64_t b_ns, int64_t K,
            int64_t N);
void gemm(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
          const PackedB& b, const float* bias, Activation act, int64_t M);
bool gemm_writes_half(const PackedB& b, int64_t M);
void gemm_raw(const OutMap& c, const void* a, DType a_dt, int64_t a_rs, int64_t a_cs,
              const void* b, DType b_dt, int64_t b_ks, int64_t b_ns, int64_t K, int64_t N,
              const float* bias, Activation act, int64_t M);
// convert.cpp
void to_half(uint16_t* dst, const float* src, int64_t n, DType dt);
void to_float(float* dst, const uint16_t* src, int64_t n, DType dt);
// softmax.cpp
void softmax(float* out, const float* x, int64_t rows, int64_t n, int64_t ld);
void vexp_array(float* out, const float* x, int64_t n, bool softmax);
// norm.cpp
void norm(float* out, const float* x, const float* r, const float* w, const float* b,
          int64_t rows, int64_t n, float eps, bool rms);
// attention.cpp
void attention(const AttnArgs& args);
bool attention_reads(const AttnArgs& args);
// peak.cpp
double peak_flops(int64_t iters, bool bf16);

const Kernels* kernels() {
  static const Kernels table = {MHATTN_STR(MHATTN_TARGET), panel_width(), b_layout,
                                packed_size, pack_b, gemm, gemm_writes_half, gemm_raw, to_half,
                                to_float, softmax, norm, attention, attention_reads, vexp_array,
                                peak_flops};
  return &table;
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
