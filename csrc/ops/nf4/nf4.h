// nf4.h — torch-free launcher declarations for NF4 (bitsandbytes-compatible 4-bit NormalFloat).
//
// Format (bitsandbytes' exactly, see llmcore/ops/nf4.py for the user-facing description):
//   w is read as a flat vector of n values, cut into blocks of `blocksize` consecutive values
//   (the last block may be partial). Per block b: absmax[b] = max |w| (fp32).
//   Each value becomes the index (0..15) of the nearest NF4 code to w / absmax[b] (ties go to the
//   lower code: q = #{midpoints m_k : m_k < x}); two indices per byte, the first value of each pair
//   in the HIGH nibble; packed has ceil(n/2) bytes and an odd n leaves code 7 (0.0) in the last
//   low nibble.
//   Double quantization: offset = mean(absmax) (computed by the ATen layer with torch, as
//   bitsandbytes does), then absmax - offset is quantized blockwise with blocksize 256 to uint8
//   indices into `code2` (bitsandbytes' signed dynamic 8-bit map) with fp32 absmax2 per 256 blocks.
//   Dequantize:  a_b   = double quant ? fl(fl(code2[qabsmax[b]] * absmax2[b / 256]) + offset)
//                                     : absmax[b]
//                out_i = (dtype) fl(NF4[q_i] * a_b)          (fp32 math, one rounding to dtype)
#pragma once
#include <cstdint>

#include "common/dtype.h"

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace llmcore {

constexpr int64_t kNf4Blocksize2 = 256;  // second-level (double-quant) blocksize, fixed by bnb

// The 16 NF4 code values (bitsandbytes' get_4bit_type("nf4"); all exactly representable in fp32).
#define LLMCORE_NF4_CODE                                                                        \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                   \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                  \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,     \
   0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}

struct Nf4QuantizeParams {
  const void* w;     // (n,) contiguous, dtype
  uint8_t* packed;   // (ceil(n/2),)
  float* absmax;     // (nblocks,) fp32, nblocks = ceil(n / blocksize)
  int64_t n = 0, blocksize = 64;
  DType dtype = DType::Float32;
};

struct Nf4DoubleQuantParams {
  const float* absmax;  // (nblocks,) fp32 first-level scales
  const float* offset;  // (1,) fp32: mean(absmax)
  const float* code2;   // (256,) fp32, sorted ascending (bnb's dynamic map)
  uint8_t* qabsmax;     // (nblocks,)
  float* absmax2;       // (ceil(nblocks / 256),)
  int64_t nblocks = 0;
};

struct Nf4DequantParams {
  const uint8_t* packed;   // (ceil(n/2),)
  const float* absmax;     // (nblocks,) fp32, or nullptr when double-quantized
  const uint8_t* qabsmax;  // (nblocks,) uint8 when double-quantized, else nullptr
  const float* absmax2;    // (ceil(nblocks / 256),) fp32, double quant only
  const float* code2;      // (256,) fp32, double quant only
  const float* offset;     // (1,) fp32, double quant only
  void* out;               // (n,) contiguous, out_dtype
  int64_t n = 0, blocksize = 64;
  DType out_dtype = DType::Float32;
};

// CPU (nf4_cpu.cpp). Ranges are in units of quant blocks (quantize, dequantize) or of second-level
// blocks of 256 scales (double quant); the ATen layer splits them with at::parallel_for.
void nf4_quantize_cpu(const Nf4QuantizeParams& p, int64_t block_begin, int64_t block_end);
void nf4_double_quant_cpu(const Nf4DoubleQuantParams& p, int64_t block2_begin, int64_t block2_end);
void nf4_dequantize_cpu(const Nf4DequantParams& p, int64_t block_begin, int64_t block_end);

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
// CUDA (nf4_cuda.cu). Dequantize is one launch, double quant included. packed must be 4-byte
// aligned and out 16-byte aligned (the ATen layer guarantees both).
cudaError_t nf4_quantize_cuda(const Nf4QuantizeParams& p, cudaStream_t stream);
cudaError_t nf4_double_quant_cuda(const Nf4DoubleQuantParams& p, cudaStream_t stream);
cudaError_t nf4_dequantize_cuda(const Nf4DequantParams& p, cudaStream_t stream);
#endif

}  // namespace llmcore
