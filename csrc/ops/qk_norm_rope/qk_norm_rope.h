// qk_norm_rope.h — torch-free launcher declarations for qk_norm_rope: the per-head RMSNorm of q and
// k (Qwen3's q_norm / k_norm) followed by the rotary embedding, in one pass over q and k.
//
// For every token t = (b, s) at position p = (positions ? positions[b, s] : s) + position_offset and
// every head row x (D elements) of q (weight w = q_weight) and of k (w = k_weight):
//   rstd = 1 / sqrt(mean(x^2) + eps)                 (fp32; fp64 on CPU for float64 inputs)
//   n    = x * rstd * w                              (kept in fp32: never rounded between the two)
//   y    = R(p) n,  pair (n1, n2) -> (n1 c - n2 s, n2 c + n1 s),  c = cos[p, i], s = sin[p, i]
// Pair layout: interleaved pair i = (x[2i], x[2i+1]); half-split pair i = (x[i], x[i + D/2]).
// Backward (recomputes n from the saved rstd):
//   dn = R(p)^T dy  (s -> -s);  g = dn * w;  dx = rstd * (g - xhat * mean(g * xhat)),  xhat = x * rstd
//   dw = sum over all tokens and heads of dn * xhat  (q_weight and k_weight separately)
#pragma once
#include <cstdint>

#include "common/dtype.h"

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace llmcore {

struct QkNormRopeParams {
  // Inputs x: q (B, S, Hq, D), k (B, S, Hk, D), element strides for B, S, H, unit stride in D.
  const void* q;
  const void* k;
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  // fwd: outputs y (may equal q / k with the same strides: in place). bwd: dq, dk.
  void* q_out;
  void* k_out;
  int64_t qo_sb = 0, qo_ss = 0, qo_sh = 0;
  int64_t ko_sb = 0, ko_ss = 0, ko_sh = 0;
  // bwd only: incoming gradients dy, contiguous (B, S, H, D).
  const void* dq_out = nullptr;
  const void* dk_out = nullptr;
  const void* q_weight;  // (D,) contiguous, weight_dtype
  const void* k_weight;  // (D,) contiguous, weight_dtype
  // (B, S, Hq) / (B, S, Hk) contiguous, accumulation type (fp32, fp64 for float64): written by fwd
  // (nullptr: not stored, the in-place decode form), read by bwd.
  void* q_rstd = nullptr;
  void* k_rstd = nullptr;
  // bwd only: dweights (D,) weight_dtype and (num_partials, D) accumulation-type scratch for each.
  void* dq_weight = nullptr;
  void* dk_weight = nullptr;
  void* q_partials = nullptr;
  void* k_partials = nullptr;
  const float* cos;  // (max_seq_len, D/2) fp32, contiguous
  const float* sin;  // (max_seq_len, D/2) fp32, contiguous
  const void* positions = nullptr;  // (B, S) int32 / int64, strides pos_sb, pos_ss; or nullptr
  bool positions_int64 = true;
  int64_t pos_sb = 0, pos_ss = 0;
  int64_t position_offset = 0;
  int64_t B = 0, S = 0, Hq = 0, Hk = 0, D = 0;
  int64_t max_seq_len = 0;
  bool interleaved = false;
  double eps = 1e-6;
  DType dtype = DType::Float32;         // q, k, outputs, gradients
  DType weight_dtype = DType::Float32;  // == dtype, or Float32 next to a 16-bit dtype
};

// CPU (qk_norm_rope_cpu.cpp). Positions must be in [0, max_seq_len): checked by the ATen layer.
// fwd: tokens [tok_begin, tok_end) of the B*S tokens (token = b * S + s).
void qk_norm_rope_fwd_cpu(const QkNormRopeParams& p, int64_t tok_begin, int64_t tok_end);
// bwd: token chunk `chunk` of `num_chunks` equal chunks; it accumulates its dweights into row
// `chunk` of q_partials / k_partials; then reduce sums the partial rows into dq_weight / dk_weight.
void qk_norm_rope_bwd_cpu(const QkNormRopeParams& p, int64_t chunk, int64_t num_chunks);
void qk_norm_rope_dweight_reduce_cpu(const QkNormRopeParams& p, int64_t num_partials);

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
// CUDA (qk_norm_rope_cuda.cu). A position out of range writes that token's outputs as NaN (as rope).
// bwd needs qk_norm_rope_bwd_cuda_num_partials(B * S) rows of D fp32 scratch in each of q_partials
// and k_partials.
cudaError_t qk_norm_rope_fwd_cuda(const QkNormRopeParams& p, cudaStream_t stream);
int64_t qk_norm_rope_bwd_cuda_num_partials(int64_t tokens);
cudaError_t qk_norm_rope_bwd_cuda(const QkNormRopeParams& p, cudaStream_t stream);
#endif

}  // namespace llmcore
