"""Knowledge distillation: the same small student, same steps and data, KD vs CE only."""
import torch

from llmcore.model import build_model
from llmcore.train.chatdata import ChatDataset, pad_collate, read_jsonl
from llmcore.train.distill import teacher_kl, train_distill

from .conftest import SEQ, quick_cfg, tiny_config

STEPS = 120


@torch.no_grad()
def token_accuracy(model, ds, teacher=None):
    """Top-1 accuracy on held-out assistant tokens: against the labels, or (teacher given) agreement
    with the teacher's top-1."""
    model.eval()
    b = pad_collate([ds[i] for i in range(len(ds))])
    pred = model(b["input_ids"]).argmax(-1)
    y = b["labels"]
    m = y != -100
    if teacher is not None:
        y = teacher.eval()(b["input_ids"]).argmax(-1)
    return float((pred[m] == y[m]).float().mean())


def test_kd_beats_ce_only(bundled, sft_model, tmp_path):
    teacher = sft_model[0]
    tok = bundled["tok"]
    recs = read_jsonl(bundled["corpus"]["sft"])
    train_set, held = ChatDataset(recs[:3000], tok, SEQ), ChatDataset(recs[-200:], tok, SEQ)
    res = {}
    for name, alpha in (("kd", 0.2), ("ce", 1.0)):
        torch.manual_seed(1)
        student = build_model(tiny_config(tok.vocab_size, dim=64, n_layers=1, n_heads=2, n_kv_heads=1))
        h = train_distill(student, teacher, train_set, quick_cfg(tmp_path / name, STEPS, 3e-3), alpha=alpha,
                          temperature=1.0)
        res[name] = (teacher_kl(student, teacher, held), token_accuracy(student, held),
                     token_accuracy(student, held, teacher), h["seconds"])
    t_acc = token_accuracy(teacher, held)
    print(f"\nheld-out KL(teacher||student) / token accuracy / top-1 agreement with the teacher: "
          f"KD {res['kd'][0]:.4f} / {res['kd'][1]:.3f} / {res['kd'][2]:.3f}, "
          f"CE only {res['ce'][0]:.4f} / {res['ce'][1]:.3f} / {res['ce'][2]:.3f}; teacher accuracy {t_acc:.3f}; "
          f"{res['kd'][3]:.1f}s / {res['ce'][3]:.1f}s")
    # measured (alpha 0.2, T 1): KL 0.194 (KD) vs 0.443 (CE only), label accuracy 0.323 vs 0.309,
    # agreement with the teacher 0.532 vs 0.393 (teacher accuracy 0.375). alpha 0.5, T 2 gave KL 0.370
    # but no accuracy gain (0.303), hence the defaults alpha 0.2, T 1 in scripts/distill.py.
    # With data's denser world (666da9d): KL 0.248 vs 0.432, accuracy 0.337 vs 0.312, agreement 0.590 vs 0.497.
    assert res["kd"][0] < 0.7 * res["ce"][0]
    assert res["kd"][1] >= res["ce"][1]
    assert res["kd"][2] > res["ce"][2] + 0.05
