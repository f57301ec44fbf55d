// swiglu_cuda.cu — CUDA kernels for swiglu / swiglu_packed (math in swiglu.h).
//
// Elementwise over the (rows, n) index space split into vectors of V elements: V = 16 / sizeof(T)
// (one 16-byte ld/st per operand) when n, every row stride and every pointer allow it, else V = 1.
// One thread per vector (grid-stride loop past 2^31 - 1 blocks' worth); contiguous inputs come in
// as one row (rows == 1), so the row/column split costs a division only for strided (packed) rows.
// Forward reads g, u and writes y; backward reads dy, g, u and writes dg, du: the minimum traffic.
// Numerics: fp32 math; sig = 1 / (1 + expf(-g)) is safe at any magnitude (expf overflow -> inf ->
// sig = 0, silu = -0); inf/-inf/NaN follow F.silu(g) * u and PyTorch's silu_backward expression.
#include "common/cuda_utils.cuh"
#include "swiglu/swiglu.h"

namespace llmcore {
namespace {

// Every launch: one block = kThreads vectors. __launch_bounds__(kThreads, 1): with the bound alone
// ptxas aims at full occupancy (32 registers) and spilled the fp32 scalar backward; a minimum of
// one resident block leaves it the same freedom it had without a bound.
constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid_f32(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 1) swiglu_fwd_kernel(SwigluParams p) {
  const int64_t nvec = p.n / V, total = p.rows * nvec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = p.rows == 1 ? 0 : idx / nvec, c = (idx - r * nvec) * V;
    const VecN<T, V> g = load_vec<T, V>(static_cast<const T*>(p.gate) + r * p.gate_rs + c);
    const VecN<T, V> u = load_vec<T, V>(static_cast<const T*>(p.up) + r * p.up_rs + c);
    VecN<T, V> y;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float gv = to_f32(g.v[i]);
      y.v[i] = from_f32<T>(gv * sigmoid_f32(gv) * to_f32(u.v[i]));
    }
    store_vec<T, V>(static_cast<T*>(p.y) + r * p.n + c, y);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 1) swiglu_bwd_kernel(SwigluParams p) {
  const int64_t nvec = p.n / V, total = p.rows * nvec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = p.rows == 1 ? 0 : idx / nvec, c = (idx - r * nvec) * V;
    const VecN<T, V> d = load_vec<T, V>(static_cast<const T*>(p.dy) + r * p.n + c);
    const VecN<T, V> g = load_vec<T, V>(static_cast<const T*>(p.gate) + r * p.gate_rs + c);
    const VecN<T, V> u = load_vec<T, V>(static_cast<const T*>(p.up) + r * p.up_rs + c);
    VecN<T, V> dg, du;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float gv = to_f32(g.v[i]), uv = to_f32(u.v[i]), dv = to_f32(d.v[i]);
      const float sig = sigmoid_f32(gv);
      dg.v[i] = from_f32<T>(dv * uv * sig * (1.f + gv * (1.f - sig)));
      du.v[i] = from_f32<T>(dv * (gv * sig));
    }
    store_vec<T, V>(static_cast<T*>(p.dgate) + r * p.dgate_rs + c, dg);
    store_vec<T, V>(static_cast<T*>(p.dup) + r * p.dup_rs + c, du);
  }
}

template <typename T>
bool can_vec16(const SwigluParams& p, bool bwd) {
  constexpr int V = 16 / sizeof(T);
  if (p.n % V || p.gate_rs % V || p.up_rs % V) return false;
  if (!is_aligned16(p.gate) || !is_aligned16(p.up)) return false;
  if (!bwd) return is_aligned16(p.y);
  return p.dgate_rs % V == 0 && p.dup_rs % V == 0 && is_aligned16(p.dy) && is_aligned16(p.dgate) &&
         is_aligned16(p.dup);
}

unsigned grid_for(int64_t total_vecs, int threads) {
  const int64_t blocks = (total_vecs + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 0x7fffffff ? blocks : 0x7fffffff);
}

template <typename T>
cudaError_t launch_fwd(const SwigluParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (can_vec16<T>(p, false)) swiglu_fwd_kernel<T, V><<<grid_for(p.rows * (p.n / V), kThreads), kThreads, 0, stream>>>(p);
  else swiglu_fwd_kernel<T, 1><<<grid_for(p.rows * p.n, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const SwigluParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (can_vec16<T>(p, true)) swiglu_bwd_kernel<T, V><<<grid_for(p.rows * (p.n / V), kThreads), kThreads, 0, stream>>>(p);
  else swiglu_bwd_kernel<T, 1><<<grid_for(p.rows * p.n, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t swiglu_fwd_cuda(const SwigluParams& p, cudaStream_t stream) {
  if (p.rows * p.n == 0) return cudaSuccess;
  return dispatch_cuda_float(p.dtype, [&](auto t) { return launch_fwd<decltype(t)>(p, stream); });
}

cudaError_t swiglu_bwd_cuda(const SwigluParams& p, cudaStream_t stream) {
  if (p.rows * p.n == 0) return cudaSuccess;
  return dispatch_cuda_float(p.dtype, [&](auto t) { return launch_bwd<decltype(t)>(p, stream); });
}

}  // namespace llmcore
