// flash_attn_cuda_common.cuh — device helpers shared by flash_attn_*_cuda.cu (torch-free):
// mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate), ldmatrix (x4, plain and transposed),
// cp.async 16-byte copies with zero-fill, and the sequence geometry (batched / varlen / KV cache).
//
// Fragment layouts of mma.m16n8k16.row.col (g = lane / 4, t = lane % 4):
//   A (16 x 16): a0 = (row g, cols 2t..2t+1), a1 = (row g+8, same), a2 = (row g, cols 8+2t..),
//                a3 = (row g+8, cols 8+2t..)
//   B (16 x 8):  b0 = (k 2t..2t+1, col g), b1 = (k 8+2t.., col g)
//   C (16 x 8):  c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// so the C fragments of two adjacent 8-column blocks are, once packed to 16 bits, exactly the A
// fragment of a 16-wide k step (used for P V, P^T dO and dS^T Q without a trip through smem).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <algorithm>
#include <type_traits>

#include "flash_attn/flash_attn.h"

namespace llmcore {
namespace fa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (sizeof(T) == 2 && std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills (rows past the sequence end).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(v);
  else return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(v);
  else return __float2half_rn(v);
}

struct SeqDev {
  int64_t q_off, k_off, v_off;  // element offsets of (row 0, head 0)
  int64_t row0, k_row0;         // global rows of query 0 / key 0 (out, dq, dk, dv, varlen lse)
  int sq, sk;
};

__device__ __forceinline__ SeqDev seq_of(const FlashAttnParams& p, int b) {
  SeqDev s;
  if (p.cu_seqlens_q) {
    const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    s.q_off = q0 * p.q_row_stride;
    s.k_off = k0 * p.k_row_stride;
    s.v_off = k0 * p.v_row_stride;
    s.row0 = q0;
    s.k_row0 = k0;
    s.sq = p.cu_seqlens_q[b + 1] - q0;
    s.sk = p.cu_seqlens_k[b + 1] - k0;
  } else {
    s.q_off = b * p.q_batch_stride;
    s.k_off = b * p.k_batch_stride;
    s.v_off = b * p.v_batch_stride;
    s.row0 = static_cast<int64_t>(b) * p.seqlen_q;
    s.k_row0 = static_cast<int64_t>(b) * p.seqlen_k;
    s.sq = static_cast<int>(p.seqlen_q);
    s.sk = static_cast<int>(p.seqused_k ? min(static_cast<int64_t>(p.seqused_k[b]), p.seqlen_k) : p.seqlen_k);
  }
  return s;
}

__device__ __forceinline__ int64_t lse_index(const FlashAttnParams& p, int b, const SeqDev& s, int h, int i) {
  return p.cu_seqlens_q ? h * p.total_q + s.row0 + i : (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
}

}  // namespace fa
}  // namespace llmcore
