"""The stage losses as pure functions: DPO against TRL's DPOTrainer, KD and weighted CE against
direct formulas."""
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from llmcore.train.losses import dpo_loss, kd_loss, sequence_logps, token_logps, weighted_token_ce


def _labels(B, S, V, g):
    labels = torch.randint(0, V, (B, S), generator=g)
    for b in range(B):  # a prompt of random length, then the completion; right padding
        p = int(torch.randint(1, S // 2, (1,), generator=g))
        e = int(torch.randint(S - 3, S + 1, (1,), generator=g))
        labels[b, :p] = -100
        labels[b, e:] = -100
    return labels


def test_sequence_logps_matches_gather_loop():
    g = torch.Generator().manual_seed(0)
    B, S, V = 3, 11, 17
    logits = torch.randn(B, S, V, generator=g)
    labels = _labels(B, S, V, g)
    want = torch.zeros(B)
    for b in range(B):
        for t in range(S):
            if labels[b, t] != -100:
                want[b] += logits[b, t].log_softmax(-1)[labels[b, t]]
    torch.testing.assert_close(sequence_logps(logits, labels), want)
    lp, mask = token_logps(logits, labels)
    assert lp.shape == mask.shape == (B, S)


class _FakeAccelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics

    def unwrap_model(self, m):
        return m


def _trl_dpo(per_token_logps, completion_mask, ref_c, ref_r, beta):
    """Run TRL's own DPOTrainer._compute_loss (loss_type "sigmoid", precomputed reference log-probs)
    on a fake model that returns the given per-token log-probs — TRL 1.x exposes no standalone
    dpo_loss function, so its method is called with a minimal stand-in for `self`."""
    from trl import DPOTrainer

    n, s1 = per_token_logps.shape
    out = types.SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(n, s1),
                                mean_logits=torch.zeros(n, s1), is_top1=torch.zeros(n, s1, dtype=torch.bool))
    model = types.SimpleNamespace(training=True)
    fake = types.SimpleNamespace(
        model=model, accelerator=_FakeAccelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, use_weighting=False, label_smoothing=0.0, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace())
    call = lambda **kw: out  # noqa: E731
    inputs = {"input_ids": torch.zeros(n, s1 + 1, dtype=torch.long), "attention_mask": torch.ones(n, s1 + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(fake, call, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(beta):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(1)
    B, S, V = 4, 9, 13
    logits = torch.randn(2 * B, S, V, generator=g, requires_grad=True)
    labels = _labels(2 * B, S, V, g)
    per_tok, mask = token_logps(logits, labels)
    completion_mask = torch.cat([torch.zeros(2 * B, 1), mask.float()], 1)  # TRL shifts its mask by one
    ref = torch.randn(2 * B, generator=g) * 3 - 10
    trl_loss, metrics = _trl_dpo(per_tok, completion_mask, ref[:B], ref[B:], beta)
    lp = sequence_logps(logits, labels)
    ours, cr, rr = dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta=beta)
    torch.testing.assert_close(ours, trl_loss)
    g_ours = torch.autograd.grad(ours, logits, retain_graph=True)[0]
    g_trl = torch.autograd.grad(trl_loss, logits)[0]
    torch.testing.assert_close(g_ours, g_trl)
    assert metrics["rewards/margins"][0] == pytest.approx(float((cr - rr).mean()), rel=1e-5, abs=1e-6)
    assert metrics["rewards/accuracies"][0] == pytest.approx(float((cr > rr).float().mean()))


def test_dpo_label_smoothing_is_conservative_dpo():
    """eps > 0: the cDPO form TRL used for loss_type="sigmoid" before 1.0 (and still uses for "aot"):
    -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d)."""
    g = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (torch.randn(6, generator=g) for _ in range(4))
    d = (pc - rc) - (pr - rr)
    for eps in (0.0, 0.1, 0.3):
        want = (-(1 - eps) * F.logsigmoid(0.2 * d) - eps * F.logsigmoid(-0.2 * d)).mean()
        torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.2, eps)[0], want)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, 0.1, 0.5)
    # identical policy and reference: loss log 2, zero rewards
    loss, cr, rj = dpo_loss(pc, pr, pc, pr)
    assert float(loss) == pytest.approx(0.6931471805599453)
    assert torch.all(cr == 0) and torch.all(rj == 0)


def test_kd_loss_formula_and_masking():
    g = torch.Generator().manual_seed(3)
    B, S, V = 2, 8, 11
    s = torch.randn(B, S, V, generator=g, requires_grad=True)
    t = torch.randn(B, S, V, generator=g)
    labels = _labels(B, S, V, g)
    for alpha, T in ((0.5, 2.0), (0.0, 1.0), (1.0, 3.0)):
        loss, ce, kl = kd_loss(s, t, labels, alpha, T)
        m = labels != -100
        ss, tt, yy = s[m], t[m], labels[m]
        want_ce = F.cross_entropy(ss, yy)
        want_kl = F.kl_div(F.log_softmax(ss / T, -1), F.log_softmax(tt / T, -1), log_target=True, reduction="batchmean")
        torch.testing.assert_close(ce, want_ce.detach())
        torch.testing.assert_close(kl, want_kl.detach())
        torch.testing.assert_close(loss, alpha * want_ce + (1 - alpha) * T * T * want_kl)
    # the teacher gets no gradient, masked positions none either
    t.requires_grad_(True)
    loss, _, _ = kd_loss(s, t, labels, 0.3, 2.0)
    loss.backward()
    assert t.grad is None
    assert torch.all(s.grad[labels == -100] == 0)
    # KL is zero when the student equals the teacher
    assert float(kd_loss(t.detach(), t.detach(), labels, 0.0, 2.0)[2]) == pytest.approx(0.0, abs=1e-6)


def test_weighted_token_ce():
    g = torch.Generator().manual_seed(4)
    B, S, V = 3, 10, 9
    logits = torch.randn(B, S, V, generator=g)
    labels = _labels(B, S, V, g)
    base = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(weighted_token_ce(logits, labels), base)
    torch.testing.assert_close(weighted_token_ce(logits, labels, (3, 4), 1.0), base)
    # by hand: weight 10 on targets 3 and 4, normalized by the unweighted count (minimind)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    y = labels.flatten()
    w = torch.where((y == 3) | (y == 4), 10.0, 1.0) * (y != -100)
    torch.testing.assert_close(weighted_token_ce(logits, labels, (3, 4), 10.0), (ce * w).sum() / (y != -100).sum())
    assert ((y == 3) | (y == 4)).any()
