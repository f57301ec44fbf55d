"""LoRA adapters (Hu et al. 2021) with PEFT's numerics and file format.

    y = base(x) + scaling * B(A(dropout(x)))      A (r, in) Kaiming-uniform(a=sqrt(5)), B (out, r) zeros
    scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

`base` is an nn.Linear or an NF4Linear (QLoRA: frozen 4-bit base, dequantized on the fly; the adapter
stays fp32 and x is cast to the adapter dtype, as PEFT does). B = 0 at init, so a freshly adapted
model computes exactly what the base computes.

Files: `save_adapter` writes PEFT's layout (adapter_config.json + adapter_model.safetensors) with the
key names of the HF LlamaForCausalLM export (our wq -> q_proj, ..., w_down -> down_proj), so
`peft.PeftModel.from_pretrained(hf_model, dir)` loads it onto `llmcore.export.hf` output.
`merge_lora` folds W + scaling * B @ A back into plain nn.Linear layers for export.
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# our module name -> (HF parent, HF module name) in a LlamaForCausalLM
HF_NAMES = {"wq": ("self_attn", "q_proj"), "wk": ("self_attn", "k_proj"), "wv": ("self_attn", "v_proj"),
            "wo": ("self_attn", "o_proj"), "w_gate": ("mlp", "gate_proj"), "w_up": ("mlp", "up_proj"),
            "w_down": ("mlp", "down_proj")}


def _in_out(base):
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return base.in_features, base.out_features
    raise TypeError(f"base must be an nn.Linear or NF4Linear (with in_features/out_features), got {type(base)}")


class LoRALinear(nn.Module):
    """base(x) + scaling * lora_B(lora_A(dropout(x))); base frozen. `disabled=True` gives base(x) only."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"r must be > 0, got {r}")
        in_f, out_f = _in_out(base)
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        self.lora_A = nn.Linear(in_f, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x):  # x (..., in) -> (..., out)
        y = self.base_layer(x)
        if self.disabled:
            return y
        a = self.lora_A.weight
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in) fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with W + scaling * B @ A (an NF4 base is dequantized first; fp32 weight)."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            w, dtype = base.weight.detach().float(), base.weight.dtype
        else:  # NF4Linear
            w, dtype = base.weight_dequantized(torch.float32), torch.float32
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w + self.delta_weight().to(w.device))
        return lin

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.use_rslora}"


def _targets(model, targets):
    """(parent, attr, qualified name) for every nn.Linear / NF4Linear whose attribute name is in targets."""
    targets = tuple(targets)
    out = []
    for name, mod in model.named_modules():
        for attr, child in mod.named_children():
            if attr in targets and not isinstance(mod, LoRALinear) and hasattr(child, "in_features"):
                out.append((mod, attr, f"{name}.{attr}" if name else attr))
    return out


def apply_lora(model: nn.Module, targets=DEFAULT_TARGETS, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               use_rslora: bool = False) -> nn.Module:
    """Wrap every linear named in `targets` (attribute names, e.g. "wq", "w_down") in a LoRALinear,
    freeze everything else, and return the model (modified in place). Only lora_A / lora_B train."""
    found = _targets(model, targets)
    if not found:
        raise ValueError(f"no linear layer named any of {tuple(targets)} in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, _ in found:
        setattr(parent, attr, LoRALinear(getattr(parent, attr), r, alpha, dropout, use_rslora))
    return model


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model):
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


@contextlib.contextmanager
def disable_adapters(model):
    """Inside the block the model computes its base (the DPO reference under LoRA)."""
    mods = [m for _, m in lora_modules(model)]
    prev = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, p in zip(mods, prev):
            m.disabled = p


def lora_state_dict(model) -> dict:
    """{"layers.0.attn.wq.lora_A.weight": (r, in), "...lora_B.weight": (out, r), ...} (our names)."""
    sd = {}
    for name, m in lora_modules(model):
        sd[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


_OUR = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)\.(lora_[AB])\.weight$")
_PEFT = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_[AB])\.weight$")


def to_peft_key(key: str) -> str:
    """layers.{i}.attn.wq.lora_A.weight -> base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"""
    m = _OUR.match(key)
    if not m or m.group(3) not in HF_NAMES:
        raise KeyError(f"not a LoRA key of this model: {key}")
    parent, hf = HF_NAMES[m.group(3)]
    return f"base_model.model.model.layers.{m.group(1)}.{parent}.{hf}.{m.group(4)}.weight"


def from_peft_key(key: str) -> str:
    m = _PEFT.match(key)
    inv = {v[1]: k for k, v in HF_NAMES.items()}
    if not m or m.group(3) not in inv:
        raise KeyError(f"not a PEFT LoRA key of a Llama model: {key}")
    parent = "attn" if m.group(2) == "self_attn" else "mlp"
    return f"layers.{m.group(1)}.{parent}.{inv[m.group(3)]}.{m.group(4)}.weight"


def _config_of(model) -> dict:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    m0 = mods[0][1]
    attrs = sorted({n.rsplit(".", 1)[-1] for n, _ in mods})
    p = m0.lora_dropout.p if isinstance(m0.lora_dropout, nn.Dropout) else 0.0
    return dict(r=m0.r, alpha=m0.alpha, dropout=p, use_rslora=m0.use_rslora, targets=attrs)


def save_adapter(model, out_dir: str, base_model_name_or_path: str = None) -> str:
    """Write PEFT's adapter files: adapter_config.json + adapter_model.safetensors (PEFT key names)."""
    from safetensors.torch import save_file

    cfg = _config_of(model)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {to_peft_key(k): v.float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["r"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"], "use_rslora": cfg["use_rslora"],
        "target_modules": sorted(HF_NAMES[t][1] for t in cfg["targets"]), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2)
    return out_dir


def load_adapter(model, adapter_dir: str) -> nn.Module:
    """Apply LoRA to `model` as described by a PEFT adapter dir (ours or PEFT's) and load its weights."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        c = json.load(f)
    inv = {v[1]: k for k, v in HF_NAMES.items()}
    targets = [inv[t] for t in c["target_modules"]]
    apply_lora(model, targets, r=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0),
               use_rslora=c.get("use_rslora", False))
    sd = {from_peft_key(k.replace(".default.", ".")): v for k, v in
          load_file(os.path.join(adapter_dir, "adapter_model.safetensors")).items()}
    mods = dict(lora_modules(model))
    with torch.no_grad():
        for k, v in sd.items():
            name, which = k.rsplit(".", 2)[0], k.rsplit(".", 2)[1]
            getattr(mods[name], which).weight.copy_(v)
    return model


@torch.no_grad()
def merge_lora(model) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + scaling * B @ A (in place; returns model).
    Trainability of the merged weights is restored (requires_grad=True everywhere)."""
    for name, m in lora_modules(model):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], m.merged_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
