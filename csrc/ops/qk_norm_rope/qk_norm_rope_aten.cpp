// qk_norm_rope_aten.cpp — ATen layer of qk_norm_rope: checks, allocation, device guard, stream, and
// the CPU (always) and CUDA (LLMCORE_WITH_CUDA) registrations of qk_norm_rope_fwd, qk_norm_rope_bwd
// and the in-place, inference-only qk_norm_rope_.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "qk_norm_rope/qk_norm_rope.h"

namespace llmcore {
namespace {

// q/k: 4-D (B, S, H, D) with unit stride in D (strided fused-qkv views are read in place).
// Out-of-place calls copy a q/k with a strided last dim (rare); the in-place call rejects it.
at::Tensor unit_last(const at::Tensor& t, const char* name, bool may_copy) {
  if (t.numel() == 0 || t.size(-1) == 1 || t.stride(-1) == 1) return t;
  LLMCORE_CHECK(may_copy, "argument '", name, "' must have unit stride in its last (head_dim) dimension for the "
                "in-place qk_norm_rope_, got strides ", t.strides());
  return t.contiguous();
}

at::ScalarType stat_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight, const at::Tensor& k_weight,
                  const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& positions,
                  int64_t position_offset) {
  check_float(q, "q");
  check_float(k, "k");
  check_same_dtype(q, "q", k, "k");
  check_same_device(q, "q", k, "k");
  check_dim(q, "q", 4);
  check_dim(k, "k", 4);
  LLMCORE_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
                "arguments 'q' (B, S, Hq, D) and 'k' (B, S, Hkv, D) must agree in B, S and D, got ", q.sizes(),
                " and ", k.sizes());
  const int64_t D = q.size(3);
  LLMCORE_CHECK(D % 2 == 0 && D > 0, "argument 'q' must have an even, non-zero head_dim (last dim), got ", D);
  LLMCORE_CHECK(!q.is_cuda() || D <= 512, "argument 'q': the CUDA kernel of qk_norm_rope holds a head row in one "
                "warp's registers and supports head_dim <= 512, got ", D);
  for (auto [w, name] : {std::pair<const at::Tensor&, const char*>{q_weight, "q_weight"}, {k_weight, "k_weight"}}) {
    check_float(w, name);
    check_same_device(q, "q", w, name);
    check_shape(w, name, {D});
    LLMCORE_CHECK(w.scalar_type() == q.scalar_type() || (w.scalar_type() == at::kFloat && q.element_size() == 2),
                  "argument '", name, "' must have q's dtype (", q.scalar_type(),
                  ") or be float32 next to a 16-bit q, got ", w.scalar_type());
  }
  check_same_dtype(q_weight, "q_weight", k_weight, "k_weight");
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    check_defined(t, name);
    check_same_device(q, "q", t, name);
    LLMCORE_CHECK(t.scalar_type() == at::kFloat, "argument '", name, "' must be float32 (the table rope_cache builds), got ",
                  t.scalar_type());
    check_dim(t, name, 2);
    LLMCORE_CHECK(t.size(1) == D / 2, "argument '", name, "' must have shape (max_seq_len, head_dim/2 = ", D / 2,
                  "), got ", t.sizes());
  }
  check_shape(sin, "sin", cos.sizes());
  const int64_t max_seq = cos.size(0), B = q.size(0), S = q.size(1);
  LLMCORE_CHECK(position_offset >= 0, "argument 'position_offset' must be >= 0, got ", position_offset);
  if (positions.has_value()) {
    const at::Tensor& pos = *positions;
    check_same_device(q, "q", pos, "positions");
    LLMCORE_CHECK(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt,
                  "argument 'positions' must be int64 or int32, got ", pos.scalar_type());
    check_dim(pos, "positions", 2);
    LLMCORE_CHECK((pos.size(0) == B || pos.size(0) == 1) && pos.size(1) == S, "argument 'positions' must have shape (B, S) = (",
                  B, ", ", S, ") or (1, S), got ", pos.sizes());
    // Host check on CPU only (on CUDA it would synchronize; the kernel writes NaN instead, as rope).
    if (pos.is_cpu() && pos.numel() > 0) {
      const int64_t lo = pos.min().item<int64_t>() + position_offset, hi = pos.max().item<int64_t>() + position_offset;
      LLMCORE_CHECK(lo >= 0 && hi < max_seq, "argument 'positions' (+ position_offset) must lie in [0, max_seq_len = ",
                    max_seq, ") of the cos/sin tables, got values in [", lo, ", ", hi, "]");
    }
  } else if (B * S > 0) {
    LLMCORE_CHECK(position_offset + S <= max_seq, "positions position_offset .. position_offset + S - 1 = ",
                  position_offset, " .. ", position_offset + S - 1, " exceed the cos/sin tables (max_seq_len = ",
                  max_seq, "); build rope_cache with a larger max_seq_len");
  }
}

// Fills everything but the outputs / gradients; `keep` holds the contiguous copies alive.
void fill_common(QkNormRopeParams& p, std::vector<at::Tensor>& keep, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin,
                 const c10::optional<at::Tensor>& positions, int64_t position_offset, bool interleaved) {
  keep = {q_weight.contiguous(), k_weight.contiguous(), cos.contiguous(), sin.contiguous()};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2);
  p.q_weight = keep[0].data_ptr();
  p.k_weight = keep[1].data_ptr();
  p.cos = keep[2].data_ptr<float>();
  p.sin = keep[3].data_ptr<float>();
  if (positions.has_value()) {
    const at::Tensor& pos = *positions;
    p.positions = pos.data_ptr();
    p.positions_int64 = pos.scalar_type() == at::kLong;
    p.pos_sb = pos.size(0) == 1 ? 0 : pos.stride(0);
    p.pos_ss = pos.stride(1);
  }
  p.position_offset = position_offset;
  p.B = q.size(0), p.S = q.size(1), p.Hq = q.size(2), p.Hk = k.size(2), p.D = q.size(3);
  p.max_seq_len = cos.size(0);
  p.interleaved = interleaved;
  p.dtype = to_dtype(q.scalar_type());
  p.weight_dtype = to_dtype(q_weight.scalar_type());
}

void set_out(QkNormRopeParams& p, const at::Tensor& q_out, const at::Tensor& k_out) {
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  p.qo_sb = q_out.stride(0), p.qo_ss = q_out.stride(1), p.qo_sh = q_out.stride(2);
  p.ko_sb = k_out.stride(0), p.ko_ss = k_out.stride(1), p.ko_sh = k_out.stride(2);
}

void run_fwd(const QkNormRopeParams& p, const at::Tensor& q) {
  const int64_t tokens = p.B * p.S;
  if (tokens == 0 || p.Hq + p.Hk == 0) return;
  if (q.is_cpu()) {
    const int64_t grain = std::max<int64_t>(1, 16384 / ((p.Hq + p.Hk) * p.D));
    at::parallel_for(0, tokens, grain, [&](int64_t b, int64_t e) { qk_norm_rope_fwd_cpu(p, b, e); });
    return;
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(q.device());
  LLMCORE_CUDA_CHECK(qk_norm_rope_fwd_cuda(p, at::cuda::getCurrentCUDAStream()), "qk_norm_rope_fwd_cuda");
#else
  LLMCORE_CHECK(false, "qk_norm_rope: llmcore was built without CUDA support, got a tensor on ", q.device());
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& q_weight, const at::Tensor& k_weight,
    const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& positions, int64_t position_offset,
    bool interleaved, double eps) {
  check_inputs(q_in, k_in, q_weight, k_weight, cos, sin, positions, position_offset);
  LLMCORE_CHECK(eps > 0.0, "argument 'eps' must be > 0, got ", eps);
  at::Tensor q = unit_last(q_in, "q", true), k = unit_last(k_in, "k", true);
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor q_out = empty_output(q.sizes(), opts), k_out = empty_output(k.sizes(), opts);
  at::Tensor q_rstd = at::empty(q.sizes().slice(0, 3), q.options().dtype(stat_dtype(q)));
  at::Tensor k_rstd = at::empty(k.sizes().slice(0, 3), k.options().dtype(stat_dtype(k)));
  QkNormRopeParams p;
  std::vector<at::Tensor> keep;
  fill_common(p, keep, q, k, q_weight, k_weight, cos, sin, positions, position_offset, interleaved);
  set_out(p, q_out, k_out);
  p.q_rstd = q_rstd.data_ptr();
  p.k_rstd = k_rstd.data_ptr();
  p.eps = eps;
  run_fwd(p, q);
  return {q_out, k_out, q_rstd, k_rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_bwd(
    const at::Tensor& dq_out, const at::Tensor& dk_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& q_rstd, const at::Tensor& k_rstd,
    const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& positions, int64_t position_offset,
    bool interleaved) {
  check_inputs(q_in, k_in, q_weight, k_weight, cos, sin, positions, position_offset);
  check_float(dq_out, "dq_out");
  check_float(dk_out, "dk_out");
  check_same_dtype(q_in, "q", dq_out, "dq_out");
  check_same_dtype(q_in, "q", dk_out, "dk_out");
  check_same_device(q_in, "q", dq_out, "dq_out");
  check_same_device(q_in, "q", dk_out, "dk_out");
  check_shape(dq_out, "dq_out", q_in.sizes());
  check_shape(dk_out, "dk_out", k_in.sizes());
  for (auto [r, x, name] : {std::tuple<const at::Tensor&, const at::Tensor&, const char*>{q_rstd, q_in, "q_rstd"},
                            {k_rstd, k_in, "k_rstd"}}) {
    check_defined(r, name);
    check_same_device(q_in, "q", r, name);
    LLMCORE_CHECK(r.scalar_type() == stat_dtype(q_in), "argument '", name, "' must be ", stat_dtype(q_in), ", got ",
                  r.scalar_type());
    check_shape(r, name, x.sizes().slice(0, 3));
  }
  at::Tensor q = unit_last(q_in, "q", true), k = unit_last(k_in, "k", true);
  at::Tensor dqo = dq_out.contiguous(), dko = dk_out.contiguous(), qr = q_rstd.contiguous(), kr = k_rstd.contiguous();
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = empty_output(q.sizes(), opts), dk = empty_output(k.sizes(), opts);
  at::Tensor dqw = at::empty({q.size(3)}, q_weight.options()), dkw = at::empty({q.size(3)}, k_weight.options());
  QkNormRopeParams p;
  std::vector<at::Tensor> keep;
  fill_common(p, keep, q, k, q_weight, k_weight, cos, sin, positions, position_offset, interleaved);
  set_out(p, dq, dk);
  p.dq_out = dqo.data_ptr();
  p.dk_out = dko.data_ptr();
  p.q_rstd = qr.data_ptr();
  p.k_rstd = kr.data_ptr();
  p.dq_weight = dqw.data_ptr();
  p.dk_weight = dkw.data_ptr();
  const int64_t tokens = p.B * p.S;
  if (q.is_cpu()) {
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tokens));
    at::Tensor qp = at::empty({chunks, p.D}, q.options().dtype(stat_dtype(q)));
    at::Tensor kp = at::empty({chunks, p.D}, q.options().dtype(stat_dtype(q)));
    p.q_partials = qp.data_ptr();
    p.k_partials = kp.data_ptr();
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) qk_norm_rope_bwd_cpu(p, c, chunks);
    });
    qk_norm_rope_dweight_reduce_cpu(p, chunks);
    return {dq, dk, dqw, dkw};
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t g = qk_norm_rope_bwd_cuda_num_partials(tokens);
  at::Tensor qp = at::empty({g, p.D}, q.options().dtype(at::kFloat)), kp = at::empty({g, p.D}, q.options().dtype(at::kFloat));
  p.q_partials = qp.data_ptr();
  p.k_partials = kp.data_ptr();
  LLMCORE_CUDA_CHECK(qk_norm_rope_bwd_cuda(p, at::cuda::getCurrentCUDAStream()), "qk_norm_rope_bwd_cuda");
  return {dq, dk, dqw, dkw};
#else
  LLMCORE_CHECK(false, "qk_norm_rope: llmcore was built without CUDA support, got a tensor on ", q.device());
#endif
}

void qk_norm_rope_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight,
                          const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin,
                          const c10::optional<at::Tensor>& positions, int64_t position_offset, bool interleaved,
                          double eps) {
  check_inputs(q, k, q_weight, k_weight, cos, sin, positions, position_offset);
  LLMCORE_CHECK(eps > 0.0, "argument 'eps' must be > 0, got ", eps);
  unit_last(q, "q", false);
  unit_last(k, "k", false);
  LLMCORE_CHECK(at::has_internal_overlap(q) != at::MemOverlap::Yes, "argument 'q' of qk_norm_rope_ has internal memory "
                "overlap (e.g. an expanded tensor): cannot normalize it in place");
  LLMCORE_CHECK(at::has_internal_overlap(k) != at::MemOverlap::Yes, "argument 'k' of qk_norm_rope_ has internal memory "
                "overlap (e.g. an expanded tensor): cannot normalize it in place");
  // Strided views of one fused qkv buffer report TooHard: allowed (disjoint by construction).
  const auto ov = at::get_overlap_status(q, k);
  LLMCORE_CHECK(ov != at::MemOverlapStatus::Full && ov != at::MemOverlapStatus::Partial,
                "arguments 'q' and 'k' of qk_norm_rope_ overlap in memory: cannot normalize them in place");
  QkNormRopeParams p;
  std::vector<at::Tensor> keep;
  fill_common(p, keep, q, k, q_weight, k_weight, cos, sin, positions, position_offset, interleaved);
  set_out(p, q, k);
  p.eps = eps;
  run_fwd(p, q);
}

}  // namespace

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("qk_norm_rope_fwd", &qk_norm_rope_fwd);
  m.impl("qk_norm_rope_bwd", &qk_norm_rope_bwd);
  m.impl("qk_norm_rope_", &qk_norm_rope_inplace);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("qk_norm_rope_fwd", &qk_norm_rope_fwd);
  m.impl("qk_norm_rope_bwd", &qk_norm_rope_bwd);
  m.impl("qk_norm_rope_", &qk_norm_rope_inplace);
}
#endif

}  // namespace llmcore
