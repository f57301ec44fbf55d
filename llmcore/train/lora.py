"""LoRA / QLoRA stage: adapters on chosen linears of an SFT model, trained with the shared loop.

    prepare_lora(model, targets, r, alpha, dropout, use_rslora, qlora=False)
        qlora: the target linears first become frozen NF4Linear (blocksize 64, double quant,
        bf16 compute) — QLoRA (Dettmers et al. 2023) — then LoRA goes on top (fp32 adapters).
    train_lora(model, dataset, cfg, ...) -> history; writes <out>/adapter (PEFT format)

Only lora_A / lora_B have requires_grad, so the loop's optimizer holds only them. The loss is the
SFT loss (next-token CE on assistant tokens, llmcore.train.loop.lm_loss).
"""
import torch
import torch.nn as nn

from llmcore.nn.lora import DEFAULT_TARGETS, apply_lora, lora_parameters, save_adapter
from llmcore.train.loop import lm_loss, train


def quantize_linears(model, targets=DEFAULT_TARGETS, blocksize: int = 64, double_quant: bool = True,
                     compute_dtype=torch.bfloat16):
    """Replace every nn.Linear named in `targets` by a frozen NF4Linear (in place; returns model)."""
    from llmcore.nn import NF4Linear

    for name, mod in list(model.named_modules()):
        for attr, child in list(mod.named_children()):
            if attr in targets and isinstance(child, nn.Linear):
                q = NF4Linear.from_linear(child, blocksize=blocksize, double_quant=double_quant,
                                          compute_dtype=compute_dtype)
                for p in q.parameters():
                    p.requires_grad_(False)
                for bname, b in list(q.named_buffers(recurse=False)):
                    if b is not None:  # nf4_quantize shares one code table between weights; safetensors
                        setattr(q, bname, b.clone())  # refuses shared storage in a checkpoint
                setattr(mod, attr, q)
    return model


def prepare_lora(model, targets=DEFAULT_TARGETS, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, qlora: bool = False, compute_dtype=torch.bfloat16):
    if qlora:
        quantize_linears(model, targets, compute_dtype=compute_dtype)
    return apply_lora(model, targets, r, alpha, dropout, use_rslora)


def trainable_summary(model) -> str:
    n_train = sum(p.numel() for p in lora_parameters(model))
    n_all = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return f"trainable (LoRA) params: {n_train:,} of {n_all:,} ({100 * n_train / max(n_all, 1):.2f}%)"


def train_lora(model, dataset, cfg, eval_dataset=None, collate=None, base_name: str = None):
    """Train the adapters already put on `model` (prepare_lora) and save them to <out_dir>/adapter."""
    from llmcore.train.chatdata import pad_collate

    hist = train(model, dataset, cfg, loss_fn=lm_loss, eval_dataset=eval_dataset, collate=collate or pad_collate)
    save_adapter(model, f"{cfg.out_dir}/adapter", base_name)
    return hist
