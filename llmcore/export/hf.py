"""Export llmcore models to Hugging Face transformers directories, and import them back — exactly.

Families (one table below, FAMILIES, says what each carries; export picks the one that carries the
model, import maps every field of each):

    family               llmcore config it carries
    LlamaForCausalLM     dense; tied or not; attention_bias = q/k/v/o biases; head_dim; RoPE scaling
    MistralForCausalLM   dense; sliding_window (refused at run time past the window, see the model)
    Qwen2ForCausalLM     dense with q/k/v biases (o without)
    Qwen3ForCausalLM     dense with QK-norm (minimind-3); attention_bias = q/k/v/o biases; head_dim
    MixtralForCausalLM   MoE, softmax top-k renormalized, no shared expert
    Qwen2MoeForCausalLM  MoE + shared expert (gated by sigmoid(x @ g), or ours ungated: exported with a
                         zero gate, sigmoid(0) = 1/2, and 2 x the down projection, exact in floating
                         point); q/k/v biases; norm_topk_prob either way
    Qwen3MoeForCausalLM  MoE with QK-norm (minimind-3-moe), no shared expert; norm_topk_prob either way

Weight names (ours -> HF, per layer i; `model.layers.{i}.` prefix on the HF side):
    embed.weight                      model.embed_tokens.weight (lm_head tied to it)
    output.weight                     lm_head.weight (untied models)
    layers.i.attn_norm.weight         input_layernorm.weight
    layers.i.attn.wq|wk|wv|wo.weight  self_attn.q_proj|k_proj|v_proj|o_proj.weight (and .bias)
    layers.i.attn.q_norm|k_norm       self_attn.q_norm|k_norm.weight (QK-norm)
    layers.i.mlp_norm.weight          post_attention_layernorm.weight
    layers.i.mlp.w_gate|w_up|w_down   mlp.gate_proj|up_proj|down_proj.weight            (dense)
    layers.i.mlp.gate.weight          mlp.gate.weight  (router, (E, H))                   (MoE)
    layers.i.mlp.gate_up_proj         mlp.experts.gate_up_proj (E, 2F, H), gate rows first
    layers.i.mlp.down_proj            mlp.experts.down_proj (E, H, F)
    layers.i.mlp.shared_gate_up       mlp.shared_expert.gate_proj / up_proj (split in halves)
    layers.i.mlp.shared_down          mlp.shared_expert.down_proj
    layers.i.mlp.shared_expert_gate   mlp.shared_expert_gate.weight
    norm.weight                       model.norm.weight

The HF model is built in memory from its config, loaded with the mapped weights (strict), and written
with `save_pretrained` (safetensors), so the on-disk layout is whatever the installed transformers
writes and reads. Our tokenizer files (tokenizer.json, tokenizer_config.json with the ChatML template,
special_tokens_map.json) and a generation_config.json (eos = <|im_end|>) go beside it.

Import is exact or refused: `check_hf_config` accepts a config field only where it is represented,
required to hold the value llmcore computes, or inert (see the tables); weights are read only from
safetensors. A transformers tokenizer comes with the model (llmcore.data.hf_tokenizer wraps any
tokenizer.json + tokenizer_config.json with a chat template).

LoRA: `merge_lora` on a model that carries LoRALinear layers, or `lora_dir=` with a PEFT adapter
directory (adapter_config.json + adapter_model.safetensors on the HF names), folds
W + scaling * B @ A into the exported weights (scaling = alpha / r, or alpha / sqrt(r) for rsLoRA).
"""
from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

_DENSE = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}

# What each family can carry. qkv_bias / o_bias: True / False = fixed; "attention_bias": the config
# field attention_bias sets q/k/v/o together; "qkv_bias": the config field qkv_bias sets q/k/v.
FAMILIES = {
    "LlamaForCausalLM": dict(moe=False, qk_norm=False, bias="attention_bias", window=False),
    "MistralForCausalLM": dict(moe=False, qk_norm=False, bias=None, window=True),
    "Qwen2ForCausalLM": dict(moe=False, qk_norm=False, bias="qkv_fixed", window=False),
    "Qwen3ForCausalLM": dict(moe=False, qk_norm=True, bias="attention_bias", window=False),
    "MixtralForCausalLM": dict(moe=True, qk_norm=False, bias=None, window=True, shared=False,
                               renorm="always"),
    "Qwen2MoeForCausalLM": dict(moe=True, qk_norm=False, bias="qkv_bias", window=False,
                                shared=True, renorm="norm_topk_prob"),
    "Qwen3MoeForCausalLM": dict(moe=True, qk_norm=True, bias="attention_bias", window=False,
                                shared=False, renorm="norm_topk_prob"),
}


def _cfg_of(model):
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError("expected an llmcore Transformer (with .cfg)")
    return cfg


def hf_architecture(cfg) -> str:
    """The transformers family that carries `cfg` exactly (ValueError when none does)."""
    qkv, o = cfg.attn_bias, cfg.attn_out_bias
    if cfg.n_experts and cfg.moe_score != "softmax":
        raise ValueError(f"MoE export needs a softmax router (moe_score='softmax'), got {cfg.moe_score!r}: "
                         "no transformers architecture computes a sigmoid-scored top-k")
    if o and not qkv:
        raise ValueError("no transformers family has a bias on o_proj without q/k/v biases")
    if cfg.sliding_window and (cfg.qk_norm or qkv or cfg.n_experts and cfg.n_shared_experts):
        raise ValueError("sliding_window exports only as Mistral / Mixtral (no QK-norm, biases or shared experts)")
    if not cfg.n_experts:
        if cfg.qk_norm:
            if qkv != o:
                raise ValueError("Qwen3 (QK-norm) has biases on all of q/k/v/o or none")
            return "Qwen3ForCausalLM"
        if cfg.sliding_window:
            return "MistralForCausalLM"
        if qkv and not o:
            return "Qwen2ForCausalLM"
        return "LlamaForCausalLM"
    if cfg.n_shared_experts:
        if cfg.qk_norm or o:
            raise ValueError("shared experts export only as Qwen2-MoE: no QK-norm, no o bias")
        return "Qwen2MoeForCausalLM"
    if cfg.shared_expert_gate:
        raise ValueError("shared_expert_gate without shared experts")
    if cfg.qk_norm:
        if qkv != o:
            raise ValueError("Qwen3-MoE (QK-norm) has biases on all of q/k/v/o or none")
        return "Qwen3MoeForCausalLM"
    if qkv or o or not cfg.moe_renormalize:
        raise ValueError("a MoE without QK-norm or shared experts exports as Mixtral: no biases, renormalized top-k")
    return "MixtralForCausalLM"


def _rope_parameters(cfg) -> tuple[dict, int]:
    """(transformers rope_parameters, max_position_embeddings) of our config."""
    sc = dict(cfg.rope_scaling or {})
    max_pos = int(sc.pop("max_position_embeddings", cfg.max_seq_len))
    rp = {"rope_type": sc.pop("rope_type", "default"), "rope_theta": float(cfg.rope_theta), **sc}
    return rp, max_pos


def _special_ids(tokenizer) -> dict:
    """bos / eos / pad ids for the exported config: the tokenizer's (an imported model's own), else ours."""
    if tokenizer is None or not hasattr(tokenizer, "eos_id"):
        return dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def hf_config(cfg, dtype: torch.dtype = torch.float32, tokenizer=None):
    """The transformers config object equivalent to an llmcore ModelConfig (special ids from
    `tokenizer` when given)."""
    import transformers

    arch = hf_architecture(cfg)
    fam = FAMILIES[arch]
    rope, max_pos = _rope_parameters(cfg)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, hidden_act="silu",
                  max_position_embeddings=max_pos, rms_norm_eps=cfg.norm_eps,
                  tie_word_embeddings=bool(cfg.tie_embeddings), attention_dropout=0.0, use_cache=True,
                  **_special_ids(tokenizer))
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    params = inspect.signature(cls.__init__).parameters
    if "rope_parameters" in params:
        common["rope_parameters"] = rope
    else:  # transformers 4.x
        common["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            common["rope_scaling"] = rope
    common["head_dim"] = cfg.head_dim  # every family reads config.head_dim when set (else hidden / heads)
    if fam["bias"] == "attention_bias":
        common["attention_bias"] = bool(cfg.attn_bias)
    if fam["bias"] == "qkv_bias":
        common["qkv_bias"] = bool(cfg.attn_bias)
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        common.update(use_sliding_window=False, sliding_window=None)
    if fam["window"]:
        common["sliding_window"] = cfg.sliding_window or None
    if arch == "LlamaForCausalLM":
        c = cls(intermediate_size=cfg.ffn_hidden, mlp_bias=False, **common)
    elif not fam["moe"]:
        c = cls(intermediate_size=cfg.ffn_hidden, **common)
    elif arch == "MixtralForCausalLM":
        c = cls(intermediate_size=cfg.ffn_hidden, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                router_jitter_noise=0.0, router_aux_loss_coef=cfg.aux_loss_coef, **common)
    else:
        moe = dict(moe_intermediate_size=cfg.ffn_hidden, num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                   norm_topk_prob=bool(cfg.moe_renormalize), decoder_sparse_step=1, mlp_only_layers=[],
                   router_aux_loss_coef=cfg.aux_loss_coef, intermediate_size=cfg.ffn_hidden)
        if fam["shared"]:
            moe["shared_expert_intermediate_size"] = cfg.n_shared_experts * cfg.ffn_hidden
        c = cls(**moe, **common)
    c.architectures = [arch]
    setattr(c, "dtype" if "dtype" in params else "torch_dtype", dtype)
    return c


def _layer_names(cfg, i: int, ungated_shared_x2: bool) -> list[tuple[str, str, float]]:
    """(our key, HF key, factor: HF = ours * factor) of every tensor of layer i, except the shared
    expert's gate_up (split in two on the HF side) and a zero shared gate (HF only)."""
    p, q = f"layers.{i}.", f"model.layers.{i}."
    out = [(p + "attn_norm.weight", q + "input_layernorm.weight", 1.0),
           (p + "mlp_norm.weight", q + "post_attention_layernorm.weight", 1.0)]
    for ours, theirs in _ATTN.items():
        out.append((p + f"attn.{ours}.weight", q + f"self_attn.{theirs}.weight", 1.0))
        if (cfg.attn_bias and ours != "wo") or (cfg.attn_out_bias and ours == "wo"):
            out.append((p + f"attn.{ours}.bias", q + f"self_attn.{theirs}.bias", 1.0))
    if cfg.qk_norm:
        out += [(p + "attn.q_norm.weight", q + "self_attn.q_norm.weight", 1.0),
                (p + "attn.k_norm.weight", q + "self_attn.k_norm.weight", 1.0)]
    if not cfg.n_experts:
        out += [(p + f"mlp.{ours}.weight", q + f"mlp.{theirs}.weight", 1.0) for ours, theirs in _DENSE.items()]
        return out
    out += [(p + "mlp.gate.weight", q + "mlp.gate.weight", 1.0),
            (p + "mlp.gate_up_proj", q + "mlp.experts.gate_up_proj", 1.0),
            (p + "mlp.down_proj", q + "mlp.experts.down_proj", 1.0)]
    if cfg.n_shared_experts:
        out.append((p + "mlp.shared_down.weight", q + "mlp.shared_expert.down_proj.weight",
                    2.0 if ungated_shared_x2 else 1.0))
        if cfg.shared_expert_gate:
            out.append((p + "mlp.shared_expert_gate.weight", q + "mlp.shared_expert_gate.weight", 1.0))
    return out


def to_hf_state_dict(model, lora_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Our weights under HF names (fp32 copies, lm_head included), LoRA merged when the model carries
    LoRA layers or a PEFT adapter directory is given."""
    cfg = _cfg_of(model)
    hf_architecture(cfg)  # refuses what no family carries
    sd = {k: v.detach().float().clone().cpu() for k, v in _merged_state_dict(model).items()}
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["embed.weight"],
                                    "model.norm.weight": sd["norm.weight"],
                                    "lm_head.weight": sd["embed.weight"] if cfg.tie_embeddings else sd["output.weight"]}
    if cfg.n_experts:
        for i, layer in enumerate(model.layers):
            if getattr(layer.mlp, "balance", None) == "bias" and bool(layer.mlp.expert_bias.abs().max() > 0):
                raise ValueError("MoE export: layer %d uses a non-zero aux-loss-free selection bias, which no "
                                 "transformers architecture applies" % i)
    ungated = bool(cfg.n_shared_experts) and not cfg.shared_expert_gate
    for i in range(cfg.n_layers):
        for ours, theirs, factor in _layer_names(cfg, i, ungated):
            out[theirs] = sd[ours] * factor if factor != 1.0 else sd[ours]
        if cfg.n_shared_experts:
            q = f"model.layers.{i}.mlp."
            g, u = sd[f"layers.{i}.mlp.shared_gate_up.weight"].chunk(2, dim=0)
            out[q + "shared_expert.gate_proj.weight"], out[q + "shared_expert.up_proj.weight"] = g.contiguous(), u.contiguous()
            if ungated:  # sigmoid(0) = 1/2 exactly, the down projection doubled: the same output
                out[q + "shared_expert_gate.weight"] = torch.zeros(1, cfg.dim)
    if lora_dir is not None:
        merge_peft_adapter_(out, lora_dir)
    return out


def _merged_state_dict(model) -> dict[str, torch.Tensor]:
    """model.state_dict() with any LoRA layer (base_layer + lora_A/lora_B, `merged_linear()`) folded in."""
    sd = dict(model.state_dict())
    for name, mod in model.named_modules():
        if hasattr(mod, "merged_linear") and hasattr(mod, "base_layer"):
            w = mod.merged_linear().weight.detach()
            for k in [k for k in sd if k.startswith(name + ".")]:
                del sd[k]
            sd[name + ".weight"] = w
    return sd


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+)\.lora_([AB])"
                       r"(?:\.default)?\.weight$")


def merge_peft_adapter_(hf_sd: dict[str, torch.Tensor], adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """W += scaling * B @ A for every LoRA pair of a PEFT adapter directory (in place on HF names)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = conf["r"], conf.get("lora_alpha", conf["r"])
    scaling = alpha / math.sqrt(r) if conf.get("use_rslora", False) else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = _PEFT_KEY.match(k)
        if not m:
            raise KeyError(f"unexpected key in the LoRA adapter: {k}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = v.float()
    for mod, ab in pairs.items():
        key = mod + ".weight"
        if key not in hf_sd or set(ab) != {"A", "B"}:
            raise KeyError(f"LoRA adapter targets {mod}, which the exported model does not have (or A/B missing)")
        hf_sd[key] = hf_sd[key] + scaling * (ab["B"] @ ab["A"])
    return hf_sd


def export_hf(model, out_dir: str | Path, tokenizer=None, dtype: torch.dtype = torch.float32,
              lora_dir: str | Path | None = None) -> Path:
    """Write a transformers model directory for `model` (an llmcore Transformer); returns its path.
    `tokenizer`: an llmcore Tokenizer (its HF files are written beside the weights) or a directory
    holding tokenizer.json / tokenizer_config.json to copy."""
    import transformers

    cfg = _cfg_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hcfg = hf_config(cfg, dtype, tokenizer)
    cls = getattr(transformers, hf_architecture(cfg))
    with torch.device("meta"):
        hf = cls(hcfg)
    sd = to_hf_state_dict(model, lora_dir)
    expected = set(hf.state_dict())
    if set(sd) != expected:
        raise RuntimeError(f"HF key mismatch (transformers {transformers.__version__}): missing "
                           f"{sorted(expected - set(sd))[:5]}, unexpected {sorted(set(sd) - expected)[:5]}")
    hf.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    if cfg.tie_embeddings:
        hf.tie_weights()
    ids = _special_ids(tokenizer)
    stop = sorted({ids["eos_token_id"], getattr(tokenizer, "im_end_id", ids["eos_token_id"])} - {None})
    hf.generation_config = transformers.GenerationConfig(bos_token_id=ids["bos_token_id"],
                                                         eos_token_id=stop[0] if len(stop) == 1 else stop,
                                                         pad_token_id=ids["pad_token_id"], do_sample=False,
                                                         max_new_tokens=256)
    hf.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        if hasattr(tokenizer, "save"):
            tokenizer.save(out)
        else:
            import shutil

            src = Path(tokenizer)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (src / name).exists():
                    shutil.copy(src / name, out / name)
    meta = {"exported_by": "llmcore", "architecture": hf_architecture(cfg), "llmcore_config": cfg.to_dict(),
            "lora_merged": bool(lora_dir) or any(hasattr(m, "merged_linear") for m in model.modules())}
    (out / "llmcore_export.json").write_text(json.dumps(meta, indent=2))
    return out


# Import is exact or refused. For each family, every config field is one of:
#   represented  mapped onto a ModelConfig field (_REPRESENTED: shape, eps, rope, biases, MoE sizes...);
#   required     must hold the one value llmcore computes (_REQUIRED: a check -> ok), else refused;
#   inert        changes no forward or backward math (_INERT: ids, output flags, init, cache, dtype).
# A field in none of these (a newer transformers, another family's extension) is accepted only at the
# value a default-constructed config of that class has; any other value is refused, naming it.
_INERT = {"_name_or_path", "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
          "id2label", "label2id", "initializer_range", "is_encoder_decoder", "model_type", "output_attentions",
          "output_hidden_states", "output_router_logits", "problem_type", "return_dict", "transformers_version",
          "use_cache", "chunk_size_feed_forward", "tokenizer_class", "use_bfloat16", "tf_legacy_loss",
          "pruned_heads", "torchscript", "add_cross_attention", "cross_attention_hidden_size",
          "decoder_start_token_id", "finetuning_task", "prefix", "sep_token_id", "task_specific_params",
          "tie_encoder_decoder", "is_decoder"}
_COMMON = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "rope_parameters", "rope_scaling",
           "rope_theta", "head_dim"}
_MOE = {"num_experts_per_tok", "router_aux_loss_coef"}
_QWEN_WINDOW = {"sliding_window", "max_window_layers"}  # unused while use_sliding_window is False
_REPRESENTED = {
    "LlamaForCausalLM": _COMMON | {"intermediate_size", "head_dim", "attention_bias"},
    "MistralForCausalLM": _COMMON | {"intermediate_size", "head_dim", "sliding_window"},
    "Qwen2ForCausalLM": _COMMON | {"intermediate_size"} | _QWEN_WINDOW,
    "Qwen3ForCausalLM": _COMMON | {"intermediate_size", "head_dim", "attention_bias"} | _QWEN_WINDOW,
    "MixtralForCausalLM": _COMMON | _MOE | {"intermediate_size", "head_dim", "num_local_experts", "sliding_window"},
    "Qwen2MoeForCausalLM": _COMMON | _MOE | {"moe_intermediate_size", "shared_expert_intermediate_size",
                                             "num_experts", "norm_topk_prob", "qkv_bias", "intermediate_size"}
                           | _QWEN_WINDOW,
    "Qwen3MoeForCausalLM": _COMMON | _MOE | {"moe_intermediate_size", "num_experts", "num_local_experts",
                                             "norm_topk_prob", "attention_bias", "head_dim", "intermediate_size"}
                           | _QWEN_WINDOW,
}
_OFF = (lambda v: not v, "False / 0")
_SILU = (lambda v: v == "silu", "'silu'")
_FULL = (lambda v: v is None or all(t == "full_attention" for t in v), "all 'full_attention'")
_QWEN = {"hidden_act": _SILU, "attention_dropout": _OFF, "use_sliding_window": _OFF, "layer_types": _FULL}
_SPARSE = {"decoder_sparse_step": (lambda v: v == 1, "1"), "mlp_only_layers": (lambda v: not v, "[]")}
_REQUIRED = {
    "LlamaForCausalLM": {"hidden_act": _SILU, "mlp_bias": _OFF, "pretraining_tp": (lambda v: v in (None, 1), "1"),
                         "attention_dropout": _OFF},
    "MistralForCausalLM": {"hidden_act": _SILU, "attention_dropout": _OFF},
    "Qwen2ForCausalLM": dict(_QWEN),
    "Qwen3ForCausalLM": dict(_QWEN),
    "MixtralForCausalLM": {"hidden_act": _SILU, "attention_dropout": _OFF, "router_jitter_noise": _OFF},
    "Qwen2MoeForCausalLM": {**_QWEN, **_SPARSE},
    "Qwen3MoeForCausalLM": {**_QWEN, **_SPARSE},
}
# the keys each rope type reads (transformers' _compute_*_parameters); any other key is refused
_ROPE_KEYS = {"default": set(), "linear": {"factor"}, "dynamic": {"factor"},
              "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"},
              "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def _refuse(arch, field, value, want):
    raise ValueError(f"cannot import this {arch} exactly: config field {field}={value!r} (llmcore computes {want}); "
                     f"refusing rather than importing a model with different math")


def _rope_of(hcfg, arch) -> tuple[float, dict | None]:
    """(theta, our rope_scaling or None) from transformers 5's rope_parameters or 4's rope_theta /
    rope_scaling; refuses a rope type or key llmcore does not compute."""
    rp = dict(getattr(hcfg, "rope_parameters", None) or {})
    if not rp:
        rp = dict(getattr(hcfg, "rope_scaling", None) or {})
        rp.setdefault("rope_theta", getattr(hcfg, "rope_theta", 10000.0))
    theta = float(rp.pop("rope_theta", getattr(hcfg, "rope_theta", 10000.0)))
    kind = rp.pop("rope_type", rp.pop("type", "default")) or "default"
    if kind not in _ROPE_KEYS:
        _refuse(arch, "rope_parameters", {"rope_type": kind, **rp}, f"one of the rope types {sorted(_ROPE_KEYS)}")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(arch, "partial_rotary_factor", rp["partial_rotary_factor"], "1.0 (RoPE over the whole head)")
    rp.pop("partial_rotary_factor", None)
    extra = set(rp) - _ROPE_KEYS[kind]
    if extra:
        _refuse(arch, "rope_parameters", {"rope_type": kind, **rp}, f"rope_type {kind!r} with only the keys "
                f"{sorted(_ROPE_KEYS[kind])} (not {sorted(extra)})")
    if kind == "default":
        return theta, None
    return theta, {"rope_type": kind, **rp, "max_position_embeddings": int(hcfg.max_position_embeddings)}


def check_hf_config(hcfg, arch: str):
    """Raise ValueError naming the first config field whose value llmcore does not compute exactly
    (see _REPRESENTED / _REQUIRED / _INERT above); returns (rope theta, rope_scaling)."""
    import transformers

    if arch not in FAMILIES:
        raise ValueError(f"cannot import architecture {arch!r}: llmcore imports {', '.join(FAMILIES)}")
    d = hcfg.to_dict()
    default = getattr(transformers, arch.replace("ForCausalLM", "Config"))().to_dict()
    for k, v in d.items():
        if k in _REQUIRED[arch]:
            ok, want = _REQUIRED[arch][k]
            if not ok(v):
                _refuse(arch, k, v, want)
        elif k in _INERT or k in _REPRESENTED[arch]:
            continue
        elif k in default and v != default[k]:
            _refuse(arch, k, v, f"only the default {default[k]!r} of this field, whose effect it does not model")
        elif k not in default and v not in (None, False, 0, [], {}):
            _refuse(arch, k, v, "no such field")
    return _rope_of(hcfg, arch)


def config_from_hf(hcfg) -> Any:
    """An llmcore ModelConfig equivalent to a transformers config of one of FAMILIES; ValueError
    naming the field when the config asks for math llmcore does not compute."""
    from llmcore.model.config import ModelConfig

    arch = (getattr(hcfg, "architectures", None) or [type(hcfg).__name__.replace("Config", "ForCausalLM")])[0]
    theta, scaling = check_hf_config(hcfg, arch)
    fam = FAMILIES[arch]
    head_dim = getattr(hcfg, "head_dim", None) or hcfg.hidden_size // hcfg.num_attention_heads
    bias = {"attention_bias": (bool(getattr(hcfg, "attention_bias", False)),) * 2,
            "qkv_bias": (bool(getattr(hcfg, "qkv_bias", True)), False),
            "qkv_fixed": (True, False), None: (False, False)}[fam["bias"]]
    kw = dict(vocab_size=hcfg.vocab_size, dim=hcfg.hidden_size, n_layers=hcfg.num_hidden_layers,
              n_heads=hcfg.num_attention_heads, n_kv_heads=hcfg.num_key_value_heads, head_dim=head_dim,
              max_seq_len=min(int(hcfg.max_position_embeddings), 32768), rope_theta=theta, rope_scaling=scaling,
              norm_eps=float(hcfg.rms_norm_eps), tie_embeddings=bool(getattr(hcfg, "tie_word_embeddings", False)),
              qk_norm=fam["qk_norm"], attn_bias=bias[0], attn_out_bias=bias[1],
              sliding_window=int(getattr(hcfg, "sliding_window", None) or 0) if fam["window"] else 0)
    if not fam["moe"]:
        kw["ffn_hidden"] = hcfg.intermediate_size
    elif arch == "MixtralForCausalLM":
        kw.update(ffn_hidden=hcfg.intermediate_size, n_experts=hcfg.num_local_experts, top_k=hcfg.num_experts_per_tok,
                  aux_loss_coef=float(hcfg.router_aux_loss_coef))
    else:
        F = hcfg.moe_intermediate_size
        n_exp = getattr(hcfg, "num_experts", None) or getattr(hcfg, "num_local_experts")
        kw.update(ffn_hidden=F, n_experts=n_exp, top_k=hcfg.num_experts_per_tok,
                  moe_renormalize=bool(hcfg.norm_topk_prob), aux_loss_coef=float(hcfg.router_aux_loss_coef))
        if fam["shared"]:
            S = hcfg.shared_expert_intermediate_size
            if not S or S % F:
                _refuse(arch, "shared_expert_intermediate_size", S, f"a positive multiple of moe_intermediate_size ({F})")
            kw.update(n_shared_experts=S // F, shared_expert_gate=True)
    return ModelConfig(**kw)


def import_hf(path: str | Path, backend: str | None = None):
    """Load a transformers directory of one of FAMILIES (safetensors, sharded or not) as an llmcore
    Transformer (fp32), exactly or not at all. Returns (model, tokenizer or None)."""
    import transformers

    from llmcore.model.model import Transformer

    path = Path(path)
    hcfg = transformers.AutoConfig.from_pretrained(str(path))
    cfg = config_from_hf(hcfg)  # refuses before any weight is read
    if not list(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise ValueError(f"{path}: no *.safetensors weights{f' (found {found})' if found else ''}: llmcore loads "
                         f"only safetensors, which cannot run code; convert pickled weights yourself if you trust "
                         f"them (e.g. transformers' save_pretrained(safe_serialization=True))")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    if backend:
        cfg.backend = backend
    hsd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    ungated = False
    if cfg.n_shared_experts:  # an all-zero gate is our ungated shared expert, exported with 2 x down
        ungated = all(not bool(hsd[f"model.layers.{i}.mlp.shared_expert_gate.weight"].abs().max() > 0)
                      for i in range(cfg.n_layers))
        cfg.shared_expert_gate = not ungated
    sd = {"embed.weight": hsd["model.embed_tokens.weight"], "norm.weight": hsd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        sd["output.weight"] = hsd["lm_head.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs, factor in _layer_names(cfg, i, ungated):
            sd[ours] = hsd[theirs] / factor if factor != 1.0 else hsd[theirs]
        if cfg.n_shared_experts:
            q = f"model.layers.{i}.mlp.shared_expert."
            sd[f"layers.{i}.mlp.shared_gate_up.weight"] = torch.cat((hsd[q + "gate_proj.weight"],
                                                                     hsd[q + "up_proj.weight"]), 0)
    model = Transformer(cfg)
    own = model.state_dict()
    for k, v in own.items():  # buffers (e.g. the MoE selection bias) keep their defaults
        if k not in sd and k not in dict(model.named_parameters()):
            sd[k] = v
    model.load_state_dict(sd, strict=True)
    return model.eval(), _tokenizer_of(path)


def _tokenizer_of(path: Path):
    """The llmcore Tokenizer of a transformers dir, or None with a warning saying why it was not
    loaded (a tokenizer that is not one of ours, with its own special tokens and chat template,
    would silently change every prompt: llmcore tools then need --tokenizer)."""
    import warnings

    from llmcore.data.tokenizer import Tokenizer

    files = [n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") if (path / n).exists()]
    if not files:
        return None
    if (path / "tokenizer.json").exists():
        try:
            return Tokenizer.load(path)
        except ValueError as e:
            why = str(e)
    else:
        why = f"only {files} (no tokenizer.json)"
    warnings.warn(f"{path}: its tokenizer is not an llmcore tokenizer ({why}); it was NOT loaded — the weights "
                  f"were. Pass --tokenizer DIR (an llmcore tokenizer) to chat, serve or evaluate it.", stacklevel=3)
    return None
