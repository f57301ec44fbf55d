// flash_attn_fwd_cuda.cu — FlashAttention-2 style forward on tensor cores (sm_80+, also the sm_90a
// build), the split-KV decode variant (flash-decoding) with its combine kernel, and the KV-cache
// append. Math and layouts in flash_attn.h; mma / ldmatrix fragment layouts in
// flash_attn_cuda_common.cuh.
//
// Grid / block -> data: one CTA of 4 warps (128 threads) per (block of BM = 64 query rows, head,
// sequence [x split]); warp w owns rows 16w..16w+15 for the whole kernel (no inter-warp softmax
// traffic). The CTA walks key blocks of BN = 64: K and V tiles are double-buffered in shared
// memory with cp.async (the next tile loads while this one is computed); rows are padded by 8
// elements (16 bytes) so every ldmatrix is bank-conflict free without a swizzle.
//   S = Q K^T:  Q fragments live in registers for the whole kernel (ldmatrix once), K fragments
//               come from smem with ldmatrix.x4 (two 8-key column blocks per instruction);
//   online softmax in base 2 (scores pre-multiplied by scale * log2 e): each thread holds rows g
//               and g + 8 of its warp, the row max is reduced over the quad with two shuffles,
//               the row sum stays a per-thread partial until the epilogue (FlashAttention-2);
//   O += P V:   P is re-packed from the S accumulators into A fragments (no smem round trip), V
//               fragments via ldmatrix.x4.trans.
// Causal: key blocks past the last key any row of the CTA can see are never visited (skipped,
// not masked); only the block(s) crossing the diagonal or the sequence end run the mask. CTAs are
// launched heaviest (last query block) first.
// GQA: kv head = q head / (Hq / Hkv). For short queries (Sq * G <= 64: decoding) the G q heads of
// one kv head are packed into the M dimension ("pack GQA": row r of the tile is query r / G,
// head r % G) so each K/V byte loaded serves G heads.
// Decode (flash_attn_with_kvcache, Sq small): the key blocks are also split over gridDim.z
// (flash-decoding), each split writes an fp32 partial output normalized by its own sum plus its
// lse, and fa_combine_kernel merges them: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) O_s.
// Numerics: fp32 accumulators for S, O, m, l; exp2f; out rounded once to the input dtype.
// Fully masked rows (no visible key) keep m = -inf, l = 0 and write out = 0, lse = -inf; a NaN
// score (NaN in q or k) makes l NaN and so out and lse of that row NaN (also through the combine).
#include "flash_attn/flash_attn.h"
#include "flash_attn/flash_attn_cuda_common.cuh"

namespace llmcore {
namespace {

using namespace fa;

constexpr int kBM = 64, kBN = 64, kThreads = 128;

struct FwdArgs {
  FlashAttnParams p;
  int pack_g;        // q heads packed per CTA row block (1, or Hq / Hkv for decoding)
  int num_splits;    // key-block splits (decode); 1 otherwise
  float scale_log2;  // scale * log2(e)
  float* partial_out;  // (num_splits, B, Hq, Sq, D) fp32 when SPLIT
  float* partial_lse;  // (num_splits, B, Hq, Sq) fp32 when SPLIT
};

template <typename T, int D, bool SPLIT>
__global__ void __launch_bounds__(kThreads) fa_fwd_kernel(const FwdArgs args) {
  constexpr int SD = D + 8;    // smem row stride (elements): 16-byte pad, conflict-free ldmatrix
  constexpr int KC = D / 8;    // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + kBM * SD;        // [2][kBN * SD]
  T* Vs = Ks + 2 * kBN * SD;    // [2][kBN * SD]

  const FlashAttnParams& p = args.p;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int pg = args.pack_g;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal blocks first
  const int hb = blockIdx.y;                       // q head (pg == 1) or kv head (pg > 1)
  const int b = SPLIT ? blockIdx.z / args.num_splits : blockIdx.z;
  const int split = SPLIT ? blockIdx.z % args.num_splits : 0;
  const SeqDev s = seq_of(p, b);
  const int rows = s.sq * pg;  // packed rows of this (sequence, head group)
  const int m0 = m_block * kBM;
  if (m0 >= rows) return;
  const int G = static_cast<int>(p.heads_q / p.heads_kv);
  const int hk = pg > 1 ? hb : hb / G;
  const int off = s.sk - s.sq;  // bottom-right causal offset

  // last key any row of this CTA may see
  const int i_last = (min(m0 + kBM, rows) - 1) / pg;
  int kend = p.causal ? min(s.sk, i_last + off + 1) : s.sk;
  kend = max(kend, 0);
  const int n_blocks = (kend + kBN - 1) / kBN;
  int nb_begin = 0, nb_end = n_blocks;
  if (SPLIT) {
    const int per = (n_blocks + args.num_splits - 1) / args.num_splits;
    nb_begin = min(n_blocks, split * per);
    nb_end = min(n_blocks, nb_begin + per);
  }

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k) + s.k_off + static_cast<int64_t>(hk) * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + s.v_off + static_cast<int64_t>(hk) * p.v_head_stride;

  // ---- Q tile (zero-filled past the last row) ----
  for (int c = tid; c < kBM * KC; c += kThreads) {
    const int r = c / KC, col = (c % KC) * 8, R = m0 + r;
    const bool valid = R < rows;
    const int i = valid ? R / pg : 0;
    const int h = pg > 1 ? hb * pg + (valid ? R % pg : 0) : hb;
    const T* src = q + s.q_off + static_cast<int64_t>(i) * p.q_row_stride + static_cast<int64_t>(h) * p.q_head_stride + col;
    cp_async16(Qs + r * SD + col, valid ? src : q, valid);
  }
  auto load_kv = [&](int n, int buf) {
    T* kd = Ks + buf * kBN * SD;
    T* vd = Vs + buf * kBN * SD;
    for (int c = tid; c < kBN * KC; c += kThreads) {
      const int r = c / KC, col = (c % KC) * 8, key = n * kBN + r;
      const bool valid = key < s.sk;
      const int64_t kk = valid ? key : 0;
      cp_async16(kd + r * SD + col, k + kk * p.k_row_stride + col, valid);
      cp_async16(vd + r * SD + col, v + kk * p.v_row_stride + col, valid);
    }
  };
  if (nb_begin < nb_end) load_kv(nb_begin, 0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(qf[kk], Qs + (warp * 16 + (lane % 16)) * SD + kk * 16 + (lane / 16) * 8);

  // query index of this thread's two rows (g, g + 8 of the warp) for the causal mask
  int qi[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) qi[r] = (m0 + warp * 16 + g + 8 * r) / pg;
  const int i_first = m0 / pg;

  float o[D / 8][4];
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};

  for (int n = nb_begin; n < nb_end; ++n) {
    const int buf = (n - nb_begin) & 1;
    if (n > nb_begin) {
      cp_async_wait_all();
      __syncthreads();  // tile n visible to all; every warp is done with tile n - 1's buffer
    }
    if (n + 1 < nb_end) load_kv(n + 1, buf ^ 1);
    cp_async_commit();
    const T* Kb = Ks + buf * kBN * SD;
    const T* Vb = Vs + buf * kBN * SD;

    float sc[kBN / 8][4];
#pragma unroll
    for (int nb = 0; nb < kBN / 8; ++nb) sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t kf[4];
        ldmatrix_x4(kf, Kb + (np * 16 + (lane / 16) * 8 + (lane % 8)) * SD + kk * 16 + ((lane / 8) % 2) * 8);
        mma16816<T>(sc[2 * np], qf[kk], kf[0], kf[1]);
        mma16816<T>(sc[2 * np + 1], qf[kk], kf[2], kf[3]);
      }
    }
    const int key0 = n * kBN;
    const bool need_mask = key0 + kBN > s.sk || (p.causal && key0 + kBN - 1 > i_first + off);
#pragma unroll
    for (int nb = 0; nb < kBN / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + nb * 8 + 2 * t + (e & 1);
        const bool masked = need_mask && (key >= s.sk || (p.causal && key > qi[e >> 1] + off));
        sc[nb][e] = masked ? -INFINITY : sc[nb][e] * args.scale_log2;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) mx = fmaxf(mx, fmaxf(sc[nb][2 * r], sc[nb][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_r[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: exp2(-inf) = 0
      const float alpha = exp2f(m_r[r] - m_use);
      m_r[r] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) {
        sc[nb][2 * r] = exp2f(sc[nb][2 * r] - m_use);
        sc[nb][2 * r + 1] = exp2f(sc[nb][2 * r + 1] - m_use);
        rs += sc[nb][2 * r] + sc[nb][2 * r + 1];
      }
      l_r[r] = l_r[r] * alpha + rs;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        o[nb][2 * r] *= alpha;
        o[nb][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]), pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                              pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, Vb + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * SD + dp * 16 + (lane / 16) * 8);
        mma16816<T>(o[2 * dp], pa, vf[0], vf[1]);
        mma16816<T>(o[2 * dp + 1], pa, vf[2], vf[3]);
      }
    }
  }
  cp_async_wait_all();

  // ---- epilogue: finish the row sums, normalize, write out and lse ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_r[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    // l == 0: no visible key (out 0, lse -inf). A NaN score (NaN in q or k) made l NaN: out and lse
    // NaN too (fmaxf dropped the NaN from m, but exp2f(NaN - m) put it into l).
    const float inv = l == 0.f ? 0.f : 1.f / l;
    const float lse = l == 0.f ? -INFINITY : (m_r[r] + __log2f(l)) * kLn2;
    const int R = m0 + warp * 16 + g + 8 * r;
    if (R >= rows) continue;
    const int i = R / pg, h = pg > 1 ? hb * pg + R % pg : hb;
    if (SPLIT) {
      const int64_t row = ((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q + i;
      float* dst = args.partial_out + row * D;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb)
        *reinterpret_cast<float2*>(dst + nb * 8 + 2 * t) = make_float2(o[nb][2 * r] * inv, o[nb][2 * r + 1] * inv);
      if (t == 0) args.partial_lse[row] = lse;
    } else {
      T* dst = static_cast<T*>(p.out) + ((s.row0 + i) * p.heads_q + h) * D;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb)
        *reinterpret_cast<uint32_t*>(dst + nb * 8 + 2 * t) = pack2<T>(o[nb][2 * r] * inv, o[nb][2 * r + 1] * inv);
      if (t == 0) static_cast<float*>(p.lse)[lse_index(p, b, s, h, i)] = lse;
    }
  }
}

// One CTA per (b, h, i): merge the split partials. Block of D threads, one per output column.
template <typename T, int D>
__global__ void __launch_bounds__(D) fa_combine_kernel(const FwdArgs args) {
  const FlashAttnParams& p = args.p;
  const int64_t row = blockIdx.x;  // ((b * Hq + h) * Sq + i)
  const int64_t rows_per_split = p.batch * p.heads_q * p.seqlen_q;
  const int ns = args.num_splits;
  float mx = -INFINITY;
  bool nan = false;  // a split whose row went NaN (NaN in q or k): the merged row is NaN
  for (int sp = 0; sp < ns; ++sp) {
    const float l = args.partial_lse[sp * rows_per_split + row];
    mx = fmaxf(mx, l);
    nan |= isnan(l);
  }
  const int i = static_cast<int>(row % p.seqlen_q);
  const int64_t bh = row / p.seqlen_q;
  const int h = static_cast<int>(bh % p.heads_q), b = static_cast<int>(bh / p.heads_q);
  T* out = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.seqlen_q + i) * p.heads_q + h) * D;
  if (nan) {
    out[threadIdx.x] = from_float<T>(__int_as_float(0x7fc00000));
    if (threadIdx.x == 0) static_cast<float*>(p.lse)[row] = __int_as_float(0x7fc00000);
    return;
  }
  if (mx == -INFINITY) {  // no split saw a key
    out[threadIdx.x] = from_float<T>(0.f);
    if (threadIdx.x == 0) static_cast<float*>(p.lse)[row] = -INFINITY;
    return;
  }
  float sum = 0.f;
  for (int sp = 0; sp < ns; ++sp) sum += exp2f((args.partial_lse[sp * rows_per_split + row] - mx) * kLog2e);
  const float lse = mx + __logf(sum);
  float acc = 0.f;
  for (int sp = 0; sp < ns; ++sp) {
    const float w = exp2f((args.partial_lse[sp * rows_per_split + row] - lse) * kLog2e);
    acc += w * args.partial_out[(sp * rows_per_split + row) * D + threadIdx.x];
  }
  out[threadIdx.x] = from_float<T>(acc);
  if (threadIdx.x == 0) static_cast<float*>(p.lse)[row] = lse;
}

// In-place append: one thread per element (the append is a few rows; no alignment demands).
constexpr int kAppendThreads = 256;

__global__ void __launch_bounds__(kAppendThreads) fa_kv_append_kernel(const KvAppendParams a, int64_t cache_len) {
  const int64_t total = a.batch * a.s_new * a.heads_kv * a.head_dim;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % a.head_dim, h = (idx / a.head_dim) % a.heads_kv;
    const int64_t i = (idx / a.head_dim / a.heads_kv) % a.s_new, b = idx / a.head_dim / a.heads_kv / a.s_new;
    const int64_t pos = a.cache_seqlens[b] + i;
    if (pos < 0 || pos >= cache_len) continue;  // would overflow the cache: skipped (documented)
    uint16_t* kc = static_cast<uint16_t*>(a.k_cache);
    uint16_t* vc = static_cast<uint16_t*>(a.v_cache);
    const uint16_t* kn = static_cast<const uint16_t*>(a.k_new);
    const uint16_t* vn = static_cast<const uint16_t*>(a.v_new);
    kc[b * a.kc_batch_stride + pos * a.kc_row_stride + h * a.kc_head_stride + d] =
        kn[b * a.kn_batch_stride + i * a.kn_row_stride + h * a.kn_head_stride + d];
    vc[b * a.vc_batch_stride + pos * a.vc_row_stride + h * a.vc_head_stride + d] =
        vn[b * a.vn_batch_stride + i * a.vn_row_stride + h * a.vn_head_stride + d];
  }
}

int pack_g_for(const FlashAttnParams& p) {
  const int64_t G = p.heads_q / p.heads_kv;
  return (G > 1 && p.seqlen_q * G <= kBM) ? static_cast<int>(G) : 1;
}

template <typename T, int D, bool SPLIT>
cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  const int smem = (kBM + 4 * kBN) * (D + 8) * static_cast<int>(sizeof(T));
  auto kernel = fa_fwd_kernel<T, D, SPLIT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int64_t m_blocks = (a.p.seqlen_q * a.pack_g + kBM - 1) / kBM;
  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(a.p.heads_q / a.pack_g),
                  static_cast<unsigned>(a.p.batch * a.num_splits));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess || !SPLIT) return err;
  fa_combine_kernel<T, D><<<static_cast<unsigned>(a.p.batch * a.p.heads_q * a.p.seqlen_q), D, 0, stream>>>(a);
  return cudaGetLastError();
}

template <bool SPLIT>
cudaError_t dispatch_fwd(const FwdArgs& a, cudaStream_t stream) {
  const bool bf16 = a.p.dtype == DType::BFloat16;
  switch (a.p.head_dim) {
    case 64: return bf16 ? launch_fwd<__nv_bfloat16, 64, SPLIT>(a, stream) : launch_fwd<__half, 64, SPLIT>(a, stream);
    case 96: return bf16 ? launch_fwd<__nv_bfloat16, 96, SPLIT>(a, stream) : launch_fwd<__half, 96, SPLIT>(a, stream);
    case 128:
      return bf16 ? launch_fwd<__nv_bfloat16, 128, SPLIT>(a, stream) : launch_fwd<__half, 128, SPLIT>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool flash_attn_cuda_supports_head_dim(int64_t d) { return d == 64 || d == 96 || d == 128; }

cudaError_t flash_attn_fwd_cuda(const FlashAttnParams& p, cudaStream_t stream) {
  if (p.dtype != DType::BFloat16 && p.dtype != DType::Float16) return cudaErrorInvalidValue;
  FwdArgs a{p, pack_g_for(p), 1, static_cast<float>(p.scale) * kLog2e, nullptr, nullptr};
  return dispatch_fwd<false>(a, stream);
}

int64_t flash_attn_decode_cuda_num_splits(const FlashAttnParams& p, int num_sms) {
  // Split along the cache only when the plain grid cannot fill the GPU; each split keeps >= 2
  // key blocks so the combine stays cheap. 0 means "use the plain forward".
  if (p.cu_seqlens_q) return 0;
  const int pg = pack_g_for(p);
  const int64_t ctas = ((p.seqlen_q * pg + kBM - 1) / kBM) * (p.heads_q / pg) * p.batch;
  const int64_t n_blocks = (p.seqlen_k + kBN - 1) / kBN;
  if (ctas >= num_sms || n_blocks < 4) return 0;
  const int64_t want = (2 * num_sms + ctas - 1) / ctas;
  const int64_t ns = std::min<int64_t>(std::min<int64_t>(want, n_blocks / 2), 64);
  return ns >= 2 ? ns : 0;
}

cudaError_t flash_attn_decode_cuda(const FlashAttnParams& p, int64_t num_splits, float* partial_out,
                                   float* partial_lse, cudaStream_t stream) {
  if (p.dtype != DType::BFloat16 && p.dtype != DType::Float16) return cudaErrorInvalidValue;
  FwdArgs a{p, pack_g_for(p), static_cast<int>(num_splits), static_cast<float>(p.scale) * kLog2e, partial_out,
            partial_lse};
  return dispatch_fwd<true>(a, stream);
}

cudaError_t flash_attn_kv_append_cuda(const KvAppendParams& a, cudaStream_t stream) {
  const int64_t total = a.batch * a.s_new * a.heads_kv * a.head_dim;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((total + kAppendThreads - 1) / kAppendThreads, 4096);
  fa_kv_append_kernel<<<static_cast<unsigned>(blocks), kAppendThreads, 0, stream>>>(a, a.cache_len);
  return cudaGetLastError();
}

}  // namespace llmcore
