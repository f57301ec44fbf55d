// flash_attn.h — torch-free launcher declarations for flash attention (fwd, bwd, varlen, KV cache).
//
//   S = scale * Q K^T (per q head h, kv head h / (Hq / Hkv): GQA/MQA without repeating k/v)
//   causal: query i of a sequence with sq queries and sk keys sees keys j <= i + sk - sq
//           (bottom-right alignment, as FlashAttention >= 2.1), so a decode step needs no special case
//   P = softmax(S) over visible keys;  out = P V;  lse = logsumexp(S) (natural log, fp32)
//   A row with no visible key (causal with sq > sk, or an empty cache) gives out = 0, lse = -inf.
//   backward (FlashAttention-2, recomputes P from lse, never stores an S x S matrix):
//     D_i = sum_d dO_i * O_i;  dV = P^T dO;  dP = dO V^T;  dS = P * (dP - D);
//     dQ = scale * dS K;  dK = scale * dS^T Q
//
// Layout: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) with unit stride in D and any other strides;
// varlen packs sequences as (total, H, D) with cu_seqlens (B + 1,) int32 prefix sums.
// Outputs (out, dq, dk, dv) are contiguous; lse is (B, Hq, Sq), or (Hq, total_q) for varlen.
#pragma once
#include <cstdint>

#include "common/cpu_gemm.h"
#include "common/dtype.h"

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace llmcore {

struct FlashAttnParams {
  const void* q;  // (B, Sq, Hq, D) or (total_q, Hq, D): strides q_batch_stride, q_row_stride, q_head_stride
  const void* k;  // (B, Sk, Hkv, D) or (total_k, Hkv, D)
  const void* v;  // like k
  void* out;      // like q, contiguous: (.., Hq, D) rows; in bwd: the saved forward output (read only)
  void* lse;      // fp32 (fp64 on CPU for float64): (B, Hq, Sq) or (Hq, total_q)
  // backward only
  const void* dout;  // like out, contiguous
  void* dq;          // like q, contiguous
  void* dk;          // like k, contiguous (B, Sk, Hkv, D) / (total_k, Hkv, D)
  void* dv;          // like v, contiguous
  void* dq_accum;    // accumulation-type scratch for dQ (see the CPU / CUDA launchers for the size)
  const void* kv_tiles = nullptr;  // CPU forward: K^T / V key blocks pre-converted to the acc type

  int64_t batch = 0;      // number of sequences
  int64_t seqlen_q = 0;   // Sq (max_seqlen_q for varlen)
  int64_t seqlen_k = 0;   // Sk (max_seqlen_k for varlen; cache capacity for the KV cache)
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t total_q = 0;    // B * Sq, or cu_seqlens_q[B] for varlen (rows of out / dq)
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  // varlen: sequence b has queries [cu_seqlens_q[b], cu_seqlens_q[b+1]) (batch strides unused)
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  // KV cache: sequence b has seqused_k[b] valid keys (<= seqlen_k); nullptr: all seqlen_k
  const int32_t* seqused_k = nullptr;
  double scale = 1.0;  // softmax scale (double so the float64 gradcheck path is exact)
  bool causal = true;
  DType dtype = DType::BFloat16;
  // CPU: the tile-GEMM engine (common/cpu_gemm.h), chosen by the ATen layer before each launch
  CpuGemm cpu_gemm = CpuGemm::kFma;
};

// KV-cache append: k_cache[b, cache_seqlens[b] + i] = k_new[b, i] (and v), i < s_new.
struct KvAppendParams {
  void* k_cache;  // (B, S_max, Hkv, D): strides kc_batch_stride, kc_row_stride, kc_head_stride
  void* v_cache;
  const void* k_new;  // (B, S_new, Hkv, D): strides kn_*
  const void* v_new;
  const int32_t* cache_seqlens;  // (B,)
  int64_t batch = 0, s_new = 0, heads_kv = 0, head_dim = 0;
  int64_t cache_len = 0;  // S_max: rows at or past it are never written
  int64_t kc_batch_stride = 0, kc_row_stride = 0, kc_head_stride = 0;
  int64_t vc_batch_stride = 0, vc_row_stride = 0, vc_head_stride = 0;
  int64_t kn_batch_stride = 0, kn_row_stride = 0, kn_head_stride = 0;
  int64_t vn_batch_stride = 0, vn_row_stride = 0, vn_head_stride = 0;
  DType dtype = DType::BFloat16;
};

// ---- CPU (flash_attn_cpu.cpp) ----
// Forward: work item = (b, q head, query block of kFlashCpuBlockQ rows); the ATen layer runs
// items [begin, end) per thread with at::parallel_for.
constexpr int64_t kFlashCpuBlockQ = 64;
constexpr int64_t kFlashCpuBlockK = 64;
constexpr int64_t kFlashCpuMaxHeadDim = 256;
constexpr int64_t kFlashCpuAmxGroup = 4;  // AMX forward: key blocks per GEMM (flash_attn_bf16_cpu.cpp)
int64_t flash_attn_fwd_cpu_num_items(const FlashAttnParams& p);
// Optional pre-pass (worth it when several query blocks read the same kv head): every key block
// of every (b, kv head) converted once to an accumulation-type K^T tile [Dp][64] and V tile
// [64][Dp] (Dp = D rounded up to 16), tile t = (b * Hkv + kv head) * ceil(seqlen_k / 64) + block,
// stored as pairs in p.kv_tiles (flash_attn_cpu_kv_tiles_elems elements); items = tiles.
// (On the AVX512-BF16 path below the same buffer holds bf16 packed K / V tiles, half the bytes; on AMX
// it holds them grouped by kFlashCpuAmxGroup key blocks, each (b, kv head) padded to whole groups.)
int64_t flash_attn_cpu_num_kv_tiles(const FlashAttnParams& p);
int64_t flash_attn_cpu_kv_tiles_elems(const FlashAttnParams& p);
void flash_attn_pack_kv_cpu(const FlashAttnParams& p, void* tiles, int64_t tile_begin, int64_t tile_end);
void flash_attn_fwd_cpu(const FlashAttnParams& p, int64_t item_begin, int64_t item_end);
// Backward: work item = (b, kv head, key split); every item owns its dK/dV rows (no atomics) and
// adds its dQ contribution into its own slice of dq_accum (num_splits, total_q, Hq, D) in the
// accumulation type (zero-initialized by the caller); flash_attn_bwd_cpu_reduce_dq sums the slices
// in split order into dq. The split count depends only on the shapes: bitwise deterministic.
int64_t flash_attn_bwd_cpu_num_splits(const FlashAttnParams& p);
void flash_attn_bwd_cpu(const FlashAttnParams& p, int64_t num_splits, int64_t item_begin, int64_t item_end);
void flash_attn_bwd_cpu_reduce_dq(const FlashAttnParams& p, int64_t num_splits, int64_t row_begin, int64_t row_end);
void flash_attn_kv_append_cpu(const KvAppendParams& p);
// bfloat16 inputs whose p.cpu_gemm is kAvx512Bf16 or kAmx (flash_attn_bf16_cpu.cpp; the ATen layer
// sets it from cpu_gemm_engine(), common/cpu_gemm.h): the entry points above route bf16 here. Same
// items, splits, dq_accum layout and kv_tiles size as above (the tiles then hold bf16 packed K / V,
// half the bytes).
void flash_attn_fwd_cpu_bf16dot(const FlashAttnParams& p, int64_t item_begin, int64_t item_end);
void flash_attn_pack_kv_cpu_bf16dot(const FlashAttnParams& p, void* tiles, int64_t tile_begin, int64_t tile_end);
void flash_attn_bwd_cpu_bf16dot(const FlashAttnParams& p, int64_t num_splits, int64_t item_begin, int64_t item_end);

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
// ---- CUDA (flash_attn_fwd_cuda.cu, flash_attn_bwd_cuda.cu, flash_attn_decode_cuda.cu) ----
// bf16 / fp16, head_dim in {64, 96, 128}.
bool flash_attn_cuda_supports_head_dim(int64_t d);
cudaError_t flash_attn_fwd_cuda(const FlashAttnParams& p, cudaStream_t stream);
// dq_accum: fp32 (total_q, Hq, D) zero-initialized by the caller; delta scratch fp32 like lse.
cudaError_t flash_attn_bwd_cuda(const FlashAttnParams& p, float* delta, cudaStream_t stream);
// Split-KV decode (flash-decoding): partial (num_splits, B, Hq, Sq, D) fp32 outputs and
// (num_splits, B, Hq, Sq) fp32 lse in `partial_out` / `partial_lse`, then a combine kernel.
int64_t flash_attn_decode_cuda_num_splits(const FlashAttnParams& p, int num_sms);
cudaError_t flash_attn_decode_cuda(const FlashAttnParams& p, int64_t num_splits, float* partial_out,
                                   float* partial_lse, cudaStream_t stream);
cudaError_t flash_attn_kv_append_cuda(const KvAppendParams& p, cudaStream_t stream);
#endif

}  // namespace llmcore
