"""Export llmcore models to Hugging Face transformers directories, and import them back.

    dense model              -> LlamaForCausalLM   (same math: pre-norm RMSNorm, rotate-half RoPE with
                                                    our theta, GQA, SwiGLU, no biases, tied embeddings)
    MoE, no shared experts   -> MixtralForCausalLM (softmax router, top-k, renormalized)
    MoE with shared experts  -> Qwen2MoeForCausalLM (qkv_bias=False, norm_topk_prob=True); its shared
                                expert output is multiplied by sigmoid(shared_expert_gate(x)); we store
                                a zero gate (sigmoid(0) = 0.5 exactly) and 2 x our shared down projection,
                                which is exact in floating point.
  (Qwen3/Qwen3-MoE add per-head q/k RMSNorms that our model does not have, so they cannot carry
  our weights exactly; Llama / Mixtral / Qwen2-MoE can.)

Weight names (ours -> HF, per layer i; `model.layers.{i}.` prefix on the HF side):
    embed.weight                      model.embed_tokens.weight (lm_head tied to it)
    layers.i.attn_norm.weight         input_layernorm.weight
    layers.i.attn.wq|wk|wv|wo.weight  self_attn.q_proj|k_proj|v_proj|o_proj.weight
    layers.i.mlp_norm.weight          post_attention_layernorm.weight
    layers.i.mlp.w_gate|w_up|w_down   mlp.gate_proj|up_proj|down_proj.weight            (dense)
    layers.i.mlp.gate.weight          mlp.gate.weight  (router, (E, H))                   (MoE)
    layers.i.mlp.gate_up_proj         mlp.experts.gate_up_proj (E, 2F, H), gate rows first
    layers.i.mlp.down_proj            mlp.experts.down_proj (E, H, F)
    layers.i.mlp.shared_gate_up       mlp.shared_expert.gate_proj / up_proj (split in halves)
    layers.i.mlp.shared_down          mlp.shared_expert.down_proj (x2), shared_expert_gate = 0
    norm.weight                       model.norm.weight

The HF model is built in memory from its config, loaded with the mapped weights (strict), and written
with `save_pretrained` (safetensors), so the on-disk layout is whatever the installed transformers
writes and reads. Our tokenizer files (tokenizer.json, tokenizer_config.json with the ChatML template,
special_tokens_map.json) and a generation_config.json (eos = <|im_end|>) go beside it.

LoRA: `merge_lora` on a model that carries LoRALinear layers, or `lora_dir=` with a PEFT adapter
directory (adapter_config.json + adapter_model.safetensors on the HF Llama names), folds
W + scaling * B @ A into the exported weights (scaling = alpha / r, or alpha / sqrt(r) for rsLoRA).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

_DENSE = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}


def _cfg_of(model):
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError("expected an llmcore Transformer (with .cfg)")
    return cfg


def hf_architecture(cfg) -> str:
    if not cfg.n_experts:
        return "LlamaForCausalLM"
    return "Qwen2MoeForCausalLM" if cfg.n_shared_experts else "MixtralForCausalLM"


def hf_config(cfg, dtype: torch.dtype = torch.float32):
    """The transformers config object equivalent to an llmcore ModelConfig."""
    import transformers

    if cfg.n_experts and cfg.moe_score != "softmax":
        raise ValueError(f"MoE export needs a softmax router (moe_score='softmax'), got {cfg.moe_score!r}: "
                         "no transformers architecture computes a sigmoid-scored top-k")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, hidden_act="silu",
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.0, use_cache=True)
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    arch = hf_architecture(cfg)
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    import inspect

    if "rope_parameters" in inspect.signature(cls.__init__).parameters:
        common["rope_parameters"] = rope
    else:  # transformers 4.x
        common["rope_theta"] = float(cfg.rope_theta)
    if arch == "LlamaForCausalLM":
        c = cls(intermediate_size=cfg.ffn_hidden, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False,
                **common)
    elif arch == "MixtralForCausalLM":
        c = cls(intermediate_size=cfg.ffn_hidden, head_dim=cfg.head_dim, num_local_experts=cfg.n_experts,
                num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0, sliding_window=None, **common)
    else:
        c = cls(intermediate_size=cfg.ffn_hidden, moe_intermediate_size=cfg.ffn_hidden,
                shared_expert_intermediate_size=cfg.n_shared_experts * cfg.ffn_hidden, num_experts=cfg.n_experts,
                num_experts_per_tok=cfg.top_k, norm_topk_prob=True, qkv_bias=False, decoder_sparse_step=1,
                mlp_only_layers=[], use_sliding_window=False, **common)
    c.architectures = [arch]
    setattr(c, "dtype" if "dtype" in inspect.signature(cls.__init__).parameters else "torch_dtype", dtype)
    return c


def _renormalizes(model) -> bool:
    for layer in model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "renormalize") and not mlp.renormalize:
            return False
    return True


def to_hf_state_dict(model, lora_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Our weights under HF names (fp32 copies), LoRA merged when the model carries LoRA layers or a
    PEFT adapter directory is given."""
    cfg = _cfg_of(model)
    sd = {k: v.detach().float().clone().cpu() for k, v in _merged_state_dict(model).items()}
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["embed.weight"],
                                    "model.norm.weight": sd["norm.weight"]}
    if cfg.n_experts:
        if not _renormalizes(model):
            raise ValueError("MoE export needs renormalized top-k weights (renormalize=True)")
        for i, layer in enumerate(model.layers):
            if getattr(layer.mlp, "balance", None) == "bias" and bool(layer.mlp.expert_bias.abs().max() > 0):
                raise ValueError("MoE export: layer %d uses a non-zero aux-loss-free selection bias, which no "
                                 "transformers architecture applies" % i)
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "mlp_norm.weight"]
        for ours, theirs in _ATTN.items():
            out[q + f"self_attn.{theirs}.weight"] = sd[p + f"attn.{ours}.weight"]
        if not cfg.n_experts:
            for ours, theirs in _DENSE.items():
                out[q + f"mlp.{theirs}.weight"] = sd[p + f"mlp.{ours}.weight"]
            continue
        out[q + "mlp.gate.weight"] = sd[p + "mlp.gate.weight"]
        out[q + "mlp.experts.gate_up_proj"] = sd[p + "mlp.gate_up_proj"]
        out[q + "mlp.experts.down_proj"] = sd[p + "mlp.down_proj"]
        if cfg.n_shared_experts:
            g, u = sd[p + "mlp.shared_gate_up.weight"].chunk(2, dim=0)
            out[q + "mlp.shared_expert.gate_proj.weight"] = g.contiguous()
            out[q + "mlp.shared_expert.up_proj.weight"] = u.contiguous()
            out[q + "mlp.shared_expert.down_proj.weight"] = sd[p + "mlp.shared_down.weight"] * 2.0
            out[q + "mlp.shared_expert_gate.weight"] = torch.zeros(1, cfg.dim)
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
    hcfg = hf_config(cfg, dtype)
    cls = getattr(transformers, hf_architecture(cfg))
    with torch.device("meta"):
        hf = cls(hcfg)
    sd = to_hf_state_dict(model, lora_dir)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    expected = set(hf.state_dict())
    if set(sd) != expected:
        raise RuntimeError(f"HF key mismatch (transformers {transformers.__version__}): missing "
                           f"{sorted(expected - set(sd))[:5]}, unexpected {sorted(set(sd) - expected)[:5]}")
    hf.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    hf.tie_weights()
    hf.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                         do_sample=False, max_new_tokens=256)
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


# Import is exact or refused. For each architecture, every config field is one of:
#   represented  mapped onto a ModelConfig field (the shape, eps, rope theta, MoE sizes);
#   required     must hold the one value llmcore computes (a function value -> ok), else refused;
#   inert        changes no forward or backward math (ids, output flags, init, cache, dtype).
# A field in none of these (a newer transformers, another family's extension) is accepted only at the
# value a default-constructed config of that class has; any other value is refused, naming it.
_INERT = {"_name_or_path", "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
          "id2label", "label2id", "initializer_range", "is_encoder_decoder", "model_type", "output_attentions",
          "output_hidden_states", "output_router_logits", "problem_type", "return_dict", "transformers_version",
          "use_cache", "chunk_size_feed_forward", "max_position_embeddings", "tie_word_embeddings", "head_dim",
          "rope_parameters", "rope_scaling", "rope_theta", "vocab_size", "hidden_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "intermediate_size", "rms_norm_eps", "router_aux_loss_coef",
          "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
          "shared_expert_intermediate_size", "tokenizer_class", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
          "torchscript", "add_cross_attention", "cross_attention_hidden_size", "decoder_start_token_id",
          "finetuning_task", "prefix", "sep_token_id", "task_specific_params", "tie_encoder_decoder", "is_decoder"}
_OFF = (lambda v: not v, "False / 0")
_REQUIRED = {
    "LlamaForCausalLM": {"hidden_act": (lambda v: v == "silu", "'silu'"), "attention_bias": _OFF, "mlp_bias": _OFF,
                         "pretraining_tp": (lambda v: v in (None, 1), "1"), "attention_dropout": _OFF},
    "MixtralForCausalLM": {"hidden_act": (lambda v: v == "silu", "'silu'"), "attention_dropout": _OFF,
                           "router_jitter_noise": _OFF, "sliding_window": (lambda v: v is None, "None")},
    "Qwen2MoeForCausalLM": {"hidden_act": (lambda v: v == "silu", "'silu'"), "attention_dropout": _OFF,
                            "qkv_bias": _OFF, "norm_topk_prob": (bool, "True"),
                            "decoder_sparse_step": (lambda v: v == 1, "1"), "mlp_only_layers": (lambda v: not v, "[]"),
                            "use_sliding_window": _OFF, "sliding_window": (lambda v: True, "any (unused)"),
                            "max_window_layers": (lambda v: True, "any (unused)"),
                            "layer_types": (lambda v: v is None or all(t == "full_attention" for t in v),
                                            "all 'full_attention'")},
}


def _rope_of(hcfg) -> tuple[float, dict]:
    """(theta, scaling) from transformers 5's rope_parameters or 4's rope_theta / rope_scaling."""
    rp = dict(getattr(hcfg, "rope_parameters", None) or {})
    scaling = getattr(hcfg, "rope_scaling", None) if not rp else None
    theta = rp.pop("rope_theta", getattr(hcfg, "rope_theta", 10000.0))
    if scaling:
        rp = dict(scaling)
    return float(theta), rp


def _refuse(arch, field, value, want):
    raise ValueError(f"cannot import this {arch} exactly: config field {field}={value!r} (llmcore computes {want}); "
                     f"refusing rather than importing a model with different math")


def check_hf_config(hcfg, arch: str):
    """Raise ValueError naming the first config field whose value llmcore does not compute exactly
    (see _REQUIRED / _INERT above); returns the rope theta."""
    import transformers

    if arch not in _REQUIRED:
        raise ValueError(f"cannot import architecture {arch!r} (Llama, Mixtral, Qwen2-MoE only)")
    d = hcfg.to_dict()
    default = getattr(transformers, arch.replace("ForCausalLM", "Config"))().to_dict()
    for k, v in d.items():
        if k in _REQUIRED[arch]:
            ok, want = _REQUIRED[arch][k]
            if not ok(v):
                _refuse(arch, k, v, want)
        elif k not in _INERT and k in default and v != default[k]:
            _refuse(arch, k, v, f"only the default {default[k]!r} of this field, whose effect it does not model")
        elif k not in _INERT and k not in default and v not in (None, False, 0, [], {}):
            _refuse(arch, k, v, "no such field")
    theta, scaling = _rope_of(hcfg)
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None) or \
            any(k not in ("rope_type", "type") for k in scaling):
        _refuse(arch, "rope_parameters", scaling, "plain RoPE (rope_type 'default', no scaling)")
    head_dim = getattr(hcfg, "head_dim", None) or hcfg.hidden_size // hcfg.num_attention_heads
    if head_dim * hcfg.num_attention_heads != hcfg.hidden_size:
        _refuse(arch, "head_dim", head_dim, f"hidden_size / num_attention_heads = "
                f"{hcfg.hidden_size // hcfg.num_attention_heads}")
    if not getattr(hcfg, "tie_word_embeddings", False):
        _refuse(arch, "tie_word_embeddings", False, "True (lm_head = embed_tokens)")
    return theta


def config_from_hf(hcfg) -> Any:
    """An llmcore ModelConfig equivalent to a Llama / Mixtral / Qwen2-MoE transformers config;
    ValueError naming the field when the config asks for math llmcore does not compute."""
    from llmcore.model.config import ModelConfig

    arch = (getattr(hcfg, "architectures", None) or [type(hcfg).__name__.replace("Config", "ForCausalLM")])[0]
    theta = check_hf_config(hcfg, arch)
    kw = dict(vocab_size=hcfg.vocab_size, dim=hcfg.hidden_size, n_layers=hcfg.num_hidden_layers,
              n_heads=hcfg.num_attention_heads, n_kv_heads=hcfg.num_key_value_heads,
              max_seq_len=min(int(hcfg.max_position_embeddings), 32768), rope_theta=theta,
              norm_eps=float(hcfg.rms_norm_eps))
    if arch == "LlamaForCausalLM":
        kw["ffn_hidden"] = hcfg.intermediate_size
    elif arch == "MixtralForCausalLM":
        kw.update(ffn_hidden=hcfg.intermediate_size, n_experts=hcfg.num_local_experts, top_k=hcfg.num_experts_per_tok,
                  aux_loss_coef=float(hcfg.router_aux_loss_coef))
    else:
        F, S = hcfg.moe_intermediate_size, hcfg.shared_expert_intermediate_size
        if not S or S % F:
            _refuse(arch, "shared_expert_intermediate_size", S, f"a positive multiple of moe_intermediate_size ({F})")
        kw.update(ffn_hidden=F, n_experts=hcfg.num_experts, top_k=hcfg.num_experts_per_tok, n_shared_experts=S // F,
                  aux_loss_coef=float(hcfg.router_aux_loss_coef))
    return ModelConfig(**kw)


def import_hf(path: str | Path, backend: str | None = None):
    """Load a transformers directory (Llama / Mixtral / Qwen2-MoE of llmcore's shape) as an llmcore
    Transformer (fp32). Returns (model, tokenizer or None)."""
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
    sd: dict[str, torch.Tensor] = {"embed.weight": hsd["model.embed_tokens.weight"], "norm.weight": hsd["model.norm.weight"]}
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        sd[p + "attn_norm.weight"] = hsd[q + "input_layernorm.weight"]
        sd[p + "mlp_norm.weight"] = hsd[q + "post_attention_layernorm.weight"]
        for ours, theirs in _ATTN.items():
            sd[p + f"attn.{ours}.weight"] = hsd[q + f"self_attn.{theirs}.weight"]
        if not cfg.n_experts:
            for ours, theirs in _DENSE.items():
                sd[p + f"mlp.{ours}.weight"] = hsd[q + f"mlp.{theirs}.weight"]
            continue
        sd[p + "mlp.gate.weight"] = hsd[q + "mlp.gate.weight"]
        sd[p + "mlp.gate_up_proj"] = hsd[q + "mlp.experts.gate_up_proj"]
        sd[p + "mlp.down_proj"] = hsd[q + "mlp.experts.down_proj"]
        if cfg.n_shared_experts:
            gate = hsd[q + "mlp.shared_expert_gate.weight"]
            if bool(gate.abs().max() > 0):
                raise ValueError("Qwen2-MoE shared_expert_gate is not zero: a gated shared expert has no llmcore form")
            sd[p + "mlp.shared_gate_up.weight"] = torch.cat((hsd[q + "mlp.shared_expert.gate_proj.weight"],
                                                             hsd[q + "mlp.shared_expert.up_proj.weight"]), 0)
            sd[p + "mlp.shared_down.weight"] = hsd[q + "mlp.shared_expert.down_proj.weight"] * 0.5
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
