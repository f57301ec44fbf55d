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
  // (q_out, k_out) = rotate pairs of q, k by angle(pos): y1 = x1*cos - x2*sin, y2 = x2*cos + x1*sin
  // (position_offset is a SymInt so a compiled decode step does not recompile for every offset)
  m.def("rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions, SymInt position_offset, bool interleaved) -> (Tensor q_out, Tensor k_out)");
  // (dq, dk) = inverse rotation (sin -> -sin) of (dq_out, dk_out)
  m.def("rope_bwd(Tensor dq_out, Tensor dk_out, Tensor cos, Tensor sin, Tensor? positions, SymInt position_offset, bool interleaved) -> (Tensor dq, Tensor dk)");
  // in place: q, k <- rope_fwd(q, k, ...) (inference; no autograd)
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? positions, SymInt position_offset, bool interleaved) -> ()");

  // ---- qk_norm_rope: per-head RMSNorm of q and k (weights q_weight, k_weight) then rope, one pass ----
  // y = R(pos) (x * rstd * w), rstd = rsqrt(mean(x^2, -1) + eps) per head row (fp32), saved for bwd
  m.def("qk_norm_rope_fwd(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, Tensor? positions, SymInt position_offset, bool interleaved, float eps) -> (Tensor q_out, Tensor k_out, Tensor q_rstd, Tensor k_rstd)");
  // dn = R^T dy; dx = rstd * (dn*w - x_hat * mean(dn*w*x_hat)); dweight = sum_rows(dn * x_hat)
  m.def("qk_norm_rope_bwd(Tensor dq_out, Tensor dk_out, Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor q_rstd, Tensor k_rstd, Tensor cos, Tensor sin, Tensor? positions, SymInt position_offset, bool interleaved) -> (Tensor dq, Tensor dk, Tensor dq_weight, Tensor dk_weight)");
  // in place: q, k <- qk_norm_rope_fwd(q, k, ...)[:2] (inference / decode; no autograd, no rstd)
  m.def("qk_norm_rope_(Tensor(a!) q, Tensor(b!) k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, Tensor? positions, SymInt position_offset, bool interleaved, float eps) -> ()");


  // ---- swiglu ----
  // y = silu(gate) * up = gate * sigmoid(gate) * up
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor y");
  // dgate = dy * up * sig(gate) * (1 + gate * (1 - sig(gate))); dup = dy * silu(gate)   (silu recomputed)
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
  // gate_up = [gate | up] along the last dim (2F): y = silu(gate_up[..., :F]) * gate_up[..., F:]
  m.def("swiglu_packed_fwd(Tensor gate_up) -> Tensor y");
  // dgate_up = [dgate | dup] written into one (..., 2F) tensor
  m.def("swiglu_packed_bwd(Tensor dy, Tensor gate_up) -> Tensor dgate_up");


  // ---- flash_attn ----
  // out = softmax(scale * q k^T [causal, bottom-right]) v per q head (kv head = h / (Hq/Hkv)); lse = logsumexp (fp32, (B,Hq,Sq))
  m.def("flash_attn_fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal) -> (Tensor out, Tensor lse)");
  // FA2 bwd from lse: dV = P^T dO, dS = P*(dO V^T - rowsum(dO*O)), dQ = scale dS K, dK = scale dS^T Q
  m.def("flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float softmax_scale, bool causal) -> (Tensor dq, Tensor dk, Tensor dv)");
  // flash_attn_fwd per packed sequence [cu_seqlens[b], cu_seqlens[b+1]) of (total, H, D); lse (Hq, total_q)
  m.def("flash_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor out, Tensor lse)");
  // flash_attn_bwd per packed sequence
  m.def("flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor dq, Tensor dk, Tensor dv)");
  // cache[b, cache_seqlens[b] + i] = new[b, i] (in place); out = attention of q over the first cache_seqlens[b] + S_new keys
  m.def("flash_attn_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, Tensor? v_new, float softmax_scale, bool causal) -> (Tensor out, Tensor lse)");


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


  // ---- fused_linear_cross_entropy ----
  // loss of x = hidden @ weight.T (+ bias) (z = softcap*tanh(x/softcap)): lse(z) - (1-eps) z_t - eps mean(z) + z_loss lse^2
  // over rows with target != ignore_index, reduced (mean over labelled rows | sum | none), chunked over rows:
  // the (N, V) logits are never held; with compute_grads, (dhidden, dweight, dbias) of the reduced loss too
  m.def("fused_linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, float label_smoothing, float z_loss, float softcap, str reduction, bool compute_grads, int chunk_rows, int vocab_chunk) -> (Tensor loss, Tensor dhidden, Tensor dweight, Tensor dbias)");
  // (dhidden, dweight, dbias) recomputed chunk by chunk for an upstream grad_loss (scalar, or (N,) for 'none')
  m.def("fused_linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, float label_smoothing, float z_loss, float softcap, str reduction, int chunk_rows, int vocab_chunk) -> (Tensor dhidden, Tensor dweight, Tensor dbias)");


}
