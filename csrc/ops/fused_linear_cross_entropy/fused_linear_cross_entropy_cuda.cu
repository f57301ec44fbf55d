// fused_linear_cross_entropy_cuda.cu — CUDA kernel of the fused softmax / loss / gradient pass
// (math in fused_linear_cross_entropy.h; the chunk GEMMs go through cuBLAS from the ATen layer).
//
// One block of kThreads threads per row of the (rows, V) logits buffer (whole rows, or a vocabulary
// block with the row's lse given: then only the gradient pass runs); threads stride over the V
// columns. Three passes over a whole row (max; sum of exp(z - max) and of z; dx written in place), with
// block reductions between them: the row (V * 2 bytes in bf16: 300 KB at V = 151936) is read from
// L2 after the first pass. Numerics: fp32 math, expf / logf / tanhf; NaN propagates through the
// sums (fmaxf drops a NaN, so the max may be finite, but exp(NaN - m) makes the sum NaN).
#include <cmath>

#include "common/cuda_utils.cuh"
#include "fused_linear_cross_entropy/fused_linear_cross_entropy.h"

namespace llmcore {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : -INFINITY;
  v = warp_max(v);
  __syncthreads();
  return v;
}

template <typename T, bool CAP>
__device__ __forceinline__ float load_z(const T* x, int64_t v, float cap, float inv_cap) {
  const float xv = to_f32(x[v]);
  if (CAP) return cap * tanhf(xv * inv_cap);
  return xv;
}

template <typename T, bool CAP>
__global__ void __launch_bounds__(kThreads) flce_rows_kernel(FlceRowsParams p) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  T* x = static_cast<T*>(p.logits) + r * p.ld;
  const int64_t V = p.V, t = p.target[r];
  const float cap = float(p.softcap), inv_cap = CAP ? 1.f / float(p.softcap) : 0.f;
  const float eps = float(p.label_smoothing), zc = float(p.z_loss), eps_v = eps / float(p.V_total);
  float lse;
  if (p.lse_given) {
    lse = static_cast<const float*>(p.lse)[r];
  } else {
    float m = -INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, load_z<T, CAP>(x, v, cap, inv_cap));
    m = block_max(m, scratch);
    float s = 0.f, sz = 0.f;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const float z = load_z<T, CAP>(x, v, cap, inv_cap);
      s += expf(z - m);
      sz += z;
    }
    s = block_row_sum(s, scratch);
    sz = block_row_sum(sz, scratch);
    lse = m + logf(s);
    const float zt = load_z<T, CAP>(x, t, cap, inv_cap);
    const float smooth = eps > 0.f ? eps_v * sz : 0.f;  // 0 * -inf (a -inf logit) would be NaN
    if (threadIdx.x == 0) {
      static_cast<float*>(p.loss)[r] = lse - (1.f - eps) * zt - smooth + zc * lse * lse;
      if (p.lse) static_cast<float*>(p.lse)[r] = lse;
    }
    if (!p.write_grad) return;
    __syncthreads();  // every thread has read x[t] before it is overwritten
  }
  const int64_t tl = t - p.v0;  // the target's column in this buffer (outside [0, V): not in the block)
  const float g = float(p.scale) * (p.row_grad ? static_cast<const float*>(p.row_grad)[r] : 1.f);
  const float a = 1.f + 2.f * zc * lse;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float xv = to_f32(x[v]);
    float dcap = 1.f, z = xv;
    if (CAP) {
      const float th = tanhf(xv * inv_cap);
      z = cap * th;
      dcap = 1.f - th * th;
    }
    const float d = expf(z - lse) * a - eps_v - (v == tl ? 1.f - eps : 0.f);
    x[v] = from_f32<T>(d * dcap * g);
  }
}

}  // namespace

cudaError_t fused_linear_cross_entropy_rows_cuda(const FlceRowsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  return dispatch_cuda_float(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(p.rows));
    if (p.softcap > 0) flce_rows_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
    else flce_rows_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace llmcore
