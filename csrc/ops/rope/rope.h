// rope.h — torch-free launcher declarations for rope (rotary position embedding).
//
// For every token t = (b, s) at position p = (positions ? positions[b, s] : s) + position_offset,
// and every head of q and of k, the D/2 pairs (x1, x2) of the head vector are rotated by angle
// theta_i(p), with c = cos[p, i], s = sin[p, i] read from fp32 tables (max_seq_len, D/2):
//   y1 = x1 * c - x2 * s
//   y2 = x2 * c + x1 * s
// inverse (the backward, = the transpose): s -> -s.
// Pair layout: interleaved      pair i = (x[2i], x[2i+1])       (Meta / minimind-llama)
//              half-split       pair i = (x[i],  x[i + D/2])    (HF rotate_half / NeoX)
// Numerics: fp32 math (fp64 on CPU for float64 inputs), one rounding to the storage type.
#pragma once
#include <cstdint>

#include "common/dtype.h"

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace llmcore {

struct RopeParams {
  // Inputs (B, S, H, D) with element strides for B, S, H and unit stride in D.
  const void* q;  // (B, S, Hq, D)
  const void* k;  // (B, S, Hk, D)
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  // Outputs, same shapes; may equal q / k (in place) with the same strides.
  void* q_out;
  void* k_out;
  int64_t qo_sb = 0, qo_ss = 0, qo_sh = 0;
  int64_t ko_sb = 0, ko_ss = 0, ko_sh = 0;
  const float* cos;  // (max_seq_len, D/2) fp32, contiguous
  const float* sin;  // (max_seq_len, D/2) fp32, contiguous
  const void* positions = nullptr;  // (B, S) int32 or int64 with strides pos_sb, pos_ss; or nullptr
  bool positions_int64 = true;
  int64_t pos_sb = 0, pos_ss = 0;
  int64_t position_offset = 0;  // added to every position
  int64_t B = 0, S = 0, Hq = 0, Hk = 0, D = 0;
  int64_t max_seq_len = 0;
  bool interleaved = false;
  bool inverse = false;  // rotate by -theta (backward)
  DType dtype = DType::Float32;
};

// CPU (rope_cpu.cpp): tokens [tok_begin, tok_end) of the B*S tokens (token = b * S + s).
// Positions must be in [0, max_seq_len): the ATen layer checks them before calling.
void rope_cpu(const RopeParams& p, int64_t tok_begin, int64_t tok_end);

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
// CUDA (rope_cuda.cu): one launch for q and k. A position outside [0, max_seq_len) (only possible
// with a positions tensor; the ATen layer checks the offset form on the host) cannot raise from the
// kernel: that token's outputs are written as NaN (memory-safe and visible), see rope_cuda.cu.
cudaError_t rope_cuda(const RopeParams& p, cudaStream_t stream);
#endif

}  // namespace llmcore
