// softmax.cpp: softmax over the rows of a matrix, for every target; also the array form of the
// kernels' vector exp, which the tests use to check its accuracy.
//
// Three passes per row, as in llm.c: (1) the max, (2) exp(x - max) and its sum, (3) times 1/sum.
// A row whose entries are all -inf (fully masked) comes out as zeros, not NaN; NaN in a row
// makes that row NaN.
#include <algorithm>

#include "mhattn/ops.h"
#include "mhattn/vec.h"

namespace mhattn {
namespace MHATTN_TARGET {

// out (rows, n) = softmax of each row of x (rows, n); rows apart by ld in both. out may be x.
void softmax(float* out, const float* x, int64_t rows, int64_t n, int64_t ld) {
  const int nt = num_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows > 1 && rows * n > (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ld;
    float* yr = out + r * ld;
    const float m = vec_max(xr, n);                                   // (1)
    const float sum = vec_exp_sum(yr, xr, n, m == -INFINITY ? 0.0f : m);  // (2)
    vec_scale(yr, yr, n, recip_or_zero(sum));                         // (3)
  }
}

// out[i] = exp(x[i]) through vexp, or vexp_softmax when `softmax`; the scalar tail padded into
// one vector.
void vexp_array(float* out, const float* x, int64_t n, bool softmax) {
  auto f = [softmax](V v) { return softmax ? vexp_softmax(v) : vexp(v); };
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(out + i, f(vload(x + i)));
  if (i < n) {
    float buf[W] = {};
    std::copy(x + i, x + n, buf);
    vstore(buf, f(vload(buf)));
    std::copy(buf, buf + (n - i), out + i);
  }
}

}  // namespace MHATTN_TARGET
}  // namespace mhattn
