// flash_attn_bwd_cuda.cu — FlashAttention-2 style backward on tensor cores (sm_80+, also built for
// sm_90a). Math and layouts in flash_attn.h; fragment layouts in flash_attn_cuda_common.cuh.
//
// Three kernels:
//   fa_bwd_delta_kernel:  delta[row, h] = sum_d dO * O   (one warp per (row, head); fp32)
//   fa_bwd_kernel:        one CTA (4 warps) per (block of BN = 64 keys, kv head, sequence). It
//                         owns that block's dK / dV for the whole kernel (fp32 registers, written
//                         once: no atomics, deterministic) and walks, for every q head of the GQA
//                         group, the query blocks of BM rows that can see the key block (causal:
//                         blocks entirely above the diagonal are skipped). Q / dO / lse / delta
//                         tiles are double-buffered with cp.async. Warp w owns keys 16w..16w+15
//                         and computes everything transposed (keys = M dimension):
//                           S^T = K Q^T,  P^T = exp2(S^T * scale * log2 e - lse * log2 e)  (from lse:
//                           no S x S matrix is ever stored),  dV += P^T dO,  dP^T = V dO^T,
//                           dS^T = P^T * (dP^T - delta) * scale,  dK += dS^T Q
//                         (P^T and dS^T go from accumulators straight into A fragments); dS^T is
//                         staged in smem (16-bit) and dQ += dS K is added with fp32 atomicAdd into
//                         dq_accum (total_q, Hq, D).
//   fa_bwd_dq_kernel:     dq = dq_accum rounded to the input dtype.
// Determinism: dK and dV are bitwise deterministic; dQ is not (fp32 atomics from the key blocks
// arrive in any order) — the same choice as FlashAttention-2's default; the CPU backward is fully
// deterministic.
// Tiles: BN = 64 keys; BM = 64 queries for D = 64, 32 for D = 96 / 128 (keeps dK + dV + S + dP
// accumulators within 255 registers without spilling). Smem rows padded by 8 elements.
#include "flash_attn/flash_attn.h"
#include "flash_attn/flash_attn_cuda_common.cuh"

namespace llmcore {
namespace {

using namespace fa;

constexpr int kBN = 64, kThreads = 128;
constexpr int kAuxThreads = 256;  // the delta and dq-conversion kernels' blocks (__launch_bounds__)

struct BwdArgs {
  FlashAttnParams p;
  float scale_log2;
  float* delta;  // (total_q, Hq) fp32
};


template <typename T>
__global__ void __launch_bounds__(kAuxThreads) fa_bwd_delta_kernel(const BwdArgs a) {
  const FlashAttnParams& p = a.p;
  const int64_t pair = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;  // row * Hq + h
  const int lane = threadIdx.x % 32;
  if (pair >= p.total_q * p.heads_q) return;
  const T* o = static_cast<const T*>(p.out) + pair * p.head_dim;
  const T* d = static_cast<const T*>(p.dout) + pair * p.head_dim;
  float acc = 0.f;
  for (int c = lane; c < p.head_dim; c += 32) acc += to_float(o[c]) * to_float(d[c]);
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (lane == 0) a.delta[pair] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kAuxThreads) fa_bwd_dq_kernel(const BwdArgs a) {
  const int64_t n = a.p.total_q * a.p.heads_q * a.p.head_dim;
  const float* src = static_cast<const float*>(a.p.dq_accum);
  T* dst = static_cast<T*>(a.p.dq);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = from_float<T>(src[i]);
}

template <int D> struct BwdTile { static constexpr int BM = D <= 64 ? 64 : 32; };

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fa_bwd_kernel(const BwdArgs args) {
  constexpr int BM = BwdTile<D>::BM;
  constexpr int SD = D + 8, KC = D / 8, SS = BM + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);  // [kBN][SD]
  T* Vs = Ks + kBN * SD;                   // [kBN][SD]
  T* Qs = Vs + kBN * SD;                   // [2][BM][SD]
  T* dOs = Qs + 2 * BM * SD;               // [2][BM][SD]
  T* dSs = dOs + 2 * BM * SD;              // [kBN][SS]: dS^T (keys x queries)
  float* lse_s = reinterpret_cast<float*>(dSs + kBN * SS);  // [2][BM] lse * log2 e (+inf: no key)
  float* del_s = lse_s + 2 * BM;                            // [2][BM]

  const FlashAttnParams& p = args.p;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int hk = blockIdx.y, b = blockIdx.z;
  const SeqDev s = seq_of(p, b);
  const int j0 = blockIdx.x * kBN;
  if (j0 >= s.sk) return;  // dk / dv were zero-initialized by the caller
  const int off = s.sk - s.sq;
  const int G = static_cast<int>(p.heads_q / p.heads_kv);
  const int q_first = p.causal ? max(0, j0 - off) : 0;  // first query that sees key j0
  if (q_first >= s.sq) return;
  const int mb_start = q_first / BM, n_mb = (s.sq + BM - 1) / BM - mb_start;
  const int total_it = G * n_mb;
  const float scale = static_cast<float>(p.scale);

  const T* q = static_cast<const T*>(p.q) + s.q_off;
  const T* dout = static_cast<const T*>(p.dout);
  const float* lse = static_cast<const float*>(p.lse);
  float* dq_acc = static_cast<float*>(p.dq_accum);

  {  // K, V tiles of this CTA (zero-filled past the sequence end)
    const T* k = static_cast<const T*>(p.k) + s.k_off + static_cast<int64_t>(hk) * p.k_head_stride;
    const T* v = static_cast<const T*>(p.v) + s.v_off + static_cast<int64_t>(hk) * p.v_head_stride;
    for (int c = tid; c < kBN * KC; c += kThreads) {
      const int r = c / KC, col = (c % KC) * 8, key = j0 + r;
      const bool valid = key < s.sk;
      const int64_t kk = valid ? key : 0;
      cp_async16(Ks + r * SD + col, k + kk * p.k_row_stride + col, valid);
      cp_async16(Vs + r * SD + col, v + kk * p.v_row_stride + col, valid);
    }
  }
  auto load_q = [&](int it, int buf) {
    const int h = hk * G + it / n_mb, i0 = (mb_start + it % n_mb) * BM;
    for (int c = tid; c < BM * KC; c += kThreads) {
      const int r = c / KC, col = (c % KC) * 8, i = i0 + r;
      const bool valid = i < s.sq;
      const int64_t ii = valid ? i : 0;
      cp_async16(Qs + (buf * BM + r) * SD + col, q + ii * p.q_row_stride + static_cast<int64_t>(h) * p.q_head_stride + col,
                 valid);
      cp_async16(dOs + (buf * BM + r) * SD + col, dout + ((s.row0 + ii) * p.heads_q + h) * D + col, valid);
    }
    for (int r = tid; r < BM; r += kThreads) {
      const int i = i0 + r;
      float l = INFINITY, dl = 0.f;
      if (i < s.sq) {
        const float lv = lse[lse_index(p, b, s, h, i)];
        l = lv == -INFINITY ? INFINITY : lv * kLog2e;
        dl = args.delta[(s.row0 + i) * p.heads_q + h];
      }
      lse_s[buf * BM + r] = l;
      del_s[buf * BM + r] = dl;
    }
  };
  load_q(0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nb][e] = dv[nb][e] = 0.f;

  const int krow = warp * 16;  // this warp's keys within the tile
  for (int it = 0; it < total_it; ++it) {
    const int buf = it & 1;
    cp_async_wait_all();
    __syncthreads();  // tile `it` (and K / V) visible; everyone is done with buffer buf ^ 1 and dSs
    if (it + 1 < total_it) load_q(it + 1, buf ^ 1);
    cp_async_commit();
    const int h = hk * G + it / n_mb, i0 = (mb_start + it % n_mb) * BM;
    const T* Qb = Qs + buf * BM * SD;
    const T* dOb = dOs + buf * BM * SD;
    const float* lb = lse_s + buf * BM;
    const float* db = del_s + buf * BM;

    // S^T = K Q^T and dP^T = V dO^T (16 keys x BM queries per warp)
    float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nb][e] = dpt[nb][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      ldmatrix_x4(ka, Ks + (krow + (lane % 16)) * SD + kk * 16 + (lane / 16) * 8);
      ldmatrix_x4(va, Vs + (krow + (lane % 16)) * SD + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int qp = 0; qp < BM / 16; ++qp) {
        uint32_t qb[4], ob[4];
        const int ro = (qp * 16 + (lane / 16) * 8 + (lane % 8)) * SD + kk * 16 + ((lane / 8) % 2) * 8;
        ldmatrix_x4(qb, Qb + ro);
        ldmatrix_x4(ob, dOb + ro);
        mma16816<T>(st[2 * qp], ka, qb[0], qb[1]);
        mma16816<T>(st[2 * qp + 1], ka, qb[2], qb[3]);
        mma16816<T>(dpt[2 * qp], va, ob[0], ob[1]);
        mma16816<T>(dpt[2 * qp + 1], va, ob[2], ob[3]);
      }
    }
    // P^T (masked entries 0) and dS^T = P^T (dP^T - delta) * scale
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = j0 + krow + g + 8 * (e >> 1);
        const int qc = nb * 8 + 2 * t + (e & 1), i = i0 + qc;
        const bool masked = key >= s.sk || (p.causal && key > i + off);
        const float pv = masked ? 0.f : exp2f(st[nb][e] * args.scale_log2 - lb[qc]);
        st[nb][e] = pv;
        dpt[nb][e] = pv * (dpt[nb][e] - db[qc]) * scale;
      }
    // dV += P^T dO, dK += dS^T Q (k = queries; B fragments via ldmatrix.trans of row-major dO / Q)
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                              pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                              pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      const uint32_t sa[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                              pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                              pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t ob[4], qb[4];
        const int ro = (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * SD + dp * 16 + (lane / 16) * 8;
        ldmatrix_x4_trans(ob, dOb + ro);
        ldmatrix_x4_trans(qb, Qb + ro);
        mma16816<T>(dv[2 * dp], pa, ob[0], ob[1]);
        mma16816<T>(dv[2 * dp + 1], pa, ob[2], ob[3]);
        mma16816<T>(dk[2 * dp], sa, qb[0], qb[1]);
        mma16816<T>(dk[2 * dp + 1], sa, qb[2], qb[3]);
      }
      // stage dS^T for the dQ product (rows = keys, cols = queries)
      T* ds_row0 = dSs + (krow + g) * SS + kk * 16 + 2 * t;
      T* ds_row8 = ds_row0 + 8 * SS;
      *reinterpret_cast<uint32_t*>(ds_row0) = sa[0];
      *reinterpret_cast<uint32_t*>(ds_row8) = sa[1];
      *reinterpret_cast<uint32_t*>(ds_row0 + 8) = sa[2];
      *reinterpret_cast<uint32_t*>(ds_row8 + 8) = sa[3];
    }
    __syncthreads();
    // dQ[i0 + 0..BM) += dS K: warp -> (16-query group qg, slice of D); fp32 atomics into dq_accum
    {
      constexpr int QG = BM / 16, PARTS = 4 / QG, DW = D / PARTS;
      const int qg = warp % QG, part = warp / QG;
      uint32_t da[kBN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        const int mi = lane / 8;
        ldmatrix_x4_trans(da[kk], dSs + (kk * 16 + (lane % 8) + (mi / 2) * 8) * SS + qg * 16 + (mi % 2) * 8);
      }
#pragma unroll
      for (int dp = 0; dp < DW / 16; ++dp) {
        const int d0 = part * DW + dp * 16;
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          uint32_t kb[4];
          ldmatrix_x4_trans(kb, Ks + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * SD + d0 + (lane / 16) * 8);
          mma16816<T>(acc[0], da[kk], kb[0], kb[1]);
          mma16816<T>(acc[1], da[kk], kb[2], kb[3]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = i0 + qg * 16 + g + 8 * r;
          if (i >= s.sq) continue;
          float* dst = dq_acc + ((s.row0 + i) * p.heads_q + h) * D + d0 + 2 * t;
          atomicAdd(dst, acc[0][2 * r]);
          atomicAdd(dst + 1, acc[0][2 * r + 1]);
          atomicAdd(dst + 8, acc[1][2 * r]);
          atomicAdd(dst + 9, acc[1][2 * r + 1]);
        }
      }
    }
  }
  cp_async_wait_all();

  // dK (already scaled through dS) and dV
  T* dkp = static_cast<T*>(p.dk);
  T* dvp = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = j0 + krow + g + 8 * r;
    if (key >= s.sk) continue;
    const int64_t base = ((s.k_row0 + key) * p.heads_kv + hk) * D;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      *reinterpret_cast<uint32_t*>(dkp + base + nb * 8 + 2 * t) = pack2<T>(dk[nb][2 * r], dk[nb][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(dvp + base + nb * 8 + 2 * t) = pack2<T>(dv[nb][2 * r], dv[nb][2 * r + 1]);
    }
  }
}

template <typename T, int D>
cudaError_t launch_bwd(const BwdArgs& a, cudaStream_t stream) {
  constexpr int BM = BwdTile<D>::BM;
  const FlashAttnParams& p = a.p;
  const int64_t pairs = p.total_q * p.heads_q;
  fa_bwd_delta_kernel<T><<<static_cast<unsigned>((pairs * 32 + kAuxThreads - 1) / kAuxThreads), kAuxThreads, 0,
                           stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int smem = (2 * kBN * (D + 8) + 4 * BM * (D + 8) + kBN * (BM + 8)) * static_cast<int>(sizeof(T)) +
                   4 * BM * static_cast<int>(sizeof(float));
  auto kernel = fa_bwd_kernel<T, D>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.seqlen_k + kBN - 1) / kBN), static_cast<unsigned>(p.heads_kv),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t n = pairs * p.head_dim;
  const int64_t blocks = std::min<int64_t>((n + kAuxThreads - 1) / kAuxThreads, 65535);
  fa_bwd_dq_kernel<T><<<static_cast<unsigned>(blocks), kAuxThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t flash_attn_bwd_cuda(const FlashAttnParams& p, float* delta, cudaStream_t stream) {
  if (p.dtype != DType::BFloat16 && p.dtype != DType::Float16) return cudaErrorInvalidValue;
  const BwdArgs a{p, static_cast<float>(p.scale) * kLog2e, delta};
  const bool bf16 = p.dtype == DType::BFloat16;
  switch (p.head_dim) {
    case 64: return bf16 ? launch_bwd<__nv_bfloat16, 64>(a, stream) : launch_bwd<__half, 64>(a, stream);
    case 96: return bf16 ? launch_bwd<__nv_bfloat16, 96>(a, stream) : launch_bwd<__half, 96>(a, stream);
    case 128: return bf16 ? launch_bwd<__nv_bfloat16, 128>(a, stream) : launch_bwd<__half, 128>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace llmcore
