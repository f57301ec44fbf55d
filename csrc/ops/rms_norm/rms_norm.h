// rms_norm.h — torch-free launcher declarations for rms_norm / add_rms_norm.
//
//   h = x + residual                       (add_rms_norm only; rounded to x's dtype)
//   y = h * rstd * weight,  rstd = 1 / sqrt(mean(h^2) + eps)     statistics in fp32
//   backward (recomputes h_hat = h * rstd from the saved rstd):
//   dx = rstd * (g - h_hat * mean(g * h_hat)) + dextra,   g = dy * weight
//   dweight = sum over rows of dy * h_hat
#pragma once
#include <cstdint>

#include "common/dtype.h"

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace llmcore {

struct RmsNormFwdParams {
  const void* x;         // (rows, n), row stride x_row_stride, unit column stride
  const void* residual;  // (rows, n), row stride residual_row_stride; nullptr for plain rms_norm
  const void* weight;    // (n,) contiguous, dtype weight_dtype
  void* y;               // (rows, n) contiguous, dtype
  void* h;               // (rows, n) contiguous, dtype: x + residual; nullptr when residual is
  float* rstd;           // (rows,) fp32 (fp64 on CPU for float64 inputs)
  int64_t rows = 0, n = 0;
  int64_t x_row_stride = 0, residual_row_stride = 0;
  float eps = 1e-6f;
  DType dtype = DType::Float32;         // x, residual, y, h
  DType weight_dtype = DType::Float32;  // == dtype, or Float32 (fp32 master weights)
};

struct RmsNormBwdParams {
  const void* dy;      // (rows, n) contiguous, dtype
  const void* x;       // (rows, n), row stride x_row_stride: the normalized input (h)
  const void* weight;  // (n,) contiguous, weight_dtype
  const float* rstd;   // (rows,) (fp64 on CPU for float64 inputs)
  const void* dextra;  // (rows, n) contiguous or nullptr: gradient reaching h directly, added to dx
  void* dx;            // (rows, n) contiguous, dtype
  void* dweight;       // (n,) weight_dtype
  void* partials;      // (num_partials, n) accumulation-type scratch for dweight
  int64_t rows = 0, n = 0, x_row_stride = 0;
  DType dtype = DType::Float32;
  DType weight_dtype = DType::Float32;
};

// CPU (rms_norm_cpu.cpp). The ATen layer parallelizes: fwd over row ranges; bwd over
// `num_partials` row chunks, chunk c accumulating its dweight into partials row c; then reduce.
void rms_norm_fwd_cpu(const RmsNormFwdParams& p, int64_t row_begin, int64_t row_end);
void rms_norm_bwd_cpu(const RmsNormBwdParams& p, int64_t chunk, int64_t num_chunks);
void rms_norm_dweight_reduce_cpu(const RmsNormBwdParams& p, int64_t num_partials);

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
// CUDA (rms_norm_cuda.cu). bwd needs rms_norm_bwd_cuda_num_partials(rows, n, device) rows of n
// fp32 scratch in p.partials.
cudaError_t rms_norm_fwd_cuda(const RmsNormFwdParams& p, cudaStream_t stream);
int64_t rms_norm_bwd_cuda_num_partials(int64_t rows);
cudaError_t rms_norm_bwd_cuda(const RmsNormBwdParams& p, cudaStream_t stream);
#endif

}  // namespace llmcore
