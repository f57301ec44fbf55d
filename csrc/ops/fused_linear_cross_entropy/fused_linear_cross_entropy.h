// fused_linear_cross_entropy.h — torch-free launcher declarations for the fused softmax / loss /
// gradient pass of fused_linear_cross_entropy (the chunk GEMMs run in the ATen layer).
//
// One row r of a logits chunk x (V values, the output of hidden @ weight.T (+ bias) for one token):
//   z_v   = softcap > 0 ? softcap * tanh(x_v / softcap) : x_v
//   lse   = log sum_v exp(z_v)                                         (max-shifted, fp32)
//   loss  = lse - (1 - eps) z_t - (eps / V) sum_v z_v + zc * lse^2     (t = target, eps = label
//           smoothing, zc = z-loss coefficient; PyTorch's label-smoothed cross-entropy + z-loss)
//   dz_v  = softmax_v * (1 + 2 zc lse) - eps / V - (1 - eps) [v == t]
//   dx_v  = g * dz_v * (softcap > 0 ? 1 - tanh^2(x_v / softcap) : 1),   g = scale * row_grad[r]
// With write_grad the row's dx overwrites x in place (in the chunk's dtype), ready for the
// dhidden = dx @ weight and dweight += dx^T @ hidden GEMMs. The ATen layer passes only labelled
// rows (target in [0, V)); ignored rows never reach the kernels.
// Numerics: fp32 accumulation (fp64 for float64), three passes over the row (max; sum of exp and of
// z; gradient), one rounding of dx to the chunk dtype.
#pragma once
#include <cstdint>

#include "common/dtype.h"

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace llmcore {

// Two modes. Whole rows (lse_given false): the buffer holds all V logits of each row; loss (and lse
// when non-null) are written, and dx when write_grad. Vocabulary block (lse_given true): the buffer
// holds columns [v0, v0 + V) of each row of a V_total vocabulary; lse comes in (from a whole-row
// pass), only dx is written (write_grad must be true); the target column may lie outside the block.
struct FlceRowsParams {
  void* logits = nullptr;            // (rows, V), row stride ld, chunk dtype; dx written over it
  const int64_t* target = nullptr;   // (rows,) in [0, V_total)
  void* loss = nullptr;              // (rows,) out: per-row loss (fp32; fp64 for float64)
  void* lse = nullptr;               // (rows,) loss dtype: out (whole rows; may be null) or in (block)
  const void* row_grad = nullptr;    // (rows,) or null (= 1): per-row upstream gradient, loss dtype
  int64_t rows = 0, V = 0, ld = 0;
  int64_t v0 = 0, V_total = 0;       // the block's first column and the vocabulary size (V_total = V: whole rows)
  bool lse_given = false;
  double scale = 1.0;                // gradient multiplier (1 / labelled rows for mean)
  double label_smoothing = 0.0, z_loss = 0.0, softcap = 0.0;  // softcap 0 = off
  bool write_grad = false;
  DType dtype = DType::Float32;
};

// CPU (fused_linear_cross_entropy_cpu.cpp): rows [begin, end) of the chunk.
void fused_linear_cross_entropy_rows_cpu(const FlceRowsParams& p, int64_t begin, int64_t end);

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
// CUDA (fused_linear_cross_entropy_cuda.cu): all rows, one block per row.
cudaError_t fused_linear_cross_entropy_rows_cuda(const FlceRowsParams& p, cudaStream_t stream);
#endif

}  // namespace llmcore
