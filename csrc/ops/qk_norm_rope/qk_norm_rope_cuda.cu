// qk_norm_rope_cuda.cu — CUDA kernels for qk_norm_rope (math and layouts in qk_norm_rope.h).
//
// Work unit: one head row (D elements) of q or k of one token, owned by one warp; row r of the
// tokens * (Hq + Hk) rows is token r / (Hq + Hk), head r % (Hq + Hk) (q heads first). Lane l holds
// pairs i = l + 32 j (j < MAXP, D/2 <= 32 MAXP, MAXP in {1, 2, 4, 8}: D <= 512) in registers: the
// row is read from DRAM once, sum(x^2) is a warp shuffle reduction, then each lane normalizes,
// scales and rotates its own pairs and writes them. Half-split lanes read x[i] and x[i + D/2]
// (coalesced across lanes); interleaved lanes read x[2i], x[2i+1] (two stride-2 accesses).
// Block: 256 threads = 8 rows. The token's cos/sin row is read by every head of the token (L1/L2).
// In place (y == x) is race-free: every element is read and then written by the same lane only.
// Positions outside [0, max_seq_len) (tensor form; the ATen layer checks the offset form on the
// host): a kernel cannot raise, so that token's outputs are written as NaN (as rope_cuda.cu).
//
// Backward: a fixed grid of G blocks (qk_norm_rope_bwd_cuda_num_partials) grid-strides over rows;
// each warp keeps its dweight contributions for its pairs in registers (separately for q and k),
// the block sums its 8 warps in a fixed order through shared memory into partial row blockIdx.x,
// and a second kernel sums the G partial rows per column: deterministic, no atomics.
// Numerics: fp32 statistics and math, one rounding of each output.
// Status: compile-checked only (nvcc 13.0, sm_80 and sm_90a: no spills, <= 118 registers); never run on a GPU.
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "qk_norm_rope/qk_norm_rope.h"

namespace llmcore {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kReduceThreads = 256;

struct RowRef {
  int64_t b, s, tok;
  int hh;       // head within q (is_q) or k
  bool is_q;
};

__device__ __forceinline__ RowRef row_ref(const QkNormRopeParams& p, int64_t r) {
  const int64_t H = p.Hq + p.Hk;
  RowRef o;
  o.tok = r / H;
  const int h = static_cast<int>(r - o.tok * H);
  o.b = o.tok / p.S;
  o.s = o.tok - o.b * p.S;
  o.is_q = h < p.Hq;
  o.hh = o.is_q ? h : h - static_cast<int>(p.Hq);
  return o;
}

__device__ __forceinline__ int64_t position(const QkNormRopeParams& p, int64_t b, int64_t s) {
  int64_t pos = s;
  if (p.positions) {
    const int64_t off = b * p.pos_sb + s * p.pos_ss;
    pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[off]
                            : static_cast<const int32_t*>(p.positions)[off];
  }
  return pos + p.position_offset;
}

template <bool IL>
__device__ __forceinline__ int idx1(int i, int h) { return IL ? 2 * i : i; }
template <bool IL>
__device__ __forceinline__ int idx2(int i, int h) { return IL ? 2 * i + 1 : i + h; }

template <typename T, typename W, int MAXP, bool IL>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_fwd_kernel(QkNormRopeParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= p.B * p.S * (p.Hq + p.Hk)) return;  // whole warps exit together
  const RowRef rr = row_ref(p, r);
  const T* x = rr.is_q ? static_cast<const T*>(p.q) + rr.b * p.q_sb + rr.s * p.q_ss + rr.hh * p.q_sh
                       : static_cast<const T*>(p.k) + rr.b * p.k_sb + rr.s * p.k_ss + rr.hh * p.k_sh;
  T* y = rr.is_q ? static_cast<T*>(p.q_out) + rr.b * p.qo_sb + rr.s * p.qo_ss + rr.hh * p.qo_sh
                 : static_cast<T*>(p.k_out) + rr.b * p.ko_sb + rr.s * p.ko_ss + rr.hh * p.ko_sh;
  const W* w = static_cast<const W*>(rr.is_q ? p.q_weight : p.k_weight);
  const int h = static_cast<int>(p.D / 2);
  float x1[MAXP], x2[MAXP];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < MAXP; ++j) {
    const int i = lane + 32 * j;
    x1[j] = x2[j] = 0.f;
    if (i < h) {
      x1[j] = to_f32(x[idx1<IL>(i, h)]);
      x2[j] = to_f32(x[idx2<IL>(i, h)]);
      ss += x1[j] * x1[j] + x2[j] * x2[j];
    }
  }
  ss = warp_sum(ss);
  const float rstd = 1.f / sqrtf(ss / static_cast<float>(p.D) + static_cast<float>(p.eps));
  float* rstd_out = static_cast<float*>(rr.is_q ? p.q_rstd : p.k_rstd);
  if (rstd_out && lane == 0) rstd_out[rr.tok * (rr.is_q ? p.Hq : p.Hk) + rr.hh] = rstd;
  const int64_t pos = position(p, rr.b, rr.s);
  const bool valid = pos >= 0 && pos < p.max_seq_len;
  const float* crow = p.cos + (valid ? pos : 0) * h;
  const float* srow = p.sin + (valid ? pos : 0) * h;
#pragma unroll
  for (int j = 0; j < MAXP; ++j) {
    const int i = lane + 32 * j;
    if (i < h) {
      const int i1 = idx1<IL>(i, h), i2 = idx2<IL>(i, h);
      const float c = valid ? __ldg(crow + i) : __int_as_float(0x7fc00000);
      const float s = valid ? __ldg(srow + i) : __int_as_float(0x7fc00000);
      const float n1 = x1[j] * rstd * to_f32(w[i1]), n2 = x2[j] * rstd * to_f32(w[i2]);
      y[i1] = from_f32<T>(n1 * c - n2 * s);
      y[i2] = from_f32<T>(n2 * c + n1 * s);
    }
  }
}

template <typename T, typename W, int MAXP, bool IL>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_bwd_kernel(QkNormRopeParams p) {
  extern __shared__ float smem[];  // (kWarps, 2, D): per-warp dweight rows for q and k
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = static_cast<int>(p.D / 2);
  const int64_t rows = p.B * p.S * (p.Hq + p.Hk);
  float dwq1[MAXP], dwq2[MAXP], dwk1[MAXP], dwk2[MAXP];
#pragma unroll
  for (int j = 0; j < MAXP; ++j) dwq1[j] = dwq2[j] = dwk1[j] = dwk2[j] = 0.f;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const RowRef rr = row_ref(p, r);
    const int64_t H = rr.is_q ? p.Hq : p.Hk, dr = rr.tok * H + rr.hh;
    const T* x = rr.is_q ? static_cast<const T*>(p.q) + rr.b * p.q_sb + rr.s * p.q_ss + rr.hh * p.q_sh
                         : static_cast<const T*>(p.k) + rr.b * p.k_sb + rr.s * p.k_ss + rr.hh * p.k_sh;
    const T* dy = static_cast<const T*>(rr.is_q ? p.dq_out : p.dk_out) + dr * p.D;
    T* dx = rr.is_q ? static_cast<T*>(p.q_out) + rr.b * p.qo_sb + rr.s * p.qo_ss + rr.hh * p.qo_sh
                    : static_cast<T*>(p.k_out) + rr.b * p.ko_sb + rr.s * p.ko_ss + rr.hh * p.ko_sh;
    const W* w = static_cast<const W*>(rr.is_q ? p.q_weight : p.k_weight);
    const float rstd = static_cast<const float*>(rr.is_q ? p.q_rstd : p.k_rstd)[dr];
    const int64_t pos = position(p, rr.b, rr.s);
    const bool valid = pos >= 0 && pos < p.max_seq_len;
    const float* crow = p.cos + (valid ? pos : 0) * h;
    const float* srow = p.sin + (valid ? pos : 0) * h;
    float x1[MAXP], x2[MAXP], g1[MAXP], g2[MAXP], dn1[MAXP], dn2[MAXP];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < MAXP; ++j) {
      const int i = lane + 32 * j;
      x1[j] = x2[j] = g1[j] = g2[j] = dn1[j] = dn2[j] = 0.f;
      if (i < h) {
        const int i1 = idx1<IL>(i, h), i2 = idx2<IL>(i, h);
        const float c = valid ? __ldg(crow + i) : __int_as_float(0x7fc00000);
        const float s = valid ? __ldg(srow + i) : __int_as_float(0x7fc00000);
        const float d1 = to_f32(dy[i1]), d2 = to_f32(dy[i2]);
        dn1[j] = d1 * c + d2 * s;
        dn2[j] = d2 * c - d1 * s;
        x1[j] = to_f32(x[i1]);
        x2[j] = to_f32(x[i2]);
        g1[j] = dn1[j] * to_f32(w[i1]);
        g2[j] = dn2[j] * to_f32(w[i2]);
        dot += g1[j] * x1[j] + g2[j] * x2[j];
      }
    }
    dot = warp_sum(dot);
    const float cc = dot * rstd * rstd / static_cast<float>(p.D);
#pragma unroll
    for (int j = 0; j < MAXP; ++j) {
      const int i = lane + 32 * j;
      if (i < h) {
        dx[idx1<IL>(i, h)] = from_f32<T>(rstd * (g1[j] - x1[j] * cc));
        dx[idx2<IL>(i, h)] = from_f32<T>(rstd * (g2[j] - x2[j] * cc));
        if (rr.is_q) {
          dwq1[j] += dn1[j] * x1[j] * rstd;
          dwq2[j] += dn2[j] * x2[j] * rstd;
        } else {
          dwk1[j] += dn1[j] * x1[j] * rstd;
          dwk2[j] += dn2[j] * x2[j] * rstd;
        }
      }
    }
  }
  const int D = static_cast<int>(p.D);
  float* mine = smem + warp * 2 * D;
#pragma unroll
  for (int j = 0; j < MAXP; ++j) {
    const int i = lane + 32 * j;
    if (i < h) {
      mine[idx1<IL>(i, h)] = dwq1[j];
      mine[idx2<IL>(i, h)] = dwq2[j];
      mine[D + idx1<IL>(i, h)] = dwk1[j];
      mine[D + idx2<IL>(i, h)] = dwk2[j];
    }
  }
  __syncthreads();
  float* qpart = static_cast<float*>(p.q_partials) + static_cast<int64_t>(blockIdx.x) * D;
  float* kpart = static_cast<float*>(p.k_partials) + static_cast<int64_t>(blockIdx.x) * D;
  for (int c = threadIdx.x; c < 2 * D; c += kThreads) {
    float s = 0.f;
    for (int wi = 0; wi < kWarps; ++wi) s += smem[wi * 2 * D + c];
    if (c < D) qpart[c] = s;
    else kpart[c - D] = s;
  }
}

// dweight[c] = sum over g of partials[g][c] for q (columns 0..D-1) and k (D..2D-1).
template <typename W>
__global__ void __launch_bounds__(kReduceThreads) qk_norm_rope_dweight_reduce_kernel(QkNormRopeParams p, int64_t g) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= 2 * p.D) return;
  const bool is_q = c < p.D;
  const int64_t col = is_q ? c : c - p.D;
  const float* part = static_cast<const float*>(is_q ? p.q_partials : p.k_partials);
  float s = 0.f;
  for (int64_t i = 0; i < g; ++i) s += part[i * p.D + col];
  static_cast<W*>(is_q ? p.dq_weight : p.dk_weight)[col] = from_f32<W>(s);
}

template <typename Launch>
cudaError_t dispatch_tw(DType t, DType wt, Launch&& launch) {
  switch (t) {
    case DType::Float32: return launch(float{}, float{});
    case DType::Float16: return wt == t ? launch(__half{}, __half{}) : launch(__half{}, float{});
    case DType::BFloat16:
      return wt == t ? launch(__nv_bfloat16{}, __nv_bfloat16{}) : launch(__nv_bfloat16{}, float{});
    default: return cudaErrorInvalidValue;
  }
}

// Calls f(std::integral_constant<int, MAXP>, std::integral_constant<bool, IL>) for the smallest
// MAXP with D/2 <= 32 * MAXP; D > 512 is refused (the ATen layer checks it with a clear error).
template <typename F>
cudaError_t dispatch_shape(const QkNormRopeParams& p, F&& f) {
  const int64_t h = p.D / 2;
  auto il = [&](auto mp) -> cudaError_t {
    if (p.interleaved) return f(mp, std::integral_constant<bool, true>{});
    return f(mp, std::integral_constant<bool, false>{});
  };
  if (h <= 32) return il(std::integral_constant<int, 1>{});
  if (h <= 64) return il(std::integral_constant<int, 2>{});
  if (h <= 128) return il(std::integral_constant<int, 4>{});
  if (h <= 256) return il(std::integral_constant<int, 8>{});
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t qk_norm_rope_bwd_cuda_num_partials(int64_t tokens) {
  const int64_t g = static_cast<int64_t>(num_sms()) * 4;
  return tokens < g ? (tokens > 0 ? tokens : 1) : g;
}

cudaError_t qk_norm_rope_fwd_cuda(const QkNormRopeParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.S * (p.Hq + p.Hk);
  if (rows == 0 || p.D == 0) return cudaSuccess;
  const int64_t grid = (rows + kWarps - 1) / kWarps;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_tw(p.dtype, p.weight_dtype, [&](auto t, auto w) {
    return dispatch_shape(p, [&](auto mp, auto il) {
      qk_norm_rope_fwd_kernel<decltype(t), decltype(w), decltype(mp)::value, decltype(il)::value>
          <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

cudaError_t qk_norm_rope_bwd_cuda(const QkNormRopeParams& p, cudaStream_t stream) {
  const int64_t g = qk_norm_rope_bwd_cuda_num_partials(p.B * p.S);
  const size_t smem = static_cast<size_t>(kWarps) * 2 * p.D * sizeof(float);  // <= 32 KiB for D <= 512
  return dispatch_tw(p.dtype, p.weight_dtype, [&](auto t, auto w) {
    using W = decltype(w);
    cudaError_t err = dispatch_shape(p, [&](auto mp, auto il) {
      qk_norm_rope_bwd_kernel<decltype(t), W, decltype(mp)::value, decltype(il)::value>
          <<<static_cast<unsigned>(g), kThreads, smem, stream>>>(p);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
    const int64_t blocks = (2 * p.D + kReduceThreads - 1) / kReduceThreads;
    qk_norm_rope_dweight_reduce_kernel<W><<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(p, g);
    return cudaGetLastError();
  });
}

}  // namespace llmcore
