// flash_attn_cpu.cpp — CPU flash attention: forward, backward, varlen, KV-cache append
// (math and layout in flash_attn.h).
//
// Forward, one work item = (sequence b, q head h, block of BQ = 64 queries):
//   Q block -> fp32 buffer pre-scaled by scale * log2(e) (so softmax runs in base 2 with exp2);
//   for each block of BK = 64 keys up to the last key any row of the block may see (causal
//   blocks above the diagonal are skipped, not masked): K^T and V blocks -> fp32 buffers (or,
//   when several query blocks share a kv head, fp32 tiles converted once by flash_attn_pack_kv_cpu),
//   S = Q K^T, mask the diagonal block / the sequence tail, online softmax per row
//   (running max m, running sum l, O *= exp2(m_old - m_new)), O += P V.  out = O / l,
//   lse = (m + log2 l) * ln 2.  A row with no visible key: out = 0, lse = -inf. A NaN score (NaN in
//   q or k) makes the running max NaN, hence l, out and lse of that row NaN (never "masked").
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
// Which path runs: bf16 inputs whose engine (p.cpu_gemm, common/cpu_gemm.h, chosen per launch by
// the ATen layer and reported as llmcore.build_info()["cpu_gemm"]) is AMX or AVX512-BF16 go to
// flash_attn_bf16_cpu.cpp (same loops, bf16 tile GEMMs with P and dS rounded to bf16); every other
// CPU and dtype (fp32, fp16, fp64, bf16 without AVX512-BF16) runs the fp32 tiles here.
// Shared helpers (exp2, row max / sum, sequence geometry) live in flash_attn_cpu_tile.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_avx512bf16.h"
#include "common/cpu_utils.h"
#include "flash_attn/flash_attn.h"
#include "flash_attn/flash_attn_cpu_tile.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector-extension helpers are always inlined: no ABI crosses


namespace llmcore {
namespace {

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
        const float av = ap[rr * asi + kk * ask];
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
      const float av = a[i * asi + kk * ask];
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
  const A* tiles = static_cast<const A*>(p.kv_tiles);
  const int64_t nkb = (p.seqlen_k + BK - 1) / BK;
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
      const A* KtB = Kt;
      const A* VB = Vs;
      if (tiles) {
        KtB = tiles + ((b * p.heads_kv + hk) * nkb + j0 / BK) * 2 * Dp * BK;
        VB = KtB + Dp * BK;
      } else {
        load_cols(Kt, Dp, k + s.k_off + j0 * p.k_row_stride + hk * p.k_head_stride, p.k_row_stride, n, D);
        load_rows(Vs, Dp, v + s.v_off + j0 * p.v_row_stride + hk * p.v_head_stride, p.v_row_stride, n, n, D, A(1));
      }
      gemm(m, BK, static_cast<int>(D), Qs, Dp, 1, KtB, BK, S, BK, false);
      const bool diag = p.causal && j0 + BK - 1 > i0 + off;
      for (int i = 0; i < m; ++i) {
        A* si = S + i * BK;
        const int64_t lim = diag ? std::min<int64_t>(n, i0 + i + off - j0 + 1) : n;  // visible: jj < lim
        for (int jj = static_cast<int>(std::max<int64_t>(lim, 0)); jj < BK; ++jj) si[jj] = ninf;
        const A mx = max_row(si);
        A mnew = std::max(mrow[i], mx);
        if (mnew == ninf) {
          if (!has_nan_row(si)) {  // nothing visible yet in this row: P = 0
            std::fill(si, si + BK, A(0));
            continue;
          }
          // every visible score NaN (NaN in q or k; the maxes above drop NaN): the row is NaN, not
          // masked. (Some NaN among finite scores needs nothing: exp2(NaN - m) puts it into l.)
          mnew = std::numeric_limits<A>::quiet_NaN();
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
      gemm(m, static_cast<int>(Dp), n, S, BK, 1, VB, Dp, O, Dp, true);
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

template <typename T>
LLMCORE_INLINE void pack_kv(const FlashAttnParams& p, void* tiles_v, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim, Dp = round16(D), nkb = (p.seqlen_k + BK - 1) / BK;
  A* tiles = static_cast<A*>(tiles_v);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t kb = t % nkb, hk = (t / nkb) % p.heads_kv, b = t / nkb / p.heads_kv;
    const Seq s = seq_of(p, b);
    const int64_t j0 = kb * BK;
    if (j0 >= s.sk) continue;
    const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
    A* kt = tiles + t * 2 * Dp * BK;
    load_cols(kt, Dp, static_cast<const T*>(p.k) + s.k_off + j0 * p.k_row_stride + hk * p.k_head_stride,
              p.k_row_stride, n, D);
    load_rows(kt + Dp * BK, Dp, static_cast<const T*>(p.v) + s.v_off + j0 * p.v_row_stride + hk * p.v_head_stride,
              p.v_row_stride, n, BK, D, A(1));
  }
}

// ---- backward ----

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

LLMCORE_CPU_MULTIVERSION
void flash_attn_fwd_cpu(const FlashAttnParams& p, int64_t item_begin, int64_t item_end) {
  if (p.dtype == DType::BFloat16 && p.cpu_gemm != CpuGemm::kFma)  // flash_attn_bf16_cpu.cpp
    return flash_attn_fwd_cpu_bf16dot(p, item_begin, item_end);
  LLMCORE_CPU_DISPATCH(p.dtype, fwd_range, (p, item_begin, item_end))
}

int64_t flash_attn_cpu_num_kv_tiles(const FlashAttnParams& p) {
  return p.batch * p.heads_kv * ((p.seqlen_k + BK - 1) / BK);
}

int64_t flash_attn_cpu_kv_tiles_elems(const FlashAttnParams& p) {
  const int64_t nkb = (p.seqlen_k + BK - 1) / BK;
  const int64_t blocks = p.cpu_gemm == CpuGemm::kAmx ? (nkb + kFlashCpuAmxGroup - 1) / kFlashCpuAmxGroup * kFlashCpuAmxGroup
                                                     : nkb;  // AMX: whole groups per (b, kv head)
  return p.batch * p.heads_kv * blocks * 2 * round16(p.head_dim) * BK;
}

LLMCORE_CPU_MULTIVERSION
void flash_attn_pack_kv_cpu(const FlashAttnParams& p, void* tiles, int64_t tile_begin, int64_t tile_end) {
  if (p.dtype == DType::BFloat16 && p.cpu_gemm != CpuGemm::kFma)  // flash_attn_bf16_cpu.cpp
    return flash_attn_pack_kv_cpu_bf16dot(p, tiles, tile_begin, tile_end);
  LLMCORE_CPU_DISPATCH(p.dtype, pack_kv, (p, tiles, tile_begin, tile_end))
}

int64_t flash_attn_bwd_cpu_num_splits(const FlashAttnParams& p) {
  // Enough items to feed a few cores even for B * Hkv == 1; a function of the shapes only.
  const int64_t nkb = (p.seqlen_k + BK - 1) / BK;
  const int64_t want = (8 + p.batch * p.heads_kv - 1) / (p.batch * p.heads_kv);
  return std::max<int64_t>(1, std::min<int64_t>(want, nkb));
}

LLMCORE_CPU_MULTIVERSION
void flash_attn_bwd_cpu(const FlashAttnParams& p, int64_t num_splits, int64_t item_begin, int64_t item_end) {
  if (p.dtype == DType::BFloat16 && p.cpu_gemm != CpuGemm::kFma)  // flash_attn_bf16_cpu.cpp
    return flash_attn_bwd_cpu_bf16dot(p, num_splits, item_begin, item_end);
  LLMCORE_CPU_DISPATCH(p.dtype, bwd_range, (p, num_splits, item_begin, item_end))
}

LLMCORE_CPU_MULTIVERSION
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
