// moe_aten.cpp — ATen layer of moe_route / moe_dispatch / moe_combine: checks, allocation, device
// guard, stream, and the CPU (always) and CUDA (LLMCORE_WITH_CUDA) registrations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>

#include "common/alloc.h"
#include "common/checks.h"
#include "moe/moe.h"

namespace llmcore {
namespace {

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

MoeScore parse_score(c10::string_view score) {
  if (score == "softmax") return MoeScore::Softmax;
  if (score == "sigmoid") return MoeScore::Sigmoid;
  LLMCORE_CHECK(false, "argument 'score' must be \"softmax\" or \"sigmoid\", got \"", std::string(score), "\"");
  return MoeScore::Softmax;
}

void check_index(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  LLMCORE_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "argument '", name,
                "' must be int32 or int64, got ", t.scalar_type());
}

// topk_ids as contiguous int32. int64 ids are saturated, not wrapped, so an id >= 2^31 stays out of
// range (a plain cast would turn 2^32 + 1 into the valid id 1).
at::Tensor ids_as_int32(const at::Tensor& t) {
  if (t.scalar_type() == at::kInt) return t.contiguous();
  return t.clamp(std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()).to(at::kInt).contiguous();
}

void check_experts_on_device(const at::Tensor& t, int64_t experts, const char* what) {
#ifdef LLMCORE_WITH_CUDA
  if (t.is_cuda())
    LLMCORE_CHECK(experts <= kMoeCudaMaxExperts, what, ": the CUDA kernels take at most ", kMoeCudaMaxExperts,
                  " experts, got ", experts);
#endif
  (void)t, (void)experts, (void)what;
}

// Every entry of the contiguous int32 index tensor `idx` (T, k) must lie in [0, hi), or be -1 when
// `dropped_ok` (a slot CUDA's moe_dispatch dropped). The kernels index memory with these values,
// so this runs before any of them. CPU: one pass over the T*k indices, negligible next to the T*k
// rows of H values they select. CUDA: one aminmax over the indices on the device and a host sync
// (the error has to be raised before the launch): a few microseconds of kernel plus the wait for
// the work already queued on the stream, per call. While the stream is being captured into a CUDA
// graph no sync is allowed, so the check is skipped there; the kernels skip out-of-range entries
// all the same, so nothing is ever read or written out of bounds.
void check_index_range(const at::Tensor& idx, int64_t hi, bool dropped_ok, const char* op, const char* name,
                       const char* what) {
  if (idx.numel() == 0) return;
  const int64_t lo = dropped_ok ? -1 : 0;
  at::Tensor host = idx;
#ifdef LLMCORE_WITH_CUDA
  if (idx.is_cuda()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    LLMCORE_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture), "cudaStreamIsCapturing");
    if (capture != cudaStreamCaptureStatusNone) return;
    auto mm = at::aminmax(idx);
    const at::Tensor both = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();
    const int32_t* b = both.data_ptr<int32_t>();
    if (b[0] >= lo && b[1] < hi) return;
    host = idx.cpu();  // the error path only: find the first bad entry for the message
  }
#endif
  const int32_t* v = host.data_ptr<int32_t>();
  const int64_t n = host.numel(), k = host.size(1);
  int64_t bad = -1;
  for (int64_t i = 0; i < n; ++i)
    if (v[i] < lo || v[i] >= hi) {
      bad = i;
      break;
    }
  if (bad < 0) return;
  LLMCORE_CHECK(false, op, ": argument '", name, "' must hold ", what, hi, ")",
                dropped_ok ? " (or -1 for a slot moe_dispatch dropped)" : "", ", got ", name, "[", bad / k, ", ",
                bad % k, "] = ", v[bad]);
}

[[noreturn]] void no_cuda(const at::Tensor& t) {
  LLMCORE_CHECK(false, "moe: llmcore was built without CUDA support, got a tensor on ", t.device());
  throw;  // unreachable: LLMCORE_CHECK(false, ...) has thrown
}

// ---------------------------------------------------------------- route
std::tuple<at::Tensor, at::Tensor> moe_route_fwd(const at::Tensor& logits, int64_t top_k, c10::string_view score,
                                                 bool renormalize, const c10::optional<at::Tensor>& bias) {
  check_float(logits, "router_logits");
  check_dim(logits, "router_logits", 2);
  const int64_t T = logits.size(0), E = logits.size(1);
  LLMCORE_CHECK(E >= 1, "argument 'router_logits' must have at least one expert column, got shape ", logits.sizes());
  LLMCORE_CHECK(top_k >= 1 && top_k <= E, "argument 'top_k' must be in [1, num_experts=", E, "], got ", top_k);
  const MoeScore sc = parse_score(score);
  check_experts_on_device(logits, E, "moe_route");
  at::Tensor l2 = as_rows(logits, E), b;
  if (bias.has_value()) {
    check_float(*bias, "bias");
    check_same_device(logits, "router_logits", *bias, "bias");
    check_shape(*bias, "bias", {E});
    b = bias->to(acc_dtype(logits)).contiguous();
  }
  at::Tensor w = at::empty({T, top_k}, logits.options().dtype(acc_dtype(logits)));
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  MoeRouteParams p;
  p.logits = l2.data_ptr();
  p.bias = b.defined() ? static_cast<const float*>(b.data_ptr()) : nullptr;
  p.weights = w.data_ptr();
  p.ids = ids.data_ptr<int32_t>();
  p.tokens = T, p.experts = E, p.k = top_k, p.logits_row_stride = l2.stride(0);
  p.score = sc, p.renormalize = renormalize;
  p.dtype = to_dtype(logits.scalar_type());
  if (T == 0) return {w, ids};
  if (logits.is_cpu()) {
    at::parallel_for(0, T, std::max<int64_t>(1, 8192 / (E * top_k)),
                     [&](int64_t b0, int64_t b1) { moe_route_fwd_cpu(p, b0, b1); });
    return {w, ids};
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(logits.device());
  LLMCORE_CUDA_CHECK(moe_route_fwd_cuda(p, at::cuda::getCurrentCUDAStream()), "moe_route_fwd_cuda");
  return {w, ids};
#else
  no_cuda(logits);
#endif
}

at::Tensor moe_route_bwd(const at::Tensor& dweights, const at::Tensor& logits, const at::Tensor& ids,
                         c10::string_view score, bool renormalize) {
  check_float(logits, "router_logits");
  check_dim(logits, "router_logits", 2);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_index(ids, "topk_ids");
  check_dim(ids, "topk_ids", 2);
  LLMCORE_CHECK(ids.size(0) == T, "argument 'topk_ids' must have ", T, " rows, got shape ", ids.sizes());
  const int64_t k = ids.size(1);
  check_shape(dweights, "dweights", {T, k});
  check_same_device(logits, "router_logits", ids, "topk_ids");
  check_same_device(logits, "router_logits", dweights, "dweights");
  const MoeScore sc = parse_score(score);
  at::Tensor l2 = as_rows(logits, E), id = ids_as_int32(ids);
  check_index_range(id, E, false, "moe_route_bwd", "topk_ids", "expert ids in [0, num_experts=");
  at::Tensor dw = dweights.to(acc_dtype(logits)).contiguous();
  at::Tensor dl = at::empty({T, E}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  MoeRouteBwdParams p;
  p.dweights = dw.data_ptr();
  p.logits = l2.data_ptr();
  p.ids = id.data_ptr<int32_t>();
  p.dlogits = dl.data_ptr();
  p.tokens = T, p.experts = E, p.k = k, p.logits_row_stride = l2.stride(0);
  p.score = sc, p.renormalize = renormalize;
  p.dtype = to_dtype(logits.scalar_type());
  if (T == 0) return dl;
  if (logits.is_cpu()) {
    at::parallel_for(0, T, std::max<int64_t>(1, 8192 / (E * k)),
                     [&](int64_t b0, int64_t b1) { moe_route_bwd_cpu(p, b0, b1); });
    return dl;
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(logits.device());
  LLMCORE_CUDA_CHECK(moe_route_bwd_cuda(p, at::cuda::getCurrentCUDAStream()), "moe_route_bwd_cuda");
  return dl;
#else
  no_cuda(logits);
#endif
}

// ---------------------------------------------------------------- dispatch
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_dispatch_fwd(const at::Tensor& x,
                                                                            const at::Tensor& topk_ids,
                                                                            int64_t num_experts) {
  check_float(x, "x");
  check_dim(x, "x", 2);
  check_index(topk_ids, "topk_ids");
  check_dim(topk_ids, "topk_ids", 2);
  check_same_device(x, "x", topk_ids, "topk_ids");
  const int64_t T = x.size(0), H = x.size(1), k = topk_ids.size(1);
  LLMCORE_CHECK(topk_ids.size(0) == T, "argument 'topk_ids' must have one row per token of x (", T,
                "), got shape ", topk_ids.sizes());
  LLMCORE_CHECK(k >= 1, "argument 'topk_ids' must have at least one column, got shape ", topk_ids.sizes());
  LLMCORE_CHECK(num_experts >= 1, "argument 'num_experts' must be >= 1, got ", num_experts);
  LLMCORE_CHECK(T * k < (int64_t(1) << 31), "moe_dispatch: T * k must be < 2^31, got ", T * k);
  check_experts_on_device(x, num_experts, "moe_dispatch");
  at::Tensor x2 = as_rows(x, H), ids = ids_as_int32(topk_ids);
  auto iopts = x.options().dtype(at::kInt);
  at::Tensor xp = empty_output({T * k, H}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor tpe = at::empty({num_experts}, iopts), offsets = at::empty({num_experts + 1}, iopts);
  at::Tensor row_map = at::empty({T, k}, iopts);
  MoeSortParams sp;
  sp.ids = ids.data_ptr<int32_t>();
  sp.tokens_per_expert = tpe.data_ptr<int32_t>();
  sp.offsets = offsets.data_ptr<int32_t>();
  sp.row_map = row_map.data_ptr<int32_t>();
  sp.pairs = T * k, sp.experts = num_experts;
  MoeRowsParams rp;
  rp.src = x2.data_ptr();
  rp.dst = xp.data_ptr();
  rp.row_map = sp.row_map;
  rp.tokens = T, rp.k = k, rp.hidden = H, rp.src_row_stride = T ? x2.stride(0) : H;
  rp.dtype = to_dtype(x.scalar_type());
  if (x.is_cpu()) {
    const int64_t P = sp.pairs;
    sp.chunk = std::max<int64_t>(16384, (P + at::get_num_threads() - 1) / std::max<int64_t>(1, at::get_num_threads()));
    sp.num_chunks = std::max<int64_t>(1, (P + sp.chunk - 1) / sp.chunk);
    at::Tensor counts = at::zeros({num_experts * sp.num_chunks}, iopts);
    sp.counts = counts.data_ptr<int32_t>();
    std::atomic<bool> ok{true};
    at::parallel_for(0, sp.num_chunks, 1, [&](int64_t c0, int64_t c1) {
      if (!moe_sort_histogram_cpu(sp, c0, c1)) ok = false;
    });
    LLMCORE_CHECK(ok.load(), "argument 'topk_ids' must hold expert ids in [0, num_experts=", num_experts,
                  "), got min ", topk_ids.min().item<int64_t>(), " max ", topk_ids.max().item<int64_t>());
    moe_sort_scan_cpu(sp);
    at::parallel_for(0, sp.num_chunks, 1, [&](int64_t c0, int64_t c1) { moe_sort_scatter_cpu(sp, c0, c1); });
    if (H > 0)
      at::parallel_for(0, T, std::max<int64_t>(1, 16384 / (k * H)),
                       [&](int64_t t0, int64_t t1) { moe_dispatch_rows_cpu(rp, t0, t1); });
    return {xp, tpe, offsets, row_map};
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  moe_sort_cuda_plan(sp);
  at::Tensor counts = at::empty({num_experts * sp.num_chunks}, iopts);
  sp.counts = counts.data_ptr<int32_t>();
  LLMCORE_CUDA_CHECK(moe_sort_cuda(sp, stream), "moe_sort_cuda");
  if (T > 0 && H > 0) LLMCORE_CUDA_CHECK(moe_dispatch_rows_cuda(rp, stream), "moe_dispatch_rows_cuda");
  return {xp, tpe, offsets, row_map};
#else
  no_cuda(x);
#endif
}

// ---------------------------------------------------------------- combine
void check_row_map(const at::Tensor& row_map, const at::Tensor& ref, const char* ref_name) {
  check_defined(row_map, "row_map");
  LLMCORE_CHECK(row_map.scalar_type() == at::kInt, "argument 'row_map' must be int32 (from moe_dispatch), got ",
                row_map.scalar_type());
  check_dim(row_map, "row_map", 2);
  check_same_device(ref, ref_name, row_map, "row_map");
}

at::Tensor prepare_weights(const c10::optional<at::Tensor>& w, const at::Tensor& ref, const char* ref_name,
                           int64_t T, int64_t k) {
  if (!w.has_value()) return at::Tensor();
  check_float(*w, "topk_weights");
  check_same_device(ref, ref_name, *w, "topk_weights");
  check_shape(*w, "topk_weights", {T, k});
  LLMCORE_CHECK(w->scalar_type() == acc_dtype(ref), "argument 'topk_weights' must be ", acc_dtype(ref),
                " (the routing weights moe_route returns), got ", w->scalar_type());
  return w->contiguous();
}

at::Tensor moe_combine_fwd(const at::Tensor& y_permuted, const c10::optional<at::Tensor>& topk_weights,
                           const at::Tensor& row_map, int64_t num_tokens) {
  check_float(y_permuted, "y_permuted");
  check_dim(y_permuted, "y_permuted", 2);
  check_row_map(row_map, y_permuted, "y_permuted");
  const int64_t T = row_map.size(0), k = row_map.size(1), H = y_permuted.size(1);
  LLMCORE_CHECK(num_tokens == T, "argument 'num_tokens' must equal row_map.size(0) = ", T, ", got ", num_tokens);
  LLMCORE_CHECK(y_permuted.size(0) == T * k, "argument 'y_permuted' must have T * k = ", T * k,
                " rows (one per routed pair), got shape ", y_permuted.sizes());
  at::Tensor w = prepare_weights(topk_weights, y_permuted, "y_permuted", T, k);
  at::Tensor yp = y_permuted.contiguous(), rm = row_map.contiguous();
  check_index_range(rm, T * k, true, "moe_combine", "row_map", "rows in [0, T * k = ");
  at::Tensor y = empty_output({T, H}, y_permuted.options().memory_format(at::MemoryFormat::Contiguous));
  MoeRowsParams p;
  p.src = yp.data_ptr();
  p.dst = y.data_ptr();
  p.weights = w.defined() ? w.data_ptr() : nullptr;
  p.row_map = rm.data_ptr<int32_t>();
  p.tokens = T, p.k = k, p.hidden = H, p.src_row_stride = H;
  p.dtype = to_dtype(y_permuted.scalar_type());
  if (T == 0 || H == 0) return y;
  if (y.is_cpu()) {
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / (k * H)),
                     [&](int64_t t0, int64_t t1) { moe_combine_rows_cpu(p, t0, t1); });
    return y;
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(y.device());
  LLMCORE_CUDA_CHECK(moe_combine_rows_cuda(p, at::cuda::getCurrentCUDAStream()), "moe_combine_rows_cuda");
  return y;
#else
  no_cuda(y);
#endif
}

std::tuple<at::Tensor, at::Tensor> moe_combine_bwd(const at::Tensor& dy, const at::Tensor& y_permuted,
                                                   const at::Tensor& topk_weights, const at::Tensor& row_map) {
  check_float(y_permuted, "y_permuted");
  check_dim(y_permuted, "y_permuted", 2);
  check_float(dy, "dy");
  check_same_dtype(y_permuted, "y_permuted", dy, "dy");
  check_same_device(y_permuted, "y_permuted", dy, "dy");
  check_row_map(row_map, y_permuted, "y_permuted");
  const int64_t T = row_map.size(0), k = row_map.size(1), H = y_permuted.size(1);
  check_shape(dy, "dy", {T, H});
  check_shape(y_permuted, "y_permuted", {T * k, H});
  at::Tensor w = prepare_weights(topk_weights, y_permuted, "y_permuted", T, k);
  at::Tensor dy2 = dy.contiguous(), yp = y_permuted.contiguous(), rm = row_map.contiguous();
  check_index_range(rm, T * k, true, "moe_combine_bwd", "row_map", "rows in [0, T * k = ");
  at::Tensor dyp = empty_output({T * k, H}, y_permuted.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dw = at::empty({T, k}, w.options());
  MoeCombineBwdParams p;
  p.dy = dy2.data_ptr();
  p.y_permuted = yp.data_ptr();
  p.weights = w.data_ptr();
  p.row_map = rm.data_ptr<int32_t>();
  p.dy_permuted = dyp.data_ptr();
  p.dweights = dw.data_ptr();
  p.tokens = T, p.k = k, p.hidden = H;
  p.dtype = to_dtype(y_permuted.scalar_type());
  if (T == 0) return {dyp, dw};
  if (H == 0) return {dyp, dw.zero_()};
  if (dy.is_cpu()) {
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / (k * H)),
                     [&](int64_t t0, int64_t t1) { moe_combine_bwd_cpu(p, t0, t1); });
    return {dyp, dw};
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(dy.device());
  LLMCORE_CUDA_CHECK(moe_combine_bwd_cuda(p, at::cuda::getCurrentCUDAStream()), "moe_combine_bwd_cuda");
  return {dyp, dw};
#else
  no_cuda(dy);
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("moe_route_fwd", &moe_route_fwd);
  m.impl("moe_route_bwd", &moe_route_bwd);
  m.impl("moe_dispatch_fwd", &moe_dispatch_fwd);
  m.impl("moe_combine_fwd", &moe_combine_fwd);
  m.impl("moe_combine_bwd", &moe_combine_bwd);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("moe_route_fwd", &moe_route_fwd);
  m.impl("moe_route_bwd", &moe_route_bwd);
  m.impl("moe_dispatch_fwd", &moe_dispatch_fwd);
  m.impl("moe_combine_fwd", &moe_combine_fwd);
  m.impl("moe_combine_bwd", &moe_combine_bwd);
}
#endif

}  // namespace llmcore
