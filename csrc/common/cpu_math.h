// cpu_math.h — vectorizable transcendental helpers for the torch-free CPU kernels.
//
// GCC does not vectorize std::exp without -ffast-math (it stays a libm call per element), so loops
// that need exp use exp_f32 below: plain arithmetic, selects and bit casts that `omp simd`
// vectorizes inside every ISA clone (common/cpu_utils.h).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_utils.h"

namespace llmcore {

// e^x in fp32, max relative error about 2 ulp on [-87, 88]. Cody-Waite range reduction
// x = n*ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial for e^r (truncation < 6e-9), times 2^n
// built in the exponent bits. Edges: x > 88 -> +inf (the true value overflows past 88.72; the
// (88, 88.72] sliver returns inf instead of a number near FLT_MAX); x < -87 -> 0 (denormal results
// flushed); NaN -> NaN; +inf -> inf; -inf -> 0.
LLMCORE_INLINE float exp_f32(float x) {
  const float xc = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);  // NaN passes through, fixed below
  const float nf = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest int
  const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;          // ln2 = hi + lo
  float poly = 1.f / 5040.f;
  poly = poly * r + 1.f / 720.f;
  poly = poly * r + 1.f / 120.f;
  poly = poly * r + 1.f / 24.f;
  poly = poly * r + 1.f / 6.f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.f;
  poly = poly * r + 1.f;
  const int32_t n = static_cast<int32_t>(nf == nf ? nf : 0.f);
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  float res = poly * scale;
  res = x > 88.f ? INFINITY : res;
  res = x < -87.f ? 0.f : res;
  return x != x ? x : res;
}

LLMCORE_INLINE double exp_f32(double x) { return std::exp(x); }  // float64 path (gradcheck)

}  // namespace llmcore
