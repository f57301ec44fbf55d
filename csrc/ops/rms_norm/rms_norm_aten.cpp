// rms_norm_aten.cpp — ATen layer of rms_norm / add_rms_norm: checks, allocation, device guard,
// stream, and the CPU (always) and CUDA (LLMCORE_WITH_CUDA) registrations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "rms_norm/rms_norm.h"

namespace llmcore {
namespace {

struct Prepared {
  at::Tensor x2, r2, w;
  int64_t n;
};

Prepared prepare_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                     double eps) {
  check_float(x, "x");
  check_float(weight, "weight");
  check_same_device(x, "x", weight, "weight");
  LLMCORE_CHECK(x.dim() >= 1, "argument 'x' must have at least 1 dimension, got a scalar");
  const int64_t n = x.size(-1);
  LLMCORE_CHECK(n > 0, "argument 'x' must have a non-empty last dimension, got shape ", x.sizes());
  check_shape(weight, "weight", {n});
  LLMCORE_CHECK(weight.scalar_type() == x.scalar_type() ||
                    (weight.scalar_type() == at::kFloat && x.element_size() == 2),
                "argument 'weight' must have x's dtype (", x.scalar_type(),
                ") or be float32 next to a 16-bit x, got ", weight.scalar_type());
  LLMCORE_CHECK(eps > 0.0, "argument 'eps' must be > 0, got ", eps);
  Prepared pr{as_rows(x, n), at::Tensor(), weight.contiguous(), n};
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    check_float(r, "residual");
    check_same_device(x, "x", r, "residual");
    check_same_dtype(x, "x", r, "residual");
    check_shape(r, "residual", x.sizes());
    pr.r2 = as_rows(r, n);
  }
  return pr;
}

RmsNormFwdParams fwd_params(const Prepared& pr, const at::Tensor& y, const at::Tensor& h, const at::Tensor& rstd,
                            double eps) {
  RmsNormFwdParams p;
  p.x = pr.x2.data_ptr();
  p.residual = pr.r2.defined() ? pr.r2.data_ptr() : nullptr;
  p.weight = pr.w.data_ptr();
  p.y = y.data_ptr();
  p.h = h.defined() ? h.data_ptr() : nullptr;
  p.rstd = static_cast<float*>(rstd.data_ptr());
  p.rows = pr.x2.size(0);
  p.n = pr.n;
  p.x_row_stride = pr.x2.stride(0);
  p.residual_row_stride = pr.r2.defined() ? pr.r2.stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.dtype = to_dtype(pr.x2.scalar_type());
  p.weight_dtype = to_dtype(pr.w.scalar_type());
  return p;
}

at::ScalarType stat_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void run_fwd(const RmsNormFwdParams& p, const at::Tensor& x) {
  if (p.rows == 0) return;
  if (x.is_cpu()) {
    const int64_t grain = std::max<int64_t>(1, 32768 / p.n);
    at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) { rms_norm_fwd_cpu(p, b, e); });
    return;
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  LLMCORE_CUDA_CHECK(rms_norm_fwd_cuda(p, at::cuda::getCurrentCUDAStream()), "rms_norm_fwd_cuda");
#else
  LLMCORE_CHECK(false, "rms_norm: llmcore was built without CUDA support, got a tensor on ", x.device());
#endif
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  Prepared pr = prepare_fwd(x, c10::nullopt, weight, eps);
  at::Tensor y = empty_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(stat_dtype(x)));
  run_fwd(fwd_params(pr, y, at::Tensor(), rstd, eps), x);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                                const at::Tensor& weight, double eps) {
  Prepared pr = prepare_fwd(x, residual, weight, eps);
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor y = empty_output(x.sizes(), opts), h = empty_output(x.sizes(), opts);
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(stat_dtype(x)));
  run_fwd(fwd_params(pr, y, h, rstd, eps), x);
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd, const c10::optional<at::Tensor>& dextra) {
  check_float(x, "x");
  check_float(dy, "dy");
  check_same_dtype(x, "x", dy, "dy");
  check_same_device(x, "x", dy, "dy");
  check_same_device(x, "x", weight, "weight");
  check_same_device(x, "x", rstd, "rstd");
  const int64_t n = x.size(-1);
  check_shape(dy, "dy", x.sizes());
  check_shape(weight, "weight", {n});
  LLMCORE_CHECK(rstd.scalar_type() == stat_dtype(x), "argument 'rstd' must be ", stat_dtype(x), ", got ",
                rstd.scalar_type());
  check_shape(rstd, "rstd", x.sizes().slice(0, x.dim() - 1));
  at::Tensor x2 = as_rows(x, n), dy2 = dy.contiguous(), w = weight.contiguous(), rs = rstd.contiguous();
  at::Tensor de;
  if (dextra.has_value()) {
    check_shape(*dextra, "dextra", x.sizes());
    check_same_dtype(x, "x", *dextra, "dextra");
    de = dextra->contiguous();
  }
  at::Tensor dx = empty_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dw = at::empty({n}, weight.options());
  RmsNormBwdParams p;
  p.dy = dy2.data_ptr();
  p.x = x2.data_ptr();
  p.weight = w.data_ptr();
  p.rstd = static_cast<const float*>(rs.data_ptr());
  p.dextra = de.defined() ? de.data_ptr() : nullptr;
  p.dx = dx.data_ptr();
  p.dweight = dw.data_ptr();
  p.rows = x2.size(0);
  p.n = n;
  p.x_row_stride = x2.stride(0);
  p.dtype = to_dtype(x.scalar_type());
  p.weight_dtype = to_dtype(weight.scalar_type());
  if (x.is_cpu()) {
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.rows));
    at::Tensor partials = at::empty({chunks, n}, x.options().dtype(stat_dtype(x)));
    p.partials = partials.data_ptr();
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) rms_norm_bwd_cpu(p, c, chunks);
    });
    rms_norm_dweight_reduce_cpu(p, chunks);
    return {dx, dw};
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor partials = at::empty({rms_norm_bwd_cuda_num_partials(p.rows), n}, x.options().dtype(at::kFloat));
  p.partials = partials.data_ptr();
  LLMCORE_CUDA_CHECK(rms_norm_bwd_cuda(p, at::cuda::getCurrentCUDAStream()), "rms_norm_bwd_cuda");
  return {dx, dw};
#else
  LLMCORE_CHECK(false, "rms_norm: llmcore was built without CUDA support, got a tensor on ", x.device());
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}
#endif

}  // namespace llmcore
