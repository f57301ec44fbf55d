// swiglu_aten.cpp — ATen layer of swiglu / swiglu_packed: checks, allocation, device guard, stream,
// and the CPU (always) and CUDA (LLMCORE_WITH_CUDA) registrations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "swiglu/swiglu.h"

namespace llmcore {
namespace {

void check_x(const at::Tensor& t, const char* name) {
  check_float(t, name);
  LLMCORE_CHECK(t.dim() >= 1, "argument '", name, "' must have at least 1 dimension, got a scalar");
}

// (rows, n) with unit column stride: contiguous tensors become one row of numel() elements so the
// kernels run flat; others are viewed (or copied) as rows.
at::Tensor rows_view(const at::Tensor& t, int64_t n) {
  if (t.is_contiguous()) return t.reshape({1, t.numel()});
  return as_rows(t, n);
}

void run_fwd(SwigluParams& p, const at::Tensor& like) {
  p.dtype = to_dtype(like.scalar_type());
  if (p.rows * p.n == 0) return;
  if (like.is_cpu()) {
    at::parallel_for(0, p.rows * p.n, 16384, [&](int64_t b, int64_t e) { swiglu_fwd_cpu(p, b, e); });
    return;
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(like.device());
  LLMCORE_CUDA_CHECK(swiglu_fwd_cuda(p, at::cuda::getCurrentCUDAStream()), "swiglu_fwd_cuda");
#else
  LLMCORE_CHECK(false, "swiglu: llmcore was built without CUDA support, got a tensor on ", like.device());
#endif
}

void run_bwd(SwigluParams& p, const at::Tensor& like) {
  p.dtype = to_dtype(like.scalar_type());
  if (p.rows * p.n == 0) return;
  if (like.is_cpu()) {
    at::parallel_for(0, p.rows * p.n, 16384, [&](int64_t b, int64_t e) { swiglu_bwd_cpu(p, b, e); });
    return;
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(like.device());
  LLMCORE_CUDA_CHECK(swiglu_bwd_cuda(p, at::cuda::getCurrentCUDAStream()), "swiglu_bwd_cuda");
#else
  LLMCORE_CHECK(false, "swiglu: llmcore was built without CUDA support, got a tensor on ", like.device());
#endif
}

void check_pair(const at::Tensor& gate, const at::Tensor& up) {
  check_x(gate, "gate");
  check_x(up, "up");
  check_same_device(gate, "gate", up, "up");
  check_same_dtype(gate, "gate", up, "up");
  check_shape(up, "up", gate.sizes());
}

// gate/up as (rows, n) views with a common row split: flat when both are contiguous.
std::pair<at::Tensor, at::Tensor> pair_rows(const at::Tensor& gate, const at::Tensor& up) {
  const int64_t n = gate.size(-1);
  if (gate.is_contiguous() && up.is_contiguous()) return {rows_view(gate, n), rows_view(up, n)};
  return {as_rows(gate, n), as_rows(up, n)};
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_pair(gate, up);
  auto [g2, u2] = pair_rows(gate, up);
  at::Tensor y = empty_output(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  SwigluParams p;
  p.gate = g2.data_ptr(), p.up = u2.data_ptr(), p.y = y.data_ptr();
  p.gate_rs = g2.stride(0), p.up_rs = u2.stride(0);
  p.rows = g2.size(0), p.n = g2.size(1);
  run_fwd(p, gate);
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  check_pair(gate, up);
  check_x(dy, "dy");
  check_same_device(gate, "gate", dy, "dy");
  check_same_dtype(gate, "gate", dy, "dy");
  check_shape(dy, "dy", gate.sizes());
  auto [g2, u2] = pair_rows(gate, up);
  at::Tensor d = dy.contiguous();
  auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dg = empty_output(gate.sizes(), opts), du = empty_output(gate.sizes(), opts);
  SwigluParams p;
  p.gate = g2.data_ptr(), p.up = u2.data_ptr(), p.dy = d.data_ptr(), p.dgate = dg.data_ptr(), p.dup = du.data_ptr();
  p.gate_rs = g2.stride(0), p.up_rs = u2.stride(0);
  p.rows = g2.size(0), p.n = g2.size(1);
  p.dgate_rs = p.dup_rs = p.n;  // dy, dg, du are contiguous (rows, n) in the same split
  run_bwd(p, gate);
  return {dg, du};
}

// gate_up (..., 2F) -> (rows, 2F) with unit column stride (a view when possible).
at::Tensor packed_rows(const at::Tensor& gate_up, int64_t& F) {
  check_x(gate_up, "gate_up");
  const int64_t two_f = gate_up.size(-1);
  LLMCORE_CHECK(two_f % 2 == 0, "argument 'gate_up' must have an even last dimension [gate | up], got shape ",
                gate_up.sizes());
  F = two_f / 2;
  if (gate_up.numel() == 0) return gate_up.new_empty({0, two_f});
  return as_rows(gate_up, two_f);
}

std::vector<int64_t> half_shape(const at::Tensor& gate_up, int64_t F) {
  std::vector<int64_t> s(gate_up.sizes().begin(), gate_up.sizes().end());
  s.back() = F;
  return s;
}

at::Tensor swiglu_packed_fwd(const at::Tensor& gate_up) {
  int64_t F = 0;
  at::Tensor gu = packed_rows(gate_up, F);
  at::Tensor y = empty_output(half_shape(gate_up, F), gate_up.options().memory_format(at::MemoryFormat::Contiguous));
  SwigluParams p;
  p.rows = gu.size(0), p.n = F;
  if (p.rows * F > 0) {
    const char* base = static_cast<const char*>(gu.data_ptr());
    p.gate = base, p.up = base + F * gu.element_size(), p.y = y.data_ptr();
    p.gate_rs = p.up_rs = gu.stride(0);
  }
  run_fwd(p, gate_up);
  return y;
}

at::Tensor swiglu_packed_bwd(const at::Tensor& dy, const at::Tensor& gate_up) {
  int64_t F = 0;
  at::Tensor gu = packed_rows(gate_up, F);
  check_x(dy, "dy");
  check_same_device(gate_up, "gate_up", dy, "dy");
  check_same_dtype(gate_up, "gate_up", dy, "dy");
  check_shape(dy, "dy", half_shape(gate_up, F));
  at::Tensor d = dy.contiguous();
  at::Tensor dgu = empty_output(gate_up.sizes(), gate_up.options().memory_format(at::MemoryFormat::Contiguous));
  SwigluParams p;
  p.rows = gu.size(0), p.n = F;
  if (p.rows * F > 0) {
    const char* base = static_cast<const char*>(gu.data_ptr());
    char* dbase = static_cast<char*>(dgu.data_ptr());
    p.gate = base, p.up = base + F * gu.element_size(), p.gate_rs = p.up_rs = gu.stride(0);
    p.dy = d.data_ptr();
    p.dgate = dbase, p.dup = dbase + F * dgu.element_size(), p.dgate_rs = p.dup_rs = 2 * F;
  }
  run_bwd(p, gate_up);
  return dgu;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("swiglu_packed_fwd", &swiglu_packed_fwd);
  m.impl("swiglu_packed_bwd", &swiglu_packed_bwd);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("swiglu_packed_fwd", &swiglu_packed_fwd);
  m.impl("swiglu_packed_bwd", &swiglu_packed_bwd);
}
#endif

}  // namespace llmcore
