// flash_attn_cpu.cpp — CPU flash attention: forward, backward, varlen, KV-cache append
// (math and layout in flash_attn.h).
//
// Forward, one work item = (sequence b, q head h, block of BQ = 64 queries):
//   Q block -> fp32 buffer pre-scaled by scale * log2(e) (so softmax runs in base 2 with exp2);
//   for each block of BK = 64 keys up to the last key any row of the block may see (causal
//   blocks above the diagonal are skipped, not masked): K^T and V blocks -> fp32 buffers,
//   S = Q K^T, mask the diagonal block / the sequence tail, online softmax per row
//   (running max m, running sum l, O *= exp2(m_old - m_new)), O += P V.  out = O / l,
//   lse = (m + log2 l) * ln 2.  A row with no visible key: out = 0, lse = -inf.
// Backward, one work item = (sequence b, kv head, split of the key blocks): for each key block it
//   owns, for each q head of the GQA group and each query block that sees it: recompute
//   P = exp2(S - lse * log2 e), dV += P^T dO, dP = dO V^T, dS = scale * P (dP - rowsum(dO * O)),
//   dK += dS^T Q, and dQ_split += dS K into the item's own fp32 slice of dq_accum; a final pass
//   sums the slices in split order. No atomics, no locks, bitwise deterministic.
// Tiles are small fp32 GEMMs (`gemm` below): register-blocked 4 rows x up to 64 columns written
// with GCC vector extensions (one zmm per 16 floats under the AVX-512 clone), exp2 as a vectorized
// polynomial (rel. error ~1e-7). Buffers pad D to a multiple of 16 with zeros.
// Numerics: fp32 accumulation everywhere (fp64 for float64 inputs, the gradcheck path, which uses
// the plain scalar loops); outputs rounded once to the input dtype.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_utils.h"
#include "flash_attn/flash_attn.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector-extension helpers are always inlined: no ABI crosses

// ISA clones selected by ISA level (cpuid features). common/cpu_utils.h's LLMCORE_CPU_MULTIVERSION
// uses "arch=haswell" / "arch=skylake-avx512", whose GCC resolver tests the CPU *model* (Intel
// only): on AMD (this dev machine: EPYC with AVX-512) it silently runs the baseline SSE2 clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LLMCORE_NO_MULTIVERSION)
#define FLASH_CPU_MULTIVERSION __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FLASH_CPU_MULTIVERSION
#endif

namespace llmcore {
namespace {

constexpr int BQ = static_cast<int>(kFlashCpuBlockQ);
constexpr int BK = static_cast<int>(kFlashCpuBlockK);
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

LLMCORE_INLINE v16f vload(const float* p) {
  v16f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
LLMCORE_INLINE void vstore(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
// explicit broadcast: `v16f{} + x` is not an identity for x = -0, so it would cost a scalar add
LLMCORE_INLINE v16f vbcast(float x) { return v16f{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// 2^x: round-to-nearest range reduction, x = k + f, f in [-0.5, 0.5], Taylor degree 7 of 2^f
// (rel. error < 1e-8 before fp32 rounding); x < -126 (including -inf) gives 0; NaN stays NaN.
LLMCORE_INLINE v16f exp2v(v16f x) {
  v16f xc = x < vbcast(-127.f) ? vbcast(-127.f) : x;
  xc = xc > vbcast(127.f) ? vbcast(127.f) : xc;
  const v16f t = xc + 0.5f;
  v16i ki = __builtin_convertvector(t, v16i);
  ki += (t < __builtin_convertvector(ki, v16f));  // trunc -> floor (comparison is -1 where true)
  const v16f f = xc - __builtin_convertvector(ki, v16f);
  v16f p = vbcast(1.525273380405984e-05f);
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  const v16i bits = (ki + 127) << 23;
  v16f sc;
  std::memcpy(&sc, &bits, sizeof(sc));
  const v16f r = p * sc;
  return x < vbcast(-126.f) ? v16f{} : r;
}

// ---- tile GEMM: C[M][N] (=|+=) sum_k a(i, k) * B[k][N], a(i, k) = a[i * asi + k * ask] ----
template <int NV>
LLMCORE_INLINE void gemm_f32_cols(int M, int K, const float* a, int64_t asi, int64_t ask, const float* b, int64_t ldb,
                                  float* c, int64_t ldc, bool acc) {
  int i = 0;
  for (; i + 4 <= M; i += 4) {
    v16f r[4][NV];
#pragma GCC unroll 4
    for (int rr = 0; rr < 4; ++rr)
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x) r[rr][x] = acc ? vload(c + (i + rr) * ldc + 16 * x) : v16f{};
    const float* ap = a + i * asi;
    for (int kk = 0; kk < K; ++kk) {
      v16f bv[NV];
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x) bv[x] = vload(b + kk * ldb + 16 * x);
#pragma GCC unroll 4
      for (int rr = 0; rr < 4; ++rr) {
        const v16f av = vbcast(ap[rr * asi + kk * ask]);
#pragma GCC unroll 4
        for (int x = 0; x < NV; ++x) r[rr][x] += av * bv[x];
      }
    }
#pragma GCC unroll 4
    for (int rr = 0; rr < 4; ++rr)
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x) vstore(c + (i + rr) * ldc + 16 * x, r[rr][x]);
  }
  for (; i < M; ++i) {
    v16f r[NV];
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) r[x] = acc ? vload(c + i * ldc + 16 * x) : v16f{};
    for (int kk = 0; kk < K; ++kk) {
      const v16f av = vbcast(a[i * asi + kk * ask]);
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x) r[x] += av * vload(b + kk * ldb + 16 * x);
    }
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) vstore(c + i * ldc + 16 * x, r[x]);
  }
}

// N must be a multiple of 16 (buffers are padded).
LLMCORE_INLINE void gemm(int M, int N, int K, const float* a, int64_t asi, int64_t ask, const float* b, int64_t ldb,
                         float* c, int64_t ldc, bool acc) {
  for (int n0 = 0; n0 < N; n0 += 64) {
    switch (std::min(4, (N - n0) / 16)) {
      case 4: gemm_f32_cols<4>(M, K, a, asi, ask, b + n0, ldb, c + n0, ldc, acc); break;
      case 3: gemm_f32_cols<3>(M, K, a, asi, ask, b + n0, ldb, c + n0, ldc, acc); break;
      case 2: gemm_f32_cols<2>(M, K, a, asi, ask, b + n0, ldb, c + n0, ldc, acc); break;
      default: gemm_f32_cols<1>(M, K, a, asi, ask, b + n0, ldb, c + n0, ldc, acc); break;
    }
  }
}

LLMCORE_INLINE void gemm(int M, int N, int K, const double* a, int64_t asi, int64_t ask, const double* b, int64_t ldb,
                         double* c, int64_t ldc, bool acc) {
  for (int i = 0; i < M; ++i) {
    double* ci = c + i * ldc;
    if (!acc)
      for (int n = 0; n < N; ++n) ci[n] = 0;
    for (int kk = 0; kk < K; ++kk) {
      const double av = a[i * asi + kk * ask];
      const double* bk = b + kk * ldb;
      for (int n = 0; n < N; ++n) ci[n] += av * bk[n];
    }
  }
}

// s[0..BK) <- exp2(s - m) (s == -inf gives 0); returns the sum.
LLMCORE_INLINE float exp2_row(float* s, float m) {
  v16f sum{};
  const v16f mv = vbcast(m);
#pragma GCC unroll 4
  for (int x = 0; x < BK / 16; ++x) {
    const v16f e = exp2v(vload(s + 16 * x) - mv);
    vstore(s + 16 * x, e);
    sum += e;
  }
  float r = 0;
  for (int x = 0; x < 16; ++x) r += sum[x];
  return r;
}
LLMCORE_INLINE float max_row(const float* s) {
  v16f m = vload(s);
#pragma GCC unroll 4
  for (int x = 1; x < BK / 16; ++x) {
    const v16f v = vload(s + 16 * x);
    m = v > m ? v : m;
  }
  float r = m[0];
  for (int x = 1; x < 16; ++x) r = m[x] > r ? m[x] : r;
  return r;
}
LLMCORE_INLINE double max_row(const double* s) {
  double r = s[0];
  for (int j = 1; j < BK; ++j) r = s[j] > r ? s[j] : r;
  return r;
}
LLMCORE_INLINE double exp2_row(double* s, double m) {
  double r = 0;
  for (int j = 0; j < BK; ++j) {
    s[j] = std::exp2(s[j] - m);
    r += s[j];
  }
  return r;
}

// ---- sequence geometry ----
struct Seq {
  int64_t q_off, k_off, v_off;  // element offsets of row 0, head 0 of this sequence
  int64_t row0;                 // global row of query 0 (rows of out / dq / varlen lse)
  int64_t k_row0;               // global row of key 0 (rows of dk / dv)
  int64_t sq, sk;
};

LLMCORE_INLINE Seq seq_of(const FlashAttnParams& p, int64_t b) {
  Seq s;
  if (p.cu_seqlens_q) {
    const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    s.q_off = q0 * p.q_row_stride;
    s.k_off = k0 * p.k_row_stride;
    s.v_off = k0 * p.v_row_stride;
    s.row0 = q0;
    s.k_row0 = k0;
    s.sq = p.cu_seqlens_q[b + 1] - q0;
    s.sk = p.cu_seqlens_k[b + 1] - k0;
  } else {
    s.q_off = b * p.q_batch_stride;
    s.k_off = b * p.k_batch_stride;
    s.v_off = b * p.v_batch_stride;
    s.row0 = b * p.seqlen_q;
    s.k_row0 = b * p.seqlen_k;
    s.sq = p.seqlen_q;
    s.sk = p.seqused_k ? std::min<int64_t>(p.seqused_k[b], p.seqlen_k) : p.seqlen_k;
  }
  return s;
}

LLMCORE_INLINE int64_t lse_index(const FlashAttnParams& p, int64_t b, const Seq& s, int64_t h, int64_t i) {
  return p.cu_seqlens_q ? h * p.total_q + s.row0 + i : (b * p.heads_q + h) * p.seqlen_q + i;
}

LLMCORE_INLINE int64_t round16(int64_t d) { return (d + 15) / 16 * 16; }

// rows [0, n) of a (n, D) strided matrix -> dst[n][ldd] * mul (columns D..ldd zero); rows n..n_pad zero
template <typename T, typename A>
LLMCORE_INLINE void load_rows(A* dst, int64_t ldd, const T* src, int64_t row_stride, int n, int n_pad, int64_t D, A mul) {
  for (int r = 0; r < n_pad; ++r) {
    A* d = dst + r * ldd;
    if (r < n) {
      const T* s = src + r * row_stride;
      for (int64_t c = 0; c < D; ++c) d[c] = A(widen(s[c])) * mul;
      for (int64_t c = D; c < ldd; ++c) d[c] = 0;
    } else {
      for (int64_t c = 0; c < ldd; ++c) d[c] = 0;
    }
  }
}

// rows [0, n) of a (n, D) strided matrix -> transposed dst[ldt rows = D..Dp][BK] (columns >= n zero)
template <typename T, typename A>
LLMCORE_INLINE void load_cols(A* dst, int64_t Dp, const T* src, int64_t row_stride, int n, int64_t D) {
  for (int64_t c = 0; c < Dp; ++c)
    for (int r = n; r < BK; ++r) dst[c * BK + r] = 0;
  for (int64_t c = D; c < Dp; ++c)
    for (int r = 0; r < n; ++r) dst[c * BK + r] = 0;
  for (int r = 0; r < n; ++r) {
    const T* s = src + r * row_stride;
    for (int64_t c = 0; c < D; ++c) dst[c * BK + r] = A(widen(s[c]));
  }
}

// ---- forward ----
template <typename T>
LLMCORE_INLINE void fwd_range(const FlashAttnParams& p, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim, Dp = round16(D), Hq = p.heads_q, G = Hq / p.heads_kv;
  const int64_t nqb = (p.seqlen_q + BQ - 1) / BQ;
  std::vector<A> buf(BQ * Dp + Dp * BK + BK * Dp + BQ * BK + BQ * Dp + 2 * BQ);
  A* Qs = buf.data();
  A* Kt = Qs + BQ * Dp;
  A* Vs = Kt + Dp * BK;
  A* S = Vs + BK * Dp;
  A* O = S + BQ * BK;
  A* mrow = O + BQ * Dp;
  A* lrow = mrow + BQ;
  const A ninf = -std::numeric_limits<A>::infinity();
  const A qmul = A(p.scale) * A(kLog2e);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  A* lse = static_cast<A*>(p.lse);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t qb = item % nqb, h = (item / nqb) % Hq, b = item / nqb / Hq;
    const Seq s = seq_of(p, b);
    const int64_t i0 = qb * BQ;
    if (i0 >= s.sq) continue;
    const int m = static_cast<int>(std::min<int64_t>(BQ, s.sq - i0));
    const int64_t hk = h / G, off = s.sk - s.sq;
    int64_t kend = p.causal ? std::min<int64_t>(s.sk, i0 + m + off) : s.sk;
    kend = std::max<int64_t>(kend, 0);
    load_rows(Qs, Dp, q + s.q_off + i0 * p.q_row_stride + h * p.q_head_stride, p.q_row_stride, m, m, D, qmul);
    std::fill(O, O + m * Dp, A(0));
    std::fill(mrow, mrow + m, ninf);
    std::fill(lrow, lrow + m, A(0));
    for (int64_t j0 = 0; j0 < kend; j0 += BK) {
      const int n = static_cast<int>(std::min<int64_t>(BK, kend - j0));
      load_cols(Kt, Dp, k + s.k_off + j0 * p.k_row_stride + hk * p.k_head_stride, p.k_row_stride, n, D);
      load_rows(Vs, Dp, v + s.v_off + j0 * p.v_row_stride + hk * p.v_head_stride, p.v_row_stride, n, n, D, A(1));
      gemm(m, BK, static_cast<int>(D), Qs, Dp, 1, Kt, BK, S, BK, false);
      const bool diag = p.causal && j0 + BK - 1 > i0 + off;
      for (int i = 0; i < m; ++i) {
        A* si = S + i * BK;
        const int64_t lim = diag ? std::min<int64_t>(n, i0 + i + off - j0 + 1) : n;  // visible: jj < lim
        for (int jj = static_cast<int>(std::max<int64_t>(lim, 0)); jj < BK; ++jj) si[jj] = ninf;
        const A mx = max_row(si);
        const A mnew = std::max(mrow[i], mx);
        if (mnew == ninf) {  // nothing visible yet in this row: P = 0
          std::fill(si, si + BK, A(0));
          continue;
        }
        const A alpha = mrow[i] == ninf ? A(0) : A(std::exp2(mrow[i] - mnew));
        const A rs = exp2_row(si, mnew);
        lrow[i] = lrow[i] * alpha + rs;
        mrow[i] = mnew;
        if (alpha != A(1)) {
          A* oi = O + i * Dp;
          for (int64_t c = 0; c < Dp; ++c) oi[c] *= alpha;
        }
      }
      gemm(m, static_cast<int>(Dp), n, S, BK, 1, Vs, Dp, O, Dp, true);
    }
    for (int i = 0; i < m; ++i) {
      T* oi = out + ((s.row0 + i0 + i) * Hq + h) * D;
      const A* src = O + i * Dp;
      const int64_t li = lse_index(p, b, s, h, i0 + i);
      if (lrow[i] == A(0)) {
        for (int64_t c = 0; c < D; ++c) oi[c] = narrow<T>(A(0));
        lse[li] = ninf;
      } else {
        const A inv = A(1) / lrow[i];
        for (int64_t c = 0; c < D; ++c) oi[c] = narrow<T>(src[c] * inv);
        lse[li] = (mrow[i] + std::log2(lrow[i])) * A(kLn2);
      }
    }
  }
}

// ---- backward ----
LLMCORE_INLINE void split_range(int64_t nkb, int64_t ns, int64_t s, int64_t& kb0, int64_t& kb1) {
  kb0 = s * nkb / ns;
  kb1 = (s + 1) * nkb / ns;
}

template <typename T>
LLMCORE_INLINE void bwd_range(const FlashAttnParams& p, int64_t ns, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim, Dp = round16(D), Hq = p.heads_q, Hkv = p.heads_kv, G = Hq / Hkv;
  std::vector<A> buf(BK * Dp * 5 + BQ * Dp * 2 + BQ * BK * 2 + 2 * BQ);
  A* Kr = buf.data();      // [BK][Dp]
  A* Kt = Kr + BK * Dp;    // [Dp][BK]
  A* Vt = Kt + Dp * BK;    // [Dp][BK]
  A* dK = Vt + Dp * BK;    // [BK][Dp]
  A* dV = dK + BK * Dp;    // [BK][Dp]
  A* Qs = dV + BK * Dp;    // [BQ][Dp]
  A* dO = Qs + BQ * Dp;    // [BQ][Dp]
  A* P = dO + BQ * Dp;     // [BQ][BK]
  A* dS = P + BQ * BK;     // [BQ][BK]
  A* lse2 = dS + BQ * BK;  // [BQ]
  A* delta = lse2 + BQ;    // [BQ]
  const A ninf = -std::numeric_limits<A>::infinity(), pinf = std::numeric_limits<A>::infinity();
  const A c2 = A(p.scale) * A(kLog2e), scale = A(p.scale);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  const A* lse = static_cast<const A*>(p.lse);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  A* dq_accum = static_cast<A*>(p.dq_accum);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t split = item % ns, hk = (item / ns) % Hkv, b = item / ns / Hkv;
    const Seq s = seq_of(p, b);
    const int64_t off = s.sk - s.sq, nkb = (s.sk + BK - 1) / BK;
    int64_t kb0, kb1;
    split_range(nkb, ns, split, kb0, kb1);
    A* dqa = dq_accum + split * p.total_q * Hq * Dp;
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const int64_t j0 = kb * BK;
      const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
      const T* kp = k + s.k_off + j0 * p.k_row_stride + hk * p.k_head_stride;
      const T* vp = v + s.v_off + j0 * p.v_row_stride + hk * p.v_head_stride;
      load_rows(Kr, Dp, kp, p.k_row_stride, n, BK, D, A(1));
      load_cols(Kt, Dp, kp, p.k_row_stride, n, D);
      load_cols(Vt, Dp, vp, p.v_row_stride, n, D);
      std::fill(dK, dK + BK * Dp, A(0));
      std::fill(dV, dV + BK * Dp, A(0));
      const int64_t qstart = p.causal ? std::max<int64_t>(0, j0 - off) : 0;
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t i0 = qstart / BQ * BQ; i0 < s.sq; i0 += BQ) {
          const int m = static_cast<int>(std::min<int64_t>(BQ, s.sq - i0));
          load_rows(Qs, Dp, q + s.q_off + i0 * p.q_row_stride + h * p.q_head_stride, p.q_row_stride, m, m, D, A(1));
          load_rows(dO, Dp, dout + ((s.row0 + i0) * Hq + h) * D, Hq * D, m, m, D, A(1));
          for (int i = 0; i < m; ++i) {
            const T* oi = out + ((s.row0 + i0 + i) * Hq + h) * D;
            A acc = 0;
            for (int64_t c = 0; c < D; ++c) acc += A(widen(oi[c])) * dO[i * Dp + c];
            delta[i] = acc;
            const A l = lse[lse_index(p, b, s, h, i0 + i)];
            lse2[i] = l == ninf ? pinf : l * A(kLog2e);
          }
          gemm(m, BK, static_cast<int>(D), Qs, Dp, 1, Kt, BK, P, BK, false);
          const bool diag = p.causal && j0 + BK - 1 > i0 + off;
          for (int i = 0; i < m; ++i) {
            A* pi = P + i * BK;
            const int64_t lim = diag ? std::min<int64_t>(n, i0 + i + off - j0 + 1) : n;
            for (int jj = 0; jj < BK; ++jj) pi[jj] = pi[jj] * c2 - lse2[i];
            for (int jj = static_cast<int>(std::max<int64_t>(lim, 0)); jj < BK; ++jj) pi[jj] = ninf;
            exp2_row(pi, A(0));
          }
          gemm(BK, static_cast<int>(Dp), m, P, 1, BK, dO, Dp, dV, Dp, true);     // dV += P^T dO
          gemm(m, BK, static_cast<int>(D), dO, Dp, 1, Vt, BK, dS, BK, false);    // dP = dO V^T
          for (int i = 0; i < m; ++i) {
            A* di = dS + i * BK;
            const A* pi = P + i * BK;
            for (int jj = 0; jj < BK; ++jj) di[jj] = pi[jj] * (di[jj] - delta[i]) * scale;
          }
          gemm(BK, static_cast<int>(Dp), m, dS, 1, BK, Qs, Dp, dK, Dp, true);    // dK += dS^T Q
          gemm(m, static_cast<int>(Dp), n, dS, BK, 1, Kr, Dp, dqa + ((s.row0 + i0) * Hq + h) * Dp, Hq * Dp, true);
        }
      }
      for (int jj = 0; jj < n; ++jj) {
        T* dkr = dk + ((s.k_row0 + j0 + jj) * Hkv + hk) * D;
        T* dvr = dv + ((s.k_row0 + j0 + jj) * Hkv + hk) * D;
        for (int64_t c = 0; c < D; ++c) {
          dkr[c] = narrow<T>(dK[jj * Dp + c]);
          dvr[c] = narrow<T>(dV[jj * Dp + c]);
        }
      }
    }
  }
}

template <typename T>
LLMCORE_INLINE void reduce_dq(const FlashAttnParams& p, int64_t ns, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim, Dp = round16(D), stride = p.total_q * p.heads_q * Dp;
  const A* acc = static_cast<const A*>(p.dq_accum);
  T* dq = static_cast<T*>(p.dq);
  for (int64_t r = begin; r < end; ++r) {  // r indexes (row, head)
    for (int64_t c = 0; c < D; ++c) {
      A sum = 0;
      for (int64_t s = 0; s < ns; ++s) sum += acc[s * stride + r * Dp + c];
      dq[r * D + c] = narrow<T>(sum);
    }
  }
}

}  // namespace

int64_t flash_attn_fwd_cpu_num_items(const FlashAttnParams& p) {
  return p.batch * p.heads_q * ((p.seqlen_q + BQ - 1) / BQ);
}

FLASH_CPU_MULTIVERSION
void flash_attn_fwd_cpu(const FlashAttnParams& p, int64_t item_begin, int64_t item_end) {
  LLMCORE_CPU_DISPATCH(p.dtype, fwd_range, (p, item_begin, item_end))
}

int64_t flash_attn_bwd_cpu_num_splits(const FlashAttnParams& p) {
  // Enough items to feed a few cores even for B * Hkv == 1; a function of the shapes only.
  const int64_t nkb = (p.seqlen_k + BK - 1) / BK;
  const int64_t want = (8 + p.batch * p.heads_kv - 1) / (p.batch * p.heads_kv);
  return std::max<int64_t>(1, std::min<int64_t>(want, nkb));
}

FLASH_CPU_MULTIVERSION
void flash_attn_bwd_cpu(const FlashAttnParams& p, int64_t num_splits, int64_t item_begin, int64_t item_end) {
  LLMCORE_CPU_DISPATCH(p.dtype, bwd_range, (p, num_splits, item_begin, item_end))
}

FLASH_CPU_MULTIVERSION
void flash_attn_bwd_cpu_reduce_dq(const FlashAttnParams& p, int64_t num_splits, int64_t row_begin, int64_t row_end) {
  LLMCORE_CPU_DISPATCH(p.dtype, reduce_dq, (p, num_splits, row_begin, row_end))
}

void flash_attn_kv_append_cpu(const KvAppendParams& p) {
  const int64_t es = p.dtype == DType::Float64 ? 8 : p.dtype == DType::Float32 ? 4 : 2;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t pos = p.cache_seqlens[b];
    for (int64_t i = 0; i < p.s_new; ++i)
      for (int64_t h = 0; h < p.heads_kv; ++h) {
        std::memcpy(static_cast<char*>(p.k_cache) +
                        es * (b * p.kc_batch_stride + (pos + i) * p.kc_row_stride + h * p.kc_head_stride),
                    static_cast<const char*>(p.k_new) +
                        es * (b * p.kn_batch_stride + i * p.kn_row_stride + h * p.kn_head_stride),
                    es * p.head_dim);
        std::memcpy(static_cast<char*>(p.v_cache) +
                        es * (b * p.vc_batch_stride + (pos + i) * p.vc_row_stride + h * p.vc_head_stride),
                    static_cast<const char*>(p.v_new) +
                        es * (b * p.vn_batch_stride + i * p.vn_row_stride + h * p.vn_head_stride),
                    es * p.head_dim);
      }
  }
}

}  // namespace llmcore
