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
  // s = softmax|sigmoid(logits); ids = top_k of s + bias (ties -> lower id); weights = s[ids] (/ sum if renormalize)
  m.def("moe_route_fwd(Tensor router_logits, int top_k, str score, bool renormalize, Tensor? bias) -> (Tensor topk_weights, Tensor topk_ids)");
  // dlogits from dweights through the (renormalized) softmax|sigmoid scores of the selected experts
  m.def("moe_route_bwd(Tensor dweights, Tensor router_logits, Tensor topk_ids, str score, bool renormalize) -> Tensor");
  // stable counting sort of (token, slot) pairs by expert: x_permuted[row_map[t, s]] = x[t]
  m.def("moe_dispatch_fwd(Tensor x, Tensor topk_ids, int num_experts) -> (Tensor x_permuted, Tensor tokens_per_expert, Tensor offsets, Tensor row_map)");
  // y[t] = sum_s w[t, s] * y_permuted[row_map[t, s]]  (w None: weights 1; this is also dispatch's bwd)
  m.def("moe_combine_fwd(Tensor y_permuted, Tensor? topk_weights, Tensor row_map, int num_tokens) -> Tensor");
  // dy_permuted[row_map[t, s]] = w[t, s] * dy[t];  dweights[t, s] = dot(dy[t], y_permuted[row_map[t, s]])
  m.def("moe_combine_bwd(Tensor dy, Tensor y_permuted, Tensor topk_weights, Tensor row_map) -> (Tensor dy_permuted, Tensor dweights)");


  // ---- nf4 ----
  // absmax[b] = max|w| over block b of the flat w; packed[i/2] nibble = argmin_k |NF4[k] - w_i/absmax| (high nibble first)
  m.def("nf4_quantize_fwd(Tensor w, int blocksize) -> (Tensor packed, Tensor absmax)");
  // offset = mean(absmax); qabsmax = nearest code2 index of (absmax - offset) / absmax2, absmax2 = max|.| per 256
  m.def("nf4_double_quant_fwd(Tensor absmax, Tensor code2) -> (Tensor qabsmax, Tensor absmax2, Tensor offset)");
  // out_i = NF4[q_i] * a_b, a_b = absmax[b] or code2[qabsmax[b]] * absmax2[b / 256] + offset (double quant)
  m.def("nf4_dequantize_fwd(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, int blocksize, int[] shape, ScalarType dtype) -> Tensor");


}
