"""White-box knowledge distillation stage (minimind train_distillation.py) over the shared loop.

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))

on assistant positions only (labels != -100), teacher frozen in eval mode (same tokenizer/vocab).
alpha = 1 is plain SFT (the CE-only baseline the tests compare against).
"""
import torch

from llmcore.train.chatdata import pad_collate
from llmcore.train.losses import kd_loss
from llmcore.train.loop import _autocast, train


def make_kd_loss(teacher, alpha: float = 0.2, temperature: float = 1.0):
    def loss_fn(model, batch):
        ids, labels = batch["input_ids"], batch["labels"]
        logits = model(ids)
        with torch.no_grad():
            t_logits = teacher(ids)
        loss, ce, kl = kd_loss(logits, t_logits, labels, alpha, temperature)
        return loss, {"ce": ce, "kl": kl}
    return loss_fn


def train_distill(student, teacher, dataset, cfg, alpha: float = 0.2, temperature: float = 1.0, eval_dataset=None):
    """KD-train `student` from `teacher` (put in eval mode; its forward runs under no_grad, so its
    requires_grad flags are left as the caller set them)."""
    teacher = teacher.eval().to(cfg.device)
    return train(student, dataset, cfg, loss_fn=make_kd_loss(teacher, alpha, temperature),
                 eval_dataset=eval_dataset, collate=pad_collate)


@torch.no_grad()
def teacher_kl(student, teacher, dataset, batch_size: int = 16, dtype: str = "fp32", device="cpu"):
    """Mean per-token KL(teacher || student) at T=1 over the assistant positions of `dataset`."""
    student.eval()
    teacher.eval()
    total, n = 0.0, 0
    for s in range(0, len(dataset), batch_size):
        b = pad_collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        ids, labels = b["input_ids"].to(device), b["labels"].to(device)
        with _autocast(device, dtype):
            _, _, kl = kd_loss(student(ids), teacher(ids), labels, alpha=0.0, temperature=1.0)
        k = int((labels != -100).sum())
        total, n = total + float(kl) * k, n + k
    return total / max(n, 1)
