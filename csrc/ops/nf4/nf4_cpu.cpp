// nf4_cpu.cpp — CPU kernels for NF4 quantize / double quant / dequantize (math in nf4.h).
//
// Work unit: one quant block (blocksize values, blocksize even so every block starts on a byte).
// Quantize: absmax over the block, then each value's code is the count of NF4 midpoints below it
//   (15 compares, vectorized); pairs are packed high nibble first. The rule mirrors bitsandbytes'
//   CPU path bit for bit: full blocks multiply by fl(1 / max(absmax, 1e-38)), the trailing partial
//   block divides by max(absmax, 1e-38) and stores that clamped value (torch's code does so).
// Double quant: mirrors bitsandbytes' CPU 8-bit blockwise quantizer (a 65536-entry LUT over
//   [-1, 1]): i = trunc(fma((clamp(x / a2) + 1) / 2, 65535, 0.5)), value_i = -1 + 2i / 65535, code
//   = #{midpoints of code2 < value_i}, found here by binary search instead of the table.
// Dequantize: per block, a 16-entry table t[k] = (dtype) fl(NF4[k] * a_b) is built once (16
//   multiplies instead of blocksize), then every byte writes two table entries. Each output is
//   bit-identical to rounding fl(NF4[k] * a_b) itself. 16-bit outputs are written as one 32-bit word
//   per input byte (first value in the low half: little endian).
// Numerics: all fp32; products that bitsandbytes rounds separately are kept unfused (no FMA
//   contraction: see unfused_mul).
#include <algorithm>
#include <cmath>

#include "common/cpu_utils.h"
#include "nf4/nf4.h"

namespace llmcore {
namespace {

constexpr float kNf4Code[16] = LLMCORE_NF4_CODE;

// 1e-38 as float32 (a subnormal), the clamp bitsandbytes/torch apply to absmax: bits 0x006CE3EE.
LLMCORE_INLINE float tiny_absmax() {
  const uint32_t bits = 0x006CE3EEu;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// a * b rounded to fp32 and kept as such: the empty asm makes the product opaque, so the compiler
// cannot fuse it with a following add into an FMA (GNU mode enables -ffp-contract=fast).
LLMCORE_INLINE float unfused_mul(float a, float b) {
  float p = a * b;
#if defined(__x86_64__) && defined(__GNUC__)
  asm("" : "+x"(p));
#else
  volatile float v = p;
  p = v;
#endif
  return p;
}

struct Nf4Mids {
  float m[16];  // 15 midpoints fl((c_k + c_{k+1}) / 2), padded with +inf
  Nf4Mids() {
    for (int k = 0; k < 15; ++k) m[k] = (kNf4Code[k] + kNf4Code[k + 1]) * 0.5f;
    m[15] = INFINITY;
  }
};

template <typename T>
LLMCORE_INLINE void quantize_block(const Nf4QuantizeParams& p, int64_t b, const float* mids) {
  const T* w = static_cast<const T*>(p.w);
  const int64_t i0 = b * p.blocksize, i1 = std::min(i0 + p.blocksize, p.n), len = i1 - i0;
  float am = 0.f;
#pragma omp simd reduction(max : am)
  for (int64_t i = i0; i < i1; ++i) am = std::max(am, std::fabs(widen(w[i])));
  const float den = std::max(am, tiny_absmax());
  const bool partial = len < p.blocksize;
  p.absmax[b] = partial ? den : am;
  const float inv = 1.0f / den;
  uint8_t codes[4096 + 1];
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const float v = widen(w[i0 + k]);
    float x = partial ? v / den : v * inv;
    x = std::min(std::max(x, -1.0f), 1.0f);
    int q = 0;
    for (int j = 0; j < 15; ++j) q += x > mids[j] ? 1 : 0;
    codes[k] = static_cast<uint8_t>(q);
  }
  if ((len & 1) && len < 4096) codes[len] = 7;  // the pad value 0.0 quantizes to code 7 (odd len < 4096)
  uint8_t* out = p.packed + i0 / 2;
  const int64_t nbytes = (len + 1) / 2;
#pragma omp simd
  for (int64_t j = 0; j < nbytes; ++j) out[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
}

template <typename T>
LLMCORE_INLINE void quantize_blocks(const Nf4QuantizeParams& p, int64_t b0, int64_t b1) {
  const Nf4Mids mids;
  for (int64_t b = b0; b < b1; ++b) quantize_block<T>(p, b, mids.m);
}

// Dequantize blocks [b0, b1) into T outputs; S is the unsigned storage word of T.
template <typename T, typename S>
LLMCORE_INLINE void dequant_blocks(const Nf4DequantParams& p, int64_t b0, int64_t b1) {
  static_assert(sizeof(S) == sizeof(T), "storage word");
  S* out = static_cast<S*>(p.out);
  for (int64_t b = b0; b < b1; ++b) {
    float a;
    if (p.qabsmax) a = unfused_mul(p.code2[p.qabsmax[b]], p.absmax2[b / kNf4Blocksize2]) + p.offset[0];
    else a = p.absmax[b];
    S t[16];
    for (int k = 0; k < 16; ++k) {
      const T v = narrow<T>(kNf4Code[k] * a);
      std::memcpy(&t[k], &v, sizeof(S));
    }
    const int64_t i0 = b * p.blocksize, i1 = std::min(i0 + p.blocksize, p.n);
    const int64_t full = (i1 - i0) / 2;  // whole bytes in this block
    const uint8_t* in = p.packed + i0 / 2;
    S* o = out + i0;
    if constexpr (sizeof(S) == 2) {
      uint32_t* o32 = reinterpret_cast<uint32_t*>(o);  // i0 is even: 4-byte aligned when out is
#pragma omp simd
      for (int64_t j = 0; j < full; ++j) {
        const uint8_t v = in[j];
        o32[j] = static_cast<uint32_t>(t[v >> 4]) | (static_cast<uint32_t>(t[v & 15]) << 16);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < full; ++j) {
        const uint8_t v = in[j];
        o[2 * j] = t[v >> 4];
        o[2 * j + 1] = t[v & 15];
      }
    }
    if ((i1 - i0) & 1) o[2 * full] = t[in[full] >> 4];  // odd tail: only the high nibble is a value
  }
}

}  // namespace

LLMCORE_CPU_MULTIVERSION
void nf4_quantize_cpu(const Nf4QuantizeParams& p, int64_t block_begin, int64_t block_end) {
  switch (p.dtype) {  // float64 is not a weight dtype here (bitsandbytes takes fp32/fp16/bf16)
    case DType::Float32: quantize_blocks<float>(p, block_begin, block_end); break;
    case DType::Float16: quantize_blocks<fp16_t>(p, block_begin, block_end); break;
    case DType::BFloat16: quantize_blocks<bf16_t>(p, block_begin, block_end); break;
    case DType::Float64: break;
  }
}

void nf4_double_quant_cpu(const Nf4DoubleQuantParams& p, int64_t block2_begin, int64_t block2_end) {
  // midpoints of the 256-entry code, as bitsandbytes' LUT builder computes them
  float mids[255];
  for (int k = 0; k < 255; ++k) mids[k] = 0.5f * (p.code2[k] + p.code2[k + 1]);
  const float off = p.offset[0];
  for (int64_t b2 = block2_begin; b2 < block2_end; ++b2) {
    const int64_t j0 = b2 * kNf4Blocksize2, j1 = std::min(j0 + kNf4Blocksize2, p.nblocks);
    float am = 0.f;
    for (int64_t j = j0; j < j1; ++j) am = std::max(am, std::fabs(p.absmax[j] - off));
    p.absmax2[b2] = am;
    if (am == 0.f) {
      for (int64_t j = j0; j < j1; ++j) p.qabsmax[j] = 0;
      continue;
    }
    const float inv = 1.0f / am;
    for (int64_t j = j0; j < j1; ++j) {
      float x = (p.absmax[j] - off) * inv;
      x = std::min(std::max(x, -1.0f), 1.0f);
      const float t = (x + 1.0f) * 0.5f;
      const int idx = static_cast<int>(std::fmaf(t, 65535.0f, 0.5f)) & 0xFFFF;
      const float val = static_cast<float>(2 * idx) / 65535.0f - 1.0f;
      // count of midpoints < val (mids ascending)
      int lo = 0, hi = 255;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (mids[mid] < val) lo = mid + 1;
        else hi = mid;
      }
      p.qabsmax[j] = static_cast<uint8_t>(lo);
    }
  }
}

LLMCORE_CPU_MULTIVERSION
void nf4_dequantize_cpu(const Nf4DequantParams& p, int64_t block_begin, int64_t block_end) {
  switch (p.out_dtype) {
    case DType::Float32: dequant_blocks<float, uint32_t>(p, block_begin, block_end); break;
    case DType::Float16: dequant_blocks<fp16_t, uint16_t>(p, block_begin, block_end); break;
    case DType::BFloat16: dequant_blocks<bf16_t, uint16_t>(p, block_begin, block_end); break;
    case DType::Float64: dequant_blocks<double, uint64_t>(p, block_begin, block_end); break;
  }
}

}  // namespace llmcore
