// mha.cpp: the multi-head attention forward in one native call (arguments: MhaArgs, ops.h).
//
// 1. in-projections: x · Wᵀ + b for Q, K and V, each GEMM storing straight into the
//    (B, H, L, E) layout of its buffer (or into the KV cache) through its OutMap;
// 2. attention in every head, writing each head's output beside the others (concat);
// 3. out-projection: concat · Woᵀ + bo;
// 4. if asked, the attention weights averaged over heads.
// The kernels come from the active target; this file holds no arithmetic of its own but step 4.
#include <stdexcept>

#include "mhattn/ops.h"

namespace mhattn {

namespace {
void project(const Kernels& k, const Projection& p) {
  if (p.w->target != k.name)
    throw std::runtime_error("weights were packed for the " + p.w->target +
                             " kernels, but the active kernels are " + k.name);
  k.gemm(p.dst, p.x, p.x_dt, p.x_rs, 1, *p.w, p.bias, Activation::none, p.rows);
}
}  // namespace

void mha_forward(const MhaArgs& a) {
  const Kernels& k = kernels();
  for (const Projection& p : a.proj)  // 1.
    if (p.w) project(k, p);
  k.attention(a.attn);                // 2.
  project(k, a.out_proj);             // 3.
  if (a.avg_weights) {                // 4. avg (B, L, S) = mean over h of weights (B, Hq, L, S)
    const AttnArgs& t = a.attn;
    const int64_t LS = t.L * t.S;
    const float inv = 1.0f / static_cast<float>(t.Hq);
    const int nt = num_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && t.B * t.Hq * LS > (1 << 16))
    for (int64_t b = 0; b < t.B; ++b) {
      float* dst = a.avg_weights + b * LS;
      for (int64_t i = 0; i < LS; ++i) dst[i] = 0.0f;
      for (int64_t h = 0; h < t.Hq; ++h) {
        const float* src = t.weights + (b * t.Hq + h) * LS;
        for (int64_t i = 0; i < LS; ++i) dst[i] += src[i];
      }
      for (int64_t i = 0; i < LS; ++i) dst[i] *= inv;
    }
  }
}

}  // namespace mhattn
