// swiglu_cpu.cpp — CPU kernels for swiglu / swiglu_packed (math in swiglu.h).
//
// The ATen layer splits the flat (rows, n) element range with at::parallel_for (contiguous inputs
// arrive as a single row, so the split is over elements, not rows). Each row segment is one
// `omp simd` loop; exp is common/cpu_math.h's exp_for_sigmoid, which vectorizes (std::exp would
// not), so the whole loop runs in AVX2 / AVX-512 lanes in the matching ISA clone. The loops are
// compute-bound on CPU (about 30 vector ops per 16 elements), so every op counts.
// Numerics: fp32 math (fp64 for float64), sig = 1 / (1 + e^-g), silu = g * sig; backward uses
// PyTorch's silu_backward expression so inf/NaN come out where PyTorch's do.
// bfloat16 on CPUs with AVX512-BF16 goes to swiglu_avx512bf16_cpu.cpp (same math, one-instruction
// fp32 -> bf16 rounding).
// The exp clamps are float comparisons; under the default -ftrapping-math GCC
// will not if-convert them (a comparison may raise an FP exception), which leaves the loops scalar.
// No llmcore code unmasks FP exceptions, so this file drops the assumption.
#pragma GCC optimize("no-trapping-math")

#include "swiglu/swiglu.h"

#include "common/cpu_avx512bf16.h"
#include "common/cpu_math.h"
#include "common/cpu_utils.h"

namespace llmcore {
namespace {

template <typename T>
LLMCORE_INLINE void fwd_segment(const T* g, const T* u, T* y, int64_t len) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const A gv = widen(g[i]);
    const A sig = A(1) / (A(1) + exp_for_sigmoid(-gv));
    y[i] = narrow<T>(gv * sig * A(widen(u[i])));
  }
}

template <typename T>
LLMCORE_INLINE void bwd_segment(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t len) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const A gv = widen(g[i]), uv = widen(u[i]), d = widen(dy[i]);
    const A sig = A(1) / (A(1) + exp_for_sigmoid(-gv));
    dg[i] = narrow<T>(d * uv * sig * (A(1) + gv * (A(1) - sig)));
    du[i] = narrow<T>(d * (gv * sig));
  }
}

// Strided rows are walked in chunks that prefetch the same chunk of the next row (swiglu_segment).
constexpr int64_t kChunk = 256;
LLMCORE_INLINE void prefetch_span(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, 0, 3);
}

// Flat elements [begin, end) of the (rows, n) space, walked as row segments. Plain loops, no
// lambdas, so everything inlines into each ISA clone of the entry points below.
template <typename T>
LLMCORE_INLINE void fwd_range(const SwigluParams& p, int64_t begin, int64_t end) {
  const T* g = static_cast<const T*>(p.gate);
  const T* u = static_cast<const T*>(p.up);
  T* y = static_cast<T*>(p.y);
  for (int64_t i = begin; i < end;) {
    const SwigluSegment s = swiglu_segment(p, i, end);
    const int64_t step = s.prefetch_next ? kChunk : s.len;
    for (int64_t j = 0; j < s.len; j += step) {
      const int64_t l = s.len - j < step ? s.len - j : step;
      if (s.prefetch_next) {
        prefetch_span(g + s.gate_next + j, l * int64_t(sizeof(T)));
        prefetch_span(u + s.up_next + j, l * int64_t(sizeof(T)));
      }
      fwd_segment<T>(g + s.gate + j, u + s.up + j, y + s.out + j, l);
    }
    i += s.len;
  }
}

template <typename T>
LLMCORE_INLINE void bwd_range(const SwigluParams& p, int64_t begin, int64_t end) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* g = static_cast<const T*>(p.gate);
  const T* u = static_cast<const T*>(p.up);
  T* dg = static_cast<T*>(p.dgate);
  T* du = static_cast<T*>(p.dup);
  for (int64_t i = begin; i < end;) {
    const SwigluSegment s = swiglu_segment(p, i, end);
    const int64_t step = s.prefetch_next ? kChunk : s.len;
    for (int64_t j = 0; j < s.len; j += step) {
      const int64_t l = s.len - j < step ? s.len - j : step;
      if (s.prefetch_next) {
        prefetch_span(g + s.gate_next + j, l * int64_t(sizeof(T)));
        prefetch_span(u + s.up_next + j, l * int64_t(sizeof(T)));
      }
      bwd_segment<T>(dy + s.out + j, g + s.gate + j, u + s.up + j, dg + s.dgate + j, du + s.dup + j, l);
    }
    i += s.len;
  }
}

}  // namespace

LLMCORE_CPU_MULTIVERSION
void swiglu_fwd_cpu(const SwigluParams& p, int64_t begin, int64_t end) {
  if (p.dtype == DType::BFloat16 && cpu_has_avx512bf16()) return swiglu_fwd_cpu_avx512bf16(p, begin, end);
  LLMCORE_CPU_DISPATCH(p.dtype, fwd_range, (p, begin, end))
}

LLMCORE_CPU_MULTIVERSION
void swiglu_bwd_cpu(const SwigluParams& p, int64_t begin, int64_t end) {
  if (p.dtype == DType::BFloat16 && cpu_has_avx512bf16()) return swiglu_bwd_cpu_avx512bf16(p, begin, end);
  LLMCORE_CPU_DISPATCH(p.dtype, bwd_range, (p, begin, end))
}

}  // namespace llmcore
