// cpu_utils.h — helpers for the torch-free CPU kernels (csrc/ops/*/*_cpu.cpp).
//
// Vectorization: every public CPU kernel entry point is marked LLMCORE_CPU_MULTIVERSION, which
// makes GCC/Clang emit one clone per ISA (baseline x86-64, AVX2+FMA, AVX-512) and pick one at load
// time through an ifunc resolver. The hot loops live in `static inline` templates marked
// LLMCORE_INLINE so that they are inlined into, and vectorized for, each clone.
//
// Threading is not done here: the ATen layer splits work with at::parallel_for and calls a kernel
// on a [begin, end) range, so kernels stay torch-free and reuse torch's thread pool.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LLMCORE_NO_MULTIVERSION)
// The clones are named by ISA level (x86-64-v3 = AVX2+FMA, x86-64-v4 = AVX-512 F/BW/CD/DQ/VL), not by
// CPU model: GCC's resolver tests "arch=<model>" clones with __builtin_cpu_is(<model>), so
// "arch=haswell" / "arch=skylake-avx512" were never picked on other CPUs (AMD EPYC, newer Intel)
// and every kernel ran its SSE2 default clone there.
#define LLMCORE_CPU_MULTIVERSION \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#define LLMCORE_CPU_ISA_VARIANTS "x86-64,x86-64-v3(avx2+fma),x86-64-v4(avx512)"
#else
#define LLMCORE_CPU_MULTIVERSION
#define LLMCORE_CPU_ISA_VARIANTS "native-default"
#endif

#define LLMCORE_INLINE inline __attribute__((always_inline))

namespace llmcore {

// 16-bit float storage types. Kernels template on the storage type and convert to fp32 at load.
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

// widen(): storage -> accumulation type (fp32, or fp64 for double inputs used by gradcheck).
// narrow<T>(): accumulation type -> storage, round to nearest even, NaN stays NaN.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

LLMCORE_INLINE float widen(float v) { return v; }
LLMCORE_INLINE double widen(double v) { return v; }
LLMCORE_INLINE float widen(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// fp16 <-> fp32 in integer and fp32 arithmetic (exact, round to nearest even, branch-free; after
// Maratyszcza's FP16 library) rather than _Float16 casts, which GCC lowers to a libcall per element
// (no vectorization) on every ISA below AVX512-FP16.
LLMCORE_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
LLMCORE_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
LLMCORE_INLINE float widen(fp16_t v) {
  const uint32_t w = static_cast<uint32_t>(v.bits) << 16;
  const uint32_t sign = w & 0x80000000u, two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return f32_from_bits(sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized)));
}

template <typename T> LLMCORE_INLINE T narrow(float v);
template <typename T> LLMCORE_INLINE T narrow(double v) { return narrow<T>(static_cast<float>(v)); }
template <> LLMCORE_INLINE double narrow<double>(double v) { return v; }
template <> LLMCORE_INLINE float narrow<float>(float v) { return v; }
template <> LLMCORE_INLINE double narrow<double>(float v) { return v; }
template <> LLMCORE_INLINE bf16_t narrow<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
template <> LLMCORE_INLINE fp16_t narrow<fp16_t>(float v) {
  const uint32_t w = f32_to_bits(v), shl1_w = w + w, sign = w & 0x80000000u;
  float base = (f32_from_bits(f32_to_bits(v) & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return fp16_t{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// Calls FN<T> ARGS (or FN<T, W> ARGS) for a DType tag, as a plain switch rather than a lambda so
// the templated body is inlined straight into each ISA clone of the calling entry point.
// W (a weight or parameter dtype) is either T itself or float32 next to a 16-bit T.
#define LLMCORE_CPU_DISPATCH(DT, FN, ARGS)                          \
  switch (DT) {                                                     \
    case ::llmcore::DType::Float32: FN<float> ARGS; break;          \
    case ::llmcore::DType::Float64: FN<double> ARGS; break;         \
    case ::llmcore::DType::Float16: FN<::llmcore::fp16_t> ARGS; break; \
    case ::llmcore::DType::BFloat16: FN<::llmcore::bf16_t> ARGS; break; \
  }

#define LLMCORE_CPU_DISPATCH_TW(DT, WT, FN, ARGS)                                      \
  switch (DT) {                                                                        \
    case ::llmcore::DType::Float32: FN<float, float> ARGS; break;                      \
    case ::llmcore::DType::Float64: FN<double, double> ARGS; break;                    \
    case ::llmcore::DType::Float16:                                                    \
      if ((WT) == (DT)) FN<::llmcore::fp16_t, ::llmcore::fp16_t> ARGS;                  \
      else FN<::llmcore::fp16_t, float> ARGS;                                          \
      break;                                                                           \
    case ::llmcore::DType::BFloat16:                                                   \
      if ((WT) == (DT)) FN<::llmcore::bf16_t, ::llmcore::bf16_t> ARGS;                  \
      else FN<::llmcore::bf16_t, float> ARGS;                                          \
      break;                                                                           \
  }

}  // namespace llmcore
