// cpu_avx512bf16.h — hand-vectorized helpers for bfloat16 kernels on CPUs with AVX512-BF16
// (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later).
//
// Why a separate path: the generic kernels (common/cpu_utils.h) narrow fp32 -> bf16 in integer
// arithmetic (NaN test, round-to-nearest-even add, shift, pack: ~7 vector ops per 16 values), and
// in the elementwise ops that conversion is a quarter of all the work. AVX512-BF16 does it in one
// instruction (vcvtneps2bf16, round to nearest even, NaN stays NaN). The extension is not part of
// the x86-64-v4 level, so the generic target_clones cannot use it: functions written with these
// helpers carry LLMCORE_AVX512BF16 and are called only when cpu_has_avx512bf16() says so.
// Numerics: as narrow<bf16_t> except that vcvtneps2bf16 flushes results below 2^-126 (fp32
// denormal range) to zero; bf16 keeps fp32's exponent range, so only |y| < 1.2e-38 is affected.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LLMCORE_NO_MULTIVERSION)
#include <immintrin.h>
#define LLMCORE_HAVE_AVX512BF16_PATH 1
#define LLMCORE_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define LLMCORE_AVX512BF16_INLINE inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#endif

namespace llmcore {

// True when this CPU runs the LLMCORE_AVX512BF16 functions; LLMCORE_CPU_BF16_PATH=0 turns them off
// (A/B measurements, or to rule them out when debugging).
bool cpu_has_avx512bf16();

#ifdef LLMCORE_HAVE_AVX512BF16_PATH
namespace avx512bf16 {

// 16 bf16 at p (or the first `mask` lanes; others read as 0) -> 16 fp32.
LLMCORE_AVX512BF16_INLINE __m512 load16(const void* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
LLMCORE_AVX512BF16_INLINE __m512 load16(const void* p, __mmask16 mask) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
LLMCORE_AVX512BF16_INLINE void store16(void* p, __m512 v) {
  _mm256_storeu_si256(static_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
LLMCORE_AVX512BF16_INLINE void store16(void* p, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(p, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
LLMCORE_AVX512BF16_INLINE __mmask16 tail_mask(int64_t n) {  // first n (< 16) lanes
  return static_cast<__mmask16>((1u << n) - 1u);
}

// common/cpu_math.h's exp_for_sigmoid, 16 lanes: e^x for x clamped to [-87, 89] (inf above
// 88.72, e^-87 below -87, NaN stays NaN: vmaxps/vminps return their second operand on NaN).
LLMCORE_AVX512BF16_INLINE __m512 exp_for_sigmoid(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-87.f), x));
  const __m512 magic = _mm512_set1_ps(12582912.f);
  const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 nf = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(nf, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.f / 720.f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f / 120.f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f / 24.f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f / 6.f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.f));
  const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000 - 127));
  return _mm512_mul_ps(poly, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
}

}  // namespace avx512bf16
#endif

}  // namespace llmcore
