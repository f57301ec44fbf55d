// moe_cuda.cu — CUDA kernels for moe_route / moe_dispatch / moe_combine (math and layouts in moe.h).
//
// route (fwd and bwd): one warp per token, 8 tokens per 256-thread block. Lane `l` owns experts
//   l, l+32, ... (E <= 1024, so a 32-bit mask per lane marks the ones already taken). The softmax
//   max and denominator are warp reductions; scores are recomputed from the (L1-resident) logits
//   row when needed instead of being kept in registers, so any E up to 1024 runs with no local
//   memory. Top-k = k rounds of a warp argmax over (key, id) with "larger key, then lower id"
//   as the total order (NaN keys count as -inf): the CPU kernel and the reference's stable sort
//   use the same rule, so ids are deterministic. bwd writes the row's off-top-k gradient, then
//   (after __syncwarp) the k selected entries over it.
//
// dispatch, index part: a stable counting sort of the P = T*k pairs in three small launches —
//   (1) histogram: block c counts the expert ids of pairs [c*chunk, (c+1)*chunk) with shared int
//       atomics (integers: order-free, deterministic) and writes counts[e * C + c];
//   (2) scan: one 1024-thread block turns that expert-major table into exclusive prefixes: the
//       first output position of chunk c's pairs of expert e; it also writes tokens_per_expert
//       and offsets;
//   (3) scatter: block c walks its chunk again in tiles of 256 pairs, in order. In a tile,
//       __match_any_sync gives each pair its rank among same-expert lanes of its warp; per-warp
//       counts in shared memory (8 warps x E) give the pairs of earlier warps; a per-expert
//       running cursor carries over tiles. Position = cursor + earlier warps + rank in warp.
//   Pairs are numbered chunk, tile, warp, lane — i.e. by pair index — so equal experts keep the
//   token order (stable) and the result is the same as the CPU path's, bit for bit.
//   A grid-wide prefix needs a grid barrier, hence (2) as its own launch rather than one kernel.
//   Chunks: at least 1024 pairs, about 2 blocks per SM.
// dispatch, row part: block = (TX threads along H) x (TY tokens); a thread reads a 16-byte piece
//   of its token's row once and stores it to the token's k permuted rows. Reads T*H, writes T*k*H.
// combine: same mapping; a thread gathers the same 16-byte column piece of its token's k rows,
//   accumulates w * row in fp32 registers in slot order and stores once. Reads T*k*H, writes T*H.
//   No atomics: y is bit-identical run to run. Dispatch's backward is this kernel with weights 1.
// combine bwd: same mapping; for each slot s, dy_permuted[row] = w * dy[t] and the fp32 partial
//   dot(dy[t], y_permuted[row]) reduced over the block row -> dweights[t, s].
// 16-byte vector access when H * sizeof(T), the row strides and the pointers allow, else scalar.
#include <climits>

#include "common/cuda_utils.cuh"
#include "moe/moe.h"

namespace llmcore {
namespace {

constexpr int kRouteWarps = 8;      // tokens per route block
constexpr int kSortThreads = 256;   // histogram / scatter block
constexpr int kSortWarps = kSortThreads / 32;
constexpr int kScanThreads = 1024;
constexpr int kRowThreads = 256;    // row kernels: TX * TY <= 256, TY <= 8


// ---------------------------------------------------------------- route
template <typename T>
struct RowScores {  // softmax or sigmoid of one logits row, recomputed on demand
  const T* l;
  float m, inv;
  bool softmax;
  __device__ __forceinline__ float operator()(int e) const {
    const float v = to_f32(l[e]);
    return softmax ? expf(v - m) * inv : 1.f / (1.f + expf(-v));
  }
};

template <typename T>
__device__ __forceinline__ RowScores<T> row_scores(const T* l, int E, MoeScore score, int lane) {
  RowScores<T> rs{l, 0.f, 1.f, score == MoeScore::Softmax};
  if (rs.softmax) {
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, to_f32(l[e]));
    m = warp_max(m);
    float z = 0.f;
    for (int e = lane; e < E; e += 32) z += expf(to_f32(l[e]) - m);
    z = warp_sum(z);
    rs.m = m;
    rs.inv = 1.f / z;
  }
  return rs;
}

template <typename T>
__global__ void __launch_bounds__(kRouteWarps * 32) moe_route_fwd_kernel(MoeRouteParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
  if (t >= p.tokens) return;  // warp-uniform: full-mask shuffles below stay valid
  const int E = static_cast<int>(p.experts), k = static_cast<int>(p.k);
  const RowScores<T> score = row_scores(static_cast<const T*>(p.logits) + t * p.logits_row_stride, E, p.score, lane);
  float* w = static_cast<float*>(p.weights) + t * k;
  int32_t* ids = p.ids + t * k;
  uint32_t taken = 0;  // bit i: expert lane + 32 i already selected
  float sum = 0.f;     // lane 0
  for (int j = 0; j < k; ++j) {
    float bk = -INFINITY;
    int bi = INT_MAX;  // "no candidate": loses every comparison with a real expert
    for (int i = 0, e = lane; e < E; ++i, e += 32) {
      if ((taken >> i) & 1u) continue;
      float key = score(e) + (p.bias ? p.bias[e] : 0.f);
      key = isnan(key) ? -INFINITY : key;
      if (bi == INT_MAX || key > bk) bk = key, bi = e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ok = __shfl_xor_sync(0xffffffffu, bk, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ok > bk || (ok == bk && oi < bi)) bk = ok, bi = oi;
    }
    if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
    if (lane == 0) {
      const float s = score(bi);
      ids[j] = bi;
      w[j] = s;
      sum += s;
    }
  }
  if (p.renormalize) {
    const float denom = __shfl_sync(0xffffffffu, sum, 0) + 1e-20f;
    __syncwarp();  // lane 0's stores of w are visible to the warp
    for (int j = lane; j < k; j += 32) w[j] = w[j] / denom;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRouteWarps * 32) moe_route_bwd_kernel(MoeRouteBwdParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
  if (t >= p.tokens) return;
  const int E = static_cast<int>(p.experts), k = static_cast<int>(p.k);
  const RowScores<T> score = row_scores(static_cast<const T*>(p.logits) + t * p.logits_row_stride, E, p.score, lane);
  const float* dw = static_cast<const float*>(p.dweights) + t * k;
  const int32_t* ids = p.ids + t * k;
  T* dl = static_cast<T*>(p.dlogits) + t * E;
  // Ids outside [0, E) are rejected by the host check; skipped here all the same (no access).
  auto valid = [E](int e) { return e >= 0 && e < E; };
  float sum = 0.f;
  for (int j = lane; j < k; j += 32) sum += valid(ids[j]) ? score(ids[j]) : 0.f;
  const float denom = warp_sum(sum) + 1e-20f;
  float dot = 0.f;
  for (int j = lane; j < k; j += 32) dot += valid(ids[j]) ? score(ids[j]) / denom * dw[j] : 0.f;
  dot = warp_sum(dot);
  float c = 0.f;
  if (score.softmax) {
    for (int j = lane; j < k; j += 32)
      c += valid(ids[j]) ? score(ids[j]) * (p.renormalize ? (dw[j] - dot) / denom : dw[j]) : 0.f;
    c = warp_sum(c);
  }
  for (int e = lane; e < E; e += 32) dl[e] = from_f32<T>(score.softmax ? score(e) * (0.f - c) : 0.f);
  __syncwarp();  // the selected entries below overwrite the ones just written by other lanes
  for (int j = lane; j < k; j += 32) {
    const int e = ids[j];
    if (!valid(e)) continue;
    const float s = score(e), g = p.renormalize ? (dw[j] - dot) / denom : dw[j];
    dl[e] = from_f32<T>(score.softmax ? s * (g - c) : g * s * (1.f - s));
  }
}

// ---------------------------------------------------------------- sort (dispatch indices)
__global__ void __launch_bounds__(kSortThreads) moe_sort_histogram_kernel(MoeSortParams p) {
  extern __shared__ int32_t hist[];  // (E,)
  const int E = static_cast<int>(p.experts);
  const int64_t c = blockIdx.x, C = p.num_chunks;
  for (int e = threadIdx.x; e < E; e += kSortThreads) hist[e] = 0;
  __syncthreads();
  const int64_t i0 = c * p.chunk, i1 = i0 + p.chunk < p.pairs ? i0 + p.chunk : p.pairs;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kSortThreads) {
    const int32_t e = p.ids[i];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kSortThreads) p.counts[e * C + c] = hist[e];
}

__global__ void __launch_bounds__(kScanThreads) moe_sort_scan_kernel(MoeSortParams p) {
  __shared__ int32_t warp_tot[kScanThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t E = p.experts, C = p.num_chunks, n = E * C;
  const int64_t per = (n + kScanThreads - 1) / kScanThreads;
  const int64_t b0 = threadIdx.x * per < n ? threadIdx.x * per : n, b1 = b0 + per < n ? b0 + per : n;
  int32_t local = 0;
  for (int64_t i = b0; i < b1; ++i) local += p.counts[i];
  int32_t v = local;  // inclusive scan over the warp
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  if (lane == 31) warp_tot[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int32_t wt = warp_tot[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t u = __shfl_up_sync(0xffffffffu, wt, o);
      if (lane >= o) wt += u;
    }
    warp_tot[lane] = wt;  // inclusive prefix over warps
  }
  __syncthreads();
  int32_t run = v - local + (warp > 0 ? warp_tot[warp - 1] : 0);
  for (int64_t i = b0; i < b1; ++i) {
    const int32_t cnt = p.counts[i];
    p.counts[i] = run;
    run += cnt;
  }
  __syncthreads();  // the scanned table is visible to the whole block
  const int32_t total = warp_tot[kScanThreads / 32 - 1];
  for (int64_t e = threadIdx.x; e < E; e += kScanThreads) {
    const int32_t start = p.counts[e * C], end = e + 1 < E ? p.counts[(e + 1) * C] : total;
    p.offsets[e] = start;
    p.tokens_per_expert[e] = end - start;
  }
  if (threadIdx.x == 0) p.offsets[E] = total;
}

__global__ void __launch_bounds__(kSortThreads) moe_sort_scatter_kernel(MoeSortParams p) {
  extern __shared__ int32_t smem[];
  const int E = static_cast<int>(p.experts);
  int32_t* next = smem;      // (E,) next free position of this chunk's pairs of expert e
  int32_t* wcnt = smem + E;  // (kSortWarps, E) pairs of expert e in warp w of the current tile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = blockIdx.x, C = p.num_chunks;
  for (int e = threadIdx.x; e < E; e += kSortThreads) {
    next[e] = p.counts[e * C + c];
#pragma unroll
    for (int w = 0; w < kSortWarps; ++w) wcnt[w * E + e] = 0;
  }
  __syncthreads();
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t i0 = c * p.chunk, i1 = i0 + p.chunk < p.pairs ? i0 + p.chunk : p.pairs;
  for (int64_t base = i0; base < i1; base += kSortThreads) {  // block-uniform trip count
    const int64_t i = base + threadIdx.x;
    int e = -1;
    if (i < i1) {
      e = p.ids[i];
      if (e < 0 || e >= E) {
        p.row_map[i] = -1;
        e = -1;
      }
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int wrank = __popc(peers & lanes_below), cnt = __popc(peers);
    if (e >= 0 && wrank == 0) wcnt[warp * E + e] = cnt;
    __syncthreads();
    int32_t pos = 0;
    bool last = false;
    if (e >= 0) {
      int32_t before = 0, after = 0;
#pragma unroll
      for (int w = 0; w < kSortWarps; ++w) {
        const int32_t n = wcnt[w * E + e];
        before += w < warp ? n : 0;
        after += w > warp ? n : 0;
      }
      pos = next[e] + before + wrank;
      p.row_map[i] = pos;
      last = wrank == cnt - 1 && after == 0;  // the tile's last pair of expert e
    }
    __syncthreads();
    if (e >= 0) {
      if (last) next[e] = pos + 1;
      if (wrank == 0) wcnt[warp * E + e] = 0;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- rows
struct RowGeom {
  dim3 block;
  unsigned grid;
};

bool row_geom(int64_t units, int64_t rows, RowGeom& g) {
  int tx = static_cast<int>(((units + 31) / 32) * 32);
  tx = tx < 32 ? 32 : (tx > kRowThreads ? kRowThreads : tx);
  int ty = kRowThreads / tx;
  ty = ty > 8 ? 8 : ty;
  const int64_t grid = (rows + ty - 1) / ty;
  if (grid > 0x7fffffff) return false;
  g.block = dim3(tx, ty);
  g.grid = static_cast<unsigned>(grid);
  return true;
}

// U: uint4 (a 16-byte piece of the row) or an unsigned type of the element's size.
template <typename U>
__global__ void __launch_bounds__(kRowThreads) moe_dispatch_rows_kernel(MoeRowsParams p, int64_t units,
                                                                         int64_t src_stride_units) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= p.tokens) return;  // no barriers in this kernel
  const U* src = static_cast<const U*>(p.src) + t * src_stride_units;
  U* dst = static_cast<U*>(p.dst);
  const int32_t* rm = p.row_map + t * p.k;
  const int64_t rows = p.tokens * p.k;
  for (int64_t i = threadIdx.x; i < units; i += blockDim.x) {
    const U v = src[i];
#pragma unroll 4
    for (int64_t s = 0; s < p.k; ++s) {
      const int64_t r = rm[s];
      if (r >= 0 && r < rows) dst[r * units + i] = v;
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) moe_combine_rows_kernel(MoeRowsParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= p.tokens) return;
  const int64_t nvec = p.hidden / VEC, k = p.k;
  const T* src = static_cast<const T*>(p.src);
  const float* w = p.weights ? static_cast<const float*>(p.weights) + t * k : nullptr;
  const int32_t* rm = p.row_map + t * k;
  const int64_t rows = p.tokens * k;
  T* dst = static_cast<T*>(p.dst) + t * p.hidden;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    float acc[VEC];
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] = 0.f;
#pragma unroll 4  // several independent row loads in flight (k is 1..8 in practice)
    for (int64_t s = 0; s < k; ++s) {
      const int64_t r = rm[s];
      if (r < 0 || r >= rows) continue;  // dropped (-1); others: rejected by the host check
      const float ws = w ? w[s] : 1.f;
      const VecN<T, VEC> v = load_vec<T, VEC>(src + r * p.src_row_stride + i * VEC);
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] += ws * to_f32(v.v[q]);
    }
    VecN<T, VEC> o;
#pragma unroll
    for (int q = 0; q < VEC; ++q) o.v[q] = from_f32<T>(acc[q]);
    store_vec<T, VEC>(dst + i * VEC, o);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) moe_combine_bwd_kernel(MoeCombineBwdParams p) {
  __shared__ float scratch[8 * 32];  // 32 floats per block row (TY <= 8)
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = t < p.tokens;  // inactive rows still join block_row_sum's barriers
  const int64_t H = p.hidden, nvec = H / VEC, k = p.k;
  const T* dy = static_cast<const T*>(p.dy) + (active ? t : 0) * H;
  for (int64_t s = 0; s < k; ++s) {
    int64_t r = active ? p.row_map[t * k + s] : -1;
    r = r < p.tokens * k ? r : -1;  // out of range (rejected by the host check): skipped
    float dot = 0.f;
    if (r >= 0) {
      const float ws = static_cast<const float*>(p.weights)[t * k + s];
      const T* yp = static_cast<const T*>(p.y_permuted) + r * H;
      T* dyp = static_cast<T*>(p.dy_permuted) + r * H;
      for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
        const VecN<T, VEC> d = load_vec<T, VEC>(dy + i * VEC), y = load_vec<T, VEC>(yp + i * VEC);
        VecN<T, VEC> o;
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          const float df = to_f32(d.v[q]);
          o.v[q] = from_f32<T>(ws * df);
          dot += df * to_f32(y.v[q]);
        }
        store_vec<T, VEC>(dyp + i * VEC, o);
      }
    }
    dot = block_row_sum(dot, scratch + threadIdx.y * 32);
    if (active && threadIdx.x == 0) static_cast<float*>(p.dweights)[t * k + s] = r >= 0 ? dot : 0.f;
  }
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* q : ptrs)
    if (q && !is_aligned16(q)) return false;
  return true;
}

}  // namespace

// ---------------------------------------------------------------- launchers
cudaError_t moe_route_fwd_cuda(const MoeRouteParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  if (p.experts > kMoeCudaMaxExperts || p.k > p.experts) return cudaErrorInvalidValue;
  const int64_t grid = (p.tokens + kRouteWarps - 1) / kRouteWarps;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_cuda_float(p.dtype, [&](auto tag) {
    moe_route_fwd_kernel<decltype(tag)><<<static_cast<unsigned>(grid), kRouteWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t moe_route_bwd_cuda(const MoeRouteBwdParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  const int64_t grid = (p.tokens + kRouteWarps - 1) / kRouteWarps;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_cuda_float(p.dtype, [&](auto tag) {
    moe_route_bwd_kernel<decltype(tag)><<<static_cast<unsigned>(grid), kRouteWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

void moe_sort_cuda_plan(MoeSortParams& p) {
  const int64_t blocks = 2 * static_cast<int64_t>(num_sms());
  int64_t chunk = (p.pairs + blocks - 1) / blocks;
  chunk = ((chunk + kSortThreads - 1) / kSortThreads) * kSortThreads;
  p.chunk = chunk < 1024 ? 1024 : chunk;
  p.num_chunks = p.pairs > 0 ? (p.pairs + p.chunk - 1) / p.chunk : 1;
}

cudaError_t moe_sort_cuda(const MoeSortParams& p, cudaStream_t stream) {
  if (p.experts > kMoeCudaMaxExperts || p.num_chunks < 1 || p.num_chunks > 0x7fffffff) return cudaErrorInvalidValue;
  const unsigned C = static_cast<unsigned>(p.num_chunks);
  const size_t hist_smem = static_cast<size_t>(p.experts) * sizeof(int32_t);
  moe_sort_histogram_kernel<<<C, kSortThreads, hist_smem, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  moe_sort_scan_kernel<<<1, kScanThreads, 0, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (p.pairs == 0) return cudaSuccess;
  moe_sort_scatter_kernel<<<C, kSortThreads, hist_smem * (1 + kSortWarps), stream>>>(p);  // <= 36 KB
  return cudaGetLastError();
}

cudaError_t moe_dispatch_rows_cuda(const MoeRowsParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.hidden == 0) return cudaSuccess;
  const int64_t es = p.dtype == DType::Float32 ? 4 : 2;
  const int64_t row_bytes = p.hidden * es;
  RowGeom g;
  if (row_bytes % 16 == 0 && (p.src_row_stride * es) % 16 == 0 && aligned16({p.src, p.dst})) {
    if (!row_geom(row_bytes / 16, p.tokens, g)) return cudaErrorInvalidConfiguration;
    moe_dispatch_rows_kernel<uint4><<<g.grid, g.block, 0, stream>>>(p, row_bytes / 16, p.src_row_stride * es / 16);
  } else {
    if (!row_geom(p.hidden, p.tokens, g)) return cudaErrorInvalidConfiguration;
    if (es == 4) moe_dispatch_rows_kernel<uint32_t><<<g.grid, g.block, 0, stream>>>(p, p.hidden, p.src_row_stride);
    else moe_dispatch_rows_kernel<uint16_t><<<g.grid, g.block, 0, stream>>>(p, p.hidden, p.src_row_stride);
  }
  return cudaGetLastError();
}

cudaError_t moe_combine_rows_cuda(const MoeRowsParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.hidden == 0) return cudaSuccess;
  return dispatch_cuda_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    RowGeom g;
    const bool vec = p.hidden % V == 0 && p.src_row_stride % V == 0 && aligned16({p.src, p.dst});
    if (!row_geom(vec ? p.hidden / V : p.hidden, p.tokens, g)) return cudaErrorInvalidConfiguration;
    if (vec) moe_combine_rows_kernel<T, V><<<g.grid, g.block, 0, stream>>>(p);
    else moe_combine_rows_kernel<T, 1><<<g.grid, g.block, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t moe_combine_bwd_cuda(const MoeCombineBwdParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  return dispatch_cuda_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    RowGeom g;
    const bool vec = p.hidden % V == 0 && aligned16({p.dy, p.y_permuted, p.dy_permuted});
    if (!row_geom(vec ? p.hidden / V : (p.hidden > 0 ? p.hidden : 1), p.tokens, g))
      return cudaErrorInvalidConfiguration;
    if (vec) moe_combine_bwd_kernel<T, V><<<g.grid, g.block, 0, stream>>>(p);
    else moe_combine_bwd_kernel<T, 1><<<g.grid, g.block, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace llmcore
