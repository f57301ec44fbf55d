// flash_attn_aten.cpp — ATen layer of flash attention: checks, allocation, device guard, stream,
// and the CPU (always) and CUDA (LLMCORE_WITH_CUDA) registrations of
//   flash_attn_fwd / flash_attn_bwd                 (B, S, H, D)
//   flash_attn_varlen_fwd / flash_attn_varlen_bwd   packed (total, H, D) + cu_seqlens
//   flash_attn_with_kvcache                         in-place append + attention over the cache
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
#include "flash_attn/flash_attn.h"

namespace llmcore {
namespace {

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// A view with unit stride in D (copied otherwise); on CUDA also 16-byte aligned rows for the
// vector loads (copied otherwise).
at::Tensor unit_last(const at::Tensor& t) {
  if (t.numel() == 0) return t;
  bool ok = t.stride(-1) == 1;
  if (ok && t.is_cuda()) {
    const int64_t align = 16 / t.element_size();
    ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
    for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.stride(d) % align == 0 || t.size(d) == 1);
  }
  return ok ? t : t.contiguous();
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims) {
  check_float(q, "q");
  check_same_dtype(q, "q", k, "k");
  check_same_dtype(q, "q", v, "v");
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", v, "v");
  check_dim(q, "q", dims);
  check_dim(k, "k", dims);
  check_dim(v, "v", dims);
  LLMCORE_CHECK(k.sizes() == v.sizes(), "arguments 'k' and 'v' must have the same shape, got ", k.sizes(), " and ",
                v.sizes());
  const int64_t D = q.size(-1), Hq = q.size(-2), Hkv = k.size(-2);
  LLMCORE_CHECK(k.size(-1) == D, "argument 'k' must have head_dim ", D, " (q's), got shape ", k.sizes());
  LLMCORE_CHECK(D > 0, "argument 'q' must have head_dim > 0, got shape ", q.sizes());
  LLMCORE_CHECK(Hkv > 0 && Hq % Hkv == 0, "argument 'q' must have a number of heads (", Hq,
                ") divisible by k's number of heads (", Hkv, ")");
  if (q.is_cpu()) {
    LLMCORE_CHECK(D <= kFlashCpuMaxHeadDim, "argument 'q': head_dim must be <= ", kFlashCpuMaxHeadDim,
                  " on CPU, got ", D);
  } else {
    LLMCORE_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                  "argument 'q' must be float16 or bfloat16 on CUDA, got ", q.scalar_type());
#ifdef LLMCORE_WITH_CUDA
    LLMCORE_CHECK(flash_attn_cuda_supports_head_dim(D), "argument 'q': head_dim must be 64, 96 or 128 on CUDA, got ",
                  D);
#endif
  }
}

double resolve_scale(double scale, int64_t D) { return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(D)); }

void set_strides(FlashAttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool varlen) {
  const int o = varlen ? 1 : 0;
  p.q_batch_stride = varlen ? 0 : q.stride(0);
  p.q_row_stride = q.stride(1 - o);
  p.q_head_stride = q.stride(2 - o);
  p.k_batch_stride = varlen ? 0 : k.stride(0);
  p.k_row_stride = k.stride(1 - o);
  p.k_head_stride = k.stride(2 - o);
  p.v_batch_stride = varlen ? 0 : v.stride(0);
  p.v_row_stride = v.stride(1 - o);
  p.v_head_stride = v.stride(2 - o);
}

// The fields every dense (B, S, H, D) launch shares; callers add out/lse/grad pointers.
FlashAttnParams dense_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal) {
  FlashAttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.batch = q.size(0);
  p.seqlen_q = q.size(1);
  p.seqlen_k = k.size(1);
  p.heads_q = q.size(2);
  p.heads_kv = k.size(2);
  p.head_dim = q.size(3);
  p.total_q = q.size(0) * q.size(1);
  set_strides(p, q, k, v, false);
  p.scale = resolve_scale(scale, q.size(3));
  p.causal = causal;
  p.dtype = to_dtype(q.scalar_type());
  return p;
}

[[noreturn]] void no_cuda(const at::Tensor& t) {
  LLMCORE_CHECK(false, "flash_attn: llmcore was built without CUDA support, got a tensor on ", t.device());
  throw;  // unreachable
}

void run_fwd(const FlashAttnParams& p_in, const at::Tensor& q) {
  if (q.is_cpu()) {
    FlashAttnParams p = p_in;
    p.cpu_gemm = cpu_gemm_engine(p.dtype);
    const int64_t items = flash_attn_fwd_cpu_num_items(p);
    // Convert K / V to tiles once when more than one query block reads each kv head (fp32 tiles, or
    // bf16 packed tiles in the first half of the buffer on the AVX512-BF16 path: flash_attn.h).
    at::Tensor tiles;
    if (items >= 2 * p.batch * p.heads_kv) {
      tiles = at::empty({flash_attn_cpu_kv_tiles_elems(p)}, q.options().dtype(acc_dtype(q)));
      at::parallel_for(0, flash_attn_cpu_num_kv_tiles(p), 1,
                       [&](int64_t b, int64_t e) { flash_attn_pack_kv_cpu(p, tiles.data_ptr(), b, e); });
      p.kv_tiles = tiles.data_ptr();
    }
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { flash_attn_fwd_cpu(p, b, e); });
    return;
  }
#ifdef LLMCORE_WITH_CUDA
  LLMCORE_CUDA_CHECK(flash_attn_fwd_cuda(p_in, at::cuda::getCurrentCUDAStream()), "flash_attn_fwd_cuda");
#else
  no_cuda(q);
#endif
}

// Backward of the dense and varlen ops alike: p from dense_params / varlen_params; out, lse, dout
// contiguous; dq, dk, dv allocated by the caller.
void run_bwd(FlashAttnParams& p, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
             const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const int64_t Dp = (p.head_dim + 15) / 16 * 16;
  if (q.is_cpu()) {
    p.cpu_gemm = cpu_gemm_engine(p.dtype);
    const int64_t ns = flash_attn_bwd_cpu_num_splits(p);
    at::Tensor acc = at::zeros({ns, p.total_q, p.heads_q, Dp}, q.options().dtype(acc_dtype(q)));
    p.dq_accum = acc.data_ptr();
    at::parallel_for(0, p.batch * p.heads_kv * ns, 1, [&](int64_t b, int64_t e) { flash_attn_bwd_cpu(p, ns, b, e); });
    at::parallel_for(0, p.total_q * p.heads_q, 64,
                     [&](int64_t b, int64_t e) { flash_attn_bwd_cpu_reduce_dq(p, ns, b, e); });
    return;
  }
#ifdef LLMCORE_WITH_CUDA
  at::Tensor acc = at::zeros({p.total_q, p.heads_q, p.head_dim}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({p.heads_q * p.total_q}, q.options().dtype(at::kFloat));
  p.dq_accum = acc.data_ptr();
  LLMCORE_CUDA_CHECK(flash_attn_bwd_cuda(p, delta.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
                     "flash_attn_bwd_cuda");
#else
  no_cuda(q);
#endif
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                  double softmax_scale, bool causal) {
  check_qkv(q_, k_, v_, 4);
  const int64_t B = q_.size(0), Sq = q_.size(1), Hq = q_.size(2), D = q_.size(3);
  LLMCORE_CHECK(k_.size(0) == B, "argument 'k' must have batch size ", B, " (q's), got shape ", k_.sizes());
  at::Tensor out = at::empty({B, Sq, Hq, D}, q_.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q_.options().dtype(acc_dtype(q_)));
  if (out.numel() == 0) return {out, lse};
  at::Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  c10::OptionalDeviceGuard guard(q.device());
  FlashAttnParams p = dense_params(q, k, v, softmax_scale, causal);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  run_fwd(p, q);
  return {out, lse};
}

void check_bwd_extra(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                     at::IntArrayRef lse_shape) {
  check_float(dout, "dout");
  check_same_dtype(q, "q", dout, "dout");
  check_same_dtype(q, "q", out, "out");
  check_same_device(q, "q", dout, "dout");
  check_same_device(q, "q", out, "out");
  check_same_device(q, "q", lse, "lse");
  check_shape(dout, "dout", q.sizes());
  check_shape(out, "out", q.sizes());
  check_shape(lse, "lse", lse_shape);
  LLMCORE_CHECK(lse.scalar_type() == acc_dtype(q), "argument 'lse' must be ", acc_dtype(q), ", got ",
                lse.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(const at::Tensor& dout_, const at::Tensor& q_,
                                                              const at::Tensor& k_, const at::Tensor& v_,
                                                              const at::Tensor& out_, const at::Tensor& lse_,
                                                              double softmax_scale, bool causal) {
  check_qkv(q_, k_, v_, 4);
  const int64_t B = q_.size(0), Sq = q_.size(1), Hq = q_.size(2);
  LLMCORE_CHECK(k_.size(0) == B, "argument 'k' must have batch size ", B, " (q's), got shape ", k_.sizes());
  check_bwd_extra(dout_, q_, out_, lse_, {B, Hq, Sq});
  at::Tensor dq = at::empty(q_.sizes(), q_.options());
  at::Tensor dk = at::zeros(k_.sizes(), k_.options());
  at::Tensor dv = at::zeros(v_.sizes(), v_.options());
  if (dq.numel() == 0 || dk.numel() == 0) {
    dq.zero_();
    return {dq, dk, dv};
  }
  at::Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  at::Tensor dout = dout_.contiguous(), out = out_.contiguous(), lse = lse_.contiguous();
  c10::OptionalDeviceGuard guard(q.device());
  FlashAttnParams p = dense_params(q, k, v, softmax_scale, causal);
  run_bwd(p, q, out, lse, dout, dq, dk, dv);
  return {dq, dk, dv};
}

void check_cu(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  check_defined(cu, name);
  LLMCORE_CHECK(cu.scalar_type() == at::kInt, "argument '", name, "' must be int32, got ", cu.scalar_type());
  LLMCORE_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "argument '", name, "' must be 1-D with batch + 1 >= 1 entries, got shape ",
                cu.sizes());
  check_same_device(q, "q", cu, name);
}

FlashAttnParams varlen_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                              const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, bool causal) {
  FlashAttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.batch = cu_q.size(0) - 1;
  p.seqlen_q = max_q;
  p.seqlen_k = max_k;
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.head_dim = q.size(2);
  p.total_q = q.size(0);
  set_strides(p, q, k, v, true);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.scale = resolve_scale(scale, q.size(2));
  p.causal = causal;
  p.dtype = to_dtype(q.scalar_type());
  return p;
}

void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                  const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  check_qkv(q, k, v, 3);
  check_cu(cu_q, "cu_seqlens_q", q);
  check_cu(cu_k, "cu_seqlens_k", q);
  LLMCORE_CHECK(cu_q.size(0) == cu_k.size(0), "arguments 'cu_seqlens_q' and 'cu_seqlens_k' must have the same length, got ",
                cu_q.size(0), " and ", cu_k.size(0));
  LLMCORE_CHECK(max_q >= 0 && max_k >= 0, "arguments 'max_seqlen_q' / 'max_seqlen_k' must be >= 0, got ", max_q, " and ",
                max_k);
  if (cu_q.is_cpu()) {  // the cheap host-side validation; on CUDA it would cost a sync
    const int32_t* a = cu_q.data_ptr<int32_t>();
    const int32_t* b = cu_k.data_ptr<int32_t>();
    const int64_t n = cu_q.size(0);
    LLMCORE_CHECK(a[0] == 0 && b[0] == 0, "arguments 'cu_seqlens_q' / 'cu_seqlens_k' must start at 0");
    for (int64_t i = 0; i + 1 < n; ++i) {
      LLMCORE_CHECK(a[i + 1] >= a[i] && a[i + 1] - a[i] <= max_q, "argument 'cu_seqlens_q' must be non-decreasing with "
                    "lengths <= max_seqlen_q (", max_q, "), got a length ", a[i + 1] - a[i], " at ", i);
      LLMCORE_CHECK(b[i + 1] >= b[i] && b[i + 1] - b[i] <= max_k, "argument 'cu_seqlens_k' must be non-decreasing with "
                    "lengths <= max_seqlen_k (", max_k, "), got a length ", b[i + 1] - b[i], " at ", i);
    }
    LLMCORE_CHECK(a[n - 1] <= q.size(0), "argument 'cu_seqlens_q' ends at ", a[n - 1], " > q's ", q.size(0), " rows");
    LLMCORE_CHECK(b[n - 1] <= k.size(0), "argument 'cu_seqlens_k' ends at ", b[n - 1], " > k's ", k.size(0), " rows");
  }
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_fwd(const at::Tensor& q_, const at::Tensor& k_,
                                                         const at::Tensor& v_, const at::Tensor& cu_q_,
                                                         const at::Tensor& cu_k_, int64_t max_q, int64_t max_k,
                                                         double softmax_scale, bool causal) {
  check_varlen(q_, k_, v_, cu_q_, cu_k_, max_q, max_k);
  const int64_t T = q_.size(0), Hq = q_.size(1);
  at::Tensor out = at::zeros(q_.sizes(), q_.options());
  at::Tensor lse = at::full({Hq, T}, -INFINITY, q_.options().dtype(acc_dtype(q_)));
  if (out.numel() == 0 || cu_q_.size(0) < 2 || max_q == 0) return {out, lse};
  at::Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  at::Tensor cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  c10::OptionalDeviceGuard guard(q.device());
  FlashAttnParams p = varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  run_fwd(p, q);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_bwd(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const at::Tensor& cu_q_, const at::Tensor& cu_k_, int64_t max_q, int64_t max_k,
    double softmax_scale, bool causal) {
  check_varlen(q_, k_, v_, cu_q_, cu_k_, max_q, max_k);
  check_bwd_extra(dout_, q_, out_, lse_, {q_.size(1), q_.size(0)});
  at::Tensor dq = at::zeros(q_.sizes(), q_.options());
  at::Tensor dk = at::zeros(k_.sizes(), k_.options());
  at::Tensor dv = at::zeros(v_.sizes(), v_.options());
  if (dq.numel() == 0 || dk.numel() == 0 || cu_q_.size(0) < 2 || max_q == 0) return {dq, dk, dv};
  at::Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  at::Tensor dout = dout_.contiguous(), out = out_.contiguous(), lse = lse_.contiguous();
  at::Tensor cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  c10::OptionalDeviceGuard guard(q.device());
  FlashAttnParams p = varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal);
  run_bwd(p, q, out, lse, dout, dq, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_with_kvcache(const at::Tensor& q_, at::Tensor& k_cache,
                                                           at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                           const c10::optional<at::Tensor>& k_new,
                                                           const c10::optional<at::Tensor>& v_new,
                                                           double softmax_scale, bool causal) {
  check_qkv(q_, k_cache, v_cache, 4);
  const int64_t B = q_.size(0), Sq = q_.size(1), Hq = q_.size(2), D = q_.size(3);
  const int64_t Smax = k_cache.size(1), Hkv = k_cache.size(2);
  LLMCORE_CHECK(k_cache.size(0) == B, "argument 'k_cache' must have batch size ", B, " (q's), got shape ",
                k_cache.sizes());
  LLMCORE_CHECK(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
                "arguments 'k_cache' / 'v_cache' must have unit stride in head_dim (they are written in place)");
  check_defined(cache_seqlens, "cache_seqlens");
  LLMCORE_CHECK(cache_seqlens.scalar_type() == at::kInt, "argument 'cache_seqlens' must be int32, got ",
                cache_seqlens.scalar_type());
  check_shape(cache_seqlens, "cache_seqlens", {B});
  check_same_device(q_, "q", cache_seqlens, "cache_seqlens");
  LLMCORE_CHECK(k_new.has_value() == v_new.has_value(), "arguments 'k_new' and 'v_new' must be given together");
  int64_t s_new = 0;
  if (k_new.has_value()) {
    check_same_dtype(q_, "q", *k_new, "k_new");
    check_same_dtype(q_, "q", *v_new, "v_new");
    check_same_device(q_, "q", *k_new, "k_new");
    check_same_device(q_, "q", *v_new, "v_new");
    check_dim(*k_new, "k_new", 4);
    s_new = k_new->size(1);
    check_shape(*k_new, "k_new", {B, s_new, Hkv, D});
    check_shape(*v_new, "v_new", {B, s_new, Hkv, D});
  }
  at::Tensor cs = cache_seqlens.contiguous();
  if (cs.is_cpu()) {
    const int32_t* c = cs.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      LLMCORE_CHECK(c[b] >= 0 && c[b] + s_new <= Smax, "argument 'cache_seqlens': sequence ", b, " has ", c[b],
                    " cached tokens + ", s_new, " new ones, which does not fit in the cache of ", Smax, " (or is < 0)");
  }
  at::Tensor out = at::empty({B, Sq, Hq, D}, q_.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q_.options().dtype(acc_dtype(q_)));
  c10::OptionalDeviceGuard guard(q_.device());
  if (s_new > 0) {
    at::Tensor kn = unit_last(*k_new), vn = unit_last(*v_new);
    KvAppendParams a;
    a.k_cache = k_cache.data_ptr();
    a.v_cache = v_cache.data_ptr();
    a.k_new = kn.data_ptr();
    a.v_new = vn.data_ptr();
    a.cache_seqlens = cs.data_ptr<int32_t>();
    a.batch = B;
    a.s_new = s_new;
    a.cache_len = Smax;
    a.heads_kv = Hkv;
    a.head_dim = D;
    a.kc_batch_stride = k_cache.stride(0);
    a.kc_row_stride = k_cache.stride(1);
    a.kc_head_stride = k_cache.stride(2);
    a.vc_batch_stride = v_cache.stride(0);
    a.vc_row_stride = v_cache.stride(1);
    a.vc_head_stride = v_cache.stride(2);
    a.kn_batch_stride = kn.stride(0);
    a.kn_row_stride = kn.stride(1);
    a.kn_head_stride = kn.stride(2);
    a.vn_batch_stride = vn.stride(0);
    a.vn_row_stride = vn.stride(1);
    a.vn_head_stride = vn.stride(2);
    a.dtype = to_dtype(q_.scalar_type());
    if (q_.is_cpu()) {
      flash_attn_kv_append_cpu(a);
    } else {
#ifdef LLMCORE_WITH_CUDA
      LLMCORE_CUDA_CHECK(flash_attn_kv_append_cuda(a, at::cuda::getCurrentCUDAStream()), "flash_attn_kv_append_cuda");
#else
      no_cuda(q_);
#endif
    }
  }
  if (out.numel() == 0) return {out, lse};
  at::Tensor q = unit_last(q_);
  at::Tensor kc = unit_last(k_cache), vc = unit_last(v_cache);  // views: unit stride checked above
  at::Tensor seqused = (cs + s_new).to(at::kInt);
  FlashAttnParams p = dense_params(q, kc, vc, softmax_scale, causal);  // seqlen_k = the cache's capacity
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.seqused_k = seqused.data_ptr<int32_t>();
  if (q.is_cpu()) {
    run_fwd(p, q);
    return {out, lse};
  }
#ifdef LLMCORE_WITH_CUDA
  {
    auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t ns = flash_attn_decode_cuda_num_splits(p, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    if (ns <= 0) {
      LLMCORE_CUDA_CHECK(flash_attn_fwd_cuda(p, stream), "flash_attn_fwd_cuda");
    } else {
      at::Tensor po = at::empty({ns, B, Hq, Sq, D}, q.options().dtype(at::kFloat));
      at::Tensor pl = at::empty({ns, B, Hq, Sq}, q.options().dtype(at::kFloat));
      LLMCORE_CUDA_CHECK(flash_attn_decode_cuda(p, ns, po.data_ptr<float>(), pl.data_ptr<float>(), stream),
                         "flash_attn_decode_cuda");
    }
  }
  return {out, lse};
#else
  no_cuda(q);
#endif
}

// The Autograd kernel of flash_attn_with_kvcache: the op is inference-only (no backward), so with
// grad mode on an input that requires grad is refused here, before the cache is written — not an
// output whose backward fails (or silently leaves q without a gradient) later. Otherwise it
// redispatches to the device kernel above.
std::tuple<at::Tensor, at::Tensor> flash_attn_with_kvcache_autograd(const at::Tensor& q, at::Tensor& k_cache,
                                                                    at::Tensor& v_cache,
                                                                    const at::Tensor& cache_seqlens,
                                                                    const c10::optional<at::Tensor>& k_new,
                                                                    const c10::optional<at::Tensor>& v_new,
                                                                    double softmax_scale, bool causal) {
  if (at::GradMode::is_enabled()) {
    const std::pair<const at::Tensor*, const char*> args[] = {
        {&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
        {k_new.has_value() ? &*k_new : nullptr, "k_new"}, {v_new.has_value() ? &*v_new : nullptr, "v_new"}};
    for (const auto& [t, name] : args)
      LLMCORE_CHECK(!(t && t->defined() && t->requires_grad()),
                    "flash_attn_with_kvcache is inference-only (no backward): argument '", name,
                    "' requires grad. Call it under torch.no_grad() / torch.inference_mode(), or use flash_attn "
                    "(which has a backward) to train");
  }
  at::AutoDispatchBelowAutograd below;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("llmcore::flash_attn_with_kvcache", "")
                             .typed<decltype(flash_attn_with_kvcache)>();
  return op.call(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal);
}

}  // namespace

TORCH_LIBRARY_IMPL(llmcore, Autograd, m) {
  m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache_autograd);
}

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd);
  m.impl("flash_attn_bwd", &flash_attn_bwd);
  m.impl("flash_attn_varlen_fwd", &flash_attn_varlen_fwd);
  m.impl("flash_attn_varlen_bwd", &flash_attn_varlen_bwd);
  m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd);
  m.impl("flash_attn_bwd", &flash_attn_bwd);
  m.impl("flash_attn_varlen_fwd", &flash_attn_varlen_fwd);
  m.impl("flash_attn_varlen_bwd", &flash_attn_varlen_bwd);
  m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache);
}
#endif

}  // namespace llmcore
