// moe_cpu.cpp — CPU kernels for moe_route / moe_dispatch / moe_combine (math and layouts in moe.h).
//
// route: one token at a time; the scores of the row go to a small buffer (fp32, fp64 for float64
//   logits), the top-k is k passes of "largest key, lowest id wins ties" (the same rule as the
//   CUDA warp argmax and the reference's stable descending sort).
// sort: the exact algorithm of the CUDA path (moe_cuda.cu), with chunks as the unit of
//   parallelism: per-chunk histogram -> one serial exclusive scan of the expert-major table ->
//   per-chunk in-order scatter of positions. Integer-only: deterministic and stable.
// rows: dispatch copies each token row to its k permuted rows (memcpy, the dtype does not matter);
//   combine gathers a token's k rows into an fp32 row accumulator (vectorized by `omp simd` inside
//   each ISA clone) and rounds once; combine bwd writes each permuted row once and takes each
//   weight's gradient as an fp32 dot product. No reduction crosses tokens, so any split of the
//   tokens among threads gives bit-identical results.
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_utils.h"
#include "moe/moe.h"

namespace llmcore {
namespace {

template <typename A>
LLMCORE_INLINE A select_key(A v) {  // NaN ranks with -inf; ties then go to the lower id
  return std::isnan(v) ? -std::numeric_limits<A>::infinity() : v;
}

// Scores of one row into s[0..E): softmax (stable: max subtracted) or sigmoid.
template <typename T, typename A>
LLMCORE_INLINE void row_scores(const T* l, int64_t E, MoeScore score, A* s) {
  if (score == MoeScore::Softmax) {
    A m = -std::numeric_limits<A>::infinity();
    for (int64_t e = 0; e < E; ++e) m = std::fmax(m, A(widen(l[e])));
    A z = 0;
    for (int64_t e = 0; e < E; ++e) {
      s[e] = std::exp(A(widen(l[e])) - m);
      z += s[e];
    }
    const A inv = A(1) / z;
    for (int64_t e = 0; e < E; ++e) s[e] *= inv;
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = A(1) / (A(1) + std::exp(-A(widen(l[e]))));
  }
}

template <typename T>
LLMCORE_INLINE void route_fwd(const MoeRouteParams& p, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const int64_t E = p.experts, k = p.k;
  std::vector<A> s(E), key(E);
  std::vector<char> taken(E);
  const A* bias = static_cast<const A*>(static_cast<const void*>(p.bias));
  for (int64_t t = t0; t < t1; ++t) {
    const T* l = static_cast<const T*>(p.logits) + t * p.logits_row_stride;
    A* w = static_cast<A*>(p.weights) + t * k;
    int32_t* ids = p.ids + t * k;
    row_scores(l, E, p.score, s.data());
    for (int64_t e = 0; e < E; ++e) {
      key[e] = select_key(bias ? s[e] + bias[e] : s[e]);
      taken[e] = 0;
    }
    A sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || key[e] > key[best])) best = e;
      taken[best] = 1;
      ids[j] = static_cast<int32_t>(best);
      w[j] = s[best];
      sum += s[best];
    }
    if (p.renormalize) {
      const A denom = sum + A(1e-20);
      for (int64_t j = 0; j < k; ++j) w[j] = w[j] / denom;
    }
  }
}

template <typename T>
LLMCORE_INLINE void route_bwd(const MoeRouteBwdParams& p, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const int64_t E = p.experts, k = p.k;
  std::vector<A> s(E), g(E);
  for (int64_t t = t0; t < t1; ++t) {
    const T* l = static_cast<const T*>(p.logits) + t * p.logits_row_stride;
    const A* dw = static_cast<const A*>(p.dweights) + t * k;
    const int32_t* ids = p.ids + t * k;
    T* dl = static_cast<T*>(p.dlogits) + t * E;
    row_scores(l, E, p.score, s.data());
    // Ids outside [0, E) were rejected by the ATen layer; skipped here all the same (no access).
    auto valid = [E](int32_t e) { return e >= 0 && e < E; };
    A sum = 0, dot = 0;
    for (int64_t j = 0; j < k; ++j)
      if (valid(ids[j])) sum += s[ids[j]];
    const A denom = sum + A(1e-20);
    for (int64_t j = 0; j < k; ++j)
      if (valid(ids[j])) dot += s[ids[j]] / denom * dw[j];
    for (int64_t e = 0; e < E; ++e) g[e] = 0;
    for (int64_t j = 0; j < k; ++j)
      if (valid(ids[j])) g[ids[j]] = p.renormalize ? (dw[j] - dot) / denom : dw[j];
    if (p.score == MoeScore::Softmax) {
      A c = 0;
      for (int64_t j = 0; j < k; ++j)
        if (valid(ids[j])) c += s[ids[j]] * g[ids[j]];
      for (int64_t e = 0; e < E; ++e) dl[e] = narrow<T>(s[e] * (g[e] - c));
    } else {
      for (int64_t e = 0; e < E; ++e) dl[e] = narrow<T>(g[e] * s[e] * (A(1) - s[e]));
    }
  }
}

template <typename T>
LLMCORE_INLINE void combine_rows(const MoeRowsParams& p, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const int64_t H = p.hidden, k = p.k;
  std::vector<A> acc(H);
  A* a = acc.data();
  const A* wts = static_cast<const A*>(p.weights);
  // The first two routed rows are read in one pass (two input streams, as torch.compile's fused
  // gather-sum does), later ones add in one pass each, and the last pass writes the rounded output:
  // the same additions in the same order as zero-fill + k adds + copy, with k + 2 passes fewer.
  std::vector<const T*> rows(k);
  std::vector<A> ws(k);
  const int64_t rows_total = p.tokens * k;
  for (int64_t t = t0; t < t1; ++t) {
    T* dst = static_cast<T*>(p.dst) + t * H;
    int64_t n = 0;
    for (int64_t s = 0; s < k; ++s) {
      const int64_t r = p.row_map[t * k + s];
      if (r < 0 || r >= rows_total) continue;  // dropped (-1); others were rejected by the ATen layer
      rows[n] = static_cast<const T*>(p.src) + r * p.src_row_stride;
      ws[n++] = wts ? wts[t * k + s] : A(1);
    }
    if (n == 0) {
      for (int64_t h = 0; h < H; ++h) dst[h] = narrow<T>(A(0));
      continue;
    }
    const T* x0 = rows[0];
    const A w0 = ws[0];
    int64_t i = 1;
    if (n == 1) {
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) dst[h] = narrow<T>(w0 * A(widen(x0[h])));
      continue;
    }
    const T* x1 = rows[1];
    const A w1 = ws[1];
    i = 2;
    if (n == 2) {
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) dst[h] = narrow<T>(w0 * A(widen(x0[h])) + w1 * A(widen(x1[h])));
      continue;
    }
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) a[h] = w0 * A(widen(x0[h])) + w1 * A(widen(x1[h]));
    for (; i < n; ++i) {
      const T* x = rows[i];
      const A w = ws[i];
      if (i + 1 == n) {
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) dst[h] = narrow<T>(a[h] + w * A(widen(x[h])));
      } else {
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) a[h] += w * A(widen(x[h]));
      }
    }
  }
}

template <typename T>
LLMCORE_INLINE void combine_bwd(const MoeCombineBwdParams& p, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const int64_t H = p.hidden, k = p.k;
  const A* wts = static_cast<const A*>(p.weights);
  A* dwts = static_cast<A*>(p.dweights);
  for (int64_t t = t0; t < t1; ++t) {
    const T* dy = static_cast<const T*>(p.dy) + t * H;
    for (int64_t s = 0; s < k; ++s) {
      const int64_t r = p.row_map[t * k + s];
      if (r < 0 || r >= p.tokens * k) {
        dwts[t * k + s] = 0;
        continue;
      }
      const T* yp = static_cast<const T*>(p.y_permuted) + r * H;
      T* dyp = static_cast<T*>(p.dy_permuted) + r * H;
      const A w = wts[t * k + s];
      A dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t h = 0; h < H; ++h) {
        const A d = widen(dy[h]);
        dyp[h] = narrow<T>(w * d);
        dot += d * A(widen(yp[h]));
      }
      dwts[t * k + s] = dot;
    }
  }
}

}  // namespace

LLMCORE_CPU_MULTIVERSION
void moe_route_fwd_cpu(const MoeRouteParams& p, int64_t t_begin, int64_t t_end) {
  LLMCORE_CPU_DISPATCH(p.dtype, route_fwd, (p, t_begin, t_end))
}

LLMCORE_CPU_MULTIVERSION
void moe_route_bwd_cpu(const MoeRouteBwdParams& p, int64_t t_begin, int64_t t_end) {
  LLMCORE_CPU_DISPATCH(p.dtype, route_bwd, (p, t_begin, t_end))
}

bool moe_sort_histogram_cpu(const MoeSortParams& p, int64_t c0, int64_t c1) {
  const int64_t E = p.experts, C = p.num_chunks;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t i0 = c * p.chunk, i1 = i0 + p.chunk < p.pairs ? i0 + p.chunk : p.pairs;
    for (int64_t i = i0; i < i1; ++i) {
      const int32_t e = p.ids[i];
      if (e < 0 || e >= E) return false;
      ++p.counts[e * C + c];
    }
  }
  return true;
}

void moe_sort_scan_cpu(const MoeSortParams& p) {
  const int64_t E = p.experts, C = p.num_chunks;
  int32_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    p.offsets[e] = running;
    for (int64_t c = 0; c < C; ++c) {
      const int32_t v = p.counts[e * C + c];
      p.counts[e * C + c] = running;
      running += v;
    }
    p.tokens_per_expert[e] = running - p.offsets[e];
  }
  p.offsets[E] = running;
}

void moe_sort_scatter_cpu(const MoeSortParams& p, int64_t c0, int64_t c1) {
  const int64_t E = p.experts, C = p.num_chunks;
  std::vector<int32_t> next(E);
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t e = 0; e < E; ++e) next[e] = p.counts[e * C + c];
    const int64_t i0 = c * p.chunk, i1 = i0 + p.chunk < p.pairs ? i0 + p.chunk : p.pairs;
    for (int64_t i = i0; i < i1; ++i) p.row_map[i] = next[p.ids[i]]++;
  }
}

void moe_dispatch_rows_cpu(const MoeRowsParams& p, int64_t t_begin, int64_t t_end) {
  const size_t es = p.dtype == DType::Float64 ? 8 : p.dtype == DType::Float32 ? 4 : 2;
  const size_t row_bytes = static_cast<size_t>(p.hidden) * es;
  const char* src = static_cast<const char*>(p.src);
  char* dst = static_cast<char*>(p.dst);
  for (int64_t t = t_begin; t < t_end; ++t)
    for (int64_t s = 0; s < p.k; ++s) {
      const int64_t r = p.row_map[t * p.k + s];
      if (r >= 0 && r < p.tokens * p.k) std::memcpy(dst + r * row_bytes, src + t * p.src_row_stride * es, row_bytes);
    }
}

LLMCORE_CPU_MULTIVERSION
void moe_combine_rows_cpu(const MoeRowsParams& p, int64_t t_begin, int64_t t_end) {
  LLMCORE_CPU_DISPATCH(p.dtype, combine_rows, (p, t_begin, t_end))
}

LLMCORE_CPU_MULTIVERSION
void moe_combine_bwd_cpu(const MoeCombineBwdParams& p, int64_t t_begin, int64_t t_end) {
  LLMCORE_CPU_DISPATCH(p.dtype, combine_bwd, (p, t_begin, t_end))
}

}  // namespace llmcore
