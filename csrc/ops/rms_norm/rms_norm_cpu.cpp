// rms_norm_cpu.cpp — CPU kernels for rms_norm / add_rms_norm (math in rms_norm.h).
//
// One row at a time, fp32 accumulation (fp64 for float64 inputs). Each loop is a straight pass
// over contiguous memory with no cross-iteration dependency except the reduction, which the
// compiler vectorizes (`omp simd reduction`) inside each ISA clone (see common/cpu_utils.h).
// Backward: chunk c of the rows accumulates dweight into its own partial row; a second pass sums
// the partials, so no (rows, n) fp32 temporary is ever made.
#include "rms_norm/rms_norm.h"

#include "common/cpu_utils.h"

namespace llmcore {
namespace {

template <typename T, typename W>
LLMCORE_INLINE void fwd_rows(const RmsNormFwdParams& p, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  const int64_t n = p.n;
  const W* w = static_cast<const W*>(p.weight);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * p.x_row_stride;
    T* y = static_cast<T*>(p.y) + r * n;
    const T* src = x;
    if (p.residual) {
      const T* res = static_cast<const T*>(p.residual) + r * p.residual_row_stride;
      T* h = static_cast<T*>(p.h) + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = narrow<T>(widen(x[i]) + widen(res[i]));
      src = h;
    }
    A ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) {
      A v = widen(src[i]);
      ss += v * v;
    }
    const A rstd = A(1) / std::sqrt(ss / A(n) + A(p.eps));
    if (p.rstd) static_cast<A*>(static_cast<void*>(p.rstd))[r] = rstd;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = narrow<T>(widen(src[i]) * rstd * A(widen(w[i])));
  }
}

template <typename T, typename W>
LLMCORE_INLINE void bwd_chunk(const RmsNormBwdParams& p, int64_t chunk, int64_t num_chunks) {
  using A = acc_t<T>;
  const int64_t n = p.n;
  const int64_t per = (p.rows + num_chunks - 1) / num_chunks;
  const int64_t r0 = chunk * per, r1 = r0 + per < p.rows ? r0 + per : p.rows;
  const W* w = static_cast<const W*>(p.weight);
  const A* rstd_all = static_cast<const A*>(static_cast<const void*>(p.rstd));
  A* dw = static_cast<A*>(p.partials) + chunk * n;
  for (int64_t i = 0; i < n; ++i) dw[i] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * p.x_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + r * n;
    T* dx = static_cast<T*>(p.dx) + r * n;
    const A rstd = rstd_all[r];
    A dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < n; ++i) dot += A(widen(dy[i])) * A(widen(w[i])) * A(widen(x[i]));
    const A c = dot * rstd * rstd / A(n);  // mean(g * h_hat) / rstd
    if (p.dextra) {
      const T* de = static_cast<const T*>(p.dextra) + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const A xv = widen(x[i]), g = A(widen(dy[i])) * A(widen(w[i]));
        dx[i] = narrow<T>(rstd * (g - xv * c) + A(widen(de[i])));
        dw[i] += A(widen(dy[i])) * xv * rstd;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const A xv = widen(x[i]), g = A(widen(dy[i])) * A(widen(w[i]));
        dx[i] = narrow<T>(rstd * (g - xv * c));
        dw[i] += A(widen(dy[i])) * xv * rstd;
      }
    }
  }
}

template <typename T, typename W>
LLMCORE_INLINE void dweight_reduce(const RmsNormBwdParams& p, int64_t num_partials) {
  using A = acc_t<T>;
  const A* part = static_cast<const A*>(p.partials);
  W* dw = static_cast<W*>(p.dweight);
  for (int64_t i = 0; i < p.n; ++i) {
    A s = 0;
    for (int64_t c = 0; c < num_partials; ++c) s += part[c * p.n + i];
    dw[i] = narrow<W>(s);
  }
}

}  // namespace

LLMCORE_CPU_MULTIVERSION
void rms_norm_fwd_cpu(const RmsNormFwdParams& p, int64_t row_begin, int64_t row_end) {
  LLMCORE_CPU_DISPATCH_TW(p.dtype, p.weight_dtype, fwd_rows, (p, row_begin, row_end))
}

LLMCORE_CPU_MULTIVERSION
void rms_norm_bwd_cpu(const RmsNormBwdParams& p, int64_t chunk, int64_t num_chunks) {
  LLMCORE_CPU_DISPATCH_TW(p.dtype, p.weight_dtype, bwd_chunk, (p, chunk, num_chunks))
}

void rms_norm_dweight_reduce_cpu(const RmsNormBwdParams& p, int64_t num_partials) {
  LLMCORE_CPU_DISPATCH_TW(p.dtype, p.weight_dtype, dweight_reduce, (p, num_partials))
}

}  // namespace llmcore
