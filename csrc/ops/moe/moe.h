// moe.h — torch-free launcher declarations for the MoE routing ops.
//
// moe_route     (T, E) router logits -> top-k experts per token and their gate weights
//   s = softmax(l) or sigmoid(l)                              fp32 (fp64 for float64 logits)
//   ids = the k experts of largest s + bias (bias only for selection; ties -> lower expert id;
//         NaN scores rank below -inf so the k ids are always valid and distinct)
//   w_j = s[ids_j]            or, renormalized, s[ids_j] / (sum_j s[ids_j] + 1e-20)
//   backward: g_j = dw_j  (renorm: g_j = (dw_j - sum_i w_i dw_i) / (S + 1e-20)), g = 0 off the top-k
//             softmax: dl = s * (g - sum_j s_j g_j);  sigmoid: dl = g * s * (1 - s)
//
// moe_dispatch  stable counting sort of the P = T*k (token, slot) pairs by expert.
//   Pair i = t*k + slot (row-major in topk_ids). row_map[i] = the position of pair i in
//   expert-major order: offsets[e] + (number of pairs i' < i with the same expert). So rows of one
//   expert are contiguous, [offsets[e], offsets[e+1]), and in token order inside (stable).
//   x_permuted[row_map[t*k + s]] = x[t]. Backward: dx[t] = sum_s dx_permuted[row_map[t*k + s]].
//   The sort runs over `num_chunks` contiguous chunks of pairs: (1) a histogram per chunk,
//   counts[e * num_chunks + c]; (2) one exclusive scan of that expert-major table -> the first
//   position of chunk c's pairs of expert e; (3) each chunk re-walks its pairs in order and
//   hands out positions. Integer-only, so deterministic; ordered by chunk, then by pair: stable.
//
// moe_combine   y[t] = sum_s w[t, s] * y_permuted[row_map[t*k + s]]    (w == nullptr: weights 1)
//   A gather per token (each token reads its k rows), fp32 accumulation, one rounding: no atomics,
//   deterministic. Backward: dy_permuted[row_map[t*k+s]] = w[t,s] * dy[t] (each row written once);
//   dw[t, s] = dot(dy[t], y_permuted[row_map[t*k + s]]) in fp32.
//
// Index tensors are int32. A row_map entry -1 (only possible on CUDA for an out-of-range expert
// id, which the CPU path rejects) is a dropped slot: it reads and writes nothing. The ATen layer
// rejects any other entry outside [0, T*k) (and topk_ids outside [0, E) in moe_route_bwd) before a
// kernel runs; the kernels still skip such entries (they never touch memory outside the tensors),
// which is what protects a CUDA graph capture, where the host check cannot run.
#pragma once
#include <cstdint>

#include "common/dtype.h"

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace llmcore {

enum class MoeScore : int32_t { Softmax = 0, Sigmoid = 1 };

struct MoeRouteParams {
  const void* logits;   // (T, E), row stride logits_row_stride, unit column stride, dtype
  const float* bias;    // (E,) fp32 selection bias or nullptr (fp64 on CPU for float64 logits)
  void* weights;        // (T, k) contiguous fp32 (fp64 for float64 logits)
  int32_t* ids;         // (T, k) contiguous int32
  int64_t tokens = 0, experts = 0, k = 0, logits_row_stride = 0;
  MoeScore score = MoeScore::Softmax;
  bool renormalize = true;
  DType dtype = DType::Float32;  // of logits (and dlogits)
};

struct MoeRouteBwdParams {
  const void* dweights;  // (T, k) contiguous fp32 (fp64 for float64 logits)
  const void* logits;    // (T, E), row stride logits_row_stride
  const int32_t* ids;    // (T, k) contiguous
  void* dlogits;         // (T, E) contiguous, dtype
  int64_t tokens = 0, experts = 0, k = 0, logits_row_stride = 0;
  MoeScore score = MoeScore::Softmax;
  bool renormalize = true;
  DType dtype = DType::Float32;
};

struct MoeSortParams {
  const int32_t* ids;          // (P,) = topk_ids flattened, contiguous
  int32_t* counts;             // (E * num_chunks,) scratch: per-chunk histogram, then its scan
  int32_t* tokens_per_expert;  // (E,)
  int32_t* offsets;            // (E + 1,)
  int32_t* row_map;            // (P,)
  int64_t pairs = 0, experts = 0, num_chunks = 1, chunk = 0;  // chunk c = pairs [c*chunk, (c+1)*chunk)
};

struct MoeRowsParams {
  // dispatch: src = x (T, H) row stride src_row_stride; dst = x_permuted (T*k, H) contiguous.
  // combine / dispatch bwd: src = y_permuted (T*k, H) contiguous; dst = y (T, H) contiguous.
  const void* src;
  void* dst;
  const void* weights;      // (T, k) fp32 (fp64 for float64) or nullptr (weights 1)
  const int32_t* row_map;   // (T, k), entries in [0, T*k) or -1 (dropped); others are skipped
  int64_t tokens = 0, k = 0, hidden = 0, src_row_stride = 0;
  DType dtype = DType::Float32;
};

struct MoeCombineBwdParams {
  const void* dy;           // (T, H) contiguous
  const void* y_permuted;   // (T*k, H) contiguous
  const void* weights;      // (T, k) fp32 (fp64 for float64)
  const int32_t* row_map;   // (T, k), entries in [0, T*k) or -1 (dropped); others are skipped
  void* dy_permuted;        // (T*k, H) contiguous
  void* dweights;           // (T, k) fp32 (fp64 for float64)
  int64_t tokens = 0, k = 0, hidden = 0;
  DType dtype = DType::Float32;
};

// ---- CPU (moe_cpu.cpp); the ATen layer splits token / chunk ranges with at::parallel_for ----
void moe_route_fwd_cpu(const MoeRouteParams& p, int64_t t_begin, int64_t t_end);
void moe_route_bwd_cpu(const MoeRouteBwdParams& p, int64_t t_begin, int64_t t_end);
// Sort: histogram of chunks [c0, c1); then scan (serial, tiny); then scatter of chunks [c0, c1).
// The histogram returns false when it meets an expert id outside [0, E).
bool moe_sort_histogram_cpu(const MoeSortParams& p, int64_t c0, int64_t c1);
void moe_sort_scan_cpu(const MoeSortParams& p);
void moe_sort_scatter_cpu(const MoeSortParams& p, int64_t c0, int64_t c1);
void moe_dispatch_rows_cpu(const MoeRowsParams& p, int64_t t_begin, int64_t t_end);
void moe_combine_rows_cpu(const MoeRowsParams& p, int64_t t_begin, int64_t t_end);
void moe_combine_bwd_cpu(const MoeCombineBwdParams& p, int64_t t_begin, int64_t t_end);

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
// ---- CUDA (moe_cuda.cu) ----
constexpr int64_t kMoeCudaMaxExperts = 1024;
cudaError_t moe_route_fwd_cuda(const MoeRouteParams& p, cudaStream_t stream);
cudaError_t moe_route_bwd_cuda(const MoeRouteBwdParams& p, cudaStream_t stream);
// The chunking the CUDA sort uses for `pairs` pairs: fills p.num_chunks and p.chunk; the caller
// then allocates p.counts with experts * num_chunks int32.
void moe_sort_cuda_plan(MoeSortParams& p);
cudaError_t moe_sort_cuda(const MoeSortParams& p, cudaStream_t stream);
cudaError_t moe_dispatch_rows_cuda(const MoeRowsParams& p, cudaStream_t stream);
cudaError_t moe_combine_rows_cuda(const MoeRowsParams& p, cudaStream_t stream);
cudaError_t moe_combine_bwd_cuda(const MoeCombineBwdParams& p, cudaStream_t stream);
#endif

}  // namespace llmcore
