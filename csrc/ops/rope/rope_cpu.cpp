// rope_cpu.cpp — CPU kernel for rope (math and layouts in rope.h).
//
// The ATen layer splits the B*S tokens into ranges (at::parallel_for); for each token the position
// is read once and its cos/sin rows (D/2 fp32 each, a few hundred bytes, L1-resident) are reused
// for every head of q and then of k. The per-head loop is a straight `omp simd` pass over the D/2
// pairs, vectorized inside each ISA clone (common/cpu_utils.h): half-split reads two contiguous
// half-rows, interleaved reads one row with stride-2 lanes.
// In place (y == x) is safe: iteration i reads and writes only its own pair.
// Numerics: fp32 math (fp64 for float64 inputs), cos/sin widened from fp32, one rounding.
#include "rope/rope.h"

#include "common/cpu_utils.h"

namespace llmcore {
namespace {

template <typename T>
LLMCORE_INLINE void rotate_half_split(const T* x, T* y, const float* c, const float* s, int64_t h, acc_t<T> sign) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const A x1 = widen(x[i]), x2 = widen(x[i + h]);
    const A ci = A(c[i]), si = sign * A(s[i]);
    y[i] = narrow<T>(x1 * ci - x2 * si);
    y[i + h] = narrow<T>(x2 * ci + x1 * si);
  }
}

template <typename T>
LLMCORE_INLINE void rotate_interleaved(const T* x, T* y, const float* c, const float* s, int64_t h, acc_t<T> sign) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const A x1 = widen(x[2 * i]), x2 = widen(x[2 * i + 1]);
    const A ci = A(c[i]), si = sign * A(s[i]);
    y[2 * i] = narrow<T>(x1 * ci - x2 * si);
    y[2 * i + 1] = narrow<T>(x2 * ci + x1 * si);
  }
}

template <typename T>
LLMCORE_INLINE void rope_tokens(const RopeParams& p, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const int64_t h = p.D / 2;
  const A sign = p.inverse ? A(-1) : A(1);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  T* qo = static_cast<T*>(p.q_out);
  T* ko = static_cast<T*>(p.k_out);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.S, s = t % p.S;
    int64_t pos = s;
    if (p.positions) {
      const int64_t off = b * p.pos_sb + s * p.pos_ss;
      pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[off]
                              : static_cast<const int32_t*>(p.positions)[off];
    }
    pos += p.position_offset;
    const float* c = p.cos + pos * h;
    const float* sn = p.sin + pos * h;
    for (int64_t hh = 0; hh < p.Hq; ++hh) {
      const T* x = q + b * p.q_sb + s * p.q_ss + hh * p.q_sh;
      T* y = qo + b * p.qo_sb + s * p.qo_ss + hh * p.qo_sh;
      if (p.interleaved) rotate_interleaved<T>(x, y, c, sn, h, sign);
      else rotate_half_split<T>(x, y, c, sn, h, sign);
    }
    for (int64_t hh = 0; hh < p.Hk; ++hh) {
      const T* x = k + b * p.k_sb + s * p.k_ss + hh * p.k_sh;
      T* y = ko + b * p.ko_sb + s * p.ko_ss + hh * p.ko_sh;
      if (p.interleaved) rotate_interleaved<T>(x, y, c, sn, h, sign);
      else rotate_half_split<T>(x, y, c, sn, h, sign);
    }
  }
}

}  // namespace

LLMCORE_CPU_MULTIVERSION
void rope_cpu(const RopeParams& p, int64_t tok_begin, int64_t tok_end) {
  LLMCORE_CPU_DISPATCH(p.dtype, rope_tokens, (p, tok_begin, tok_end))
}

}  // namespace llmcore
