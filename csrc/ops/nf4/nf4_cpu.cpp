// nf4_cpu.cpp — CPU kernels for NF4 quantize / double quant / dequantize (math in nf4.h).
//
// Work unit: one quant block (blocksize values, blocksize even so every block starts on a byte).
// Quantize: absmax over the block, then each value's code is the count of NF4 midpoints below it
//   (15 compares, vectorized); pairs are packed high nibble first. The rule mirrors bitsandbytes'
//   CPU path bit for bit: full blocks multiply by fl(1 / max(absmax, 1e-38)), the trailing partial
//   block divides by max(absmax, 1e-38) and stores that clamped value (torch's code does so).
// Double quant: mirrors bitsandbytes' CPU 8-bit blockwise quantizer (a 65536-entry LUT over
//   [-1, 1]): i = trunc(fma((clamp(x * fl(1 / a2)) + 1) / 2, 65535, 0.5)), value_i = -1 + 2i/65535,
//   code = #{midpoints of code2 < value_i}, found here by binary search instead of the table.
// Dequantize: per block, a 16-entry table t[k] = (dtype) fl(NF4[k] * a_b) is built once (16
//   multiplies instead of blocksize; each output is still bit-identical to rounding its own
//   product). The table is split into sizeof(dtype) byte tables of 16 entries, so a 16-entry byte
//   shuffle (pshufb) looks up one byte of 16 values at once: 16 packed bytes -> nibbles in value
//   order (high nibble first) -> 2 or 4 shuffles per 16 values -> byte interleaves -> 64 (bf16/fp16)
//   or 128 (fp32) bytes of output. Partial-block tails (and float64) use the scalar table loop.
//   About 16 GB/s from one core, i.e. the store bandwidth (bench/RESULTS.md).
// Numerics: all fp32; products that bitsandbytes rounds separately are kept unfused (no FMA
//   contraction: see unfused_mul). Non-finite weights follow bitsandbytes too: a NaN makes the
//   block's absmax NaN (torch's max) and every code 15 (bucketize puts NaN last); an inf makes
//   absmax inf, so the inf scales to NaN (code 15, dequantized +inf) and the rest to 0 (code 7,
//   dequantized 0 * inf = NaN). The 8-bit step ignores NaN in its max and maps NaN to index 0.
#include <cmath>
#include <limits>
#include <type_traits>

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

// Local min/max: std::min/std::max are not inlined into the target_clones entry points (they would
// be out-of-line calls in the hot loops).
LLMCORE_INLINE float fmin2(float a, float b) { return b < a ? b : a; }
LLMCORE_INLINE float fmax2(float a, float b) { return a < b ? b : a; }
LLMCORE_INLINE int64_t imin2(int64_t a, int64_t b) { return b < a ? b : a; }

// float -> fp16 bits, round to nearest even, overflow to inf, NaN kept, subnormals exact: the
// branch-free integer/fp32 formulation of the FP16 library (Maratyszcza). Unlike a _Float16 cast,
// which is a libgcc call on clones without AVX512-FP16 (17x slower for the fp16 table build here),
// it vectorizes. Both scalings are exact (powers of two; the first may overflow to inf on purpose),
// so an FMA contraction of the final add cannot change the result.
LLMCORE_INLINE uint16_t fp32_to_fp16_bits(float f) {
  const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  uint32_t w;
  std::memcpy(&w, &f, 4);
  const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  float bias_f;
  const uint32_t bias_bits = (bias >> 1) + 0x07800000u;
  std::memcpy(&bias_f, &bias_bits, 4);
  base = bias_f + base;
  uint32_t bits;
  std::memcpy(&bits, &base, 4);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
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
  const int64_t i0 = b * p.blocksize, i1 = imin2(i0 + p.blocksize, p.n), len = i1 - i0;
  float am = 0.f;
  int nan = 0;
#pragma omp simd reduction(max : am) reduction(| : nan)
  for (int64_t i = i0; i < i1; ++i) {
    const float a = std::fabs(widen(w[i]));
    am = fmax2(am, a);
    nan |= a != a;
  }
  if (nan) am = std::numeric_limits<float>::quiet_NaN();  // torch's max, as bitsandbytes: NaN wins
  const float den = fmax2(am, tiny_absmax());  // keeps a NaN (the comparison is false)
  const bool partial = len < p.blocksize;
  p.absmax[b] = partial ? den : am;
  const float inv = 1.0f / den;
  uint8_t codes[4096 + 1];
  if (am <= std::numeric_limits<float>::max()) {  // finite block (the common case): no x is NaN
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      const float v = widen(w[i0 + k]);
      float x = partial ? v / den : v * inv;
      x = fmin2(fmax2(x, -1.0f), 1.0f);
      int q = 0;
      for (int j = 0; j < 15; ++j) q += x > mids[j] ? 1 : 0;
      codes[k] = static_cast<uint8_t>(q);
    }
  } else {  // absmax NaN or inf: x is NaN for every value (NaN block) or for the infs (0 elsewhere)
    for (int64_t k = 0; k < len; ++k) {
      const float v = widen(w[i0 + k]);
      float x = partial ? v / den : v * inv;
      x = fmin2(fmax2(x, -1.0f), 1.0f);  // keeps a NaN
      int q = 0;  // torch.bucketize: the count of midpoints < x; a NaN compares above them all -> 15
      for (int j = 0; j < 15; ++j) q += x <= mids[j] ? 0 : 1;
      codes[k] = static_cast<uint8_t>(q);
    }
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

// ---- dequantize ----
// 16-byte vectors (GCC vector extensions, so every ISA clone compiles them: SSSE3+ clones turn the
// variable byte shuffles into pshufb and the constant two-input ones into punpck*).
typedef uint8_t u8x16 __attribute__((vector_size(16)));

#define LLMCORE_ILV_LO {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23}
#define LLMCORE_ILV_HI {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31}

// 16 packed bytes (32 values) -> 32 outputs of W bytes each, via W 16-entry byte tables: byte k of
// value v is tab[k][code(v)]. Nibble indices are first put in value order (high nibble first).
template <int W>
LLMCORE_INLINE void dequant_16_bytes(const uint8_t* in, const u8x16* tab, uint8_t* out) {
  const u8x16 ilv_lo = LLMCORE_ILV_LO, ilv_hi = LLMCORE_ILV_HI;
  u8x16 v;
  std::memcpy(&v, in, 16);
  const u8x16 hi = v >> 4, lo = v & 15;
  const u8x16 idx[2] = {__builtin_shuffle(hi, lo, ilv_lo), __builtin_shuffle(hi, lo, ilv_hi)};
  for (int h = 0; h < 2; ++h) {  // values 16h .. 16h+15
    if constexpr (W == 2) {
      const u8x16 b0 = __builtin_shuffle(tab[0], idx[h]), b1 = __builtin_shuffle(tab[1], idx[h]);
      const u8x16 o0 = __builtin_shuffle(b0, b1, ilv_lo), o1 = __builtin_shuffle(b0, b1, ilv_hi);
      std::memcpy(out + 32 * h, &o0, 16);
      std::memcpy(out + 32 * h + 16, &o1, 16);
    } else {
      const u8x16 w16_lo = {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23};
      const u8x16 w16_hi = {8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31};
      const u8x16 b0 = __builtin_shuffle(tab[0], idx[h]), b1 = __builtin_shuffle(tab[1], idx[h]);
      const u8x16 b2 = __builtin_shuffle(tab[2], idx[h]), b3 = __builtin_shuffle(tab[3], idx[h]);
      const u8x16 l_a = __builtin_shuffle(b0, b1, ilv_lo), l_b = __builtin_shuffle(b0, b1, ilv_hi);
      const u8x16 h_a = __builtin_shuffle(b2, b3, ilv_lo), h_b = __builtin_shuffle(b2, b3, ilv_hi);
      const u8x16 o0 = __builtin_shuffle(l_a, h_a, w16_lo), o1 = __builtin_shuffle(l_a, h_a, w16_hi);
      const u8x16 o2 = __builtin_shuffle(l_b, h_b, w16_lo), o3 = __builtin_shuffle(l_b, h_b, w16_hi);
      std::memcpy(out + 64 * h, &o0, 16);
      std::memcpy(out + 64 * h + 16, &o1, 16);
      std::memcpy(out + 64 * h + 32, &o2, 16);
      std::memcpy(out + 64 * h + 48, &o3, 16);
    }
  }
}

LLMCORE_INLINE float block_scale(const Nf4DequantParams& p, int64_t b) {
  if (p.qabsmax) return unfused_mul(p.code2[p.qabsmax[b]], p.absmax2[b / kNf4Blocksize2]) + p.offset[0];
  return p.absmax[b];
}

// Dequantize blocks [b0, b1) into T outputs (T of 2 or 4 bytes: the byte-table path; 8: scalar).
template <typename T>
LLMCORE_INLINE void dequant_blocks(const Nf4DequantParams& p, int64_t b0, int64_t b1) {
  constexpr int W = sizeof(T);
  T* out = static_cast<T*>(p.out);
  for (int64_t b = b0; b < b1; ++b) {
    const float a = block_scale(p, b);
    alignas(64) T t[16];
    if constexpr (std::is_same<T, fp16_t>::value) {
      alignas(64) uint16_t h[16];
#pragma omp simd
      for (int k = 0; k < 16; ++k) h[k] = fp32_to_fp16_bits(kNf4Code[k] * a);  // == rounding each product
      std::memcpy(t, h, sizeof(h));
    } else {
#pragma omp simd
      for (int k = 0; k < 16; ++k) t[k] = narrow<T>(kNf4Code[k] * a);  // == rounding each product itself
    }
    const int64_t i0 = b * p.blocksize, len = imin2(i0 + p.blocksize, p.n) - i0;
    const uint8_t* in = p.packed + i0 / 2;
    T* o = out + i0;
    int64_t j = 0;  // bytes done
    if constexpr (W == 2 || W == 4) {
      using Word = typename std::conditional<W == 2, uint16_t, uint32_t>::type;
      alignas(64) Word words[16];
      std::memcpy(words, t, sizeof(words));
      alignas(16) uint8_t bytes[W][16];  // bytes[c][k]: byte c of table entry k
      for (int c = 0; c < W; ++c) {
#pragma omp simd
        for (int k = 0; k < 16; ++k) bytes[c][k] = static_cast<uint8_t>(words[k] >> (8 * c));
      }
      u8x16 tab[W];
      std::memcpy(tab, bytes, sizeof(tab));
      for (; j + 16 <= len / 2; j += 16) dequant_16_bytes<W>(in + j, tab, reinterpret_cast<uint8_t*>(o + 2 * j));
    }
    for (; j < len / 2; ++j) {
      o[2 * j] = t[in[j] >> 4];
      o[2 * j + 1] = t[in[j] & 15];
    }
    if (len & 1) o[2 * j] = t[in[j] >> 4];  // odd tail: only the high nibble is a value
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
    const int64_t j0 = b2 * kNf4Blocksize2, j1 = imin2(j0 + kNf4Blocksize2, p.nblocks);
    float am = 0.f;
    for (int64_t j = j0; j < j1; ++j) am = fmax2(am, std::fabs(p.absmax[j] - off));
    p.absmax2[b2] = am;
    if (am == 0.f) {
      for (int64_t j = j0; j < j1; ++j) p.qabsmax[j] = 0;
      continue;
    }
    const float inv = 1.0f / am;
    for (int64_t j = j0; j < j1; ++j) {
      float x = (p.absmax[j] - off) * inv;
      x = fmin2(fmax2(x, -1.0f), 1.0f);
      const float t = (x + 1.0f) * 0.5f;
      // a NaN (from a NaN or inf first-level scale) takes index 0, as bitsandbytes' CPU code does
      const int idx = t == t ? static_cast<int>(std::fmaf(t, 65535.0f, 0.5f)) & 0xFFFF : 0;
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
    case DType::Float32: dequant_blocks<float>(p, block_begin, block_end); break;
    case DType::Float16: dequant_blocks<fp16_t>(p, block_begin, block_end); break;
    case DType::BFloat16: dequant_blocks<bf16_t>(p, block_begin, block_end); break;
    case DType::Float64: dequant_blocks<double>(p, block_begin, block_end); break;
  }
}

}  // namespace llmcore
