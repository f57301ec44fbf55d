// nf4_cuda.cu — CUDA kernels for NF4 quantize / double quant / dequantize (math in nf4.h).
//
// Dequantize (the hot one; one launch, double quant included):
//   A "chunk" is 8 consecutive values = 4 packed bytes. Thread t of CTA c handles chunks
//   c * 1024 + u * 256 + t for u = 0..3 (all 4 loads issued before any math, for memory-level
//   parallelism); a warp therefore reads 128 contiguous bytes and writes 32 contiguous 16-byte
//   vectors (bf16/fp16) per step: fully coalesced. blocksize >= 32 is a power of two, so a chunk
//   never straddles two quant blocks: each thread computes its chunk's scale itself,
//     a = double quant ? fl(fl(code2[qabsmax[blk]] * absmax2[blk >> 8]) + offset) : absmax[blk]
//   from L1-resident loads (adjacent threads share blocks). The NF4 table lives in shared memory
//   (16 floats in 16 banks: no conflicts). The n % 8 trailing values are written by thread 0 of
//   CTA 0. Requires packed 4-byte and out 16-byte alignment (checked here, ensured by ATen layer).
// Quantize: one warp per quant block (max |w| by warp reduction, then each lane packs bytes);
//   double quant: one warp per 256 first-level scales, 255 code2 midpoints in shared memory.
//   Both follow bitsandbytes' CPU rules exactly (see nf4_cpu.cpp), so a weight quantizes to the same
//   bytes on either device (up to torch's mean(absmax), which the ATen layer computes per device),
//   non-finite weights included (a NaN block: absmax NaN, codes 15; the 8-bit step maps NaN to 0,
//   which fmaxf/fminf and __float2int_rz(NaN) = 0 already give).
// Numerics: fp32. Every product/sum that bitsandbytes rounds separately uses __fmul_rn/__fadd_rn so
//   nvcc cannot contract it into an FMA; divisions are __fdiv_rn (IEEE).
#include "common/cuda_utils.cuh"
#include "nf4/nf4.h"

namespace llmcore {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

__constant__ float c_nf4[16] = LLMCORE_NF4_CODE;

struct Nf4MidsArg {
  float m[15];
};

template <bool DQ>
__device__ __forceinline__ float block_scale(const Nf4DequantParams& p, int64_t blk) {
  if constexpr (DQ) {
    const float c = __ldg(p.code2 + __ldg(p.qabsmax + blk));
    return __fadd_rn(__fmul_rn(c, __ldg(p.absmax2 + (blk >> 8))), __ldg(p.offset));
  } else {
    return __ldg(p.absmax + blk);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* out, const float* v);

template <>
__device__ __forceinline__ void store8<float>(float* out, const float* v) {
  reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <>
__device__ __forceinline__ void store8<__nv_bfloat16>(__nv_bfloat16* out, const float* v) {
  uint4 r;
  __nv_bfloat162 h[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
  memcpy(&r, h, 16);
  *reinterpret_cast<uint4*>(out) = r;
}

template <>
__device__ __forceinline__ void store8<__half>(__half* out, const float* v) {
  uint4 r;
  __half2 h[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) h[k] = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
  memcpy(&r, h, 16);
  *reinterpret_cast<uint4*>(out) = r;
}

// p.packed: (ceil(n/2),) uint8; p.out: (n,) T. nchunks = n / 8 whole chunks; log2_bs = log2(blocksize).
template <typename T, bool DQ>
__global__ void __launch_bounds__(kThreads) nf4_dequant_kernel(const Nf4DequantParams p, int64_t nchunks,
                                                               int log2_bs) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = c_nf4[threadIdx.x];
  __syncthreads();
  const uint32_t* packed32 = reinterpret_cast<const uint32_t*>(p.packed);
  T* out = static_cast<T*>(p.out);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * kUnroll) + threadIdx.x;
  uint32_t word[kUnroll];
  float scale[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t c = base + u * kThreads;
    word[u] = 0;
    scale[u] = 0.f;
    if (c < nchunks) {
      word[u] = __ldg(packed32 + c);
      scale[u] = block_scale<DQ>(p, (c * 8) >> log2_bs);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t c = base + u * kThreads;
    if (c < nchunks) {
      float v[8];
#pragma unroll
      for (int k = 0; k < 4; ++k) {  // byte k holds values 2k (high nibble) and 2k+1 (low nibble)
        const uint32_t byte = (word[u] >> (8 * k)) & 0xFFu;
        v[2 * k] = lut[byte >> 4] * scale[u];
        v[2 * k + 1] = lut[byte & 15u] * scale[u];
      }
      store8<T>(out + c * 8, v);
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    for (int64_t i = nchunks * 8; i < p.n; ++i) {
      const uint8_t byte = p.packed[i >> 1];
      const uint32_t q = (i & 1) ? (byte & 15u) : (byte >> 4);
      out[i] = from_f32<T>(lut[q] * block_scale<DQ>(p, i >> log2_bs));
    }
  }
}

__device__ __forceinline__ uint32_t nf4_index(float x, const Nf4MidsArg& mids) {
  uint32_t q = 0;
#pragma unroll
  for (int k = 0; k < 15; ++k) q += x <= mids.m[k] ? 0u : 1u;  // a NaN counts above all: code 15
  return q;
}

// One warp per quant block. w: (n,) T; packed: (ceil(n/2),); absmax: (nblocks,).
template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_quantize_kernel(const Nf4QuantizeParams p, int64_t nblocks,
                                                                const Nf4MidsArg mids, float tiny) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (b >= nblocks) return;  // whole warps exit together
  const int lane = threadIdx.x & 31;
  const T* w = static_cast<const T*>(p.w);
  const int64_t i0 = b * p.blocksize;
  const int64_t len = min(p.blocksize, p.n - i0);
  float am = 0.f;
  bool nan = false;
  for (int64_t k = lane; k < len; k += 32) {
    const float a = fabsf(to_f32(w[i0 + k]));
    am = fmaxf(am, a);
    nan |= isnan(a);
  }
  am = warp_max(am);
  // fmaxf drops NaN; bitsandbytes (torch's max) keeps it: a NaN weight makes the block's absmax NaN
  if (__any_sync(0xffffffffu, nan)) am = __int_as_float(0x7fc00000);
  const float den = isnan(am) ? am : fmaxf(am, tiny);
  const bool partial = len < p.blocksize;
  if (lane == 0) p.absmax[b] = partial ? den : am;
  const float inv = __fdiv_rn(1.0f, den);
  const int64_t nbytes = (len + 1) / 2;
  for (int64_t j = lane; j < nbytes; j += 32) {
    uint32_t q[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t k = 2 * j + h;
      float x = 0.f;  // the pad value of an odd tail
      if (k < len) {
        const float v = to_f32(w[i0 + k]);
        x = partial ? __fdiv_rn(v, den) : __fmul_rn(v, inv);
        x = isnan(x) ? x : fminf(fmaxf(x, -1.0f), 1.0f);  // fminf/fmaxf would turn a NaN into -1
      }
      q[h] = nf4_index(x, mids);
    }
    p.packed[i0 / 2 + j] = static_cast<uint8_t>((q[0] << 4) | q[1]);
  }
}

// One warp per 256 first-level scales.
__global__ void __launch_bounds__(kThreads) nf4_double_quant_kernel(const Nf4DoubleQuantParams p, int64_t nblocks2) {
  __shared__ float mids[255];
  for (int k = threadIdx.x; k < 255; k += kThreads)
    mids[k] = __fmul_rn(0.5f, __fadd_rn(__ldg(p.code2 + k), __ldg(p.code2 + k + 1)));
  __syncthreads();
  const int64_t b2 = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (b2 >= nblocks2) return;
  const int lane = threadIdx.x & 31;
  const float off = __ldg(p.offset);
  const int64_t j0 = b2 * kNf4Blocksize2;
  const int64_t j1 = min(j0 + kNf4Blocksize2, p.nblocks);
  float am = 0.f;
  for (int64_t j = j0 + lane; j < j1; j += 32) am = fmaxf(am, fabsf(__fsub_rn(__ldg(p.absmax + j), off)));
  am = warp_max(am);
  if (lane == 0) p.absmax2[b2] = am;
  const float inv = am == 0.f ? 0.f : __fdiv_rn(1.0f, am);
  for (int64_t j = j0 + lane; j < j1; j += 32) {
    uint8_t q = 0;
    if (am != 0.f) {
      float x = __fmul_rn(__fsub_rn(__ldg(p.absmax + j), off), inv);
      x = fminf(fmaxf(x, -1.0f), 1.0f);
      const float t = __fmul_rn(__fadd_rn(x, 1.0f), 0.5f);
      const int idx = __float2int_rz(__fmaf_rn(t, 65535.0f, 0.5f)) & 0xFFFF;
      const float val = __fsub_rn(__fdiv_rn(static_cast<float>(2 * idx), 65535.0f), 1.0f);
      int lo = 0, hi = 255;  // count of midpoints < val
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (mids[mid] < val) lo = mid + 1;
        else hi = mid;
      }
      q = static_cast<uint8_t>(lo);
    }
    p.qabsmax[j] = q;
  }
}

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return (int64_t{1} << l) == v ? l : -1;
}

}  // namespace

cudaError_t nf4_dequantize_cuda(const Nf4DequantParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  const int log2_bs = log2_exact(p.blocksize);
  if (log2_bs < 5) return cudaErrorInvalidValue;  // power of two >= 32
  if ((reinterpret_cast<uintptr_t>(p.packed) & 3u) || !is_aligned16(p.out)) return cudaErrorMisalignedAddress;
  const int64_t nchunks = p.n / 8;
  const int64_t grid = std::max<int64_t>(1, (nchunks + kThreads * kUnroll - 1) / (kThreads * kUnroll));
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const bool dq = p.qabsmax != nullptr;
  return dispatch_cuda_float(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    if (dq) nf4_dequant_kernel<T, true><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, nchunks, log2_bs);
    else nf4_dequant_kernel<T, false><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, nchunks, log2_bs);
    return cudaGetLastError();
  });
}

cudaError_t nf4_quantize_cuda(const Nf4QuantizeParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.blocksize < 2 || (p.blocksize & 1)) return cudaErrorInvalidValue;
  const float code[16] = LLMCORE_NF4_CODE;
  Nf4MidsArg mids;
  for (int k = 0; k < 15; ++k) mids.m[k] = (code[k] + code[k + 1]) * 0.5f;
  const uint32_t tiny_bits = 0x006CE3EEu;  // 1e-38 as float32 (subnormal): bnb's absmax clamp
  float tiny;
  memcpy(&tiny, &tiny_bits, 4);
  const int64_t nblocks = (p.n + p.blocksize - 1) / p.blocksize;
  const int64_t grid = (nblocks + kThreads / 32 - 1) / (kThreads / 32);
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_cuda_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    nf4_quantize_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, nblocks, mids, tiny);
    return cudaGetLastError();
  });
}

cudaError_t nf4_double_quant_cuda(const Nf4DoubleQuantParams& p, cudaStream_t stream) {
  if (p.nblocks == 0) return cudaSuccess;
  const int64_t nblocks2 = (p.nblocks + kNf4Blocksize2 - 1) / kNf4Blocksize2;
  const int64_t grid = (nblocks2 + kThreads / 32 - 1) / (kThreads / 32);
  nf4_double_quant_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, nblocks2);
  return cudaGetLastError();
}

}  // namespace llmcore
