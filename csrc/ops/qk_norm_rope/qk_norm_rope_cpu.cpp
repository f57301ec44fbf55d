// qk_norm_rope_cpu.cpp — CPU kernels for qk_norm_rope (math in qk_norm_rope.h).
//
// The ATen layer splits the B*S tokens into ranges (at::parallel_for). Per token the position and
// its cos/sin rows (D/2 fp32 each, L1-resident) are read once and reused for every q and k head.
// Per head row: an `omp simd` reduction for sum(x^2), then one `omp simd` pass over the D/2 pairs
// that normalizes, scales and rotates in fp32 and rounds once — the row is read from memory once
// (the second read hits L1) and written once. The layout is a template parameter so each loop is a
// straight vectorizable pass in each ISA clone (common/cpu_utils.h): half-split reads two
// contiguous half-rows, interleaved one row with stride-2 lanes.
// In place (y == x) is safe: the reduction reads the row before any write, and pass 2 iteration i
// reads and writes only its own pair.
// Backward: two passes per row (the dot mean(g * xhat), then dx and the dweight partial row of the
// chunk, in the accumulation type); dn = R^T dy is recomputed in each pass rather than stored.
#include "qk_norm_rope/qk_norm_rope.h"

#include "common/cpu_utils.h"

namespace llmcore {
namespace {

template <bool IL>
LLMCORE_INLINE int64_t first(int64_t i, int64_t h) { return IL ? 2 * i : i; }
template <bool IL>
LLMCORE_INLINE int64_t second(int64_t i, int64_t h) { return IL ? 2 * i + 1 : i + h; }

template <typename T, typename W, bool IL>
LLMCORE_INLINE void fwd_row(const T* x, T* y, const W* w, const float* c, const float* s, int64_t D, acc_t<T> eps,
                            acc_t<T>* rstd_out) {
  using A = acc_t<T>;
  const int64_t h = D / 2;
  A ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < D; ++i) {
    const A v = widen(x[i]);
    ss += v * v;
  }
  const A rstd = A(1) / std::sqrt(ss / A(D) + eps);
  if (rstd_out) *rstd_out = rstd;
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const int64_t i1 = first<IL>(i, h), i2 = second<IL>(i, h);
    const A n1 = widen(x[i1]) * rstd * A(widen(w[i1])), n2 = widen(x[i2]) * rstd * A(widen(w[i2]));
    const A ci = A(c[i]), si = A(s[i]);
    y[i1] = narrow<T>(n1 * ci - n2 * si);
    y[i2] = narrow<T>(n2 * ci + n1 * si);
  }
}

template <typename T, typename W, bool IL>
LLMCORE_INLINE void bwd_row(const T* x, const T* dy, T* dx, const W* w, const float* c, const float* s, int64_t D,
                            acc_t<T> rstd, acc_t<T>* dw) {
  using A = acc_t<T>;
  const int64_t h = D / 2;
  A dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < h; ++i) {
    const int64_t i1 = first<IL>(i, h), i2 = second<IL>(i, h);
    const A d1 = widen(dy[i1]), d2 = widen(dy[i2]), ci = A(c[i]), si = A(s[i]);
    const A dn1 = d1 * ci + d2 * si, dn2 = d2 * ci - d1 * si;
    dot += dn1 * A(widen(w[i1])) * widen(x[i1]) + dn2 * A(widen(w[i2])) * widen(x[i2]);
  }
  const A cc = dot * rstd * rstd / A(D);  // mean(g * xhat) / rstd
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const int64_t i1 = first<IL>(i, h), i2 = second<IL>(i, h);
    const A d1 = widen(dy[i1]), d2 = widen(dy[i2]), ci = A(c[i]), si = A(s[i]);
    const A dn1 = d1 * ci + d2 * si, dn2 = d2 * ci - d1 * si;
    const A x1 = widen(x[i1]), x2 = widen(x[i2]);
    dx[i1] = narrow<T>(rstd * (dn1 * A(widen(w[i1])) - x1 * cc));
    dx[i2] = narrow<T>(rstd * (dn2 * A(widen(w[i2])) - x2 * cc));
    dw[i1] += dn1 * x1 * rstd;
    dw[i2] += dn2 * x2 * rstd;
  }
}

LLMCORE_INLINE int64_t token_position(const QkNormRopeParams& p, int64_t b, int64_t s) {
  int64_t pos = s;
  if (p.positions) {
    const int64_t off = b * p.pos_sb + s * p.pos_ss;
    pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[off]
                            : static_cast<const int32_t*>(p.positions)[off];
  }
  return pos + p.position_offset;
}

template <typename T, typename W, bool IL>
LLMCORE_INLINE void fwd_tokens(const QkNormRopeParams& p, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const int64_t h = p.D / 2;
  const A eps = A(p.eps);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  T* qo = static_cast<T*>(p.q_out);
  T* ko = static_cast<T*>(p.k_out);
  const W* qw = static_cast<const W*>(p.q_weight);
  const W* kw = static_cast<const W*>(p.k_weight);
  A* qr = static_cast<A*>(p.q_rstd);
  A* kr = static_cast<A*>(p.k_rstd);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.S, s = t % p.S;
    const int64_t pos = token_position(p, b, s);
    const float* c = p.cos + pos * h;
    const float* sn = p.sin + pos * h;
    for (int64_t hh = 0; hh < p.Hq; ++hh)
      fwd_row<T, W, IL>(q + b * p.q_sb + s * p.q_ss + hh * p.q_sh, qo + b * p.qo_sb + s * p.qo_ss + hh * p.qo_sh, qw,
                        c, sn, p.D, eps, qr ? qr + t * p.Hq + hh : nullptr);
    for (int64_t hh = 0; hh < p.Hk; ++hh)
      fwd_row<T, W, IL>(k + b * p.k_sb + s * p.k_ss + hh * p.k_sh, ko + b * p.ko_sb + s * p.ko_ss + hh * p.ko_sh, kw,
                        c, sn, p.D, eps, kr ? kr + t * p.Hk + hh : nullptr);
  }
}

template <typename T, typename W>
LLMCORE_INLINE void fwd_typed(const QkNormRopeParams& p, int64_t t0, int64_t t1) {
  if (p.interleaved) fwd_tokens<T, W, true>(p, t0, t1);
  else fwd_tokens<T, W, false>(p, t0, t1);
}

template <typename T, typename W, bool IL>
LLMCORE_INLINE void bwd_tokens(const QkNormRopeParams& p, int64_t chunk, int64_t num_chunks) {
  using A = acc_t<T>;
  const int64_t h = p.D / 2, D = p.D, tokens = p.B * p.S;
  const int64_t per = (tokens + num_chunks - 1) / num_chunks;
  const int64_t t0 = chunk * per, t1 = t0 + per < tokens ? t0 + per : tokens;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* dqo = static_cast<const T*>(p.dq_out);
  const T* dko = static_cast<const T*>(p.dk_out);
  T* dq = static_cast<T*>(p.q_out);
  T* dk = static_cast<T*>(p.k_out);
  const W* qw = static_cast<const W*>(p.q_weight);
  const W* kw = static_cast<const W*>(p.k_weight);
  const A* qr = static_cast<const A*>(p.q_rstd);
  const A* kr = static_cast<const A*>(p.k_rstd);
  A* dqw = static_cast<A*>(p.q_partials) + chunk * D;
  A* dkw = static_cast<A*>(p.k_partials) + chunk * D;
  for (int64_t i = 0; i < D; ++i) dqw[i] = dkw[i] = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / p.S, s = t % p.S;
    const int64_t pos = token_position(p, b, s);
    const float* c = p.cos + pos * h;
    const float* sn = p.sin + pos * h;
    for (int64_t hh = 0; hh < p.Hq; ++hh) {
      const int64_t r = t * p.Hq + hh;
      bwd_row<T, W, IL>(q + b * p.q_sb + s * p.q_ss + hh * p.q_sh, dqo + r * D,
                        dq + b * p.qo_sb + s * p.qo_ss + hh * p.qo_sh, qw, c, sn, D, qr[r], dqw);
    }
    for (int64_t hh = 0; hh < p.Hk; ++hh) {
      const int64_t r = t * p.Hk + hh;
      bwd_row<T, W, IL>(k + b * p.k_sb + s * p.k_ss + hh * p.k_sh, dko + r * D,
                        dk + b * p.ko_sb + s * p.ko_ss + hh * p.ko_sh, kw, c, sn, D, kr[r], dkw);
    }
  }
}

template <typename T, typename W>
LLMCORE_INLINE void bwd_typed(const QkNormRopeParams& p, int64_t chunk, int64_t num_chunks) {
  if (p.interleaved) bwd_tokens<T, W, true>(p, chunk, num_chunks);
  else bwd_tokens<T, W, false>(p, chunk, num_chunks);
}

template <typename T, typename W>
LLMCORE_INLINE void reduce_typed(const QkNormRopeParams& p, int64_t num_partials) {
  using A = acc_t<T>;
  for (int which = 0; which < 2; ++which) {
    const A* part = static_cast<const A*>(which ? p.k_partials : p.q_partials);
    W* dw = static_cast<W*>(which ? p.dk_weight : p.dq_weight);
    for (int64_t i = 0; i < p.D; ++i) {
      A s = 0;
      for (int64_t c = 0; c < num_partials; ++c) s += part[c * p.D + i];
      dw[i] = narrow<W>(s);
    }
  }
}

}  // namespace

LLMCORE_CPU_MULTIVERSION
void qk_norm_rope_fwd_cpu(const QkNormRopeParams& p, int64_t tok_begin, int64_t tok_end) {
  LLMCORE_CPU_DISPATCH_TW(p.dtype, p.weight_dtype, fwd_typed, (p, tok_begin, tok_end))
}

LLMCORE_CPU_MULTIVERSION
void qk_norm_rope_bwd_cpu(const QkNormRopeParams& p, int64_t chunk, int64_t num_chunks) {
  LLMCORE_CPU_DISPATCH_TW(p.dtype, p.weight_dtype, bwd_typed, (p, chunk, num_chunks))
}

void qk_norm_rope_dweight_reduce_cpu(const QkNormRopeParams& p, int64_t num_partials) {
  LLMCORE_CPU_DISPATCH_TW(p.dtype, p.weight_dtype, reduce_typed, (p, num_partials))
}

}  // namespace llmcore
