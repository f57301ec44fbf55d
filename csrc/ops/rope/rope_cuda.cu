// rope_cuda.cu — CUDA kernel for rope (math and layouts in rope.h). One launch rotates q and k.
//
// Work unit: NP consecutive pairs of one head of one token. Half-split: elements
// [u*NP, u*NP + NP) and the same range + D/2; interleaved: elements [2*u*NP, 2*u*NP + 2*NP).
// With the vectorized path NP = 16 / sizeof(T) (half-split: two 16-byte loads and stores per unit)
// or 8 / sizeof(T) (interleaved: one 16-byte load and store), and cos/sin come in as 16-byte fp32
// vector loads; otherwise NP = 1 with scalar accesses (odd strides, misaligned views, D/2 % 4 != 0).
//
// Grid/block: block = (TX, TY). threadIdx.y picks one of TY tokens of the block (token = b*S + s);
// threadIdx.x strides over the (Hq + Hk) * units-per-head work units of that token, q heads first.
// The token's position is read once per thread; its cos/sin row (D/2 fp32) is shared by all heads of
// the token and stays in L1, so DRAM traffic is q + k read once and written once (+ one table row
// per token). Decode (1 token) is one block.
//
// Positions outside [0, max_seq_len): a kernel cannot raise, and clamping would silently produce
// a plausible but wrong rotation, so such a token's outputs are written as NaN (its table row is
// never read: memory-safe). The ATen layer checks the offset form on the host for both devices and
// the tensor form on the host for CPU only (a device-wide min/max would synchronize).
//
// In place (q_out == q, same strides) is race-free: each element is read and written by one thread.
// Numerics: fp32 math, one rounding to T.
#include "common/cuda_utils.cuh"
#include "rope/rope.h"

namespace llmcore {
namespace {

// N elements of T at p: one vector access when VEC (p aligned to sizeof(T) * N), else scalar.
template <typename T, int N, bool VEC>
__device__ __forceinline__ void load_n(const T* p, T (&out)[N]) {
  if constexpr (VEC) {
    const VecN<T, N> v = *reinterpret_cast<const VecN<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = v.v[i];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

template <typename T, int N, bool VEC>
__device__ __forceinline__ void store_n(T* p, const T (&in)[N]) {
  if constexpr (VEC) {
    VecN<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = in[i];
    *reinterpret_cast<VecN<T, N>*>(p) = v;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = in[i];
  }
}

// N fp32 table entries at p, read-only path; 16-byte pieces when VEC (p 16-byte aligned, N % 4 == 0)
// or one 8-byte piece for N == 2.
template <int N, bool VEC>
__device__ __forceinline__ void load_table(const float* p, float (&out)[N]) {
  if constexpr (VEC && N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
      out[i] = v.x, out[i + 1] = v.y, out[i + 2] = v.z, out[i + 3] = v.w;
    }
  } else if constexpr (VEC && N == 2) {
    const float2 v = __ldg(reinterpret_cast<const float2*>(p));
    out[0] = v.x, out[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = __ldg(p + i);
  }
}

constexpr int kThreads = 256;  // TX * TY of every block (__launch_bounds__)

template <typename T, int NP, bool INTERLEAVED, bool VEC>
__global__ void __launch_bounds__(kThreads) rope_kernel(RopeParams p) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (tok >= p.B * p.S) return;
  const int64_t b = tok / p.S, s = tok - b * p.S;
  int64_t pos = s;
  if (p.positions) {
    const int64_t off = b * p.pos_sb + s * p.pos_ss;
    pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[off]
                            : static_cast<const int32_t*>(p.positions)[off];
  }
  pos += p.position_offset;
  const bool valid = pos >= 0 && pos < p.max_seq_len;
  const int h = static_cast<int>(p.D / 2);
  const int units = h / NP;
  const int hq = static_cast<int>(p.Hq);
  const int work = units * (hq + static_cast<int>(p.Hk));
  const float sign = p.inverse ? -1.f : 1.f;
  const float* crow = p.cos + (valid ? pos : 0) * h;
  const float* srow = p.sin + (valid ? pos : 0) * h;

  for (int w = threadIdx.x; w < work; w += blockDim.x) {
    const int hh = w / units, u = w - hh * units;
    const T* x;
    T* y;
    if (hh < hq) {
      x = static_cast<const T*>(p.q) + b * p.q_sb + s * p.q_ss + hh * p.q_sh;
      y = static_cast<T*>(p.q_out) + b * p.qo_sb + s * p.qo_ss + hh * p.qo_sh;
    } else {
      const int kh = hh - hq;
      x = static_cast<const T*>(p.k) + b * p.k_sb + s * p.k_ss + kh * p.k_sh;
      y = static_cast<T*>(p.k_out) + b * p.ko_sb + s * p.ko_ss + kh * p.ko_sh;
    }
    float c[NP], sn[NP];
    if (valid) {
      load_table<NP, VEC>(crow + u * NP, c);
      load_table<NP, VEC>(srow + u * NP, sn);
#pragma unroll
      for (int i = 0; i < NP; ++i) sn[i] *= sign;
    } else {
#pragma unroll
      for (int i = 0; i < NP; ++i) c[i] = sn[i] = __int_as_float(0x7fc00000);  // NaN
    }
    if constexpr (INTERLEAVED) {
      T v[2 * NP];
      load_n<T, 2 * NP, VEC>(x + 2 * u * NP, v);
#pragma unroll
      for (int i = 0; i < NP; ++i) {
        const float x1 = to_f32(v[2 * i]), x2 = to_f32(v[2 * i + 1]);
        v[2 * i] = from_f32<T>(x1 * c[i] - x2 * sn[i]);
        v[2 * i + 1] = from_f32<T>(x2 * c[i] + x1 * sn[i]);
      }
      store_n<T, 2 * NP, VEC>(y + 2 * u * NP, v);
    } else {
      T v1[NP], v2[NP];
      load_n<T, NP, VEC>(x + u * NP, v1);
      load_n<T, NP, VEC>(x + h + u * NP, v2);
#pragma unroll
      for (int i = 0; i < NP; ++i) {
        const float x1 = to_f32(v1[i]), x2 = to_f32(v2[i]);
        v1[i] = from_f32<T>(x1 * c[i] - x2 * sn[i]);
        v2[i] = from_f32<T>(x2 * c[i] + x1 * sn[i]);
      }
      store_n<T, NP, VEC>(y + u * NP, v1);
      store_n<T, NP, VEC>(y + h + u * NP, v2);
    }
  }
}

template <typename T, int NP, bool INTERLEAVED, bool VEC>
cudaError_t launch(const RopeParams& p, cudaStream_t stream) {
  const int64_t tokens = p.B * p.S;
  const int64_t work = (p.D / 2 / NP) * (p.Hq + p.Hk);
  int tx = static_cast<int>(((work + 31) / 32) * 32);
  tx = tx > kThreads ? kThreads : tx;
  const int ty = kThreads / tx;
  const int64_t grid = (tokens + ty - 1) / ty;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  rope_kernel<T, NP, INTERLEAVED, VEC><<<static_cast<unsigned>(grid), dim3(tx, ty), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const RopeParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);  // elements per 16 bytes
  const int64_t h = p.D / 2;
  // 16-byte access needs every head start (all strides) and both halves to sit on 16-byte
  // boundaries, and 16-byte aligned table rows.
  bool vec = is_aligned16(p.q) && is_aligned16(p.k) && is_aligned16(p.q_out) && is_aligned16(p.k_out) &&
             is_aligned16(p.cos) && is_aligned16(p.sin) && h % 4 == 0 && (p.interleaved ? p.D % V == 0 : h % V == 0);
  for (int64_t st : {p.q_sb, p.q_ss, p.q_sh, p.k_sb, p.k_ss, p.k_sh, p.qo_sb, p.qo_ss, p.qo_sh, p.ko_sb, p.ko_ss, p.ko_sh})
    vec = vec && st % V == 0;
  if (p.interleaved) {
    if (vec) return launch<T, V / 2, true, true>(p, stream);
    return launch<T, 1, true, false>(p, stream);
  }
  if (vec) return launch<T, V, false, true>(p, stream);
  return launch<T, 1, false, false>(p, stream);
}

}  // namespace

cudaError_t rope_cuda(const RopeParams& p, cudaStream_t stream) {
  if (p.B * p.S == 0 || p.Hq + p.Hk == 0 || p.D == 0) return cudaSuccess;
  return dispatch_cuda_float(p.dtype, [&](auto t) { return launch_typed<decltype(t)>(p, stream); });
}

}  // namespace llmcore
