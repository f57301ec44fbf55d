"""The causal-LM loss of a patched transformers model, in one function.

    _loss(hidden (B, S, H), lm_head, labels (B, S), num_items_in_batch=None, ignore_index=-100,
          shift_labels=None) -> (loss fp32 scalar, logits or None)

Semantics are transformers' ForCausalLMLoss exactly: labels shifted left by one (the last position
gets ignore_index) unless `shift_labels` (B, S) is given; tokens equal to ignore_index are ignored;
reduction "mean" over the counted tokens, or "sum" / num_items_in_batch when that is given (the
Trainer's gradient-accumulation rule). All-ignored batches give NaN with "mean" (PyTorch's rule).
Paths:
- `llmcore.ops.fused_linear_cross_entropy` when that op exists and lm_head is a plain nn.Linear: the
  (B*S, V) logits are never materialized and logits is returned as None.
- otherwise (op absent, lm_head wrapped by PEFT / quantized): logits = lm_head(hidden) upcast to
  fp32 and F.cross_entropy, as transformers computes it; the logits are returned.
"""
import torch
import torch.nn.functional as F

import llmcore.ops as ops


def _shift(labels, ignore_index, shift_labels):
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _reduce(loss_sum_or_mean, num_items_in_batch, device):
    if num_items_in_batch is None:
        return loss_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(device)
    return loss_sum_or_mean / num_items_in_batch


def _loss(hidden, lm_head, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_):
    """See the module docstring."""
    target = _shift(labels, ignore_index, shift_labels).to(hidden.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    fused = getattr(ops, "fused_linear_cross_entropy", None)
    if fused is not None and type(lm_head) is torch.nn.Linear:
        h = hidden.reshape(-1, hidden.shape[-1])
        w, b = lm_head.weight, lm_head.bias
        dev = h.device.type
        if torch.is_autocast_enabled(dev):  # what lm_head(h) would compute in: the autocast dtype
            dt = torch.get_autocast_dtype(dev)
            h, w, b = h.to(dt), w.to(dt), None if b is None else b.to(dt)
        elif h.dtype != w.dtype:
            h = h.to(w.dtype)
        with torch.autocast(dev, enabled=False):
            loss = fused(h, w, target, bias=b, ignore_index=ignore_index, reduction=reduction)
        return _reduce(loss.float(), num_items_in_batch, loss.device), None
    logits = lm_head(hidden)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target, ignore_index=ignore_index,
                           reduction=reduction)
    return _reduce(loss, num_items_in_batch, loss.device), logits
