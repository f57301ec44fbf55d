// cpu_math.h — vectorizable transcendental helpers for the torch-free CPU kernels.
//
// GCC does not vectorize std::exp without -ffast-math (it stays a libm call per element), so loops
// that need exp use the helpers below: plain arithmetic, selects and bit casts that `omp simd`
// vectorizes inside every ISA clone (common/cpu_utils.h). (flash attention has its own base-2
// exp2v on GCC vector types in ops/flash_attn/flash_attn_cpu_tile.h.)
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_utils.h"

namespace llmcore {

// e^x for uses that only add it to 1 (sigmoid, silu): 1 / (1 + exp_for_sigmoid(-x)).
// About 14 vector ops (a general exp with every edge handled took 22): degree-6 Taylor (truncation
// < 1.2e-7 relative on |r| <= ln2/2), the integer part taken from the bits of the rounding sum (no
// float->int conversion), and no edge selects. Edges come out right for sigmoid without them:
// x is clamped to [-87, 89], so x > 88.72 gives 2^128 = +inf (sigmoid -> 0, silu(-inf) -> NaN as
// in PyTorch) and x < -87 gives e^-87 ~ 1.6e-38 instead of a smaller number (1 + it == 1 exactly);
// NaN propagates through the polynomial.
LLMCORE_INLINE float exp_for_sigmoid(float x) {
  const float xc = x < -87.f ? -87.f : (x > 89.f ? 89.f : x);  // NaN passes through
  const float t = xc * 1.44269504088896341f + 12582912.f;       // 1.5 * 2^23: round(x / ln2) in the low bits
  const float nf = t - 12582912.f;
  const float r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;  // ln2 = hi + lo
  float poly = 1.f / 720.f;
  poly = poly * r + 1.f / 120.f;
  poly = poly * r + 1.f / 24.f;
  poly = poly * r + 1.f / 6.f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.f;
  poly = poly * r + 1.f;
  const uint32_t scale_bits = (f32_to_bits(t) - 0x4B400000u + 127u) << 23;  // 2^n, n in [-126, 128]
  return poly * f32_from_bits(scale_bits);
}
LLMCORE_INLINE double exp_for_sigmoid(double x) { return std::exp(x); }

}  // namespace llmcore
