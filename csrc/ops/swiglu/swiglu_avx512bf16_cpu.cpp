// swiglu_avx512bf16_cpu.cpp — swiglu / swiglu_packed for bfloat16 on CPUs with AVX512-BF16
// (common/cpu_avx512bf16.h); swiglu_cpu.cpp calls these when cpu_has_avx512bf16().
//
// Same math and expression order as swiglu_cpu.cpp (swiglu.h), 16 lanes per step, the row tail
// with masked loads/stores. Strided rows (the halves of a packed [gate | up] row) prefetch the
// next row as they go: the hardware prefetcher restarts at every row jump, which made the packed
// layout 1.9x slower than two contiguous tensors at 4096 x 1408 (1.98 -> 1.09 ms, vs 1.02).
// The loops are bound by vector-op count, not memory: per 16 elements the fwd issues ~25 ops (of
// which exp ~12, one divide) and the bwd ~35; the generic kernels spend another ~7 per bf16 output
// on the integer round-to-nearest-even that vcvtneps2bf16 does in one.
#include "common/cpu_avx512bf16.h"
#include "swiglu/swiglu.h"

// GCC 12 warns "'__Y' may be used uninitialized" inside its own avx512fintrin.h for the masked
// load / conversion intrinsics (a known false positive of the header's undefined-vector idiom).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#ifdef LLMCORE_HAVE_AVX512BF16_PATH
namespace llmcore {
namespace {

using namespace avx512bf16;

LLMCORE_AVX512BF16_INLINE __m512 silu_over_gate(__m512 g, __m512& sig) {  // returns silu(g)
  const __m512 e = exp_for_sigmoid(_mm512_sub_ps(_mm512_setzero_ps(), g));
  sig = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  return _mm512_mul_ps(g, sig);
}

LLMCORE_AVX512BF16_INLINE void fwd16(const uint16_t* g, const uint16_t* u, uint16_t* y, __mmask16 m, bool full) {
  const __m512 gv = full ? load16(g) : load16(g, m);
  const __m512 uv = full ? load16(u) : load16(u, m);
  __m512 sig;
  const __m512 r = _mm512_mul_ps(silu_over_gate(gv, sig), uv);
  full ? store16(y, r) : store16(y, r, m);
}

LLMCORE_AVX512BF16_INLINE void bwd16(const uint16_t* dy, const uint16_t* g, const uint16_t* u, uint16_t* dg,
                                     uint16_t* du, __mmask16 m, bool full) {
  const __m512 d = full ? load16(dy) : load16(dy, m);
  const __m512 gv = full ? load16(g) : load16(g, m);
  const __m512 uv = full ? load16(u) : load16(u, m);
  __m512 sig;
  const __m512 silu = silu_over_gate(gv, sig);
  const __m512 one = _mm512_set1_ps(1.f);
  // d * u * sig * (1 + g * (1 - sig)), left to right as in swiglu_cpu.cpp
  const __m512 t = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sig), one);
  const __m512 dgv = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(d, uv), sig), t);
  const __m512 duv = _mm512_mul_ps(d, silu);
  if (full) {
    store16(dg, dgv);
    store16(du, duv);
  } else {
    store16(dg, dgv, m);
    store16(du, duv, m);
  }
}

}  // namespace

LLMCORE_AVX512BF16
void swiglu_fwd_cpu_avx512bf16(const SwigluParams& p, int64_t begin, int64_t end) {
  const uint16_t* g = static_cast<const uint16_t*>(p.gate);
  const uint16_t* u = static_cast<const uint16_t*>(p.up);
  uint16_t* y = static_cast<uint16_t*>(p.y);
  for (int64_t i = begin; i < end;) {  // row segments of the flat range (swiglu.h)
    const SwigluSegment s = swiglu_segment(p, i, end);
    const uint16_t *gr = g + s.gate, *ur = u + s.up;
    uint16_t* yr = y + s.out;
    int64_t j = 0;
    for (; j + 16 <= s.len; j += 16) {
      if (s.prefetch_next) {
        _mm_prefetch(reinterpret_cast<const char*>(g + s.gate_next + j), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(u + s.up_next + j), _MM_HINT_T0);
      }
      fwd16(gr + j, ur + j, yr + j, 0, true);
    }
    if (j < s.len) fwd16(gr + j, ur + j, yr + j, tail_mask(s.len - j), false);
    i += s.len;
  }
}

LLMCORE_AVX512BF16
void swiglu_bwd_cpu_avx512bf16(const SwigluParams& p, int64_t begin, int64_t end) {
  const uint16_t* dy = static_cast<const uint16_t*>(p.dy);
  const uint16_t* g = static_cast<const uint16_t*>(p.gate);
  const uint16_t* u = static_cast<const uint16_t*>(p.up);
  uint16_t* dg = static_cast<uint16_t*>(p.dgate);
  uint16_t* du = static_cast<uint16_t*>(p.dup);
  for (int64_t i = begin; i < end;) {
    const SwigluSegment s = swiglu_segment(p, i, end);
    const uint16_t *dyr = dy + s.out, *gr = g + s.gate, *ur = u + s.up;
    uint16_t *dgr = dg + s.dgate, *dur = du + s.dup;
    int64_t j = 0;
    for (; j + 16 <= s.len; j += 16) {
      if (s.prefetch_next) {
        _mm_prefetch(reinterpret_cast<const char*>(g + s.gate_next + j), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(u + s.up_next + j), _MM_HINT_T0);
      }
      bwd16(dyr + j, gr + j, ur + j, dgr + j, dur + j, 0, true);
    }
    if (j < s.len) bwd16(dyr + j, gr + j, ur + j, dgr + j, dur + j, tail_mask(s.len - j), false);
    i += s.len;
  }
}

}  // namespace llmcore

#else  // no AVX512-BF16 path in this build (cpu_has_avx512bf16() is false): never called
#include <cstdlib>
namespace llmcore {
void swiglu_fwd_cpu_avx512bf16(const SwigluParams&, int64_t, int64_t) { std::abort(); }
void swiglu_bwd_cpu_avx512bf16(const SwigluParams&, int64_t, int64_t) { std::abort(); }
}  // namespace llmcore
#endif
