// rope_aten.cpp — ATen layer of rope: checks, allocation, device guard, stream, and the CPU (always)
// and CUDA (LLMCORE_WITH_CUDA) registrations of rope_fwd, rope_bwd and the in-place rope_.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "rope/rope.h"

namespace llmcore {
namespace {

// q/k: 4-D (B, S, H, D) with unit stride in D. Out-of-place calls copy a q/k whose last dim is
// strided (rare); the in-place call cannot, and rejects it.
at::Tensor unit_last(const at::Tensor& t, const char* name, bool may_copy) {
  if (t.numel() == 0 || t.size(-1) == 1 || t.stride(-1) == 1) return t;
  LLMCORE_CHECK(may_copy, "argument '", name, "' must have unit stride in its last (head_dim) dimension for the "
                "in-place rope_, got strides ", t.strides());
  return t.contiguous();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                  const c10::optional<at::Tensor>& positions, int64_t position_offset) {
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
    // Host check on CPU only: on CUDA it would synchronize; there the kernel writes NaN for a token
    // whose position is out of range (rope_cuda.cu).
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

void run(RopeParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
         const c10::optional<at::Tensor>& positions, int64_t position_offset, bool interleaved, bool inverse,
         const at::Tensor& q_out, const at::Tensor& k_out) {
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2);
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  p.qo_sb = q_out.stride(0), p.qo_ss = q_out.stride(1), p.qo_sh = q_out.stride(2);
  p.ko_sb = k_out.stride(0), p.ko_ss = k_out.stride(1), p.ko_sh = k_out.stride(2);
  p.cos = c.data_ptr<float>();
  p.sin = s.data_ptr<float>();
  at::Tensor pos;
  if (positions.has_value()) {
    pos = *positions;
    p.positions = pos.data_ptr();
    p.positions_int64 = pos.scalar_type() == at::kLong;
    p.pos_sb = pos.size(0) == 1 ? 0 : pos.stride(0);
    p.pos_ss = pos.stride(1);
  }
  p.position_offset = position_offset;
  p.B = q.size(0), p.S = q.size(1), p.Hq = q.size(2), p.Hk = k.size(2), p.D = q.size(3);
  p.max_seq_len = cos.size(0);
  p.interleaved = interleaved;
  p.inverse = inverse;
  p.dtype = to_dtype(q.scalar_type());
  const int64_t tokens = p.B * p.S;
  if (tokens == 0 || p.Hq + p.Hk == 0) return;
  if (q.is_cpu()) {
    const int64_t grain = std::max<int64_t>(1, 16384 / ((p.Hq + p.Hk) * p.D));
    at::parallel_for(0, tokens, grain, [&](int64_t b, int64_t e) { rope_cpu(p, b, e); });
    return;
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(q.device());
  LLMCORE_CUDA_CHECK(rope_cuda(p, at::cuda::getCurrentCUDAStream()), "rope_cuda");
#else
  LLMCORE_CHECK(false, "rope: llmcore was built without CUDA support, got a tensor on ", q.device());
#endif
}

std::tuple<at::Tensor, at::Tensor> rope_apply(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                                              const at::Tensor& sin, const c10::optional<at::Tensor>& positions,
                                              int64_t position_offset, bool interleaved, bool inverse) {
  check_inputs(q_in, k_in, cos, sin, positions, position_offset);
  at::Tensor q = unit_last(q_in, "q", true), k = unit_last(k_in, "k", true);
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor q_out = empty_output(q.sizes(), opts), k_out = empty_output(k.sizes(), opts);
  RopeParams p;
  run(p, q, k, cos, sin, positions, position_offset, interleaved, inverse, q_out, k_out);
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, const c10::optional<at::Tensor>& positions,
                                            int64_t position_offset, bool interleaved) {
  return rope_apply(q, k, cos, sin, positions, position_offset, interleaved, false);
}

std::tuple<at::Tensor, at::Tensor> rope_bwd(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& cos,
                                            const at::Tensor& sin, const c10::optional<at::Tensor>& positions,
                                            int64_t position_offset, bool interleaved) {
  return rope_apply(dq, dk, cos, sin, positions, position_offset, interleaved, true);
}

void rope_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                  const c10::optional<at::Tensor>& positions, int64_t position_offset, bool interleaved) {
  check_inputs(q, k, cos, sin, positions, position_offset);
  unit_last(q, "q", false);
  unit_last(k, "k", false);
  // Every element must be written by exactly one thread: no self-overlap (expand) and q, k disjoint.
  LLMCORE_CHECK(at::has_internal_overlap(q) != at::MemOverlap::Yes, "argument 'q' of rope_ has internal memory overlap "
                "(e.g. an expanded tensor): cannot rotate it in place");
  LLMCORE_CHECK(at::has_internal_overlap(k) != at::MemOverlap::Yes, "argument 'k' of rope_ has internal memory overlap "
                "(e.g. an expanded tensor): cannot rotate it in place");
  // Strided views of one fused qkv buffer report TooHard (not dense): allowed, they are disjoint by
  // construction; the same tensor twice, or a partial overlap of dense tensors, is rejected.
  const auto ov = at::get_overlap_status(q, k);
  LLMCORE_CHECK(ov != at::MemOverlapStatus::Full && ov != at::MemOverlapStatus::Partial,
                "arguments 'q' and 'k' of rope_ overlap in memory: cannot rotate them in place");
  RopeParams p;
  run(p, q, k, cos, sin, positions, position_offset, interleaved, false, q, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_bwd", &rope_bwd);
  m.impl("rope_", &rope_inplace);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_bwd", &rope_bwd);
  m.impl("rope_", &rope_inplace);
}
#endif

}  // namespace llmcore
