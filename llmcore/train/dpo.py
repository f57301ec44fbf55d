"""DPO stage (Rafailov et al. 2023; minimind train_dpo.py) over the shared loop.

Batches come from chatdata.PairDataset + pair_collate: input_ids/labels (2B, S), chosen rows first.
One policy forward scores chosen and rejected; the reference is a frozen copy of the starting model,
or — when the policy carries LoRA adapters and no reference is given — the same model with its
adapters disabled (no second copy in memory). Sequence scores are summed completion log-probs.

Logged metrics per step: reward_margin = mean(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
reward_acc = mean(chosen reward > rejected reward), chosen_reward, rejected_reward.

`sft_weight` > 0 adds the chosen completions' mean per-token NLL times sft_weight to the loss (RPO,
Pang et al. 2024 "Iterative Reasoning Preference Optimization"): DPO alone can lower both
completions' likelihood; the NLL term keeps the chosen answer likely (logged as "chosen_nll").
"""
import copy

import torch

from llmcore.nn.lora import disable_adapters, lora_modules
from llmcore.train.chatdata import pair_collate
from llmcore.train.losses import dpo_loss, sequence_logps
from llmcore.train.loop import _autocast, train


def _unwrap(model):
    return getattr(model, "module", model)


def make_dpo_loss(ref_model=None, beta: float = 0.1, label_smoothing: float = 0.0, sft_weight: float = 0.0):
    """loss_fn(model, batch) -> (loss, metrics) for llmcore.train.loop.train."""
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")

    def loss_fn(model, batch):
        ids, labels = batch["input_ids"], batch["labels"]
        logps = sequence_logps(model(ids), labels)  # (2B,)
        with torch.no_grad():
            if ref_model is None:
                with disable_adapters(_unwrap(model)):
                    ref = sequence_logps(model(ids), labels)
            else:
                ref = sequence_logps(ref_model(ids), labels)
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
        extra = {}
        if sft_weight > 0:
            n_chosen = (labels.chunk(2)[0] != -100).sum().clamp(min=1)
            nll = -pc.sum() / n_chosen  # mean NLL per chosen completion token
            loss = loss + sft_weight * nll
            extra["chosen_nll"] = nll.detach()
        return loss, {**extra, "reward_margin": (cr - rj).mean(), "reward_acc": (cr > rj).float().mean(),
                      "chosen_reward": cr.mean(), "rejected_reward": rj.mean()}
    loss_fn.units = lambda batch: batch["input_ids"].shape[0] // 2  # the loss is a mean over pairs
    return loss_fn


def reference_model(model):
    """A frozen eval-mode copy (None when the model has LoRA adapters: the disabled-adapter base is the reference)."""
    if lora_modules(model):
        return None
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def preference_accuracy(model, dataset, batch_size: int = 16, dtype: str = "fp32", device="cpu"):
    """Held-out preference accuracy of a model on its own: the fraction of pairs with summed
    log p(chosen completion) > log p(rejected completion); also the mean log-prob margin."""
    was = model.training
    model.eval()
    wins, margin, n = 0, 0.0, 0
    for s in range(0, len(dataset), batch_size):
        b = pair_collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        with _autocast(device, dtype):
            lp = sequence_logps(model(b["input_ids"].to(device)), b["labels"].to(device))
        c, r = lp.chunk(2)
        wins += int((c > r).sum())
        margin += float((c - r).sum())
        n += len(c)
    model.train(was)
    return wins / max(n, 1), margin / max(n, 1)


def train_dpo(model, dataset, cfg, ref_model="auto", beta: float = 0.1, label_smoothing: float = 0.0,
              eval_dataset=None, sft_weight: float = 0.0):
    """DPO-train `model` on a PairDataset. ref_model="auto": frozen copy, or adapters-off under LoRA."""
    if ref_model == "auto":
        ref_model = reference_model(model)
    if ref_model is not None:
        ref_model.to(cfg.device)
    return train(model, dataset, cfg, loss_fn=make_dpo_loss(ref_model, beta, label_smoothing, sft_weight),
                 eval_dataset=eval_dataset, collate=pair_collate)
