// flash_attn_bf16_cpu.cpp — CPU flash attention for bfloat16 inputs on CPUs with AVX512-BF16
// (math and layout in flash_attn.h; the fp32 tile path and the loop structure it mirrors in
// flash_attn_cpu.cpp). The entry points there call these functions for bf16 inputs when
// cpu_has_avx512bf16() (common/cpu_avx512bf16.h: checked once at run time, LLMCORE_CPU_BF16_PATH=0
// turns it off) is true; every other CPU and dtype keeps the fp32 tile path.
//
// Tile GEMMs with vdpbf16ps (_mm512_dpbf16_ps: per fp32 lane c += a0 * b0 + a1 * b1, bf16 products
// exact in fp32, fp32 accumulation), 2x the fp32 FMA rate. C[M][N] (+)= A[M][K] B[K][N] with K taken
// in pairs: A element (i, pair kk) is a 32-bit pair of bf16 read at a32[i * asi + kk * ask] and
// broadcast, B is packed "VNNI" [K/2][N][2] (pairs along k interleaved per column); K is padded to
// even with zeros on both sides. Register block: 4 rows x up to 4 zmm (64 fp32 columns).
// Packed layouts (Dp = D rounded up to 16, n = keys in the block, padding always zero):
//   row-major   X[rows][Dp] bf16             (A operand of S = Q K^T and dP = dO V^T)
//   "cols"      Xt[Dp/2][64][2]: pairs of D per key (B operand of S = Q K^T and dP = dO V^T)
//   "vnni"      Xv[rows/2][Dp][2]: pairs of rows   (B operand of O += P V, dV += P^T dO,
//                                                   dK += dS^T Q, dQ += dS K)
//   A = P^T / dS^T is the vnni packing of P / dS [BQ/2][64][2] read with asi = 1, ask = 64: no
//   transposes anywhere except the 32-bit one that builds K^T / V^T ("cols") per key block.
// Forward, item = (b, q head, block of 64 queries), as the fp32 path: S = Q K^T (Q as stored, not
//   pre-scaled), S *= scale * log2 e in fp32, mask, online softmax in fp32 (row sum l from the fp32
//   P), P rounded to bf16 for O += P V, O in fp32. The shared K/V pre-pack (flash_attn_pack_kv_cpu)
//   holds per key block Kt "cols" [Dp/2][64][2] then V "vnni" [32][Dp][2], bf16 (half of the fp32
//   tile bytes the ATen layer allocates).
// Backward, item = (b, kv head, split of the key blocks) as the fp32 path, but the split's key blocks
//   go in chunks of kChunk: for each chunk, pack K ("cols" and "vnni") and V ("cols") once, then for
//   each q head of the group and each query block that sees the chunk, convert Q / dO once (row-major
//   and vnni) and run every key block of the chunk: P = exp2(S * scale log2 e - lse log2 e),
//   dV += P^T dO, dP = dO V^T, dS = scale P (dP - delta), dK += dS^T Q, dQ_split += dS K; P and dS
//   are computed in fp32 and rounded to bf16 as GEMM operands. Per key block the (head, q block)
//   accumulation order is the fp32 path's; per dQ row the key blocks go in ascending order;
//   the split count depends on shapes only: bitwise deterministic and thread-count independent.
// Numerics: bf16 operands (inputs exactly; P and dS rounded to nearest even by vcvtne2ps2bf16, which
// also flushes fp32 denormals, |x| < 2^-126, to zero), fp32 accumulation and fp32 softmax (exp2 as the
// fp32 path's polynomial), as FlashAttention-2 on GPUs; out / dK / dV rounded once to bf16 exactly as
// narrow<bf16_t>, dQ by the shared reduce pass. Measured against the fp32 reference: within the
// tests' bf16 rule (2x PyTorch's own bf16 error); the fp32 tile path stays the slower reference-
// closer option (LLMCORE_CPU_BF16_PATH=0).
// Per-thread scratch: backward kChunk * 64 * Dp * (3 bf16 + 2 fp32) (~450 KB at D = 64, 1.8 MB at 256).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/cpu_utils.h"
#include "flash_attn/flash_attn.h"
#include "flash_attn/flash_attn_cpu_tile.h"

#include "common/cpu_avx512bf16.h"

#ifdef LLMCORE_HAVE_AVX512BF16_PATH
// GCC 12's AVX-512 headers pass _mm512_undefined_*() (a self-initialized `__m512 __Y = __Y;`) as the
// unused pass-through operand of max / extract / insert builtins, which -Wall reports as maybe
// uninitialized once inlined; the value is never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace llmcore {

#ifdef LLMCORE_HAVE_AVX512BF16_PATH

namespace {

#define FA_TARGET LLMCORE_AVX512BF16
#define FA_INLINE LLMCORE_AVX512BF16_INLINE

constexpr int kChunk = 8;  // backward: key blocks whose packed K / V and dK / dV stay resident

LLMCORE_INLINE uint32_t ld32(const uint16_t* p) {
  uint32_t r;
  std::memcpy(&r, p, 4);
  return r;
}

// ---- C[M][N] (=|+=) sum_kk A(i, kk) . B[kk][N][2]; N a multiple of 16 ----
template <int NV>
FA_INLINE void dp_cols(int M, int K2, const uint16_t* a, int64_t asi, int64_t ask, const uint16_t* b, int64_t ldb,
                       float* c, int64_t ldc, bool acc) {
  // a, asi, ask in 32-bit pair units: pair (i, kk) at a + 2 * (i * asi + kk * ask); ldb in bf16 elements
  int i = 0;
  for (; i + 4 <= M; i += 4) {
    __m512 r[4][NV];
#pragma GCC unroll 4
    for (int rr = 0; rr < 4; ++rr)
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x) r[rr][x] = acc ? _mm512_loadu_ps(c + (i + rr) * ldc + 16 * x) : _mm512_setzero_ps();
    const uint16_t* ap = a + 2 * i * asi;
    for (int kk = 0; kk < K2; ++kk) {
      __m512bh bv[NV];
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x) bv[x] = (__m512bh)_mm512_loadu_si512(b + kk * ldb + 32 * x);
#pragma GCC unroll 4
      for (int rr = 0; rr < 4; ++rr) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ld32(ap + 2 * (rr * asi + kk * ask))));
#pragma GCC unroll 4
        for (int x = 0; x < NV; ++x) r[rr][x] = _mm512_dpbf16_ps(r[rr][x], av, bv[x]);
      }
    }
#pragma GCC unroll 4
    for (int rr = 0; rr < 4; ++rr)
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x) _mm512_storeu_ps(c + (i + rr) * ldc + 16 * x, r[rr][x]);
  }
  for (; i < M; ++i) {
    __m512 r[NV];
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) r[x] = acc ? _mm512_loadu_ps(c + i * ldc + 16 * x) : _mm512_setzero_ps();
    for (int kk = 0; kk < K2; ++kk) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ld32(a + 2 * (i * asi + kk * ask))));
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x)
        r[x] = _mm512_dpbf16_ps(r[x], av, (__m512bh)_mm512_loadu_si512(b + kk * ldb + 32 * x));
    }
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) _mm512_storeu_ps(c + i * ldc + 16 * x, r[x]);
  }
}

FA_INLINE void dp_gemm(int M, int N, int K2, const uint16_t* a, int64_t asi, int64_t ask, const uint16_t* b,
                       int64_t ldb, float* c, int64_t ldc, bool acc) {
  for (int n0 = 0; n0 < N; n0 += 64) {
    switch (std::min(4, (N - n0) / 16)) {
      case 4: dp_cols<4>(M, K2, a, asi, ask, b + 2 * n0, ldb, c + n0, ldc, acc); break;
      case 3: dp_cols<3>(M, K2, a, asi, ask, b + 2 * n0, ldb, c + n0, ldc, acc); break;
      case 2: dp_cols<2>(M, K2, a, asi, ask, b + 2 * n0, ldb, c + n0, ldc, acc); break;
      default: dp_cols<1>(M, K2, a, asi, ask, b + 2 * n0, ldb, c + n0, ldc, acc); break;
    }
  }
}

// ---- packing ----
FA_INLINE __mmask16 mask16(int64_t c, int64_t D) {
  return c + 16 <= D ? __mmask16(0xFFFF) : c >= D ? __mmask16(0) : __mmask16((1u << (D - c)) - 1u);
}

// dst[Dp] <- src[0..D) then zeros; src == nullptr: all zeros
FA_INLINE void copy_row(uint16_t* dst, const uint16_t* src, int64_t D, int64_t Dp) {
  for (int64_t c = 0; c < Dp; c += 16) {
    const __m256i v = src ? _mm256_maskz_loadu_epi16(mask16(c, D), src + c) : _mm256_setzero_si256();
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), v);
  }
}

// dst[Dp][2] <- (r0[c], r1[c]) interleaved (zeros past D; a nullptr row is zeros)
FA_INLINE void interleave_rows(uint16_t* dst, const uint16_t* r0, const uint16_t* r1, int64_t D, int64_t Dp) {
  // out[2t] = r0[t] (index t of the first operand), out[2t + 1] = r1[t] (index 32 + t)
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                       5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  for (int64_t c = 0; c < Dp; c += 16) {
    const __mmask32 mk = mask16(c, D);  // the low 16 lanes only
    const __m512i lo = r0 ? _mm512_maskz_loadu_epi16(mk, r0 + c) : _mm512_setzero_si512();
    const __m512i hi = r1 ? _mm512_maskz_loadu_epi16(mk, r1 + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + 2 * c, _mm512_permutex2var_epi16(lo, idx, hi));
  }
}

// rows [0, n) of a strided (n, D) bf16 matrix -> vnni dst[n_pad / 2][Dp][2] (n_pad even, >= n)
FA_INLINE void pack_vnni(uint16_t* dst, const uint16_t* src, int64_t row_stride, int n, int n_pad, int64_t D,
                         int64_t Dp) {
  for (int r = 0; r < n_pad; r += 2)
    interleave_rows(dst + r * Dp, r < n ? src + r * row_stride : nullptr,
                    r + 1 < n ? src + (r + 1) * row_stride : nullptr, D, Dp);
}

// rows [0, n) of a strided (n, D) bf16 matrix -> "cols" dst[Dp/2][ld][2], keys [0, BK) of each row
// of pairs (keys >= n zero); ld = BK, or kFlashCpuAmxGroup * BK for the AMX forward's key-block groups
FA_INLINE void pack_cols(uint16_t* dst, const uint16_t* src, int64_t row_stride, int n, int64_t D, int64_t Dp,
                         int64_t ld = BK) {
  alignas(64) uint16_t row[kFlashCpuMaxHeadDim + 16];
  uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
  for (int j = 0; j < BK; ++j) {
    if (j < n) {
      copy_row(row, src + j * row_stride, D, Dp);
      for (int64_t kk = 0; kk < Dp / 2; ++kk) d32[kk * ld + j] = ld32(row + 2 * kk);
    } else {
      for (int64_t kk = 0; kk < Dp / 2; ++kk) d32[kk * ld + j] = 0;
    }
  }
}

// 32-bit transpose: dst[c][r] = src[r][c] for r < R (R <= 32, multiple of 16 or padded by the
// caller's buffer), c < C; the AMX backward turns the vnni pairs of Q / dO ([BQ/2][Dp] 32-bit) into
// row-major Q^T / dO^T ([Dp][BQ] bf16 = [Dp][BQ/2] 32-bit), the A operands of dK^T / dV^T.
FA_INLINE void transpose32(uint32_t* dst, const uint32_t* src, int R, int64_t C, int64_t ld_src, int64_t ld_dst) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(static_cast<int>(ld_src)));
  for (int r0 = 0; r0 < R; r0 += 16) {
    const uint32_t* s = src + r0 * ld_src;
    for (int64_t c = 0; c < C; ++c)
      _mm512_storeu_si512(dst + c * ld_dst + r0, _mm512_i32gather_epi32(idx, s + c, 4));
  }
}

// 16 bf16 (lanes past the mask read as 0) -> fp32
FA_INLINE __m512 widen16(const uint16_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

// fp32 -> bf16 for 16 lanes, exactly narrow<bf16_t> (cpu_utils.h: round to nearest even, NaN stays
// a quiet NaN, denormals kept), so the outputs round as on the fp32 tile path
FA_INLINE __m256i narrow16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
// dst[0..D) <- bf16(src[c] * mul)
FA_INLINE void store_row(uint16_t* dst, const float* src, float mul, int64_t D) {
  const __m512 mv = _mm512_set1_ps(mul);
  for (int64_t c = 0; c < D; c += 16)
    _mm256_mask_storeu_epi16(dst + c, mask16(c, D), narrow16(_mm512_mul_ps(_mm512_loadu_ps(src + c), mv)));
}

// lanes 16 x + t with 16 x + t >= lim -> -inf
FA_INLINE __m512 mask_tail(__m512 v, int x, int64_t lim) {
  const int64_t rem = lim - 16 * x;
  const __mmask16 keep = rem >= 16 ? __mmask16(0xFFFF) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1u);
  return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), v);
}
// horizontal max / sum
FA_INLINE float hmax(__m512 v) {
  const __m256 a = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_max_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_max_ss(b, _mm_movehdup_ps(b)));
}
FA_INLINE float hsum(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
// 2^x as exp2v (flash_attn_cpu_tile.h: same degree-7 polynomial on f in [-0.5, 0.5]) with the
// AVX-512 range reduction: k = round(x) (vrndscaleps), 2^f * 2^k by vscalefps, which underflows to 0
// by itself; x is clamped below at -150 first so -inf gives 0 (not NaN); NaN stays NaN.
FA_INLINE __m512 exp2_ps(__m512 x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-150.f), x);  // NaN in x passes through (2nd operand)
  const __m512 k = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, k);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

LLMCORE_INLINE const uint16_t* bits(const void* p) { return static_cast<const uint16_t*>(p); }

// ---- forward ----
FA_INLINE void fwd_range(const FlashAttnParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, Dp = round16(D), Hq = p.heads_q, G = Hq / p.heads_kv;
  const int64_t nqb = (p.seqlen_q + BQ - 1) / BQ, nkb = (p.seqlen_k + BK - 1) / BK;
  const int D2 = static_cast<int>((D + 1) / 2);
  std::vector<uint16_t> hbuf(BQ * Dp + 2 * Dp * BK + BQ * BK);
  std::vector<float> fbuf(BQ * BK + BQ * Dp + 2 * BQ);
  uint16_t* Qb = hbuf.data();  // [BQ][Dp]
  uint16_t* Kt = Qb + BQ * Dp;  // cols [Dp/2][BK][2]
  uint16_t* Vv = Kt + Dp * BK;  // vnni [BK/2][Dp][2]
  uint16_t* Pb = Vv + BK * Dp;  // [BQ][BK]
  float* S = fbuf.data();
  float* O = S + BQ * BK;
  float* mrow = O + BQ * Dp;
  float* lrow = mrow + BQ;
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m512 qmul = _mm512_set1_ps(static_cast<float>(p.scale) * static_cast<float>(kLog2e));
  const uint16_t* tiles = bits(p.kv_tiles);
  uint16_t* out = static_cast<uint16_t*>(p.out);
  float* lse = static_cast<float*>(p.lse);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t qb = item % nqb, h = (item / nqb) % Hq, b = item / nqb / Hq;
    const Seq s = seq_of(p, b);
    const int64_t i0 = qb * BQ;
    if (i0 >= s.sq) continue;
    const int m = static_cast<int>(std::min<int64_t>(BQ, s.sq - i0));
    const int64_t hk = h / G, off = s.sk - s.sq;
    int64_t kend = p.causal ? std::min<int64_t>(s.sk, i0 + m + off) : s.sk;
    kend = std::max<int64_t>(kend, 0);
    const uint16_t* qp = bits(p.q) + s.q_off + i0 * p.q_row_stride + h * p.q_head_stride;
    for (int i = 0; i < m; ++i) copy_row(Qb + i * Dp, qp + i * p.q_row_stride, D, Dp);
    std::fill(O, O + m * Dp, 0.f);
    std::fill(mrow, mrow + m, ninf);
    std::fill(lrow, lrow + m, 0.f);
    for (int64_t j0 = 0; j0 < kend; j0 += BK) {
      const int n = static_cast<int>(std::min<int64_t>(BK, kend - j0));
      const uint16_t* KtB = Kt;
      const uint16_t* VB = Vv;
      if (tiles) {
        KtB = tiles + ((b * p.heads_kv + hk) * nkb + j0 / BK) * 2 * Dp * BK;
        VB = KtB + Dp * BK;
      } else {
        pack_cols(Kt, bits(p.k) + s.k_off + j0 * p.k_row_stride + hk * p.k_head_stride, p.k_row_stride, n, D, Dp);
        pack_vnni(Vv, bits(p.v) + s.v_off + j0 * p.v_row_stride + hk * p.v_head_stride, p.v_row_stride, n, BK, D,
                  Dp);
      }
      dp_gemm(m, BK, D2, Qb, Dp / 2, 1, KtB, 2 * BK, S, BK, false);
      const bool diag = p.causal && j0 + BK - 1 > i0 + off;
      for (int i = 0; i < m; ++i) {  // one pass per row: scale, mask, max, exp2, sum, round to bf16
        const float* si = S + i * BK;
        const int64_t lim = std::max<int64_t>(0, diag ? std::min<int64_t>(n, i0 + i + off - j0 + 1) : n);
        __m512 sv[BK / 16];
#pragma GCC unroll 4
        for (int x = 0; x < BK / 16; ++x) sv[x] = mask_tail(_mm512_mul_ps(_mm512_loadu_ps(si + 16 * x), qmul), x, lim);
        const float mx = hmax(_mm512_max_ps(_mm512_max_ps(sv[0], sv[1]), _mm512_max_ps(sv[2], sv[3])));
        float mnew = std::max(mrow[i], mx);
        uint16_t* pb = Pb + i * BK;
        if (mnew == ninf) {
          const __mmask16 nan = _mm512_cmp_ps_mask(sv[0], sv[0], _CMP_UNORD_Q) |
                                _mm512_cmp_ps_mask(sv[1], sv[1], _CMP_UNORD_Q) |
                                _mm512_cmp_ps_mask(sv[2], sv[2], _CMP_UNORD_Q) |
                                _mm512_cmp_ps_mask(sv[3], sv[3], _CMP_UNORD_Q);
          if (!nan) {  // nothing visible yet in this row: P = 0
            _mm512_storeu_si512(pb, _mm512_setzero_si512());
            _mm512_storeu_si512(pb + 32, _mm512_setzero_si512());
            continue;
          }
          // every visible score NaN (NaN in q or k; vmaxps / std::max drop NaN): the row is NaN,
          // not masked. (Some NaN among finite scores needs nothing: exp2 puts it into l.)
          mnew = std::numeric_limits<float>::quiet_NaN();
        }
        const __m512 mv = _mm512_set1_ps(mnew);
        __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int x = 0; x < BK / 16; ++x) {
          sv[x] = exp2_ps(_mm512_sub_ps(sv[x], mv));
          sum = _mm512_add_ps(sum, sv[x]);
        }
        _mm512_storeu_si512(pb, (__m512i)_mm512_cvtne2ps_pbh(sv[1], sv[0]));
        _mm512_storeu_si512(pb + 32, (__m512i)_mm512_cvtne2ps_pbh(sv[3], sv[2]));
        // exp2 of the max's change, in a vector register (a libm call would spill the zmm state)
        const float alpha = mrow[i] == ninf ? 0.f
                            : mrow[i] == mnew ? 1.f
                                              : _mm512_cvtss_f32(exp2_ps(_mm512_set1_ps(mrow[i] - mnew)));
        lrow[i] = lrow[i] * alpha + hsum(sum);
        mrow[i] = mnew;
        if (alpha != 1.f) {
          float* oi = O + i * Dp;
          const __m512 av = _mm512_set1_ps(alpha);
          for (int64_t c = 0; c < Dp; c += 16) _mm512_storeu_ps(oi + c, _mm512_mul_ps(_mm512_loadu_ps(oi + c), av));
        }
      }
      dp_gemm(m, static_cast<int>(Dp), (n + 1) / 2, Pb, BK / 2, 1, VB, 2 * Dp, O, Dp, true);
    }
    for (int i = 0; i < m; ++i) {
      uint16_t* oi = out + ((s.row0 + i0 + i) * Hq + h) * D;
      const int64_t li = lse_index(p, b, s, h, i0 + i);
      if (lrow[i] == 0.f) {  // no visible key: out = 0 (bf16 +0 is all zero bits)
        std::memset(oi, 0, D * sizeof(uint16_t));
        lse[li] = ninf;
      } else {
        store_row(oi, O + i * Dp, 1.f / lrow[i], D);
        lse[li] = (mrow[i] + std::log2(lrow[i])) * static_cast<float>(kLn2);
      }
    }
  }
}

// ---- forward on AMX ----
// As fwd_range, but the key blocks go in groups of kGroup (kFlashCpuAmxGroup): one S = Q K^T GEMM
// over the group's up to 256 keys, one online-softmax step over them (row max over the group, one
// rescale of O per group), one O += P V GEMM with K = the group's keys. Why: an AMX brgemm call costs
// ~0.35 us at 64 x 64 x 64 however little it computes, and switching between two GEMM shapes costs
// about as much again (tile reconfiguration; bench/cpu_brgemm_probe.py, bench/RESULTS.md): 2 calls per
// group instead of 2 (plus 2 switches) per key block, and the per-row softmax bookkeeping / kGroup.
// Layout: a group's K^T is "cols" [Dp/2][kGroup * BK][2] (block g at keys g * BK) followed by its V
// vnni [kGroup * BK / 2][Dp][2] (block g at rows g * BK): the pre-packed tiles (pack_kv_range_amx)
// hold that per (b, kv head, group). Same numerics contract (fp32 softmax, P rounded to bf16); the row
// max over a group instead of a block changes only how P is scaled before rounding.
constexpr int kGroup = static_cast<int>(kFlashCpuAmxGroup);
constexpr int GK = kGroup * BK;  // keys per group

FA_INLINE void fwd_range_amx(const FlashAttnParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, Dp = round16(D), Hq = p.heads_q, G = Hq / p.heads_kv;
  const int64_t nqb = (p.seqlen_q + BQ - 1) / BQ, nkb = (p.seqlen_k + BK - 1) / BK;
  const int64_t ngr = (nkb + kGroup - 1) / kGroup;
  std::vector<uint16_t> hbuf(BQ * Dp + 2 * Dp * GK + BQ * GK);
  std::vector<float> fbuf(BQ * GK + BQ * Dp + 2 * BQ);
  uint16_t* Qb = hbuf.data();  // [BQ][Dp]
  uint16_t* Kt = Qb + BQ * Dp;  // the group's K^T: cols [Dp/2][GK][2]
  uint16_t* Vv = Kt + Dp * GK;  // the group's V: vnni [GK/2][Dp][2]
  uint16_t* Pb = Vv + GK * Dp;  // [BQ][GK]
  float* S = fbuf.data();       // [BQ][GK]
  float* O = S + BQ * GK;
  float* mrow = O + BQ * Dp;
  float* lrow = mrow + BQ;
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m512 qmul = _mm512_set1_ps(static_cast<float>(p.scale) * static_cast<float>(kLog2e));
  const uint16_t* tiles = bits(p.kv_tiles);
  uint16_t* out = static_cast<uint16_t*>(p.out);
  float* lse = static_cast<float*>(p.lse);
  int nk[kGroup];
  int64_t lim0[kGroup];  // block g: row i sees keys [0, min(nk, lim0 + i)) of it (causal diagonal)
  bool diag[kGroup];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t qb = item % nqb, h = (item / nqb) % Hq, b = item / nqb / Hq;
    const Seq s = seq_of(p, b);
    const int64_t i0 = qb * BQ;
    if (i0 >= s.sq) continue;
    const int m = static_cast<int>(std::min<int64_t>(BQ, s.sq - i0));
    const int64_t hk = h / G, off = s.sk - s.sq;
    int64_t kend = p.causal ? std::min<int64_t>(s.sk, i0 + m + off) : s.sk;
    kend = std::max<int64_t>(kend, 0);
    const uint16_t* qp = bits(p.q) + s.q_off + i0 * p.q_row_stride + h * p.q_head_stride;
    for (int i = 0; i < m; ++i) copy_row(Qb + i * Dp, qp + i * p.q_row_stride, D, Dp);
    std::fill(O, O + m * Dp, 0.f);
    std::fill(mrow, mrow + m, ninf);
    std::fill(lrow, lrow + m, 0.f);
    for (int64_t j0 = 0; j0 < kend; j0 += kGroup * BK) {
      const int ng = static_cast<int>(std::min<int64_t>(kGroup, (kend - j0 + BK - 1) / BK));
      const uint16_t* KtG = Kt;
      const uint16_t* VG = Vv;
      if (tiles) {
        KtG = tiles + ((b * p.heads_kv + hk) * ngr + j0 / GK) * 2 * Dp * GK;
        VG = KtG + Dp * GK;
      }
      for (int g = 0; g < ng; ++g) {
        const int64_t jg = j0 + g * BK;
        nk[g] = static_cast<int>(std::min<int64_t>(BK, kend - jg));
        diag[g] = p.causal && jg + BK - 1 > i0 + off;
        lim0[g] = i0 + off - jg + 1;
        if (!tiles) {
          pack_cols(Kt + 2 * g * BK, bits(p.k) + s.k_off + jg * p.k_row_stride + hk * p.k_head_stride, p.k_row_stride,
                    nk[g], D, Dp, GK);
          pack_vnni(Vv + g * BK * Dp, bits(p.v) + s.v_off + jg * p.v_row_stride + hk * p.v_head_stride, p.v_row_stride,
                    nk[g], BK, D, Dp);
        }
      }
      amx_gemm_bf16(m, ng * BK, Dp, Qb, Dp, KtG, GK, S, GK, false);
      for (int i = 0; i < m; ++i) {
        // pass 1: scale, mask (stored back), row max over the group, NaN seen
        __m512 mxv = _mm512_set1_ps(ninf);
        __mmask16 nan = 0;
        for (int g = 0; g < ng; ++g) {
          float* si = S + i * GK + g * BK;
          const int64_t lim = std::max<int64_t>(0, diag[g] ? std::min<int64_t>(nk[g], lim0[g] + i) : nk[g]);
#pragma GCC unroll 4
          for (int x = 0; x < BK / 16; ++x) {
            const __m512 v = mask_tail(_mm512_mul_ps(_mm512_loadu_ps(si + 16 * x), qmul), x, lim);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            mxv = _mm512_max_ps(mxv, v);
            _mm512_storeu_ps(si + 16 * x, v);
          }
        }
        float mnew = std::max(mrow[i], hmax(mxv));
        if (mnew == ninf) {
          if (!nan) {  // nothing visible yet in this row: P = 0
            for (int g = 0; g < ng; ++g) {
              uint16_t* pb = Pb + i * GK + g * BK;
              _mm512_storeu_si512(pb, _mm512_setzero_si512());
              _mm512_storeu_si512(pb + 32, _mm512_setzero_si512());
            }
            continue;
          }
          mnew = std::numeric_limits<float>::quiet_NaN();  // every visible score NaN: the row is NaN
        }
        // pass 2: P = exp2(s - m) in fp32, summed, rounded to bf16
        const __m512 mv = _mm512_set1_ps(mnew);
        __m512 sum = _mm512_setzero_ps();
        for (int g = 0; g < ng; ++g) {
          const float* si = S + i * GK + g * BK;
          uint16_t* pb = Pb + i * GK + g * BK;
          __m512 e[BK / 16];
#pragma GCC unroll 4
          for (int x = 0; x < BK / 16; ++x) {
            e[x] = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(si + 16 * x), mv));
            sum = _mm512_add_ps(sum, e[x]);
          }
          _mm512_storeu_si512(pb, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
          _mm512_storeu_si512(pb + 32, (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
        }
        const float alpha = mrow[i] == ninf ? 0.f
                            : mrow[i] == mnew ? 1.f
                                              : _mm512_cvtss_f32(exp2_ps(_mm512_set1_ps(mrow[i] - mnew)));
        lrow[i] = lrow[i] * alpha + hsum(sum);
        mrow[i] = mnew;
        if (alpha != 1.f) {
          float* oi = O + i * Dp;
          const __m512 av = _mm512_set1_ps(alpha);
          for (int64_t c = 0; c < Dp; c += 16) _mm512_storeu_ps(oi + c, _mm512_mul_ps(_mm512_loadu_ps(oi + c), av));
        }
      }
      amx_gemm_bf16(m, Dp, (ng - 1) * BK + (nk[ng - 1] + 1) / 2 * 2, Pb, GK, VG, Dp, O, Dp, true);
    }
    for (int i = 0; i < m; ++i) {
      uint16_t* oi = out + ((s.row0 + i0 + i) * Hq + h) * D;
      const int64_t li = lse_index(p, b, s, h, i0 + i);
      if (lrow[i] == 0.f) {  // no visible key: out = 0 (bf16 +0 is all zero bits)
        std::memset(oi, 0, D * sizeof(uint16_t));
        lse[li] = ninf;
      } else {
        store_row(oi, O + i * Dp, 1.f / lrow[i], D);
        lse[li] = (mrow[i] + std::log2(lrow[i])) * static_cast<float>(kLn2);
      }
    }
  }
  amx_gemm_release();
}

// the pre-pass of fwd_range_amx: tile t = key block t (as pack_kv_range), written into its group's
// layout; group gr = (b * Hkv + kv head) * ceil(nkb / kGroup) + block / kGroup
FA_INLINE void pack_kv_range_amx(const FlashAttnParams& p, void* tiles_v, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, Dp = round16(D), nkb = (p.seqlen_k + BK - 1) / BK, ngr = (nkb + kGroup - 1) / kGroup;
  uint16_t* tiles = static_cast<uint16_t*>(tiles_v);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t kb = t % nkb, hk = (t / nkb) % p.heads_kv, b = t / nkb / p.heads_kv;
    const Seq s = seq_of(p, b);
    const int64_t j0 = kb * BK;
    if (j0 >= s.sk) continue;
    const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
    const int64_t g = kb % kGroup;
    uint16_t* kt = tiles + ((b * p.heads_kv + hk) * ngr + kb / kGroup) * 2 * Dp * GK;
    pack_cols(kt + 2 * g * BK, bits(p.k) + s.k_off + j0 * p.k_row_stride + hk * p.k_head_stride, p.k_row_stride, n, D,
              Dp, GK);
    pack_vnni(kt + Dp * GK + g * BK * Dp, bits(p.v) + s.v_off + j0 * p.v_row_stride + hk * p.v_head_stride,
              p.v_row_stride, n, BK, D, Dp);
  }
}

FA_INLINE void pack_kv_range(const FlashAttnParams& p, void* tiles_v, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, Dp = round16(D), nkb = (p.seqlen_k + BK - 1) / BK;
  uint16_t* tiles = static_cast<uint16_t*>(tiles_v);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t kb = t % nkb, hk = (t / nkb) % p.heads_kv, b = t / nkb / p.heads_kv;
    const Seq s = seq_of(p, b);
    const int64_t j0 = kb * BK;
    if (j0 >= s.sk) continue;
    const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
    uint16_t* kt = tiles + t * 2 * Dp * BK;
    pack_cols(kt, bits(p.k) + s.k_off + j0 * p.k_row_stride + hk * p.k_head_stride, p.k_row_stride, n, D, Dp);
    pack_vnni(kt + Dp * BK, bits(p.v) + s.v_off + j0 * p.v_row_stride + hk * p.v_head_stride, p.v_row_stride, n, BK,
              D, Dp);
  }
}

// ---- backward ----
FA_INLINE void bwd_range(const FlashAttnParams& p, int64_t ns, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, Dp = round16(D), Hq = p.heads_q, Hkv = p.heads_kv, G = Hq / Hkv;
  const int D2 = static_cast<int>((D + 1) / 2);
  // per chunk key block: Kt cols, Kv vnni, Vt cols (bf16), dK, dV (fp32)
  std::vector<uint16_t> kvbuf(kChunk * 3 * BK * Dp);
  std::vector<float> dkv(kChunk * 2 * BK * Dp);
  std::vector<uint16_t> qbuf(4 * BQ * Dp + 3 * BQ * BK);
  std::vector<float> fbuf(2 * BQ * BK + 2 * BQ);
  uint16_t* Qb = qbuf.data();   // [BQ][Dp]
  uint16_t* Qv = Qb + BQ * Dp;  // vnni [BQ/2][Dp][2]
  uint16_t* dOb = Qv + BQ * Dp;
  uint16_t* dOv = dOb + BQ * Dp;
  uint16_t* Pv = dOv + BQ * Dp;  // vnni [BQ/2][BK][2]
  uint16_t* dSv = Pv + BQ * BK;  // vnni [BQ/2][BK][2]
  uint16_t* dSb = dSv + BQ * BK;  // [BQ][BK]
  float* P = fbuf.data();  // [BQ][BK]
  float* dS = P + BQ * BK;
  float* lse2 = dS + BQ * BK;
  float* delta = lse2 + BQ;
  const float ninf = -std::numeric_limits<float>::infinity(), pinf = std::numeric_limits<float>::infinity();
  const float c2 = static_cast<float>(p.scale) * static_cast<float>(kLog2e), scale = static_cast<float>(p.scale);
  const __m512 c2v = _mm512_set1_ps(c2);
  const __m512 scalev = _mm512_set1_ps(scale);
  const __m512i pair_idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const float* lse = static_cast<const float*>(p.lse);
  uint16_t* dk = static_cast<uint16_t*>(p.dk);
  uint16_t* dv = static_cast<uint16_t*>(p.dv);
  float* dq_accum = static_cast<float*>(p.dq_accum);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t split = item % ns, hk = (item / ns) % Hkv, b = item / ns / Hkv;
    const Seq s = seq_of(p, b);
    const int64_t off = s.sk - s.sq, nkb = (s.sk + BK - 1) / BK;
    int64_t kb0, kb1;
    split_range(nkb, ns, split, kb0, kb1);
    float* dqa = dq_accum + split * p.total_q * Hq * Dp;
    for (int64_t c0 = kb0; c0 < kb1; c0 += kChunk) {
      const int64_t c1 = std::min<int64_t>(kb1, c0 + kChunk);
      for (int64_t kb = c0; kb < c1; ++kb) {
        const int64_t j0 = kb * BK;
        const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
        uint16_t* kv = kvbuf.data() + (kb - c0) * 3 * BK * Dp;
        const uint16_t* kp = bits(p.k) + s.k_off + j0 * p.k_row_stride + hk * p.k_head_stride;
        const uint16_t* vp = bits(p.v) + s.v_off + j0 * p.v_row_stride + hk * p.v_head_stride;
        pack_cols(kv, kp, p.k_row_stride, n, D, Dp);
        pack_vnni(kv + BK * Dp, kp, p.k_row_stride, n, BK, D, Dp);
        pack_cols(kv + 2 * BK * Dp, vp, p.v_row_stride, n, D, Dp);
        float* d = dkv.data() + (kb - c0) * 2 * BK * Dp;
        std::fill(d, d + 2 * BK * Dp, 0.f);
      }
      const int64_t qstart = p.causal ? std::max<int64_t>(0, c0 * BK - off) : 0;
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t i0 = qstart / BQ * BQ; i0 < s.sq; i0 += BQ) {
          const int m = static_cast<int>(std::min<int64_t>(BQ, s.sq - i0));
          // key blocks of the chunk this query block sees: keys j <= i0 + m - 1 + off
          const int64_t last_key = p.causal ? i0 + m - 1 + off : s.sk - 1;
          if (last_key < c0 * BK) continue;
          const int64_t kbe = std::min<int64_t>(c1, last_key / BK + 1);
          const uint16_t* qp = bits(p.q) + s.q_off + i0 * p.q_row_stride + h * p.q_head_stride;
          const uint16_t* dop = bits(p.dout) + ((s.row0 + i0) * Hq + h) * D;
          for (int i = 0; i < m; ++i) {
            copy_row(Qb + i * Dp, qp + i * p.q_row_stride, D, Dp);
            copy_row(dOb + i * Dp, dop + i * Hq * D, D, Dp);
          }
          const int mp = (m + 1) / 2 * 2;
          pack_vnni(Qv, qp, p.q_row_stride, m, mp, D, Dp);
          pack_vnni(dOv, dop, Hq * D, m, mp, D, Dp);
          for (int i = 0; i < m; ++i) {
            const uint16_t* oi = bits(p.out) + ((s.row0 + i0 + i) * Hq + h) * D;
            const uint16_t* doi = dop + i * Hq * D;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < D; c += 16)
              acc = _mm512_fmadd_ps(widen16(oi + c, mask16(c, D)), widen16(doi + c, mask16(c, D)), acc);
            delta[i] = hsum(acc);
            const float l = lse[lse_index(p, b, s, h, i0 + i)];
            lse2[i] = l == ninf ? pinf : l * static_cast<float>(kLog2e);
          }
          for (int64_t kb = c0; kb < kbe; ++kb) {
            const int64_t j0 = kb * BK;
            const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
            const uint16_t* Kt = kvbuf.data() + (kb - c0) * 3 * BK * Dp;
            const uint16_t* Kv = Kt + BK * Dp;
            const uint16_t* Vt = Kv + BK * Dp;
            float* dK = dkv.data() + (kb - c0) * 2 * BK * Dp;
            float* dV = dK + BK * Dp;
            dp_gemm(m, BK, D2, Qb, Dp / 2, 1, Kt, 2 * BK, P, BK, false);  // S = Q K^T
            const bool diag = p.causal && j0 + BK - 1 > i0 + off;
            // P = exp2(S * scale log2 e - lse log2 e), masked; fp32 rows for dS and vnni bf16 pairs
            for (int i = 0; i < m; i += 2) {
              __m512 pr[2][BK / 16];
#pragma GCC unroll 2
              for (int t = 0; t < 2; ++t) {
                const int r = i + t;
                if (r >= m) {
#pragma GCC unroll 4
                  for (int x = 0; x < BK / 16; ++x) pr[t][x] = _mm512_setzero_ps();
                  continue;
                }
                float* pi = P + r * BK;
                const __m512 l2 = _mm512_set1_ps(lse2[r]);
                const int64_t lim = std::max<int64_t>(0, diag ? std::min<int64_t>(n, i0 + r + off - j0 + 1) : n);
#pragma GCC unroll 4
                for (int x = 0; x < BK / 16; ++x) {
                  pr[t][x] = exp2_ps(mask_tail(_mm512_fmsub_ps(_mm512_loadu_ps(pi + 16 * x), c2v, l2), x, lim));
                  _mm512_storeu_ps(pi + 16 * x, pr[t][x]);
                }
              }
#pragma GCC unroll 4
              for (int x = 0; x < BK / 16; ++x)
                _mm512_storeu_si512(Pv + i * BK + 32 * x,
                                    _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(pr[1][x], pr[0][x])));
            }
            dp_gemm(BK, static_cast<int>(Dp), mp / 2, Pv, 1, BK, dOv, 2 * Dp, dV, Dp, true);  // dV += P^T dO
            dp_gemm(m, BK, D2, dOb, Dp / 2, 1, Vt, 2 * BK, dS, BK, false);                  // dP = dO V^T
            // dS = scale * P * (dP - delta) in fp32 -> bf16 row-major (for dQ) and vnni pairs (for dK)
            for (int i = 0; i < m; i += 2) {
              __m512 d[2][BK / 16];
#pragma GCC unroll 2
              for (int t = 0; t < 2; ++t) {
                const int r = i + t;
                if (r >= m) {
#pragma GCC unroll 4
                  for (int x = 0; x < BK / 16; ++x) d[t][x] = _mm512_setzero_ps();
                  continue;
                }
                const float* pi = P + r * BK;
                const float* di = dS + r * BK;
                const __m512 dl = _mm512_set1_ps(delta[r]);
#pragma GCC unroll 4
                for (int x = 0; x < BK / 16; ++x)
                  d[t][x] = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(pi + 16 * x),
                                                       _mm512_sub_ps(_mm512_loadu_ps(di + 16 * x), dl)), scalev);
#pragma GCC unroll 2
                for (int x = 0; x < BK / 16; x += 2)
                  _mm512_storeu_si512(dSb + r * BK + 16 * x, (__m512i)_mm512_cvtne2ps_pbh(d[t][x + 1], d[t][x]));
              }
#pragma GCC unroll 4
              for (int x = 0; x < BK / 16; ++x)
                _mm512_storeu_si512(dSv + i * BK + 32 * x,
                                    _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(d[1][x], d[0][x])));
            }
            dp_gemm(BK, static_cast<int>(Dp), mp / 2, dSv, 1, BK, Qv, 2 * Dp, dK, Dp, true);  // dK += dS^T Q
            dp_gemm(m, static_cast<int>(Dp), (n + 1) / 2, dSb, BK / 2, 1, Kv, 2 * Dp,          // dQ += dS K
                    dqa + ((s.row0 + i0) * Hq + h) * Dp, Hq * Dp, true);
          }
        }
      }
      for (int64_t kb = c0; kb < c1; ++kb) {
        const int64_t j0 = kb * BK;
        const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
        const float* dK = dkv.data() + (kb - c0) * 2 * BK * Dp;
        const float* dV = dK + BK * Dp;
        for (int jj = 0; jj < n; ++jj) {
          store_row(dk + ((s.k_row0 + j0 + jj) * Hkv + hk) * D, dK + jj * Dp, 1.f, D);
          store_row(dv + ((s.k_row0 + j0 + jj) * Hkv + hk) * D, dV + jj * Dp, 1.f, D);
        }
      }
    }
  }
}

// ---- backward on AMX ----
// The items, splits, chunks and accumulation order of bwd_range, with the GEMMs taken phase by phase
// over the key blocks of the chunk a query block sees, so each phase is one GEMM shape back to back
// (a brgemm shape change costs about a 64^3 call, cpu_gemm.h): S and dP for every key block; P and
// dS; dV^T += dO^T P and dK^T += Q^T dS for every key block; dQ += dS K for every key block (per dQ
// row the key blocks still go in ascending order). dK / dV are kept transposed ([Dp][BK]) so that
// every A operand is row-major as the brgemm wants: Q^T / dO^T are made once per query block
// (transpose32 of the vnni pairs), dK / dV are transposed back once per key block.
FA_INLINE void bwd_range_amx(const FlashAttnParams& p, int64_t ns, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, Dp = round16(D), Hq = p.heads_q, Hkv = p.heads_kv, G = Hq / Hkv;
  std::vector<uint16_t> kvbuf(kChunk * 3 * BK * Dp);  // per key block: Kt cols, Kv vnni, Vt cols
  std::vector<float> dkv(kChunk * 2 * BK * Dp);       // per key block: dK^T, dV^T [Dp][BK]
  std::vector<uint16_t> qbuf(6 * BQ * Dp);
  std::vector<uint16_t> pbuf(kChunk * 3 * BQ * BK);   // per key block: Pv, dSv (vnni), dSb [BQ][BK]
  std::vector<float> fbuf(kChunk * 2 * BQ * BK + 2 * BQ);  // per key block: P, dS [BQ][BK]
  std::vector<float> tbuf(BK * Dp);
  uint16_t* Qb = qbuf.data();   // [BQ][Dp]
  uint16_t* Qv = Qb + BQ * Dp;  // vnni [BQ/2][Dp][2]
  uint16_t* dOb = Qv + BQ * Dp;
  uint16_t* dOv = dOb + BQ * Dp;
  uint16_t* QT = dOv + BQ * Dp;  // Q^T [Dp][BQ]
  uint16_t* dOT = QT + BQ * Dp;  // dO^T [Dp][BQ]
  float* lse2 = fbuf.data() + kChunk * 2 * BQ * BK;
  float* delta = lse2 + BQ;
  const float ninf = -std::numeric_limits<float>::infinity(), pinf = std::numeric_limits<float>::infinity();
  const float c2 = static_cast<float>(p.scale) * static_cast<float>(kLog2e), scale = static_cast<float>(p.scale);
  const __m512 c2v = _mm512_set1_ps(c2);
  const __m512 scalev = _mm512_set1_ps(scale);
  const __m512i pair_idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const float* lse = static_cast<const float*>(p.lse);
  uint16_t* dk = static_cast<uint16_t*>(p.dk);
  uint16_t* dv = static_cast<uint16_t*>(p.dv);
  float* dq_accum = static_cast<float*>(p.dq_accum);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t split = item % ns, hk = (item / ns) % Hkv, b = item / ns / Hkv;
    const Seq s = seq_of(p, b);
    const int64_t off = s.sk - s.sq, nkb = (s.sk + BK - 1) / BK;
    int64_t kb0, kb1;
    split_range(nkb, ns, split, kb0, kb1);
    float* dqa = dq_accum + split * p.total_q * Hq * Dp;
    for (int64_t c0 = kb0; c0 < kb1; c0 += kChunk) {
      const int64_t c1 = std::min<int64_t>(kb1, c0 + kChunk);
      for (int64_t kb = c0; kb < c1; ++kb) {
        const int64_t j0 = kb * BK;
        const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
        uint16_t* kv = kvbuf.data() + (kb - c0) * 3 * BK * Dp;
        const uint16_t* kp = bits(p.k) + s.k_off + j0 * p.k_row_stride + hk * p.k_head_stride;
        const uint16_t* vp = bits(p.v) + s.v_off + j0 * p.v_row_stride + hk * p.v_head_stride;
        pack_cols(kv, kp, p.k_row_stride, n, D, Dp);
        pack_vnni(kv + BK * Dp, kp, p.k_row_stride, n, BK, D, Dp);
        pack_cols(kv + 2 * BK * Dp, vp, p.v_row_stride, n, D, Dp);
        float* d = dkv.data() + (kb - c0) * 2 * BK * Dp;
        std::fill(d, d + 2 * BK * Dp, 0.f);
      }
      const int64_t qstart = p.causal ? std::max<int64_t>(0, c0 * BK - off) : 0;
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t i0 = qstart / BQ * BQ; i0 < s.sq; i0 += BQ) {
          const int m = static_cast<int>(std::min<int64_t>(BQ, s.sq - i0));
          const int64_t last_key = p.causal ? i0 + m - 1 + off : s.sk - 1;
          if (last_key < c0 * BK) continue;
          const int64_t kbe = std::min<int64_t>(c1, last_key / BK + 1);
          const uint16_t* qp = bits(p.q) + s.q_off + i0 * p.q_row_stride + h * p.q_head_stride;
          const uint16_t* dop = bits(p.dout) + ((s.row0 + i0) * Hq + h) * D;
          for (int i = 0; i < m; ++i) {
            copy_row(Qb + i * Dp, qp + i * p.q_row_stride, D, Dp);
            copy_row(dOb + i * Dp, dop + i * Hq * D, D, Dp);
          }
          const int mp = (m + 1) / 2 * 2;
          pack_vnni(Qv, qp, p.q_row_stride, m, mp, D, Dp);
          pack_vnni(dOv, dop, Hq * D, m, mp, D, Dp);
          transpose32(reinterpret_cast<uint32_t*>(QT), reinterpret_cast<const uint32_t*>(Qv), BQ / 2, Dp, Dp, BQ / 2);
          transpose32(reinterpret_cast<uint32_t*>(dOT), reinterpret_cast<const uint32_t*>(dOv), BQ / 2, Dp, Dp, BQ / 2);
          for (int i = 0; i < m; ++i) {
            const uint16_t* oi = bits(p.out) + ((s.row0 + i0 + i) * Hq + h) * D;
            const uint16_t* doi = dop + i * Hq * D;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < D; c += 16)
              acc = _mm512_fmadd_ps(widen16(oi + c, mask16(c, D)), widen16(doi + c, mask16(c, D)), acc);
            delta[i] = hsum(acc);
            const float l = lse[lse_index(p, b, s, h, i0 + i)];
            lse2[i] = l == ninf ? pinf : l * static_cast<float>(kLog2e);
          }
          // phase 1: S = Q K^T and dP = dO V^T for every key block the query block sees
          for (int64_t kb = c0; kb < kbe; ++kb) {
            const uint16_t* Kt = kvbuf.data() + (kb - c0) * 3 * BK * Dp;
            float* P = fbuf.data() + (kb - c0) * 2 * BQ * BK;
            amx_gemm_bf16(m, BK, Dp, Qb, Dp, Kt, BK, P, BK, false);
          }
          for (int64_t kb = c0; kb < kbe; ++kb) {
            const uint16_t* Vt = kvbuf.data() + (kb - c0) * 3 * BK * Dp + 2 * BK * Dp;
            float* dS = fbuf.data() + (kb - c0) * 2 * BQ * BK + BQ * BK;
            amx_gemm_bf16(m, BK, Dp, dOb, Dp, Vt, BK, dS, BK, false);
          }
          // phase 2: P = exp2(S * scale log2 e - lse log2 e) masked, dS = scale P (dP - delta); bf16 operands
          for (int64_t kb = c0; kb < kbe; ++kb) {
            const int64_t j0 = kb * BK;
            const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
            float* P = fbuf.data() + (kb - c0) * 2 * BQ * BK;
            float* dS = P + BQ * BK;
            uint16_t* Pv = pbuf.data() + (kb - c0) * 3 * BQ * BK;
            uint16_t* dSv = Pv + BQ * BK;
            uint16_t* dSb = dSv + BQ * BK;
            const bool diag = p.causal && j0 + BK - 1 > i0 + off;
            for (int i = 0; i < m; i += 2) {
              __m512 pr[2][BK / 16], d[2][BK / 16];
#pragma GCC unroll 2
              for (int t = 0; t < 2; ++t) {
                const int r = i + t;
                if (r >= m) {
#pragma GCC unroll 4
                  for (int x = 0; x < BK / 16; ++x) pr[t][x] = d[t][x] = _mm512_setzero_ps();
                  continue;
                }
                const float* pi = P + r * BK;
                const float* di = dS + r * BK;
                const __m512 l2 = _mm512_set1_ps(lse2[r]);
                const __m512 dl = _mm512_set1_ps(delta[r]);
                const int64_t lim = std::max<int64_t>(0, diag ? std::min<int64_t>(n, i0 + r + off - j0 + 1) : n);
#pragma GCC unroll 4
                for (int x = 0; x < BK / 16; ++x) {
                  pr[t][x] = exp2_ps(mask_tail(_mm512_fmsub_ps(_mm512_loadu_ps(pi + 16 * x), c2v, l2), x, lim));
                  d[t][x] = _mm512_mul_ps(_mm512_mul_ps(pr[t][x], _mm512_sub_ps(_mm512_loadu_ps(di + 16 * x), dl)),
                                          scalev);
                }
#pragma GCC unroll 2
                for (int x = 0; x < BK / 16; x += 2)
                  _mm512_storeu_si512(dSb + r * BK + 16 * x, (__m512i)_mm512_cvtne2ps_pbh(d[t][x + 1], d[t][x]));
              }
#pragma GCC unroll 4
              for (int x = 0; x < BK / 16; ++x) {
                _mm512_storeu_si512(Pv + i * BK + 32 * x,
                                    _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(pr[1][x], pr[0][x])));
                _mm512_storeu_si512(dSv + i * BK + 32 * x,
                                    _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(d[1][x], d[0][x])));
              }
            }
          }
          // phase 3: dV^T += dO^T P, dK^T += Q^T dS; phase 4: dQ += dS K (key blocks ascending)
          for (int64_t kb = c0; kb < kbe; ++kb) {
            float* dKt = dkv.data() + (kb - c0) * 2 * BK * Dp;
            const uint16_t* Pv = pbuf.data() + (kb - c0) * 3 * BQ * BK;
            amx_gemm_bf16(Dp, BK, mp, dOT, BQ, Pv, BK, dKt + BK * Dp, BK, true);
            amx_gemm_bf16(Dp, BK, mp, QT, BQ, Pv + BQ * BK, BK, dKt, BK, true);
          }
          float* dqrow = dqa + ((s.row0 + i0) * Hq + h) * Dp;
          for (int64_t kb = c0; kb < kbe; ++kb) {
            const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - kb * BK));
            const uint16_t* Kv = kvbuf.data() + (kb - c0) * 3 * BK * Dp + BK * Dp;
            const uint16_t* dSb = pbuf.data() + (kb - c0) * 3 * BQ * BK + 2 * BQ * BK;
            amx_gemm_bf16(m, Dp, (n + 1) / 2 * 2, dSb, BK, Kv, Dp, dqrow, Hq * Dp, true);
          }
        }
      }
      for (int64_t kb = c0; kb < c1; ++kb) {
        const int64_t j0 = kb * BK;
        const int n = static_cast<int>(std::min<int64_t>(BK, s.sk - j0));
        float* d = dkv.data() + (kb - c0) * 2 * BK * Dp;
        for (int t = 0; t < 2; ++t) {  // [Dp][BK] -> rows [BK][Dp]
          float* x = d + t * BK * Dp;
          for (int64_t c = 0; c < Dp; ++c)
            for (int jj = 0; jj < BK; ++jj) tbuf[jj * Dp + c] = x[c * BK + jj];
          std::memcpy(x, tbuf.data(), BK * Dp * sizeof(float));
        }
        for (int jj = 0; jj < n; ++jj) {
          store_row(dk + ((s.k_row0 + j0 + jj) * Hkv + hk) * D, d + jj * Dp, 1.f, D);
          store_row(dv + ((s.k_row0 + j0 + jj) * Hkv + hk) * D, d + BK * Dp + jj * Dp, 1.f, D);
        }
      }
    }
  }
  amx_gemm_release();
}

}  // namespace

FA_TARGET void flash_attn_fwd_cpu_bf16dot(const FlashAttnParams& p, int64_t item_begin, int64_t item_end) {
  if (p.cpu_gemm == CpuGemm::kAmx) return fwd_range_amx(p, item_begin, item_end);
  fwd_range(p, item_begin, item_end);
}
FA_TARGET void flash_attn_pack_kv_cpu_bf16dot(const FlashAttnParams& p, void* tiles, int64_t tile_begin,
                                              int64_t tile_end) {
  if (p.cpu_gemm == CpuGemm::kAmx) return pack_kv_range_amx(p, tiles, tile_begin, tile_end);
  pack_kv_range(p, tiles, tile_begin, tile_end);
}
FA_TARGET void flash_attn_bwd_cpu_bf16dot(const FlashAttnParams& p, int64_t num_splits, int64_t item_begin,
                                          int64_t item_end) {
  if (p.cpu_gemm == CpuGemm::kAmx) return bwd_range_amx(p, num_splits, item_begin, item_end);
  bwd_range(p, num_splits, item_begin, item_end);
}

#else  // no AVX512-BF16 path in this build (cpu_has_avx512bf16() is false): never called

void flash_attn_fwd_cpu_bf16dot(const FlashAttnParams&, int64_t, int64_t) { std::abort(); }
void flash_attn_pack_kv_cpu_bf16dot(const FlashAttnParams&, void*, int64_t, int64_t) { std::abort(); }
void flash_attn_bwd_cpu_bf16dot(const FlashAttnParams&, int64_t, int64_t, int64_t) { std::abort(); }

#endif

}  // namespace llmcore
