"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule.

Decay groups: every matrix (ndim >= 2) decays — the projections and the tied embedding, which is
also the lm_head (nanoGPT's choice; decaying the output projection regularizes the logits);
vectors (RMSNorm gains, biases) do not — decaying a gain towards 0 shrinks the activations it
exists to scale.
"""
import math

import torch


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
    """torch.optim.AdamW over param_groups(); fused on CUDA."""
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_steps`, then cosine decay to min_lr_ratio*lr at
    max_steps. `step` counts optimizer steps from 0."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
