// torch_bindings.cpp — the one TORCH_LIBRARY(llmcore) block: every op schema, one line of math each.
// Implementations register themselves in csrc/ops/<op>/<op>_aten.cpp (CPU always, CUDA when built);
// fake (meta) kernels and autograd live in llmcore/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(llmcore, m) {
  // ---- rms_norm: y = x * rsqrt(mean(x^2, -1) + eps) * weight; rstd saved for bwd ----
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  // h = x + residual; y = rms_norm(h)
  m.def("add_rms_norm_fwd(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor y, Tensor h, Tensor rstd)");
  // dx = rstd * (dy*w - x_hat * mean(dy*w*x_hat)) + dextra; dweight = sum_rows(dy * x_hat)
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dextra) -> (Tensor dx, Tensor dweight)");

  // ---- rope ----


  // ---- swiglu ----


  // ---- flash_attn ----


  // ---- moe ----


  // ---- nf4 ----


}
