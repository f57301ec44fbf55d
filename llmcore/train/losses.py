"""Stage losses as pure functions of logits / log-probs (no model, no optimizer): tested in isolation.

Label convention everywhere (the model's and llmcore.data's, as minimind's): labels are pre-shifted —
labels[b, t] is the target of the logits at (b, t), i.e. the token after input_ids[b, t] — and -100
marks a position without loss (prompt, padding). The "completion" / "assistant" positions of a row
are those t with labels[:, t] != -100.

    sequence_logps      (B, S, V) logits, (B, S) labels -> (B,) summed log p(label) over the completion
    dpo_loss            DPO (Rafailov et al. 2023) on summed log-probs, optional label smoothing (cDPO)
    kd_loss             alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), assistant positions only
    weighted_token_ce   CE with a per-token weight (reasoning distillation: x10 on the think/answer tags)

All statistics in fp32 whatever the logits dtype.
"""
import torch
import torch.nn.functional as F

IGNORE = -100


def _targets(logits, labels):
    """logits (B, S, V), labels (B, S) -> logits fp32, targets (B, S) with 0 at ignored positions,
    mask (B, S) bool."""
    mask = labels != IGNORE
    return logits.float(), labels.masked_fill(~mask, 0), mask


def token_logps(logits, labels):
    """Per-token log p(label) (B, S) fp32, 0 at ignored positions; and the mask (B, S)."""
    logits, target, mask = _targets(logits, labels)
    logp = torch.gather(logits.log_softmax(-1), 2, target.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sequence_logps(logits, labels):
    """Summed completion log-prob per row: (B,) fp32 = sum_t log p(labels[t] | input_ids[<= t]) over labels != -100."""
    logp, _ = token_logps(logits, labels)
    return logp.sum(-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO loss on summed sequence log-probs, each (B,).

        delta = (pi_c - ref_c) - (pi_r - ref_r)
        loss  = mean( -(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta) )

    eps = label_smoothing (conservative DPO; eps = 0 is plain DPO, TRL's loss_type="sigmoid").
    Returns (loss scalar, chosen_rewards (B,), rejected_rewards (B,)) with rewards = beta * (pi - ref),
    detached; reward margin = chosen - rejected, preference accuracy = mean(chosen > rejected)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    delta = chosen_logratios - rejected_logratios
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def kd_loss(student_logits, teacher_logits, labels, alpha: float = 0.5, temperature: float = 1.0):
    """White-box knowledge distillation (Hinton et al. 2015; minimind train_distillation.py), on the
    positions whose label is not -100 (assistant tokens):

        ce  = mean_t CE(student_t, label_t)
        kl  = mean_t sum_v p_T(v) (log p_T(v) - log q_T(v)),  p_T = softmax(teacher / T), q_T = softmax(student / T)
        loss = alpha * ce + (1 - alpha) * T^2 * kl

    student_logits, teacher_logits (B, S, V) (same vocabulary); teacher gets no gradient.
    Returns (loss, ce, kl) — ce and kl detached, for logging."""
    s, target, mask = _targets(student_logits, labels)
    t = teacher_logits.detach().float()
    s, t, target = s[mask], t[mask], target[mask]  # (N, V), (N, V), (N,)
    if target.numel() == 0:
        zero = student_logits.sum() * 0.0
        return zero, zero.detach(), zero.detach()
    ce = F.cross_entropy(s, target)
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    loss = alpha * ce + (1 - alpha) * temperature ** 2 * kl
    return loss, ce.detach(), kl.detach()


def weighted_token_ce(logits, labels, weight_ids=(), weight: float = 10.0):
    """Cross-entropy where target tokens in `weight_ids` count `weight` times (minimind
    train_distill_reason.py: the <think>, </think>, <answer>, </answer> tokens at x10 so the format sticks).

        loss = sum_t w_t * CE_t / (number of positions with a label)

    Normalized by the unweighted count, as minimind does, so weight=1 is the plain mean CE.
    logits (B, S, V), labels (B, S) with -100 = no loss."""
    logits, target, mask = _targets(logits, labels)
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    w = mask.float()
    if len(weight_ids):
        ids = torch.as_tensor(list(weight_ids), device=target.device)
        w = torch.where(torch.isin(target, ids) & mask, torch.full_like(w, weight), w)
    return (ce * w).sum() / mask.sum().clamp(min=1)
