// fused_linear_cross_entropy_cpu.cpp — CPU kernel of the fused softmax / loss / gradient pass
// (math in fused_linear_cross_entropy.h).
//
// The ATen layer splits a chunk's rows with at::parallel_for; each row is three `omp simd` passes
// over its V logits (max; sum of exp(z - max) and of z; dx written in place), which stay in L2
// for vocabularies up to ~100K fp32 values. exp is common/cpu_math.h's exp_for_sigmoid (vectorizes;
// ~1.2e-7 relative; clamps below -87 to e^-87 ~ 1.6e-38 instead of 0, which no sum of >= 1 notices).
// NaN propagates: a NaN logit makes the sum of exp NaN, so lse, loss and every dx of its row are NaN.
// softcap uses std::tanh (scalar: accuracy over speed for a rarely used option).
#pragma GCC optimize("no-trapping-math")

#include <cmath>
#include <limits>

#include "fused_linear_cross_entropy/fused_linear_cross_entropy.h"

#include "common/cpu_math.h"
#include "common/cpu_utils.h"

namespace llmcore {
namespace {

template <typename T, bool CAP>
LLMCORE_INLINE acc_t<T> load_z(const T* x, int64_t v, acc_t<T> cap, acc_t<T> inv_cap) {
  using A = acc_t<T>;
  const A xv = widen(x[v]);
  if constexpr (CAP) return cap * std::tanh(xv * inv_cap);
  return xv;
}

// dx over the row's V columns from a known lse; dx at local column tl (the target, when 0 <= tl < V)
// gets the extra -(1 - eps).
template <typename T, bool CAP>
LLMCORE_INLINE void grad_loop(const FlceRowsParams& p, int64_t r, T* x, int64_t tl, acc_t<T> lse) {
  using A = acc_t<T>;
  const int64_t V = p.V;
  const A cap = A(p.softcap), inv_cap = CAP ? A(1) / A(p.softcap) : A(0);
  const A eps = A(p.label_smoothing), zc = A(p.z_loss), eps_v = eps / A(p.V_total);
  const A g = A(p.scale) * (p.row_grad ? static_cast<const A*>(p.row_grad)[r] : A(1));
  const A a = A(1) + A(2) * zc * lse;
  const bool has_t = tl >= 0 && tl < V;
  // the target's dx first: the loop below overwrites x[tl]
  A dt = 0;
  if (has_t) {
    const A zt = load_z<T, CAP>(x, tl, cap, inv_cap);
    dt = std::exp(zt - lse) * a - eps_v - (A(1) - eps);
    if constexpr (CAP) {
      const A th = zt * inv_cap;
      dt *= A(1) - th * th;
    }
    dt *= g;
  }
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    A d;
    if constexpr (CAP) {
      const A th = std::tanh(A(widen(x[v])) * inv_cap);
      d = (exp_for_sigmoid(cap * th - lse) * a - eps_v) * (A(1) - th * th);
    } else {
      d = exp_for_sigmoid(A(widen(x[v])) - lse) * a - eps_v;
    }
    x[v] = narrow<T>(d * g);
  }
  if (has_t) x[tl] = narrow<T>(dt);
}

template <typename T, bool CAP>
LLMCORE_INLINE void one_row(const FlceRowsParams& p, int64_t r) {
  using A = acc_t<T>;
  T* x = static_cast<T*>(p.logits) + r * p.ld;
  const int64_t V = p.V, t = p.target[r];
  if (p.lse_given) return grad_loop<T, CAP>(p, r, x, t - p.v0, static_cast<const A*>(p.lse)[r]);
  const A cap = A(p.softcap), inv_cap = CAP ? A(1) / A(p.softcap) : A(0);
  A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) {
    const A z = load_z<T, CAP>(x, v, cap, inv_cap);
    m = z > m ? z : m;
  }
  A s = 0, sz = 0;
#pragma omp simd reduction(+ : s, sz)
  for (int64_t v = 0; v < V; ++v) {
    const A z = load_z<T, CAP>(x, v, cap, inv_cap);
    s += exp_for_sigmoid(z - m);
    sz += z;
  }
  const A lse = m + std::log(s);
  const A eps = A(p.label_smoothing), zc = A(p.z_loss), eps_v = eps / A(V);
  const A zt = load_z<T, CAP>(x, t, cap, inv_cap);
  // the smoothing term only when eps > 0: a -inf logit makes sz -inf, and 0 * -inf would be NaN
  const A smooth = eps > A(0) ? eps_v * sz : A(0);
  static_cast<A*>(p.loss)[r] = lse - (A(1) - eps) * zt - smooth + zc * lse * lse;
  if (p.lse) static_cast<A*>(p.lse)[r] = lse;
  if (p.write_grad) grad_loop<T, CAP>(p, r, x, t, lse);
}

template <typename T>
LLMCORE_INLINE void rows_range(const FlceRowsParams& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    if (p.softcap > 0) one_row<T, true>(p, r);
    else one_row<T, false>(p, r);
  }
}

}  // namespace

LLMCORE_CPU_MULTIVERSION
void fused_linear_cross_entropy_rows_cpu(const FlceRowsParams& p, int64_t begin, int64_t end) {
  LLMCORE_CPU_DISPATCH(p.dtype, rows_range, (p, begin, end))
}

}  // namespace llmcore
