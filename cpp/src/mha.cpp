// mha.cpp: the multi-head attention forward in one native call (arguments: MhaArgs, ops.h).
//
// 1. in-projections: x · Wᵀ + b for Q, K and V, each GEMM storing straight into the
//    (B, H, L, E) layout of its buffer (or into the KV cache) through its OutMap; a 16-bit
//    cache gets its new rows rounded from a float32 stage;
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
// dst (B, H, S, n) float32, contiguous = src (B, H, S, n) of dt, rows of n (contiguous) at
// src + b·sb + h·sh + s·ss. Heads in parallel; a single head is spread over the threads by
// to_float itself. (Not a parallel loop of one iteration around it: to_float's own region,
// nested in an inactive one, would start a new team of threads on every call, which made a
// one-head bfloat16 attention 3x slower than float32 on two threads.)
void widen(const Kernels& k, float* dst, const void* src, DType dt, int64_t B, int64_t H,
           int64_t S, int64_t n, int64_t sb, int64_t sh, int64_t ss) {
  const auto* p = static_cast<const uint16_t*>(src);
  auto head = [&](int64_t bh) {
    const uint16_t* from = p + bh / H * sb + bh % H * sh;
    float* to = dst + bh * S * n;
    if (ss == n) {
      k.to_float(to, from, S * n, dt);
    } else {
      for (int64_t s = 0; s < S; ++s) k.to_float(to + s * n, from + s * ss, n, dt);
    }
  };
  if (B * H == 1) return head(0);
  const int nt = num_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && B * H * S * n > (1 << 16))
  for (int64_t bh = 0; bh < B * H; ++bh) head(bh);
}
}  // namespace

void attention(const AttnArgs& a) {
  const Kernels& k = kernels();
  if (k.attention_reads(a)) return k.attention(a);
  float* kf = widen_scratch(0, a.B * a.Hkv * a.S * a.E);
  float* vf = widen_scratch(1, a.B * a.Hkv * a.S * a.Ev);
  widen(k, kf, a.k, a.kv_dt, a.B, a.Hkv, a.S, a.E, a.k_sb, a.k_sh, a.k_ss);
  widen(k, vf, a.v, a.kv_dt, a.B, a.Hkv, a.S, a.Ev, a.v_sb, a.v_sh, a.v_ss);
  AttnArgs w = a;
  w.kv_dt = DType::f32;
  w.k = kf;
  w.k_sb = a.Hkv * a.S * a.E, w.k_sh = a.S * a.E, w.k_ss = a.E;
  w.v = vf;
  w.v_sb = a.Hkv * a.S * a.Ev, w.v_sh = a.S * a.Ev, w.v_ss = a.Ev;
  k.attention(w);
}

void mha_forward(const MhaArgs& a) {
  const Kernels& k = kernels();
  for (const Projection& p : a.proj)  // 1.
    if (p.w) project(k, p);
  const KvStage& st = a.stage;
  if (st.src)
    for (int64_t bh = 0; bh < st.B * st.H2; ++bh)
      k.to_half(st.cache + (bh * st.Sbuf + st.pos) * st.E, st.src + bh * st.n * st.E,
                st.n * st.E, st.dt);
  attention(a.attn);                  // 2.
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
