"""apply_kernels: put llmcore's ops into a loaded transformers causal LM, in place.

    model = llmcore.hf.apply_kernels(model, rms_norm=True, rope=True, swiglu=True, attention=True,
                                     fused_linear_cross_entropy=True)

What is patched (per module instance, never the transformers classes or modules, so an unpatched
model in the same process is untouched; a second call is a no-op for what is already patched):
- rms_norm: every <Family>RMSNorm (the block norms, the final norm, Qwen3's per-head q_norm / k_norm)
  -> llmcore.ops.rms_norm. HF rounds x_hat to the input dtype before the weight multiply; ours rounds
  once (y = x_hat * w in fp32): equal in fp32, within one bf16 rounding in bf16. Output dtype as HF's
  (promote(input, weight)). An fp32 input with a 16-bit weight keeps HF's forward.
- rope: the <Family>Attention forward is replaced by one with the same steps (q/k/v proj, q/k norm,
  rotation, cache update, attention call, o_proj) whose rotation is llmcore.ops.rope applied with the
  cos/sin the model's rotary_emb passes (half-split layout; the (B, S, D/2) first half of HF's cos/sin
  is used as a (B*S, D/2) table indexed by position b*S + s, so every rope type HF computes — default,
  linear, dynamic, yarn, llama3 — is rotated exactly as HF's table says).
- attention: model.config._attn_implementation = "llmcore" (see llmcore/hf/attention.py: flash_attn /
  varlen with causal, padding and packed position_ids; HF's sdpa for anything else).
- swiglu: every dense <Family>MLP whose act is silu -> down_proj(swiglu(gate_proj(x), up_proj(x))).
  (swiglu, not swiglu_packed: the two projections stay separate modules so PEFT / quantizers that
  wrap gate_proj / up_proj keep working.)
- fused_linear_cross_entropy: the <Family>ForCausalLM forward, when labels are given, computes the
  loss through llmcore.hf.loss._loss (the fused op when llmcore.ops has it; logits is then None).
  Without labels, with return_dict=False, logits_to_keep != 0, or (MoE) output_router_logits, the
  original forward runs unchanged.
- moe (Mixtral, Qwen2-MoE, Qwen3-MoE): the <Family>Experts forward (3D gate_up_proj (E, 2I, H) and
  down_proj (E, H, I), silu) -> llmcore.ops.moe_dispatch (tokens into expert-contiguous rows), per
  expert F.linear + swiglu_packed + F.linear on its contiguous slice, llmcore.ops.moe_combine (fp32
  weighted gather back to token order). The router stays the family's own (its softmax / top-k /
  norm_topk_prob and Qwen2-MoE's sigmoid-gated shared expert are untouched), so the selected experts
  and weights are exactly transformers'; only the expert compute and the scatter change (fp32
  accumulation of the k slots, then one rounding). This replaces transformers' experts_implementation
  switch for that module. Qwen2-MoE's shared expert and the dense MLP layers are <Family>MLP: swiglu.
"""
import types

import torch

import llmcore.ops as ops
from llmcore.hf import attention as _attention
from llmcore.hf.loss import _loss

# family class -> the module class names patched in it, and where its attention reads sliding_window
FAMILIES = {
    "LlamaForCausalLM":    dict(norm="LlamaRMSNorm", mlp="LlamaMLP", attn="LlamaAttention", window="none", moe=False),
    "MistralForCausalLM":  dict(norm="MistralRMSNorm", mlp="MistralMLP", attn="MistralAttention", window="config", moe=False),
    "Qwen2ForCausalLM":    dict(norm="Qwen2RMSNorm", mlp="Qwen2MLP", attn="Qwen2Attention", window="module", moe=False),
    "Qwen3ForCausalLM":    dict(norm="Qwen3RMSNorm", mlp="Qwen3MLP", attn="Qwen3Attention", window="module", moe=False),
    "MixtralForCausalLM":  dict(norm="MixtralRMSNorm", mlp=None, attn="MixtralAttention", window="config", moe="MixtralExperts"),
    "Qwen2MoeForCausalLM": dict(norm="Qwen2MoeRMSNorm", mlp="Qwen2MoeMLP", attn="Qwen2MoeAttention", window="none", moe="Qwen2MoeExperts"),
    "Qwen3MoeForCausalLM": dict(norm="Qwen3MoeRMSNorm", mlp="Qwen3MoeMLP", attn="Qwen3MoeAttention", window="module", moe="Qwen3MoeExperts"),
}
PATCHES = ("rms_norm", "rope", "swiglu", "attention", "fused_linear_cross_entropy", "moe")


def _family(model):
    name = type(model).__name__
    if name not in FAMILIES:
        # a PEFT wrapper: patch the transformers model inside it
        base = getattr(getattr(model, "base_model", None), "model", None)
        if base is not None and type(base).__name__ in FAMILIES:
            return type(base).__name__, base
        raise ValueError(f"llmcore.hf.apply_kernels: model class {name} is not supported; supported: "
                         f"{', '.join(FAMILIES)}")
    return name, model


def _replace_forward(module, fn, tag):
    done = module.__dict__.setdefault("_llmcore_patched", set())
    if tag in done:
        return
    module._llmcore_orig_forward = module.forward
    module.forward = types.MethodType(fn, module)
    done.add(tag)


def _rms_norm_forward(self, hidden_states):
    w = self.weight
    x = hidden_states
    if not (w.dtype == x.dtype or (w.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16))):
        return self._llmcore_orig_forward(hidden_states)
    y = ops.rms_norm(x, w, self.variance_epsilon)
    return y.to(torch.promote_types(x.dtype, w.dtype))


def _is_silu(act):
    # transformers' ACT2FN["silu"] is its own SiLUActivation (not nn.SiLU) in 5.x
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _mlp_forward(self, x):
    g, u = self.gate_proj(x), self.up_proj(x)
    if g.dtype != u.dtype:
        return self.down_proj(self.act_fn(g) * u)
    return self.down_proj(ops.swiglu(g, u))


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """hidden_states (T, H), top_k_index (T, k) int64, top_k_weights (T, k) -> (T, H) in hidden's dtype."""
    T = hidden_states.shape[0]
    x_perm, _, offsets, row_map = ops.moe_dispatch(hidden_states, top_k_index.to(torch.int32), self.num_experts)
    offs = offsets.tolist()
    ys = []
    for e in range(self.num_experts):
        if offs[e] == offs[e + 1]:
            continue
        gate_up = torch.nn.functional.linear(x_perm[offs[e]:offs[e + 1]], self.gate_up_proj[e])  # (n_e, 2I)
        ys.append(torch.nn.functional.linear(ops.swiglu_packed(gate_up), self.down_proj[e]))    # (n_e, H)
    y_perm = torch.cat(ys) if ys else x_perm.new_zeros(0, hidden_states.shape[1])
    return ops.moe_combine(y_perm.to(hidden_states.dtype), top_k_weights.float(), row_map, T)


def _hf_cos_sin_as_table(cos, sin):
    """HF's (B|1, S, D) cos/sin (the two halves equal) -> fp32 (B*S, D/2) tables and (B|1, S) positions."""
    b, s, d = cos.shape
    h = d // 2
    c = cos[..., :h].reshape(b * s, h).float()
    sn = sin[..., :h].reshape(b * s, h).float()
    pos = torch.arange(b * s, device=cos.device).view(b, s)
    return c, sn, pos


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """The families' attention forward with llmcore.ops.rope for the rotation (same steps as HF's)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward
    if cache is None and "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)  # (B, S, Hq, D)
    k = self.k_proj(hidden_states).view(hidden_shape)  # (B, S, Hkv, D)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, S, D)
    if hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    c, s, pos = _hf_cos_sin_as_table(cos, sin)
    if q.dtype != k.dtype:
        k = k.to(q.dtype)
    q, k = ops.rope(q, k, c, s, pos)
    q, k = q.to(v.dtype).transpose(1, 2), k.to(v.dtype).transpose(1, 2)  # (B, H, S, D) views
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        kwargs["use_cache"] = True  # tells the attention function a cache is in use (no packed detection)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    window = self._llmcore_window
    extra = {} if window == "none" else {"sliding_window": getattr(self, "sliding_window", None) if window == "module"
                                         else getattr(self.config, "sliding_window", None)}
    out, weights = interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **extra, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                       labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
    moe = self._llmcore_moe
    if cache is None and "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    if (labels is None or kwargs.get("return_dict") is False or not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
            or (moe and (kwargs.get("output_router_logits") or getattr(self.config, "output_router_logits", False)))):
        return self._llmcore_orig_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                          cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                          logits_to_keep=logits_to_keep, **kwargs)
    kwargs.pop("output_router_logits", None)
    loss_kw = {key: kwargs.pop(key) for key in ("num_items_in_batch", "ignore_index", "shift_labels") if key in kwargs}
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    loss, logits = _loss(outputs.last_hidden_state, self.lm_head, labels, **loss_kw)
    common = dict(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
                  attentions=outputs.attentions)
    if moe:
        return MoeCausalLMOutputWithPast(aux_loss=None, router_logits=getattr(outputs, "router_logits", None), **common)
    return CausalLMOutputWithPast(**common)


def apply_kernels(model, rms_norm=True, rope=True, swiglu=True, attention=True, fused_linear_cross_entropy=True,
                  moe=True):
    """Patches `model` (one of FAMILIES, or a PEFT model around one) in place and returns it.
    Idempotent. Raises ValueError naming the supported families for any other class. See the module
    docstring for what each flag replaces and the numerics."""
    name, lm = _family(model)
    fam = FAMILIES[name]
    for m in lm.modules():
        cls = type(m).__name__
        if rms_norm and cls == fam["norm"]:
            _replace_forward(m, _rms_norm_forward, "rms_norm")
        elif swiglu and fam["mlp"] is not None and cls == fam["mlp"] and _is_silu(m.act_fn):
            _replace_forward(m, _mlp_forward, "swiglu")
        elif moe and fam["moe"] and cls == fam["moe"] and _is_silu(m.act_fn) and not getattr(m, "has_bias", False):
            _replace_forward(m, _experts_forward, "moe")
        elif rope and cls == fam["attn"]:
            m._llmcore_window = fam["window"]
            _replace_forward(m, _attention_forward, "rope")
    if attention:
        _attention.register()
        lm.config._attn_implementation = _attention.NAME
    if fused_linear_cross_entropy:
        lm._llmcore_moe = bool(fam["moe"])
        _replace_forward(lm, _causal_lm_forward, "fused_linear_cross_entropy")
    return model


class AutoModelForCausalLM:
    """`llmcore.hf.AutoModelForCausalLM.from_pretrained(path, **kw)`: transformers'
    AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kw), then apply_kernels.
    Keyword arguments named like apply_kernels' flags (rms_norm=..., rope=..., ...) go to apply_kernels."""

    @staticmethod
    def from_pretrained(path, **kw):
        import transformers
        flags = {key: kw.pop(key) for key in PATCHES if key in kw}
        kw.setdefault("use_safetensors", True)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
        return apply_kernels(model, **flags)
