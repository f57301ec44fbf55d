// cuda_utils.cuh — helpers shared by the torch-free CUDA kernels (csrc/ops/*/*_cuda.cu).
// Dtype conversion, 16-byte vector access, warp/block reductions, launch-error plumbing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtype.h"

namespace llmcore {

// ---- dtype conversion (fp32 math inside every kernel) ----
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- vector access: N elements of T in one aligned load/store (16 bytes -> ld/st.global.v4) ----
// p must be aligned to sizeof(T) * N; the caller checks alignment on the host (is_aligned16).
template <typename T, int N>
struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ VecN<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const VecN<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const VecN<T, N>& v) {
  *reinterpret_cast<VecN<T, N>*>(p) = v;
}

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- reductions ----
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the threads of one block row (threadIdx.x = 0..blockDim.x-1, blockDim.x a multiple of
// 32, at most 1024). `scratch` holds 32 floats per block row. Every thread gets the total.
__device__ __forceinline__ float block_row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();  // scratch may be reused right after
  return v;
}

// Maps a DType tag to the CUDA storage type and calls f(T{}). Float64 is not a CUDA kernel type.
template <typename F>
inline cudaError_t dispatch_cuda_float(DType t, F&& f) {
  switch (t) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

inline int num_sms() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n > 0 ? n : 1;
}

}  // namespace llmcore
