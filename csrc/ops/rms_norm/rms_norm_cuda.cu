// rms_norm_cuda.cu — CUDA kernels for rms_norm / add_rms_norm (math in rms_norm.h).
//
// Forward: block = (TX threads along the row) x (TY rows). Each thread owns the VEC-wide column
// vectors tx, tx + TX, tx + 2*TX, ... of its row; the first NCACHE of them stay in registers
// between the sum-of-squares pass and the scaling pass, so a row is read from memory once when
// n <= NCACHE*TX*VEC (32768 bf16 / 16384 fp32 elements with TX = kFwdThreads = 1024). Longer rows
// re-read the rest (from L2). VEC = 16 bytes / sizeof(T) when the row length, strides and
// pointers allow 16-byte access, else 1.
//
// Backward: a persistent grid of G blocks (a few per SM); block b handles rows b, b+G, ...; one
// row at a time, TX <= kBwdThreads = 384 threads. Each thread keeps the dweight sums of its own
// columns in registers across all of its rows (same column ownership every row), so dweight needs
// only a (G, n) fp32 partial buffer, summed by a second tiny kernel — never a (rows, n) fp32
// temporary. The register cache (x, dy and the dweight sums of NCACHE vectors) wants ~155
// registers (sm_90a, 16-bit): 384 x 160 fits the SM's 64K registers, 512 threads would cap them at
// 128 and spill, 1024 (what this launched before) could not launch at all. Rows past
// NCACHE*384*VEC (12288 16-bit / 6144 fp32 elements) take the uncached tail loop.
//
// Launch configuration: every kernel carries __launch_bounds__ of the constant its launcher clamps
// the block size to (kFwdThreads, kBwdThreads, kReduceThreads), so ptxas keeps the registers
// within what that many threads can have, and tests/test_build.py checks registers x bound
// <= 64K from the ptxas report on every build, GPU or not.
//
// Numerics: fp32 sums; h = x + residual is rounded to T before the statistics (as the reference).
#include "common/cuda_utils.cuh"
#include "rms_norm/rms_norm.h"

namespace llmcore {
namespace {

constexpr int kNCache = 4;
constexpr int kFwdThreads = 1024;   // most threads of a forward block (TX x TY)
constexpr int kBwdThreads = 384;    // most threads of a backward block (TX)
constexpr int kReduceThreads = 256; // dweight reduction block


template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kFwdThreads) rms_norm_fwd_kernel(RmsNormFwdParams p) {
  __shared__ float scratch[32 * 32];  // 32 floats per block row (TY <= 32)
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < p.rows;
  const int64_t nvec = p.n / VEC;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + row * p.residual_row_stride : nullptr;
  T* h = p.residual ? static_cast<T*>(p.h) + row * p.n : nullptr;

  VecN<T, VEC> cache[kNCache];
  float ss = 0.f;
  auto load_h = [&](int64_t i) {  // one VEC of h = x (+ residual), rounded to T
    VecN<T, VEC> v = load_vec<T, VEC>(x + i * VEC);
    if (res) {
      VecN<T, VEC> r = load_vec<T, VEC>(res + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v.v[k] = from_f32<T>(to_f32(v.v[k]) + to_f32(r.v[k]));
    }
    return v;
  };
  if (active) {
#pragma unroll
    for (int j = 0; j < kNCache; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      if (i < nvec) {
        cache[j] = load_h(i);
        if (h) store_vec<T, VEC>(h + i * VEC, cache[j]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) ss += to_f32(cache[j].v[k]) * to_f32(cache[j].v[k]);
      }
    }
    for (int64_t i = threadIdx.x + static_cast<int64_t>(kNCache) * blockDim.x; i < nvec; i += blockDim.x) {
      VecN<T, VEC> v = load_h(i);
      if (h) store_vec<T, VEC>(h + i * VEC, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) ss += to_f32(v.v[k]) * to_f32(v.v[k]);
    }
  }
  ss = block_row_sum(ss, scratch + threadIdx.y * 32);
  if (!active) return;
  const float rstd = rsqrtf(ss / static_cast<float>(p.n) + p.eps);
  if (threadIdx.x == 0 && p.rstd) p.rstd[row] = rstd;

  const W* w = static_cast<const W*>(p.weight);
  T* y = static_cast<T*>(p.y) + row * p.n;
  auto write = [&](int64_t i, const VecN<T, VEC>& v) {
    VecN<W, VEC> wv = load_vec<W, VEC>(w + i * VEC);
    VecN<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_f32<T>(to_f32(v.v[k]) * rstd * to_f32(wv.v[k]));
    store_vec<T, VEC>(y + i * VEC, o);
  };
#pragma unroll
  for (int j = 0; j < kNCache; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (i < nvec) write(i, cache[j]);
  }
  for (int64_t i = threadIdx.x + static_cast<int64_t>(kNCache) * blockDim.x; i < nvec; i += blockDim.x)
    write(i, load_h(i));
}

template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kBwdThreads) rms_norm_bwd_kernel(RmsNormBwdParams p) {
  __shared__ float scratch[32];
  const int64_t nvec = p.n / VEC;
  const W* w = static_cast<const W*>(p.weight);
  float* part = static_cast<float*>(p.partials) + static_cast<int64_t>(blockIdx.x) * p.n;
  float dw[kNCache][VEC];
#pragma unroll
  for (int j = 0; j < kNCache; ++j)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[j][k] = 0.f;
  // Columns past the register cache accumulate straight into this block's partial row.
  for (int64_t i = threadIdx.x + static_cast<int64_t>(kNCache) * blockDim.x; i < nvec; i += blockDim.x)
#pragma unroll
    for (int k = 0; k < VEC; ++k) part[i * VEC + k] = 0.f;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.n;
    const float rstd = p.rstd[row];
    VecN<T, VEC> xc[kNCache], dyc[kNCache];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kNCache; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      if (i < nvec) {
        xc[j] = load_vec<T, VEC>(x + i * VEC);
        dyc[j] = load_vec<T, VEC>(dy + i * VEC);
        VecN<W, VEC> wv = load_vec<W, VEC>(w + i * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += to_f32(dyc[j].v[k]) * to_f32(wv.v[k]) * to_f32(xc[j].v[k]);
      }
    }
    for (int64_t i = threadIdx.x + static_cast<int64_t>(kNCache) * blockDim.x; i < nvec; i += blockDim.x) {
      VecN<T, VEC> xv = load_vec<T, VEC>(x + i * VEC), dv = load_vec<T, VEC>(dy + i * VEC);
      VecN<W, VEC> wv = load_vec<W, VEC>(w + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += to_f32(dv.v[k]) * to_f32(wv.v[k]) * to_f32(xv.v[k]);
    }
    dot = block_row_sum(dot, scratch);
    const float c = dot * rstd * rstd / static_cast<float>(p.n);
    T* dx = static_cast<T*>(p.dx) + row * p.n;
    const T* de = p.dextra ? static_cast<const T*>(p.dextra) + row * p.n : nullptr;
    auto grad = [&](int64_t i, const VecN<T, VEC>& xv, const VecN<T, VEC>& dv, float* acc) {
      VecN<W, VEC> wv = load_vec<W, VEC>(w + i * VEC);
      VecN<T, VEC> o;
      VecN<T, VEC> ev;
      if (de) ev = load_vec<T, VEC>(de + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xf = to_f32(xv.v[k]), df = to_f32(dv.v[k]);
        float g = rstd * (df * to_f32(wv.v[k]) - xf * c);
        if (de) g += to_f32(ev.v[k]);
        o.v[k] = from_f32<T>(g);
        acc[k] += df * xf * rstd;
      }
      store_vec<T, VEC>(dx + i * VEC, o);
    };
#pragma unroll
    for (int j = 0; j < kNCache; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      if (i < nvec) grad(i, xc[j], dyc[j], dw[j]);
    }
    for (int64_t i = threadIdx.x + static_cast<int64_t>(kNCache) * blockDim.x; i < nvec; i += blockDim.x) {
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = part[i * VEC + k];
      grad(i, load_vec<T, VEC>(x + i * VEC), load_vec<T, VEC>(dy + i * VEC), acc);
#pragma unroll
      for (int k = 0; k < VEC; ++k) part[i * VEC + k] = acc[k];
    }
  }
#pragma unroll
  for (int j = 0; j < kNCache; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (i < nvec)
#pragma unroll
      for (int k = 0; k < VEC; ++k) part[i * VEC + k] = dw[j][k];
  }
}

// dweight[c] = sum over g of partials[g][c]; one thread per column, coalesced across columns.
template <typename W>
__global__ void __launch_bounds__(kReduceThreads) rms_norm_dweight_reduce_kernel(const float* partials, int64_t num_partials, int64_t n,
                                               W* dweight) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float s = 0.f;
  for (int64_t g = 0; g < num_partials; ++g) s += partials[g * n + c];
  dweight[c] = from_f32<W>(s);
}

// Threads along a row: enough for the row to fit the register cache, at most kMax (the kernel's
// __launch_bounds__), a multiple of 32.
template <int kMax>
int threads_per_row(int64_t nvec) {
  static_assert(kMax % 32 == 0 && kMax <= 1024, "block size must be whole warps, at most 1024");
  int64_t per = (nvec + kNCache - 1) / kNCache;
  int64_t tx = ((per + 31) / 32) * 32;
  return static_cast<int>(tx < 32 ? 32 : (tx > kMax ? kMax : tx));
}

template <typename T>
bool can_vec16(int64_t n, std::initializer_list<int64_t> strides, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(T);
  if (n % V) return false;
  for (int64_t s : strides)
    if (s % V) return false;
  for (const void* q : ptrs)
    if (q && !is_aligned16(q)) return false;
  return true;
}

template <typename T, typename W>
cudaError_t launch_fwd(const RmsNormFwdParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  // The weight vector is read with the same VEC, so it must be aligned for its own width too.
  const bool vec = can_vec16<T>(p.n, {p.x_row_stride, p.residual ? p.residual_row_stride : 0},
                                {p.x, p.residual, p.y, p.h}) &&
                   (sizeof(W) == sizeof(T) ? is_aligned16(p.weight)
                                           : (reinterpret_cast<uintptr_t>(p.weight) % (sizeof(W) * V)) == 0);
  const int64_t nvec = vec ? p.n / V : p.n;
  const int tx = threads_per_row<kFwdThreads>(nvec);
  const int ty = tx >= 256 ? 1 : 256 / tx;  // TY <= 8 rows, TX * TY <= max(TX, 256) <= kFwdThreads
  static_assert(kFwdThreads >= 256, "the forward packs short rows into 256-thread blocks");
  const dim3 block(tx, ty);
  const int64_t grid = (p.rows + ty - 1) / ty;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (vec) rms_norm_fwd_kernel<T, W, V><<<static_cast<unsigned>(grid), block, 0, stream>>>(p);
  else rms_norm_fwd_kernel<T, W, 1><<<static_cast<unsigned>(grid), block, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t launch_bwd(const RmsNormBwdParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = can_vec16<T>(p.n, {p.x_row_stride}, {p.x, p.dy, p.dx, p.dextra}) &&
                   (sizeof(W) == sizeof(T) ? is_aligned16(p.weight)
                                           : (reinterpret_cast<uintptr_t>(p.weight) % (sizeof(W) * V)) == 0);
  const int64_t nvec = vec ? p.n / V : p.n;
  const int tx = threads_per_row<kBwdThreads>(nvec);
  const int64_t g = rms_norm_bwd_cuda_num_partials(p.rows);
  if (vec) rms_norm_bwd_kernel<T, W, V><<<static_cast<unsigned>(g), tx, 0, stream>>>(p);
  else rms_norm_bwd_kernel<T, W, 1><<<static_cast<unsigned>(g), tx, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t blocks = (p.n + kReduceThreads - 1) / kReduceThreads;
  rms_norm_dweight_reduce_kernel<W><<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(
      static_cast<const float*>(p.partials), g, p.n, static_cast<W*>(p.dweight));
  return cudaGetLastError();
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

}  // namespace

int64_t rms_norm_bwd_cuda_num_partials(int64_t rows) {
  const int64_t g = static_cast<int64_t>(num_sms()) * 4;
  return rows < g ? (rows > 0 ? rows : 1) : g;
}

cudaError_t rms_norm_fwd_cuda(const RmsNormFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return dispatch_tw(p.dtype, p.weight_dtype, [&](auto t, auto w) {
    return launch_fwd<decltype(t), decltype(w)>(p, stream);
  });
}

cudaError_t rms_norm_bwd_cuda(const RmsNormBwdParams& p, cudaStream_t stream) {
  return dispatch_tw(p.dtype, p.weight_dtype, [&](auto t, auto w) {
    return launch_bwd<decltype(t), decltype(w)>(p, stream);
  });
}

}  // namespace llmcore
